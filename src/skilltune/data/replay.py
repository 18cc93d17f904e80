"""`data replay`: general data with no download, by letting the base model answer bundled prompts.

Training on the base model's own answers to general prompts (self-distillation)
keeps its general behaviour while it learns the skill; mix 5-10% of it into the
skill data with `skilltune data mix`.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

from skilltune.data.reader import write_jsonl
from skilltune.model.generate import generate
from skilltune.model.target import load_target
from skilltune.model.tokenizer import render_prompt
from skilltune.data.replay_prompts import general_prompts
from skilltune.errors import DataError
from skilltune.progress import SILENT, Stages


@dataclass
class ReplayResult:
    written: int  # rows in the output file
    asked: int  # prompts the model answered
    unfinished: int  # answers cut off at max_new_tokens (dropped: they teach rambling)
    empty: int  # answers with no text (dropped)


def replay(model: str, dst: str | Path, n: int = 200, max_new_tokens: int = 192, seed: int = 42,
           batch_size: int = 16, stages: Stages = SILENT) -> ReplayResult:
    """Let ``model`` answer ``n`` bundled general prompts and write the finished answers to ``dst``."""

    prompts = general_prompts()
    if n > len(prompts):
        raise DataError(f"--n {n}: only {len(prompts)} bundled general prompts", hint=f"use --n {len(prompts)} or less")
    picked = random.Random(seed).sample(prompts, n)
    target = load_target(model)
    rendered = [render_prompt(target.tokenizer, p) for p in picked]
    with stages.stage(f"the base model answers {n} general prompts", total=n) as advance:
        outs = generate(target.model, target.tokenizer, rendered, max_new_tokens=max_new_tokens,
                        batch_size=batch_size, progress=advance)
    rows = [{"prompt": p, "completion": o.text.strip()} for p, o in zip(picked, outs)
            if o.stopped and o.text.strip()]  # keep only finished answers: cut-off ones teach rambling
    result = ReplayResult(len(rows), n, sum(not o.stopped for o in outs),
                          sum(o.stopped and not o.text.strip() for o in outs))
    if not rows:
        raise DataError(f"{model} finished none of its {n} answers within {max_new_tokens} new tokens",
                        hint="raise --max-new-tokens; a model that never emits its end token is not fit to replay")
    write_jsonl(dst, rows)
    return result
