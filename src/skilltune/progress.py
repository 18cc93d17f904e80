"""Progress of long steps: library code reports stages, the CLI decides how to show them.

Generation, merging, exporting and the like call ``stages.stage(label, total)`` and
advance it; by default nothing is shown (:data:`SILENT`). The CLI passes a console
implementation (``skilltune.cli.common.ConsoleStages``): a bar with ETA on a terminal,
and on a pipe or CI log one line per stage plus a periodic ``done/total`` line, so a
long step is never a silent minute.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator

Advance = Callable[..., None]  # advance(n=1): n more units of the stage are done


class Stages:
    """Receives the stages of a long job; this base class shows nothing."""

    @contextlib.contextmanager
    def stage(self, label: str, total: int | None = None) -> Iterator[Advance]:
        """A named step of ``total`` units (None: unknown); yields the function that advances it."""
        yield lambda n=1: None

    def message(self, text: str) -> None:
        """A one-line note between stages."""


SILENT = Stages()
