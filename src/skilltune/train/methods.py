"""Finetuning methods as small registered strategies: how to load the base, how to wrap it.

``lora`` (default), ``dora`` (weight-decomposed LoRA), ``qlora`` (4-bit NF4 base via
bitsandbytes, CUDA) and ``full``. A new method registers a :class:`Method` the same way.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from skilltune.config.schema import AdapterConfig
from skilltune.errors import TrainingError


@dataclass(frozen=True)
class Method:
    name: str
    is_adapter: bool
    check: Callable[[AdapterConfig], None]  # raises TrainingError when it cannot run here
    load_kwargs: Callable[[AdapterConfig], dict]  # extra from_pretrained kwargs
    wrap: Callable[[torch.nn.Module, AdapterConfig], torch.nn.Module]


METHODS: dict[str, Method] = {}


def register_method(method: Method) -> None:
    METHODS[method.name] = method


def _lora_config(cfg: AdapterConfig, dora: bool):
    from peft import LoraConfig

    return LoraConfig(
        r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=cfg.target_modules,
        use_rslora=cfg.rslora, use_dora=dora, bias="none", task_type="CAUSAL_LM",
    )


def _wrap_lora(dora: bool):
    def wrap(model, cfg: AdapterConfig):
        from peft import get_peft_model

        return get_peft_model(model, _lora_config(cfg, dora))

    return wrap


def _wrap_qlora(model, cfg: AdapterConfig):
    from peft import get_peft_model, prepare_model_for_kbit_training

    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    return get_peft_model(model, _lora_config(cfg, dora=False))


def _check_qlora(cfg: AdapterConfig) -> None:
    if not torch.cuda.is_available():
        raise TrainingError(
            "QLoRA needs a CUDA GPU here: its 4-bit NF4 base model runs through bitsandbytes' CUDA kernels, "
            "and this machine has no GPU",
            hint="use adapter.method: lora (on this CPU it trains in bf16 at full quality), or run on a GPU",
        )
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise TrainingError("QLoRA needs the bitsandbytes package",
                            hint="pip install bitsandbytes   (or use adapter.method: lora)") from None


def _qlora_kwargs(cfg: AdapterConfig) -> dict:
    from transformers import BitsAndBytesConfig

    return {"quantization_config": BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.bfloat16)}


def _wrap_full(model, cfg: AdapterConfig):
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def _ok(cfg: AdapterConfig) -> None:
    return None


register_method(Method("lora", True, _ok, lambda c: {}, _wrap_lora(dora=False)))
register_method(Method("dora", True, _ok, lambda c: {}, _wrap_lora(dora=True)))
register_method(Method("qlora", True, _check_qlora, _qlora_kwargs, _wrap_qlora))
register_method(Method("full", False, _ok, lambda c: {}, _wrap_full))


def trainable_summary(model) -> tuple[int, int]:
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total
