"""Typed exceptions for every user-facing failure.

Library code raises these; only the CLI turns them into messages and exit codes.
Each carries what went wrong and, where we know it, what to do next (``hint``).
A bare Python exception that reaches the CLI is our bug and keeps its traceback.
"""

from __future__ import annotations

import errno


class SkilltuneError(Exception):
    """Base of all errors a user can act on."""

    exit_code = 1

    def __init__(self, message: str, hint: str | None = None):
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return self.message if not self.hint else f"{self.message}\n  -> {self.hint}"


class ConfigError(SkilltuneError):
    """The configuration is invalid; ``problems`` lists every error found."""

    exit_code = 2

    def __init__(self, problems: list[str], source: str | None = None):
        self.problems = problems
        where = f" in {source}" if source else ""
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(
            f"{len(problems)} configuration error{'s' if len(problems) != 1 else ''}{where}:\n{lines}",
            hint="fix the fields above (see `skilltune config show` for defaults)",
        )


class ModelLoadError(SkilltuneError):
    """A model could not be found or loaded."""


class DataError(SkilltuneError):
    """Input data cannot be read or is malformed."""

    exit_code = 2


class TrainingError(SkilltuneError):
    """Training cannot start or continue."""


_DISK_FULL = ("No space left on device", "Disk quota exceeded", "os error 28", "os error 122")


def is_disk_full(exc: BaseException | None) -> bool:
    """Whether ``exc`` (or what caused it) is a full disk: an ``OSError`` ENOSPC/EDQUOT, or a library's own
    error wrapping one (safetensors and torch.save report it in their message, not as an ``OSError``)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if any(words in str(exc) for words in _DISK_FULL):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


# The file-system failures a user fixes, not us: (what happened, what to do). Anything else keeps its traceback.
_FILESYSTEM = {
    errno.EACCES: ("permission denied", "fix that path's permissions, or (for an output) write somewhere you may: "
                                        "another --out / --workdir / train.output_dir"),
    errno.EPERM: ("operation not permitted", "fix that path's permissions, or (for an output) write somewhere you may"),
    errno.EROFS: ("the file system is read-only", "write to a writable folder (another --out / --workdir / "
                                                  "train.output_dir, or SKILLTUNE_HOME for the registry and caches)"),
    errno.ENOLCK: ("the file system offers no file locks", "run it where the files are on a local disk, or mount "
                                                           "the share with locking on (NFSv4, or lockd for NFSv3)"),
}


def filesystem_problem(exc: BaseException) -> tuple[str, str] | None:
    """(message, hint) for a full disk, a permission refused or a read-only file system; None for anything else."""
    where = f" ({exc.filename})" if isinstance(exc, OSError) and exc.filename else ""
    if is_disk_full(exc):
        return (f"the disk is full{where}",
                "free space and run the command again; outputs are written to a temporary name and renamed, so no "
                "half-written file was left in place")
    if isinstance(exc, OSError) and exc.errno in _FILESYSTEM:
        what, hint = _FILESYSTEM[exc.errno]
        return f"{what}{where}", hint
    return None


def unreadable_database(what: str, where: str, exc: BaseException) -> SkilltuneError:
    """A database file that is damaged or is something else (SQLite: "file is not a database")."""
    reason = (str(getattr(exc, "orig", None) or exc).strip().splitlines() or [type(exc).__name__])[0][:200]
    return SkilltuneError(f"cannot open the {what} {where}: {reason}",
                          hint=f"the file is damaged or is not a {what}: restore it from a backup, or move it aside "
                               "(a new, empty one is then created)")
