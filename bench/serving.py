"""Serving under load: continuous batching against the static batches, 8 concurrent clients.

    python bench/serving.py        # also `python bench/run.py serving`

A version of the SQL example (LoRA on the embedded SmolLM2, BENCH_SERVE_STEPS=20 steps: enough to answer
in SQL and stop) is trained and registered in a throwaway skilltune home, then served twice on this
machine — `serve.continuous_batching` true, then false — and driven by `skilltune loadtest`'s client:
8 clients in a closed loop for BENCH_SERVE_S seconds (default 60) each, the SQL test questions, max_tokens
64, every 4th request streamed (its time to first token). Reported: requests/s, generated tokens/s, latency
p50/p95 and time to first token p50/p95, errors.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CLIENTS = int(os.environ.get("BENCH_SERVE_CLIENTS", "8"))
SECONDS = float(os.environ.get("BENCH_SERVE_S", "60"))
STEPS = int(os.environ.get("BENCH_SERVE_STEPS", "20"))


def _version(home: Path) -> str:
    from skilltune.config import load_config
    from skilltune.registry.api import Registry
    from skilltune.train.loop import train

    cfg = load_config(ROOT / "examples/sql/config.yaml",
                      [f"train.output_dir={home / 'runs'}", f"train.max_steps={STEPS}", "train.report_to=[]"])
    run = train(cfg, run_name="serve-bench")
    Registry().add(run.run_dir, "serve-bench")
    return "serve-bench@v1"


def _load(version: str, continuous: bool, prompts: list[str]) -> dict:
    from skilltune.cli.serve_cmd import _server_for  # the private server `skilltune loadtest` starts
    from skilltune.registry.api import Registry
    from skilltune.serve.loadtest import run_loadtest

    with _server_for(Registry(), version, None, {"continuous_batching": continuous, "log_requests": False}) as (url, key):
        run_loadtest(url, "serve-bench", prompts[:8], [CLIENTS], duration_s=5, api_key=key)  # warm-up
        level = run_loadtest(url, "serve-bench", prompts, [CLIENTS], duration_s=SECONDS, api_key=key)[0]
    return {"batching": "continuous" if continuous else "static", **{k: level.get(k) for k in (
        "throughput_rps", "generated_tokens_per_s", "latency_p50_s", "latency_p95_s", "ttft_p50_s", "ttft_p95_s",
        "requests", "error_rate")}}


def bench_serving() -> list[dict]:
    from skilltune.config import load_config
    from skilltune.data.reader import load_examples

    shared = Path(os.environ.get("SKILLTUNE_HOME", Path.home() / ".cache" / "skilltune")) / "models"
    with tempfile.TemporaryDirectory() as d:
        home = Path(d)
        (home / "models").symlink_to(shared, target_is_directory=True)
        os.environ["SKILLTUNE_HOME"] = str(home)
        version = _version(home)
        cfg = load_config(ROOT / "examples/sql/config.yaml")
        prompts = [e.turns[-2].content for e in load_examples(cfg.data.test)]
        rows = [_load(version, True, prompts), _load(version, False, prompts)]
    cont, static = rows
    for key in ("throughput_rps", "generated_tokens_per_s"):
        if cont.get(key) and static.get(key):
            cont[f"{key}_vs_static"] = round(cont[key] / static[key], 2)
    return rows


TITLE = f"serving the SQL demo model, {CLIENTS} concurrent clients (closed loop), {SECONDS:g} s each, max_tokens 64"

if __name__ == "__main__":
    from tables import print_markdown

    print_markdown(TITLE, bench_serving())
    sys.exit(0)
