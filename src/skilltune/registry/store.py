"""A content-addressed artifact store: files are kept under their sha256 and verified on the way out.

What goes in is data from a run directory someone else may have prepared, so the store
takes only regular files that lie inside the artifact (a symlink, a device or a path
that leaves the folder is refused, not followed), keeps every object owner-only
(0600), and on the way out writes only relative paths inside the destination, into a
fresh folder, so a manifest can never write elsewhere and a checkout never keeps a
file the manifest does not list.
"""

from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path, PurePosixPath

from skilltune.errors import SkilltuneError
from skilltune.paths import atomic_dir, file_lock, private_dir, sha256_file


class TamperedArtifact(SkilltuneError):
    pass


class UnsafeArtifact(SkilltuneError):
    """An artifact holds something that is not plain data inside its own folder."""


def safe_relpath(rel: str) -> PurePosixPath:
    """``rel`` as a relative POSIX path with no ``..``, no root and no empty parts; raises otherwise."""
    p = PurePosixPath(rel)
    if (not rel or "\\" in rel or "\x00" in rel or p.is_absolute() or any(part in ("", ".", "..") for part in p.parts)
            or rel != str(p)):
        raise TamperedArtifact(f"the manifest names an unsafe path {rel!r} (absolute, '..' or not normalised)",
                               hint="this version's registry entry was altered; re-register the run it came from")
    return p


def artifact_files(src: Path) -> list[Path]:
    """Every regular file under ``src``, checked with ``lstat`` (no link is ever followed).

    Raises :class:`UnsafeArtifact` for a symlink (it could point at a secret such as
    ``~/.ssh/id_rsa``), a FIFO, socket or device, naming each offender.
    """
    src = Path(src)
    files, bad = [], []
    for dirpath, dirnames, filenames in os.walk(src, followlinks=False):
        for name in sorted(dirnames + filenames):
            path = Path(dirpath) / name
            mode = os.lstat(path).st_mode
            if stat.S_ISLNK(mode):
                bad.append(f"{path.relative_to(src)} (a symbolic link to {os.readlink(path)})")
            elif stat.S_ISREG(mode):
                files.append(path)
            elif not stat.S_ISDIR(mode):
                bad.append(f"{path.relative_to(src)} (not a regular file)")
    if bad:
        raise UnsafeArtifact(f"{src} holds what an artifact may not: {'; '.join(bad)}",
                             hint="an artifact is plain files only: replace links by the files themselves, "
                                  "or remove them, then register again")
    return sorted(files)


class ArtifactStore:
    def __init__(self, root: Path):
        self.root = Path(root)
        private_dir(self.root / "objects")

    def in_use(self):
        """A shared hold on the store, taken by every add (from its first copied object until its version is
        recorded) and every checkout: :meth:`unused` runs only while nobody holds it."""
        return file_lock(self.root / ".lock", shared=True)

    def alone(self):
        """Yields whether the store is held by nobody else (then held exclusively for the ``with`` block)."""
        return file_lock(self.root / ".lock", shared=False, wait=False)

    def unused(self, keep: set[str]) -> tuple[list[Path], list[Path]]:
        """The objects no digest in ``keep`` names, and the partial copies an add that was killed left
        (``*.tmpPID``). Call it inside :meth:`alone`: a running add's objects are not in ``keep`` yet."""
        unused, partial = [], []
        for obj in sorted((self.root / "objects").glob("??/*")):
            name = obj.parent.name + obj.name
            if not obj.is_file() or obj.is_symlink():
                continue
            if ".tmp" in obj.name:
                partial.append(obj)
            elif len(name) == 64 and name not in keep:
                unused.append(obj)
        return unused, partial

    def _object(self, digest: str) -> Path:
        if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
            raise TamperedArtifact(f"the manifest names an invalid sha256 {digest!r}",
                                   hint="this version's registry entry was altered; re-register the run")
        return self.root / "objects" / digest[:2] / digest[2:]

    def put_dir(self, src: Path) -> dict[str, str]:
        """Store every file of ``src``; returns the manifest (relative path -> sha256).

        An object already in the store is kept only if it still has its hash: a
        corrupted or tampered one is replaced by the good copy being added.
        """
        src = Path(src)
        manifest = {}
        for f in artifact_files(src):
            digest = sha256_file(f)
            obj = self._object(digest)
            if not obj.is_file() or sha256_file(obj) != digest:
                private_dir(obj.parent)
                tmp = obj.with_name(obj.name + f".tmp{os.getpid()}")
                try:
                    with open(f, "rb") as fin, open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600),
                                                     "wb") as fout:
                        shutil.copyfileobj(fin, fout)
                except BaseException:  # a full disk or a kill mid-copy: no partial object is left to take space
                    tmp.unlink(missing_ok=True)
                    raise
                if sha256_file(tmp) != digest:  # the run directory changed under us
                    tmp.unlink(missing_ok=True)
                    raise UnsafeArtifact(f"{f} changed while it was being registered", hint="register it again")
                os.replace(tmp, obj)
            manifest[f.relative_to(src).as_posix()] = digest
        return manifest

    def verify(self, manifest: dict[str, str]) -> None:
        for rel in manifest:
            safe_relpath(rel)
        missing = [rel for rel, digest in manifest.items() if not self._object(digest).is_file()]
        if missing:
            raise TamperedArtifact(f"artifact files are missing from the store {self.root}: {', '.join(missing)}",
                                   hint="point at the store the version was registered with (SKILLTUNE_HOME), "
                                        "or re-register the run")
        bad = [rel for rel, digest in manifest.items() if sha256_file(self._object(digest)) != digest]
        if bad:
            raise TamperedArtifact(f"artifact files fail their sha256 check: {', '.join(bad)}",
                                   hint="the store was modified; re-register the run (`skilltune registry add`): "
                                        "that replaces the damaged objects")

    def matches(self, manifest: dict[str, str], dest: Path) -> bool:
        """Whether ``dest`` holds exactly the manifest's files (no more, no links) with their hashes."""
        try:
            files = artifact_files(dest)
        except (UnsafeArtifact, OSError):
            return False
        rels = {f.relative_to(dest).as_posix() for f in files}
        return rels == set(manifest) and all(sha256_file(dest / rel) == d for rel, d in manifest.items())

    def materialize(self, manifest: dict[str, str], dest: Path) -> Path:
        """Verify, then write the artifact into ``dest``: exactly its files, nothing else.

        An existing ``dest`` that matches the manifest file for file is reused; anything
        else (an extra file someone dropped in, a changed file) is rebuilt from the
        store in a temp folder and renamed into place.
        """
        self.verify(manifest)
        dest = Path(dest)
        if dest.is_dir() and self.matches(manifest, dest):
            return dest
        try:
            with atomic_dir(dest) as tmp:
                for rel, digest in manifest.items():
                    out = tmp.joinpath(*safe_relpath(rel).parts)
                    if tmp.resolve() not in out.resolve().parents:  # belt and braces after safe_relpath
                        raise TamperedArtifact(f"the manifest path {rel!r} leaves the checkout folder")
                    out.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(self._object(digest), out)
                    if sha256_file(out) != digest:
                        raise TamperedArtifact(f"{rel} changed while loading")
        except OSError:
            if self.matches(manifest, dest):  # another process materialized the same version first
                return dest
            raise
        return dest
