"""Completion-only loss that never materialises logits for positions without a label.

The decoder runs on every token, but the vocabulary projection (49k columns for
SmolLM2) runs only on positions whose next token is trained — the prompt needs no
logits at all. Returns the *sum* of token losses; the loop divides by the number of
trained tokens in the whole optimizer step (all micro-batches, all processes), so
packed, padded, accumulated and data-parallel runs all optimise the same objective.
"""

from __future__ import annotations

import contextlib
import inspect

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

    def _cache_kwargs(self, decoder) -> dict:
        """A fresh KV cache for the decoder, under the argument name this transformers version uses."""
        from transformers import DynamicCache

        if not hasattr(self, "_cache_arg"):
            params = inspect.signature(decoder.forward).parameters
            self._cache_arg = "cache" if "cache" in params else "past_key_values"
        return {self._cache_arg: DynamicCache(config=decoder.config), "use_cache": True}

    def forward(self, input_ids, labels, position_ids, attention_mask=None, prefix_ids=None, shared_prefix=None,
                segments=None):
        decoder, head = self._parts()
        device_type = input_ids.device.type
        with contextlib.ExitStack() as stack:
            if self.autocast_dtype is not None:
                stack.enter_context(torch.autocast(device_type, dtype=self.autocast_dtype))
            if device_type == "cpu":
                # Measured on Sapphire Rapids (bench/NOTES.md): the CPU flash-attention backward is ~4x slower
                # than the plain math path at these sequence lengths; +27% tokens/s end to end.
                stack.enter_context(sdpa_kernel(SDPBackend.MATH))
            extra = {"use_cache": False}
            if shared_prefix is not None:  # the one-pass "packed" layout: the prefix, then the remainders
                from skilltune.train.kernels import shared_prefix_attention

                stack.enter_context(shared_prefix_attention(int(shared_prefix), segments.cpu()))
            if prefix_ids is not None:  # a shared prefix (batches.collate): run it once, keep its keys/values
                extra = self._cache_kwargs(decoder)
                positions = torch.arange(prefix_ids.shape[1], device=prefix_ids.device)[None]
                decoder(input_ids=prefix_ids, position_ids=positions, **extra)  # fills the cache
                extra[self._cache_arg].batch_repeat_interleave(input_ids.shape[0])  # differentiable
            hidden = decoder(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                             **extra).last_hidden_state  # (rows, width, hidden)
            targets = labels[:, 1:]  # (rows, width-1): token t predicts t+1
            keep = targets != IGNORE
            logits = head(hidden[:, :-1][keep])  # (n_trained, vocab)
        return F.cross_entropy(logits.float(), targets[keep], reduction="sum")


def supports_shared_prefix(model: torch.nn.Module, gradient_checkpointing: bool) -> bool:
    """Can this model train on a shared-prefix layout (batches.collate, either layout)?

    Not with gradient checkpointing (transformers turns the KV cache off while training with it,
    and its recomputation would run outside the one-pass layout's attention context), and only
    when every layer attends to the whole context: a sliding-window or chunked layer would drop
    prefix keys that a long example still needs.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = base.config
    if gradient_checkpointing or config.is_encoder_decoder:
        return False
    layer_types = getattr(config, "layer_types", None) or []
    return all(t == "full_attention" for t in layer_types) and not getattr(config, "sliding_window", None)

