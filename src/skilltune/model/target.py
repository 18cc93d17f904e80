"""Load what a user points at for inference: a base model, an adapter directory or a run directory.

An adapter directory carries the tokenizer and chat template it was trained with,
and ``skilltune_adapter.json`` naming its base model and that base's hash; both are
used as they are, so inference formats prompts exactly as training did.

An adapter is data someone else may have prepared, so what could run code is never
taken from it: ``trust_remote_code`` and ``allow_pickle`` come only from the operator
(:class:`LoadPolicy`, i.e. command-line flags), the weights load from safetensors only,
and the base model it names is loaded only if its files hash to what the adapter (or
the registry's lineage) recorded — a different or corrupted base is refused.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from skilltune.config.schema import ModelConfig
from skilltune.errors import ModelLoadError, SkilltuneError

ADAPTER_META = "skilltune_adapter.json"


@dataclass
class Target:
    model: torch.nn.Module
    tokenizer: object
    label: str  # shown in reports: "base" spec or adapter path
    base_spec: str
    adapter_dir: Path | None


@dataclass(frozen=True)
class LoadPolicy:
    """What the operator decides about loading; never read from an artifact.

    Attributes:
        base: load this base model instead of the one the adapter names (its hash is still checked).
        base_hash: the hash the base must have (the registry's lineage); default: the adapter's record.
        trust_remote_code: run modelling code shipped with the base model.
        allow_pickle: accept pickle (.bin) weights for the base model.
    """

    base: str | None = None
    base_hash: str | None = None
    trust_remote_code: bool = False
    allow_pickle: bool = False


@dataclass(frozen=True)
class AdapterMeta:
    """The validated content of ``skilltune_adapter.json``."""

    method: str
    base: str
    revision: str | None
    base_hash: str | None
    run: str | None
    system_prompt: str | None


def find_artifact(path: Path) -> Path | None:
    """The adapter/model directory inside a run directory, or ``path`` itself if it is one."""
    if (path / ADAPTER_META).is_file():
        return path
    for sub in ("adapter", "model"):
        if (path / sub / ADAPTER_META).is_file():
            return path / sub
    return None


def read_adapter_meta(artifact: Path) -> AdapterMeta:
    """Read and check ``skilltune_adapter.json``; only plain names and hashes are taken from it."""
    where = artifact / ADAPTER_META
    try:
        meta = json.loads(where.read_text(encoding="utf-8"))
        model = meta.get("model") or {}
        out = AdapterMeta(method=meta["method"], base=model["base"], revision=model.get("revision"),
                          base_hash=meta.get("base_hash"), run=meta.get("run"),
                          system_prompt=meta.get("system_prompt"))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise ModelLoadError(f"{where} is not a valid skilltune adapter record ({type(exc).__name__}: {exc})",
                             hint="use an adapter written by `skilltune train`") from None
    if not isinstance(out.method, str) or not isinstance(out.base, str) or not all(
            isinstance(v, (str, type(None))) for v in (out.revision, out.base_hash, out.run, out.system_prompt)):
        raise ModelLoadError(f"{where} has fields of the wrong type",
                             hint="use an adapter written by `skilltune train`")
    return out


def artifact_run_dir(artifact: Path, meta: AdapterMeta | None = None) -> Path | None:
    """The run directory an artifact lies in — only where it really lies there.

    The ``run`` field of an adapter record is followed only when it names the folder
    the artifact is in: an adapter copied elsewhere never pulls in a config (and its
    ``module:function`` metrics) from a path its record names.
    """
    meta = meta or read_adapter_meta(artifact)
    parent = artifact.resolve().parent
    if meta.run and Path(meta.run).resolve() == parent and (parent / "run.json").is_file():
        return parent
    return None


def training_system_prompt(artifact: Path) -> str | None:
    """The system prompt the model was trained with (the adapter's record, else its run's config)."""
    meta = read_adapter_meta(artifact)
    if meta.system_prompt is not None:
        return meta.system_prompt
    run = artifact_run_dir(artifact, meta)
    if run is not None and (run / "config.yaml").is_file():
        from skilltune.config.load import load_config

        return load_config(run / "config.yaml").data.system_prompt
    return None


def _check_base_hash(source_path: Path, expected: str | None, spec: str) -> None:
    from skilltune.model.sources import model_fingerprint

    if not expected:
        return  # adapters written before skilltune recorded the hash
    actual = model_fingerprint(source_path)
    if actual != expected:
        raise ModelLoadError(
            f"the base model {spec!r} ({source_path}) is not the one this adapter was trained on: its files hash "
            f"to {actual[:21]}..., the adapter was trained on {expected[:21]}... (a different or corrupted model)",
            hint="pass the exact base model with --base, or retrain the adapter on this base")


def _read(artifact: Path, what: str, load):
    """``load()`` the artifact's ``what``; a truncated, corrupt or foreign file is a message, not a traceback."""
    try:
        return load()
    except SkilltuneError:
        raise
    except Exception as exc:  # noqa: BLE001 - safetensors, tokenizers, peft and torch each raise their own kinds
        first = (str(exc).strip().splitlines() or [""])[0][:300]
        raise ModelLoadError(f"{artifact}: the {what} cannot be read ({type(exc).__name__}: {first})",
                             hint="its files are truncated, corrupt or not from `skilltune train`: copy the run "
                                  "directory again, or use the registry version (its files are checked by hash)"
                             ) from None


def _load_adapter(artifact: Path, policy: LoadPolicy, dtype: torch.dtype) -> Target:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from skilltune.model.loading import load_model
    from skilltune.model.sources import resolve_model

    meta = read_adapter_meta(artifact)
    tokenizer = _read(artifact, "tokenizer", lambda: AutoTokenizer.from_pretrained(str(artifact),
                                                                                  trust_remote_code=False))
    tokenizer.padding_side = "right"
    if meta.method == "full":  # the artifact is the whole model: its own weights, safetensors only
        model = _read(artifact, "model weights", lambda: AutoModelForCausalLM.from_pretrained(
            str(artifact), dtype=dtype, use_safetensors=True, trust_remote_code=False))
    else:
        from peft import PeftModel

        if not (artifact / "adapter_model.safetensors").is_file():
            raise ModelLoadError(f"{artifact} has no adapter_model.safetensors (pickle adapters are not loaded)",
                                 hint="use an adapter written by `skilltune train`")
        spec = policy.base or meta.base
        base_cfg = ModelConfig(base=spec, revision=meta.revision, trust_remote_code=policy.trust_remote_code,
                               allow_pickle=policy.allow_pickle)
        source = resolve_model(base_cfg.base, base_cfg.revision)
        _check_base_hash(source.path, policy.base_hash or meta.base_hash, spec)
        base = load_model(base_cfg, dtype=dtype, source=source).model
        if len(tokenizer) != base.get_input_embeddings().weight.shape[0]:
            base.resize_token_embeddings(len(tokenizer))
        model = _read(artifact, "adapter", lambda: PeftModel.from_pretrained(base, str(artifact)))
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.eval()
    return Target(model, tokenizer, "tuned", policy.base or meta.base, artifact)


def load_target(spec: str, dtype: torch.dtype = torch.float32, policy: LoadPolicy | None = None) -> Target:
    """Load a base model spec, a run directory or an adapter/full-model directory."""
    from skilltune.model.loading import load_model

    policy = policy or LoadPolicy()
    path = Path(spec)
    artifact = find_artifact(path) if path.is_dir() else None
    if artifact is not None:
        return _load_adapter(artifact, policy, dtype)
    if path.is_dir() and (path / "run.json").is_file():
        raise ModelLoadError(f"run {path} has no finished adapter or model yet (still training, or interrupted)",
                             hint=f"wait for it to finish, or continue it: skilltune train CONFIG --resume "
                                  f"--run-dir {path}")
    if path.is_dir() and (path / "adapter_config.json").is_file():
        raise ModelLoadError(f"{path} is a peft adapter without {ADAPTER_META}",
                             hint="use an adapter written by `skilltune train`, or load it with peft directly")
    loaded = load_model(ModelConfig(base=spec, trust_remote_code=policy.trust_remote_code,
                                    allow_pickle=policy.allow_pickle), dtype=dtype)
    return Target(loaded.model, loaded.tokenizer, "base", spec, None)
