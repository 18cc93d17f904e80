"""Registry tables (SQLAlchemy; SQLite by default, PostgreSQL by URL).

Every alias move is an :class:`AliasEvent` row: the history of who moved which alias
from which version to which, when and why. Rollback reads that history.
"""

from __future__ import annotations

import datetime as dt
from functools import lru_cache

from sqlalchemy import (JSON, DateTime, ForeignKey, Index, Integer, String, Text, UniqueConstraint, create_engine,
                        event)
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
    __table_args__ = (Index("ix_alias_events_name_alias_id", "name", "alias", "id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200), index=True)
    alias: Mapped[str] = mapped_column(String(100))
    action: Mapped[str] = mapped_column(String(30))  # promote | rollback | rollback-dry-run
    from_number: Mapped[int | None] = mapped_column(Integer, nullable=True)
    to_number: Mapped[int | None] = mapped_column(Integer, nullable=True)
    who: Mapped[str] = mapped_column(String(200))
    when: Mapped[dt.datetime] = mapped_column(DateTime, default=_now)
    reason: Mapped[str] = mapped_column(Text, default="")


def shown(url: str) -> str:
    """``url`` fit to print: the password masked (it must never reach a log line or an error)."""
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - an unparsable URL: say nothing of it but its scheme
        return url.split(":", 1)[0] + "://..."


def make_engine(url: str):
    """The engine for ``url``, one per URL per process (its pool is shared by every Registry on that URL).

    SQLite files are owner-only and serialise writers with BEGIN IMMEDIATE.
    """
    db_file = sqlite_file(url)
    if db_file is not None:
        private_file(db_file)  # prompts, lineage and who promoted what: owner-only (0600)
    return _engine(url)


@lru_cache(maxsize=8)  # a few URLs per process at most; evicted engines close with their last user
def _engine(url: str):
    try:
        engine = create_engine(url, connect_args={"timeout": 30} if url.startswith("sqlite") else {})
    except Exception as exc:  # noqa: BLE001 - a bad URL or a missing driver
        from skilltune.errors import SkilltuneError

        raise SkilltuneError(f"cannot use the registry database {shown(url)}: {type(exc).__name__}",
                             hint="for PostgreSQL install the driver: pip install 'skilltune[postgres]' and use "
                                  "postgresql+psycopg://USER@HOST/DB (password from PGPASSWORD or the URL)") from None
    if url.startswith("sqlite"):
        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn, _record):
            dbapi_conn.isolation_level = None  # we issue BEGIN IMMEDIATE ourselves (see Registry.tx)
            dbapi_conn.execute("PRAGMA journal_mode=WAL")
            dbapi_conn.execute("PRAGMA foreign_keys=ON")

        @event.listens_for(engine, "begin")
        def _begin_immediate(conn):
            conn.exec_driver_sql("BEGIN IMMEDIATE")  # writers serialise: no lost updates between processes
    return engine


def make_session_factory(url: str, upgrade: bool | None = None):
    """Sessions on the registry at ``url``, its schema checked (and created or upgraded, see migrate.py).

    ``upgrade``: None upgrades an older SQLite registry on open and asks for `skilltune registry upgrade`
    on a shared database.
    """
    from sqlalchemy.exc import DatabaseError, OperationalError

    from skilltune.registry.migrate import ensure

    engine = make_engine(url)
    try:
        ensure(engine, shown(url), url.startswith("sqlite") if upgrade is None else upgrade)
    except DatabaseError as exc:
        from skilltune.errors import SkilltuneError

        hint = ("check --registry-url / SKILLTUNE_REGISTRY_URL and that the server is up"
                if isinstance(exc, OperationalError) else
                "the database file is damaged or is not a registry: restore it from a backup (the artifacts in the "
                "store are content-addressed and untouched), or point SKILLTUNE_HOME / --registry-url elsewhere")
        raise SkilltuneError(f"cannot open the registry database {shown(url)}: {str(exc.orig).strip()[:200]}",
                             hint=hint) from None
    return sessionmaker(engine, expire_on_commit=False)
