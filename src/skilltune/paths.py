"""Where skilltune keeps its state (model cache, registry, studies) and atomic file writes."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from pathlib import Path


def home() -> Path:
    """The skilltune home: ``$SKILLTUNE_HOME`` or ``~/.cache/skilltune``, private to its owner (0700).

    It holds request logs (prompts and outputs), rater links and the registry, so other
    users of the machine get no access; a home owned by someone else is left as it is.
    """
    root = Path(os.environ.get("SKILLTUNE_HOME") or Path.home() / ".cache" / "skilltune")
    private_dir(root)
    return root


def private_dir(path: Path) -> Path:
    """Create ``path`` (and parents) as a folder only its owner can enter (0700)."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    with contextlib.suppress(OSError):
        st = path.stat()
        if st.st_uid == os.getuid() and st.st_mode & 0o077:
            path.chmod(0o700)
    return path


def private_file(path: Path) -> Path:
    """Make sure ``path`` exists and only its owner can read or write it (0600).

    Called before SQLite opens a database: SQLite gives its ``-wal``/``-shm`` files the
    database file's mode, so they are private too.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o600)
    os.close(fd)
    with contextlib.suppress(OSError):
        if path.stat().st_uid == os.getuid():
            path.chmod(0o600)
    return path


def sqlite_file(url: str) -> Path | None:
    """The file behind a ``sqlite:///FILE`` URL (None for other databases and in-memory SQLite)."""
    prefix = "sqlite:///"
    if not url.startswith(prefix) or url[len(prefix):] in ("", ":memory:"):
        return None
    return Path(url[len(prefix):].split("?", 1)[0])


def models_cache() -> Path:
    path = home() / "models"
    path.mkdir(parents=True, exist_ok=True)
    return path


def update_hash(h, path: Path) -> None:
    """Feed ``path``'s bytes into the hash ``h`` in 4 MiB blocks."""
    with open(path, "rb") as fh:
        while block := fh.read(1 << 22):
            h.update(block)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    update_hash(h, path)
    return h.hexdigest()


def file_fingerprint(path: str | Path, rows: int | None = None) -> dict:
    """What identifies a data file in run records and evidence: its path, sha256 and row count."""
    return {"path": str(path), "sha256": sha256_file(Path(path)), "rows": rows}


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temp file and a rename, so readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_dir(final: Path):
    """Yield a temp directory beside ``final``; on success it is renamed to ``final``.

    On any failure (or a kill) only a ``.tmp-*`` directory is left, never a half ``final``.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".tmp-{final.name}-"))
    tmp.chmod(0o755)  # mkdtemp makes it private; the result is an ordinary folder
    try:
        yield tmp
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def clean_stale_temp_dirs(parent: Path, name: str) -> None:
    """Remove leftovers of an interrupted :func:`atomic_dir` for ``name``."""
    for stale in Path(parent).glob(f".tmp-{name}-*"):
        shutil.rmtree(stale, ignore_errors=True)


def hold_exclusive(folder: Path, name: str = ".lock"):
    """An exclusive lock on ``folder`` for as long as the returned file stays open (the process's life: a kill
    releases it), or None when another process holds it. The holder's pid is written into the lock file."""
    try:
        import fcntl
    except ImportError:  # not a POSIX system: no lock, as before
        return open(os.devnull, "w")  # noqa: SIM115 - held open like a lock file
    fh = open(Path(folder) / name, "a+")  # noqa: SIM115 - kept open: the lock lives as long as the file
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        fh.close()
        return None
    fh.seek(0)
    fh.truncate()
    fh.write(f"{os.getpid()}\n")
    fh.flush()
    return fh


def lock_holder(folder: Path, name: str = ".lock") -> str:
    """The pid written by whoever holds ``folder``'s lock (for messages)."""
    try:
        return (Path(folder) / name).read_text().strip() or "?"
    except OSError:
        return "?"


@contextlib.contextmanager
def file_lock(path: Path, shared: bool, wait: bool = True):
    """Hold an advisory lock on ``path`` for the ``with`` block: shared (many holders) or exclusive (one).

    Yields True when held; with ``wait=False`` yields False instead of waiting when it is taken. A kill
    releases it. Where no lock can be taken (no ``fcntl``; a shared lock in a folder this user may only read,
    with no lock file yet) it is granted without locking.
    """
    try:
        import fcntl
    except ImportError:
        yield True
        return
    fh = _open_lock_file(Path(path), shared)
    if fh is None:
        yield True
        return
    with fh:
        try:
            fcntl.flock(fh, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        except OSError as exc:  # a file system without locks (some network mounts): ENOLCK
            if not shared:
                raise OSError(exc.errno, f"cannot lock {path} on this file system ({exc.strerror})") from None
            yield True  # a reader goes ahead unlocked; nobody can take the exclusive lock here either
            return
        try:
            yield True
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _open_lock_file(path: Path, shared: bool):
    """A handle to lock, or None for a shared lock on a file that can be neither created nor read."""
    try:
        return open(path, "a")  # noqa: SIM115 - closed by file_lock
    except OSError:
        if not shared:
            raise
    try:
        return open(path)  # noqa: SIM115 - a read-only folder: a shared lock needs only a read handle
    except OSError:
        return None
