"""Turn a conversation into token ids and a completion-only label mask.

The conversation is rendered with the chat template piece by piece: each prompt
segment (everything up to and including the assistant header) and each assistant
segment (content plus the template's turn-end token) are tokenised separately and
concatenated. That is exactly how inference sees them — the prompt is rendered with
``add_generation_prompt=True`` and the model writes the rest — and it makes the
label mask exact: assistant tokens up to and including the turn-end token (so the
model learns to stop) carry labels; everything else is ``-100``.
"""

from __future__ import annotations

from dataclasses import dataclass

from skilltune.data.types import Example

IGNORE = -100


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]  # IGNORE where no loss is taken

    @property
    def n_trained(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE)


class TemplateMismatch(ValueError):
    """The chat template does not render prefixes consistently (cannot split prompt and answer)."""


def _render(tokenizer, messages, generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"] if text else []


def encode_example(tokenizer, example: Example, end_token: str, train_on_inputs: bool = False) -> Encoded:
    """Token ids and labels of ``example`` (see module docstring)."""
    msgs = example.messages()
    input_ids: list[int] = []
    labels: list[int] = []
    rendered = ""  # text covered so far
    for i, turn in enumerate(example.turns):
        if turn.role != "assistant":
            continue
        prefix = _render(tokenizer, msgs[:i], generation_prompt=True)
        full = _render(tokenizer, msgs[: i + 1], generation_prompt=False)
        if not prefix.startswith(rendered) or not full.startswith(prefix):
            raise TemplateMismatch(f"{example.where}: the chat template renders prefixes inconsistently")
        prompt_ids = _ids(tokenizer, prefix[len(rendered):])
        answer = full[len(prefix):]
        cut = answer.find(end_token, len(turn.content) if answer.startswith(turn.content) else 0)
        trained_text, tail = (answer[: cut + len(end_token)], answer[cut + len(end_token):]) if cut >= 0 else (answer, "")
        answer_ids = _ids(tokenizer, trained_text)
        tail_ids = _ids(tokenizer, tail)
        input_ids += prompt_ids + answer_ids + tail_ids
        labels += (prompt_ids if train_on_inputs else [IGNORE] * len(prompt_ids))
        labels += answer_ids if (turn.train or train_on_inputs) else [IGNORE] * len(answer_ids)
        labels += [IGNORE] * len(tail_ids)
        rendered = full
    return Encoded(input_ids, labels)


def prompt_text(tokenizer, example: Example) -> str:
    """The text a model is given at inference for the last assistant turn."""
    return _render(tokenizer, example.messages(with_last=False), generation_prompt=True)
