"""Choose the compute precision: bf16 where the hardware does it fast, else fp32."""

from __future__ import annotations

from functools import lru_cache

import torch


@lru_cache(maxsize=1)
def cpu_has_fast_bf16() -> bool:
    """True when the CPU has AMX-bf16 or AVX512-bf16 (Sapphire Rapids and newer, Zen 4+)."""
    try:
        flags = open("/proc/cpuinfo", encoding="utf-8").read()
    except OSError:
        return False
    return " amx_bf16" in flags or " avx512_bf16" in flags


def choose_precision(requested: str, device: torch.device) -> tuple[str, torch.dtype | None]:
    """Return (name, autocast dtype or None for fp32) for ``requested`` on ``device``.

    fp16 (a CUDA GPU without bf16: T4, V100) trains with loss scaling: the training loop
    creates its accelerator with ``mixed_precision="fp16"``, whose GradScaler keeps small
    gradients from underflowing. On a CPU there is no loss scaling, so fp16 is refused.
    """
    if requested == "fp16" and device.type != "cuda":
        from skilltune.errors import TrainingError

        raise TrainingError("train.precision fp16 needs a CUDA GPU (its loss scaling runs there); fp16 on a CPU "
                            "would underflow small gradients and is slow",
                            hint="use train.precision: bf16 (where the CPU has AMX/AVX512-bf16) or fp32, or auto")
    if requested == "auto":
        if device.type == "cuda":
            requested = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        else:
            requested = "bf16" if cpu_has_fast_bf16() else "fp32"
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": None}[requested]
    return requested, dtype


INFERENCE_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def inference_dtype(requested: str) -> tuple[str, torch.dtype]:
    """(name, dtype) the weights are loaded in for generation on the CPU: 'auto' is bf16 where the CPU
    computes it fast (weights at half the bytes: a decode step reads every weight once), else fp32."""
    if requested == "auto":
        requested = "bf16" if cpu_has_fast_bf16() else "fp32"
    return requested, INFERENCE_DTYPES[requested]
