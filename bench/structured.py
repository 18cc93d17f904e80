"""Structured output: what a JSON grammar costs per token, and what it buys.

    python bench/structured.py            (also `python bench/run.py structured`, part of `make bench`)

The 100 SQL test questions of the demo with a system prompt that asks for JSON (`{"sql": "..."}`), greedy,
96 new tokens at most, 16 rows, the embedded SmolLM2 base model (never trained on the format), one process, one
sitting, three ways:

- plain: no grammar (the model's own attempt at the format);
- json_object: any JSON object (OpenAI's ``response_format: {"type": "json_object"}``);
- json_schema: ``{"sql": string}``, the key required, nothing else allowed.

Each row reports generated tokens/s, the ratio to plain, how many answers parse as JSON, how many match the
schema, and how many ended on their own (not on the budget). Tokens/s also moves with the answers' lengths
(a prefill per prompt is shared by fewer tokens when answers are shorter), so the last row isolates the
grammar's own cost: one row's mask (llguidance's bitmask, unpacked and applied to the logits) and its advance
past the chosen token, against a 16-row decode step without grammars. BENCH_STRUCTURED_MODEL picks another model.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch
from generation import _decode_step  # bench/ is on the path: run as a script from it, or through bench/run.py

ROOT = Path(__file__).resolve().parents[1]
MODEL = os.environ.get("BENCH_STRUCTURED_MODEL", "embedded:smollm2-135m-instruct")
TITLE = f"structured output: 100 SQL prompts asking for JSON, greedy, 96 new tokens, 16 rows, {MODEL}"
ROWS, NEW_TOKENS = 16, 96
SCHEMA = {"type": "object", "properties": {"sql": {"type": "string"}}, "required": ["sql"],
          "additionalProperties": False}
ASK = ' Answer with JSON only: {"sql": "<the query>"}.'


def _prompts(tokenizer) -> list[str]:
    from skilltune.config import load_config
    from skilltune.data.reader import load_examples
    from skilltune.data.tokenize import prompt_text

    cfg = load_config(ROOT / "examples/sql/config.yaml")
    return [prompt_text(tokenizer, e) for e in load_examples(cfg.data.test, system_prompt=cfg.data.system_prompt + ASK)]


def _fits(text: str) -> tuple[bool, bool]:
    """Whether ``text`` parses as JSON, and whether it matches SCHEMA."""
    try:
        value = json.loads(text)
    except ValueError:
        return False, False
    return True, isinstance(value, dict) and set(value) == {"sql"} and isinstance(value["sql"], str)


def bench_structured() -> list[dict]:
    from skilltune.model.generate import generate
    from skilltune.model.structured import Grammar, vocab_width
    from skilltune.model.target import load_target
    from skilltune.registry.api import resolve_spec
    from skilltune.train.precision import inference_dtype

    spec, policy = resolve_spec(MODEL)
    target = load_target(spec, dtype=inference_dtype("auto")[1], policy=policy)
    model, tok = target.model, target.tokenizer
    prompts = _prompts(tok)
    rows, plain_rate = [], None
    for label, schema in (("plain (no grammar)", False), ("json_object", None), ("json_schema {sql}", SCHEMA)):
        grammar = None if schema is False else Grammar.json(schema)
        if grammar is not None:  # the tokenizer's table is built once per process: not part of the timing
            grammar.check(tok, tok.eos_token_id, vocab_width(model, tok))
        t0 = time.perf_counter()
        outs = generate(model, tok, prompts, NEW_TOKENS, ROWS, grammars=[grammar] * len(prompts))
        seconds = time.perf_counter() - t0
        tokens = sum(o.new_tokens for o in outs)
        plain_rate = plain_rate or tokens / seconds
        fits = [_fits(o.text) for o in outs]
        rows.append({"decoding": label, "seconds": round(seconds, 1), "generated_tokens": tokens,
                     "tokens_per_s": round(tokens / seconds, 1), "vs_plain": round(tokens / seconds / plain_rate, 2),
                     "parse_as_json": f"{sum(p for p, _ in fits)}/{len(outs)}",
                     "match_schema": f"{sum(m for _, m in fits)}/{len(outs)}",
                     "ended_on_their_own": f"{sum(o.stopped for o in outs)}/{len(outs)}"})
    step_ms = 1000 * _decode_step(model, tok, prompts, tok.eos_token_id, kernels=True)  # 16 rows, no grammar
    mask_ms = _mask_ms(model, tok)
    rows.append({"decoding": f"grammar cost per row per step: {mask_ms:.2f} ms; a 16-row decode step: {step_ms:.1f} ms"
                             f" -> {16 * mask_ms / step_ms:.0%} of the step when all 16 rows have a grammar"})
    return rows


def _mask_ms(model, tok) -> float:
    """Median milliseconds of one row's grammar work per step: its mask applied to a logits row, and its advance
    past a token (inside a JSON string, where most of an answer's tokens are)."""
    from skilltune.model.structured import Grammar, vocab_width

    width = vocab_width(model, tok)
    matcher = Grammar.json(SCHEMA).matcher(tok, tok.eos_token_id, width)
    for token in tok('{"sql": "SELECT', add_special_tokens=False)["input_ids"]:
        matcher.take(token)
    logits = torch.randn(width)
    space = tok(" a", add_special_tokens=False)["input_ids"][-1]
    times = []
    for _ in range(60):
        t0 = time.perf_counter()
        matcher.constrain(logits.clone())
        matcher.take(space)
        times.append(time.perf_counter() - t0)
    return 1000 * sorted(times)[len(times) // 2]


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.path.insert(0, str(ROOT / "bench"))
    from tables import print_markdown

    with torch.inference_mode():
        print_markdown(TITLE, bench_structured())
