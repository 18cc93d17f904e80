"""Row formats, each a small registered parser from a JSON object to turns.

Built-ins: ``preference`` (pairs for DPO: ``prompt``/``chosen``/``rejected``, or ``messages`` plus
``chosen``/``rejected`` assistant turns), ``prompt_completion``, ``messages`` (OpenAI/HF chat, optional
per-message ``weight``), ``alpaca`` and ``sharegpt``. A third party registers its own with
:func:`register_format`, exactly as the built-ins do.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from skilltune.data.types import Turn


class FieldProblem(Exception):
    """A row is malformed; names the field and the problem."""

    def __init__(self, field: str | None, message: str, kind: str = "bad_field"):
        super().__init__(message)
        self.field, self.message, self.kind = field, message, kind


@dataclass(frozen=True)
class RowFormat:
    name: str
    detect: Callable[[dict], bool]
    parse: Callable[[dict], list[Turn]]
    # Preference formats: the rejected answer (the turns end with the chosen one). None for SFT formats.
    rejected: Callable[[dict], str] | None = None
    # Fields kept on the example as provenance (e.g. the scorecard study and item a pair came from).
    keep: tuple[str, ...] = ()


FORMATS: dict[str, RowFormat] = {}


def register_format(fmt: RowFormat) -> None:
    FORMATS[fmt.name] = fmt


def _text(obj: dict, key: str, required: bool = True) -> str:
    if key not in obj or obj[key] is None:
        if required:
            raise FieldProblem(key, f"missing field '{key}'", "missing_field")
        return ""
    value = obj[key]
    if not isinstance(value, str):
        raise FieldProblem(key, f"field '{key}' must be a string, got {type(value).__name__}", "not_string")
    if required and not value.strip():
        raise FieldProblem(key, f"field '{key}' is empty", "empty_field")
    return value


def validate_turns(turns: list[Turn], field: str) -> list[Turn]:
    """Check role order: optional system, then user/assistant alternating, ending on assistant."""
    if not turns:
        raise FieldProblem(field, "the conversation has no turns", "empty_field")
    body = turns[1:] if turns[0].role == "system" else turns
    for i, turn in enumerate(body):
        if turn.role == "system":
            raise FieldProblem(f"{field}[{turns.index(turn)}]", "a system turn may only come first", "role_order")
        expected = "user" if i % 2 == 0 else "assistant"
        if turn.role != expected:
            idx = turns.index(turn)
            raise FieldProblem(
                f"{field}[{idx}]", f"expected a {expected} turn here, got {turn.role} (turns must alternate)", "role_order"
            )
    if not any(t.role == "assistant" for t in turns):
        raise FieldProblem(field, "the conversation has no assistant turn, so there is nothing to learn", "no_assistant")
    if turns[-1].role != "assistant":
        raise FieldProblem(field, "the conversation ends on a user turn; the last turn must be the assistant's", "ends_on_user")
    return turns


def _prompt_completion(obj: dict) -> list[Turn]:
    turns = []
    system = _text(obj, "system", required=False)
    if system:
        turns.append(Turn("system", system))
    turns.append(Turn("user", _text(obj, "prompt")))
    turns.append(Turn("assistant", _text(obj, "completion"), train=True))
    return turns


_ROLE_ALIASES = {"human": "user", "gpt": "assistant", "bot": "assistant", "model": "assistant", "system": "system",
                 "user": "user", "assistant": "assistant"}


def _chat(obj: dict, key: str, role_key: str, content_key: str, aliases: bool) -> list[Turn]:
    return validate_turns(_chat_turns(obj, key, role_key, content_key, aliases), key)


def _chat_turns(obj: dict, key: str, role_key: str, content_key: str, aliases: bool) -> list[Turn]:
    msgs = obj.get(key)
    if msgs is None:
        raise FieldProblem(key, f"missing field '{key}'", "missing_field")
    if not isinstance(msgs, list):
        raise FieldProblem(key, f"field '{key}' must be a list of messages, got {type(msgs).__name__}", "not_list")
    turns = []
    for i, msg in enumerate(msgs):
        where = f"{key}[{i}]"
        if not isinstance(msg, dict):
            raise FieldProblem(where, f"each message must be an object, got {type(msg).__name__}", "not_object")
        role = msg.get(role_key)
        if not isinstance(role, str):
            raise FieldProblem(f"{where}.{role_key}", f"missing or non-string '{role_key}'", "missing_field")
        mapped = _ROLE_ALIASES.get(role.lower()) if aliases else (role if role in ("system", "user", "assistant") else None)
        if mapped is None:
            raise FieldProblem(
                f"{where}.{role_key}", f"unknown role '{role}' (allowed: system, user, assistant)", "unknown_role"
            )
        content = msg.get(content_key)
        if not isinstance(content, str):
            raise FieldProblem(f"{where}.{content_key}", f"'{content_key}' must be a string", "not_string")
        if not content.strip():
            raise FieldProblem(f"{where}.{content_key}", f"'{content_key}' is empty", "empty_field")
        weight = msg.get("weight", 1)
        if weight not in (0, 1):
            raise FieldProblem(f"{where}.weight", f"weight must be 0 or 1, got {weight!r}", "bad_field")
        turns.append(Turn(mapped, content, train=(mapped == "assistant" and weight == 1)))
    return turns


def _alpaca(obj: dict) -> list[Turn]:
    instruction = _text(obj, "instruction")
    extra = _text(obj, "input", required=False)
    prompt = f"{instruction}\n\n{extra}" if extra.strip() else instruction
    turns = []
    system = _text(obj, "system", required=False)
    if system:
        turns.append(Turn("system", system))
    return turns + [Turn("user", prompt), Turn("assistant", _text(obj, "output"), train=True)]


def _answer(obj: dict, key: str) -> str:
    """A preference side: a string, an assistant message, or a list holding one (TRL's conversational form)."""
    value = obj.get(key)
    if isinstance(value, list):
        if len(value) != 1:
            raise FieldProblem(key, f"'{key}' must hold exactly one assistant message, got {len(value)}", "bad_field")
        value = value[0]
    if isinstance(value, dict):
        if value.get("role", "assistant") != "assistant":
            raise FieldProblem(f"{key}.role", f"'{key}' must be an assistant message, got role {value.get('role')!r}",
                               "role_order")
        return _text(value, "content") if "content" in value else _text({key: None}, key)
    return _text(obj, key)


def _preference(obj: dict) -> list[Turn]:
    """The prompt's turns, then the chosen answer as the trained assistant turn (the rejected one: ``_answer``)."""
    if "messages" in obj:
        # earlier assistant turns are context, never trained: only the chosen answer carries labels
        turns = [Turn(t.role, t.content) for t in _chat_turns(obj, "messages", "role", "content", aliases=False)]
        if turns and turns[-1].role == "assistant":
            raise FieldProblem(f"messages[{len(turns) - 1}]", "the prompt's messages must end on a user turn; the "
                               "two answers go in 'chosen' and 'rejected'", "role_order")
    else:
        turns = [Turn("system", _text(obj, "system"))] if _text(obj, "system", required=False) else []
        turns.append(Turn("user", _text(obj, "prompt")))
    chosen, rejected = _answer(obj, "chosen"), _answer(obj, "rejected")
    if chosen.strip() == rejected.strip():
        raise FieldProblem("rejected", "chosen and rejected are the same answer: the pair teaches nothing",
                           "identical_pair")
    return validate_turns(turns + [Turn("assistant", chosen, train=True)], "messages" if "messages" in obj else "prompt")


# Preference rows first: they also carry 'prompt' or 'messages', which the SFT formats would claim.
register_format(RowFormat("preference", lambda o: "chosen" in o or "rejected" in o, _preference,
                          rejected=lambda o: _answer(o, "rejected"), keep=("study", "item_id", "id")))
register_format(RowFormat("prompt_completion", lambda o: "prompt" in o or "completion" in o, _prompt_completion))
register_format(RowFormat("messages", lambda o: "messages" in o,
                          lambda o: _chat(o, "messages", "role", "content", aliases=False)))
register_format(RowFormat("alpaca", lambda o: "instruction" in o or "output" in o, _alpaca))
register_format(RowFormat("sharegpt", lambda o: "conversations" in o,
                          lambda o: _chat(o, "conversations", "from", "value", aliases=True)))


def detect_format(obj: Any) -> str | None:
    """The name of the first registered format whose keys ``obj`` has."""
    if not isinstance(obj, dict):
        return None
    for fmt in FORMATS.values():
        if fmt.detect(obj):
            return fmt.name
    return None
