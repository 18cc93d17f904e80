"""Atomic checkpoints with everything exact resume needs.

A checkpoint is written into a temp folder, finished with a ``COMPLETE`` marker and
renamed into ``checkpoints/step-NNNNNN``; one without the marker (a kill during the
write) is never resumed from. It holds the trainable weights, optimizer and
scheduler state, the RNG states, the loop state, and the config and data
fingerprint that resuming compares against.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from skilltune.errors import TrainingError
from skilltune.paths import atomic_dir, clean_stale_temp_dirs

MARKER = "COMPLETE"


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().to("cpu").clone().contiguous() for n, p in model.named_parameters() if p.requires_grad}


def load_trainable_state(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in state.items():
            params[name].copy_(value.to(params[name].device))


def _rng_state() -> dict:
    np_state = np.random.get_state()
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]]}


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np_state = state["numpy"]
    np.random.set_state((np_state[0], np.array(np_state[1], dtype=np.uint32), *np_state[2:]))


def save_checkpoint(ckpt_root: Path, step: int, trainable: dict[str, torch.Tensor], optimizer, scheduler,
                    loop_state: dict, identity: dict, keep: int) -> Path:
    """Write ``step``'s checkpoint; ``trainable`` is the full (gathered) trainable state, name -> tensor."""
    final = ckpt_root / f"step-{step:06d}"
    clean_stale_temp_dirs(ckpt_root, final.name)
    with atomic_dir(final) as tmp:
        save_file(trainable, str(tmp / "trainable.safetensors"))
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                    "rng": _rng_state()}, tmp / "state.pt")
        (tmp / "loop.json").write_text(json.dumps(loop_state, indent=2))
        (tmp / "identity.json").write_text(json.dumps(identity, indent=2, sort_keys=True))
        (tmp / MARKER).write_text("ok\n")
    for old in complete_checkpoints(ckpt_root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def complete_checkpoints(ckpt_root: Path) -> list[Path]:
    if not ckpt_root.is_dir():
        return []
    return sorted(p for p in ckpt_root.glob("step-*") if (p / MARKER).is_file())


def _load_state(path: Path) -> dict:
    """Optimizer, scheduler and RNG state without unpickling code.

    ``weights_only=True`` restricts torch's unpickler to tensors and plain containers
    (dicts, lists, tuples, numbers, strings), which is all this file holds; a crafted
    ``state.pt`` that asks for anything else (``os.system``, any class) is refused, not run.
    """
    import pickle

    try:
        state = torch.load(path, weights_only=True, map_location="cpu")
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, AttributeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise TrainingError(f"{path} is not a checkpoint state this version can load safely ({first[:300]})",
                            hint="it may be damaged or crafted; resume from an earlier checkpoint (delete this "
                                 "one) or start a new run") from None
    if not isinstance(state, dict) or not {"optimizer", "scheduler", "rng"} <= set(state):
        raise TrainingError(f"{path} does not hold optimizer, scheduler and RNG state",
                            hint="resume from an earlier checkpoint (delete this one) or start a new run")
    return state


def load_checkpoint(path: Path, model, optimizer, scheduler) -> dict:
    """Restore weights, optimizer, scheduler and RNG from ``path``; return the loop state."""
    load_trainable_state(model, load_file(str(path / "trainable.safetensors")))
    state = _load_state(path / "state.pt")
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    _set_rng_state(state["rng"])
    return json.loads((path / "loop.json").read_text())


def identity_diff(saved: dict, current: dict, prefix: str = "") -> list[str]:
    """Human-readable differences between two identity dicts (config + data fingerprints)."""
    out = []
    for key in sorted(set(saved) | set(current)):
        a, b = saved.get(key), current.get(key)
        where = f"{prefix}{key}"
        if isinstance(a, dict) and isinstance(b, dict):
            out += identity_diff(a, b, where + ".")
        elif a != b:
            out.append(f"{where}: {a!r} -> {b!r}")
    return out
