"""Read training data files into :class:`Example` rows, streaming, with file:line problems.

JSONL is read line by line as bytes, so a bad line (invalid JSON, non-UTF-8 bytes)
becomes a problem that names its line instead of stopping the read; a UTF-8 BOM,
CRLF line ends and blank lines are tolerated and reported as notes. JSON arrays,
CSV and Parquet are read too; ``data.columns`` maps their columns to fields.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from skilltune.data.formats import FORMATS, FieldProblem, detect_format
from skilltune.data.types import Example, RowProblem
from skilltune.errors import DataError
from skilltune.text import lone_surrogate


@dataclass
class ReadReport:
    """Everything learnt while reading one file."""

    path: str
    format: str | None = None
    rows: int = 0
    examples: list[Example] = field(default_factory=list)
    problems: list[RowProblem] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    first_line_of_format: dict[str, int] = field(default_factory=dict)


def _jsonl_rows(path: Path, report: ReadReport) -> Iterator[tuple[int, object]]:
    blank = crlf = 0
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]
                report.notes.append(f"{path}:1: file starts with a UTF-8 BOM (ignored)")
            if raw.endswith(b"\r\n"):
                crlf += 1
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                yield lineno, RowProblem(str(path), lineno, None,
                                         f"not valid UTF-8 (byte {exc.start}: {raw[exc.start:exc.start + 1]!r}); "
                                         "re-save the file as UTF-8", "not_utf8")
                continue
            if not text.strip():
                blank += 1
                continue
            try:
                yield lineno, json.loads(text)
            except json.JSONDecodeError as exc:
                yield lineno, RowProblem(str(path), lineno, None,
                                         f"invalid JSON at column {exc.colno}: {exc.msg}", "invalid_json")
            except RecursionError:
                yield lineno, RowProblem(str(path), lineno, None, "JSON nested too deeply to be a data row",
                                         "invalid_json")
    if crlf:
        report.notes.append(f"{path}: {crlf} lines end in CRLF (Windows line ends; read fine)")
    if blank:
        report.notes.append(f"{path}: {blank} blank lines ignored")


def _json_array_rows(path: Path, report: ReadReport) -> Iterator[tuple[int, object]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: not a valid JSON file ({exc})", hint="use JSONL (one object per line)") from None
    except RecursionError:
        raise DataError(f"{path}: JSON nested too deeply to be data rows",
                        hint="use JSONL with one flat object per row") from None
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        raise DataError(f"{path}: a .json file must hold an array of objects", hint="or use JSONL")
    report.notes.append(f"{path}: JSON array; 'line' numbers are 1-based array positions")
    yield from enumerate(data, start=1)


# One CSV field may hold a long document; the csv module's default limit (128 KiB) would stop a
# legitimate file, no limit would let one malformed quote swallow the whole file into memory.
CSV_FIELD_LIMIT = 16 * 1024 * 1024


def _csv_rows(path: Path, report: ReadReport) -> Iterator[tuple[int, object]]:
    csv.field_size_limit(max(csv.field_size_limit(), CSV_FIELD_LIMIT))
    with open(path, newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        row_no = 1  # line 1 is the header
        try:
            for row in reader:
                row_no += 1
                yield row_no, dict(row)
        except csv.Error as exc:
            raise DataError(f"{path}:{reader.line_num}: unreadable CSV ({exc}; fields may be at most "
                            f"{CSV_FIELD_LIMIT // 2**20} MiB)",
                            hint="check the quoting near that line, or convert the file to JSONL") from None
        except UnicodeDecodeError as exc:
            raise DataError(f"{path}:{reader.line_num + 1}: not valid UTF-8 (byte {exc.start} of a read block)",
                            hint="re-save the file as UTF-8") from None


def _parquet_rows(path: Path, report: ReadReport) -> Iterator[tuple[int, object]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    line = 0
    try:
        for batch in pq.ParquetFile(path).iter_batches(batch_size=4096):
            for row in batch.to_pylist():
                line += 1
                yield line, row
    except (pa.ArrowException, OSError) as exc:
        raise DataError(f"{path}: unreadable Parquet after row {line} ({type(exc).__name__}: "
                        f"{str(exc).splitlines()[0][:200] if str(exc) else ''})",
                        hint="the file is truncated or not Parquet; write it again, or convert it to JSONL") from None


_READERS = {".jsonl": _jsonl_rows, ".ndjson": _jsonl_rows, ".json": _json_array_rows,
            ".csv": _csv_rows, ".parquet": _parquet_rows}


def _apply_columns(obj: dict, columns) -> dict:
    if columns is None or not any((columns.prompt, columns.completion, columns.system)):
        return obj
    out = {}
    for target in ("prompt", "completion", "system"):
        name = getattr(columns, target)
        if name:
            out[target] = obj.get(name)
    return out


def not_a_data_file(path: str | Path) -> str | None:
    """Why ``path`` cannot be read as a data file (missing, or a folder); None when it is a file."""
    path = Path(path)
    if path.is_file():
        return None
    return f"{path} is a folder, not a data file" if path.is_dir() else f"data file not found: {path}"


def _lone_surrogate(texts: list[str]) -> str | None:
    """A row's text with half a surrogate pair (``"\\ud800"`` in JSON): valid JSON, not text a tokenizer encodes."""
    for text in texts:
        if (at := lone_surrogate(text)) is not None:
            return (f"a lone surrogate {text[at]!r} (an escape for half a character) at character {at} "
                    f"of {text[max(0, at - 20):at]!r}...; fix the writer that produced it")
    return None


def iter_examples(path: str | Path, fmt: str = "auto", columns=None,
                  report: ReadReport | None = None) -> Iterator[Example | RowProblem]:
    """Stream the rows of ``path`` as examples or problems (constant memory)."""
    path = Path(path)
    report = report if report is not None else ReadReport(str(path))
    if problem := not_a_data_file(path):
        raise DataError(problem, hint="check data.train / data.val / data.test in your config")
    reader = _READERS.get(path.suffix.lower())
    if reader is None:
        raise DataError(f"{path}: unsupported file type '{path.suffix}'",
                        hint=f"use one of: {', '.join(sorted(_READERS))}")
    if fmt != "auto" and fmt not in FORMATS:
        raise DataError(f"unknown data format '{fmt}'", hint=f"use one of: auto, {', '.join(FORMATS)}")
    for lineno, obj in reader(path, report):
        report.rows += 1
        if isinstance(obj, RowProblem):
            yield obj
            continue
        if not isinstance(obj, dict):
            yield RowProblem(str(path), lineno, None,
                             f"each row must be a JSON object, got {type(obj).__name__}", "not_object")
            continue
        obj = _apply_columns(obj, columns)
        shape = fmt if fmt != "auto" else detect_format(obj)
        if shape is None:
            yield RowProblem(str(path), lineno, None,
                             f"unrecognised row with keys {sorted(obj)[:6]}; expected prompt/completion, messages, "
                             "instruction/output (alpaca), conversations (sharegpt) or prompt/chosen/rejected "
                             "(preference)", "unknown_format")
            continue
        report.first_line_of_format.setdefault(shape, lineno)
        if report.format is None:
            report.format = shape
        elif shape != report.format:
            firsts = ", ".join(f"{k} first at line {v}" for k, v in report.first_line_of_format.items())
            yield RowProblem(str(path), lineno, None,
                             f"this row is {shape} but the file is {report.format} ({firsts}); "
                             "one file must use one format", "mixed_format")
            continue
        row_format = FORMATS[shape]
        try:
            turns = row_format.parse(obj)
            rejected = row_format.rejected(obj) if row_format.rejected else None
        except FieldProblem as exc:
            yield RowProblem(str(path), lineno, exc.field, exc.message, exc.kind)
            continue
        if problem := _lone_surrogate([t.content for t in turns] + [rejected or ""]):
            yield RowProblem(str(path), lineno, None, problem, "not_utf8")
            continue
        yield Example(turns=turns, source=str(path), line=lineno, rejected=rejected,
                      meta={k: obj[k] for k in row_format.keep if k in obj})


def read_file(path: str | Path, fmt: str = "auto", columns=None) -> ReadReport:
    """Read a whole file: examples, problems and notes."""
    report = ReadReport(str(path))
    for item in iter_examples(path, fmt, columns, report):
        (report.problems if isinstance(item, RowProblem) else report.examples).append(item)
    if report.rows == 0:
        report.problems.append(RowProblem(str(path), 0, None, "the file is empty", "empty_file"))
    return report


def load_examples(path: str | Path, fmt: str = "auto", columns=None, system_prompt: str | None = None) -> list[Example]:
    """Read a file for training or evaluation; any malformed row is an error naming its line."""
    report = read_file(path, fmt, columns)
    if report.problems:
        shown = "\n".join(f"  {p}" for p in report.problems[:10])
        more = f"\n  ... and {len(report.problems) - 10} more" if len(report.problems) > 10 else ""
        raise DataError(
            f"{path}: {len(report.problems)} malformed row(s):\n{shown}{more}",
            hint=f"see `skilltune data audit {path}`; `skilltune data clean {path} OUT` drops bad rows",
        )
    if system_prompt:
        from skilltune.data.types import Turn

        for ex in report.examples:
            if ex.turns[0].role != "system":
                ex.turns.insert(0, Turn("system", system_prompt))
    return report.examples


def write_jsonl(path: str | Path, examples) -> None:
    """Write examples (or raw dicts) as JSONL atomically."""
    from skilltune.paths import atomic_write_text

    lines = [json.dumps(e.to_json() if isinstance(e, Example) else e, ensure_ascii=False) for e in examples]
    atomic_write_text(Path(path), "\n".join(lines) + ("\n" if lines else ""))
