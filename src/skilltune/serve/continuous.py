"""Continuous batching: requests join the running batch between decode steps and leave when they stop.

The engine's static mode (engine.py) generates a batch to its end before it takes the next one,
so a request that arrives just after a batch started waits for all of it, and a batch runs as long
as its longest answer. Here one loop owns a :class:`DecodeBatch` — the rows decoding together and
one KV cache over all of them — and between two decode steps it

1. drops the rows that stopped (end-of-turn token, their own ``max_tokens``, a cancelled or timed-out
   request) and resolves them at once, trimming key columns no remaining row needs;
2. prefills the requests that arrived (together, left-padded) and merges their caches into the batch
   (each row keeps its own positions; padding is masked);
3. runs one decode step for every row (greedy or sampled per row) and streams each row its new text.

Greedy answers are those of the static mode (tests compare them token for token). It needs a cache
whose layers all hold the whole context (:func:`continuous_refusal`); a model with sliding-window or
linear-attention layers is served in the static mode, and the server says so.
"""

from __future__ import annotations

import queue
import time
from dataclasses import dataclass, field

import torch

from skilltune.model.generate import Generation
from skilltune.serve.engine import stream_token


def continuous_refusal(model) -> str | None:
    """Why this model cannot be served with continuous batching (None when it can)."""
    config = getattr(model, "config", None)
    if config is None:
        return "no model config"
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    partial = sorted({t for t in (getattr(config, "layer_types", None) or []) if t != "full_attention"})
    if partial or getattr(config, "sliding_window", None):
        return f"{', '.join(partial) or 'sliding-window'} layers keep a partial cache"
    if getattr(config, "is_encoder_decoder", False):
        return "an encoder-decoder model"
    return None


@dataclass
class Row:
    job: object  # engine.Job
    prompt_tokens: int
    position: int  # the position id of the next token fed
    started: float
    text: object = None  # IncrementalText when the job streams
    tokens: list[int] = field(default_factory=list)
    stopped: bool = False  # ended on the end-of-turn token

    @property
    def finished(self) -> bool:
        return self.stopped or len(self.tokens) >= self.job.max_tokens


class DecodeBatch:
    """The rows decoding together and their KV cache (keys left-padded to one length, padding masked)."""

    def __init__(self, loaded):
        self.loaded = loaded
        self.model, self.tokenizer = loaded.model, loaded.tokenizer
        self.eos = self.tokenizer.eos_token_id
        self.device = next(self.model.parameters()).device
        self.rows: list[Row] = []
        self.cache = None  # DynamicCache over the rows
        self.mask = torch.zeros((0, 0), dtype=torch.long, device=self.device)  # (rows, keys): 1 = a real key
        self.next_tokens = torch.zeros(0, dtype=torch.long, device=self.device)  # fed at the next step
        import inspect

        forward = (self.model.get_base_model() if hasattr(self.model, "get_base_model") else self.model).forward
        # transformers renamed past_key_values to cache; use the name this version takes
        self.cache_arg = "cache" if "cache" in inspect.signature(forward).parameters else "past_key_values"

    # ------------------------------------------------------------ joining
    @torch.inference_mode()
    def admit(self, jobs: list, on_text) -> None:
        """Prefill ``jobs`` together and merge them into the batch (their first token is chosen here)."""
        tok = self.tokenizer
        old_side, tok.padding_side = tok.padding_side, "left"
        try:
            enc = tok([j.prompt for j in jobs], return_tensors="pt", padding=True, add_special_tokens=False)
        finally:
            tok.padding_side = old_side
        ids, mask = enc["input_ids"].to(self.device), enc["attention_mask"].to(self.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True)
        cache = _cache_of(out)
        now = time.monotonic()
        rows = [Row(j, int(mask[i].sum()), int(mask[i].sum()), now, on_text(j)) for i, j in enumerate(jobs)]
        first = _choose(out.logits[:, -1], [j.temperature for j in jobs], self.model)
        self._merge(cache, mask, rows, first)

    def _merge(self, cache, mask: torch.Tensor, rows: list[Row], first: torch.Tensor) -> None:
        from transformers import DynamicCache

        if self.cache is None or not self.rows:
            self.cache, self.mask, self.rows = cache, mask, []
            self.next_tokens = first
        else:
            width = max(self.mask.shape[1], mask.shape[1])
            layers = []
            for old, new in zip(self.cache.layers, cache.layers):
                layers.append((torch.cat([_left_pad(old.keys, width), _left_pad(new.keys, width)]),
                               torch.cat([_left_pad(old.values, width), _left_pad(new.values, width)])))
            self.cache = DynamicCache(layers, config=self.model.config)
            self.mask = torch.cat([_left_pad(self.mask, width, dim=1), _left_pad(mask, width, dim=1)])
            self.next_tokens = torch.cat([self.next_tokens, first])
        self.rows += rows
        for row, token in zip(rows, first.tolist()):
            self._take(row, token)

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
        chosen = _choose(out.logits[:, -1], [r.job.temperature for r in self.rows], self.model)
        self.next_tokens = chosen
        for row, token in zip(self.rows, chosen.tolist()):
            row.position += 1
            self._take(row, token)

    def _take(self, row: Row, token: int) -> None:
        if row.finished:
            return
        if token == self.eos:
            row.stopped = True
            return
        row.tokens.append(token)
        if row.text is not None:
            stream_token(row.job, row.text, token)

    # ------------------------------------------------------------ leaving
    def leave(self, now: float) -> list[tuple[Row, Generation | None]]:
        """Remove the rows that are done (finished, cancelled, past their deadline); keep the others' cache."""
        gone = [i for i, r in enumerate(self.rows) if r.finished or r.job.finished_by_caller(now)]
        if not gone:
            return []
        out = [(self.rows[i], self._generation(self.rows[i], now) if self.rows[i].finished else None) for i in gone]
        keep = [i for i in range(len(self.rows)) if i not in set(gone)]
        self.rows = [self.rows[i] for i in keep]
        if keep:
            index = torch.tensor(keep, device=self.device)
            self.cache.batch_select_indices(index)
            self.mask, self.next_tokens = self.mask[index], self.next_tokens[index]
            unused = int((self.mask.sum(0) == 0).long().cumprod(0).sum())  # leading key columns no row needs
            if unused:
                for layer in self.cache.layers:
                    layer.keys, layer.values = layer.keys[:, :, unused:], layer.values[:, :, unused:]
                self.mask = self.mask[:, unused:]
        else:
            self.cache, self.mask = None, self.mask[:0, :0]
            self.next_tokens = self.next_tokens[:0]
        return out

    def _generation(self, row: Row, now: float) -> Generation:
        text = self.tokenizer.decode(row.tokens, skip_special_tokens=True)
        return Generation(text, row.prompt_tokens, len(row.tokens) + (1 if row.stopped else 0), now - row.started,
                          row.stopped)


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


def _choose(logits: torch.Tensor, temperatures: list[float], model) -> torch.Tensor:
    """Each row's next token: the argmax at temperature 0, else a sample (the model's top-k/top-p, as generate)."""
    greedy = logits.argmax(-1)
    if not any(t > 0 for t in temperatures):
        return greedy
    gen = getattr(model, "generation_config", None)
    top_k, top_p = getattr(gen, "top_k", None) or 50, getattr(gen, "top_p", None) or 1.0
    out = greedy.clone()
    for i, t in enumerate(temperatures):
        if t <= 0:
            continue
        row = logits[i].float() / t
        if top_k and top_k < row.shape[-1]:
            kth = torch.topk(row, top_k).values[-1]
            row = row.masked_fill(row < kth, float("-inf"))
        probs = torch.softmax(row, -1)
        if top_p < 1.0:
            sorted_p, order = probs.sort(descending=True)
            drop = sorted_p.cumsum(-1) - sorted_p > top_p
            probs[order[drop]] = 0
            probs = probs / probs.sum()
        out[i] = torch.multinomial(probs, 1)[0]
    return out


def take_jobs(engine, capacity: int, wait: bool) -> list:
    """Up to ``capacity`` queued jobs (held-back ones first); waits briefly for one when the batch is idle."""
    jobs = []
    while len(jobs) < capacity:
        try:
            jobs.append(engine._next_job(timeout=0.1 if (wait and not jobs) else 0.0))
        except queue.Empty:
            break
    return jobs
