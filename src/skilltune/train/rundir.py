"""The run directory: identity of a run (config, data, base model, environment) and its outputs."""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path

import torch

from skilltune import __version__


def environment(precision: str) -> dict:
    import importlib.metadata as md

    versions = {}
    for pkg in ("torch", "transformers", "peft", "accelerate", "skilltune"):
        try:
            versions[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            versions[pkg] = None
    return {
        "python": platform.python_version(), "platform": platform.platform(), "packages": versions,
        "cpu": platform.processor() or platform.machine(), "cpu_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "precision": precision, "skilltune": __version__,
    }


def new_run_dir(output_dir: str, name: str) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = Path(output_dir) / f"{name}-{stamp}"
    n = 1
    while path.exists():
        n += 1
        path = Path(output_dir) / f"{name}-{stamp}-{n}"
    path.mkdir(parents=True)
    return path


def latest_run_dir(output_dir: str, name: str) -> Path | None:
    runs = sorted((p for p in Path(output_dir).glob(f"{name}-*") if (p / "run.json").is_file()),
                  key=lambda p: p.stat().st_mtime)
    return runs[-1] if runs else None


def plot_losses(metrics_file: Path, out: Path) -> None:
    """Write ``loss.png``: train and validation loss against the step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train, val = [], []
    for line in metrics_file.read_text().splitlines():
        rec = json.loads(line)
        if "train_loss" in rec:
            train.append((rec["step"], rec["train_loss"]))
        if "val_loss" in rec:
            val.append((rec["step"], rec["val_loss"]))
    fig, ax = plt.subplots(figsize=(7, 4))
    if train:
        ax.plot(*zip(*train), label="train")
    if val:
        ax.plot(*zip(*val), marker="o", label="validation")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (per trained token)")
    ax.set_title("skilltune training loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
