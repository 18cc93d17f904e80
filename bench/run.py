"""Benchmarks (not tests): print a table of measurements on this machine.

    python bench/run.py [audit] [generate] [generation] [step] [matmul] [runtimes] [compare] [dpo] [serving]
                        [structured]
                                                                                (default: all; `make bench`)

- audit:    `data audit` on 100,000 synthetic rows (target: under 2 minutes)
- generate: batched vs one-at-a-time generation, 64 prompts, embedded SmolLM2 (target: >= 4x)
- generation: the 100 SQL test prompts at 16 rows: transformers' generate with its defaults against
            skilltune's generation in fp32 and bf16; tokens/s, same answers, decode-step GB/s (bench/generation.py)
- step:     where a default training step's time goes, by category, with the matmuls' TFLOP/s (bench/step.py)
- matmul:   the decoder's matmul shapes at 1 and 2 threads against a 2048^3 product (bench/step.py)
- runtimes: the same 24 SQL prompts answered by transformers (one at a time and batched) and by llama.cpp
            (llama-cpp-python, `make llamacpp`) from GGUF exports at f16 and q8_0: tokens/s (one stream unless
            batched), embedded SmolLM2, greedy, 48 new tokens at most
- compare:  the same LoRA job three ways, each in its own process (bench/jobs.py): skilltune's
            defaults, TRL SFTTrainer with use_cpu=True, TRL with the best CPU settings found;
            tokens/s, training time, peak RSS, final train loss, held-out loss and SQL accuracy, MFU.
            skilltune's job runs before, between and after the TRL jobs (median of the three)
- dpo:      DPO (LoRA) on the brand-voice pairs: skilltune against TRL's DPOTrainer, default and best CPU
            settings, each in its own process (bench/dpo.py); tokens/s, pairs/s, whole-command time
- structured: the SQL prompts asking for JSON, decoded plain, as any JSON object and under a JSON schema
            (bench/structured.py): tokens/s, how many answers parse and match the schema
- serving:  8 concurrent clients against the server with continuous batching and with static batches
            (bench/serving.py): requests/s, generated tokens/s, latency p50/p95, time to first token

Times vary on a shared machine; compare ratios. BENCH_REPEAT=3 repeats each (interleaved) and
reports medians; BENCH_STEPS=N trains N steps instead of one epoch (quicker, but the held-out
accuracy then means little). One epoch, once: about 30 minutes here.
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
sys.path.insert(0, str(ROOT / "bench"))

from dpo import TITLE as DPO_TITLE, bench_dpo  # noqa: E402
from generation import TITLE as GENERATION_TITLE, bench_generation  # noqa: E402
from serving import TITLE as SERVING_TITLE, bench_serving  # noqa: E402
from structured import TITLE as STRUCTURED_TITLE, bench_structured  # noqa: E402
from step import _model_config, bench_matmul, bench_step  # noqa: E402
STEPS = int(os.environ.get("BENCH_STEPS", "0"))  # 0: one full epoch (needed for held-out accuracy)
REPEAT = int(os.environ.get("BENCH_REPEAT", "1"))


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
    from skilltune.model.generate import generate
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


def bench_runtimes() -> list[dict]:
    import tempfile

    from skilltune.config import load_config
    from skilltune.data.reader import load_examples
    from skilltune.data.tokenize import prompt_text
    from skilltune.export import gguf, runtime
    from skilltune.model.generate import generate
    from skilltune.model.sources import resolve_model
    from skilltune.model.target import load_target

    cfg = load_config(ROOT / "examples/sql/config.yaml")
    target = load_target("embedded:smollm2-135m-instruct")
    prompts = [prompt_text(target.tokenizer, e)
               for e in load_examples(cfg.data.test, system_prompt=cfg.data.system_prompt)[:24]]
    rows = []

    def row(name, tokens, seconds, note=""):
        rows.append({"runtime": name, "generated_tokens": tokens, "seconds": round(seconds, 1),
                     "tokens_per_s": round(tokens / seconds, 1), "note": note})

    for name, bs in (("skilltune generate fp32, one at a time", 1), ("skilltune generate fp32, batch 24", 24)):
        t0 = time.perf_counter()
        gens = generate(target.model, target.tokenizer, prompts, max_new_tokens=48, batch_size=bs)
        row(name, sum(g.new_tokens for g in gens), time.perf_counter() - t0)
    if not runtime.available():
        rows.append({"runtime": "llama.cpp", "note": "not installed: make llamacpp"})
        return rows
    with tempfile.TemporaryDirectory() as tmp:
        for quant in ("f16", "q8_0"):
            path = gguf.convert(resolve_model("embedded:smollm2-135m-instruct").path, Path(tmp) / f"m-{quant}.gguf",
                                quant)
            _, _, timing = runtime.llama_cpp_answers(path, prompts, 48)
            row(f"llama.cpp {quant}, one at a time", timing["generated_tokens"], timing["wall_s"],
                f"{timing['threads']} threads")
    return rows


def bf16_matmul_peak() -> float:
    """Measured bf16 matmul throughput (TFLOP/s), best of 30 2048^3 products: the MFU denominator.

    The VM's speed swings (0.74 and 1.89 TFLOP/s in two sittings): read MFU against the best peak seen.
    """
    import torch

    a = torch.randn(2048, 2048, dtype=torch.bfloat16)
    b = torch.randn(2048, 2048, dtype=torch.bfloat16)
    best = 0.0
    for _ in range(30):
        t0 = time.perf_counter()
        a @ b
        best = max(best, 2 * 2048**3 / (time.perf_counter() - t0) / 1e12)
    return best


def linear_params() -> int:
    """Parameters of the decoder's linear layers (the FLOPs per token are 4x this, forward + backward)."""
    c = _model_config()
    h, kv = c["hidden_size"], c["num_key_value_heads"] * (c["hidden_size"] // c["num_attention_heads"])
    return c["num_hidden_layers"] * (h * (2 * h + 2 * kv) + 3 * h * c["intermediate_size"])


def _job(name: str) -> dict:
    started = time.time()
    proc = subprocess.run([sys.executable, str(ROOT / "bench/jobs.py"), name, str(STEPS)], capture_output=True,
                          text=True)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if line is None:
        raise RuntimeError(f"{name} failed:\n{(proc.stderr or proc.stdout)[-2000:]}")
    res = json.loads(line[7:])
    res["whole_s"] = res.pop("saved_at") - started  # process start to adapter saved, the same clock for every job
    print(f"  {name}: {res['tokens'] / res['seconds']:.1f} tokens/s, whole command {res['whole_s']:.1f} s, "
          f"held-out loss {res['heldout_loss']:.4f}",
          file=sys.stderr, flush=True)
    return res


def bench_compare() -> list[dict]:
    """skilltune defaults vs TRL use_cpu=True vs TRL's best CPU settings: one sitting, median of BENCH_REPEAT."""
    peak = bf16_matmul_peak()
    n_linear = linear_params()
    runs: dict[str, list[dict]] = {name: [] for name in ("skilltune", "trl_default", "trl_best")}
    for _ in range(REPEAT):
        # interleaved, so a noisy spell hits every job; skilltune's job (4-5x shorter) runs before and
        # after each TRL job, so its median spans the same spells as theirs
        for name in ("skilltune", "trl_default", "skilltune", "trl_best", "skilltune"):
            runs[name].append(_job(name))
    rows = []
    for name, rs in runs.items():
        med = {k: statistics.median(r[k] for r in rs) for k in rs[0]}
        row = {"job": name, "tokens_per_s": round(med["tokens"] / med["seconds"], 1),
               "train_s": round(med["seconds"], 1), "whole_s": round(med["whole_s"], 1),
               "peak_rss_gb": round(med["peak_rss_gb"], 2),
               "final_loss": round(med["final_loss"], 4), "heldout_loss": round(med["heldout_loss"], 4),
               "heldout_sql_exec": round(med["heldout_acc"], 3)}
        if "computed_tokens" in med:  # positions the model ran (shared prefixes run once)
            row["computed_per_s"] = round(med["computed_tokens"] / med["seconds"], 1)
            row["mfu"] = round(4 * n_linear * med["computed_tokens"] / med["seconds"] / (peak * 1e12), 3)
        rows.append(row)
    base = rows[1]["tokens_per_s"]
    for r in rows:
        r["vs_trl_default"] = round(r["tokens_per_s"] / base, 2)
        r["vs_trl_best"] = round(r["tokens_per_s"] / rows[2]["tokens_per_s"], 2)
        r["whole_vs_trl_default"] = round(rows[1]["whole_s"] / r["whole_s"], 2)
    rows.append({"job": f"bf16 matmul peak {peak:.2f} TFLOP/s; MFU = 4 x {n_linear / 1e6:.0f}M linear params x "
                        "computed tokens/s / peak (attention and the vocabulary projection not counted). "
                        "train_s: skilltune's summed step time, TRL's trainer.train() wall time; "
                        "whole_s: process start to adapter saved, one clock for all "
                        "(whole_vs_trl_default compares those)"})
    return rows


BENCHES = {"audit": bench_audit, "generate": bench_generate, "generation": bench_generation, "step": bench_step, "matmul": bench_matmul,
           "runtimes": bench_runtimes, "compare": bench_compare, "dpo": bench_dpo, "serving": bench_serving,
           "structured": bench_structured}
TITLES = {"step": "one default training step (SQL example), own time of its ops by category, mean of 3 steps",
          "matmul": "bf16 matmul throughput at the model's shapes, median of 5 (each product on its own weight)",
          "runtimes": "greedy generation, 24 SQL prompts, SmolLM2-135M: transformers against llama.cpp",
          "dpo": DPO_TITLE, "serving": SERVING_TITLE, "generation": GENERATION_TITLE, "structured": STRUCTURED_TITLE}


def main(argv: list[str]) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from rich.console import Console
    from rich.table import Table

    from skilltune.cli.common import quiet_libraries

    quiet_libraries()
    console = Console(width=max(160, Console().width))  # the compare table has 11 columns
    for name in argv or list(BENCHES):
        if name == "compare":
            rows = bench_compare()
            for r in rows:
                print(json.dumps(r), flush=True)
            cols = [k for k in rows[0]] + [k for k in ("computed_per_s", "mfu") if k not in rows[0]]
            table = Table(*cols, title=f"LoRA training, SmolLM2-135M, SQL train split, "
                                       f"{'1 epoch' if not STEPS else f'{STEPS} steps'}, median of {REPEAT}")
            for r in rows[:-1]:
                table.add_row(*[str(r.get(c, "-")) for c in cols])
            console.print(table)
            console.print(rows[-1]["job"])
            continue
        if name in TITLES:  # one table of rows
            rows = BENCHES[name]()
            for r in rows:
                print(json.dumps(r), flush=True)
            table = Table(*rows[0], title=TITLES[name])
            for r in rows:
                table.add_row(*[str(r.get(c, "")) for c in rows[0]])
            console.print(table)
            continue
        runs = [BENCHES[name]() for _ in range(REPEAT)]
        row = dict(runs[-1])
        for key in ("seconds", "speedup", "batched_s", "one_at_a_time_s", "rows_per_s"):
            if all(key in r for r in runs):
                row[key] = statistics.median(r[key] for r in runs)
        print(json.dumps(row), flush=True)
        table = Table("benchmark", "result", title=f"median of {REPEAT}")
        table.add_row(row.pop("bench"), ", ".join(f"{k}={v}" for k, v in row.items()))
        console.print(table)


if __name__ == "__main__":
    main(sys.argv[1:])
