"""The CPU training kernels compute what the stock transformers/peft paths compute."""

from __future__ import annotations

import pytest
import torch

from skilltune.config.schema import AdapterConfig
from skilltune.data.tokenize import IGNORE
from skilltune.train.kernels import (_Attention, _PackedSharedAttention, attention_bias, install_kernels,
                                     shared_prefix_attention)
from skilltune.train.loss import CompletionLoss
from skilltune.train.methods import METHODS


def _lora_model(model_dir, dtype):
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype)
    torch.manual_seed(0)
    for name, p in base.named_parameters():
        if "norm" in name:  # norms start at 1.0; other scales catch a kernel that ignores them
            p.data.normal_(1.0, 0.2)
    model = METHODS["lora"].wrap(base, AdapterConfig(r=4, alpha=8))
    for name, p in model.named_parameters():
        if p.requires_grad:
            p.data = p.data.float()
            if "lora_B" in name:  # peft starts B at zero; a random B exercises every gradient path
                p.data.normal_(0, 0.1)
    return model


def _batch(packed: bool):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 300, (2, 12), generator=g)
    labels = ids.clone()
    labels[:, :5] = IGNORE
    if packed:  # row 0 holds two examples (7 + 5 tokens), row 1 one example and padding
        pos = torch.tensor([list(range(7)) + list(range(5)), list(range(9)) + list(range(3))])
        labels[1, 9:] = IGNORE
        return {"input_ids": ids, "labels": labels, "position_ids": pos}
    mask = torch.ones_like(ids)
    mask[1, 9:] = 0
    labels[1, 9:] = IGNORE
    return {"input_ids": ids, "labels": labels, "position_ids": torch.arange(12).expand(2, 12).clone(),
            "attention_mask": mask}


def _loss_and_grads(loss_fn, model, batch):
    model.zero_grad(set_to_none=True)
    loss = loss_fn(**batch)
    loss.backward()
    return float(loss.detach()), {n: p.grad.float().clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("packed", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernels_match_the_stock_path(tiny_model_dir, packed, dtype):
    model = _lora_model(tiny_model_dir, dtype)
    loss_fn = CompletionLoss(model, torch.bfloat16 if dtype == torch.bfloat16 else None)
    batch = _batch(packed)
    ref_loss, ref_grads = _loss_and_grads(loss_fn, model, batch)

    counts, undo = install_kernels(model)
    assert counts == {"lora_linear": 14, "rms_norm": 5, "attention": 2}  # 7 linears x 2 layers; 2x2 + final norm
    loss, grads = _loss_and_grads(loss_fn, model, batch)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert loss == pytest.approx(ref_loss, rel=tol)
    for name, ref in ref_grads.items():
        got = grads[name]
        assert ref.abs().max() > 0, name
        if dtype == torch.float32:
            torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-6, msg=name)
        else:  # bf16 rounding differs in order, not in direction
            cos = torch.nn.functional.cosine_similarity(got.flatten(), ref.flatten(), dim=0)
            assert cos > 0.99, (name, float(cos))

    undo()  # the stock path is back, bit for bit
    assert model.get_base_model().config._attn_implementation in ("sdpa", "eager")
    again, _ = _loss_and_grads(loss_fn, model, batch)
    assert again == ref_loss


def test_sibling_lora_layers_run_as_one_function_with_the_same_result(tiny_model_dir):
    model = _lora_model(tiny_model_dir, torch.float32)
    loss_fn = CompletionLoss(model, None)
    batch = _batch(packed=True)
    _, undo = install_kernels(model)
    layer = model.get_base_model().model.layers[0]
    group = layer.self_attn.q_proj._skilltune_siblings
    assert group.members == [layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj]
    assert layer.mlp.up_proj._skilltune_siblings.members == [layer.mlp.gate_proj, layer.mlp.up_proj]
    assert "_skilltune_siblings" not in layer.self_attn.o_proj.__dict__
    grouped_loss, grouped = _loss_and_grads(loss_fn, model, batch)

    siblings = {m: m.__dict__.pop("_skilltune_siblings") for m in model.modules()
                if "_skilltune_siblings" in m.__dict__}
    alone_loss, alone = _loss_and_grads(loss_fn, model, batch)  # each linear on its own
    assert grouped_loss == pytest.approx(alone_loss, rel=1e-6)
    for name, ref in alone.items():
        torch.testing.assert_close(grouped[name], ref, rtol=1e-4, atol=1e-6, msg=name)  # fp32 summation order

    # A sibling's kept output serves only the very same, unmodified input.
    for m, g in siblings.items():
        m._skilltune_siblings = g
    attn = layer.self_attn
    x, other = torch.randn(1, 5, 64), torch.randn(1, 5, 64)
    with torch.no_grad():
        expected_k = attn.k_proj.base_layer(other) + attn.k_proj.scaling["default"] * attn.k_proj.lora_B["default"](
            attn.k_proj.lora_A["default"](other))
        attn.q_proj(x)
        torch.testing.assert_close(attn.k_proj(other), expected_k)  # another tensor: computed, not taken
        attn.q_proj(x)
        x.mul_(2)  # changed in place after the group ran
        torch.testing.assert_close(attn.v_proj(x), attn.v_proj.base_layer(x) + attn.v_proj.scaling["default"]
                                   * attn.v_proj.lora_B["default"](attn.v_proj.lora_A["default"](x)))
    undo()
    assert not any("_skilltune_siblings" in m.__dict__ for m in model.modules())


def test_lora_kernel_steps_aside_when_the_adapter_is_off_or_merged(tiny_model_dir):
    model = _lora_model(tiny_model_dir, torch.float32)
    install_kernels(model)
    ids = torch.randint(3, 300, (1, 8))
    with torch.no_grad():
        with model.disable_adapter():
            off = model(input_ids=ids).logits
        on = model(input_ids=ids).logits
        model.merge_adapter()
        merged = model(input_ids=ids).logits
        model.unmerge_adapter()
        with model.disable_adapter():
            off_again = model(input_ids=ids).logits
    assert not torch.allclose(on, off)  # the adapter matters (B is random) ...
    torch.testing.assert_close(merged, on, rtol=1e-4, atol=1e-5)  # ... merged or not
    torch.testing.assert_close(off_again, off)


def test_rms_norm_kernel_leaves_other_norms_alone():
    class GemmaStyleRMSNorm(torch.nn.Module):  # scales by (1 + weight): F.rms_norm would be wrong
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.randn(16))
            self.eps = 1e-6

        def forward(self, x):
            x32 = x.float()
            return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps) * (1 + self.weight)).to(x.dtype)

    model = torch.nn.Sequential(GemmaStyleRMSNorm())
    counts, _ = install_kernels(model)
    assert "rms_norm" not in counts


def test_attention_kernel_never_returns_nan_for_a_fully_masked_row():
    q, k, v = (torch.randn(1, 4, 3, 8, requires_grad=True) for _ in range(3))
    bias = torch.zeros(1, 1, 3, 3)
    bias[0, 0, 0, :] = torch.finfo(torch.float32).min  # query 0 may attend to nothing
    out = _Attention.apply(q, k[:, :2].detach().requires_grad_(), v[:, :2].detach().requires_grad_(), bias, 8 ** -0.5)
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(q.grad).all()


def _attention_out_and_grads(kind, q, k, v, dtype):
    q, k, v = (t.detach().to(dtype).requires_grad_() for t in (q, k, v))
    if kind == "plain":
        mask = torch.ones(q.shape[0], q.shape[2], dtype=torch.bool)
        bias = attention_bias(batch_size=q.shape[0], q_length=q.shape[2], kv_length=q.shape[2], attention_mask=mask)
        out = _Attention.apply(q, k, v, bias, 16 ** -0.5)
    else:  # a prefix of 10, remainders of 7, 5 and 9, 1 position of padding
        with shared_prefix_attention(10, torch.tensor([7, 5, 9]), 32) as state:
            state.calls += 1
            out = _PackedSharedAttention.apply(q, k, v, state, 16 ** -0.5)
    (out.float() * torch.randn(out.shape, generator=torch.Generator().manual_seed(3))).sum().backward()
    return [t.detach().float() for t in (out, q.grad, k.grad, v.grad)]


@pytest.mark.parametrize("kind", ["plain", "packed"])
def test_bf16_attention_errs_about_as_much_as_rounding_its_inputs(kind):
    """bf16 products with an fp32 softmax: against fp32, the error is of the order that rounding q, k, v
    to bf16 alone causes (an fp32 kernel on rounded inputs), not a new kind of error."""
    g = torch.Generator().manual_seed(0)
    batch = 2 if kind == "plain" else 1
    q = torch.randn(batch, 6, 32, 16, generator=g) * 2
    k, v = torch.randn(batch, 2, 32, 16, generator=g) * 2, torch.randn(batch, 2, 32, 16, generator=g)
    ref = _attention_out_and_grads(kind, q, k, v, torch.float32)
    rounded = _attention_out_and_grads(kind, *(t.bfloat16().float() for t in (q, k, v)), torch.float32)
    bf16 = _attention_out_and_grads(kind, q, k, v, torch.bfloat16)
    for name, r, a, b in zip(("output", "dq", "dk", "dv"), ref, rounded, bf16):
        err_rounded, err_bf16 = float((a - r).norm() / r.norm()), float((b - r).norm() / r.norm())
        assert err_bf16 < 0.02 and err_bf16 < 2.5 * err_rounded, (name, err_bf16, err_rounded)


def test_attention_bias_matches_transformers_causal_padding_mask():
    mask = torch.tensor([[1, 1, 1, 0]], dtype=torch.bool)
    bias = attention_bias(batch_size=1, q_length=4, kv_length=4, attention_mask=mask)
    allowed = bias[0, 0] == 0
    assert allowed.tolist() == [[True, False, False, False], [True, True, False, False],
                                [True, True, True, False], [True, True, True, False]]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_head_cross_entropy_matches_the_stock_loss(monkeypatch, dtype):
    from skilltune.train import loss as loss_mod

    monkeypatch.setattr(loss_mod, "_rows_per_block", lambda vocab: 3)  # several blocks and a short last one
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(10, 16, generator=g).to(dtype)
    weight = torch.randn(500, 16, generator=g).to(dtype)
    targets = torch.randint(0, 500, (10,), generator=g)
    upstream = torch.linspace(-1.0, 2.0, 10)

    def run(fused: bool):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        if fused:
            loss = loss_mod._HeadCrossEntropy.apply(h, w, targets)
        else:
            loss = torch.nn.functional.cross_entropy((h @ w.t()).float(), targets, reduction="none")
        (loss * upstream).sum().backward()  # a different upstream gradient for each token (DPO's per-answer sums)
        return loss.detach(), h.grad.float(), w.grad.float()

    ref, got = run(False), run(True)
    tol = {"rtol": 1e-5, "atol": 1e-6} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-2}
    for r, o in zip(ref, got):
        torch.testing.assert_close(o, r, **tol)


def test_completion_loss_takes_the_fused_head_only_where_it_computes_the_same(tiny_model_dir):
    from skilltune.train.loss import _plain_head

    model = _lora_model(tiny_model_dir, torch.bfloat16)
    head = model.get_base_model().get_output_embeddings()
    h = torch.randn(2, head.in_features, dtype=torch.bfloat16)
    assert _plain_head(head, h)
    assert not _plain_head(head, h.float())  # the stock path casts; so does autocast
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert _plain_head(head, h)
    with torch.autocast("cpu", dtype=torch.float16):
        assert not _plain_head(head, h)
    assert not _plain_head(torch.nn.Linear(4, 8, dtype=torch.bfloat16), h[:, :4])  # a bias


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_kernel_matches_llamas_norm_and_its_gradients(dtype):
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    from skilltune.train.kernels import _RMSNorm

    g = torch.Generator().manual_seed(0)
    norm = LlamaRMSNorm(64, eps=1e-5).to(dtype)
    norm.weight.data = (1 + 0.2 * torch.randn(64, generator=g)).to(dtype)
    x0 = torch.randn(3, 5, 64, generator=g).to(dtype)
    dy = torch.randn(3, 5, 64, generator=g).to(dtype)

    def run(kernel: bool):
        x, w = x0.clone().requires_grad_(), norm.weight
        w.grad = None
        y = _RMSNorm.apply(x, w, 1e-5) if kernel else norm(x)
        y.backward(dy)
        return y.detach().float(), x.grad.float(), w.grad.float()

    ref, got = run(False), run(True)
    tol = {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 3e-2}
    for r, o in zip(ref, got):  # output, input gradient, weight gradient (full finetuning trains it)
        torch.testing.assert_close(o, r, **tol)
