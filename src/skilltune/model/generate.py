"""Batched generation: greedy by default, stop at the turn end, outputs in the caller's order.

Prompts are sorted by length so the prompts prefilled together pad little. Models whose cache
holds the whole context decode in a running batch (model/decode.py): a finished answer's row
goes to the next prompt at once, and the prompts' shared prefix (chat header, system prompt) is
prefilled once. Models whose sliding-window layers a prompt and its budget could outgrow go
through transformers' ``generate`` in static batches.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass
from typing import Callable

import torch
from transformers import LogitsProcessor

from skilltune.model.decode import (DecodeBatch, Shaping, TokenLogprob, adjust, decode_refusal, shared_prefix,
                                    token_logprobs)
from skilltune.model.kernels import generation_kernels
from skilltune.model.structured import Grammar, vocab_width


@dataclass
class Generation:
    text: str
    prompt_tokens: int
    new_tokens: int
    latency_s: float  # from its prefill to its last token (static batches: the batch's wall time)
    stopped: bool  # ended on the end token (not on max_new_tokens)
    logprobs: list[TokenLogprob] | None = None  # per answer token, when asked for


def _row_stopper(stop_rows: Callable[[list[int]], list[bool]], idx: list[int]):
    """A transformers stopping criterion that ends the rows ``stop_rows`` names (checked every decode step).

    ``stop_rows`` gets the caller's indices of the batch's rows and answers, per row, whether it is
    finished from the caller's side (a request timed out or its client left): such a row stops
    decoding at the next step, and the batch ends as soon as every row has.
    """
    from transformers import StoppingCriteria

    class _Stop(StoppingCriteria):
        def __call__(self, input_ids, scores, **kwargs) -> torch.BoolTensor:
            return torch.tensor(stop_rows(idx), dtype=torch.bool, device=input_ids.device)

    return _Stop()


def _step_streamer(on_step: Callable[[list[int], list[int]], None], idx: list[int]):
    """A transformers streamer that hands each decode step's new tokens, one per row, to ``on_step``."""
    from transformers.generation.streamers import BaseStreamer

    class _Steps(BaseStreamer):
        prompt_seen = False

        def put(self, value: torch.Tensor) -> None:
            if not self.prompt_seen:  # the first call carries the prompts themselves
                self.prompt_seen = True
                return
            on_step(idx, value.reshape(-1).tolist())

        def end(self) -> None:
            pass

    return _Steps()


class _RowLogits(LogitsProcessor):
    """A transformers logits processor for the rows of a static batch, as :func:`skilltune.model.decode._choose`
    does for the running batch: each row's penalties and biases, then its grammar's allowed tokens."""

    def __init__(self, grammars: list, shapings: list, model, tokenizer, eos: int, prompt_width: int):
        width = vocab_width(model, tokenizer)
        self.matchers = [g.matcher(tokenizer, eos, width) if g is not None else None for g in grammars]
        self.shapings = shapings
        self.eos, self.prompt_width = eos, prompt_width
        self.done = [False] * len(grammars)  # the row chose its end token, or its grammar is complete

    def whole(self, row: int, last: int) -> bool:
        """Whether ``row``'s grammar is satisfied to its end, ``last`` (the batch's final token, never fed back to
        the processor) included."""
        m = self.matchers[row]
        if m is not None and not self.done[row]:
            self.done[row] = last == self.eos or m.take(last)
        return m is not None and self.done[row]

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if input_ids.shape[1] > self.prompt_width:  # the token each row chose at the step before
            for row, token in enumerate(input_ids[:, -1].tolist()):
                m = self.matchers[row]
                if m is not None and not self.done[row]:
                    self.done[row] = token == self.eos or m.take(token)
        for row, (m, shaping) in enumerate(zip(self.matchers, self.shapings)):
            if m is not None and self.done[row]:  # whole: only the end token (the rest of the batch may decode on)
                scores[row] = float("-inf")
                scores[row, self.eos] = 0.0
            elif m is not None or shaping is not None:
                adjust(scores[row], shaping, input_ids[row, self.prompt_width:].tolist(), m)
        return scores


def generate(model, tokenizer, prompts: list[str], max_new_tokens: int = 256, batch_size: int = 16,
             temperature: float = 0.0, eos_token_id: int | None = None, progress=None,
             stop_rows: Callable[[list[int]], list[bool]] | None = None,
             on_step: Callable[[list[int], list[int]], None] | None = None,
             top_p: float | None = None, seed: int | None = None,
             grammars: list[Grammar | None] | None = None,
             logprobs: list[int | None] | None = None, shapings: list[Shaping | None] | None = None
             ) -> list[Generation]:
    """Generate a completion for each rendered prompt (already chat-templated).

    Args:
        batch_size: rows decoding at once.
        progress: called with the number of prompts finished, as they finish.
        stop_rows: called every decode step with the prompts' indices in the running batch; a True
            ends that prompt's decoding early (its text is what was decoded so far).
        on_step: called after every decode step with prompts' indices and the token each just produced
            (static batches: every row of the batch, a finished one producing padding): token streaming.
        top_p: nucleus sampling's mass when sampling (None: the model's generation config).
        seed: when sampling, each prompt's draws come from a stream seeded with it (the running batch), or the
            static batch starts from it (best effort: the batch's other rows share that stream).
        grammars: per prompt, what its answer must match (structured output: model/structured.py), or None.
        logprobs: per prompt, None or k: each answer token's log-probability and the k most likely at its place.
        shapings: per prompt, penalties and biases on its logits (model/decode.py ``Shaping``), or None.
    """
    if not prompts:
        return []
    grammars = grammars or [None] * len(prompts)
    logprobs = logprobs or [None] * len(prompts)
    shapings = shapings or [None] * len(prompts)
    eos = eos_token_id if eos_token_id is not None else tokenizer.eos_token_id
    model.eval()
    ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    order = sorted(range(len(prompts)), key=lambda i: len(ids[i]))
    longest = len(ids[order[-1]]) + max_new_tokens
    with generation_kernels(model):
        if decode_refusal(model, longest):
            if seed is not None and temperature > 0:
                torch.manual_seed(seed)
            return _generate_static(model, tokenizer, prompts, order, max_new_tokens, batch_size, temperature, eos,
                                    progress, stop_rows, on_step, top_p, grammars, logprobs, shapings)
        return _generate_running(model, tokenizer, prompts, [ids[i] for i in order], order, max_new_tokens,
                                 batch_size, temperature, eos, progress, stop_rows, on_step, top_p, seed, grammars,
                                 logprobs, shapings)


def _static_logprobs(logits: tuple, new: torch.Tensor, wanted: list[int | None]) -> list[list | None]:
    """Per row of a static batch, its tokens' :class:`TokenLogprob` (None where not asked), from the raw logits
    ``generate`` returns for each step."""
    per_step = [token_logprobs(step_logits, new[:, s], wanted) for s, step_logits in enumerate(logits)]
    return [[step[row] for step in per_step] if k is not None else None for row, k in enumerate(wanted)]


@dataclass
class _Prompt:
    index: int  # in the caller's list
    prompt: str
    max_tokens: int
    temperature: float
    top_p: float | None = None
    seed: int | None = None
    grammar: Grammar | None = None
    logprobs: int | None = None
    shaping: Shaping | None = None


def _generate_running(model, tokenizer, prompts, ids, order, max_new_tokens, batch_size, temperature, eos, progress,
                      stop_rows, on_step, top_p=None, seed=None, grammars=None, logprobs=None,
                      shapings=None) -> list[Generation]:
    """A running batch (model/decode.py): refilled from the queue of prompts as rows finish.

    ``ids``: the prompts' token ids in ``order``. New prompts join when a quarter of the batch is
    free (or none is left decoding): a prefill is a forward pass of its own, so several arrivals
    share one.
    """
    prefix = shared_prefix(ids) if len(ids) > 1 else None  # one prompt: nothing to share
    batch = DecodeBatch(model, tokenizer, eos, prefix=prefix)
    queue = deque(_Prompt(i, prompts[i], max_new_tokens, temperature, top_p, seed, grammars[i], logprobs[i],
                          shapings[i]) for i in order)
    results: list[Generation | None] = [None] * len(prompts)
    refill_at = max(1, batch_size // 4)
    stream = (lambda r: (lambda token, _logprob: on_step([r.index], [token]))) if on_step is not None else None
    while queue or batch.rows:
        free = batch_size - len(batch.rows)
        if queue and (free >= refill_at or not batch.rows):
            batch.admit([queue.popleft() for _ in range(min(free, len(queue)))], stream)
        cut = None
        if stop_rows is not None:
            running = [r.request.index for r in batch.rows]
            ended = {i for i, stop in zip(running, stop_rows(running)) if stop}
            cut = lambda request: request.index in ended  # noqa: E731
        now = time.monotonic()
        left = batch.leave(cut)
        for row in left:
            results[row.request.index] = batch.generation(row, now)
        if progress is not None and left:
            progress(len(left))
        if batch.rows:
            batch.step()
    return results  # type: ignore[return-value]


@torch.inference_mode()
def _generate_static(model, tokenizer, prompts, order, max_new_tokens, batch_size, temperature, eos, progress,
                     stop_rows, on_step, top_p=None, grammars=None, logprobs=None, shapings=None) -> list[Generation]:
    """transformers' ``generate`` on consecutive batches of ``batch_size`` (left padding, KV cache)."""
    old_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    results: list[Generation | None] = [None] * len(prompts)
    try:
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            batch = tokenizer([prompts[i] for i in idx], return_tensors="pt", padding=True, add_special_tokens=False)
            batch = {k: v.to(model.device) for k, v in batch.items()}
            options = {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
            if temperature > 0 and top_p is not None:
                options["top_p"] = top_p
            t0 = time.perf_counter()
            if stop_rows is not None:
                from transformers import StoppingCriteriaList

                options["stopping_criteria"] = StoppingCriteriaList([_row_stopper(stop_rows, idx)])
            if on_step is not None:
                options["streamer"] = _step_streamer(on_step, idx)
            shaped = None
            row_grammars = [grammars[i] if grammars else None for i in idx]
            row_shapings = [shapings[i] if shapings else None for i in idx]
            if any(x is not None for x in row_grammars + row_shapings):
                from transformers import LogitsProcessorList

                shaped = _RowLogits(row_grammars, row_shapings, model, tokenizer, eos, batch["input_ids"].shape[1])
                options["logits_processor"] = LogitsProcessorList([shaped])
            scored = logprobs is not None and any(logprobs[i] is not None for i in idx)
            out = model.generate(**batch, max_new_tokens=max_new_tokens, eos_token_id=eos,
                                 pad_token_id=tokenizer.pad_token_id, use_cache=True, output_logits=scored,
                                 return_dict_in_generate=True, **options)
            elapsed = time.perf_counter() - t0
            new = out.sequences[:, batch["input_ids"].shape[1]:]  # (batch, new_tokens)
            steps = _static_logprobs(out.logits, new, [logprobs[i] for i in idx]) if scored else None
            for row, i in enumerate(idx):
                tokens = new[row].tolist()
                stopped = eos in tokens
                if stopped:
                    tokens = tokens[: tokens.index(eos)]
                elif shaped is not None and tokens:  # its grammar completed on the budget's last token: whole
                    stopped = shaped.whole(row, tokens[-1])
                tokens = [t for t in tokens if t != tokenizer.pad_token_id]
                results[i] = Generation(
                    text=tokenizer.decode(tokens, skip_special_tokens=True),
                    prompt_tokens=int(batch["attention_mask"][row].sum()),
                    new_tokens=len(tokens) + (1 if stopped else 0),
                    latency_s=elapsed,
                    stopped=stopped,
                    logprobs=steps[row][:len(tokens)] if steps is not None and steps[row] is not None else None,
                )
            if progress is not None:
                progress(len(idx))
    finally:
        tokenizer.padding_side = old_side
    return results  # type: ignore[return-value]
