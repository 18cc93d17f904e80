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

from skilltune.data.tokenize import IGNORE, Encoded
from skilltune.train.batches import collate, count_label_tokens


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
            if device_type == "cpu" and torch.is_grad_enabled():
                # Measured on Sapphire Rapids (bench/NOTES.md): the CPU flash-attention backward is ~4x slower
                # than the plain math path at these sequence lengths; +27% tokens/s end to end.
                stack.enter_context(sdpa_kernel(SDPBackend.MATH))
            extra = {"use_cache": False}
            if shared_prefix is not None:  # the one-pass "packed" layout: the prefix, then the remainders
                from skilltune.train.kernels import shared_prefix_attention

                stack.enter_context(shared_prefix_attention(int(shared_prefix), segments.cpu(), input_ids.shape[1]))
            if prefix_ids is not None:  # a shared prefix (batches.collate): run it once, keep its keys/values
                extra = self._cache_kwargs(decoder)
                positions = torch.arange(prefix_ids.shape[1], device=prefix_ids.device)[None]
                decoder(input_ids=prefix_ids, position_ids=positions, **extra)  # fills the cache
                extra[self._cache_arg].batch_repeat_interleave(input_ids.shape[0])  # differentiable
            hidden = decoder(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                             **extra).last_hidden_state  # (rows, width, hidden)
            targets = labels[:, 1:]  # (rows, width-1): token t predicts t+1
            keep = targets != IGNORE
            trained = hidden[:, :-1][keep]  # (n_trained, hidden)
            return token_nll(trained, head, targets[keep]).sum()


def token_nll(hidden: torch.Tensor, head: torch.nn.Module, targets: torch.Tensor) -> torch.Tensor:
    """Each position's negative log-likelihood of its target, fp32, (n,): the head's logits never leave blocks."""
    if _plain_head(head, hidden):
        with torch.autocast(hidden.device.type, enabled=False):  # its dtypes already are autocast's
            return _HeadCrossEntropy.apply(hidden, head.weight, targets)
    return F.cross_entropy(head(hidden).float(), targets, reduction="none")


def _plain_head(head: torch.nn.Module, hidden: torch.Tensor) -> bool:
    """Can :class:`_HeadCrossEntropy` stand in for ``head`` on ``hidden``? A bias-free ``nn.Linear`` (not
    one a library has wrapped) whose weight has the input's dtype and, under autocast, autocast's."""
    device = hidden.device.type
    dtype = head.weight.dtype if type(head) is torch.nn.Linear else None
    return (dtype == hidden.dtype and head.bias is None
            and (not torch.is_autocast_enabled(device) or torch.get_autocast_dtype(device) == dtype))


class _HeadCrossEntropy(torch.autograd.Function):
    """``F.cross_entropy((h @ W^T).float(), targets, reduction="none")`` without its fp32 copies of the logits.

    The stock path casts the (tokens, vocab) logits to fp32, takes log-softmax, and in the backward
    fills a zero tensor of that size, scatters, and casts back: five passes over a ~60 MB tensor
    for SmolLM2's 49k vocabulary. Here the logits stay in the matmul's dtype and the fp32 work runs
    over blocks of rows small enough to stay in cache: a log-sum-exp forward, one softmax pass
    backward. Same arithmetic (fp32 softmax of the same logits); measured in bench/NOTES.md.
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets):
        logits = hidden @ weight.t()  # (n, vocab), in the model's dtype
        rows = _rows_per_block(logits.shape[1])
        lse = torch.empty(logits.shape[0], dtype=torch.float32, device=logits.device)
        for i in range(0, logits.shape[0], rows):
            lse[i:i + rows] = torch.logsumexp(logits[i:i + rows].float(), dim=-1)
        picked = logits.gather(1, targets[:, None]).squeeze(1).float()
        ctx.save_for_backward(hidden, weight, logits, lse, targets)
        return lse - picked

    @staticmethod
    def backward(ctx, grad):
        hidden, weight, logits, lse, targets = ctx.saved_tensors
        rows = _rows_per_block(logits.shape[1])
        dlogits = torch.empty_like(logits)
        for i in range(0, logits.shape[0], rows):
            block = logits[i:i + rows].to(torch.float32, copy=True).sub_(lse[i:i + rows, None]).exp_()  # softmax
            block[torch.arange(block.shape[0], device=block.device), targets[i:i + rows]] -= 1
            dlogits[i:i + rows] = block.mul_(grad[i:i + rows, None])
        dhidden = dlogits @ weight if ctx.needs_input_grad[0] else None
        dweight = dlogits.t() @ hidden if ctx.needs_input_grad[1] else None
        return dhidden, dweight, None


def _rows_per_block(vocab: int) -> int:
    """Rows of logits per fp32 block: ~1 MB, which measured fastest on this CPU (bench/NOTES.md)."""
    return max(1, 2**18 // vocab)


def mean_loss(loss_fn: CompletionLoss, items: list[Encoded], pad_id: int, batch_size: int, *, packing: bool = True,
              max_len: int = 1 << 30, share_prefix: str | None = None, device=None) -> float | None:
    """Mean loss per trained token of ``items``, teacher forced, without gradients (None for no items).

    Validation during training and the evaluation's overfitting check both use it, in
    micro-batches of ``batch_size`` laid out like training batches (``collate``).
    """
    if not items:
        return None
    was_training = loss_fn.training
    loss_fn.eval()
    total = 0.0
    try:
        with torch.no_grad():
            for i in range(0, len(items), batch_size):
                batch = collate(items[i:i + batch_size], pad_id, packing, max_len, share_prefix)
                total += float(loss_fn(**{k: v.to(device) for k, v in batch.items()}))
    finally:
        loss_fn.train(was_training)
    return total / max(count_label_tokens(items), 1)


def shared_prefix_refusal(model: torch.nn.Module, gradient_checkpointing: bool) -> str | None:
    """Why this model cannot train on a shared-prefix layout (batches.collate), or None when it can.

    Not with gradient checkpointing (transformers turns the KV cache off while training with it,
    and its recomputation would run outside the one-pass layout's attention context), and only
    when every layer attends to the whole context: a sliding-window or chunked layer would drop
    prefix keys that a long example still needs.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = base.config
    if gradient_checkpointing:
        return "gradient checkpointing turns the KV cache off"
    if config.is_encoder_decoder:
        return "an encoder-decoder model"
    layer_types = getattr(config, "layer_types", None) or []
    partial = sorted({t for t in layer_types if t != "full_attention"})
    if partial or getattr(config, "sliding_window", None):
        return f"{', '.join(partial) or 'sliding-window'} layers do not see the whole prefix"
    return None


def supports_shared_prefix(model: torch.nn.Module, gradient_checkpointing: bool) -> bool:
    """Can this model train on a shared-prefix layout? (See :func:`shared_prefix_refusal`.)"""
    return shared_prefix_refusal(model, gradient_checkpointing) is None