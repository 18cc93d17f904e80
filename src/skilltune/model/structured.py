"""Structured output: decoding that can only produce what a grammar allows (a JSON schema, any JSON object, a Lark
grammar such as one SQL query over a database's schema: evaluate/sql_grammar.py).

The grammar engine is llguidance (the one behind vLLM's and llama.cpp's guided decoding): before each token is
chosen, a row's matcher says which tokens of the vocabulary may come next, the others' logits become -inf, and
the chosen token advances the matcher. The end-of-turn token is allowed only once the grammar is satisfied, so
an answer that stops is whole (one cut by ``max_tokens`` is not, as with OpenAI's).

A grammar is checked (and its matcher built) when the request arrives, against the tokenizer of the model that
serves it; llguidance's parser limits bound what one schema can cost per token, so no schema a client sends can
stall the batch. The tokenizer's token table is built once per tokenizer (about 0.3 s for SmolLM2's 49k
tokens, a few seconds for Gemma's 262k) and kept.
"""

from __future__ import annotations

import json
import threading
import weakref
from pathlib import Path
from typing import Callable

import numpy as np
import torch

_TABLES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # tokenizer -> {(eos, n_vocab): LLTokenizer}
_TABLES_LOCK = threading.Lock()
MAX_SCHEMA_CHARS = 32_768  # a schema (or a Lark grammar) longer than this is refused before it is compiled
# JSON laid out one way (`{"a": 1, "b": [2, 3]}`): with free whitespace between tokens a model can emit newlines
# until its budget runs out (the known failure of JSON modes); a schema's "x-guidance" may still ask otherwise
COMPACT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


class GrammarError(ValueError):
    """The schema cannot be used: it is not a schema llguidance accepts, or it is over a limit."""


def _llmatcher():
    """llguidance's matcher class, or a GrammarError saying how to install it."""
    try:
        from llguidance import LLMatcher
    except ImportError:
        raise GrammarError("structured output needs llguidance: pip install 'skilltune[serve]'") from None
    return LLMatcher


class Grammar:
    """What a request's answer must match: llguidance's grammar text, and what it came from."""

    def __init__(self, text: str, source: str):
        self.text = text
        self.source = source  # "json_object", "json_schema" or "grammar" (for messages)
        self._ready: RowMatcher | None = None  # built when the request was checked, used by its row

    @classmethod
    def json(cls, schema: dict | None) -> Grammar:
        """Any JSON object (``schema`` None: OpenAI's ``json_object``), or what ``schema`` describes."""
        LLMatcher = _llmatcher()
        if schema is None:
            return cls(LLMatcher.grammar_from_json_schema({"type": "object"}, defaults=COMPACT), "json_object")
        if not isinstance(schema, dict):
            raise GrammarError("the JSON schema must be a JSON object")
        text = json.dumps(schema)
        if len(text) > MAX_SCHEMA_CHARS:
            raise GrammarError(f"the JSON schema is {len(text):,} characters; this server takes at most "
                               f"{MAX_SCHEMA_CHARS:,}")
        try:
            return cls(LLMatcher.grammar_from_json_schema(text, defaults=COMPACT), "json_schema")
        except ValueError as exc:
            raise GrammarError(f"not a usable JSON schema: {exc}") from None

    @classmethod
    def lark(cls, text: str) -> Grammar:
        """What a Lark grammar allows (llguidance's dialect, the one vLLM's ``structured_outputs.grammar`` takes);
        checked now, without a tokenizer, so a wrong rule is reported before any model loads."""
        LLMatcher = _llmatcher()
        if not isinstance(text, str) or not text.strip():
            raise GrammarError("the grammar is empty: give Lark rules, starting with `start: ...`")
        if len(text) > MAX_SCHEMA_CHARS:
            raise GrammarError(f"the grammar is {len(text):,} characters; this server takes at most "
                               f"{MAX_SCHEMA_CHARS:,}")
        try:
            grammar = LLMatcher.grammar_from_lark(text)
            problem = LLMatcher.validate_grammar(grammar)
        except ValueError as exc:
            problem = str(exc)
        if problem:
            raise GrammarError(f"not a usable Lark grammar: {problem.strip()}")
        return cls(grammar, "grammar")

    def check(self, tokenizer, eos: int, n_vocab: int) -> None:
        """Compile the grammar for this tokenizer now (raises GrammarError); its row then starts from it."""
        if self._ready is None or self._ready.key != (id(tokenizer), eos, n_vocab):
            self._ready = self.matcher(tokenizer, eos, n_vocab)

    def matcher(self, tokenizer, eos: int, n_vocab: int) -> RowMatcher:
        """A matcher at the start of the grammar for the model with this tokenizer: the one :meth:`check` built
        if it was for the same tokenizer, else a new one (raises GrammarError if the grammar does not compile or
        is over llguidance's limits)."""
        from llguidance import LLMatcher

        ready, self._ready = self._ready, None
        if ready is not None and ready.key == (id(tokenizer), eos, n_vocab):
            return ready
        m = LLMatcher(token_table(tokenizer, eos, n_vocab), self.text, log_level=0)
        if m.is_error():
            raise GrammarError(f"the {self.source.replace('_', ' ')} cannot be used: {m.get_error()}")
        return RowMatcher(m, eos, n_vocab, key=(id(tokenizer), eos, n_vocab))


class RowMatcher:
    """One answer's place in its grammar: which tokens may come next, and the tokens chosen so far."""

    def __init__(self, matcher, eos: int, n_vocab: int, key: tuple = ()):
        self.m, self.eos, self.n_vocab, self.key = matcher, eos, n_vocab, key

    def allowed(self) -> torch.Tensor:
        """A bool mask over the vocabulary of the tokens that may come next."""
        bits = np.unpackbits(np.frombuffer(self.m.compute_bitmask(), dtype=np.uint8), bitorder="little")
        return torch.from_numpy(bits[:self.n_vocab].astype(bool))

    def constrain(self, logits: torch.Tensor) -> None:
        """Set the logits (one row over the vocabulary) of every token the grammar forbids now to -inf."""
        allowed = self.allowed().to(logits.device)
        width = min(logits.shape[-1], allowed.shape[0])
        logits[:width].masked_fill_(~allowed[:width], float("-inf"))
        logits[width:] = float("-inf")  # logits past the tokenizer's table are no tokens at all

    def take(self, token: int) -> bool:
        """Advance past ``token``; True when the answer is complete (nothing but the end token may follow)."""
        if token != self.eos:
            self.m.consume_token(token)
        return self.m.is_stopped() or self.m.is_error()


def _schema_grammar(schema: dict | str | Path | None) -> Grammar:
    """The grammar of a JSON Schema given as a parsed object (a request's) or as a file (a config's, a flag's)."""
    if schema is None:
        raise GrammarError("the json_schema format needs a JSON Schema")
    if isinstance(schema, dict):
        return Grammar.json(schema)
    return _from_file(schema, "JSON", json.loads, Grammar.json)


def _lark_grammar(grammar: str | Path | None) -> Grammar:
    """A Lark grammar given as its text (a request's) or as a file (a config's, a flag's)."""
    if grammar is None:
        raise GrammarError("the grammar format needs a Lark grammar")
    if isinstance(grammar, str):
        return Grammar.lark(grammar)
    return _from_file(grammar, "text", lambda text: text, Grammar.lark)


def _from_file(path: str | Path, kind: str, parse: Callable[[str], object],
               build: Callable[[object], Grammar]) -> Grammar:
    """The grammar ``build`` makes of a file's parsed text; an unreadable file or a bad grammar names the file."""
    try:
        source = parse(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:  # ValueError: undecodable bytes, or JSON that does not parse
        raise GrammarError(f"{path}: not a readable {kind} file ({exc})") from None
    try:
        return build(source)
    except GrammarError as exc:
        raise GrammarError(f"{path}: {exc}") from None


# How answers may be decoded -> the grammar each decodes under: OpenAI's response_format types, and `grammar` (a
# Lark grammar, vLLM's structured_outputs.grammar). The argument is what json_schema and grammar need (the schema
# as an object, the grammar as text, or either as a file Path); the others ignore it. The server,
# eval.response_format and `generate` use it.
RESPONSE_FORMATS: dict[str, Callable[[dict | str | Path | None], Grammar | None]] = {
    "text": lambda source: None,
    "json_object": lambda source: Grammar.json(None),
    "json_schema": _schema_grammar,
    "grammar": _lark_grammar,
}


def token_table(tokenizer, eos: int, n_vocab: int):
    """llguidance's table of ``tokenizer``'s tokens, with ``eos`` as the end token (built once, then kept)."""
    import llguidance.hf

    with _TABLES_LOCK:
        tables = _TABLES.setdefault(tokenizer, {})
        if (eos, n_vocab) not in tables:
            try:
                tables[(eos, n_vocab)] = llguidance.hf.from_tokenizer(tokenizer, n_vocab=n_vocab, eos_token=eos)
            except ValueError as exc:  # not a fast (Rust) tokenizer
                raise GrammarError(f"structured output needs a fast tokenizer: {exc}") from None
        return tables[(eos, n_vocab)]


def vocab_width(model, tokenizer) -> int:
    """The vocabulary a mask spans: the model's logits (its output rows can outnumber the tokenizer's tokens)."""
    return max(int(model.get_output_embeddings().weight.shape[0]), len(tokenizer))
