"""The one internal shape every input format is normalised to: a conversation of turns."""

from __future__ import annotations

import re
from dataclasses import dataclass, field

ROLES = ("system", "user", "assistant")


@dataclass
class Turn:
    role: str  # system | user | assistant
    content: str
    train: bool = False  # only assistant turns with train=True carry labels


@dataclass
class Example:
    """One training conversation and where it came from (for file:line messages)."""

    turns: list[Turn]
    source: str = ""
    line: int = 0
    meta: dict = field(default_factory=dict)

    @property
    def where(self) -> str:
        return f"{self.source}:{self.line}"

    @property
    def prompt_turns(self) -> list[Turn]:
        """Every turn before the last assistant turn."""
        return self.turns[:-1]

    @property
    def prompt_text(self) -> str:
        return "\n".join(t.content for t in self.turns if t.role != "assistant" or t is not self.turns[-1])

    @property
    def completion(self) -> str:
        """The final assistant turn (the answer that a test set compares against)."""
        return self.turns[-1].content if self.turns and self.turns[-1].role == "assistant" else ""

    def key(self) -> str:
        """Roles and contents with whitespace and case normalised: equal keys are duplicates."""
        return re.sub(r"\s+", " ", "\x1f".join(f"{t.role}:{t.content}" for t in self.turns)).strip().lower()

    def messages(self, with_last: bool = True) -> list[dict[str, str]]:
        turns = self.turns if with_last else self.turns[:-1]
        return [{"role": t.role, "content": t.content} for t in turns]

    def to_json(self) -> dict:
        """Serialise as the chat ``messages`` format (per-message weight when not default)."""
        msgs = []
        for t in self.turns:
            m: dict = {"role": t.role, "content": t.content}
            if t.role == "assistant" and not t.train:
                m["weight"] = 0
            msgs.append(m)
        return {"messages": msgs}


@dataclass
class RowProblem:
    """A row that could not be read or normalised."""

    source: str
    line: int
    field: str | None
    message: str
    kind: str  # short code, e.g. invalid_json, missing_field

    @property
    def where(self) -> str:
        return f"{self.source}:{self.line}"

    def __str__(self) -> str:
        fld = f" [{self.field}]" if self.field else ""
        return f"{self.where}{fld}: {self.message}"
