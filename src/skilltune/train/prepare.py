"""Everything training needs before the model loads: examples, tokens, checks.

All of it is cheap and can fail on user input, so it runs first: a missing file, an
example that would be truncated, a validation set that overlaps training — each is
reported before minutes are spent loading and wrapping a model.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from skilltune.config.schema import SkilltuneConfig
from skilltune.data.reader import load_examples
from skilltune.data.types import Example
from skilltune.errors import DataError, TrainingError


@dataclass
class PreparedData:
    train: list  # the objective's encoded items (Encoded for sft, EncodedPair for dpo)
    val: list
    train_examples: list[Example]
    val_examples: list[Example]


def _split_key(e: Example) -> str:
    """What must stay on one side of a split: the example, or for a pair its prompt (all its pairs together)."""
    return Example(e.turns[:-1]).key() if e.is_pair else e.key()


def split_validation(examples: list[Example], fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """Hold out about ``fraction`` of ``examples`` (deterministic in ``seed``); duplicates (and the pairs of one
    prompt) stay together."""
    if fraction <= 0 or len(examples) < 2:
        return examples, []
    keys = sorted({_split_key(e) for e in examples})
    order = np.random.default_rng([seed, 7]).permutation(len(keys))
    target = max(1, int(round(len(examples) * fraction)))
    counts: dict[str, int] = {}
    for e in examples:
        counts[_split_key(e)] = counts.get(_split_key(e), 0) + 1
    val_keys, n = set(), 0
    for i in order:
        if n >= target:
            break
        val_keys.add(keys[i])
        n += counts[keys[i]]
    if len(val_keys) == len(keys):  # never hold out everything
        return examples, []
    return ([e for e in examples if _split_key(e) not in val_keys], [e for e in examples if _split_key(e) in val_keys])


def _encode_all(tokenizer, examples: list[Example], cfg: SkilltuneConfig, what: str, first_index: int = 0) -> list:
    from skilltune.train.objectives import OBJECTIVES

    objective = OBJECTIVES[cfg.train.objective]
    out = objective.encode(tokenizer, examples, first_index, cfg.train.train_on_inputs)
    too_long, empty = [], []
    for ex, enc in zip(examples, out):
        if objective.length(enc) > cfg.train.max_seq_len:
            too_long.append(f"{ex.where} ({objective.length(enc)} tokens)")
        if objective.units([enc]) == 0:
            empty.append(ex.where)
    if too_long:
        longest = max(int(s.rsplit("(", 1)[1].split()[0]) for s in too_long)
        raise TrainingError(
            f"{len(too_long)} {what} example(s) are longer than train.max_seq_len={cfg.train.max_seq_len}; "
            f"truncating would cut the completion and teach the model to stop mid-answer: "
            + ", ".join(too_long[:5]) + (" ..." if len(too_long) > 5 else ""),
            hint=f"raise train.max_seq_len to at least {longest} (--set train.max_seq_len={longest}) "
            "or drop those rows (`skilltune data audit` lists them)",
        )
    if empty:
        raise TrainingError(f"{len(empty)} {what} example(s) have no trained tokens: {', '.join(empty[:5])}",
                            hint="every example needs an assistant turn with weight 1")
    return out


def config_problems(cfg: SkilltuneConfig) -> list[str]:
    """What is wrong with ``cfg`` for training, found without a model: data files, registered names."""
    from skilltune.data.formats import FORMATS
    from skilltune.data.reader import not_a_data_file
    from skilltune.model.sources import model_problem
    from skilltune.model.tokenizer import template_problem
    from skilltune.train.methods import METHODS
    from skilltune.train.objectives import OBJECTIVES
    from skilltune.train.trackers import TRACKERS

    problems = []
    if not cfg.data.train:
        problems.append("data.train: not set (the training data file); set it or pass --set data.train=FILE")
    for field in ("train", "val", "test"):
        value = getattr(cfg.data, field)
        if value and (problem := not_a_data_file(value)):
            problems.append(f"data.{field}: {problem}")
    # names are checked against the registries (what a plug-in registers is valid too), never a fixed list
    if cfg.data.format != "auto" and cfg.data.format not in FORMATS:
        problems.append(f"data.format: unknown format {cfg.data.format!r} (known: auto, {', '.join(FORMATS)})")
    if cfg.train.objective not in OBJECTIVES:
        problems.append(f"train.objective: unknown objective {cfg.train.objective!r} (known: {', '.join(OBJECTIVES)})")
    if cfg.adapter.method not in METHODS:
        problems.append(f"adapter.method: unknown method {cfg.adapter.method!r} (known: {', '.join(METHODS)})")
    elif cfg.train.loraplus_lr_ratio is not None and not METHODS[cfg.adapter.method].is_adapter:
        problems.append(f"train.loraplus_lr_ratio: LoRA+ sets the learning rate of an adapter's B matrices; "
                        f"adapter.method {cfg.adapter.method} trains the whole model (remove it, or use lora)")
    problems += [f"train.report_to: unknown tracker {t!r} (known: {', '.join(TRACKERS)})"
                 for t in cfg.train.report_to if t not in TRACKERS]
    if problem := model_problem(cfg.model.base, cfg.model.revision):
        problems.append(f"model.base: {problem}")
    if problem := template_problem(cfg.model.chat_template):
        problems.append(f"model.chat_template: {problem}")
    return problems


def preflight(cfg: SkilltuneConfig) -> None:
    """The checks that need no model, every problem at once, then whether this machine can run the method.

    ``skilltune train`` runs them first and ``skilltune config validate`` runs the same ones,
    so a config that validates does not fail these at training time.
    """
    from skilltune.errors import ConfigError
    from skilltune.train.methods import METHODS

    problems = config_problems(cfg)
    if problems:
        raise ConfigError(problems)
    METHODS[cfg.adapter.method].check(cfg.adapter)  # what this machine can run (QLoRA needs CUDA): TrainingError


def prepare_data(cfg: SkilltuneConfig, tokenizer) -> PreparedData:
    if not cfg.data.train:
        raise TrainingError("no training data: data.train is not set",
                            hint="set data.train in the config or pass --set data.train=FILE")
    train = load_examples(cfg.data.train, cfg.data.format, cfg.data.columns, cfg.data.system_prompt)
    if cfg.data.val:
        val = load_examples(cfg.data.val, cfg.data.format, cfg.data.columns, cfg.data.system_prompt)
    else:
        train, val = split_validation(train, cfg.data.val_split, cfg.train.seed)
    if not train:
        raise DataError(f"{cfg.data.train}: no training examples")
    _check_data_kind(cfg, train, val)
    train_keys = {e.key() for e in train}
    overlap = [e for e in val if e.key() in train_keys]
    if overlap:
        raise TrainingError(
            f"{len(overlap)} validation example(s) also appear in the training data "
            f"(first: {overlap[0].where}); validation loss would measure memory, not the skill",
            hint="split with `skilltune data split`, which keeps duplicates in one split",
        )
    return PreparedData(_encode_all(tokenizer, train, cfg, "training"),
                        _encode_all(tokenizer, val, cfg, "validation", first_index=len(train)), train, val)


def _check_data_kind(cfg: SkilltuneConfig, train: list[Example], val: list[Example]) -> None:
    """The objective's kind of data: demonstrations for sft, preference pairs for dpo."""
    from skilltune.train.objectives import OBJECTIVES

    wants_pairs = OBJECTIVES[cfg.train.objective].data_kind == "preference"
    for name, examples in (("data.train", train), ("data.val", val if cfg.data.val else [])):
        wrong = next((e for e in examples if e.is_pair != wants_pairs), None)
        if wrong is None:
            continue
        if wants_pairs:
            raise DataError(f"{name}: {wrong.where} is a demonstration, but train.objective {cfg.train.objective!r} "
                            "learns from preference pairs",
                            hint='give rows {"prompt", "chosen", "rejected"} (`skilltune scorecard export NAME '
                                 '--preferences OUT.jsonl` writes them from a study), or set train.objective: sft')
        raise DataError(f"{name}: {wrong.where} is a preference pair (chosen/rejected), but train.objective is "
                        f"{cfg.train.objective!r}",
                        hint="set train.objective: dpo to learn from the pairs (--set train.objective=dpo)")
