"""`data clean`, `data split` and `data mix`: new files from old, inputs never touched.

Outputs are written atomically; JSONL rows that are kept are copied byte for byte
(their original format preserved) unless redaction rewrites them. Every dropped row
is listed with its reason and source line in a sidecar file.
"""

from __future__ import annotations

import json
import os
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from skilltune.data.audit.checks import minhash_signatures, near_duplicate_pairs
from skilltune.data.pii import redact
from skilltune.data.reader import read_file, write_jsonl
from skilltune.data.types import Example
from skilltune.errors import DataError
from skilltune.paths import atomic_write_text


def _refuse_overwrite(src: str | Path, dst: str | Path) -> None:
    if Path(dst).exists() and os.path.samefile(src, dst):
        raise DataError(f"refusing to overwrite the input {src}", hint="write to a new file; inputs are never modified")


def _raw_lines(path: Path) -> dict[int, bytes]:
    """Raw bytes of each line of a JSONL file (for byte-exact copies)."""
    with open(path, "rb") as fh:
        return {i: line.rstrip(b"\r\n") for i, line in enumerate(fh, start=1)}


def _redact_obj(obj):
    if isinstance(obj, str):
        return redact(obj)[0]
    if isinstance(obj, list):
        return [_redact_obj(x) for x in obj]
    if isinstance(obj, dict):
        return {k: _redact_obj(v) for k, v in obj.items()}
    return obj


def _mapped(columns) -> bool:
    return columns is not None and any((columns.prompt, columns.completion, columns.system))


def _emit(path: Path, examples: list[Example], out: Path, redact_pii: bool, columns=None) -> None:
    """Write ``examples``: JSONL rows byte for byte, others (and column-mapped rows) in skilltune's own form."""
    if path.suffix.lower() in (".jsonl", ".ndjson") and not _mapped(columns):
        raw = _raw_lines(path)
        lines = []
        for ex in examples:
            line = raw[ex.line]
            if line.startswith(b"\xef\xbb\xbf"):
                line = line[3:]
            if redact_pii:
                line = json.dumps(_redact_obj(json.loads(line)), ensure_ascii=False).encode()
            lines.append(line.decode("utf-8"))
        atomic_write_text(out, "".join(ln + "\n" for ln in lines))
    else:
        rows = [ex.to_json() for ex in examples]
        write_jsonl(out, [_redact_obj(r) for r in rows] if redact_pii else rows)


@dataclass
class CleanResult:
    kept: int
    dropped: int
    reasons: dict[str, int]
    out: Path
    sidecar: Path


def _nothing_written(src: Path, report, what: str) -> DataError:
    kinds = sorted({p.kind for p in report.problems})
    return DataError(f"{src}: {report.rows} row(s) read, none usable, so {what} would be empty"
                     + (f" ({', '.join(kinds)})" if kinds else ""),
                     hint="map the columns (--column prompt=COL --column completion=COL, or --config CONFIG with "
                          "data.columns), or see `skilltune data audit` for what is wrong")


def clean(src: str | Path, dst: str | Path, near_dups: bool = False, redact_pii: bool = False,
          threshold: float = 0.85, fmt: str = "auto", columns=None) -> CleanResult:
    src, dst = Path(src), Path(dst)
    _refuse_overwrite(src, dst)
    report = read_file(src, fmt, columns)
    if report.rows and not report.examples:
        raise _nothing_written(src, report, f"the cleaned file {dst}")
    dropped: list[dict] = [{"line": p.line, "reason": p.kind, "detail": str(p)} for p in report.problems
                           if p.kind != "empty_file"]
    seen: dict[str, int] = {}
    kept: list[Example] = []
    for ex in report.examples:
        key = ex.key()
        if key in seen:
            dropped.append({"line": ex.line, "reason": "exact_duplicate", "detail": f"duplicate of line {seen[key]}"})
            continue
        seen[key] = ex.line
        kept.append(ex)
    if near_dups and len(kept) > 1:
        drop = {}
        for i, j, sim in near_duplicate_pairs(s := minhash_signatures(kept), s, threshold, same=True):
            # Near-identical rows with different answers are a contrast pair, not a duplicate:
            # "top 3 ... LIMIT 3" and "top 5 ... LIMIT 5" teach what the number does.
            if i not in drop and _same_answer(kept[i], kept[j]):
                drop.setdefault(j, (kept[i].line, sim))
        for j, (first, sim) in drop.items():
            dropped.append({"line": kept[j].line, "reason": "near_duplicate",
                            "detail": f"near-duplicate of line {first} (Jaccard {sim:.2f})"})
        kept = [ex for j, ex in enumerate(kept) if j not in drop]
    _emit(src, kept, dst, redact_pii, columns)
    sidecar = dst.with_name(dst.name + ".dropped.jsonl")
    dropped.sort(key=lambda d: d["line"])
    atomic_write_text(sidecar, "".join(json.dumps(d) + "\n" for d in dropped))
    reasons: dict[str, int] = defaultdict(int)
    for d in dropped:
        reasons[d["reason"]] += 1
    return CleanResult(len(kept), len(dropped), dict(reasons), dst, sidecar)


def _same_answer(a: Example, b: Example) -> bool:
    return " ".join(a.completion.split()).lower() == " ".join(b.completion.split()).lower()


def _clusters(examples: list[Example], threshold: float) -> list[list[int]]:
    """Groups of indices that are exact or near duplicates of each other (union-find)."""
    parent = list(range(len(examples)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    def union(a: int, b: int) -> None:
        parent[find(a)] = find(b)

    first: dict[str, int] = {}
    for i, ex in enumerate(examples):
        k = ex.key()
        if k in first:
            union(i, first[k])
        else:
            first[k] = i
    if len(examples) > 1:
        sigs = minhash_signatures(examples)
        for i, j, _ in near_duplicate_pairs(sigs, sigs, threshold, same=True):
            union(i, j)
    groups: dict[int, list[int]] = defaultdict(list)
    for i in range(len(examples)):
        groups[find(i)].append(i)
    return sorted(groups.values(), key=lambda g: g[0])


def split(src: str | Path, out_dir: str | Path, val: float = 0.1, test: float = 0.1, seed: int = 42,
          threshold: float = 0.85, fmt: str = "auto", columns=None) -> dict[str, int]:
    """Deterministic split in which near-duplicate clusters never straddle two splits."""
    if val < 0 or test < 0 or val + test >= 1:
        raise DataError(f"--val {val} and --test {test} must be >= 0 and sum to less than 1")
    src, out_dir = Path(src), Path(out_dir)
    report = read_file(src, fmt, columns)
    if report.rows and not report.examples:
        raise _nothing_written(src, report, "every split")
    if report.problems:
        raise DataError(f"{src}: {len(report.problems)} malformed row(s), first: {report.problems[0]}",
                        hint=f"clean first: skilltune data clean {src} CLEAN.jsonl")
    exs = report.examples
    clusters = _clusters(exs, threshold)
    order = np.random.default_rng(seed).permutation(len(clusters))
    targets = {"test": round(len(exs) * test), "val": round(len(exs) * val)}
    parts: dict[str, list[int]] = {"train": [], "val": [], "test": []}
    for c in order:
        group = clusters[c]
        for name in ("test", "val"):
            if len(parts[name]) < targets[name] and len(parts[name]) + len(group) <= targets[name] + max(1, len(group) // 2):
                parts[name] += group
                break
        else:
            parts["train"] += group
    out_dir.mkdir(parents=True, exist_ok=True)
    for name, idx in parts.items():
        _refuse_overwrite(src, out_dir / f"{name}.jsonl")
        _emit(src, [exs[i] for i in sorted(idx)], out_dir / f"{name}.jsonl", False, columns)
    return {k: len(v) for k, v in parts.items()}


def mix(skill: str | Path, general: str | Path, ratio: float, dst: str | Path, seed: int = 42,
        columns=None) -> dict[str, int]:
    """Write SKILL plus general data so that general rows are ``ratio`` of the output.

    ``columns`` maps the skill file's columns (the general file is skilltune's own JSONL, e.g. from replay).
    """
    if not 0 < ratio < 1:
        raise DataError(f"--ratio must be between 0 and 1 (e.g. 0.08 for 8%), got {ratio}")
    for src in (skill, general):
        _refuse_overwrite(src, dst)
    s_rep, g_rep = read_file(skill, "auto", columns), read_file(general)
    for rep, path in ((s_rep, Path(skill)), (g_rep, Path(general))):
        if rep.rows and not rep.examples:
            raise _nothing_written(path, rep, f"the mix {dst}")
    for rep in (s_rep, g_rep):
        if rep.problems:
            raise DataError(f"{rep.path}: {len(rep.problems)} malformed row(s), first: {rep.problems[0]}",
                            hint="clean it first with `skilltune data clean`")
    n_skill = len(s_rep.examples)
    n_general = round(ratio * n_skill / (1 - ratio))
    if n_general > len(g_rep.examples):
        raise DataError(f"{general} has {len(g_rep.examples)} examples; {n_general} are needed for ratio {ratio}",
                        hint="lower --ratio or generate more with `skilltune data replay --n N`")
    rng = np.random.default_rng(seed)
    picked = [g_rep.examples[i] for i in sorted(rng.choice(len(g_rep.examples), n_general, replace=False))]
    rows = s_rep.examples + picked
    order = rng.permutation(len(rows))
    write_jsonl(dst, [rows[i] for i in order])
    return {"skill": n_skill, "general": n_general, "total": len(rows)}

