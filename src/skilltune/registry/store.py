"""A content-addressed artifact store: files are kept under their sha256 and verified on the way out."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from skilltune.errors import SkilltuneError
from skilltune.paths import sha256_file


class TamperedArtifact(SkilltuneError):
    pass


class ArtifactStore:
    def __init__(self, root: Path):
        self.root = Path(root)
        (self.root / "objects").mkdir(parents=True, exist_ok=True)

    def _object(self, digest: str) -> Path:
        return self.root / "objects" / digest[:2] / digest[2:]

    def put_dir(self, src: Path) -> dict[str, str]:
        """Store every file of ``src``; returns the manifest (relative path -> sha256)."""
        manifest = {}
        for f in sorted(p for p in Path(src).rglob("*") if p.is_file()):
            digest = sha256_file(f)
            obj = self._object(digest)
            if not obj.exists():
                obj.parent.mkdir(parents=True, exist_ok=True)
                tmp = obj.with_name(obj.name + f".tmp{os.getpid()}")
                shutil.copyfile(f, tmp)
                os.replace(tmp, obj)
            manifest[str(f.relative_to(src))] = digest
        return manifest

    def verify(self, manifest: dict[str, str]) -> None:
        missing = [rel for rel, digest in manifest.items() if not self._object(digest).is_file()]
        if missing:
            raise TamperedArtifact(f"artifact files are missing from the store {self.root}: {', '.join(missing)}",
                                   hint="point at the store the version was registered with (SKILLTUNE_HOME), "
                                        "or re-register the run")
        bad = [rel for rel, digest in manifest.items() if sha256_file(self._object(digest)) != digest]
        if bad:
            raise TamperedArtifact(f"artifact files fail their sha256 check: {', '.join(bad)}",
                                   hint="the store was modified; re-register the run (`skilltune registry add`)")

    def materialize(self, manifest: dict[str, str], dest: Path) -> Path:
        """Verify, then copy the artifact into ``dest`` (verified again after the copy)."""
        self.verify(manifest)
        dest = Path(dest)
        for rel, digest in manifest.items():
            out = dest / rel
            out.parent.mkdir(parents=True, exist_ok=True)
            if not out.exists() or sha256_file(out) != digest:
                shutil.copyfile(self._object(digest), out)
        for rel, digest in manifest.items():
            if sha256_file(dest / rel) != digest:
                raise TamperedArtifact(f"{dest / rel} changed while loading")
        return dest
