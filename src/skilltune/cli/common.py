"""Shared CLI helpers: the console, quiet library logging, and config loading from flags."""

from __future__ import annotations

import contextlib
import os
import time

from rich.console import Console

from skilltune.progress import Stages

console = Console()
err_console = Console(stderr=True)

SET_HELP = "Override a config field, e.g. --set train.lr=1e-4 (repeatable)."


def quiet_libraries(offline: bool = True) -> None:
    """Silence the progress bars and warnings of transformers/hub; skilltune shows its own.

    ``offline``: nothing reaches the Hub (every command but a real ``push``).
    """
    if offline:
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TQDM_DISABLE", "1")  # transformers' GGUF reader draws a bar of its own
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*requires_grad=True to a scalar.*")
    try:
        import transformers

        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
    except Exception:  # noqa: BLE001
        pass


COLUMN_HELP = ("Map a column of a CSV/Parquet/JSON file to a field, e.g. --column prompt=question "
               "--column completion=answer (repeatable; fields: prompt, completion, system).")
DATA_CONFIG_HELP = "A config file whose data.columns and data.format describe the file (flags override it)."


def data_shape(column: list[str] | None, config=None) -> tuple[str, object]:
    """(format, ColumnMap) for data commands, from ``--config`` (data.format, data.columns) and ``--column``.

    Every data command takes the same mapping, so a file that trains also audits, cleans, splits and mixes.
    """
    from skilltune.config.load import load_config
    from skilltune.errors import ConfigError

    data = load_config(config).data if config is not None else None
    fmt = data.format if data else "auto"
    columns = data.columns.model_copy() if data else None
    problems = []
    for item in column or []:
        field, sep, name = (x.strip() for x in item.partition("="))
        if not sep or field not in ("prompt", "completion", "system") or not name:
            problems.append(f"--column {item!r}: expected FIELD=COLUMN with FIELD prompt, completion or system")
            continue
        if columns is None:
            from skilltune.config.schema import ColumnMap

            columns = ColumnMap()
        setattr(columns, field, name)
    if problems:
        raise ConfigError(problems, source="--column")
    return fmt, columns


def plain(line: str) -> None:
    """One line, exactly as given: no markup, no highlighting and no wrapping (greppable in logs)."""
    console.print(line, highlight=False, markup=False, soft_wrap=True)


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1024 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TB"


class ConsoleStages(Stages):
    """Stages on the console: a live bar with rate and ETA on a terminal; on a pipe or CI log one line
    when a stage starts, a ``done/total`` line every ``every_s`` seconds, and one when it ends."""

    def __init__(self, out: Console | None = None, every_s: float = 10.0):
        self.out = out or console
        self.every_s = every_s

    @contextlib.contextmanager
    def stage(self, label: str, total: int | None = None):
        if self.out.is_terminal:
            yield from self._bar(label, total)
        else:
            yield from self._lines(label, total)

    def _bar(self, label: str, total: int | None):
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn,
                                   TimeElapsedColumn, TimeRemainingColumn)

        columns = [SpinnerColumn(), TextColumn("{task.description}")]
        if total:
            columns += [BarColumn(), MofNCompleteColumn(), TextColumn("ETA"), TimeRemainingColumn()]
        with Progress(*columns, TimeElapsedColumn(), console=self.out) as bar:
            task = bar.add_task(label, total=total)
            yield lambda n=1: bar.advance(task, n)

    def _lines(self, label: str, total: int | None):
        t0 = last = time.perf_counter()
        done = 0
        self.out.print(f"{label}" + (f" ({total})" if total else "") + " ...", highlight=False, markup=False, soft_wrap=True)

        def advance(n: int = 1) -> None:
            nonlocal done, last
            done += n
            now = time.perf_counter()
            if now - last >= self.every_s:
                last = now
                rate = done / max(now - t0, 1e-9)
                eta = f", ETA {(total - done) / rate:.0f} s" if total and rate > 0 else ""
                self.out.print(f"  {label}: {done}/{total or '?'} ({rate:.2f}/s{eta})", highlight=False, soft_wrap=True,
                               markup=False)

        yield advance
        self.out.print(f"  {label}: done" + (f" {done}/{total}" if total else "")
                       + f" in {time.perf_counter() - t0:.1f} s", highlight=False, markup=False, soft_wrap=True)

    def message(self, text: str) -> None:
        self.out.print(text, highlight=False, markup=False, soft_wrap=True)


def listen_problem(host: str, port: int) -> tuple[str, str] | None:
    """(why, what to do) when the server could not listen on ``host:port`` (the port in use, the host not an
    address here), found before the model loads; None when it can. Bound as uvicorn binds, then released."""
    import errno
    import socket

    other_host = "pass an address of this machine with --host (127.0.0.1; 0.0.0.0 for every interface)"
    try:
        infos = socket.getaddrinfo(host.strip("[]"), port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        return f"--host {host}: not an address of this machine ({exc.strerror})", other_host
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(address)
        except OSError as exc:
            hint = other_host if exc.errno == errno.EADDRNOTAVAIL else \
                "choose another port with --port, or stop what listens there"
            return f"cannot listen on {host}:{port}: {exc.strerror}", hint
    return None
