"""Completion-only loss that never materialises logits for positions without a label.

The decoder runs on every token, but the vocabulary projection (49k columns for
SmolLM2) runs only on positions whose next token is trained — the prompt needs no
logits at all. Returns the *sum* of token losses; the loop divides by the number of
trained tokens in the whole optimizer step (all micro-batches, all processes), so
packed, padded, accumulated and data-parallel runs all optimise the same objective.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from skilltune.data.tokenize import IGNORE


class CompletionLoss(torch.nn.Module):
    def __init__(self, model: torch.nn.Module, autocast_dtype: torch.dtype | None):
        super().__init__()
        self.model = model
        self.autocast_dtype = autocast_dtype

    def _parts(self):
        base = self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model
        return base.get_decoder(), base.get_output_embeddings()

    def forward(self, input_ids, labels, position_ids, attention_mask=None):
        decoder, head = self._parts()
        device_type = input_ids.device.type
        with contextlib.ExitStack() as stack:
            if self.autocast_dtype is not None:
                stack.enter_context(torch.autocast(device_type, dtype=self.autocast_dtype))
            if device_type == "cpu":
                # Measured on Sapphire Rapids (bench/NOTES.md): the CPU flash-attention backward is ~4x slower
                # than the plain math path at these sequence lengths; +27% tokens/s end to end.
                stack.enter_context(sdpa_kernel(SDPBackend.MATH))
            hidden = decoder(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                             use_cache=False).last_hidden_state  # (rows, width, hidden)
            targets = labels[:, 1:]  # (rows, width-1): token t predicts t+1
            keep = targets != IGNORE
            logits = head(hidden[:, :-1][keep])  # (n_trained, vocab)
        return F.cross_entropy(logits.float(), targets[keep], reduction="sum")
