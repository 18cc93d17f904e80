"""Export a registered version: the peft adapter as is, or LoRA merged into a plain HF model directory.

Both start from the registry's verified checkout (never a run directory); the merge
loads the base the registry's lineage names, checked against its recorded hash.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from skilltune.model.target import ADAPTER_META, load_target, read_adapter_meta
from skilltune.paths import atomic_dir
from skilltune.progress import SILENT, Stages
from skilltune.model.tokenizer import with_default_system
from skilltune.registry.api import Registry, RegistryError, version_system_prompt


def export(registry: Registry, ref: str, out: Path, merged: bool, trust_remote_code: bool = False,
           stages: Stages = SILENT) -> Path:
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise RegistryError(f"{out} exists and is not empty", hint="choose a new folder")
    with stages.stage(f"verifying {ref} from the registry store"):
        co = registry.checkout(ref, trust_remote_code)
    v, src = co.version, co.path
    meta = read_adapter_meta(src)
    system = version_system_prompt(v)
    with atomic_dir(out) as tmp:
        if not merged or meta.method == "full":
            shutil.copytree(src, tmp, dirs_exist_ok=True)
            if system:
                from transformers import AutoTokenizer

                tokenizer = AutoTokenizer.from_pretrained(str(tmp), trust_remote_code=False)
                tokenizer.chat_template = with_default_system(tokenizer.chat_template, system)
                tokenizer.save_pretrained(tmp)
        else:
            with stages.stage("loading the base model and merging the adapter into it"):
                target = load_target(str(src), torch.float32, co.policy)
                model = target.model.merge_and_unload()
            tokenizer = target.tokenizer
            if system:  # vLLM, TGI and transformers then ask the way training did
                tokenizer.chat_template = with_default_system(tokenizer.chat_template, system)
            model.generation_config.pad_token_id = tokenizer.pad_token_id
            model.generation_config.eos_token_id = tokenizer.eos_token_id
            with stages.stage(f"writing the merged model to {out}"):
                model.save_pretrained(tmp)
                tokenizer.save_pretrained(tmp)
            record = json.loads((src / ADAPTER_META).read_text())
            (tmp / "skilltune_export.json").write_text(json.dumps({"from": co.ref, "merged": True,
                                                                  **record, "system_prompt": system}, indent=2))
    return out
