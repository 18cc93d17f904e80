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


def process_state(optimizer) -> dict:
    """What each process keeps of its own: the optimizer state (a shard's under FSDP/ZeRO) and its RNG.

    On the CPU, so that it can travel to the main process (which writes it) whatever the device;
    ``load_state_dict`` moves it back to the parameters' device.
    """
    return {"optimizer": _to_cpu(optimizer.state_dict()), "rng": _rng_state()}


def _to_cpu(obj):
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


def _rank_file(rank: int) -> str:
    return "state.pt" if rank == 0 else f"state-rank{rank}.pt"


def save_checkpoint(ckpt_root: Path, step: int, trainable: dict[str, torch.Tensor], per_process: list[dict],
                    scheduler, loop_state: dict, identity: dict, keep: int) -> Path:
    """Write ``step``'s checkpoint.

    ``trainable`` is the full (gathered) trainable state, name -> tensor; ``per_process`` is
    each process's :func:`process_state`, in rank order: rank 0's goes in ``state.pt`` with
    the scheduler, the others' in ``state-rankN.pt``.
    """
    final = ckpt_root / f"step-{step:06d}"
    clean_stale_temp_dirs(ckpt_root, final.name)
    with atomic_dir(final) as tmp:
        save_file(trainable, str(tmp / "trainable.safetensors"))
        for rank, own in enumerate(per_process):
            extra = {"scheduler": scheduler.state_dict(), "world_size": len(per_process)} if rank == 0 else {}
            torch.save({**own, **extra}, tmp / _rank_file(rank))
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


def _load_state(path: Path, needed: set[str]) -> dict:
    """Optimizer, scheduler and RNG state without unpickling code.

    ``weights_only=True`` restricts torch's unpickler to tensors and plain containers
    (dicts, lists, tuples, numbers, strings), which is all this file holds; a crafted
    ``state.pt`` that asks for anything else (``os.system``, any class) is refused, not run.
    """
    import pickle

    if not path.is_file():
        raise TrainingError(f"{path} is missing from the checkpoint",
                            hint="resume from an earlier checkpoint (delete this one) or start a new run")
    try:
        state = torch.load(path, weights_only=True, map_location="cpu")
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, AttributeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise TrainingError(f"{path} is not a checkpoint state this version can load safely ({first[:300]})",
                            hint="it may be damaged or crafted; resume from an earlier checkpoint (delete this "
                                 "one) or start a new run") from None
    if not isinstance(state, dict) or not needed <= set(state):
        raise TrainingError(f"{path} does not hold {', '.join(sorted(needed))}",
                            hint="resume from an earlier checkpoint (delete this one) or start a new run")
    return state


def load_trainable_file(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "trainable.safetensors"))


def load_checkpoint(path: Path, optimizer, scheduler, rank: int = 0, world_size: int = 1) -> dict:
    """Restore this process's optimizer and RNG state and the scheduler from ``path``; return the loop state.

    The trainable weights are loaded separately (:func:`load_trainable_file`), into the
    whole model before a distributed wrapper shards it.
    """
    main = _load_state(path / "state.pt", {"optimizer", "scheduler", "rng"})
    saved_world = int(main.get("world_size", 1))
    if saved_world != world_size:
        raise TrainingError(f"{path} was written by {saved_world} process(es); this run has {world_size}",
                            hint=f"resume with --nproc {saved_world} (the data order and each process's "
                                 "optimizer state depend on it), or start a new run")
    own = main if rank == 0 else _load_state(path / _rank_file(rank), {"optimizer", "rng"})
    optimizer.load_state_dict(own["optimizer"])
    scheduler.load_state_dict(main["scheduler"])
    _set_rng_state(own["rng"])
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
