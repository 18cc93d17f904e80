"""Direct preference optimisation (DPO) on pairs: the encoding, the layout and the loss.

A pair is a prompt and two answers, ``chosen`` and ``rejected``. DPO raises the policy's
log-probability of the chosen answer relative to a frozen reference and lowers the
rejected one's: per pair, ``-log sigmoid(beta * ((c - c_ref) - (r - r_ref)))`` with ``c``
and ``r`` the answers' log-probabilities summed over their tokens (the end-of-turn token
included, the prompt excluded) — TRL's ``DPOTrainer`` sigmoid loss, tested against it.

The reference is the policy *before the first step*: its log-probabilities are computed
once, when the run starts, and kept in the run folder (``reference_logps.safetensors``), so
no second model is held in memory (for LoRA the adapter is the identity at the start; for a
full finetune the starting weights), every step skips the reference forward, and a resumed
run reads the same reference.

Layout: the two answers share their prompt, so each pair is laid out once as
``[prompt | chosen | rejected]`` with position ids restarting after the prompt for each answer
and a mask in which each answer attends to the prompt and causally to itself (never to the
other answer). Pairs are packed into rows; the prompt is computed once per pair instead of
twice. A model whose layers do not all attend to the whole context (sliding-window layers) gets
the plain layout instead: one padded row per answer, with transformers' own masks.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from skilltune.data.tokenize import IGNORE, TemplateMismatch, encode_example
from skilltune.data.types import Example
from skilltune.train.batches import _pack_rows
from skilltune.train.loss import token_nll

REFERENCE_FILE = "reference_logps.safetensors"


@dataclass
class EncodedPair:
    prompt_ids: list[int]
    chosen_ids: list[int]  # the answer's tokens and the end-of-turn token: what is scored
    rejected_ids: list[int]
    index: int  # this pair's row in the reference table

    @property
    def input_ids(self) -> list[int]:
        """The shared layout's tokens (its length is what a packed row holds)."""
        return self.prompt_ids + self.chosen_ids + self.rejected_ids

    @property
    def longest_side(self) -> int:
        return len(self.prompt_ids) + max(len(self.chosen_ids), len(self.rejected_ids))


def _scored(tokenizer, example: Example, end_token: str) -> tuple[list[int], list[int]]:
    """(prompt ids, answer ids) of ``example``: the answer is the run of labelled tokens at its end."""
    enc = encode_example(tokenizer, example, end_token)
    trained = [i for i, x in enumerate(enc.labels) if x != IGNORE]
    first, last = trained[0], trained[-1]
    return enc.input_ids[:first], enc.input_ids[first:last + 1]


def encode_pair(tokenizer, example: Example, end_token: str, index: int) -> EncodedPair:
    prompt, chosen = _scored(tokenizer, example, end_token)
    prompt_r, rejected = _scored(tokenizer, example.with_answer(example.rejected), end_token)
    if prompt != prompt_r:  # the answers must not change how the prompt is tokenised
        raise TemplateMismatch(f"{example.where}: the prompt tokenises differently before the chosen and the "
                               "rejected answer")
    return EncodedPair(prompt, chosen, rejected, index)


# ---------------------------------------------------------------- layouts
def layout_refusal(model: torch.nn.Module) -> str | None:
    """Why the shared-prompt layout cannot run on this model (None when it can)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = base.config
    partial = sorted({t for t in (getattr(config, "layer_types", None) or []) if t != "full_attention"})
    if partial or getattr(config, "sliding_window", None):
        return f"{', '.join(partial) or 'sliding-window'} layers need transformers' own masks"
    return None


def _collate_shared(pairs: list[EncodedPair], pad_id: int, max_len: int) -> dict[str, torch.Tensor]:
    """Pairs packed into rows as ``[prompt | chosen | rejected]``, with a 4D additive mask."""
    lengths = [len(p.input_ids) for p in pairs]
    rows = _pack_rows(lengths, max(lengths))  # rows no longer than the longest pair, as for SFT
    width = max(sum(lengths[i] for i in row) for row in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    pos = torch.zeros((len(rows), width), dtype=torch.long)
    allowed = torch.zeros((len(rows), width, width), dtype=torch.bool)
    src, tgt, owner = [], [], []
    for r, row in enumerate(rows):
        at = 0
        for i in row:
            p = pairs[i]
            n_p = len(p.prompt_ids)
            ids[r, at:at + len(p.input_ids)] = torch.tensor(p.input_ids)
            pos[r, at:at + n_p] = torch.arange(n_p)
            allowed[r, at:at + n_p, at:at + n_p] = torch.ones(n_p, n_p, dtype=torch.bool).tril()
            start = at + n_p
            for side, answer in enumerate((p.chosen_ids, p.rejected_ids)):
                n = len(answer)
                pos[r, start:start + n] = torch.arange(n_p, n_p + n)
                allowed[r, start:start + n, at:at + n_p] = True  # the prompt
                allowed[r, start:start + n, start:start + n] = torch.ones(n, n, dtype=torch.bool).tril()
                # answer token k is predicted by the state before it: the prompt's last for k = 0
                before = [at + n_p - 1] + list(range(start, start + n - 1))
                src += [r * width + b for b in before]
                tgt += answer
                owner += [2 * i + side] * n
                start += n
            at = start
        for j in range(at, width):  # padding attends to itself only (no empty softmax row)
            allowed[r, j, j] = True
    mask = torch.zeros(allowed.shape, dtype=torch.float32).masked_fill_(~allowed, torch.finfo(torch.float32).min)
    return {"input_ids": ids, "position_ids": pos, "attention_mask": mask[:, None], "src": torch.tensor(src),
            "tgt": torch.tensor(tgt), "owner": torch.tensor(owner), "pair_index": torch.tensor([p.index for p in pairs])}


def _collate_plain(pairs: list[EncodedPair], pad_id: int, max_len: int) -> dict[str, torch.Tensor]:
    """One right-padded row per answer (chosen rows, then rejected rows) and a 2D mask."""
    seqs = [(2 * i, p.prompt_ids, p.chosen_ids) for i, p in enumerate(pairs)]
    seqs += [(2 * i + 1, p.prompt_ids, p.rejected_ids) for i, p in enumerate(pairs)]
    width = max(len(prompt) + len(answer) for _, prompt, answer in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    src, tgt, owner = [], [], []
    for r, (who, prompt, answer) in enumerate(seqs):
        n = len(prompt) + len(answer)
        ids[r, :n] = torch.tensor(prompt + answer)
        mask[r, :n] = 1
        src += [r * width + len(prompt) - 1 + k for k in range(len(answer))]
        tgt += answer
        owner += [who] * len(answer)
    pos = torch.arange(width).expand(len(seqs), width).clone()
    return {"input_ids": ids, "position_ids": pos, "attention_mask": mask, "src": torch.tensor(src),
            "tgt": torch.tensor(tgt), "owner": torch.tensor(owner), "pair_index": torch.tensor([p.index for p in pairs])}


LAYOUTS = {"shared": _collate_shared, "plain": _collate_plain}


def collate_pairs(pairs: list[EncodedPair], pad_id: int, max_len: int, layout: str) -> dict[str, torch.Tensor]:
    return LAYOUTS[layout](pairs, pad_id, max_len)


# ---------------------------------------------------------------- loss
class PreferenceLoss(torch.nn.Module):
    """The summed DPO loss of a micro-batch of pairs; per-step statistics accumulate in :attr:`stats`.

    ``reference`` is the (pairs, 2) table of reference log-probabilities (chosen, rejected),
    indexed by ``EncodedPair.index``; :meth:`answer_logps` computes it at the start of a run.
    """

    def __init__(self, model: torch.nn.Module, autocast_dtype: torch.dtype | None, beta: float):
        super().__init__()
        self.model = model
        self.autocast_dtype = autocast_dtype
        self.beta = beta
        self.reference: torch.Tensor | None = None
        self.stats: dict[str, float] = {}

    def answer_logps(self, input_ids, position_ids, attention_mask, src, tgt, owner, pair_index) -> torch.Tensor:
        """(pairs, 2): each answer's log-probability, summed over its tokens."""
        base = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        decoder, head = base.get_decoder(), base.get_output_embeddings()
        device_type = input_ids.device.type
        with contextlib.ExitStack() as stack:
            if self.autocast_dtype is not None:
                stack.enter_context(torch.autocast(device_type, dtype=self.autocast_dtype))
            if device_type == "cpu":
                stack.enter_context(sdpa_kernel(SDPBackend.MATH))  # as CompletionLoss (bench/NOTES.md)
            hidden = decoder(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                             use_cache=False).last_hidden_state
            nll = token_nll(hidden.flatten(0, 1)[src], head, tgt)  # (answer tokens,)
        sums = torch.zeros(2 * len(pair_index), dtype=torch.float32, device=nll.device)
        return sums.index_add(0, owner, -nll.float()).view(-1, 2)

    def forward(self, **batch) -> torch.Tensor:
        logps = self.answer_logps(**batch)
        ref = self.reference[batch["pair_index"].cpu()].to(logps.device)
        chosen_ratio, rejected_ratio = logps[:, 0] - ref[:, 0], logps[:, 1] - ref[:, 1]
        losses = -F.logsigmoid(self.beta * (chosen_ratio - rejected_ratio))
        with torch.no_grad():
            margin = self.beta * (chosen_ratio - rejected_ratio)
            for key, value in (("pairs", len(losses)), ("reward_margin", margin.sum()),
                               ("reward_accuracy", (margin > 0).sum()), ("logp_chosen", logps[:, 0].sum()),
                               ("logp_rejected", logps[:, 1].sum())):
                self.stats[key] = self.stats.get(key, 0.0) + float(value)
        return losses.sum()


def pair_metrics(stats: dict[str, float], prefix: str = "") -> dict[str, float]:
    """Means per pair of what :class:`PreferenceLoss` accumulated."""
    n = max(stats.get("pairs", 0), 1)
    return {f"{prefix}{k}": stats.get(k, 0.0) / n for k in ("reward_margin", "reward_accuracy", "logp_chosen",
                                                           "logp_rejected")}


@torch.no_grad()
def reference_logps(loss_fn: PreferenceLoss, pairs: list[EncodedPair], batch_size: int, pad_id: int, max_len: int,
                    layout: str, device) -> torch.Tensor:
    """The (pairs, 2) table of the model's answer log-probabilities as it is now (the run's start)."""
    table = torch.zeros((len(pairs), 2), dtype=torch.float32)
    was_training = loss_fn.training
    loss_fn.eval()
    try:
        for i in range(0, len(pairs), batch_size):
            chunk = pairs[i:i + batch_size]
            batch = {k: v.to(device) for k, v in collate_pairs(chunk, pad_id, max_len, layout).items()}
            table[[p.index for p in chunk]] = loss_fn.answer_logps(**batch).float().cpu()
    finally:
        loss_fn.train(was_training)
    return table


def save_reference(path: Path, table: torch.Tensor, n_train: int) -> None:
    import os

    from safetensors.torch import save_file

    tmp = path.with_name(f".{path.name}.tmp")  # written whole, then renamed: a killed run leaves no half file
    save_file({"logps": table.contiguous()}, str(tmp), metadata={"train_pairs": str(n_train)})
    os.replace(tmp, path)


def load_reference(path: Path, n_pairs: int) -> torch.Tensor | None:
    from safetensors.torch import load_file

    if not path.is_file():
        return None
    table = load_file(str(path))["logps"]
    return table if table.shape == (n_pairs, 2) else None
