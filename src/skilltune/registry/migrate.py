"""The registry's schema is versioned with Alembic: open, check, upgrade.

A registry written by an older skilltune has an older schema. A local SQLite registry
is upgraded when opened; a shared one (PostgreSQL, used by a team and CI) is never
changed behind its users' backs: opening it says to run `skilltune registry upgrade`.
A registry newer than this skilltune knows is refused, never written to. Databases
made before migrations existed (no ``alembic_version`` table) carry revision 0001.
"""

from __future__ import annotations

from pathlib import Path

from skilltune.errors import SkilltuneError

SCRIPTS = Path(__file__).parent / "migrations"


class SchemaError(SkilltuneError):
    """The registry database's schema is not the one this skilltune uses."""


def _alembic(connection):
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(SCRIPTS))
    cfg.attributes["connection"] = connection
    return cfg


def head() -> str:
    from alembic.script import ScriptDirectory

    return ScriptDirectory(str(SCRIPTS)).get_current_head()


def known_revisions() -> set[str]:
    from alembic.script import ScriptDirectory

    return {s.revision for s in ScriptDirectory(str(SCRIPTS)).walk_revisions()}


def current(connection) -> str | None:
    """The schema revision of the database (``0001`` for one made before migrations, None when empty)."""
    from alembic.runtime.migration import MigrationContext
    from sqlalchemy import inspect

    rev = MigrationContext.configure(connection).get_current_revision()
    if rev is None and "versions" in inspect(connection).get_table_names():
        return "0001"
    return rev


def ensure(engine, shown_url: str, upgrade: bool) -> tuple[str | None, str]:
    """Check the schema (creating it in an empty database); upgrade an older one when ``upgrade``.

    Returns (revision before, revision now). Runs in one transaction, so processes
    opening the same new registry at once create it once.
    """
    from alembic import command

    want = head()
    with engine.begin() as conn:
        have = current(conn)
        if have == want:
            return have, have
        if have is not None and have not in known_revisions():
            raise SchemaError(f"the registry at {shown_url} has schema {have}, newer than this skilltune knows "
                              f"({want}); nothing was written to it",
                              hint="upgrade skilltune (pip install -U skilltune) to use this registry")
        if have is not None and not upgrade:
            raise SchemaError(f"the registry at {shown_url} has schema {have}; this skilltune needs {want}",
                              hint="run `skilltune registry upgrade` once (every client of a shared registry "
                                   "then uses the new schema)")
        cfg = _alembic(conn)
        if have == "0001":
            command.stamp(cfg, "0001")  # a registry from before migrations: it is exactly revision 0001
        command.upgrade(cfg, want)
    return have, want
