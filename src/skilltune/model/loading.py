"""Load a base model and its prepared tokenizer from a ``model.base`` spec.

Safetensors only unless ``allow_pickle``; remote code only if ``trust_remote_code``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from skilltune.config.schema import ModelConfig
from skilltune.errors import ModelLoadError
from skilltune.model.sources import ResolvedModel, default_template, resolve_model
from skilltune.model.tokenizer import TokenizerInfo, prepare_tokenizer

log = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    info: TokenizerInfo
    source: ResolvedModel


def load_tokenizer(cfg: ModelConfig, source: ResolvedModel | None = None):
    from transformers import AutoTokenizer

    source = source or resolve_model(cfg.base, cfg.revision)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(source.path), trust_remote_code=cfg.trust_remote_code)
    except Exception as exc:  # noqa: BLE001
        raise ModelLoadError(f"cannot load the tokenizer from {source.path}: {exc}") from exc
    from skilltune.model.families import family_of

    info = prepare_tokenizer(tokenizer, cfg.chat_template or default_template(source), family_of(source.path))
    if info.added_tokens:
        log.warning("the tokenizer of %s lacks %s: added to its vocabulary (the embeddings grow to match)",
                    source.spec, ", ".join(info.added_tokens))
    return tokenizer, info, source


def load_model(cfg: ModelConfig, dtype: torch.dtype = torch.float32, source: ResolvedModel | None = None,
               **extra) -> LoadedModel:
    """Resolve (unless ``source`` is given), load and prepare ``cfg.base`` (model + tokenizer)."""
    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM

    tokenizer, info, source = load_tokenizer(cfg, source)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            str(source.path),
            dtype=dtype,
            trust_remote_code=cfg.trust_remote_code,
            use_safetensors=None if cfg.allow_pickle else True,
            **extra,
        )
    except OSError as exc:
        if not cfg.allow_pickle and "safetensors" in str(exc).lower():
            raise ModelLoadError(
                f"{source.path} has no safetensors weights; pickle (.bin) weights can run arbitrary code",
                hint="convert the weights to safetensors, or set model.allow_pickle: true if you trust the source",
            ) from None
        raise ModelLoadError(f"cannot load model from {source.path}: {exc}") from None
    except SafetensorError as exc:  # a truncated or corrupt weights file
        raise ModelLoadError(f"cannot load model from {source.path}: a weights file is not readable safetensors "
                             f"({exc})", hint="the file is truncated or corrupt: copy or convert the model again"
                             ) from None
    except ValueError as exc:  # e.g. the folder asks for remote code and trust_remote_code is off
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelLoadError(f"cannot load model from {source.path}: {first}",
                             hint="if it needs its own modelling code and you trust its author, pass "
                                  "--trust-remote-code (or set model.trust_remote_code: true for training)") from None
    if info.added_tokens:
        model.resize_token_embeddings(len(tokenizer))
    model.config.pad_token_id = info.pad_token_id
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.pad_token_id = info.pad_token_id
        model.generation_config.eos_token_id = info.eos_token_id
    return LoadedModel(model=model, tokenizer=tokenizer, info=info, source=source)


def release_memory() -> None:
    """Give the memory of models that are gone back to the system, between stages of one process.

    A model dropped by a finished stage (training, a baseline's answers) is freed by Python, but glibc keeps
    the freed blocks in its arenas. Measured in the Gemma 3 270M demo: 3.2 GB held when training returned, 1.1 GB
    once trimmed, so eval starts from that instead of stacking on training's leftovers (the demo's peak, set in
    eval, went from 5.0 to 4.7-4.9 GB). Collects cycles (peft models hold some), empties the accelerator's cache
    (accelerate's ``clear_device_cache``) and, on glibc, calls ``malloc_trim(0)``; elsewhere that step is skipped."""
    import ctypes
    import sys

    from accelerate.utils.memory import clear_device_cache

    clear_device_cache(garbage_collection=True)
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):  # not glibc (musl has neither the library name nor the function)
            pass
