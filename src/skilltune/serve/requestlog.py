"""The request log: every request's time, version, prompt, output, latency, tokens and status.

SQLite, one row per request, PII redacted with the audit's detectors (on by default),
rotated by size: when the file passes ``max_bytes`` it is renamed ``.1`` (the older
``.1`` dropped) and a new one started.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from pathlib import Path

from skilltune.data.pii import redact
from skilltune.paths import private_file

_SCHEMA = """CREATE TABLE IF NOT EXISTS requests (
    id INTEGER PRIMARY KEY, ts REAL, version TEXT, route TEXT, prompt TEXT, output TEXT,
    latency_s REAL, prompt_tokens INTEGER, completion_tokens INTEGER, status INTEGER, error TEXT,
    client TEXT DEFAULT '')"""
_COLUMNS = ("ts", "version", "route", "prompt", "output", "latency_s", "prompt_tokens", "completion_tokens",
            "status", "error", "client")


class RequestLog:
    def __init__(self, path: Path, redact_pii: bool = True, max_bytes: int = 100 * 1024**2):
        self.path, self.redact, self.max_bytes = Path(path), redact_pii, max_bytes
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._open()

    def _open(self) -> None:
        private_file(self.path)  # prompts and outputs: owner-only (0600), like its -wal/-shm files
        self.con = sqlite3.connect(self.path, check_same_thread=False)
        self.con.execute("PRAGMA journal_mode=WAL")
        self.con.execute(_SCHEMA)
        have = {row[1] for row in self.con.execute("PRAGMA table_info(requests)")}
        if "client" not in have:  # a log written before API keys had names
            self.con.execute("ALTER TABLE requests ADD COLUMN client TEXT DEFAULT ''")
        self.con.commit()

    def _clean(self, text: str) -> str:
        return redact(text)[0] if self.redact else text

    def write(self, version: str, route: str, prompt: str, output: str, latency_s: float, prompt_tokens: int,
              completion_tokens: int, status: int, error: str = "", client: str = "") -> None:
        with self._lock:
            self.con.execute(f"INSERT INTO requests ({', '.join(_COLUMNS)}) VALUES ({', '.join('?' * len(_COLUMNS))})",
                             (time.time(), version, route, self._clean(prompt), self._clean(output), latency_s,
                              prompt_tokens, completion_tokens, status, self._clean(error), client))
            self.con.commit()
            wal = Path(str(self.path) + "-wal")
            if self.path.stat().st_size + (wal.stat().st_size if wal.exists() else 0) > self.max_bytes:
                self.con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
                self.con.close()
                os.replace(self.path, self.path.with_name(self.path.name + ".1"))
                for suffix in ("-wal", "-shm"):
                    Path(str(self.path) + suffix).unlink(missing_ok=True)
                self._open()

    def rows(self) -> list[dict]:
        with self._lock:
            cur = self.con.execute(f"SELECT {', '.join(_COLUMNS)} FROM requests ORDER BY id")
            cols = [c[0] for c in cur.description]
            return [dict(zip(cols, r)) for r in cur.fetchall()]

    def close(self) -> None:
        with self._lock:
            self.con.close()


def dumps(obj) -> str:
    return json.dumps(obj, ensure_ascii=False)
