"""CPU training kernels: three stock code paths replaced by ones measured faster on a CPU.

Training only (``train.kernels``, on by default on CPU; installed after the adapter is
wrapped, removed again before the artifact is saved). Each kernel is a registered
:class:`Kernel` whose ``install`` returns how many modules it took over and an undo;
each computes the same function as the stock path up to bf16 rounding, and the tests
compare losses and gradients with the stock path. Measured gains are in bench/NOTES.md.

- ``lora_linear``: one autograd function for ``base(x) + scale * B(A(x))`` of a peft LoRA
  layer. peft casts every LoRA input to the fp32 adapter dtype and autocast casts it back,
  then scales and adds in separate passes; here the frozen bf16 base and the adapter run
  as three matmuls forward and five backward, with no activation-sized casts or adds.
- ``rms_norm``: ``torch.nn.functional.rms_norm`` (a fused kernel) for RMSNorm modules whose
  output it reproduces (checked on a random input when installing, so a variant such as
  Gemma's ``1 + weight`` is left alone).
- ``attention``: causal attention in fp32 (as PyTorch's CPU math path computes bf16
  inputs), grouped query heads without repeating K/V, the mask turned into an additive
  bias once per forward instead of once per layer, and a hand-written backward. PyTorch's
  CPU flash-attention backward was 4x slower than its math path here. It also runs the
  one-pass shared-prefix layout (batches.py), where rows attend to row 0's prefix.
"""

from __future__ import annotations

import contextlib
import contextvars
import types
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

ATTENTION_NAME = "skilltune_cpu"


@dataclass(frozen=True)
class Kernel:
    name: str
    install: Callable[[torch.nn.Module], tuple[int, Callable[[], None]]]  # -> (modules taken over, undo)


KERNELS: dict[str, Kernel] = {}


def register_kernel(kernel: Kernel) -> None:
    KERNELS[kernel.name] = kernel


def install_kernels(model: torch.nn.Module) -> tuple[dict[str, int], Callable[[], None]]:
    """Install every registered kernel that applies to ``model``; return counts and one undo."""
    counts, undos = {}, []
    for kernel in KERNELS.values():
        n, undo = kernel.install(model)
        if n:
            counts[kernel.name] = n
            undos.append(undo)

    def undo_all() -> None:
        for undo in reversed(undos):
            undo()

    return counts, undo_all


def _swap_forward(modules: list[torch.nn.Module], make: Callable) -> Callable[[], None]:
    """Give each module an instance-level forward ``make(module, original_forward)``; return the undo."""
    for m in modules:
        m.forward = types.MethodType(make(m.forward), m)

    def undo() -> None:
        for m in modules:
            m.__dict__.pop("forward", None)

    return undo


# ---- lora_linear ---------------------------------------------------------------------------

class _LoraLinear(torch.autograd.Function):
    """y = x W^T + b + scale * (x A^T) B^T with W frozen; A, B trained (kept fp32, computed in x's dtype)."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, scale):
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])  # (tokens, in)
        a, b = lora_a.to(x.dtype), lora_b.to(x.dtype)  # (r, in), (out, r): tiny casts
        xa = x2 @ a.t()  # (tokens, r)
        y = torch.addmm(bias, x2, weight.t()) if bias is not None else x2 @ weight.t()  # (tokens, out)
        y.addmm_(xa, b.t(), alpha=scale)
        ctx.save_for_backward(x2, xa, weight, a, b)
        ctx.scale, ctx.shape = scale, shape
        return y.view(*shape[:-1], y.shape[-1])

    @staticmethod
    def backward(ctx, dy):
        x2, xa, weight, a, b = ctx.saved_tensors
        dy2 = dy.reshape(-1, dy.shape[-1])  # (tokens, out)
        dxa = (dy2 @ b).mul_(ctx.scale)  # (tokens, r)
        dx = (dy2 @ weight).addmm_(dxa, a)  # (tokens, in)
        d_a = (dxa.t() @ x2).float()  # (r, in)
        d_b = (dy2.t() @ xa).float().mul_(ctx.scale)  # (out, r)
        return dx.view(ctx.shape), None, None, d_a, d_b, None


def _lora_forward(original):
    def forward(self, x, *args, **kwargs):
        base = self.base_layer
        active = self.active_adapters
        if (args or kwargs or self.disable_adapters or self.merged or len(active) != 1
                or active[0] in self.lora_variant or active[0] not in self.lora_A
                or not isinstance(self.lora_dropout[active[0]], torch.nn.Identity)
                or x.dtype != base.weight.dtype or base.weight.requires_grad
                or (base.bias is not None and base.bias.requires_grad)
                or getattr(self, "lora_bias", {}).get(active[0], False)):
            return original(x, *args, **kwargs)
        name = active[0]
        with torch.autocast(x.device.type, enabled=False):
            return _LoraLinear.apply(x, base.weight, base.bias, self.lora_A[name].weight,
                                     self.lora_B[name].weight, self.scaling[name])

    return forward


def _install_lora(model) -> tuple[int, Callable[[], None]]:
    try:
        from peft.tuners.lora.layer import Linear as LoraLinear
    except ImportError:
        return 0, lambda: None
    mods = [m for m in model.modules()
            if isinstance(m, LoraLinear) and type(m.get_base_layer()) is torch.nn.Linear]
    return len(mods), _swap_forward(mods, _lora_forward)


register_kernel(Kernel("lora_linear", _install_lora))


# ---- rms_norm ------------------------------------------------------------------------------

def _norm_forward(original):
    def forward(self, x):
        if x.dtype != self.weight.dtype:
            return original(x)
        return F.rms_norm(x, self.weight.shape, self.weight, self._skilltune_eps)

    return forward


def _reproduces(module, eps: float) -> bool:
    """Does F.rms_norm give this module's output on a random input?"""
    w = module.weight
    x = torch.randn(4, w.shape[-1], generator=torch.Generator().manual_seed(0)).to(w.device, w.dtype)
    with torch.no_grad():
        ref = module(x)
        ours = F.rms_norm(x, w.shape, w, eps)
    return ref.shape == ours.shape and ref.dtype == ours.dtype and torch.allclose(ref, ours, rtol=2e-2, atol=2e-2)


def _install_rms_norm(model) -> tuple[int, Callable[[], None]]:
    mods, verdict = [], {}
    for m in model.modules():
        w = getattr(m, "weight", None)
        eps = getattr(m, "variance_epsilon", getattr(m, "eps", None))
        if not type(m).__name__.endswith("RMSNorm") or w is None or w.dim() != 1 or not isinstance(eps, float):
            continue
        key = (type(m), w.dtype)
        if key not in verdict:
            verdict[key] = _reproduces(m, eps)
        if verdict[key]:
            m._skilltune_eps = eps
            mods.append(m)
    return len(mods), _swap_forward(mods, _norm_forward)


register_kernel(Kernel("rms_norm", _install_rms_norm))


# ---- attention -----------------------------------------------------------------------------

class _Attention(torch.autograd.Function):
    """softmax(q k^T * scale + bias) v with grouped K/V heads, computed in fp32 whatever the input dtype.

    fp32 like PyTorch's CPU math path (which upcasts bf16), so the kernel changes speed, not
    numerics; at training lengths attention is a small share of the FLOPs and fp32 cost no
    measurable speed here (bench/NOTES.md). Inputs may differ in dtype; gradients come back in each.
    """

    @staticmethod
    def forward(ctx, q, k, v, bias, scale):
        b, h, s, d = q.shape  # (batch, heads, queries, head_dim)
        kv, t = k.shape[1], k.shape[2]  # kv heads, keys
        g = h // kv
        qg = q.reshape(b, kv, g * s, d).float()  # the g query heads sharing one K/V head, stacked
        kf, vf = k.float(), v.float()
        scores = torch.matmul(qg, kf.transpose(-1, -2)).view(b, kv, g, s, t)
        scores.mul_(scale).add_(bias[:, :, None])  # bias: (batch, 1, queries, keys) -> every head
        p = torch.softmax(scores, -1).view(b, kv, g * s, t)
        ctx.save_for_backward(qg, kf, vf, p)
        ctx.scale, ctx.dtypes = scale, (q.dtype, k.dtype, v.dtype)
        return torch.matmul(p, vf).view(b, h, s, d).to(q.dtype)

    @staticmethod
    def backward(ctx, do):
        qg, kf, vf, p = ctx.saved_tensors
        b, kv, gs, d = qg.shape
        dog = do.reshape(b, kv, gs, d).float()
        dv = torch.matmul(p.transpose(-1, -2), dog)  # (batch, kv, keys, head_dim)
        dp = torch.matmul(dog, vf.transpose(-1, -2))  # (batch, kv, g*queries, keys)
        ds = dp.sub_((dp * p).sum(-1, keepdim=True)).mul_(p).mul_(ctx.scale)
        dq = torch.matmul(ds, kf).view(do.shape)
        dk = torch.matmul(ds.transpose(-1, -2), qg)
        dt_q, dt_k, dt_v = ctx.dtypes
        return dq.to(dt_q), dk.to(dt_k), dv.to(dt_v), None, None


@dataclass
class _SharedPrefix:
    prefix: int
    bias_prefix: torch.Tensor  # (1, 1, width, width): row 0 attends causally within the prefix
    bias_rest: torch.Tensor  # (examples, 1, width, prefix + width): the prefix, then itself causally
    calls: int = 0


_SHARED: contextvars.ContextVar[_SharedPrefix | None] = contextvars.ContextVar("skilltune_shared", default=None)


@contextlib.contextmanager
def shared_prefix_attention(prefix: int, attention_mask: torch.Tensor):
    """Attention for the "rows" shared-prefix layout (batches.py) while the decoder runs in this block.

    ``attention_mask`` (1 + examples, width) marks real tokens: row 0 is the prefix, row k the
    remainder of example k, which attends to row 0's first ``prefix`` keys and causally to itself.
    """
    width = attention_mask.shape[1]
    real = attention_mask.bool()
    causal = torch.ones(width, width, dtype=torch.bool, device=real.device).tril()
    in_prefix = torch.arange(width, device=real.device) < prefix
    allowed_prefix = (causal & in_prefix)[None, None]
    own = causal[None] & real[1:, None, :]  # (examples, queries, keys)
    allowed_rest = torch.cat([in_prefix[:prefix].expand(own.shape[0], width, prefix), own], dim=2)[:, None]
    state = _SharedPrefix(prefix, _bias_from_mask(allowed_prefix), _bias_from_mask(allowed_rest))
    token = _SHARED.set(state)
    try:
        yield state
    finally:
        _SHARED.reset(token)
    if state.calls == 0:
        raise RuntimeError("the shared-prefix layout ran without skilltune's attention kernel; "
                           "the rows would not have seen the prefix")


def _shared_attention(state: _SharedPrefix, query, key, value, scale):
    p, k, v = state.prefix, key, value
    head = _Attention.apply(query[:1], k[:1], v[:1], state.bias_prefix, scale)  # (1, heads, width, head_dim)
    n = query.shape[0] - 1
    k_rest = torch.cat([k[:1, :, :p].expand(n, -1, -1, -1), k[1:]], dim=2)  # (examples, kv, prefix+width, d)
    v_rest = torch.cat([v[:1, :, :p].expand(n, -1, -1, -1), v[1:]], dim=2)
    rest = _Attention.apply(query[1:], k_rest, v_rest, state.bias_rest, scale)
    return torch.cat([head, rest], dim=0)


def attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, is_causal=None,
                      **kwargs):
    """A transformers attention function (``AttentionInterface``); anything unusual goes to SDPA."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    shared = _SHARED.get()
    if shared is None and ((dropout and module.training) or kwargs.get("softcap") is not None
                           or kwargs.get("s_aux") is not None or kwargs.get("output_attentions")
                           or query.device.type != "cpu" or attention_mask is None
                           or attention_mask.dtype != torch.float32 or query.shape[1] % key.shape[1]):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      is_causal=is_causal, **kwargs)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    with torch.autocast(query.device.type, enabled=False):
        if shared is not None:
            shared.calls += 1
            out = _shared_attention(shared, query, key, value, scale)
        else:
            out = _Attention.apply(query, key, value, attention_mask, scale)
    return out.transpose(1, 2).contiguous(), None  # (batch, queries, heads, head_dim)


def _bias_from_mask(mask: torch.Tensor) -> torch.Tensor:
    bias = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)
    return bias.masked_fill_(~mask, torch.finfo(torch.float32).min)


def attention_bias(*args, **kwargs):
    """Mask builder for :func:`attention_forward`: transformers' boolean mask as an fp32 additive bias.

    Built once per forward and shared by every layer; masked entries get the most negative
    finite float, so a query with nothing to attend to gets a uniform row instead of NaN.
    """
    from transformers.masking_utils import sdpa_mask

    kwargs.pop("allow_is_causal_skip", None)
    kwargs.pop("dtype", None)
    mask = sdpa_mask(*args, allow_is_causal_skip=False, **kwargs)  # (batch, 1, queries, keys) bool
    return None if mask is None else _bias_from_mask(mask)


def _install_attention(model) -> tuple[int, Callable[[], None]]:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    config = getattr(base, "config", None)
    before = getattr(config, "_attn_implementation", None)
    if before not in ("sdpa", "eager") or not hasattr(base, "set_attn_implementation"):
        return 0, lambda: None
    AttentionInterface.register(ATTENTION_NAME, attention_forward)
    AttentionMaskInterface.register(ATTENTION_NAME, attention_bias)
    try:
        base.set_attn_implementation(ATTENTION_NAME)
    except (ValueError, ImportError):  # a model class that does not take custom attention functions
        return 0, lambda: None
    layers = sum(1 for m in base.modules() if type(m).__name__.endswith("Attention"))
    return layers, lambda: base.set_attn_implementation(before)


register_kernel(Kernel("attention", _install_attention))
