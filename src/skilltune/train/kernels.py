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
  Sibling layers that read the same input (q/k/v, gate/up) run as one call of the same
  function (:class:`_LoraLinears`): their rank-r products share the input's passes and their
  input gradients accumulate into one tensor.
- ``rms_norm``: Llama's RMSNorm as one autograd function (:class:`_RMSNorm`: an fp32-accumulating
  norm forward, a one-formula backward; PyTorch's CPU ``rms_norm`` is a composite of small ops)
  for RMSNorm modules whose output it reproduces (checked on a random input when installing,
  so a variant such as Gemma's ``1 + weight`` is left alone).
- ``attention``: causal attention with its two products in the inputs' dtype and the softmax
  in fp32 (flash attention's precision split), grouped query heads without repeating K/V, the
  mask turned into an additive bias once per forward instead of once per layer, and a
  hand-written backward. PyTorch's CPU flash-attention backward was 4x slower than its math
  path here. It also runs the packed shared-prefix layout (batches.py): one row of a prefix
  and the remainders that attend to it.
"""

from __future__ import annotations

import contextlib
import contextvars
import types
from dataclasses import dataclass
from typing import Callable

import torch

ATTENTION_NAME = "skilltune_cpu"


@dataclass(frozen=True)
class Kernel:
    name: str
    install: Callable[[torch.nn.Module], tuple[int, Callable[[], None]]]  # -> (modules taken over, undo)
    steps_aside: str = ""  # when it takes over nothing: why, for the training plan


KERNELS: dict[str, Kernel] = {}


def register_kernel(kernel: Kernel) -> None:
    KERNELS[kernel.name] = kernel


def install_kernels(model: torch.nn.Module, kernels: dict[str, Kernel] | None = None
                    ) -> tuple[dict[str, int], Callable[[], None]]:
    """Install every kernel of ``kernels`` (default: the training kernels) that applies to ``model``;
    return counts and one undo.

    A kernel that applies nowhere steps aside (the stock path runs): :func:`skipped_kernels` says why.
    """
    counts, undos = {}, []
    for kernel in (KERNELS if kernels is None else kernels).values():
        n, undo = kernel.install(model)
        if n:
            counts[kernel.name] = n
            undos.append(undo)

    def undo_all() -> None:
        for undo in reversed(undos):
            undo()

    return counts, undo_all


def skipped_kernels(installed: dict[str, int]) -> dict[str, str]:
    """The registered kernels not in ``installed``, each with the reason it steps aside."""
    return {k.name: k.steps_aside for k in KERNELS.values() if k.name not in installed}


def _swap_forward(modules: list[torch.nn.Module], make: Callable) -> Callable[[], None]:
    """Give each module an instance-level forward ``make(module, original_forward)``; return the undo."""
    for m in modules:
        m.forward = types.MethodType(make(m.forward), m)

    def undo() -> None:
        for m in modules:
            m.__dict__.pop("forward", None)

    return undo


# ---- lora_linear ---------------------------------------------------------------------------

def _plain_adapter(layer, x) -> str | None:
    """The adapter name when ``layer`` (a peft LoRA Linear) computes plain LoRA on ``x``, else None.

    None sends the call to peft's own forward: adapter off or merged, several adapters, a
    variant such as DoRA, dropout, a trainable base or LoRA bias, or an input of another dtype.
    """
    base, active = layer.base_layer, layer.active_adapters
    if (layer.disable_adapters or layer.merged or len(active) != 1
            or active[0] in layer.lora_variant or active[0] not in layer.lora_A
            or not isinstance(layer.lora_dropout[active[0]], torch.nn.Identity)
            or x.dtype != base.weight.dtype or base.weight.requires_grad
            or (base.bias is not None and base.bias.requires_grad)
            or getattr(layer, "lora_bias", {}).get(active[0], False)):
        return None
    return active[0]


class _LoraLinears(torch.autograd.Function):
    """LoRA linears that read one input ``x``: one layer, or siblings such as q, k, v (gate, up).

    Per layer ``y_i = x W_i^T + b_i + s_i (x A_i^T) B_i^T`` with W_i, b_i frozen and A_i, B_i trained
    (kept fp32, computed in x's dtype): three matmuls forward and five backward, no activation-sized
    casts or adds. The rank-r products that read ``x`` run once for all layers (``x [A_1; A_2; ...]^T``
    forward, ``dxa^T x`` and ``dxa [A_1; ...]`` backward), and the layers' input gradients accumulate
    into one tensor instead of autograd adding one per sibling.
    """

    @staticmethod
    def forward(ctx, x, scales, *tensors):  # tensors: weight, bias (or None), lora_a, lora_b of each layer
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])  # (tokens, in)
        weights, biases = tensors[0::4], tensors[1::4]
        a_all = torch.cat([a.to(x.dtype) for a in tensors[2::4]])  # (layers * r, in): tiny casts
        bs = [b.to(x.dtype) for b in tensors[3::4]]  # (out_i, r)
        xa = x2 @ a_all.t()  # (tokens, layers * r)
        outs, start = [], 0
        for w, bias, b, scale in zip(weights, biases, bs, scales):
            y = torch.addmm(bias, x2, w.t()) if bias is not None else x2 @ w.t()  # (tokens, out_i)
            y.addmm_(xa[:, start:start + b.shape[1]], b.t(), alpha=scale)
            start += b.shape[1]
            outs.append(y.view(*shape[:-1], y.shape[-1]))
        ctx.save_for_backward(x2, xa, a_all, *weights, *bs)
        ctx.scales, ctx.shape = scales, shape
        return tuple(outs)

    @staticmethod
    def backward(ctx, *dys):
        x2, xa, a_all, *rest = ctx.saved_tensors
        n = len(ctx.scales)
        weights, bs = rest[:n], rest[n:]
        dx, dxas, d_bs, start = None, [], [], 0
        for dy, w, b, scale in zip(dys, weights, bs, ctx.scales):
            dy2 = dy.reshape(-1, dy.shape[-1])  # (tokens, out_i)
            dxas.append((dy2 @ b).mul_(scale))  # (tokens, r)
            d_bs.append((dy2.t() @ xa[:, start:start + b.shape[1]]).float().mul_(scale))  # (out_i, r)
            start += b.shape[1]
            # the first layer's input comes from the frozen embeddings: no gradient to compute
            if ctx.needs_input_grad[0]:
                dx = dy2 @ w if dx is None else dx.addmm_(dy2, w)
        dxa = torch.cat(dxas, dim=1)  # (tokens, layers * r)
        d_as = (dxa.t() @ x2).float().split([b.shape[1] for b in bs])  # (r, in) each
        if dx is not None:
            dx = dx.addmm_(dxa, a_all).view(ctx.shape)
        out = [dx, None]
        for d_a, d_b in zip(d_as, d_bs):
            out += [None, None, d_a, d_b]
        return tuple(out)


# Sibling linears of one parent that transformers calls in this order on the same input.
SIBLINGS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


class _SiblingGroup:
    """The LoRA linears of one SIBLINGS entry; the first one's call computes all and keeps the others'
    outputs for their calls, used only on the very same, unmodified input tensor."""

    def __init__(self, members: list):
        self.members = members
        self.pending: dict[int, torch.Tensor] = {}
        self.input: torch.Tensor | None = None
        self.version = -1

    def compute(self, x, name: str):
        if any(_plain_adapter(m, x) != name for m in self.members[1:]):
            return None
        with torch.autocast(x.device.type, enabled=False):
            outs = _LoraLinears.apply(x, *_lora_args(self.members, name))
        self.pending = {id(m): y for m, y in zip(self.members[1:], outs[1:])}
        self.input, self.version = x, x._version
        return outs[0]

    def take(self, module, x):
        if self.input is not x or x._version != self.version:
            return None
        out = self.pending.pop(id(module), None)
        if not self.pending:
            self.input = None
        return out


def _lora_args(layers: list, name: str) -> list:
    """The arguments after ``x`` of :class:`_LoraLinears` for peft LoRA ``layers`` and adapter ``name``."""
    return [tuple(m.scaling[name] for m in layers)] + [
        t for m in layers
        for t in (m.base_layer.weight, m.base_layer.bias, m.lora_A[name].weight, m.lora_B[name].weight)]


def _lora_forward(original):
    def forward(self, x, *args, **kwargs):
        name = None if (args or kwargs) else _plain_adapter(self, x)
        if name is None:
            return original(x, *args, **kwargs)
        group = self.__dict__.get("_skilltune_siblings")
        if group is not None:
            out = group.compute(x, name) if group.members[0] is self else group.take(self, x)
            if out is not None:
                return out
        with torch.autocast(x.device.type, enabled=False):
            return _LoraLinears.apply(x, *_lora_args([self], name))[0]

    return forward


def _install_lora(model) -> tuple[int, Callable[[], None]]:
    try:
        from peft.tuners.lora.layer import Linear as LoraLinear
    except ImportError:
        return 0, lambda: None
    mods = [m for m in model.modules()
            if isinstance(m, LoraLinear) and type(m.get_base_layer()) is torch.nn.Linear]
    taken = {id(m) for m in mods}
    groups = []
    for parent in model.modules():
        for names in SIBLINGS:
            members = [getattr(parent, n, None) for n in names]
            if all(id(m) in taken and m.base_layer.bias is None for m in members):
                groups.append(_SiblingGroup(members))
    for group in groups:
        for m in group.members:
            m._skilltune_siblings = group
    undo_forward = _swap_forward(mods, _lora_forward)

    def undo() -> None:
        undo_forward()
        for group in groups:
            for m in group.members:
                m.__dict__.pop("_skilltune_siblings", None)

    return len(mods), undo


register_kernel(Kernel("lora_linear", _install_lora,
                       "no peft LoRA layer over a plain nn.Linear (full finetuning, or another base layer): "
                       "peft's own forward"))


# ---- rms_norm ------------------------------------------------------------------------------

class _RMSNorm(torch.autograd.Function):
    """``weight * (x32 * rsqrt(mean(x32^2) + eps)).to(x.dtype)`` (Llama's RMSNorm) with a hand-written backward.

    PyTorch's CPU ``rms_norm`` is a composite of ~8 ops forward and autograd's ~12 backward; here
    the mean square is one fp32-accumulating norm over the bf16 input and the backward is one
    formula, and the frozen norm weight (LoRA) gets no gradient computed.
    """

    @staticmethod
    def forward(ctx, x, weight, eps):
        ms = torch.linalg.vector_norm(x, dim=-1, keepdim=True, dtype=torch.float32).square_().div_(x.shape[-1])
        rstd = ms.add_(eps).rsqrt_()  # (..., 1) fp32
        ctx.save_for_backward(x, weight, rstd)
        return (x * rstd).to(x.dtype).mul_(weight)

    @staticmethod
    def backward(ctx, dy):
        x, weight, rstd = ctx.saved_tensors
        dx = dweight = None
        if ctx.needs_input_grad[0]:  # d/dx of w * x * rstd(x): rstd * (g - x * rstd^2 * mean(g * x)), g = dy * w
            g = dy.to(torch.float32, copy=True).mul_(weight)  # a copy: never write into the incoming gradient
            c = torch.linalg.vecdot(g, x.float(), dim=-1).unsqueeze(-1).mul_(rstd.pow(3)).div_(x.shape[-1])
            dx = g.mul_(rstd).sub_(x * c).to(x.dtype)
        if ctx.needs_input_grad[1]:
            dweight = (dy * (x * rstd).to(x.dtype)).sum_to_size(weight.shape)
        return dx, dweight, None


def _norm_forward(original):
    def forward(self, x):
        if x.dtype != self.weight.dtype:
            return original(x)
        return _RMSNorm.apply(x, self.weight, self._skilltune_eps)

    return forward


def _reproduces(module, eps: float) -> bool:
    """Does the kernel give this module's output on a random input?"""
    w = module.weight
    x = torch.randn(4, w.shape[-1], generator=torch.Generator().manual_seed(0)).to(w.device, w.dtype)
    with torch.no_grad():
        ref = module(x)
        ours = _RMSNorm.apply(x, w, eps)
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


register_kernel(Kernel("rms_norm", _install_rms_norm,
                       "no RMSNorm here that the kernel reproduces exactly (Gemma's (1 + weight) norm is not "
                       "Llama's): stock norms"))


# ---- attention -----------------------------------------------------------------------------

def _attend(qg, k, v, bias, scale):
    """Attention of query groups ``qg`` (b, kv, g*s, d) over ``k``, ``v`` (b, kv, t, d); bias (b, 1, s, t).

    The two products run in the inputs' dtype (bf16 on AMX accumulates in fp32 inside), the scale,
    bias and softmax in fp32: the precision split of flash attention. Returns the output
    (b, kv, g*s, d) and the fp32 probabilities (b, kv, g*s, t) the backward needs.
    """
    b, kv, gs, _ = qg.shape
    s, t = bias.shape[-2], k.shape[2]
    scores = torch.matmul(qg, k.transpose(-1, -2)).view(b, kv, gs // s, s, t).float()
    scores.mul_(scale).add_(bias[:, :, None])  # every head of a group gets the same bias
    p = torch.softmax(scores, -1).view(b, kv, gs, t)
    return torch.matmul(p.to(qg.dtype), v), p


def _attend_backward(dog, qg, k, v, p, scale):
    """Gradients of :func:`_attend` for the output gradient ``dog`` (b, kv, g*s, d): dq, dk, dv, in dog's dtype.

    Products in that dtype, the softmax gradient in fp32.
    """
    dv = torch.matmul(p.to(dog.dtype).transpose(-1, -2), dog)  # (b, kv, keys, d)
    dp = torch.matmul(dog, v.transpose(-1, -2)).float()  # (b, kv, g*s, keys)
    ds = dp.sub_((dp * p).sum(-1, keepdim=True)).mul_(p).mul_(scale).to(dog.dtype)
    return torch.matmul(ds, k), torch.matmul(ds.transpose(-1, -2), qg), dv


def _compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


class _Attention(torch.autograd.Function):
    """softmax(q k^T * scale + bias) v with grouped K/V heads: products in the inputs' dtype, softmax in fp32.

    bf16 products with an fp32 softmax, as flash attention computes; with bf16 inputs this was
    +8% tokens/s over an all-fp32 kernel (PyTorch's CPU math path upcasts to fp32), and its loss
    and gradients differ from fp32's by what bf16 rounding elsewhere already does (bench/NOTES.md).
    Inputs may differ in dtype (the promoted one is used); gradients come back in each.
    """

    @staticmethod
    def forward(ctx, q, k, v, bias, scale):
        b, h, s, d = q.shape  # (batch, heads, queries, head_dim)
        kv, dtype = k.shape[1], _compute_dtype(q, k, v)
        qg = q.reshape(b, kv, h // kv * s, d).to(dtype)  # the query heads sharing one K/V head, stacked
        kf, vf = k.to(dtype), v.to(dtype)
        out, p = _attend(qg, kf, vf, bias, scale)
        ctx.save_for_backward(qg, kf, vf, p)
        ctx.scale, ctx.dtypes = scale, (q.dtype, k.dtype, v.dtype)
        return out.view(b, h, s, d).to(q.dtype)

    @staticmethod
    def backward(ctx, do):
        qg, kf, vf, p = ctx.saved_tensors
        dq, dk, dv = _attend_backward(do.reshape(qg.shape).to(qg.dtype), qg, kf, vf, p, ctx.scale)
        dt_q, dt_k, dt_v = ctx.dtypes
        return dq.view(do.shape).to(dt_q), dk.to(dt_k), dv.to(dt_v), None, None


@dataclass
class _SharedPrefix:
    """Index maps and biases of one packed shared-prefix row (batches.py), shared by every layer."""

    prefix: int  # P: tokens of the shared prefix, at the start of the row
    width: int  # L: the longest remainder; each remainder is gathered into a (L,) slot
    gather: torch.Tensor  # (segments * L,): row offset after P of each slot's token; empty slots -> a zero row
    scatter: torch.Tensor  # (remainder tokens,): the slot of each remainder token
    padding: int  # tokens after the last remainder, attending to nothing (zero output and gradients)
    bias_prefix: torch.Tensor  # (1, 1, P, P): the prefix attends causally to itself
    bias_rest: torch.Tensor  # (segments, 1, L, P + L): a remainder attends to the prefix, then causally to itself
    calls: int = 0


_SHARED: contextvars.ContextVar[_SharedPrefix | None] = contextvars.ContextVar("skilltune_shared", default=None)


@contextlib.contextmanager
def shared_prefix_attention(prefix: int, segments: torch.Tensor, row: int):
    """Attention for the "packed" shared-prefix layout (batches.py) while the decoder runs in this block.

    The row of ``row`` tokens holds ``prefix`` tokens, then remainders of ``segments`` lengths back
    to back, then padding; each remainder attends to all of the prefix and causally to itself,
    never to another remainder. The padding attends to nothing, gets zeros, and no one sees it.
    """
    lengths = [int(n) for n in segments]
    width, rest = max(lengths), row - prefix  # rest: tokens after the prefix, padding included
    if rest < sum(lengths):
        raise ValueError(f"a packed row of {row} tokens cannot hold a prefix of {prefix} and remainders of "
                         f"{sum(lengths)} tokens")
    slot = torch.arange(width)
    starts = torch.tensor([0] + lengths[:-1]).cumsum(0)
    real = slot[None] < segments[:, None]  # (segments, L)
    gather = torch.where(real, starts[:, None] + slot[None], rest).reshape(-1)  # index `rest`: the zero row
    scatter = (torch.arange(len(lengths)) * width)[:, None].add(slot[None])[real]
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    own = causal[None] & real[:, None, :]  # (segments, queries, keys)
    allowed_rest = torch.cat([torch.ones(len(lengths), width, prefix, dtype=torch.bool), own], dim=2)[:, None]
    allowed_prefix = torch.ones(prefix, prefix, dtype=torch.bool).tril()[None, None]
    state = _SharedPrefix(prefix, width, gather, scatter, rest - sum(lengths), _bias_from_mask(allowed_prefix),
                          _bias_from_mask(allowed_rest))
    token = _SHARED.set(state)
    try:
        yield state
    finally:
        _SHARED.reset(token)
    if state.calls == 0:
        raise RuntimeError("the packed shared-prefix layout ran without skilltune's attention kernel; "
                           "the examples would have attended to each other")


class _PackedSharedAttention(torch.autograd.Function):
    """Attention over one packed shared-prefix row, in the precision of :class:`_Attention`.

    The prefix attends to itself; the remainders are gathered into (segments, L) slots, each
    attending to the prefix's keys and its own, and scattered back. Slicing, gathering and the
    summing of the prefix's key gradients over the remainders happen here, not in autograd.
    """

    @staticmethod
    def forward(ctx, q, k, v, state: _SharedPrefix, scale):
        h, d = q.shape[1], q.shape[3]  # q: (1, heads, tokens, head_dim)
        kv, p, width = k.shape[1], state.prefix, state.width
        g, segs = h // kv, len(state.gather) // width

        def slots(x):  # (heads, t, d) -> (segments, heads, L, d): the remainders' tokens in their slots
            x = torch.cat([x[:, p:], x.new_zeros(x.shape[0], 1, d)], dim=1)  # a zero row for the padding slots
            return x.index_select(1, state.gather).view(x.shape[0], segs, width, d).transpose(0, 1)

        dtype = _compute_dtype(q, k, v)
        qf, kf, vf = q[0].to(dtype), k[0].to(dtype), v[0].to(dtype)
        q_head = qf[:, :p].reshape(1, kv, g * p, d)
        k_head, v_head = kf[None, :, :p], vf[None, :, :p]
        out_head, p_head = _attend(q_head, k_head, v_head, state.bias_prefix, scale)
        q_rest = slots(qf).reshape(segs, kv, g * width, d)
        k_rest = torch.cat([k_head.expand(segs, -1, -1, -1), slots(kf)], dim=2)  # (segments, kv, P + L, d)
        v_rest = torch.cat([v_head.expand(segs, -1, -1, -1), slots(vf)], dim=2)
        out_rest, p_rest = _attend(q_rest, k_rest, v_rest, state.bias_rest, scale)
        ctx.save_for_backward(q_head, k_head, v_head, p_head, q_rest, k_rest, v_rest, p_rest)
        ctx.state, ctx.scale, ctx.dtypes = state, scale, (q.dtype, k.dtype, v.dtype)
        return _unslot(out_head.view(h, p, d), out_rest.view(segs, h, width, d), state)[None].to(q.dtype)

    @staticmethod
    def backward(ctx, do):
        q_head, k_head, v_head, p_head, q_rest, k_rest, v_rest, p_rest = ctx.saved_tensors
        state, p, width = ctx.state, ctx.state.prefix, ctx.state.width
        h, d, segs = do.shape[1], do.shape[3], q_rest.shape[0]
        dof = do[0].to(q_head.dtype)
        dq_head, dk_head, dv_head = _attend_backward(dof[:, :p].reshape(q_head.shape), q_head, k_head, v_head,
                                                     p_head, ctx.scale)
        do_rest = torch.cat([dof[:, p:], dof.new_zeros(h, 1, d)], dim=1).index_select(1, state.gather)
        do_rest = do_rest.view(h, segs, width, d).transpose(0, 1).reshape(q_rest.shape)
        dq_rest, dk_rest, dv_rest = _attend_backward(do_rest, q_rest, k_rest, v_rest, p_rest, ctx.scale)
        dq = _unslot(dq_head.view(h, p, d), dq_rest.view(segs, h, width, d), state)
        # the prefix's keys and values got gradients from the prefix and from every remainder (summed in fp32)
        dk_prefix = (dk_head[0].float() + dk_rest[:, :, :p].float().sum(0)).to(dof.dtype)
        dv_prefix = (dv_head[0].float() + dv_rest[:, :, :p].float().sum(0)).to(dof.dtype)
        dk = _unslot(dk_prefix, dk_rest[:, :, p:], state)
        dv = _unslot(dv_prefix, dv_rest[:, :, p:], state)
        dt_q, dt_k, dt_v = ctx.dtypes
        return dq[None].to(dt_q), dk[None].to(dt_k), dv[None].to(dt_v), None, None


def _unslot(head: torch.Tensor, slots: torch.Tensor, state: _SharedPrefix) -> torch.Tensor:
    """(heads, P, d) and (segments, heads, L, d) -> (heads, tokens, d) in the packed row's order (padding: 0)."""
    segs, heads, width, d = slots.shape
    rest = slots.transpose(0, 1).reshape(heads, segs * width, d).index_select(1, state.scatter)
    parts = [head, rest] + ([rest.new_zeros(heads, state.padding, d)] if state.padding else [])
    return torch.cat(parts, dim=1)


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
            out = _PackedSharedAttention.apply(query, key, value, shared, scale)
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
    if getattr(config, "attn_logit_softcapping", None):  # Gemma 2: only eager attention computes soft-capping
        return 0, lambda: None
    AttentionInterface.register(ATTENTION_NAME, attention_forward)
    AttentionMaskInterface.register(ATTENTION_NAME, attention_bias)
    try:
        base.set_attn_implementation(ATTENTION_NAME)
    except (ValueError, ImportError):  # a model class that does not take custom attention functions
        return 0, lambda: None
    layers = sum(1 for m in base.modules() if type(m).__name__.endswith("Attention"))
    return layers, lambda: base.set_attn_implementation(before)


register_kernel(Kernel("attention", _install_attention,
                       "the model takes no custom attention function, or soft-caps attention logits (Gemma 2): "
                       "stock attention"))
