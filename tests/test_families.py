"""The compatibility matrix (issue #17): one tiny random model per family, with the family's real structure
(biases, q/k norms, soft-capping, sliding windows, fused projections) and special tokens, through the same
contract: train (LoRA, DoRA, full), CPU kernels equal to the stock path or stepping aside with a reason,
shared prefixes exact or refused with a reason, the family's chat template and end-of-turn token, merge equal
to adapter-on, checkpoint and resume, then eval, registry, serve and export."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from helpers import SQL_ROWS, write_jsonl, write_yaml
from safetensors.torch import load_file
from tiny import FAMILY_TOKENS, build_family_model
from transformers import AutoConfig

from skilltune.config import load_config
from skilltune.model.decode import decode_refusal
from skilltune.model.families import FAMILIES
from skilltune.registry.api import Registry
from skilltune.train.loop import TrainingInterrupted, train

SYSTEM = "You write one SQLite query for the question."


def _losses(run) -> list[float]:
    return [json.loads(x)["train_loss"] for x in open(run / "metrics.jsonl") if "train_loss" in json.loads(x)]


def _cfg(tmp_path, model_dir, name, **train_kw):
    data = write_jsonl(tmp_path / "train.jsonl", SQL_ROWS)
    test = write_jsonl(tmp_path / "test.jsonl", SQL_ROWS[:3])
    train_cfg = {"max_steps": 3, "batch_size": 4, "precision": "fp32", "lr": 1e-3, "save_steps": 1,
                 "output_dir": str(tmp_path / "runs"), "max_seq_len": 256, **train_kw}
    return load_config(write_yaml(tmp_path / f"{name}.yaml", {
        "model": {"base": str(model_dir)}, "data": {"train": str(data), "test": str(test), "val_split": 0,
                                                    "system_prompt": SYSTEM},
        "train": train_cfg, "eval": {"max_new_tokens": 4}}))


def _run(tmp_path, model_dir, name, adapter=None, **train_kw):
    cfg = _cfg(tmp_path, model_dir, name, **train_kw)
    if adapter:
        cfg.adapter.method = adapter
    return train(cfg, run_name=name)


@pytest.mark.parametrize("family", list(FAMILY_TOKENS))
def test_family_contract(family, tmp_path):
    from skilltune.config.schema import ModelConfig
    from skilltune.data.tokenize import encode_example
    from skilltune.data.types import Example, Turn
    from skilltune.model.loading import load_tokenizer
    from skilltune.model.tokenizer import turn_end_token

    model_dir = build_family_model(tmp_path / "model", family)

    # -- the family's chat template, end-of-turn token and label mask
    tokenizer, info, _ = load_tokenizer(ModelConfig(base=str(model_dir)))
    fam = FAMILIES[family]
    if family == "smollm2":  # model_type llama, ChatML tokens: ChatML, nothing added
        assert info.chat_template_source == "chatml" and info.added_tokens == []
    else:
        assert info.chat_template_source == f"family:{family}" and info.added_tokens == []
        assert turn_end_token(tokenizer) == fam.end_of_turn
    end = turn_end_token(tokenizer)
    assert info.eos_token == end  # generation stops where training ends a turn
    enc = encode_example(tokenizer, Example([Turn("system", SYSTEM), Turn("user", "Count the orders."),
                                             Turn("assistant", "SELECT COUNT(*) FROM orders;", True)]), end)
    trained = [t for t, lab in zip(enc.input_ids, enc.labels) if lab != -100]
    assert tokenizer.decode(trained).strip() == "SELECT COUNT(*) FROM orders;" + end  # exactly the answer + end

    # -- LoRA: the CPU kernels and the shared-prefix layout give the stock path's loss, or step aside with a reason
    stock = _run(tmp_path, model_dir, "stock", kernels=False, share_prefix=False)
    fast = _run(tmp_path, model_dir, "fast", kernels=True, share_prefix=True)
    run_json = json.loads((fast.run_dir / "run.json").read_text())
    assert _losses(fast.run_dir) == pytest.approx(_losses(stock.run_dir), abs=1e-5), (family, run_json["kernels"])
    assert sorted(run_json["kernels"]) == sorted(fam.kernels)  # what `skilltune models families` prints
    config = SimpleNamespace(config=AutoConfig.from_pretrained(model_dir))  # what the running batch reads
    if fam.sliding_window:
        assert not run_json["share_prefix"]  # refused: sliding-window layers would cut a shared prefix
        assert decode_refusal(config, 10_000) and decode_refusal(config, config.config.sliding_window) is None
    else:
        assert run_json["share_prefix"] in ("packed", "cache") and decode_refusal(config, 10_000) is None

    # -- DoRA and full finetuning train too
    for method in ("dora", "full"):
        res = _run(tmp_path, model_dir, method, adapter=method)
        assert all(x == x and x < 50 for x in _losses(res.run_dir)), method

    # -- checkpoint, interrupt, resume: the same adapter as the uninterrupted run
    with pytest.raises(TrainingInterrupted):
        train(_cfg(tmp_path, model_dir, "fast", kernels=True, share_prefix=True), run_name="cut", stop_after=2)
    [cut] = (tmp_path / "runs").glob("cut-*")
    resumed = train(_cfg(tmp_path, model_dir, "fast", kernels=True, share_prefix=True), run_name="cut", resume=True,
                    run_dir=cut)
    a = load_file(str(fast.artifact_dir / "adapter_model.safetensors"))
    b = load_file(str(resumed.artifact_dir / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)

    # -- merge gives the adapter's logits
    from skilltune.model.target import load_target

    target = load_target(str(fast.run_dir))
    assert target.model.generation_config.eos_token_id == tokenizer.convert_tokens_to_ids(end)
    ids = target.tokenizer("SELECT name FROM users", return_tensors="pt").input_ids
    with torch.no_grad():
        on = target.model(ids).logits
        merged = target.model.merge_and_unload()(ids).logits
    assert torch.allclose(on, merged, atol=1e-4)

    # -- eval, registry, serve, export
    from fastapi.testclient import TestClient

    from skilltune.config.schema import ServeConfig
    from skilltune.evaluate.runner import evaluate, plan_eval
    from skilltune.export.build import ExportRequest, export
    from skilltune.serve.app import create_app
    from skilltune.serve.server import build_state

    results = evaluate(plan_eval(str(fast.run_dir), None, None, ["exact_match"], None, forgetting=False),
                       tmp_path / "eval")
    assert results["n_examples"] == 3 and "exact_match" in results["metrics"]
    reg = Registry()
    reg.add(fast.run_dir, family)
    state = build_state(f"{family}@v1", ServeConfig(max_tokens_limit=8), None, reg)
    try:
        r = TestClient(create_app(state)).post("/v1/chat/completions", json={
            "model": family, "max_tokens": 4, "messages": [{"role": "user", "content": "Count the orders."}]})
        assert r.status_code == 200 and r.json()["model"] == f"{family}@v1"
    finally:
        state.stop()
    out = export(reg, ExportRequest(f"{family}@v1", tmp_path / "merged", "hf", check=False)).out
    from transformers import AutoModelForCausalLM

    exported = AutoModelForCausalLM.from_pretrained(str(out))
    with torch.no_grad():
        assert torch.allclose(exported(ids).logits, merged, atol=1e-4)


def test_models_families_prints_the_matrix():
    from helpers import cli

    code, out = cli("models", "families")
    assert code == 0
    for family in FAMILY_TOKENS:
        assert family in out
    assert "<end_of_turn>" in out and "Gemma 3 270M" in out and "contract" in out
    code, out = cli("models", "families", "--json")
    rows = {r["family"]: r for r in json.loads(out)}
    assert code == 0 and rows.keys() == FAMILIES.keys()
    assert rows["gemma2"]["kernels"] == ["lora_linear"] and rows["gemma2"]["shared_prefix"].startswith("refused")
    assert "(1 + weight)" in rows["gemma3"]["kernels_step_aside"]["rms_norm"]  # each stepping aside says why
    assert rows["llama"]["kernels_step_aside"] == {} and rows["llama"]["running_batch"] == "yes"


@pytest.mark.parametrize("family", list(FAMILY_TOKENS))
def test_the_plain_template_ends_answers_with_the_models_own_eos_and_adds_nothing(tmp_path, family):
    """`model.chat_template: plain` (base models): no control tokens, the answer and the family's EOS trained."""
    from skilltune.config.schema import ModelConfig
    from skilltune.data.tokenize import encode_example
    from skilltune.data.types import Example, Turn
    from skilltune.model.loading import load_tokenizer
    from skilltune.model.tokenizer import render_prompt, turn_end_token

    bos, eos, _ = FAMILY_TOKENS[family]
    model_dir = build_family_model(tmp_path / "model", family)
    tokenizer, info, _ = load_tokenizer(ModelConfig(base=str(model_dir), chat_template="plain"))
    assert info.chat_template_source == "builtin:plain" and info.added_tokens == []
    assert info.eos_token == eos == turn_end_token(tokenizer) and info.pad_token != eos
    assert render_prompt(tokenizer, "Count the orders.", SYSTEM) == f"{bos}{SYSTEM}\n\nQuestion: Count the orders.\nAnswer:\n"
    enc = encode_example(tokenizer, Example([Turn("system", SYSTEM), Turn("user", "Count the orders."),
                                             Turn("assistant", "SELECT COUNT(*) FROM orders;", True)]), eos)
    trained = [t for t, lab in zip(enc.input_ids, enc.labels) if lab != -100]
    assert tokenizer.decode(trained).strip() == "SELECT COUNT(*) FROM orders;" + eos


def test_an_embedded_model_brings_its_own_default_template(tmp_path):
    """An embedded model may name the template its runs use when the config names none (Gemma 3 270M, a base
    model: plain); the config's choice still wins, and other sources keep the general rule."""
    from skilltune.config.schema import ModelConfig
    from skilltune.model.loading import load_tokenizer
    from skilltune.model.sources import EMBEDDED, EmbeddedModel, ResolvedModel, default_template

    assert EMBEDDED["gemma3-270m"].chat_template == "plain" and EMBEDDED["smollm2-135m-instruct"].chat_template is None
    gemma = build_family_model(tmp_path / "gemma", "gemma3")
    EMBEDDED["base-under-test"] = EmbeddedModel("base-under-test", "none", "none.gguf", "a test", "none",
                                                chat_template="plain")
    try:
        source = ResolvedModel("embedded:base-under-test", "embedded", gemma)
        assert default_template(source) == "plain"
        _, info, _ = load_tokenizer(ModelConfig(base="embedded:base-under-test"), source)
        assert info.chat_template_source == "builtin:plain" and info.added_tokens == []
        _, info, _ = load_tokenizer(ModelConfig(base="embedded:base-under-test", chat_template="family"), source)
        assert info.chat_template_source == "builtin:family" and info.eos_token == "<end_of_turn>"
    finally:
        del EMBEDDED["base-under-test"]
    local = ResolvedModel(str(gemma), "local", gemma)
    assert default_template(local) is None
    _, info, _ = load_tokenizer(ModelConfig(base=str(gemma)), local)
    assert info.chat_template_source == "family:gemma3"


def test_built_in_templates_say_what_they_need(tmp_path):
    from skilltune.config.schema import ModelConfig
    from skilltune.errors import ModelLoadError
    from skilltune.model.loading import load_tokenizer

    llama = build_family_model(tmp_path / "llama", "llama")
    _, info, _ = load_tokenizer(ModelConfig(base=str(llama), chat_template="family"))
    assert info.chat_template_source == "builtin:family" and info.eos_token == "<|eot_id|>"
    _, info, _ = load_tokenizer(ModelConfig(base=str(llama), chat_template="chatml"))
    assert info.added_tokens == ["<|im_start|>", "<|im_end|>"]  # added, and said (a warning, the plan)
    mistral = build_family_model(tmp_path / "mistral", "mistral")
    (mistral / "config.json").write_text(json.dumps({**json.loads((mistral / "config.json").read_text()),
                                                     "model_type": "gemma3_text"}))
    with pytest.raises(ModelLoadError, match="the gemma3 template needs <start_of_turn>, <end_of_turn>"):
        load_tokenizer(ModelConfig(base=str(mistral), chat_template="family"))
