"""Load what a user points at for inference: a base model, an adapter directory or a run directory.

An adapter directory carries the tokenizer and chat template it was trained with,
and ``skilltune_adapter.json`` naming its base model; both are used as they are,
so inference formats prompts exactly as training did.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from skilltune.config.schema import ModelConfig
from skilltune.errors import ModelLoadError

ADAPTER_META = "skilltune_adapter.json"


@dataclass
class Target:
    model: torch.nn.Module
    tokenizer: object
    label: str  # shown in reports: "base" spec or adapter path
    base_spec: str
    adapter_dir: Path | None


def find_artifact(path: Path) -> Path | None:
    """The adapter/model directory inside a run directory, or ``path`` itself if it is one."""
    if (path / ADAPTER_META).is_file():
        return path
    for sub in ("adapter", "model"):
        if (path / sub / ADAPTER_META).is_file():
            return path / sub
    return None


def load_target(spec: str, dtype: torch.dtype = torch.float32) -> Target:
    """Load a base model spec, a run directory or an adapter/full-model directory."""
    from skilltune.model.loading import load_model

    path = Path(spec)
    artifact = find_artifact(path) if path.is_dir() else None
    if artifact is None:
        if path.is_dir() and (path / "run.json").is_file():
            raise ModelLoadError(f"run {path} has no finished adapter or model yet (still training, or interrupted)",
                                 hint=f"wait for it to finish, or continue it: skilltune train CONFIG --resume "
                                      f"--run-dir {path}")
        if path.is_dir() and (path / "adapter_config.json").is_file():
            raise ModelLoadError(f"{path} is a peft adapter without {ADAPTER_META}",
                                 hint="use an adapter written by `skilltune train`, or load it with peft directly")
        loaded = load_model(ModelConfig(base=spec), dtype=dtype)
        return Target(loaded.model, loaded.tokenizer, "base", spec, None)
    meta = json.loads((artifact / ADAPTER_META).read_text())
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(artifact))
    tokenizer.padding_side = "right"
    if meta["method"] == "full":
        model = AutoModelForCausalLM.from_pretrained(str(artifact), dtype=dtype, use_safetensors=True)
    else:
        from peft import PeftModel

        base = load_model(ModelConfig(**meta["model"]), dtype=dtype).model
        if len(tokenizer) != base.get_input_embeddings().weight.shape[0]:
            base.resize_token_embeddings(len(tokenizer))
        model = PeftModel.from_pretrained(base, str(artifact))
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.eval()
    return Target(model, tokenizer, "tuned", meta["model"]["base"], artifact)
