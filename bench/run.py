"""Benchmarks (not tests): print a table of measurements on this machine.

    python bench/run.py [audit] [generate] [train] [trl]     (default: all)

- audit:    `data audit` on 100,000 synthetic rows (target: under 2 minutes)
- generate: batched vs one-at-a-time generation, 64 prompts, embedded SmolLM2 (target: >= 4x)
- train:    skilltune `train` defaults on the SQL example, LoRA r=16 alpha=32 all-linear, N steps
- trl:      TRL SFTTrainer with use_cpu=True on the same data and LoRA config, same steps

Times vary on a shared machine; compare ratios, and repeat (BENCH_REPEAT=3) for a median.
"""

from __future__ import annotations

import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STEPS = int(os.environ.get("BENCH_STEPS", "20"))


def bench_audit() -> dict:
    from skilltune.data.audit import audit_file

    rng = random.Random(0)
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma".split()
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "big.jsonl"
        with open(path, "w") as fh:
            for i in range(100_000):
                p = " ".join(rng.choice(words) for _ in range(rng.randint(8, 30)))
                c = " ".join(rng.choice(words) for _ in range(rng.randint(5, 40)))
                fh.write(json.dumps({"prompt": f"{i} {p}", "completion": c}) + "\n")
        from skilltune.config.schema import ModelConfig
        from skilltune.model.loading import load_tokenizer

        tok = load_tokenizer(ModelConfig())[0]
        t0 = time.perf_counter()
        rep = audit_file(str(path), tokenizer=tok)
        secs = time.perf_counter() - t0
    return {"bench": "audit 100k rows (with tokenizer)", "seconds": round(secs, 1),
            "rows_per_s": round(100_000 / secs), "errors": rep.errors, "target": "< 120 s"}


def bench_generate() -> dict:
    from skilltune.config import load_config
    from skilltune.data.reader import load_examples
    from skilltune.data.tokenize import prompt_text
    from skilltune.evaluate.generate import generate
    from skilltune.model.target import load_target

    cfg = load_config(ROOT / "examples/sql/config.yaml")
    target = load_target("embedded:smollm2-135m-instruct")
    exs = (load_examples(cfg.data.test, system_prompt=cfg.data.system_prompt) * 2)[:64]
    prompts = [prompt_text(target.tokenizer, e) for e in exs]
    t0 = time.perf_counter()
    generate(target.model, target.tokenizer, prompts, max_new_tokens=48, batch_size=64)
    batched = time.perf_counter() - t0
    t0 = time.perf_counter()
    for p in prompts:
        generate(target.model, target.tokenizer, [p], max_new_tokens=48, batch_size=1)
    single = time.perf_counter() - t0
    return {"bench": "generation, 64 prompts, 48 new tokens", "batched_s": round(batched, 1),
            "one_at_a_time_s": round(single, 1), "speedup": round(single / batched, 2), "target": ">= 4x"}


def bench_train() -> dict:
    from skilltune.config import load_config
    from skilltune.train.loop import train

    with tempfile.TemporaryDirectory() as d:
        cfg = load_config(ROOT / "examples/sql/config.yaml",
                          [f"train.max_steps={STEPS}", f"train.output_dir={d}", "train.eval_steps=100000",
                           "train.save_steps=100000"])
        res = train(cfg, run_name="bench")
    s = res.summary
    return {"bench": f"skilltune train defaults, {STEPS} steps", "tokens_per_s": s["tokens_per_s"],
            "seconds": s["train_time_s"], "final_train_loss": round(s["final_train_loss"], 4)}


def bench_trl() -> dict:
    """TRL SFTTrainer, use_cpu=True, otherwise its defaults; same LoRA config, data and global batch."""
    code = f"""
import json, time, os
from datasets import Dataset
from peft import LoraConfig
from trl import SFTConfig, SFTTrainer
from transformers import AutoModelForCausalLM, AutoTokenizer
from skilltune.model.sources import resolve_model
from skilltune.config import load_config
cfg = load_config("{ROOT}/examples/sql/config.yaml")
path = str(resolve_model("embedded:smollm2-135m-instruct").path)
rows = [json.loads(l) for l in open(cfg.data.train)]
data = Dataset.from_list([{{"prompt": [{{"role": "system", "content": cfg.data.system_prompt}},
                                       {{"role": "user", "content": r["prompt"]}}],
                           "completion": [{{"role": "assistant", "content": r["completion"]}}]}} for r in rows])
tok = AutoTokenizer.from_pretrained(path)
model = AutoModelForCausalLM.from_pretrained(path)
args = SFTConfig(output_dir=os.environ["OUT"], use_cpu=True, max_steps={STEPS}, per_device_train_batch_size=8,
                 learning_rate=1e-3, report_to=[], logging_steps=1, save_strategy="no")
peft = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
tr = SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tok, peft_config=peft)
t0 = time.perf_counter(); out = tr.train(); secs = time.perf_counter() - t0
toks = sum(len(x) for x in tr.train_dataset.select(range(min(len(tr.train_dataset), {STEPS} * 8)))["input_ids"])
print("RESULT", json.dumps({{"seconds": secs, "tokens": toks, "loss": out.training_loss}}))
"""
    with tempfile.TemporaryDirectory() as d:
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ, "OUT": d})
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT")), None)
    if line is None:
        return {"bench": "trl SFTTrainer use_cpu=True", "error": (proc.stderr or proc.stdout)[-500:]}
    r = json.loads(line[6:])
    return {"bench": f"trl SFTTrainer use_cpu=True, {STEPS} steps", "tokens_per_s": round(r["tokens"] / r["seconds"], 1),
            "seconds": round(r["seconds"], 1), "final_train_loss": round(r["loss"], 4)}


BENCHES = {"audit": bench_audit, "generate": bench_generate, "train": bench_train, "trl": bench_trl}


def main(argv: list[str]) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from skilltune.cli.common import quiet_libraries

    quiet_libraries()
    names = argv or list(BENCHES)
    repeat = int(os.environ.get("BENCH_REPEAT", "1"))
    rows = []
    for name in names:
        runs = [BENCHES[name]() for _ in range(repeat)]
        row = dict(runs[-1])
        for key in ("tokens_per_s", "seconds", "speedup", "batched_s", "one_at_a_time_s"):
            if all(key in r for r in runs):
                row[key] = statistics.median(r[key] for r in runs)
        rows.append(row)
        print(json.dumps(row), flush=True)
    from rich.console import Console
    from rich.table import Table

    table = Table("benchmark", "result", title=f"skilltune benchmarks (median of {repeat})")
    for r in rows:
        table.add_row(r.pop("bench"), ", ".join(f"{k}={v}" for k, v in r.items()))
    Console().print(table)


if __name__ == "__main__":
    main(sys.argv[1:])
