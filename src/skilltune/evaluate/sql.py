"""SQL execution accuracy, compared the way Spider's test-suite evaluation does.

Prediction and reference run against a SQLite file opened **read-only**, with an
authorizer that allows reads alone (a generated ``DROP TABLE``, ``ATTACH DATABASE`` or
``VACUUM INTO`` fails instead of touching any file) and a per-query time limit
(an endless query is cut off and counts as wrong). Result sets compare as bags:
row order matters only when the reference has ORDER BY, column order never does.
"""

from __future__ import annotations

import re
import sqlite3
import time
from collections import Counter
from pathlib import Path


class QueryFailed(Exception):
    pass


# What a model-written query may do: read. Read-only mode alone still lets ATTACH DATABASE and
# VACUUM INTO create files anywhere the process can write; the authorizer refuses every action
# that is not a read, and the attached-database limit of 0 closes ATTACH a second way.
_ALLOWED_ACTIONS = {sqlite3.SQLITE_SELECT, sqlite3.SQLITE_READ, sqlite3.SQLITE_FUNCTION, sqlite3.SQLITE_RECURSIVE}
# Functions that read nothing but can load code or touch files are refused by name.
_DENIED_FUNCTIONS = {"load_extension", "readfile", "writefile", "edit", "fts3_tokenizer"}


def _authorize(action: int, arg1, arg2, dbname, source) -> int:
    if action not in _ALLOWED_ACTIONS:
        return sqlite3.SQLITE_DENY
    if action == sqlite3.SQLITE_FUNCTION and (arg2 or "").lower() in _DENIED_FUNCTIONS:
        return sqlite3.SQLITE_DENY
    return sqlite3.SQLITE_OK


def _connect(db: str | Path) -> sqlite3.Connection:
    uri = f"file:{Path(db).resolve()}?mode=ro"
    con = sqlite3.connect(uri, uri=True, check_same_thread=False)
    con.execute("PRAGMA query_only = ON")
    con.setlimit(sqlite3.SQLITE_LIMIT_ATTACHED, 0)
    con.set_authorizer(_authorize)
    return con


def run_query(db: str | Path, sql: str, timeout_s: float = 2.0, max_rows: int = 10000) -> list[tuple]:
    """Rows of ``sql`` on ``db`` (read-only, time-limited); raises QueryFailed on any error."""
    con = _connect(db)
    deadline = time.monotonic() + timeout_s
    con.set_progress_handler(lambda: 1 if time.monotonic() > deadline else 0, 10000)
    try:
        cur = con.execute(sql)
        rows = cur.fetchmany(max_rows + 1)
        if len(rows) > max_rows:
            raise QueryFailed(f"more than {max_rows} rows")
        return rows
    except sqlite3.Error as exc:
        raise QueryFailed(str(exc)) from None
    except (ValueError, sqlite3.Warning) as exc:  # e.g. several statements at once
        raise QueryFailed(str(exc)) from None
    finally:
        con.close()


def _norm_value(v):
    if isinstance(v, float):
        return round(v, 4)
    return v


def _column_signature(rows: list[tuple]) -> list[tuple]:
    """Each column as a sorted tuple of its values, so column order can be ignored."""
    if not rows:
        return []
    cols = list(zip(*rows))
    return sorted((tuple(sorted(map(repr, map(_norm_value, c)))) for c in cols))


def results_match(pred: list[tuple], ref: list[tuple], ordered: bool) -> bool:
    if len(pred) != len(ref):
        return False
    if not ref:
        return not pred
    if len(pred[0]) != len(ref[0]):
        return False
    if _column_signature(pred) != _column_signature(ref):
        return False
    # Align prediction columns to reference columns by content, then compare rows.
    ref_cols = [tuple(map(_norm_value, c)) for c in zip(*ref)]
    pred_cols = [tuple(map(_norm_value, c)) for c in zip(*pred)]
    perm, used = [], set()
    for rc in ref_cols:
        match = next((j for j, pc in enumerate(pred_cols) if j not in used and
                      (pc == rc if ordered else Counter(pc) == Counter(rc))), None)
        if match is None:
            return False
        perm.append(match)
        used.add(match)
    pred_rows = [tuple(_norm_value(row[j]) for j in perm) for row in pred]
    ref_rows = [tuple(map(_norm_value, row)) for row in ref]
    return pred_rows == ref_rows if ordered else Counter(pred_rows) == Counter(ref_rows)


def has_order_by(sql: str) -> bool:
    return re.search(r"\border\s+by\b", sql, re.IGNORECASE) is not None


def extract_sql(text: str) -> str:
    """The query in a model's answer: strips code fences and surrounding prose."""
    fence = re.search(r"```(?:sql)?\s*(.*?)```", text, re.DOTALL | re.IGNORECASE)
    if fence:
        text = fence.group(1)
    return text.strip()


def sql_exec_score(prediction: str, reference: str, db: str | Path, timeout_s: float = 2.0) -> float:
    try:
        ref_rows = run_query(db, reference, timeout_s)
    except QueryFailed as exc:
        raise ValueError(f"the reference query fails on {db}: {exc}: {reference}") from None
    try:
        pred_rows = run_query(db, extract_sql(prediction), timeout_s)
    except QueryFailed:
        return 0.0
    return 1.0 if results_match(pred_rows, ref_rows, ordered=has_order_by(reference)) else 0.0


def sql_valid_score(prediction: str) -> float:
    import sqlglot
    from sqlglot.errors import ParseError

    sql = extract_sql(prediction)
    if not sql:
        return 0.0
    try:
        parsed = sqlglot.parse(sql, read="sqlite")
    except (ParseError, Exception):  # noqa: BLE001 - sqlglot raises several kinds
        return 0.0
    return 1.0 if parsed and all(p is not None for p in parsed) else 0.0
