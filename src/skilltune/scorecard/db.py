"""Scorecard tables (SQLAlchemy; SQLite in the skilltune home by default, PostgreSQL by URL)."""

from __future__ import annotations

import datetime as dt
import hashlib

from sqlalchemy import JSON, Boolean, DateTime, ForeignKey, Integer, String, Text, UniqueConstraint, create_engine
from sqlalchemy.exc import DatabaseError
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, sessionmaker

from skilltune.errors import unreadable_database
from skilltune.paths import private_file, sqlite_file
from skilltune.registry.db import shown


class Base(DeclarativeBase):
    pass


def token_hash(token: str) -> str:
    """What the database keeps of a rater's link token: its sha256 (a leaked database opens no link)."""
    return hashlib.sha256(token.encode()).hexdigest()


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)


class Study(Base):
    __tablename__ = "studies"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    mode: Mapped[str] = mapped_column(String(10))  # ab | rubric
    criteria: Mapped[list] = mapped_column(JSON)  # [{name, description, anchors{1..5}}]
    gates: Mapped[dict] = mapped_column(JSON)
    source: Mapped[str] = mapped_column(Text)  # eval folder
    run_dir: Mapped[str] = mapped_column(Text, default="")
    secret: Mapped[str] = mapped_column(String(64))  # signs CSRF tokens
    created: Mapped[dt.datetime] = mapped_column(DateTime, default=_now)


class Item(Base):
    __tablename__ = "items"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)
    prompt: Mapped[str] = mapped_column(Text)
    reference: Mapped[str] = mapped_column(Text, default="")
    output_a: Mapped[str] = mapped_column(Text)
    output_b: Mapped[str] = mapped_column(Text, default="")
    a_is: Mapped[str] = mapped_column(String(10))  # which model is shown as A: base | tuned
    overlap: Mapped[bool] = mapped_column(Boolean, default=False)


class Rater(Base):
    __tablename__ = "raters"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)
    name: Mapped[str] = mapped_column(String(100))
    token: Mapped[str] = mapped_column(String(64), unique=True)  # sha256 of the rater's link token, never the token


class Assignment(Base):
    __tablename__ = "assignments"
    __table_args__ = (UniqueConstraint("rater_id", "item_id"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    rater_id: Mapped[int] = mapped_column(ForeignKey("raters.id"), index=True)
    item_id: Mapped[int] = mapped_column(ForeignKey("items.id"))
    position: Mapped[int] = mapped_column(Integer)


class Judgement(Base):
    __tablename__ = "judgements"
    __table_args__ = (UniqueConstraint("rater_id", "item_id"),)
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    rater_id: Mapped[int] = mapped_column(ForeignKey("raters.id"), index=True)
    item_id: Mapped[int] = mapped_column(ForeignKey("items.id"), index=True)
    choice: Mapped[str | None] = mapped_column(String(10), nullable=True)  # A | B | tie | both_bad
    scores: Mapped[dict] = mapped_column(JSON)  # ab: {criterion: {"A": n, "B": n}}; rubric: {criterion: {"A": n}}
    notes: Mapped[str] = mapped_column(Text, default="")
    critical: Mapped[bool] = mapped_column(Boolean, default=False)
    critical_criterion: Mapped[str] = mapped_column(String(100), default="")
    critical_note: Mapped[str] = mapped_column(Text, default="")
    critical_side: Mapped[str] = mapped_column(String(2), default="A")
    updated: Mapped[dt.datetime] = mapped_column(DateTime, default=_now, onupdate=_now)


def session_factory(url: str):
    db_file = sqlite_file(url)
    if db_file is not None:
        private_file(db_file)  # rater link hashes and the CSRF secret: owner-only (0600)
    engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False} if url.startswith("sqlite")
                           else {})
    Session = sessionmaker(engine, expire_on_commit=False)
    try:
        Base.metadata.create_all(engine)
        _hash_legacy_tokens(Session)
    except DatabaseError as exc:
        raise unreadable_database("scorecard database", str(db_file or shown(url)), exc) from None
    return Session


def _hash_legacy_tokens(Session) -> None:
    """Studies made before tokens were hashed stored the link token itself: replace it by its sha256.

    The raters' links keep working (the app hashes what a link carries); the database no longer opens them.
    """
    with Session() as s, s.begin():
        for rater in s.query(Rater).all():
            if len(rater.token) != 64 or any(c not in "0123456789abcdef" for c in rater.token):
                rater.token = token_hash(rater.token)
