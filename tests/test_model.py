import os
import signal
import subprocess
import sys
import time

import pytest
from helpers import cli

from skilltune.config.schema import ModelConfig
from skilltune.errors import ModelLoadError
from skilltune.model.loading import load_model
from skilltune.model.sources import resolve_model
from skilltune.model.tokenizer import CHATML_TEMPLATE


def test_tiny_model_pad_is_not_eos_and_template_recorded(tiny_model_dir):
    lm = load_model(ModelConfig(base=str(tiny_model_dir)))
    assert lm.info.pad_token_id != lm.info.eos_token_id
    assert lm.tokenizer.pad_token_id == lm.model.config.pad_token_id
    assert lm.info.chat_template_source == "model"
    assert lm.info.eos_token == "<|im_end|>"


def test_base_model_without_template_gets_chatml(tiny_base_model_dir):
    lm = load_model(ModelConfig(base=str(tiny_base_model_dir)))
    assert lm.info.chat_template_source == "chatml"
    assert lm.tokenizer.chat_template == CHATML_TEMPLATE
    assert lm.info.pad_token_id != lm.info.eos_token_id


def test_uncached_hub_id_fails_fast_with_what_to_do(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)  # must not hang even when online is allowed
    t0 = time.time()
    with pytest.raises(ModelLoadError) as err:
        resolve_model("some-org/not-a-cached-model")
    assert time.time() - t0 < 10
    msg = str(err.value)
    assert "not in the local Hugging Face cache" in msg and "never downloads" in msg
    assert "embedded:smollm2-135m-instruct" in msg


def test_missing_local_dir_and_gguf(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelLoadError, match="no config.json"):
        resolve_model(str(tmp_path / "empty"))
    with pytest.raises(ModelLoadError, match="GGUF file not found"):
        resolve_model(str(tmp_path / "nope.gguf"))


def test_pickle_weights_refused_unless_allowed(tiny_model_dir, tmp_path):
    import shutil

    import torch
    from safetensors.torch import load_file

    pickled = tmp_path / "pickled"
    shutil.copytree(tiny_model_dir, pickled)
    state = load_file(str(pickled / "model.safetensors"))
    (pickled / "model.safetensors").unlink()
    torch.save(state, pickled / "pytorch_model.bin")
    with pytest.raises(ModelLoadError, match="safetensors"):
        load_model(ModelConfig(base=str(pickled)))
    lm = load_model(ModelConfig(base=str(pickled), allow_pickle=True))
    assert lm.model is not None


def test_remote_code_off_by_default():
    assert ModelConfig().trust_remote_code is False
    assert ModelConfig().allow_pickle is False


@pytest.mark.slow
def test_embedded_conversion_is_atomic_under_sigkill(tmp_path):
    """Kill the GGUF conversion half-way: no half cache; the next run rebuilds cleanly."""
    home = tmp_path / "fresh-home"
    env = {**os.environ, "SKILLTUNE_HOME": str(home)}
    code = "from skilltune.model.sources import resolve_model; resolve_model('embedded:smollm2-135m-instruct')"
    proc = subprocess.Popen([sys.executable, "-c", code], env=env)
    models = home / "models"
    deadline = time.time() + 120
    while time.time() < deadline and not list(models.glob(".tmp-*")):
        time.sleep(0.2)
    assert list(models.glob(".tmp-*")), "conversion never started"
    time.sleep(1.0)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    finished = [p for p in models.iterdir() if not p.name.startswith(".tmp-")]
    assert finished == [], f"a half-written cache entry was left: {finished}"
    # The next run cleans the leftover and builds a complete entry.
    os.environ["SKILLTUNE_HOME"] = str(home)
    resolved = resolve_model("embedded:smollm2-135m-instruct")
    assert (resolved.path / "skilltune.json").is_file() and (resolved.path / "model.safetensors").is_file()
    assert not list(models.glob(".tmp-*"))
    import json

    assert "quantization_config" not in json.loads((resolved.path / "config.json").read_text())


@pytest.mark.slow
def test_embedded_model_answers(embedded_model):
    from skilltune.model.generate import generate

    tok = embedded_model.tokenizer
    assert embedded_model.info.pad_token_id != embedded_model.info.eos_token_id
    assert embedded_model.info.chat_template_source == "model"
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                     tokenize=False, add_generation_prompt=True)
    out = generate(embedded_model.model, tok, [prompt], max_new_tokens=20)[0]
    assert "Paris" in out.text


@pytest.mark.slow
def test_models_info_cli_on_embedded(monkeypatch):
    from conftest import _SHARED_HOME

    monkeypatch.setenv("SKILLTUNE_HOME", str(_SHARED_HOME))
    code, out = cli("models", "info", "embedded:smollm2-135m-instruct")
    assert code == 0, out
    assert "LlamaForCausalLM" in out and "134.5 M" in out and "8192" in out and "<|im_start|>" in out
    code, out = cli("models", "list")
    assert code == 0 and "embedded:smollm2-135m-instruct" in out and "cached" in out


@pytest.mark.parametrize("args,needle", [
    (["--help"], "Start with: skilltune demo"), (["config", "--help"], "Example: skilltune config validate"),
    (["models", "--help"], "Example: skilltune models"), (["train", "--help"], "Example: skilltune train"),
    (["eval", "--help"], "Example: skilltune eval"), (["serve", "--help"], "Example:"),
])
def test_cli_help_has_examples(args, needle):
    code, out = cli(*args)
    assert code == 0 and needle in " ".join(out.split())


def test_models_info_of_a_folder_whose_config_is_not_json_is_a_message(tmp_path):
    (tmp_path / "config.json").write_text("{")
    code, out = cli("models", "info", str(tmp_path))
    assert code == 1 and "is not a valid JSON file" in out and "Traceback" not in out, out
