"""`skilltune train CONFIG`: finetune with a plan, a live progress bar and a summary."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import typer
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from skilltune.cli.common import SET_HELP, console, quiet_libraries
from skilltune.train.reporter import Reporter


class RichReporter(Reporter):
    def __init__(self):
        self.progress: Progress | None = None
        self.task = None

    def plan(self, plan: dict) -> None:
        table = Table(title="training plan", show_header=False)
        for k, v in plan.items():
            table.add_row(k, str(v))
        console.print(table)

    def start(self, total_steps: int, first_step: int) -> None:
        self.total = total_steps
        self.t0 = time.perf_counter()
        if not console.is_terminal:  # logs and pipes get a line every ~10% instead of a live bar
            return
        self.progress = Progress(TextColumn("[bold]train"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                                 TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TextColumn("ETA"),
                                 TimeRemainingColumn(), console=console)
        self.progress.start()
        self.task = self.progress.add_task("train", total=total_steps, completed=first_step, info="")

    def step(self, step: int, metrics: dict) -> None:
        info = f"loss {metrics['train_loss']:.4f}  {metrics['tokens_per_s']:.0f} tok/s"
        if "reward_accuracy" in metrics:  # dpo
            info += f"  reward acc {metrics['reward_accuracy']:.2f} margin {metrics['reward_margin']:.3f}"
        if "val_loss" in metrics:
            info += f"  val {metrics['val_loss']:.4f}"
        if "val_reward_accuracy" in metrics:
            info += f" (reward acc {metrics['val_reward_accuracy']:.2f})"
        if self.progress is not None:
            self.progress.update(self.task, completed=step, info=info)
        elif step % max(1, self.total // 10) == 0 or step == self.total or "val_loss" in metrics:
            elapsed = time.perf_counter() - self.t0
            console.print(f"step {step}/{self.total}  {info}  elapsed {elapsed:.0f} s", highlight=False)

    def message(self, text: str) -> None:
        console.print(text)

    def finish(self) -> None:
        if self.progress:
            self.progress.stop()


def train(config: Path = typer.Argument(..., help="YAML config file."),
          set_: Optional[list[str]] = typer.Option(None, "--set", help=SET_HELP),
          resume: bool = typer.Option(False, "--resume", help="Continue the latest complete checkpoint."),
          run_name: Optional[str] = typer.Option(None, help="Run name (default: the config file's name)."),
          run_dir: Optional[Path] = typer.Option(None, help="Exact run directory (with --resume: the one to continue)."),
          force: bool = typer.Option(False, "--force", help="Resume even if config or data changed."),
          nproc: int = typer.Option(1, "--nproc", min=1, help="Data-parallel processes (accelerate/torchrun)."),
          ) -> None:
    """Finetune the base model on the data in CONFIG and write a run directory.

    Example: skilltune train examples/sql/config.yaml --set train.epochs=1
    """
    if nproc > 1 and "LOCAL_RANK" not in os.environ:
        args = [a for a in sys.argv[1:] if not a.startswith("--nproc")]
        if "--nproc" in sys.argv:
            i = sys.argv.index("--nproc")
            args = [a for k, a in enumerate(sys.argv[1:], start=1) if k not in (i, i + 1)]
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "skilltune.cli.main", *args]
        raise typer.Exit(subprocess.call(cmd))
    quiet_libraries()
    from skilltune.config.load import load_config
    from skilltune.train.loop import train as run_train
    from skilltune.train.prepare import config_problems

    cfg = load_config(config, set_, checks=config_problems)
    is_main = os.environ.get("RANK", "0") == "0"
    # examples/sql/config.yaml -> runs/sql-<timestamp>: a run is named after what it trains, not "config"
    default_name = config.resolve().parent.name if config.stem == "config" else config.stem
    result = run_train(cfg, run_name=run_name or default_name, resume=resume, run_dir=run_dir, force=force,
                       reporter=RichReporter() if is_main else Reporter())
    if is_main:
        s = result.summary
        table = Table(title="training summary", show_header=False)
        for key in ("steps", "train_time_s", "tokens_per_s", "final_train_loss", "final_val_loss", "best_val_loss",
                    "best_step", "val_reward_accuracy", "val_reward_margin", "stopped_early", "artifact", "run_dir"):
            if key in s or not key.startswith("val_reward"):
                table.add_row(key, str(s.get(key)))
        if s.get("computed_tokens") and s["computed_tokens"] != s.get("tokens"):
            table.add_row("positions computed", f"{s['computed_tokens']:,} for {s['tokens']:,} tokens "
                          "(shared prefixes run once; padding adds)")
        console.print(table)
        console.print(f"next: skilltune eval {result.run_dir}" + ("" if cfg.data.test else " --test TEST.jsonl"),
                      highlight=False, soft_wrap=True)
