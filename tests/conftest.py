"""Shared fixtures: isolated skilltune home, tiny local models, the embedded SmolLM2."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from tiny import build_tiny_model  # noqa: E402

# The embedded model's converted cache is shared across the session (conversion takes ~20 s).
_SHARED_HOME = Path(os.environ.get("SKILLTUNE_TEST_CACHE", Path.home() / ".cache" / "skilltune-tests"))


@pytest.fixture(autouse=True)
def isolated_home(tmp_path, monkeypatch):
    """Every test gets its own skilltune home, with the converted model cache shared."""
    home = tmp_path / "skilltune-home"
    (home).mkdir()
    shared_models = _SHARED_HOME / "models"
    shared_models.mkdir(parents=True, exist_ok=True)
    (home / "models").symlink_to(shared_models, target_is_directory=True)
    monkeypatch.setenv("SKILLTUNE_HOME", str(home))
    return home


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="session")
def tiny_base_model_dir(tmp_path_factory) -> Path:
    """A tiny 'base' model whose tokenizer has no chat template."""
    return build_tiny_model(tmp_path_factory.mktemp("tinybase") / "model", chat_template=None)


@pytest.fixture(scope="session")
def embedded_model():
    """The real embedded SmolLM2, loaded once per session (from the converted cache)."""
    from skilltune.config.schema import ModelConfig
    from skilltune.model.loading import load_model

    old = os.environ.get("SKILLTUNE_HOME")
    os.environ["SKILLTUNE_HOME"] = str(_SHARED_HOME)
    try:
        return load_model(ModelConfig())
    finally:
        if old is not None:
            os.environ["SKILLTUNE_HOME"] = old


@pytest.fixture(scope="session")
def stopping_run_dir(tmp_path_factory, tiny_model_dir):
    """A tiny model fully finetuned to give one-word answers and stop (a run directory)."""
    from helpers import write_jsonl, write_yaml

    from skilltune.config import load_config
    from skilltune.train.loop import train

    base = tmp_path_factory.mktemp("stopper")
    rows = [{"prompt": f"Say {w}.", "completion": w} for w in ("hi", "yes", "no", "ok", "fox", "dog")] * 4
    data = write_jsonl(base / "train.jsonl", rows)
    cfg = write_yaml(base / "c.yaml", {"model": {"base": str(tiny_model_dir)},
                                       "data": {"train": str(data), "val_split": 0},
                                       "adapter": {"method": "full"},
                                       "train": {"epochs": 15, "lr": 1e-2, "batch_size": 4, "precision": "fp32",
                                                 "output_dir": str(base / "runs")}})
    return train(load_config(cfg), run_name="stopper").run_dir
