"""Generation kernels: stock CPU code paths replaced while a model generates.

Inference only, installed for the duration of :func:`generation_kernels` (or for a server's
lifetime) and undone after; each computes what the stock path does, and each steps aside —
the stock path runs — for anything it was not written for. Measured in bench/NOTES.md
(session 9); registered like the training kernels (train/kernels.py), whose installer runs them.

- ``prepacked_linear``: linear layers with their weights reordered once for oneDNN. PyTorch's
  CPU ``linear`` prepares the weight for its kernel on every call; a decode step multiplies a
  few rows by every weight of the model, so that preparation was a third of its linear time
  (25 -> 18 ms a step in bf16, 50 -> 32 ms in fp32 for the embedded model at 16 rows; equal
  to the bit in bf16, to fp32 rounding in fp32). It is what ``torch.compile``'s CPU freezing
  does to linears, without the compile. It costs one more copy of the linear weights, so it
  steps aside when that would not fit in half of the memory available. The copy is taken when
  installed: weights must not change while it is (eval merges an adapter between two).
Tried and not kept (bench/NOTES.md): a decode attention grouping query heads on their K/V head.
Its matmuls copy the cache's strided views, and it lost to PyTorch's flash attention.
"""

from __future__ import annotations

import contextlib
from typing import Callable

import torch

from skilltune.train.kernels import Kernel, _swap_forward, install_kernels

GENERATION_KERNELS: dict[str, Kernel] = {}


def _register(kernel: Kernel) -> None:
    GENERATION_KERNELS[kernel.name] = kernel


# ---- prepacked_linear ---------------------------------------------------------------------

def _packable(module: torch.nn.Module) -> bool:
    weight = getattr(module, "weight", None)
    return (type(module) is torch.nn.Linear and weight is not None and weight.device.type == "cpu"
            and weight.dtype in (torch.bfloat16, torch.float32) and weight.layout == torch.strided)


def _available_bytes() -> int | None:
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _install_prepacked(model: torch.nn.Module) -> tuple[int, Callable[[], None]]:
    if not torch.backends.mkldnn.is_available():
        return 0, lambda: None
    modules = [m for m in model.modules() if _packable(m)]
    size = sum(m.weight.numel() * m.weight.element_size() for m in modules)
    available = _available_bytes()
    if not modules or (available is not None and size > available // 2):
        return 0, lambda: None

    return len(modules), _swap_forward(modules, _prepacked_forward)


def _prepacked_forward(original):
    """The forward of ``original``'s module on a weight reordered once (taken now)."""
    packed = torch.ops.mkldnn._reorder_linear_weight(original.__self__.weight.detach(), 16)  # tuned for ~16 rows

    def forward(self: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() or x.dtype != packed.dtype or x.device.type != "cpu":
            return original(x)
        return torch.ops.mkldnn._linear_pointwise(x, packed, self.bias, "none", [None], "")

    return forward


_register(Kernel("prepacked_linear", _install_prepacked,
                 "no plain CPU linear layers, no oneDNN, or a second copy of their weights would not fit in memory"))


MARK = "_skilltune_generation_kernels"


def keep_generation_kernels(model: torch.nn.Module) -> dict[str, int]:
    """Install the generation kernels for the model's lifetime (a server's model, whose weights never change)."""
    if getattr(model, MARK, False):
        return {}
    counts, _ = install_kernels(model, GENERATION_KERNELS)
    setattr(model, MARK, True)
    return counts


@contextlib.contextmanager
def generation_kernels(model: torch.nn.Module):
    """Generation inside runs on the generation kernels (a no-op where they are installed already)."""
    if getattr(model, MARK, False):
        yield
        return
    _, undo = install_kernels(model, GENERATION_KERNELS)
    setattr(model, MARK, True)
    try:
        yield
    finally:
        setattr(model, MARK, False)
        undo()
