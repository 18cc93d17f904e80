"""Exports (adapter, hf, gguf, ollama) with the train-to-serve parity check, the model card and push --dry-run.

The model is tiny and random but carries SmolLM2's real tokenizer, which llama.cpp's converter
recognises; it is trained a few steps with a system prompt and a test set, then registered.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import torch
from helpers import SQL_ROWS, cli, write_jsonl, write_yaml

from skilltune.registry.api import Registry

SYSTEM = "Answer with one SQLite query."


@pytest.fixture(scope="module")
def smol_tiny_run(tmp_path_factory):
    """A run of a tiny random Llama with SmolLM2's tokenizer (module-wide; each test registers it)."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from skilltune.config import load_config
    from skilltune.model.sources import resolve_model
    from skilltune.train.loop import train

    base = tmp_path_factory.mktemp("export")
    old = os.environ.get("SKILLTUNE_HOME")
    os.environ["SKILLTUNE_HOME"] = str(Path(os.environ.get("SKILLTUNE_TEST_CACHE",
                                                           Path.home() / ".cache" / "skilltune-tests")))
    try:
        smol = resolve_model("embedded:smollm2-135m-instruct").path
    finally:
        if old is not None:
            os.environ["SKILLTUNE_HOME"] = old
    tok = AutoTokenizer.from_pretrained(str(smol))
    tok.save_pretrained(base / "model")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, tie_word_embeddings=True)
    LlamaForCausalLM(cfg).save_pretrained(base / "model")
    data = write_jsonl(base / "train.jsonl", SQL_ROWS)
    test = write_jsonl(base / "test.jsonl", SQL_ROWS[:6])
    cfg_path = write_yaml(base / "c.yaml", {
        "model": {"base": str(base / "model")},
        "data": {"train": str(data), "test": str(test), "system_prompt": SYSTEM},
        "train": {"max_steps": 3, "batch_size": 4, "lr": 1e-2, "precision": "fp32", "output_dir": str(base / "runs")},
        "eval": {"metrics": ["exact_match"], "max_new_tokens": 8}})
    run = train(load_config(cfg_path), run_name="exp").run_dir
    code, out = cli("eval", str(run), "--no-forgetting")  # the model card's results
    assert code == 0, out
    return run


@pytest.fixture
def version(smol_tiny_run):
    Registry().add(smol_tiny_run, "exp")
    return "exp@v1"


def _exports(ref: str) -> dict:
    return Registry().get(ref).metrics["exports"]


def test_hf_export_has_a_card_passes_parity_and_is_recorded(version, tmp_path):
    code, out = cli("export", version, "--format", "hf", "--out", str(tmp_path / "hf"))
    assert code == 0, out
    assert "template parity: ok - 6/6" in out and "stop parity: ok" in out and "6/6 greedy answers identical" in out
    from huggingface_hub import ModelCard

    card = ModelCard.load(tmp_path / "hf" / "README.md")
    meta = card.data.to_dict()
    assert meta["license"] == "other" and "skilltune" in meta["tags"]
    results = meta["model-index"][0]["results"][0]
    assert results["dataset"]["name"].startswith("test.jsonl (6 held-out examples")
    assert [m["name"] for m in results["metrics"]] == ["exact_match (finetuned)", "exact_match (base model)"]
    assert SYSTEM in card.text and "sha256" in card.text
    shipped = json.loads((tmp_path / "hf" / "skilltune_export.json").read_text())
    assert shipped["from"] == "exp@v1" and "run" not in shipped  # no path of the training machine in the repo
    rec = _exports(version)["hf"]
    assert rec["ok"] is True and rec["checked"] and rec["out"] == str((tmp_path / "hf").resolve())
    assert rec["parity"]["template"]["identical"] == 6
    code, out = cli("registry", "show", version)
    assert code == 0 and "hf" in out and "parity ok" in out, out


def test_a_template_that_differs_from_training_fails_the_export_and_leaves_nothing(version, tmp_path, monkeypatch):
    from skilltune.export import build

    monkeypatch.setattr(build, "with_default_system", lambda template, system: template)  # forget the system prompt
    code, out = cli("export", version, "--format", "hf", "--out", str(tmp_path / "bad"))
    assert code == 1
    assert "template parity: FAILED - 0/6" in out and "first difference: prompt 1 (test line 1): token" in out
    assert "--force" in out and not (tmp_path / "bad").exists()
    assert _exports(version)["hf"]["ok"] is False and _exports(version)["hf"]["out"] is None
    code, out = cli("export", version, "--format", "hf", "--out", str(tmp_path / "bad"), "--force")
    assert code == 0 and (tmp_path / "bad" / "config.json").is_file()
    assert _exports(version)["hf"]["forced"] is True
    code, out = cli("checklist", version)
    assert "Exports behave as trained" in out and "FAIL" in out.split("Exports behave as trained")[1].split("\n")[0]


def test_gguf_export_loads_in_transformers_with_the_training_template_and_stop(version, tmp_path):
    from skilltune.export.gguf import read_info

    code, out = cli("export", version, "--format", "gguf", "--quant", "f32", "--out", str(tmp_path / "g"))
    assert code == 0, out
    assert "template parity: ok - 6/6" in out and "6/6 greedy answers identical" in out
    path = tmp_path / "g" / "exp-v1-f32.gguf"
    info = read_info(path)
    assert SYSTEM in info.chat_template  # the training system prompt is the file's default
    assert info.eos_id == 2  # <|im_end|>, the end-of-turn token training taught
    code, out = cli("export", version, "--format", "gguf", "--quant", "q8_0", "--out", str(tmp_path / "q8"))
    assert code == 0, out
    assert "exact_match within 1 points at q8_0" in out
    assert set(_exports(version)) == {"gguf:f32", "gguf:q8_0"}


def test_q4_k_m_without_llama_cpp_says_how_to_get_it(version, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "llama_cpp", None)  # as if the extra were not installed
    code, out = cli("export", version, "--format", "gguf", "--quant", "q4_k_m", "--out", str(tmp_path / "q4"))
    assert code == 1 and "llama-cpp-python" in out and "make llamacpp" in out
    assert not (tmp_path / "q4").exists()


def test_ollama_modelfile_renders_the_training_prompt(version, tmp_path):
    code, out = cli("export", version, "--format", "ollama", "--quant", "f16", "--out", str(tmp_path / "o"))
    assert code == 0, out
    assert "template parity: ok - 6/6" in out and "ollama create exp-v1 -f" in out
    text = (tmp_path / "o" / "Modelfile").read_text()
    assert "FROM ./exp-v1-f16.gguf" in text and 'PARAMETER stop "<|im_end|>"' in text
    assert f'SYSTEM """{SYSTEM}"""' in text


@pytest.mark.parametrize("family", ["llama", "smollm2", "mistral", "qwen2", "gemma3", "phi3"])
def test_modelfile_template_renders_what_the_family_template_renders(family, tmp_path):
    """Derived from each family's real chat template: Ollama's rendering equals the template's own."""
    from tiny import build_family_model
    from transformers import AutoTokenizer

    from skilltune.export import ollama
    from skilltune.model.families import FAMILIES

    tok = AutoTokenizer.from_pretrained(str(build_family_model(tmp_path / family, family)))
    tok.chat_template = FAMILIES[family].template_text()
    end = FAMILIES[family].end_of_turn
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "How many users?"}]
    want = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    for strip_bos in (False, True):
        mf = ollama.parse(ollama.derive(tok, "m.gguf", "Be brief.", end, strip_bos).text())
        expected = want[len(tok.bos_token):] if strip_bos and want.startswith(tok.bos_token) else want
        assert ollama.render(mf.template, mf.system, "How many users?") == expected
        assert mf.stops == [end] and mf.system == "Be brief."


def test_adapter_export_loads_and_carries_no_training_path(version, tmp_path):
    from skilltune.model.target import load_target

    code, out = cli("export", version, "--format", "adapter", "--out", str(tmp_path / "a"))
    assert code == 0 and "template parity: ok - 6/6" in out, out
    record = json.loads((tmp_path / "a" / "skilltune_adapter.json").read_text())
    assert "run" not in record and record["method"] == "lora"
    assert load_target(str(tmp_path / "a")).adapter_dir is not None


def test_push_dry_run_validates_without_the_network(version, tmp_path, monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    code, out = cli("push", version, "--repo", "acme/sql-demo", "--dry-run")
    assert code == 0, out
    assert "would upload" in out and "README.md" in out and "model.safetensors" in out and "private" in out
    assert "nothing was sent" in out
    code, out = cli("push", version, "--repo", "not a repo id", "--dry-run")
    assert code == 1 and "not a Hub repo id" in out
    code, out = cli("push", version, "--repo", "acme/sql-demo")
    assert code == 1 and "HF_TOKEN is not set" in out


def test_export_refuses_what_it_cannot_check(version, tmp_path):
    code, out = cli("export", version, "--format", "hf", "--out", str(tmp_path / "x"), "--test", str(tmp_path / "no"))
    assert code == 1 and "--no-check" in out and not (tmp_path / "x").exists()
    code, out = cli("export", version, "--format", "tar", "--out", str(tmp_path / "x"))
    assert code == 1 and "adapter, hf, gguf, ollama" in out
    code, out = cli("export", version, "--format", "hf", "--out", str(tmp_path / "x"), "--no-check")
    assert code == 0 and "recorded as unchecked" in out
    assert _exports(version)["hf"]["checked"] is False
    (tmp_path / "y").mkdir()
    (tmp_path / "y" / "keep.txt").write_text("mine")
    code, out = cli("export", version, "--out", str(tmp_path / "y"))
    assert code == 1 and "not an empty folder" in out and (tmp_path / "y" / "keep.txt").read_text() == "mine"


def _has_llama_cpp() -> bool:
    from skilltune.export import runtime

    return runtime.available()


@pytest.mark.slow
@pytest.mark.skipif(not _has_llama_cpp(), reason="llama-cpp-python is not installed (make llamacpp compiles it)")
def test_gguf_runs_in_llama_cpp_itself_with_the_training_ids(version, tmp_path):
    """llama.cpp's own tokenizer, given the prompt rendered from the file's template, yields the training ids."""
    code, out = cli("export", version, "--format", "ollama", "--quant", "q4_k_m", "--out", str(tmp_path / "o"))
    assert code == 0, out
    assert "llama.cpp: ok - its tokenizer gives the training ids for 6/6 prompts" in out
    runtime = _exports(version)["ollama:q4_k_m"]["parity"]["runtime"]
    assert runtime["template_identical"] == runtime["n"] == 6 and runtime["wall_s"] > 0


def test_a_system_prompt_a_modelfile_cannot_hold_is_refused_with_what_to_do(tmp_path):
    from tiny import build_tiny_model
    from transformers import AutoTokenizer

    from skilltune.export import ollama
    from skilltune.export.gguf import ExportError

    tok = AutoTokenizer.from_pretrained(str(build_tiny_model(tmp_path / "m")))
    for bad in ('Reply in triple quotes: """like this"""', "Fill {{ .Prompt }} in"):
        with pytest.raises(ExportError, match="cannot hold literally") as err:
            ollama.derive(tok, "m.gguf", bad, "<|im_end|>", strip_bos=False)
        assert "write the Modelfile by hand" in err.value.hint


def test_llama_cpp_is_not_given_the_bos_it_adds_itself(monkeypatch):
    """A file whose vocabulary adds BOS (Gemma): the prompt text llama.cpp tokenizes must not carry one too,
    or it would start with two (found on Gemma 3 270M's real weights, where llama.cpp warned of a double BOS)."""
    from types import SimpleNamespace

    from skilltune.export import parity, runtime

    seen = {}

    def fake_check(path, prompts, *rest):
        seen["prompts"] = prompts
        return {"ok": True}

    monkeypatch.setattr(runtime, "available", lambda: True)
    monkeypatch.setattr(runtime, "check", fake_check)
    target = parity.Target("gguf", "q8_0", lambda m: "", None, set(), gguf_path=Path("m.gguf"), runtime_adds="<bos>")
    ex = SimpleNamespace(completion="x")
    parity._runtime(target, ["<bos><start_of_turn>user\nhi", "no bos here"], [[1]], [SimpleNamespace(text="x")] * 2,
                    [ex, ex], None, {}, 4, None)
    assert seen["prompts"] == ["<start_of_turn>user\nhi", "no bos here"]


def test_a_gguf_tokenizer_transformers_cannot_read_needs_llama_cpp_or_no_check(version, tmp_path, monkeypatch):
    """As for Gemma 3's GGUF: transformers' reader fails on its tokenizer; llama.cpp must check the ids then."""
    from transformers import AutoTokenizer

    from skilltune.export import runtime

    real = AutoTokenizer.from_pretrained.__func__

    def from_pretrained(cls, *args, **kwargs):
        if kwargs.get("gguf_file"):
            raise Exception("Error while initializing BPE: Token `\n` out of vocabulary")
        return real(cls, *args, **kwargs)

    monkeypatch.setattr(AutoTokenizer, "from_pretrained", classmethod(from_pretrained))
    monkeypatch.setattr(runtime, "available", lambda: False)
    code, out = cli("export", version, "--format", "gguf", "--quant", "f16", "--out", str(tmp_path / "g"))
    assert code == 1 and "cannot read the tokenizer back" in out and "make llamacpp" in out
    assert not (tmp_path / "g").exists() and "Traceback" not in out
    code, out = cli("export", version, "--format", "gguf", "--quant", "f16", "--out", str(tmp_path / "g"), "--no-check")
    assert code == 0 and (tmp_path / "g" / "exp-v1-f16.gguf").is_file(), out
