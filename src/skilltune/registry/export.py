"""Export a registered version: the peft adapter as is, or LoRA merged into a plain HF model directory."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from skilltune.model.target import ADAPTER_META
from skilltune.paths import atomic_dir
from skilltune.registry.api import Registry, RegistryError


def export(registry: Registry, ref: str, out: Path, merged: bool) -> Path:
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise RegistryError(f"{out} exists and is not empty", hint="choose a new folder")
    src = registry.materialize(ref)
    meta = json.loads((src / ADAPTER_META).read_text())
    with atomic_dir(out) as tmp:
        if not merged or meta["method"] == "full":
            shutil.copytree(src, tmp, dirs_exist_ok=True)
        else:
            from peft import PeftModel
            from transformers import AutoTokenizer

            from skilltune.config.schema import ModelConfig
            from skilltune.model.loading import load_model

            base = load_model(ModelConfig(**meta["model"]), dtype=torch.float32).model
            model = PeftModel.from_pretrained(base, str(src)).merge_and_unload()
            tokenizer = AutoTokenizer.from_pretrained(str(src))
            model.generation_config.pad_token_id = tokenizer.pad_token_id
            model.generation_config.eos_token_id = tokenizer.eos_token_id
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            (tmp / "skilltune_export.json").write_text(json.dumps({"from": ref, "merged": True, **meta}, indent=2))
    return out
