"""The request log: every request's time, version, client, prompt, output, latency, tokens and status.

SQLAlchemy over a SQLite file per served model (the default, owner-only, rotated by
size: past ``max_bytes`` it is renamed ``.1``, the older ``.1`` dropped) or over a
shared database by URL (``SKILLTUNE_REQUESTLOG_URL``, e.g. the team's PostgreSQL),
where rows carry the served model's name and the oldest beyond ``max_rows`` are
deleted. PII is redacted with the audit's detectors (on by default).
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

from sqlalchemy import (Column, Float, Integer, MetaData, String, Table, Text, create_engine, delete, event, insert,
                        inspect, select, text)
from sqlalchemy.exc import DatabaseError

from skilltune.data.pii import redact
from skilltune.errors import unreadable_database
from skilltune.paths import private_file, sqlite_file
from skilltune.registry.db import shown

_META = MetaData()
REQUESTS = Table(
    "requests", _META,
    Column("id", Integer, primary_key=True, autoincrement=True),
    Column("ts", Float, index=True), Column("service", String(200), default="", index=True),
    Column("version", String(200)), Column("route", String(200)), Column("prompt", Text), Column("output", Text),
    Column("latency_s", Float), Column("prompt_tokens", Integer), Column("completion_tokens", Integer),
    Column("status", Integer), Column("error", Text), Column("client", String(200), default=""),
)
_COLUMNS = ("ts", "version", "route", "prompt", "output", "latency_s", "prompt_tokens", "completion_tokens",
            "status", "error", "client")
ADDED_LATER = {"client": "VARCHAR(200) DEFAULT ''", "service": "VARCHAR(200) DEFAULT ''"}


def default_target(name: str) -> str | Path:
    """Where ``name``'s requests are logged: ``$SKILLTUNE_REQUESTLOG_URL``, else a SQLite file in the home."""
    from skilltune.paths import home

    return os.environ.get("SKILLTUNE_REQUESTLOG_URL") or home() / "serving" / f"{name}.requests.db"


class RequestLog:
    def __init__(self, target: str | Path, redact_pii: bool = True, max_bytes: int = 100 * 1024**2,
                 service: str = "", max_rows: int = 5_000_000):
        """``target``: a SQLite file path, or a database URL (then rows are kept per ``service``)."""
        is_url = isinstance(target, str) and "://" in target
        self.url = target if is_url else f"sqlite:///{Path(target)}"
        self.path = sqlite_file(self.url)
        self.redact, self.max_bytes, self.max_rows, self.service = redact_pii, max_bytes, max_rows, service
        self._lock = threading.Lock()
        self._writes = 0
        self._open()

    def _open(self) -> None:
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            private_file(self.path)  # prompts and outputs: owner-only (0600), like its -wal/-shm files
        self.engine = create_engine(self.url, connect_args={"check_same_thread": False, "timeout": 30}
                                    if self.path is not None else {})
        if self.path is not None:
            @event.listens_for(self.engine, "connect")
            def _wal(dbapi_conn, _record):
                dbapi_conn.execute("PRAGMA journal_mode=WAL")
        try:
            _META.create_all(self.engine)
            with self.engine.begin() as c:  # logs written before these columns existed
                have = {col["name"] for col in inspect(c).get_columns("requests")}
                for column, ddl in ADDED_LATER.items():
                    if column not in have:
                        c.execute(text(f"ALTER TABLE requests ADD COLUMN {column} {ddl}"))
        except DatabaseError as exc:
            raise unreadable_database("request log", str(self.path or shown(self.url)), exc) from None

    def _clean(self, text_: str) -> str:
        return redact(text_)[0] if self.redact else text_

    def write(self, version: str, route: str, prompt: str, output: str, latency_s: float, prompt_tokens: int,
              completion_tokens: int, status: int, error: str = "", client: str = "") -> None:
        row = {"ts": time.time(), "service": self.service, "version": version, "route": route,
               "prompt": self._clean(prompt), "output": self._clean(output), "latency_s": latency_s,
               "prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "status": status,
               "error": self._clean(error), "client": client}
        with self._lock:
            with self.engine.begin() as c:
                c.execute(insert(REQUESTS), row)
            self._writes += 1
            self._rotate()

    def _rotate(self) -> None:
        if self.path is None:  # a shared database: keep the newest max_rows of this service
            if self._writes % 1000 == 0:
                with self.engine.begin() as c:
                    cut = c.execute(select(REQUESTS.c.id).where(REQUESTS.c.service == self.service)
                                    .order_by(REQUESTS.c.id.desc()).offset(self.max_rows).limit(1)).scalar()
                    if cut is not None:
                        c.execute(delete(REQUESTS).where(REQUESTS.c.service == self.service, REQUESTS.c.id <= cut))
            return
        wal = Path(str(self.path) + "-wal")
        if self.path.stat().st_size + (wal.stat().st_size if wal.exists() else 0) <= self.max_bytes:
            return
        with self.engine.connect() as c:  # fold the WAL in first: only the rows themselves count toward the size
            c.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")
        if self.path.stat().st_size > self.max_bytes:
            self.engine.dispose()
            os.replace(self.path, self.path.with_name(self.path.name + ".1"))
            for suffix in ("-wal", "-shm"):
                Path(str(self.path) + suffix).unlink(missing_ok=True)
            self._open()

    def rows(self) -> list[dict]:
        with self._lock, self.engine.connect() as c:
            q = select(*(REQUESTS.c[name] for name in _COLUMNS)).order_by(REQUESTS.c.id)
            if self.path is None:
                q = q.where(REQUESTS.c.service == self.service)
            return [dict(r._mapping) for r in c.execute(q)]

    def close(self) -> None:
        with self._lock:
            self.engine.dispose()
