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
    # A preference pair: the turns end with the chosen answer, ``rejected`` is the other one.
    rejected: str | None = None

    @property
    def is_pair(self) -> bool:
        return self.rejected is not None

    def with_answer(self, answer: str) -> "Example":
        """The same conversation ending on ``answer`` (a pair's rejected side, as an example of its own)."""
        last = self.turns[-1]
        return Example(self.turns[:-1] + [Turn(last.role, answer, last.train)], self.source, self.line)

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
        text = "\x1f".join(f"{t.role}:{t.content}" for t in self.turns)
        if self.rejected is not None:
            text += f"\x1frejected:{self.rejected}"
        return re.sub(r"\s+", " ", text).strip().lower()

    def messages(self, with_last: bool = True) -> list[dict[str, str]]:
        turns = self.turns if with_last else self.turns[:-1]
        return [{"role": t.role, "content": t.content} for t in turns]

    def to_json(self) -> dict:
        """Serialise as the chat ``messages`` format (per-message weight when not default); a pair as a
        preference row (``prompt``/``chosen``/``rejected``, or ``messages`` for a multi-turn prompt)."""
        if self.rejected is not None:
            return self._pair_json()
        msgs = []
        for t in self.turns:
            m: dict = {"role": t.role, "content": t.content}
            if t.role == "assistant" and not t.train:
                m["weight"] = 0
            msgs.append(m)
        return {"messages": msgs}

    def _pair_json(self) -> dict:
        prompt = self.turns[:-1]
        system = [t.content for t in prompt if t.role == "system"]
        rest = [t for t in prompt if t.role != "system"]
        if len(rest) == 1 and len(system) <= 1:
            row: dict = ({"system": system[0]} if system else {}) | {"prompt": rest[0].content}
        else:
            row = {"messages": [{"role": t.role, "content": t.content} for t in prompt]}
        return row | {"chosen": self.turns[-1].content, "rejected": self.rejected} | self.meta


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
