"""`data replay`: general data with no download, by letting the base model answer bundled prompts.

Training on the base model's own answers to general prompts (self-distillation)
keeps its general behaviour while it learns the skill; mix 5-10% of it into the
skill data with `skilltune data mix`.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from dataclasses import dataclass
from pathlib import Path

from skilltune.data.reader import write_jsonl
from skilltune.model.generate import generate
from skilltune.model.target import load_target
from skilltune.model.tokenizer import render_prompt
from skilltune.data.replay_prompts import general_prompts
from skilltune.errors import DataError
from skilltune.paths import atomic_write_text
from skilltune.progress import SILENT, Stages


@dataclass
class ReplayResult:
    written: int  # rows in the output file
    asked: int  # prompts the model answered
    unfinished: int  # answers cut off at max_new_tokens (dropped: they teach rambling)
    empty: int  # answers with no text (dropped)
    resumed: int = 0  # answers an interrupted run had already made (kept, not generated again)


def replay(model: str, dst: str | Path, n: int = 200, max_new_tokens: int = 192, seed: int = 42,
           batch_size: int = 16, stages: Stages = SILENT) -> ReplayResult:
    """Let ``model`` answer ``n`` bundled general prompts and write the finished answers to ``dst``.

    Answers are journalled beside ``dst`` as they are made (every ``4 * batch_size`` prompts), so a run that is
    killed continues where it stopped when the same command runs again (same model, prompts and limits).
    """
    prompts = general_prompts()
    if n > len(prompts):
        raise DataError(f"--n {n}: only {len(prompts)} bundled general prompts", hint=f"use --n {len(prompts)} or less")
    picked = random.Random(seed).sample(prompts, n)
    target = load_target(model)
    journal = _Journal(Path(dst), {"model": model, "weights": _fingerprint(target.model),
                                   "prompts": hashlib.sha256(json.dumps(picked).encode()).hexdigest(),
                                   "max_new_tokens": max_new_tokens})
    answers = journal.load()
    if answers:
        stages.message(f"resuming: {len(answers)} of {n} answers were made by an interrupted run ({journal.path})")
    rendered = [render_prompt(target.tokenizer, p) for p in picked]
    todo = [i for i in range(n) if i not in answers]
    with stages.stage(f"the base model answers {n} general prompts", total=n) as advance:
        advance(len(answers))
        for start in range(0, len(todo), 4 * batch_size):
            chunk = todo[start:start + 4 * batch_size]
            outs = generate(target.model, target.tokenizer, [rendered[i] for i in chunk],
                            max_new_tokens=max_new_tokens, batch_size=batch_size, progress=advance)
            answers.update(journal.append(chunk, outs))
    return _write(model, dst, picked, answers, max_new_tokens, journal)


def _write(model, dst, picked, answers, max_new_tokens, journal) -> ReplayResult:
    made = [answers[i] for i in range(len(picked))]
    rows = [{"prompt": p, "completion": text.strip()} for p, (text, stopped) in zip(picked, made)
            if stopped and text.strip()]  # keep only finished answers: cut-off ones teach rambling
    result = ReplayResult(len(rows), len(picked), sum(not stopped for _, stopped in made),
                          sum(stopped and not text.strip() for text, stopped in made), journal.resumed)
    if not rows:
        raise DataError(f"{model} finished none of its {len(picked)} answers within {max_new_tokens} new tokens",
                        hint="raise --max-new-tokens; a model that never emits its end token is not fit to replay")
    write_jsonl(dst, rows)
    journal.path.unlink(missing_ok=True)
    return result


def _fingerprint(model) -> str:
    """A cheap identity of the loaded weights (each tensor's shape and first values): a model retrained under the
    same path is not taken for the one that made the journalled answers."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        h.update(f"{name}{tuple(t.shape)}".encode())
        h.update(t.detach().flatten()[:64].float().cpu().numpy().tobytes())
    return h.hexdigest()


class _Journal:
    """The answers made so far, one JSON line each after a header line naming what made them."""

    def __init__(self, dst: Path, identity: dict):
        self.path = dst.parent / f".{dst.name}.replay-journal"
        self.identity = identity
        self.resumed = 0

    def load(self) -> dict[int, tuple[str, bool]]:
        """The journal's answers if it was made by the same command, else nothing (a new journal is started)."""
        answers = {}
        try:
            lines = self.path.read_text(encoding="utf-8").splitlines()
            if lines and json.loads(lines[0]) == self.identity:
                for line in lines[1:]:
                    row = json.loads(line)
                    answers[int(row["i"])] = (str(row["text"]), bool(row["stopped"]))
        except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError):
            pass  # none, another command's, or cut by a kill mid-line: the lines read before it count
        self.resumed = len(answers)
        # rewritten whole (atomically: a kill now loses nothing): a line cut by the last kill is dropped
        atomic_write_text(self.path, "".join(json.dumps(row) + "\n" for row in [self.identity] + [
            {"i": i, "text": t, "stopped": s} for i, (t, s) in answers.items()]))
        return answers

    def append(self, indices: list[int], outs) -> dict[int, tuple[str, bool]]:
        made = {i: (o.text, bool(o.stopped)) for i, o in zip(indices, outs)}
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.writelines(json.dumps({"i": i, "text": t, "stopped": s}) + "\n" for i, (t, s) in made.items())
            fh.flush()
            os.fsync(fh.fileno())
        return made
