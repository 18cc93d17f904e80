"""Offline generation in a running batch (model/decode.py) and the generation kernels (model/kernels.py).

The reference is transformers' own ``generate`` in static batches (``_generate_static``): greedy
answers must be the same tokens, whatever joins or leaves the batch around them.
"""

from __future__ import annotations

import pytest
import torch

SYSTEM = ("You answer questions about a small shop's database with one SQL query. Tables: users, products, "
          "orders. Be brief.")
QUESTIONS = ["How many users?", "List the products.", "Total amount of orders in March?", "Say hi.", "Say fox.",
             "Which region has the most users signed up last year, and how many of them ordered twice?", "Say no."]


def _load(path, dtype=torch.float32):
    from skilltune.model.target import load_target

    return load_target(str(path), dtype=dtype)


def _prompts(tok, system: str | None = SYSTEM) -> list[str]:
    head = [{"role": "system", "content": system}] if system else []
    return [tok.apply_chat_template(head + [{"role": "user", "content": q}], tokenize=False,
                                    add_generation_prompt=True) for q in QUESTIONS]


def _reference(model, tok, prompts, max_new_tokens):
    from skilltune.model.generate import _generate_static

    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    return _generate_static(model, tok, prompts, order, max_new_tokens, 64, 0.0, tok.eos_token_id, None, None, None)


def _count_forwards(model):
    """Record each forward's (rows, tokens, masked) of the model under ``model`` (a peft wrapper's base);
    the shared prefix's forward is the one without an attention mask."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    calls = []
    hook = base.register_forward_pre_hook(
        lambda m, a, k: calls.append((*k["input_ids"].shape, k.get("attention_mask") is not None)), with_kwargs=True)
    return calls, hook


@pytest.mark.parametrize("which", ["stopping", "random"])
def test_running_batch_answers_are_transformers_greedy_answers(stopping_run_dir, tiny_model_dir, which):
    """Seven prompts through three rows: rows leave as they stop and the next prompts take their place,
    all prompts' system prompt is prefilled once — and every answer is transformers' greedy answer."""
    from skilltune.model.decode import shared_prefix
    from skilltune.model.generate import generate

    target = _load(stopping_run_dir if which == "stopping" else tiny_model_dir)
    model, tok = target.model, target.tokenizer
    prompts = _prompts(tok)
    shared = shared_prefix([tok(p, add_special_tokens=False)["input_ids"] for p in prompts])
    assert shared and SYSTEM in tok.decode(shared)
    want = _reference(model, tok, prompts, 12)
    calls, hook = _count_forwards(model)
    try:
        done = []
        got = generate(model, tok, prompts, max_new_tokens=12, batch_size=3, progress=done.append)
    finally:
        hook.remove()
    for a, b in zip(want, got):
        assert (b.text, b.new_tokens, b.stopped) == (a.text, a.new_tokens, a.stopped)
    if which == "stopping":
        assert any(g.stopped for g in got)
    assert sum(done) == len(prompts)
    prefix = [c for c in calls if not c[2]]
    assert len(prefix) == 1 and prefix[0][:2] == (1, len(shared))  # the shared system prompt, once
    prefills = [c for c in calls if c[2] and c[1] > 1]
    assert len(prefills) >= 3 and max(c[0] for c in calls) <= 3  # refilled, never more than batch_size rows


def test_running_batch_grows_its_cache_past_the_spare_room(tiny_model_dir):
    """A random model never stops: 100 new tokens outgrow the cache's first allocation (64 spare columns)."""
    from skilltune.model.generate import generate

    target = _load(tiny_model_dir)
    prompts = _prompts(target.tokenizer)[:3]
    want = _reference(target.model, target.tokenizer, prompts, 100)
    got = generate(target.model, target.tokenizer, prompts, max_new_tokens=100, batch_size=2)
    assert [g.text for g in got] == [w.text for w in want] and all(g.new_tokens == 100 for g in got)


@pytest.mark.parametrize("family", ["qwen2", "qwen3", "phi3", "llama"])
def test_running_batch_matches_transformers_on_other_families(tmp_path, family):
    """Biases, q/k norms, fused projections: the same greedy tokens as transformers' generate."""
    from tiny import build_family_model

    from skilltune.model.decode import decode_refusal
    from skilltune.model.generate import generate

    target = _load(build_family_model(tmp_path / family, family))
    assert decode_refusal(target.model) is None
    prompts = _prompts(target.tokenizer)
    want = _reference(target.model, target.tokenizer, prompts, 8)
    got = generate(target.model, target.tokenizer, prompts, max_new_tokens=8, batch_size=4)
    assert [g.text for g in got] == [w.text for w in want]


@pytest.mark.parametrize("family", ["gemma3", "gemma2"])
def test_sliding_window_models_run_in_the_batch_while_rows_fit_the_window(tmp_path, family):
    """A window no prompt and its budget can outgrow drops no key: the running batch (every key kept) gives
    transformers' answers on Gemma 3 (sliding and full layers) and Gemma 2 (soft-capping too)."""
    from tiny import build_family_model

    from skilltune.model.decode import decode_refusal
    from skilltune.model.generate import generate

    target = _load(build_family_model(tmp_path / family, family))
    target.model.config.sliding_window = 256
    prompts = _prompts(target.tokenizer)
    longest = max(len(target.tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts) + 8
    assert decode_refusal(target.model, longest) is None and decode_refusal(target.model, 300) is not None
    want = _reference(target.model, target.tokenizer, prompts, 8)
    calls, hook = _count_forwards(target.model)
    try:
        got = generate(target.model, target.tokenizer, prompts, max_new_tokens=8, batch_size=3)
    finally:
        hook.remove()
    assert [g.text for g in got] == [w.text for w in want]
    assert any(not c[2] for c in calls)  # the running batch's shared-prefix forward ran


def test_sliding_window_models_keep_transformers_generate(tmp_path):
    """Gemma 3's sliding-window layers (window 8 here) would drop keys: generation stays in static batches."""
    from tiny import build_family_model

    from skilltune.model.decode import decode_refusal
    from skilltune.model.generate import generate

    target = _load(build_family_model(tmp_path / "gemma3", "gemma3"))
    assert "sliding_attention" in decode_refusal(target.model)
    assert "exceed the 8-token window" in decode_refusal(target.model, 40)
    calls, hook = _count_forwards(target.model)
    try:
        got = generate(target.model, target.tokenizer, _prompts(target.tokenizer)[:2], max_new_tokens=4)
    finally:
        hook.remove()
    assert len(got) == 2 and all(c[2] for c in calls)  # no separate prefix forward


def test_rows_cut_by_the_caller_and_streamed_tokens(tiny_model_dir):
    """``stop_rows`` ends one prompt after 3 steps (its answer so far, not stopped); ``on_step`` receives
    every row's tokens, which decode to its answer."""
    from skilltune.model.generate import generate

    target = _load(tiny_model_dir)
    tok = target.tokenizer
    prompts = _prompts(tok)[:4]
    full = generate(target.model, tok, prompts, max_new_tokens=10, batch_size=4)
    steps = {"n": 0}
    streamed: dict[int, list[int]] = {}

    def stop_rows(idx):
        steps["n"] += 1
        return [i == 2 and steps["n"] > 3 for i in idx]

    def on_step(idx, tokens):
        for i, t in zip(idx, tokens):
            streamed.setdefault(i, []).append(t)

    got = generate(target.model, tok, prompts, max_new_tokens=10, batch_size=4, stop_rows=stop_rows, on_step=on_step)
    assert got[2].new_tokens < 10 and not got[2].stopped
    assert full[2].text.startswith(got[2].text)
    for i in (0, 1, 3):
        assert got[i].text == full[i].text
        assert tok.decode(streamed[i], skip_special_tokens=True) == got[i].text


def test_sampling_stays_within_its_budget(tiny_model_dir):
    from skilltune.model.generate import generate

    target = _load(tiny_model_dir)
    torch.manual_seed(0)
    got = generate(target.model, target.tokenizer, _prompts(target.tokenizer), max_new_tokens=6, batch_size=3,
                   temperature=0.9)
    assert len(got) == len(QUESTIONS) and all(0 < g.new_tokens <= 6 for g in got)


def test_shared_prefix_leaves_every_prompt_a_token_of_its_own():
    from skilltune.model.decode import shared_prefix

    assert shared_prefix([list(range(40)) + [1], list(range(40)) + [2, 3]], min_tokens=16) == list(range(40))
    assert shared_prefix([list(range(20)), list(range(20))], min_tokens=16) == list(range(19))  # identical prompts
    assert shared_prefix([list(range(10)) + [1], list(range(10)) + [2]], min_tokens=16) is None  # too short
    assert shared_prefix([[5] + list(range(30)), list(range(30))]) is None
    assert shared_prefix([]) is None


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_prepacked_linears_compute_what_linear_does(dtype):
    """Equal to the bit in bf16 (oneDNN does both), to fp32 rounding in fp32; with gradients on, or after the
    context, the module's own forward runs."""
    from skilltune.model.kernels import generation_kernels

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(48, 96), torch.nn.ReLU(), torch.nn.Linear(96, 32, bias=False)).to(dtype)
    x = torch.randn(5, 7, 48, dtype=dtype)
    with torch.no_grad():
        want = model(x)
    with generation_kernels(model):
        assert "forward" in model[0].__dict__ and "forward" in model[2].__dict__
        with torch.no_grad():
            got = model(x)
        y = model(x.requires_grad_())  # a gradient is wanted: the stock path, differentiable
        y.sum().backward()
        assert x.grad is not None
    assert "forward" not in model[0].__dict__
    if dtype == torch.bfloat16:
        assert torch.equal(got, want)
    else:
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_prepacked_linears_step_aside_without_memory_for_the_copy(monkeypatch):
    from skilltune.model import kernels

    model = torch.nn.Sequential(torch.nn.Linear(64, 64))
    monkeypatch.setattr(kernels, "_available_bytes", lambda: 1000)  # the copy (16 kB) needs 2x this
    counts, undo = kernels.install_kernels(model, kernels.GENERATION_KERNELS)
    assert counts == {} and "forward" not in model[0].__dict__
    monkeypatch.setattr(kernels, "_available_bytes", lambda: 10**9)
    counts, undo = kernels.install_kernels(model, kernels.GENERATION_KERNELS)
    assert counts == {"prepacked_linear": 1}
    undo()
    assert "forward" not in model[0].__dict__


def test_inference_precision_is_validated_and_resolved(monkeypatch):
    from pydantic import ValidationError

    from skilltune.config.schema import EvalConfig, ServeConfig
    from skilltune.train import precision

    with pytest.raises(ValidationError, match="precision"):
        EvalConfig(precision="fp16")
    assert ServeConfig().precision == "auto" and EvalConfig().precision == "auto"
    monkeypatch.setattr(precision, "cpu_has_fast_bf16", lambda: False)
    assert precision.inference_dtype("auto") == ("fp32", torch.float32)
    monkeypatch.setattr(precision, "cpu_has_fast_bf16", lambda: True)
    assert precision.inference_dtype("auto") == ("bf16", torch.bfloat16)
    assert precision.inference_dtype("fp32") == ("fp32", torch.float32)


def _row(**request):
    """A decoding row as ``_choose`` reads it: its request, no grammar, no seeded stream, no answer yet."""
    from types import SimpleNamespace

    return SimpleNamespace(request=SimpleNamespace(shaping=None, **request), matcher=None, rng=None, tokens=[])


def test_bf16_greedy_choice_is_the_first_maximum():
    """The argmax over bf16 logits runs in fp32 (4x faster on a CPU): the same index, ties to the first."""
    from skilltune.model.decode import _choose

    greedy = [_row(temperature=0.0, top_p=None)] * 2
    logits = torch.tensor([[0.5, 2.0, 2.0, -1.0], [3.0, 1.0, 3.0, 3.0]], dtype=torch.bfloat16)
    assert _choose(logits, greedy, None).tolist() == [1, 0] == logits.argmax(-1).tolist()


def test_each_rows_top_p_is_its_own():
    """A row's top-p replaces the model's for that row only: a nucleus of one token is the argmax however hot."""
    from types import SimpleNamespace

    from skilltune.model.decode import _choose

    torch.manual_seed(0)
    logits = torch.tensor([[1.0, 1.2, 0.9, 1.1]] * 2)
    model = SimpleNamespace(generation_config=SimpleNamespace(top_k=None, top_p=1.0))
    rows = [_row(temperature=5.0, top_p=1e-6), _row(temperature=5.0, top_p=None)]
    picks = torch.stack([_choose(logits, rows, model) for _ in range(200)])
    assert set(picks[:, 0].tolist()) == {1}  # the nucleus: the most likely token alone
    assert len(set(picks[:, 1].tolist())) == 4  # the model's top-p of 1.0: any of the four
