"""Training objectives, a registry: what the loop optimises and on which data.

``sft`` (default): the completion-only cross-entropy on demonstrations. ``dpo``: direct
preference optimisation on pairs (``train/preference.py``). The loop (``train/loop.py``)
asks its objective to encode the data, build the loss module and the micro-batches, say
what a step's loss is a mean over, and validate; everything else — accumulation,
checkpoints, resume, early stopping, data parallelism — is shared. A third party
registers its own with :func:`register_objective`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import torch

from skilltune.data.tokenize import encode_example
from skilltune.data.types import Example
from skilltune.errors import TrainingError
from skilltune.model.tokenizer import turn_end_token
from skilltune.train.batches import collate, count_label_tokens
from skilltune.train.loss import CompletionLoss, mean_loss, shared_prefix_refusal


@dataclass(frozen=True)
class Objective:
    name: str
    description: str
    data_kind: str  # what its data files hold: "sft" (demonstrations) or "preference" (pairs)
    encode: Callable  # (tokenizer, examples, first_index) -> items
    length: Callable  # item -> the positions it needs (checked against train.max_seq_len)
    units: Callable  # items -> what the step's loss is a mean over (trained tokens; pairs)
    loss: Callable  # (session, autocast_dtype) -> the loss module (returns a sum over units)
    layout: Callable  # (session, model) -> (the layout that shares prompts or None, why not or None)
    collate: Callable  # (session, items) -> a micro-batch's tensors
    start: Callable  # session -> None: after the optimizer is ready, before the first step
    step_metrics: Callable  # session -> metrics of the step just taken (beyond the loss)
    validate: Callable  # (session, items) -> {"val_loss": ..., ...} or {} without items


OBJECTIVES: dict[str, Objective] = {}


def register_objective(objective: Objective) -> None:
    OBJECTIVES[objective.name] = objective


def _nothing(*_args) -> dict:
    return {}


# ---------------------------------------------------------------- sft
def _sft_encode(tokenizer, examples: list[Example], first_index: int, train_on_inputs: bool = False) -> list:
    end = turn_end_token(tokenizer)
    return [encode_example(tokenizer, ex, end, train_on_inputs) for ex in examples]


def _sft_layout(s, model) -> tuple[str | None, str | None]:
    """The shared-prefix layout (batches.py): one pass with our attention kernel, else two."""
    refusal = shared_prefix_refusal(model, s.cfg.train.gradient_checkpointing)
    if not s.cfg.train.share_prefix or refusal is not None:
        return None, refusal
    return ("packed" if "attention" in s.kernels else "cache"), None


def _sft_collate(s, items) -> dict:
    cfg = s.cfg.train
    return collate(items, s.tokenizer.pad_token_id, cfg.packing, cfg.max_seq_len, s.share_prefix)


def _sft_validate(s, items) -> dict:
    cfg = s.cfg.train
    val = mean_loss(s.loss_fn, items, s.tokenizer.pad_token_id, cfg.batch_size, packing=cfg.packing,
                    max_len=cfg.max_seq_len, share_prefix=s.share_prefix, device=s.acc.device)
    return {} if val is None else {"val_loss": val}


register_objective(Objective(
    "sft", "supervised finetuning: the completion-only loss on demonstrations", "sft",
    encode=_sft_encode, length=lambda e: len(e.input_ids), units=count_label_tokens,
    loss=lambda s, dtype: CompletionLoss(s.model, dtype), layout=_sft_layout, collate=_sft_collate,
    start=lambda s: None,
    step_metrics=_nothing, validate=_sft_validate))


# ---------------------------------------------------------------- dpo
def _dpo_encode(tokenizer, examples: list[Example], first_index: int, train_on_inputs: bool = False) -> list:
    from skilltune.train.preference import encode_pair

    end = turn_end_token(tokenizer)
    return [encode_pair(tokenizer, ex, end, first_index + i) for i, ex in enumerate(examples)]


def _dpo_loss(s, dtype):
    from skilltune.train.preference import PreferenceLoss

    return PreferenceLoss(s.model, dtype, s.cfg.train.dpo_beta)


def _dpo_layout(s, model) -> tuple[str | None, str | None]:
    """Each pair's prompt once (preference.py), else one row per answer."""
    from skilltune.train.preference import layout_refusal

    refusal = layout_refusal(model)
    return ("shared" if s.cfg.train.share_prefix and refusal is None else None), refusal


def _dpo_collate(s, items) -> dict:
    from skilltune.train.preference import collate_pairs

    return collate_pairs(items, s.tokenizer.pad_token_id, s.cfg.train.max_seq_len, s.share_prefix or "plain")


def _dpo_start(s) -> None:
    """The reference table: computed from the starting weights on a new run, read back on a resume."""
    from skilltune.train.preference import REFERENCE_FILE, load_reference, reference_logps, save_reference

    pairs = s.data.train + s.data.val
    path = s.run_path / REFERENCE_FILE
    loss_fn = s.acc.unwrap_model(s.loss_fn)
    if s.resuming and s.latest is not None:
        table = load_reference(path, len(pairs))
        if table is None:
            raise TrainingError(f"cannot resume: {path} (the reference log-probabilities of the run's start) is "
                                "missing or does not match the data",
                                hint="start a new run; the reference cannot be recomputed from trained weights")
    else:
        t0 = time.perf_counter()
        table = reference_logps(loss_fn, pairs, s.cfg.train.batch_size, s.tokenizer.pad_token_id,
                                s.cfg.train.max_seq_len, s.share_prefix or "plain", s.acc.device)
        s.reporter.message(f"reference log-probabilities of {len(pairs)} pairs from the starting model: "
                           f"{time.perf_counter() - t0:.1f} s, once (no reference model is kept)")
        if s.acc.is_main_process:
            save_reference(path, table, len(s.data.train))
    loss_fn.reference = table


def _dpo_step_metrics(s) -> dict:
    from skilltune.train.preference import pair_metrics

    loss_fn = s.acc.unwrap_model(s.loss_fn)
    stats, loss_fn.stats = loss_fn.stats, {}
    if s.acc.num_processes > 1:
        keys = sorted(stats)
        summed = s.acc.reduce(torch.tensor([stats[k] for k in keys], device=s.acc.device), "sum")
        stats = dict(zip(keys, summed.tolist()))
    return pair_metrics(stats)


def _dpo_validate(s, items) -> dict:
    from skilltune.train.preference import pair_metrics

    if not items:
        return {}
    loss_fn = s.acc.unwrap_model(s.loss_fn)
    saved, loss_fn.stats = loss_fn.stats, {}
    was_training = s.loss_fn.training
    s.loss_fn.eval()
    total = 0.0
    try:
        with torch.no_grad():
            for i in range(0, len(items), s.cfg.train.batch_size):
                batch = _dpo_collate(s, items[i:i + s.cfg.train.batch_size])
                total += float(s.loss_fn(**{k: v.to(s.acc.device) for k, v in batch.items()}))
        stats = loss_fn.stats
    finally:
        loss_fn.stats = saved
        s.loss_fn.train(was_training)
    return {"val_loss": total / len(items), **pair_metrics(stats, "val_")}


register_objective(Objective(
    "dpo", "direct preference optimisation on chosen/rejected pairs (TRL's sigmoid loss)", "preference",
    encode=_dpo_encode, length=lambda p: p.longest_side, units=len, loss=_dpo_loss, layout=_dpo_layout,
    collate=_dpo_collate,
    start=_dpo_start, step_metrics=_dpo_step_metrics, validate=_dpo_validate))
