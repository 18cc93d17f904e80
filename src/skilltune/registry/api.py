"""The registry's operations: add, list, show, diff, promote, rollback, history, delete, load.

Each write is one transaction (``BEGIN IMMEDIATE`` on SQLite), so two processes
promoting at once serialise and an alias never points at nothing.
"""

from __future__ import annotations

import getpass
import json
import os
import re
import shutil
import subprocess
import zlib
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import select, text

from skilltune import __version__
from skilltune.config.load import load_config
from skilltune.errors import SkilltuneError
from skilltune.model.sources import merged_version_dir
from skilltune.model.target import find_artifact, read_adapter_meta
from skilltune.paths import home, models_cache
from skilltune.registry.db import Alias, AliasEvent, Version, make_session_factory
from skilltune.registry.store import ArtifactStore


class RegistryError(SkilltuneError):
    pass


def _json_file(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise RegistryError(f"{path} is not readable JSON ({type(exc).__name__}: {exc})",
                            hint="the run directory is damaged: register a complete copy of it") from None


def _run_record(path: Path) -> dict:
    """``run.json`` with the fields a version's lineage is built from."""
    run = _json_file(path)
    identity = run.get("identity") if isinstance(run, dict) else None
    if not (isinstance(run, dict) and isinstance(run.get("base_model"), dict) and isinstance(identity, dict)
            and {"data", "config"} <= identity.keys() and {"tokenizer", "environment"} <= run.keys()):
        raise RegistryError(f"{path} is not a run record skilltune wrote (base_model, identity, tokenizer or "
                            "environment missing)",
                            hint="register the run directory printed at the end of `skilltune train`")
    return run


def check_readable(artifact: Path) -> None:
    """Every weights file parses as whole safetensors and every JSON file as JSON, before a version is made of
    them: a truncated copy is refused here, not found when the version is served."""
    from safetensors import SafetensorError, safe_open

    bad = []
    for f in sorted(artifact.rglob("*")):
        try:
            if f.suffix == ".safetensors":
                with safe_open(str(f), framework="pt"):  # reads the header, checks it covers the whole file
                    pass
            elif f.suffix == ".json":
                json.loads(f.read_text(encoding="utf-8"))
        except (SafetensorError, OSError, ValueError) as exc:
            first = str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__
            bad.append(f"{f.relative_to(artifact)} ({first})")
    if bad:
        raise RegistryError(f"{artifact} has files that cannot be read: {'; '.join(bad)}",
                            hint="the run directory is truncated or corrupt: register a complete copy (or train again)")


_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")
_ALIAS = re.compile(r"[A-Za-z][A-Za-z0-9._-]{0,63}")
_VERSION_TAG = re.compile(r"v\d+")
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def validate_name(name: str) -> str:
    """A model name: 1-100 of letters, digits, '.', '_' and '-', starting with a letter or digit."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise RegistryError(f"invalid model name {name!r}",
                            hint="use 1-100 letters, digits, '.', '_' and '-', starting with a letter or digit "
                                 "(no '@', spaces or control characters)")
    return name


def validate_alias(alias: str) -> str:
    """An alias: a letter, then letters, digits, '.', '_' or '-'; never ``latest`` or ``vN``.

    ``latest`` and ``v3`` are how a reference names versions, so an alias of that name
    could be set but never read back.
    """
    if not isinstance(alias, str) or not _ALIAS.fullmatch(alias):
        raise RegistryError(f"invalid alias {alias!r}",
                            hint="use 1-64 letters, digits, '.', '_' and '-', starting with a letter "
                                 "(e.g. production, staging)")
    if alias == "latest" or _VERSION_TAG.fullmatch(alias):
        raise RegistryError(f"alias {alias!r} is reserved: 'latest' and 'vN' already name versions",
                            hint="choose another alias, e.g. production or staging")
    return alias


def clean_text(text: str) -> str:
    """A note or reason with control characters (ANSI escapes, CR) removed: it is printed to terminals."""
    return _CONTROL.sub("", text or "")


def parse_ref(ref: str) -> tuple[str, str | None]:
    """``name@v3`` -> (name, "v3"); ``name@production`` -> (name, "production"); ``name`` -> (name, None)."""
    name, _, tag = ref.partition("@")
    validate_name(name)
    if tag and tag != "latest" and not _VERSION_TAG.fullmatch(tag) and not _ALIAS.fullmatch(tag):
        raise RegistryError(f"invalid reference {ref!r}: {tag!r} is neither a version (v3), 'latest' nor an alias",
                            hint="write NAME, NAME@vN, NAME@latest or NAME@ALIAS")
    return name, (tag or None)


def base_load_policy(lineage: dict, trust_remote_code: bool = False, allow_pickle: bool = False):
    """How to load a registered version's base: the model and hash its lineage recorded at ``registry add``.

    The registry's record, not the artifact's own metadata, names the base; the
    operator's flags alone decide about remote code and pickle.
    """
    from skilltune.model.target import LoadPolicy

    base = lineage.get("base_model") or {}
    spec = base.get("spec")
    if base.get("kind") in ("local", "gguf") and base.get("path") and Path(base["path"]).exists():
        spec = base["path"]
    return LoadPolicy(base=spec, base_hash=base.get("hash"), trust_remote_code=trust_remote_code,
                      allow_pickle=allow_pickle)


def version_system_prompt(v: Version) -> str | None:
    """The system prompt a registered version was trained with (None when it had none)."""
    return ((v.lineage.get("config") or {}).get("data") or {}).get("system_prompt")


def resolve_spec(spec: str, trust_remote_code: bool = False):
    """``spec`` as (a loadable spec, how to load it): a registry reference becomes its verified checkout.

    Anything that exists on disk or names an embedded model is taken as it is.
    """
    from skilltune.model.target import LoadPolicy

    if Path(spec).exists() or "@" not in spec or spec.startswith("embedded:"):
        return spec, LoadPolicy(trust_remote_code=trust_remote_code)
    co = Registry().checkout(spec, trust_remote_code)
    return str(co.path), co.policy


def lineage_chain(v: Version) -> list[str]:
    """How a version came to be, one step a line: review studies -> preference file -> run -> this version."""
    lineage = v.lineage or {}
    steps = []
    studies = (lineage.get("provenance") or {}).get("studies") or {}
    if studies:
        steps.append("scorecard " + ", ".join(f"study {k!r} ({n} pairs)" for k, n in studies.items()))
    train = (lineage.get("data") or {}).get("train") or {}
    if train:
        steps.append(f"data {train.get('path')} (sha256 {str(train.get('sha256'))[:12]}, {train.get('rows')} rows)")
    steps.append(f"{lineage.get('objective', 'sft')} run {lineage.get('run_dir')} ({lineage.get('method')})")
    base = (lineage.get("base_model") or {}).get("spec")
    start = f"on top of {lineage['parent']}" if lineage.get("parent") else f"on {base}"
    steps.append(f"{v.name}@v{v.number} ({start})")
    return steps


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).parent)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


class Registry:
    """The registry: a database (SQLite in the skilltune home, or a shared one by URL) and an artifact store.

    A team shares both: ``SKILLTUNE_REGISTRY_URL`` (e.g. PostgreSQL) and ``SKILLTUNE_STORE`` (a shared
    filesystem path); the model cache stays per machine.
    """

    def __init__(self, url: str | None = None, store: Path | None = None, upgrade: bool | None = None):
        root = home() / "registry"
        root.mkdir(parents=True, exist_ok=True)
        self.url = url or os.environ.get("SKILLTUNE_REGISTRY_URL") or f"sqlite:///{root / 'registry.db'}"
        self.Session = make_session_factory(self.url, upgrade)
        self.store = ArtifactStore(Path(store or os.environ.get("SKILLTUNE_STORE") or root / "store"))

    @contextmanager
    def tx(self, lock: str | None = None):
        """One write transaction. SQLite serialises writers (BEGIN IMMEDIATE); elsewhere ``lock`` (a model
        name) takes a transaction-scoped advisory lock, so concurrent promotes, rollbacks and adds of one
        model never interleave their read-check-write."""
        with self.Session() as s, s.begin():
            if lock is not None and s.bind.dialect.name == "postgresql":
                s.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": zlib.crc32(lock.encode())})
            yield s

    # ------------------------------------------------------------------ reads
    def _version(self, s, name: str, tag: str | None) -> Version:
        if tag is None or tag == "latest":
            v = s.scalars(select(Version).where(Version.name == name).order_by(Version.number.desc())).first()
        elif re.fullmatch(r"v\d+", tag):
            v = s.scalars(select(Version).where(Version.name == name, Version.number == int(tag[1:]))).first()
        else:
            a = s.scalars(select(Alias).where(Alias.name == name, Alias.alias == tag)).first()
            v = s.get(Version, a.version_id) if a else None
        if v is None:
            known = s.scalars(select(Version.number).where(Version.name == name)).all()
            raise RegistryError(f"{name}@{tag or 'latest'} not found"
                                + (f"; versions: {', '.join(f'v{n}' for n in known)}" if known else
                                   f"; no model named {name!r} is registered"),
                                hint="see `skilltune registry list`")
        return v

    def get(self, ref: str) -> Version:
        with self.Session() as s:
            return self._version(s, *parse_ref(ref))

    def aliases(self, name: str) -> dict[str, int]:
        with self.Session() as s:
            rows = s.execute(select(Alias.alias, Version.number).join(Version, Alias.version_id == Version.id)
                             .where(Alias.name == name)).all()
            return {a: n for a, n in rows}

    def list(self, name: str | None = None) -> list[Version]:
        with self.Session() as s:
            q = select(Version).order_by(Version.name, Version.number)
            if name:
                q = q.where(Version.name == name)
            return list(s.scalars(q).all())

    def history(self, name: str, alias: str | None = None) -> list[AliasEvent]:
        with self.Session() as s:
            q = select(AliasEvent).where(AliasEvent.name == name).order_by(AliasEvent.id)
            if alias:
                q = q.where(AliasEvent.alias == alias)
            return list(s.scalars(q).all())

    # ------------------------------------------------------------------ writes
    def add(self, run_dir: str | Path, name: str, note: str = "", allow_duplicate: bool = False) -> Version:
        """Register the artifact of ``run_dir`` as the next version of ``name``.

        The same artifact (every file identical) registered again under the same name is
        refused unless ``allow_duplicate``: a second version of it would add nothing but a number.
        """
        validate_name(name)
        note = clean_text(note)
        run_dir = Path(run_dir)
        artifact = find_artifact(run_dir)
        if artifact is None or not (run_dir / "run.json").is_file():
            raise RegistryError(f"{run_dir} is not a finished skilltune run (no run.json or no adapter/model)",
                                hint="pass the run directory printed at the end of `skilltune train`")
        run = _run_record(run_dir / "run.json")
        summary = _json_file(run_dir / "summary.json") if (run_dir / "summary.json").is_file() else {}
        meta = read_adapter_meta(artifact)
        check_readable(artifact)
        run_config = None
        if (run_dir / "config.yaml").is_file():  # the whole config (eval and serve too), kept with the version
            run_config = load_config(run_dir / "config.yaml").model_dump(mode="json")
        metrics = {}
        if (run_dir / "eval" / "results.json").is_file():
            metrics["eval"] = _json_file(run_dir / "eval" / "results.json")
        lineage = {
            "run_dir": str(run_dir.resolve()), "base_model": run["base_model"], "method": meta.method,
            "adapter_config": _json_file(artifact / "adapter_config.json")
            if (artifact / "adapter_config.json").is_file() else None,
            "data": run["identity"]["data"], "config": run["identity"]["config"], "tokenizer": run["tokenizer"],
            "final_train_loss": summary.get("final_train_loss"), "final_val_loss": summary.get("final_val_loss"),
            "best_val_loss": summary.get("best_val_loss"), "environment": run["environment"],
            "skilltune_version": __version__, "git_commit": _git_commit(), "artifact_kind": artifact.name,
            "run_config": run_config, "objective": run.get("objective", "sft"),
            # trained on top of a registered version (DPO after SFT): the chain registry show prints
            "parent": run["base_model"]["spec"] if run["base_model"].get("kind") == "registry" else None,
            "provenance": run.get("provenance") or {},
        }
        with self.store.in_use():  # a `registry gc` never takes objects not yet in a version
            manifest = self.store.put_dir(artifact)
            with self.tx(lock=name) as s:
                same = [v.number for v in s.scalars(select(Version).where(Version.name == name)).all()
                        if v.manifest == manifest]
                if same and not allow_duplicate:
                    raise RegistryError(f"{run_dir} is already registered as {name}@v{same[0]} (identical files; any "
                                        "damaged store objects were repaired from it)",
                                        hint=f"use {name}@v{same[0]}, or pass --allow-duplicate to add it again")
                last = s.scalars(select(Version.number).where(Version.name == name)
                                 .order_by(Version.number.desc())).first() or 0
                v = Version(name=name, number=last + 1, note=note, method=meta.method, manifest=manifest,
                            lineage=lineage, metrics=metrics)
                s.add(v)
        return v

    def versions_of_run(self, run_dir: str | None) -> list[str]:
        """Every registered version (NAME@vN) made from ``run_dir``."""
        if not run_dir:
            return []
        run = Path(run_dir).resolve()
        return [f"{v.name}@v{v.number}" for v in self.list()
                if v.lineage.get("run_dir") and Path(v.lineage["run_dir"]).resolve() == run]

    def record_eval(self, results: dict, version: str | None = None) -> list[str]:
        """Attach evaluation results (with any gate) to ``version``, else to every version of the evaluated run."""
        refs = [version] if version else self.versions_of_run(results.get("run_dir"))
        for ref in refs:
            self.attach_metrics(ref, "eval", results)
        return refs

    def attach_metrics(self, ref: str, key: str, value: dict) -> None:
        with self.tx(lock=parse_ref(ref)[0]) as s:
            v = self._version(s, *parse_ref(ref))
            v.metrics = {**(v.metrics or {}), key: value}

    def promote(self, ref: str, alias: str = "production", reason: str = "", who: str | None = None,
                force: bool = False) -> Version:
        """Point ``alias`` at ``ref``; a version whose release gate failed needs ``force`` and a reason.

        The gate's outcome (passed, failed and forced, or none run) goes into the alias history.
        """
        name, tag = parse_ref(ref)
        validate_alias(alias)
        reason = clean_text(reason)
        with self.tx(lock=name) as s:
            v = self._version(s, name, tag)
            gate = ((v.metrics or {}).get("eval") or {}).get("gate")
            if gate and not gate["passed"]:
                if not (force and reason):
                    raise RegistryError(f"{name}@v{v.number} failed its release gate against {gate['against']}: "
                                        f"{gate['verdict']}",
                                        hint="fix the regression, or pass --force --reason WHY to promote anyway "
                                             "(recorded in the history)")
                reason = f"{reason} [forced past a failed gate against {gate['against']}: {gate['verdict']}]"
            elif gate:
                reason = f"{reason} [gate passed against {gate['against']}]".strip()
            a = s.scalars(select(Alias).where(Alias.name == name, Alias.alias == alias)).first()
            prev = s.get(Version, a.version_id).number if a else None
            if a:
                a.version_id = v.id
            else:
                s.add(Alias(name=name, alias=alias, version_id=v.id))
            s.add(AliasEvent(name=name, alias=alias, action="promote", from_number=prev, to_number=v.number,
                             who=clean_text(who or getpass.getuser()), reason=reason))
        return v

    def _stack(self, s, name: str, alias: str) -> list[int]:
        """The versions the alias was promoted to, with rolled-back ones popped: the last is current."""
        stack: list[int] = []
        for e in s.scalars(select(AliasEvent).where(AliasEvent.name == name, AliasEvent.alias == alias)
                           .order_by(AliasEvent.id)).all():
            if e.action == "promote":
                stack.append(e.to_number)
            elif e.action == "rollback" and stack:
                stack.pop()
        return stack

    def rollback(self, name: str, alias: str = "production", reason: str = "", who: str | None = None,
                 dry_run: bool = False) -> tuple[int, int]:
        """Move ``alias`` back to the version it pointed at before; returns (from, to)."""
        validate_name(name)
        validate_alias(alias)
        reason = clean_text(reason)
        with self.tx(lock=name) as s:
            stack = self._stack(s, name, alias)
            a = s.scalars(select(Alias).where(Alias.name == name, Alias.alias == alias)).first()
            if a is None:
                raise RegistryError(f"{name}@{alias} is not set, so there is nothing to roll back",
                                    hint=f"promote a version first: skilltune registry promote {name}@vN")
            current = s.get(Version, a.version_id).number
            if len(stack) < 2:
                raise RegistryError(f"{name}@{alias} has no earlier version to roll back to (it is v{current})",
                                    hint="promote a new version; rollback needs a previous one")
            target = stack[-2]
            v = self._version(s, name, f"v{target}")
            if not dry_run:
                a.version_id = v.id
            s.add(AliasEvent(name=name, alias=alias, action="rollback-dry-run" if dry_run else "rollback",
                             from_number=current, to_number=target, who=clean_text(who or getpass.getuser()), reason=reason))
        return current, target

    def delete(self, ref: str) -> None:
        name, tag = parse_ref(ref)
        with self.tx(lock=name) as s:
            v = self._version(s, name, tag)
            pinned = s.scalars(select(Alias.alias).where(Alias.version_id == v.id)).all()
            if pinned:
                raise RegistryError(f"{name}@v{v.number} is the target of alias(es) {', '.join(pinned)}; "
                                    "deleting it would leave them pointing at nothing",
                                    hint=f"promote another version to {pinned[0]} first")
            children = [f"{c.name}@v{c.number}" for c in s.scalars(select(Version)).all()
                        if (c.lineage or {}).get("parent") == f"{v.name}@v{v.number}"]
            if children:
                raise RegistryError(f"{name}@v{v.number} is the base of {', '.join(children)}: they load it to run",
                                    hint=f"delete {children[0]} first")
            s.delete(v)

    # ------------------------------------------------------------------ artifacts
    def materialize(self, ref: str) -> Path:
        """A verified local copy of the version's artifact (refuses a tampered store)."""
        return self._materialize(self.get(ref))

    def _materialize(self, v: Version) -> Path:
        with self.store.in_use():
            return self.store.materialize(v.manifest, _checkouts() / v.name / f"v{v.number}")

    def gc(self, dry_run: bool = False) -> "Cleanup":
        """Free the disk deleted versions used: store objects no version names any more, partial copies a
        killed `registry add` left, and this machine's checkouts of deleted versions and merged copies of them (a
        version trained on, as DPO after SFT, is merged into its base once, in the model cache). Versions of every
        name in this registry's database count; a store must not be shared with another database's versions."""
        with self.store.alone() as alone:
            if not alone:
                raise RegistryError(f"the artifact store {self.store.root} is in use: a `registry add` or a "
                                    "checkout is running", hint="run `skilltune registry gc` again when it is done")
            with self.Session() as s:
                versions = s.execute(select(Version.name, Version.number, Version.manifest)).all()
            unused, partial = self.store.unused({d for _, _, m in versions for d in m.values()})
            live = {(name, f"v{number}") for name, number, _ in versions}
            stale = [d for d in sorted(_checkouts().glob("*/*")) if d.is_dir() and not d.is_symlink()
                     and (d.name.startswith(".tmp-") or (d.parent.name, d.name) not in live)]
            merged = {merged_version_dir(*v) for v in versions}
            stale += [d for d in sorted(models_cache().glob("registry-*")) if d.is_dir() and not d.is_symlink()
                      and d not in merged]
            cleanup = Cleanup(unused, partial, stale)
            if not dry_run:
                cleanup.remove()
        return cleanup

    def checkout(self, ref: str, trust_remote_code: bool = False) -> "Checkout":
        """What every command that loads a version needs: the version, its verified files, and how to load its
        base (the model and hash its lineage recorded; remote code only by the operator's flag)."""
        v = self.get(ref)
        return Checkout(v, f"{v.name}@v{v.number}", self._materialize(v),
                        base_load_policy(v.lineage, trust_remote_code))


@dataclass(frozen=True)
class Checkout:
    version: Version
    ref: str  # NAME@vN
    path: Path  # the verified artifact folder
    policy: object  # LoadPolicy for its base model


def _checkouts() -> Path:
    return home() / "registry" / "checkout"


@dataclass
class Cleanup:
    """What `registry gc` removes (or would, in a dry run); ``sizes`` are the bytes each part frees, taken
    before anything is removed."""
    unused: list[Path]  # store objects
    partial: list[Path]  # store objects an interrupted add left half-copied
    checkouts: list[Path]  # checkouts and merged copies of deleted versions
    sizes: dict[str, int] = field(init=False)

    def __post_init__(self):
        self.sizes = {part: sum(_bytes(p) for p in getattr(self, part)) for part in ("unused", "partial", "checkouts")}

    def remove(self) -> None:
        for path in self.unused + self.partial:
            path.unlink(missing_ok=True)
        for folder in self.checkouts:
            shutil.rmtree(folder, ignore_errors=True)


def _bytes(path: Path) -> int:
    files = [path] if path.is_file() else path.rglob("*")
    return sum(f.lstat().st_size for f in files if f.is_file() and not f.is_symlink())


def diff_versions(a: Version, b: Version) -> dict[str, list[str]]:
    from skilltune.train.checkpoint import identity_diff

    def metric_lines():
        out = []
        ma = (a.metrics or {}).get("eval", {}).get("metrics", {})
        mb = (b.metrics or {}).get("eval", {}).get("metrics", {})
        for k in sorted(set(ma) | set(mb)):
            va, vb = ma.get(k, {}).get("tuned"), mb.get(k, {}).get("tuned")
            if va != vb:
                out.append(f"{k}: {va} -> {vb}")
        for key in ("final_train_loss", "final_val_loss", "best_val_loss"):
            if a.lineage.get(key) != b.lineage.get(key):
                out.append(f"{key}: {a.lineage.get(key)} -> {b.lineage.get(key)}")
        return out

    return {"config": identity_diff(a.lineage["config"], b.lineage["config"]),
            "data": identity_diff(a.lineage["data"], b.lineage["data"]),
            "base_model": identity_diff(a.lineage["base_model"], b.lineage["base_model"]),
            "metrics": metric_lines()}
