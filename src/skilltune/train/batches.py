"""Deterministic batching: which examples form each micro-batch of each optimizer step.

The order of an epoch is a permutation seeded by ``(seed, epoch)``; a micro-batch is
``batch_size`` consecutive examples of it, and an optimizer step takes
``grad_accum * world_size`` micro-batches. Because the plan is a pure function of
the step number, resuming at step N reads exactly the data an uninterrupted run
would, on every process, with no sampler state to save.

Packing changes only the layout of a micro-batch, never its content: its examples
are packed into as few rows as fit, each no longer than the micro-batch's longest
example (first fit, decreasing), with position ids restarting at 0 for each example
so attention stays within an example. Packed and padded micro-batches give the same loss.

Shared prefixes: when every example of a micro-batch starts with the same tokens that
carry no labels (a system prompt, few-shot examples — common in skill finetuning), the
prefix is computed once per micro-batch instead of once per example, and each example's
remainder attends to its keys and values (gradients flow back into the prefix), with
positions continuing after the prefix. Two layouts: "cache" runs the prefix first and the
remainders on its KV cache (any model); "packed" runs both in one pass, as one row of the
prefix and the remainders back to back, through skilltune's attention kernel (kernels.py),
which saves a pass and all padding. Every
trained position sees exactly the context it would see alone, so the loss is the same
(tests compare it with the padded layout) while far fewer positions are computed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from skilltune.data.tokenize import IGNORE, Encoded


@dataclass(frozen=True)
class StepPlan:
    n_examples: int
    batch_size: int
    grad_accum: int
    world_size: int
    seed: int

    @property
    def micro_per_epoch(self) -> int:
        return math.ceil(self.n_examples / self.batch_size)

    @property
    def steps_per_epoch(self) -> int:
        per_step = self.grad_accum * self.world_size
        if self.world_size > 1:  # every process must get a micro-batch in every step
            return max(1, self.micro_per_epoch // per_step)
        return math.ceil(self.micro_per_epoch / per_step)

    def order(self, epoch: int) -> np.ndarray:
        return np.random.default_rng([self.seed, epoch]).permutation(self.n_examples)

    def micro_batches(self, step: int, rank: int | None = None) -> list[list[int]]:
        """Example indices of each micro-batch of global ``step`` (all ranks, or one rank's)."""
        epoch, k = divmod(step, self.steps_per_epoch)
        order = self.order(epoch)
        per_step = self.grad_accum * self.world_size
        first = k * per_step
        ids = range(first, min(first + per_step, self.micro_per_epoch))
        if rank is not None:
            ids = [i for i in ids if (i - first) // self.grad_accum == rank]
        return [order[i * self.batch_size:(i + 1) * self.batch_size].tolist() for i in ids]


def _pack_rows(lengths: list[int], max_len: int) -> list[list[int]]:
    """First-fit-decreasing bin packing of item lengths into rows of at most ``max_len``."""
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda j: -lengths[j]):
        for r, free in enumerate(room):
            if lengths[i] <= free:
                rows[r].append(i)
                room[r] -= lengths[i]
                break
        else:
            rows.append([i])
            room.append(max_len - lengths[i])
    return rows


# A shared prefix shorter than this is not worth a second layout.
MIN_SHARED_PREFIX = 16


def shared_prefix_len(items: list[Encoded]) -> int:
    """Length of the token prefix all ``items`` share and that no trained position needs inside it.

    The position just before an example's first label predicts that label, so it must stay in
    the example's own part of the row: the prefix ends at least one token before any label.
    """
    first = items[0].input_ids
    n = min(len(e.input_ids) for e in items)
    common = 0
    while common < n and all(e.input_ids[common] == first[common] for e in items):
        common += 1
    first_label = min(next((j for j, x in enumerate(e.labels) if x != IGNORE), len(e.labels)) for e in items)
    return max(0, min(common, first_label - 1))


def _collate_shared_cache(items: list[Encoded], prefix: int, pad_id: int) -> dict[str, torch.Tensor]:
    """Two passes: ``prefix_ids`` (1, prefix) first, then the remainders on top of its KV cache."""
    width = max(len(e.input_ids) for e in items) - prefix  # the longest remainder
    ids = torch.full((len(items), width), pad_id, dtype=torch.long)  # (examples, width)
    labels = torch.full((len(items), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(items), prefix + width), dtype=torch.long)  # keys: the prefix, then the remainder
    mask[:, :prefix] = 1
    for r, e in enumerate(items):
        n = len(e.input_ids) - prefix
        ids[r, :n] = torch.tensor(e.input_ids[prefix:])
        labels[r, :n] = torch.tensor(e.labels[prefix:])
        mask[r, prefix:prefix + n] = 1
    positions = torch.arange(prefix, prefix + width).expand(len(items), width).clone()  # continuing after the prefix
    return {"prefix_ids": torch.tensor([items[0].input_ids[:prefix]]), "input_ids": ids, "labels": labels,
            "position_ids": positions, "attention_mask": mask}


# The packed row's length is rounded up to a multiple of this. Rows of ever-new lengths made
# glibc's heap fragment: RSS grew by ~45 MB a step (2.66 GB after 30 steps of the SQL demo);
# with a few recurring lengths it was 2.2-2.3 GB, for ~6% padding (bench/NOTES.md).
PACKED_ROW_MULTIPLE = 64


def _collate_shared_packed(items: list[Encoded], prefix: int, pad_id: int) -> dict[str, torch.Tensor]:
    """One pass, one row: the prefix, then every example's remainder back to back.

    ``shared_prefix`` = prefix and ``segments`` = the remainders' lengths tell skilltune's
    attention kernel (kernels.shared_prefix_attention) that each remainder attends to the
    prefix and causally to itself; the padding after the last remainder attends to nothing
    and nothing attends to it. Linear layers see no padding but the row's rounding to
    :data:`PACKED_ROW_MULTIPLE` (the SQL demo: ~580 positions a micro-batch instead of 747
    with the prefix as a row of its own and the remainders padded to it), and one
    pass instead of two saves the fixed cost of a pass (about 0.3 s for SmolLM2 here).
    The last token of a remainder "predicts" the next remainder's first token, which is
    never a label (the prefix ends before every label), so no loss crosses examples.
    """
    ids, labels, pos = list(items[0].input_ids[:prefix]), [IGNORE] * prefix, list(range(prefix))
    segments = [len(e.input_ids) - prefix for e in items]
    for e in items:
        ids += e.input_ids[prefix:]
        labels += e.labels[prefix:]
    for n in segments:
        pos += range(prefix, prefix + n)
    pad = -len(ids) % PACKED_ROW_MULTIPLE
    ids += [pad_id] * pad
    labels += [IGNORE] * pad
    pos += range(pad)
    return {"input_ids": torch.tensor([ids]), "labels": torch.tensor([labels]), "position_ids": torch.tensor([pos]),
            "shared_prefix": torch.tensor(prefix), "segments": torch.tensor(segments)}


SHARED_LAYOUTS = {"cache": _collate_shared_cache, "packed": _collate_shared_packed}


def collate(items: list[Encoded], pad_id: int, packing: bool, max_len: int,
            share_prefix: str | None = None) -> dict[str, torch.Tensor]:
    """Tensors for one micro-batch: input_ids, labels, position_ids and, unless packed, attention_mask.

    ``share_prefix``: a shared-prefix layout (module docstring; "cache" or "packed", see
    :data:`SHARED_LAYOUTS`) for items that share a prefix of at least :data:`MIN_SHARED_PREFIX` tokens.
    """
    if share_prefix and len(items) > 1:
        prefix = shared_prefix_len(items)
        if prefix >= MIN_SHARED_PREFIX:
            return SHARED_LAYOUTS[share_prefix](items, prefix, pad_id)
    if packing:
        # Rows no longer than the longest example: attention cost stays that of the unpacked batch
        # (it grows with the square of the row length) while the padding goes away.
        lengths = [len(e.input_ids) for e in items]
        rows = [[items[i] for i in row] for row in _pack_rows(lengths, min(max_len, max(lengths)))]
    else:
        rows = [[e] for e in items]
    width = max(sum(len(e.input_ids) for e in row) for row in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)  # (rows, width)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    pos = torch.zeros((len(rows), width), dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for r, row in enumerate(rows):
        at = 0
        for e in row:
            n = len(e.input_ids)
            ids[r, at:at + n] = torch.tensor(e.input_ids)
            labels[r, at:at + n] = torch.tensor(e.labels)
            pos[r, at:at + n] = torch.arange(n)
            mask[r, at:at + n] = 1
            at += n
        # Packed: the padded tail is its own 'example' (positions restart) and attends to nothing real.
        pos[r, at:] = torch.arange(width - at) if packing else torch.arange(at, width)
    batch = {"input_ids": ids, "labels": labels, "position_ids": pos}
    if not packing:
        batch["attention_mask"] = mask
    return batch


def count_label_tokens(items: list[Encoded]) -> int:
    """Tokens that carry a loss (each label predicts the next token, so the first never counts)."""
    return sum(sum(1 for x in e.labels[1:] if x != IGNORE) for e in items)
