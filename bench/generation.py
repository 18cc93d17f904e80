"""Generation throughput: transformers' ``generate`` with its defaults against skilltune's generation.

    python bench/generation.py            (also `python bench/run.py generation`, part of `make bench`)

The 100 SQL test questions of the demo (examples/sql), rendered with its system prompt, greedy,
96 new tokens at most, 16 rows at a time, one process, one sitting:

- transformers: ``model.generate`` on consecutive batches of 16 in file order, fp32, left padding —
  what a user writes first;
- skilltune fp32: ``skilltune.model.generate`` — a running batch refilled as rows finish, the system
  prompt prefilled once, prepacked linear weights;
- skilltune bf16: the same on bf16 weights (``eval.precision: auto`` on a CPU with fast bf16).

Each row reports generated tokens/s, the ratio to transformers, how many answers are the same text
as transformers' (fp32 must be all; bf16 can flip a near tie), and one decode step of 16 rows:
its time and the weight bytes it reads per second, next to the read bandwidth measured here (a
2 GB sum). BENCH_GEN_MODEL picks another model (a registry version, e.g. sql-demo@v1: the tuned
model stops after its SQL; the embedded base model rambles to the budget).
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
TITLE = "generation: 100 SQL test prompts, greedy, 96 new tokens, 16 rows (tokens/s; decode step GB/s)"
MODEL = os.environ.get("BENCH_GEN_MODEL", "embedded:smollm2-135m-instruct")
ROWS, NEW_TOKENS = 16, 96


def _prompts(tokenizer) -> list[str]:
    from skilltune.config import load_config
    from skilltune.data.reader import load_examples
    from skilltune.data.tokenize import prompt_text

    cfg = load_config(ROOT / "examples/sql/config.yaml")
    return [prompt_text(tokenizer, e) for e in load_examples(cfg.data.test, system_prompt=cfg.data.system_prompt)]


@torch.inference_mode()
def _transformers(model, tok, prompts: list[str], eos: int) -> list[tuple[str, int]]:
    """``generate`` with its defaults, batches in file order (left padding so a batch can decode)."""
    tok.padding_side = "left"
    out = []
    for i in range(0, len(prompts), ROWS):
        enc = tok(prompts[i:i + ROWS], return_tensors="pt", padding=True, add_special_tokens=False)
        new = model.generate(**enc, max_new_tokens=NEW_TOKENS, do_sample=False, eos_token_id=eos,
                             pad_token_id=tok.pad_token_id)[:, enc["input_ids"].shape[1]:]
        for row in new.tolist():
            kept = row[:row.index(eos)] if eos in row else row
            kept = [t for t in kept if t != tok.pad_token_id]
            out.append((tok.decode(kept, skip_special_tokens=True), len(kept) + (eos in row)))
    return out


def _skilltune(model, tok, prompts: list[str], eos: int) -> list[tuple[str, int]]:
    from skilltune.model.generate import generate

    return [(g.text, g.new_tokens) for g in generate(model, tok, prompts, NEW_TOKENS, ROWS, eos_token_id=eos)]


@torch.inference_mode()
def _decode_step(model, tok, prompts: list[str], eos: int, kernels: bool) -> float:
    """Seconds of one decode step of 16 rows (median of 20), prompts' caches in place."""
    from skilltune.model.decode import DecodeBatch
    from skilltune.model.generate import _Prompt
    from skilltune.model.kernels import generation_kernels

    import contextlib
    with generation_kernels(model) if kernels else contextlib.nullcontext():
        batch = DecodeBatch(model, tok, eos)
        batch.admit([_Prompt(i, p, 10_000, 0.0) for i, p in enumerate(prompts[:ROWS])])
        times = []
        for _ in range(24):
            t0 = time.perf_counter()
            batch.step()
            times.append(time.perf_counter() - t0)
    return sorted(times[4:])[len(times[4:]) // 2]


def _read_bandwidth() -> float:
    x = torch.ones(512 * 1024 * 1024)  # 2 GB: far past any cache
    best = min(_timed(x.sum) for _ in range(3))
    return x.numel() * 4 / best / 1e9


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def bench_generation() -> list[dict]:
    from skilltune.model.target import load_target
    from skilltune.model.tokenizer import turn_end_token
    from skilltune.registry.api import resolve_spec

    spec, policy = resolve_spec(MODEL)
    peak = _read_bandwidth()
    rows, reference = [], None
    for label, dtype, run in (("transformers generate (defaults), fp32", torch.float32, _transformers),
                              ("skilltune generate, fp32", torch.float32, _skilltune),
                              ("skilltune generate, bf16", torch.bfloat16, _skilltune)):
        target = load_target(spec, dtype=dtype, policy=policy)
        model, tok = target.model, target.tokenizer
        if hasattr(model, "merge_adapter"):
            model.merge_adapter()
        model.eval()
        eos = tok.convert_tokens_to_ids(turn_end_token(tok))
        prompts = _prompts(tok)
        t0 = time.perf_counter()
        answers = run(model, tok, prompts, eos)
        seconds = time.perf_counter() - t0
        tokens = sum(n for _, n in answers)
        reference = reference or (answers, tokens / seconds)
        step = _decode_step(model, tok, prompts, eos, kernels=run is _skilltune)
        weights = sum(p.numel() * p.element_size() for p in model.parameters())  # tied weights count once
        rows.append({"generation": label, "seconds": round(seconds, 1), "generated_tokens": tokens,
                     "tokens_per_s": round(tokens / seconds, 1), "vs_transformers": round(tokens / seconds
                                                                                           / reference[1], 2),
                     "same_text": f"{sum(a[0] == b[0] for a, b in zip(answers, reference[0]))}/{len(prompts)}",
                     "decode_step_ms": round(step * 1000, 1), "weights_GB_per_s": round(weights / step / 1e9, 1),
                     "peak_read_GB_per_s": round(peak, 1)})
        del target, model
    rows.append({"generation": "target", "vs_transformers": ">= 3x at 16 rows"})
    return rows


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from tables import print_markdown

    print_markdown(TITLE, bench_generation())
    sys.exit(0)
