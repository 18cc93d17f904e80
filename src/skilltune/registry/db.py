"""Registry tables (SQLAlchemy; SQLite by default, PostgreSQL by URL).

Every alias move is an :class:`AliasEvent` row: the history of who moved which alias
from which version to which, when and why. Rollback reads that history.
"""

from __future__ import annotations

import datetime as dt

from sqlalchemy import JSON, DateTime, ForeignKey, Integer, String, Text, UniqueConstraint, create_engine, event
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker

from skilltune.paths import private_file, sqlite_file


class Base(DeclarativeBase):
    pass


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)


class Version(Base):
    __tablename__ = "versions"
    __table_args__ = (UniqueConstraint("name", "number"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200), index=True)
    number: Mapped[int] = mapped_column(Integer)
    created: Mapped[dt.datetime] = mapped_column(DateTime, default=_now)
    note: Mapped[str] = mapped_column(Text, default="")
    method: Mapped[str] = mapped_column(String(20))
    manifest: Mapped[dict] = mapped_column(JSON)  # relative path -> sha256 of the artifact's files
    lineage: Mapped[dict] = mapped_column(JSON)  # base model, data, config, losses, environment, git
    metrics: Mapped[dict] = mapped_column(JSON, default=dict)  # eval results, scorecard verdict


class Alias(Base):
    __tablename__ = "aliases"
    __table_args__ = (UniqueConstraint("name", "alias"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200), index=True)
    alias: Mapped[str] = mapped_column(String(100))
    version_id: Mapped[int] = mapped_column(ForeignKey("versions.id"))


class AliasEvent(Base):
    __tablename__ = "alias_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200), index=True)
    alias: Mapped[str] = mapped_column(String(100))
    action: Mapped[str] = mapped_column(String(30))  # promote | rollback | rollback-dry-run
    from_number: Mapped[int | None] = mapped_column(Integer, nullable=True)
    to_number: Mapped[int | None] = mapped_column(Integer, nullable=True)
    who: Mapped[str] = mapped_column(String(200))
    when: Mapped[dt.datetime] = mapped_column(DateTime, default=_now)
    reason: Mapped[str] = mapped_column(Text, default="")


def make_session_factory(url: str):
    db_file = sqlite_file(url)
    if db_file is not None:
        private_file(db_file)  # prompts, lineage and who promoted what: owner-only (0600)
    engine = create_engine(url, connect_args={"timeout": 30} if url.startswith("sqlite") else {})
    if url.startswith("sqlite"):
        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn, _record):
            dbapi_conn.isolation_level = None  # we issue BEGIN IMMEDIATE ourselves (see Registry.tx)
            dbapi_conn.execute("PRAGMA journal_mode=WAL")
            dbapi_conn.execute("PRAGMA foreign_keys=ON")

        @event.listens_for(engine, "begin")
        def _begin_immediate(conn):
            conn.exec_driver_sql("BEGIN IMMEDIATE")  # writers serialise: no lost updates between processes
    Base.metadata.create_all(engine)
    return sessionmaker(engine, expire_on_commit=False)
