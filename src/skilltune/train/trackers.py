"""Experiment tracking: metrics.jsonl always, TensorBoard by default, W&B / MLflow if asked.

Each tracker is a small object with ``log(step, metrics)`` and ``close()``; optional
ones are imported only when configured, with a clear error if missing.
"""

from __future__ import annotations

import json
from pathlib import Path

from skilltune.errors import TrainingError


class JsonlTracker:
    def __init__(self, run_dir: Path, config: dict):
        self.fh = open(run_dir / "metrics.jsonl", "a", encoding="utf-8")

    def log(self, step: int, metrics: dict) -> None:
        self.fh.write(json.dumps({"step": step, **metrics}) + "\n")
        self.fh.flush()

    def close(self) -> None:
        self.fh.close()


class TensorBoardTracker:
    def __init__(self, run_dir: Path, config: dict):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
        self.writer.add_text("config", "```\n" + json.dumps(config, indent=2) + "\n```")

    def log(self, step: int, metrics: dict) -> None:
        for key, value in metrics.items():
            if isinstance(value, (int, float)):
                self.writer.add_scalar(key.replace("_", "/", 1), value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbTracker:
    def __init__(self, run_dir: Path, config: dict):
        try:
            import wandb
        except ImportError:
            raise TrainingError("train.report_to includes wandb, but wandb is not installed",
                                hint="pip install wandb, or remove it from train.report_to") from None
        self.run = wandb.init(project="skilltune", name=run_dir.name, dir=str(run_dir), config=config)

    def log(self, step: int, metrics: dict) -> None:
        self.run.log(metrics, step=step)

    def close(self) -> None:
        self.run.finish()


class MlflowTracker:
    def __init__(self, run_dir: Path, config: dict):
        try:
            import mlflow
        except ImportError:
            raise TrainingError("train.report_to includes mlflow, but mlflow is not installed",
                                hint="pip install mlflow, or remove it from train.report_to") from None
        self.mlflow = mlflow
        mlflow.start_run(run_name=run_dir.name)
        mlflow.log_dict(config, "skilltune_config.json")

    def log(self, step: int, metrics: dict) -> None:
        self.mlflow.log_metrics({k: v for k, v in metrics.items() if isinstance(v, (int, float))}, step=step)

    def close(self) -> None:
        self.mlflow.end_run()


TRACKERS = {"tensorboard": TensorBoardTracker, "wandb": WandbTracker, "mlflow": MlflowTracker}


LOCAL = {"tensorboard"}  # written to the run directory: every step costs nothing worth saving


class Trackers:
    """Fan-out to every configured tracker.

    ``metrics.jsonl`` (hence ``loss.png``) and TensorBoard get every step; remote trackers
    (W&B, MLflow) every ``every`` steps, plus validations and the last step.
    """

    def __init__(self, run_dir: Path, names: list[str], config: dict, every: int = 1):
        self.local = [JsonlTracker(run_dir, config)] + [TRACKERS[n](run_dir, config) for n in names if n in LOCAL]
        self.remote = [TRACKERS[n](run_dir, config) for n in names if n not in LOCAL]
        self.all = self.local + self.remote
        self.every = every

    def log(self, step: int, metrics: dict, force: bool = False) -> None:
        for t in self.local:
            t.log(step, metrics)
        if force or step % self.every == 0:
            for t in self.remote:
                t.log(step, metrics)

    def close(self) -> None:
        for t in self.all:
            t.close()
