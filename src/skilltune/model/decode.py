"""A running batch of decoding rows: rows join between decode steps and leave when they stop.

One :class:`DecodeBatch` holds the rows decoding together and one KV cache over all of them.
Between two decode steps its owner

1. drops the rows that are done (end-of-turn token, their own ``max_tokens``, or cut by the caller:
   a timed-out or cancelled request), trimming key columns no remaining row needs;
2. prefills new prompts (together, left-padded) and merges their caches into the batch (each row
   keeps its own positions; padding is masked);
3. runs one decode step for every row (greedy or sampled per row).

Offline generation (:func:`skilltune.model.generate.generate`: eval, replay, the generate command)
keeps the batch full this way — a finished answer's place goes to the next prompt instead of
decoding padding until the longest answer ends — and the server's continuous batching admits
requests as they arrive (serve/engine.py).

A *shared prefix* (the token ids every prompt starts with: the chat template's header and a
task's system prompt) is computed once per batch object and its keys and values are copied
into each admitted group's cache, so a prefill computes only what differs between prompts.

Greedy answers are those of transformers' ``generate`` (tests compare them token for token). It
keeps every key of every row (:func:`decode_refusal`): a model with sliding-window layers runs here
when no row can outgrow its window, and otherwise (or with chunked or linear attention) is
generated with transformers' ``generate``.
"""

from __future__ import annotations

import inspect
import time
from dataclasses import dataclass, field
from typing import Callable, Protocol

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from skilltune.model.structured import Grammar, RowMatcher, vocab_width


class Request(Protocol):
    """What a row decodes (the server's jobs and offline prompts both are one)."""

    prompt: str  # rendered with the chat template
    max_tokens: int
    temperature: float
    top_p: float | None  # nucleus sampling's mass (None: the model's generation config)
    seed: int | None  # its own random stream when sampling: the same seed, the same draws, whatever the batch
    grammar: Grammar | None  # what the answer must match (structured output), or None
    logprobs: int | None  # None: no log-probabilities; k: each answer token's, and the k most likely at its place
    shaping: Shaping | None  # penalties and biases on its logits (OpenAI's), or None


def decode_refusal(model, longest: int | None = None) -> str | None:
    """Why rows of this model cannot join and leave a running batch (None when they can).

    The batch keeps every key of every row. Sliding-window layers keep only the last ``window``
    keys, which is the same thing while no row is longer than the window: ``longest`` (the longest
    prompt plus its token budget) lets such a model through when it fits (Gemma 3's window is 512).
    """
    config = getattr(model, "config", None)
    if config is None:
        return "no model config"
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    if getattr(config, "is_encoder_decoder", False):
        return "an encoder-decoder model"
    partial = sorted({t for t in (getattr(config, "layer_types", None) or []) if t != "full_attention"})
    window = getattr(config, "sliding_window", None)
    if not partial and not window:
        return None
    if partial not in ([], ["sliding_attention"]):  # chunked or linear attention layers
        return f"{', '.join(partial)} layers keep a partial cache"
    if window and longest is not None and longest <= window:
        return None
    return f"{', '.join(partial) or 'sliding-window'} layers keep a partial cache" + (
        f" (the longest prompt and its budget, {longest} tokens, exceed the {window}-token window)"
        if window and longest is not None else "")


def shared_prefix(prompt_ids: list[list[int]], min_tokens: int = 16) -> list[int] | None:
    """The token ids every prompt starts with, leaving each prompt at least one token of its own.

    None when fewer than ``min_tokens`` are shared (a separate prefill would not pay for itself).
    """
    if not prompt_ids:
        return None
    first, n = prompt_ids[0], min(len(p) for p in prompt_ids) - 1
    for ids in prompt_ids[1:]:
        n = min(n, next((i for i, (a, b) in enumerate(zip(first, ids)) if a != b), n))
    return first[:n] if n >= min_tokens else None


@dataclass(frozen=True)
class Shaping:
    """OpenAI's adjustments of one request's logits before its token is chosen: ``bias`` is added to the named
    tokens' logits; a token the answer already holds ``c`` times loses ``c * frequency + presence``."""

    presence: float = 0.0
    frequency: float = 0.0
    bias: tuple[tuple[int, float], ...] = ()

    def apply(self, logits: torch.Tensor, history: list[int]) -> None:
        """Adjust ``logits`` (one row over the vocabulary) in place, given the answer's tokens so far."""
        if self.bias:
            ids, values = zip(*self.bias)
            logits[list(ids)] += torch.tensor(values, dtype=logits.dtype, device=logits.device)
        if (self.presence or self.frequency) and history:
            counts = torch.bincount(torch.tensor(history, device=logits.device), minlength=logits.shape[-1])
            counts = counts[:logits.shape[-1]].to(logits.dtype)
            logits -= counts * self.frequency + (counts > 0).to(logits.dtype) * self.presence


@dataclass
class TokenLogprob:
    """An answer token's log-probability under the model (its raw distribution: before temperature, top-p or a
    grammar), and the ``k`` most likely tokens at that place with theirs."""

    token: int
    logprob: float
    top: list[tuple[int, float]]


def token_logprobs(logits: torch.Tensor, chosen: torch.Tensor, asked: list[int | None]) -> list[TokenLogprob | None]:
    """Per row, the chosen token's :class:`TokenLogprob` when the row asks for log-probabilities (``asked``: None,
    or how many alternatives to list), else None."""
    wanted = [i for i, k in enumerate(asked) if k is not None]
    out: list[TokenLogprob | None] = [None] * len(asked)
    if not wanted:
        return out
    lp = torch.log_softmax(logits[wanted].float(), -1)
    k = max(asked[i] for i in wanted)
    top = torch.topk(lp, k) if k else None
    for j, i in enumerate(wanted):
        token, n = int(chosen[i]), asked[i]
        out[i] = TokenLogprob(token, float(lp[j, token]), list(zip(top.indices[j, :n].tolist(),
                                                                   top.values[j, :n].tolist())) if n else [])
    return out


PROMPT_CHUNK = 256  # prompt positions scored per forward pass (their logits are all that is held at once)


@torch.inference_mode()
def prompt_logprobs(model, ids: list[int], k: int, deadline: float = float("inf"),
                    chunk: int = PROMPT_CHUNK) -> list[TokenLogprob | None]:
    """Each prompt token's log-probability given the tokens before it and the ``k`` most likely tokens there
    (OpenAI's ``echo`` with ``logprobs``; the first token has none: None).

    The prompt is prefilled in chunks of ``chunk`` positions through the model's own forward and cache (its head,
    soft-capping and sliding windows included), so only one chunk's logits are held: a 32k-token prompt's over a
    262k vocabulary would be 34 GB. Raises TimeoutError between chunks once ``deadline`` (monotonic) has passed.
    """
    chunk = max(1, chunk)
    device = next(model.parameters()).device
    out: list[TokenLogprob | None] = [None] if ids else []
    cache = None
    for start in range(0, len(ids) - 1, chunk):
        if time.monotonic() > deadline:
            raise TimeoutError("the request's time-out passed while its prompt was scored")
        res = model(input_ids=torch.tensor([ids[start:start + chunk]], device=device), past_key_values=cache,
                    use_cache=True)
        cache = res.past_key_values
        following = torch.tensor(ids[start + 1:start + chunk + 1], device=device)
        out += token_logprobs(res.logits[0, :len(following)], following, [k] * len(following))
    return out


@dataclass
class Row:
    request: Request
    prompt_tokens: int
    position: int  # the position id of the next token fed
    started: float
    # called with each answer token as it is chosen, and its log-probabilities when the request asks for them
    sink: Callable[[int, TokenLogprob | None], None] | None = None
    tokens: list[int] = field(default_factory=list)
    stopped: bool = False  # ended on the end-of-turn token
    rng: torch.Generator | None = None  # the request's seeded random stream (sampling with a seed)
    matcher: RowMatcher | None = None  # its grammar's state (structured output)
    logprobs: list[TokenLogprob] = field(default_factory=list)  # per answer token, when the request asks
    complete: bool = False  # its grammar is satisfied and allows nothing more (ended without the end token)

    @property
    def finished(self) -> bool:
        return self.stopped or self.complete or len(self.tokens) >= self.request.max_tokens


class DecodeBatch:
    """The rows decoding together and their KV cache (keys left-padded to one length, padding masked)."""

    def __init__(self, model, tokenizer, eos: int | None = None, prefix: list[int] | None = None):
        self.model, self.tokenizer = model, tokenizer
        self.eos = eos if eos is not None else tokenizer.eos_token_id
        self.device = next(model.parameters()).device
        self.prefix = prefix or None  # token ids shared by the prompts (their keys computed once)
        self._prefix_kv: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        self.rows: list[Row] = []
        self.cache = None  # a transformers Cache of KVBuffer layers over the rows
        self.mask = torch.zeros((0, 0), dtype=torch.long, device=self.device)  # (rows, keys): 1 = a real key
        self.next_tokens = torch.zeros(0, dtype=torch.long, device=self.device)  # fed at the next step
        params = inspect.signature((model.get_base_model() if hasattr(model, "get_base_model") else model).forward)
        # transformers renamed past_key_values to cache; use the name this version takes
        self.cache_arg = "cache" if "cache" in params.parameters else "past_key_values"
        # the prefill needs the last position's logits only (not a vocabulary-wide row per prompt token)
        self.last_logits = {"logits_to_keep": 1} if "logits_to_keep" in params.parameters else {}

    # ------------------------------------------------------------ joining
    @torch.inference_mode()
    def admit(self, requests: list,
              sink: Callable[[Request], Callable[[int, TokenLogprob | None], None] | None] | None = None) -> None:
        """Prefill ``requests`` together and merge them into the batch (their first token is chosen here).

        ``sink(request)`` may return a callable that receives each of that row's answer tokens (and its
        :class:`TokenLogprob`, None unless the request asks for log-probabilities).
        """
        ids = [self.tokenizer(r.prompt, add_special_tokens=False)["input_ids"] for r in requests]
        skip = len(self.prefix) if self.prefix and all(_starts_with(i, self.prefix) for i in ids) else 0
        width = max(len(i) - skip for i in ids)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        tokens = torch.full((len(ids), width), pad, dtype=torch.long)
        mask = torch.zeros((len(ids), skip + width), dtype=torch.long)
        mask[:, :skip] = 1
        for row, i in enumerate(ids):
            own = i[skip:]
            tokens[row, width - len(own):] = torch.tensor(own, dtype=torch.long)
            mask[row, skip + width - len(own):] = 1
        tokens, mask = tokens.to(self.device), mask.to(self.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, skip:]
        cache = self._prefix_cache(len(ids)) if skip else None
        out = self.model(input_ids=tokens, attention_mask=mask, position_ids=positions, use_cache=True,
                         **self.last_logits, **({self.cache_arg: cache} if cache is not None else {}))
        now = time.monotonic()
        rows = [Row(r, len(i), len(i), now, sink(r) if sink else None, rng=_rng(r, self.device),
                    matcher=self.matcher(r)) for r, i in zip(requests, ids)]
        first = _choose(out.logits[:, -1], rows, self.model)
        scored = token_logprobs(out.logits[:, -1], first, [r.logprobs for r in requests])
        self._merge(_cache_of(out), mask, rows, first, scored)

    def matcher(self, request: Request) -> RowMatcher | None:
        """The request's grammar at its start for this batch's model (None: no grammar). Raises GrammarError."""
        if request.grammar is None:
            return None
        return request.grammar.matcher(self.tokenizer, self.eos, vocab_width(self.model, self.tokenizer))

    def _prefix_cache(self, rows: int):
        """A cache holding the shared prefix's keys and values for ``rows`` rows (computed on first use)."""
        from transformers import DynamicCache

        if self._prefix_kv is None:
            ids = torch.tensor([self.prefix], dtype=torch.long, device=self.device)
            out = self.model(input_ids=ids, use_cache=True, **self.last_logits)
            self._prefix_kv = [(layer.keys, layer.values) for layer in _cache_of(out).layers]
        return DynamicCache([(k.expand(rows, -1, -1, -1), v.expand(rows, -1, -1, -1)) for k, v in self._prefix_kv],
                            config=self.model.config)

    def _merge(self, cache, mask: torch.Tensor, rows: list[Row], first: torch.Tensor, scored: list) -> None:
        if self.cache is None or not self.rows:
            self.cache, self.mask, self.rows = _buffered((layer.keys, layer.values) for layer in cache.layers), mask, []
            self.next_tokens = first
        else:
            width = max(self.mask.shape[1], mask.shape[1])
            layers = []
            for old, new in zip(self.cache.layers, cache.layers):
                layers.append((torch.cat([_left_pad(old.keys, width), _left_pad(new.keys, width)]),
                               torch.cat([_left_pad(old.values, width), _left_pad(new.values, width)])))
            self.cache = _buffered(layers)
            self.mask = torch.cat([_left_pad(self.mask, width, dim=1), _left_pad(mask, width, dim=1)])
            self.next_tokens = torch.cat([self.next_tokens, first])
        self.rows += rows
        for row, token, logprob in zip(rows, first.tolist(), scored):
            self._take(row, token, logprob)

    # ------------------------------------------------------------ one step
    @torch.inference_mode()
    def step(self) -> None:
        """One decode step for every row: feed each row's last token, choose its next one."""
        self.mask = torch.cat([self.mask, torch.ones((len(self.rows), 1), dtype=self.mask.dtype,
                                                     device=self.device)], dim=1)
        positions = torch.tensor([[r.position] for r in self.rows], device=self.device)
        out = self.model(input_ids=self.next_tokens[:, None], attention_mask=self.mask, position_ids=positions,
                         use_cache=True, **{self.cache_arg: self.cache})
        self.cache = _cache_of(out)
        requests = [r.request for r in self.rows]
        chosen = _choose(out.logits[:, -1], self.rows, self.model)
        self.next_tokens = chosen
        scored = token_logprobs(out.logits[:, -1], chosen, [r.logprobs for r in requests])
        for row, token, logprob in zip(self.rows, chosen.tolist(), scored):
            row.position += 1
            self._take(row, token, logprob)

    def _take(self, row: Row, token: int, logprob: TokenLogprob | None = None) -> None:
        if row.finished:
            return
        if token == self.eos:
            row.stopped = True
            return
        row.tokens.append(token)
        if logprob is not None:
            row.logprobs.append(logprob)
        if row.matcher is not None:
            row.complete = row.matcher.take(token)
        if row.sink is not None:
            row.sink(token, logprob)

    # ------------------------------------------------------------ leaving
    def leave(self, cut: Callable[[Request], bool] | None = None) -> list[Row]:
        """Remove the rows that are finished or that ``cut`` ends (their caller stopped waiting); keep the
        others' cache. Returns the rows removed (``row.finished`` tells which answers are whole)."""
        gone = [i for i, r in enumerate(self.rows) if r.finished or (cut is not None and cut(r.request))]
        if not gone:
            return []
        out = [self.rows[i] for i in gone]
        keep = [i for i in range(len(self.rows)) if i not in set(gone)]
        self.rows = [self.rows[i] for i in keep]
        if keep:
            index = torch.tensor(keep, device=self.device)
            self.cache.batch_select_indices(index)
            self.mask, self.next_tokens = self.mask[index], self.next_tokens[index]
            unused = int((self.mask.sum(0) == 0).long().cumprod(0).sum())  # leading key columns no row needs
            if unused:
                for layer in self.cache.layers:
                    layer.drop_front(unused)
                self.mask = self.mask[:, unused:]
        else:
            self.cache, self.mask = None, self.mask[:0, :0]
            self.next_tokens = self.next_tokens[:0]
        return out

    def generation(self, row: Row, now: float | None = None):
        """``row``'s answer so far as a :class:`~skilltune.model.generate.Generation`."""
        from skilltune.model.generate import Generation

        now = time.monotonic() if now is None else now
        text = self.tokenizer.decode(row.tokens, skip_special_tokens=True)
        return Generation(text, row.prompt_tokens, len(row.tokens) + (1 if row.stopped else 0), now - row.started,
                          row.stopped or row.complete, row.logprobs if row.request.logprobs is not None else None)


class KVBuffer(CacheLayerMixin):
    """One layer's keys and values in storage with room to grow: a decode step writes its column in place.

    transformers' ``DynamicLayer`` concatenates the whole cache with each new column, copying every
    key and value of the batch at every step of every layer; here the copy happens only when the
    storage is full (it then doubles). ``keys``/``values`` are views of the filled columns.
    """

    is_sliding = False

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, spare: int = 64):
        super().__init__()
        self.is_initialized, self.device = True, keys.device
        self._k, self._v = _with_room(keys, spare), _with_room(values, spare)
        self.start, self.end = 0, keys.shape[2]
        self._views()

    def _views(self) -> None:
        self.keys, self.values = self._k[:, :, self.start:self.end], self._v[:, :, self.start:self.end]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        new = key_states.shape[2]
        if self.end + new > self._k.shape[2]:
            self._k, self._v = _with_room(self.keys, self.end - self.start + new), _with_room(self.values,
                                                                                          self.end - self.start + new)
            self.start, self.end = 0, self.end - self.start
        self._k[:, :, self.end:self.end + new] = key_states
        self._v[:, :, self.end:self.end + new] = value_states
        self.end += new
        self._views()
        return self.keys, self.values

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        pass  # built from its first keys and values

    def get_seq_length(self) -> int:
        return self.end - self.start

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._k, self._v = self._k[indices], self._v[indices]
        self._views()

    def drop_front(self, columns: int) -> None:
        """Forget the first ``columns`` key columns (no remaining row attends to them)."""
        self.start += columns
        self._views()


def _with_room(x: torch.Tensor, spare: int) -> torch.Tensor:
    """``x`` (batch, heads, keys, dim) copied into storage with ``spare`` more key columns."""
    out = x.new_empty(x.shape[0], x.shape[1], x.shape[2] + spare, x.shape[3])
    out[:, :, :x.shape[2]] = x
    return out


def _buffered(layers) -> object:
    """A transformers ``Cache`` over :class:`KVBuffer` layers from (keys, values) pairs."""
    return Cache(layers=[KVBuffer(k, v) for k, v in layers])


def _starts_with(ids: list[int], prefix: list[int]) -> bool:
    return len(ids) > len(prefix) and ids[:len(prefix)] == prefix


def _cache_of(out):
    cache = getattr(out, "cache", None)
    return cache if cache is not None else out.past_key_values


def _left_pad(x: torch.Tensor, width: int, dim: int = 2) -> torch.Tensor:
    """``x`` with zeros in front along ``dim`` up to ``width``."""
    missing = width - x.shape[dim]
    if missing <= 0:
        return x
    shape = list(x.shape)
    shape[dim] = missing
    return torch.cat([torch.zeros(shape, dtype=x.dtype, device=x.device), x], dim=dim)


def _rng(request: Request, device) -> torch.Generator | None:
    """The request's own random stream when it samples with a seed (OpenAI's ``seed``), else None."""
    if request.seed is None or request.temperature <= 0:
        return None
    return torch.Generator(device=device).manual_seed(request.seed)


def adjust(logits: torch.Tensor, shaping: Shaping | None, history: list[int], matcher: RowMatcher | None) -> None:
    """A row's logits before its token is chosen (in place): its penalties and biases given the answer so far,
    then its grammar's forbidden tokens at -inf."""
    if shaping is not None:
        shaping.apply(logits, history)
    if matcher is not None:
        matcher.constrain(logits)


def _choose(logits: torch.Tensor, rows: list[Row], model) -> torch.Tensor:
    """Each row's next token: the argmax at temperature 0, else a sample (the model's top-k, and the request's
    top-p or else the model's, as generate), drawn from the row's seeded stream when it has one. A row's penalties
    and biases adjust its logits first, and a row with a grammar chooses among the tokens it allows."""
    requests = [row.request for row in rows]
    if any(r.shaping is not None for r in requests) or any(row.matcher is not None for row in rows):
        logits = logits.to(torch.float32, copy=True)  # the changes below never touch the model's output
        for row, values in zip(rows, logits):
            adjust(values, row.request.shaping, row.tokens, row.matcher)
    greedy = logits.float().argmax(-1)  # the same index; PyTorch's CPU argmax is 4x slower on bf16
    if not any(r.temperature > 0 for r in requests):
        return greedy
    gen = getattr(model, "generation_config", None)
    top_k, model_top_p = getattr(gen, "top_k", None) or 50, getattr(gen, "top_p", None) or 1.0
    out = greedy.clone()
    for i, r in enumerate(requests):
        if r.temperature <= 0:
            continue
        row = logits[i].float() / r.temperature
        if top_k and top_k < row.shape[-1]:
            kth = torch.topk(row, top_k).values[-1]
            row = row.masked_fill(row < kth, float("-inf"))
        probs = torch.softmax(row, -1)
        top_p = r.top_p or model_top_p
        if top_p < 1.0:
            sorted_p, order = probs.sort(descending=True)
            drop = sorted_p.cumsum(-1) - sorted_p > top_p  # the most likely token always stays
            probs[order[drop]] = 0
            probs = probs / probs.sum()
        out[i] = torch.multinomial(probs, 1, generator=rows[i].rng)[0]
    return out
