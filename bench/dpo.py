"""DPO side by side: skilltune's `train.objective: dpo` and TRL's DPOTrainer on the same pairs.

    python bench/dpo.py                 # every job, one process each, then the table
    python bench/dpo.py JOB [STEPS]     # one job: skilltune | trl_default | trl_best; prints RESULT {json}

Same model (embedded SmolLM2-135M), pairs (the brand-voice example's train split: the reference answer
chosen, a rewrite that breaks the voice rejected — deterministic), system prompt, LoRA (r=16, alpha=32, all
linear layers, no dropout), batch (8 pairs), beta (0.1), learning rate (5e-5, constant) and length: one
epoch (168 pairs, 21 steps), or BENCH_DPO_STEPS steps. Both reference strategies pay for all the data they
train on: skilltune's one forward per pair, up front; TRL default's one per pair per step. TRL default: `use_cpu=True` and nothing else; TRL best: + bf16 weights and
`precompute_ref_log_probs=True` (its reference computed once, as skilltune does). Timed: the training call
(skilltune: the reference pass plus the steps; TRL: `train()`, which includes its precompute) and the whole
job process (model load to saved adapter), measured by the parent. Tokens: each pair's prompt, chosen and
rejected tokens counted once (skilltune's tokenisation), the same numerator for every job.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SYSTEM = "You are Northwind Cloud's support assistant."
STEPS = int(os.environ.get("BENCH_DPO_STEPS", "0"))  # 0: whole epochs
EPOCHS = int(os.environ.get("BENCH_DPO_EPOCHS", "1"))  # the reference pass is paid once, whatever the epochs
BATCH, LR, BETA = 8, 5e-5, 0.1


def pairs() -> list[dict]:
    rows = [json.loads(line) for line in (ROOT / "examples/brand_voice/data/train.jsonl").read_text().splitlines()]
    out = []
    for r in rows:
        body = r["completion"].split(". ", 1)[1].replace("\n— The Northwind team", "")
        rejected = "Hey! " + re.sub(r"\bwe will\b", "I will", body) + " Cheers!"
        out.append({"prompt": r["prompt"], "chosen": r["completion"], "rejected": rejected})
    return out


def _tokens(n_pairs: int) -> int:
    from skilltune.config.schema import ModelConfig
    from skilltune.data.types import Example, Turn
    from skilltune.model.loading import load_tokenizer
    from skilltune.model.tokenizer import turn_end_token
    from skilltune.train.preference import encode_pair

    tok = load_tokenizer(ModelConfig())[0]
    end = turn_end_token(tok)
    total = 0
    for i, p in enumerate(pairs()[:n_pairs]):
        ex = Example([Turn("system", SYSTEM), Turn("user", p["prompt"]), Turn("assistant", p["chosen"], True)],
                     rejected=p["rejected"])
        total += len(encode_pair(tok, ex, end, i).input_ids)
    return total


def run_skilltune(steps: int) -> dict:
    from skilltune.config.schema import SkilltuneConfig
    from skilltune.train.loop import train

    with tempfile.TemporaryDirectory() as d:
        data = Path(d) / "prefs.jsonl"
        data.write_text("".join(json.dumps(p) + "\n" for p in pairs()))
        cfg = SkilltuneConfig.model_validate({
            "data": {"train": str(data), "val_split": 0, "system_prompt": SYSTEM},
            "train": {"objective": "dpo", "dpo_beta": BETA, "lr": LR, "scheduler": "constant", "warmup_ratio": 0,
                      "batch_size": BATCH, "epochs": EPOCHS, "max_steps": steps or None, "output_dir": d,
                      "report_to": [], "save_steps": 100000}})
        t0 = time.perf_counter()
        res = train(cfg, run_name="bench")
        secs = time.perf_counter() - t0
        losses = [json.loads(ln)["train_loss"] for ln in (res.run_dir / "metrics.jsonl").read_text().splitlines()]
    return {"seconds": secs, "steps_seconds": res.summary["train_time_s"], "final_loss": losses[-1],
            "precision": res.summary["precision"]}


def run_trl(steps: int, best: bool) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl import DPOConfig, DPOTrainer

    from jobs import loss_recorder, trl_lora  # the SFT comparison's: same LoRA, same loss log

    from skilltune.config.schema import ModelConfig
    from skilltune.model.loading import load_tokenizer
    from skilltune.model.sources import resolve_model

    path = str(resolve_model(ModelConfig().base).path)
    tok = load_tokenizer(ModelConfig())[0]
    data = Dataset.from_list([
        {"prompt": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": p["prompt"]}],
         "chosen": [{"role": "assistant", "content": p["chosen"]}],
         "rejected": [{"role": "assistant", "content": p["rejected"]}]} for p in pairs()])
    model = AutoModelForCausalLM.from_pretrained(path, **({"dtype": torch.bfloat16} if best else {}))
    losses: list[float] = []

    extra = {"bf16": True, "precompute_ref_log_probs": True} if best else {}
    with tempfile.TemporaryDirectory() as d:
        args = DPOConfig(output_dir=d, use_cpu=True, max_steps=steps or -1, num_train_epochs=EPOCHS,
                         per_device_train_batch_size=BATCH,
                         learning_rate=LR, lr_scheduler_type="constant", beta=BETA, report_to=[], logging_steps=1,
                         save_strategy="no", seed=42, **extra)
        tr = DPOTrainer(model=model, args=args, train_dataset=data, processing_class=tok, peft_config=trl_lora(),
                        callbacks=[loss_recorder(losses)])
        t0 = time.perf_counter()
        tr.train()
        secs = time.perf_counter() - t0
        tr.save_model(d)
    return {"seconds": secs, "final_loss": losses[-1] if losses else float("nan"),
            "precision": "bf16" if best else "fp32"}


JOBS = {"skilltune": run_skilltune, "trl_default": lambda n: run_trl(n, False), "trl_best": lambda n: run_trl(n, True)}


def bench_dpo() -> list[dict]:
    """Every job in its own process, then one row each (bench/run.py's `dpo` table)."""
    n_pairs = STEPS * BATCH if STEPS else len(pairs()) * EPOCHS
    tokens = _tokens(STEPS * BATCH if STEPS else len(pairs())) * (1 if STEPS else EPOCHS)
    rows = []
    for job in os.environ.get("BENCH_DPO_JOBS", ",".join(JOBS)).split(","):
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, __file__, job, str(STEPS)], capture_output=True, text=True)
        wall = time.perf_counter() - t0
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if line is None:
            rows.append({"job": job, "precision": "failed: " + proc.stderr.strip().splitlines()[-1][:120]})
            continue
        r = json.loads(line[7:])
        rows.append({"job": job, "precision": r["precision"], "train_s": round(r["seconds"], 1),
                     "tokens_per_s": round(tokens / r["seconds"]), "pairs_per_s": round(n_pairs / r["seconds"], 2),
                     "whole_command_s": round(wall, 1), "final_loss": round(r["final_loss"], 4)})
    base = next((r["train_s"] for r in rows if r["job"] == "trl_default" and "train_s" in r), None)
    for r in rows:
        if base and "train_s" in r:
            r["vs_trl_default"] = round(base / r["train_s"], 2)
    return rows


_LENGTH = f"{STEPS} steps" if STEPS else f"{EPOCHS} epoch(s)"
TITLE = (f"DPO, LoRA, SmolLM2-135M, brand-voice pairs: {_LENGTH} of {BATCH} "
         "pairs (tokens: prompt + chosen + rejected, each once; train_s: the training call, reference pass included)")


def main() -> None:
    if len(sys.argv) > 1:
        result = JOBS[sys.argv[1]](int(sys.argv[2]) if len(sys.argv) > 2 else STEPS)
        print("RESULT " + json.dumps(result))
        return
    from tables import print_markdown

    print_markdown(TITLE, bench_dpo())


if __name__ == "__main__":
    main()
