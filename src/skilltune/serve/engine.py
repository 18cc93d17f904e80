"""The generation engine: one worker thread batches queued requests; the model can be swapped live.

Requests wait in a bounded queue (full -> the caller answers 429). By default the worker
batches continuously (serve/continuous.py): a request joins the running batch between two
decode steps and leaves it as soon as it stops. For a model that cannot (sliding-window
layers), or with continuous batching off, the static mode takes what is queued (up to
``max_batch``, same sampling (temperature, top-p, seed)), generates it as one left-padded batch to its end,
and resolves each request's future. ``swap`` replaces the model between batches: rows in
flight finish on the model they started with.

Budgets are enforced inside the batch: at every decode step a request whose future was
cancelled (its client left, or the server gave up on it), whose deadline has passed, or
whose answer has reached one of its stop sequences stops decoding, and a batch whose
requests have all stopped ends at once. The worker
records when it last made progress, so readiness can tell a busy engine from a stuck one.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import deque
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass, field
from typing import Callable

from skilltune.model.decode import DecodeBatch, Shaping, TokenLogprob
from skilltune.model.generate import Generation, generate
from skilltune.model.structured import Grammar, GrammarError, vocab_width


class QueueFull(Exception):
    pass


@dataclass
class Loaded:
    version: str  # e.g. sql-demo@v3
    model: object
    tokenizer: object
    system_prompt: str | None = None
    context_tokens: int = 2048  # the model's context length (prompt + completion)
    counter: object = None  # a copy of the tokenizer for counting request tokens (see count_tokens)
    _count_lock: threading.Lock = field(default_factory=threading.Lock)

    def token_ids(self, text: str) -> list[int]:
        """A prompt's token ids, encoded on a copy of the tokenizer.

        A fast tokenizer is not thread-safe: encoding without padding resets the padding
        setting of the Rust tokenizer the engine is batch-encoding with (left padding) at
        that moment, and the engine's batch comes out ragged. Request threads use their own copy.
        """
        if self.counter is None:
            import copy

            self.counter = copy.deepcopy(self.tokenizer)
        with self._count_lock:
            return self.counter(text, add_special_tokens=False)["input_ids"]

    def count_tokens(self, text: str) -> int:
        """Prompt tokens (:meth:`token_ids`)."""
        return len(self.token_ids(text))


@dataclass
class Job:
    prompt: str  # rendered with the chat template
    max_tokens: int
    temperature: float
    deadline: float = float("inf")  # time.monotonic() after which decoding stops
    top_p: float | None = None  # nucleus sampling's mass when sampling (None: the model's generation config)
    seed: int | None = None  # sampling: its own seeded random stream in the running batch (best effort in static)
    future: Future = field(default_factory=Future)
    # streaming: called from the worker with each new piece of text and the log-probabilities of the tokens that
    # made it (when asked for, in the running batch; static batches give them with the whole answer)
    on_text: Callable[[str, list[TokenLogprob]], None] | None = None
    stops: tuple[str, ...] = ()  # stop sequences: the answer is whole once its text holds one
    stop_seen: bool = False  # set by the worker when the decoded text reached a stop sequence
    grammar: Grammar | None = None  # structured output: what the answer must match (checked before the queue)
    logprobs: int | None = None  # None, or k: each answer token's log-probability and the k most likely there
    shaping: Shaping | None = None  # penalties and biases on its logits

    def finished_by_caller(self, now: float) -> bool:
        return self.future.cancelled() or now > self.deadline

    @property
    def watched(self) -> bool:
        """Whether its tokens are turned into text as they are chosen (it streams, or has stop sequences)."""
        return self.on_text is not None or bool(self.stops)

    def ends(self, now: float) -> bool:
        """Whether this job's row leaves the batch now: its answer reached a stop sequence, or its caller left."""
        return self.stop_seen or self.finished_by_caller(now)


class IncrementalText:
    """A row's tokens turned into text as they come: only whole characters, and words as the tokenizer
    would join them (a piece is decoded with the tokens before it, as transformers' TextStreamer does)."""

    def __init__(self, tokenizer, eos: int | None, limit: int):
        self.tokenizer, self.eos, self.limit = tokenizer, eos, limit
        self.ids: list[int] = []
        self.prefix = self.read = 0  # ids[prefix:read] is the context already turned into text
        self.done = False

    def add(self, token: int) -> str:
        """The text ``token`` completes ("" while a character or word is incomplete, and after the end)."""
        if self.done:
            return ""
        if token == self.eos or len(self.ids) >= self.limit:
            self.done = True
            return ""
        self.ids.append(token)
        before = self.tokenizer.decode(self.ids[self.prefix:self.read], skip_special_tokens=True)
        now = self.tokenizer.decode(self.ids[self.prefix:], skip_special_tokens=True)
        if len(now) <= len(before) or now.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for the rest
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return now[len(before):]


class AnswerText:
    """A job's answer turned into text as it decodes: each new piece goes to its listener (streaming),
    and ``job.stop_seen`` is set at the token that completes one of its stop sequences, so the row leaves
    the batch then instead of decoding on to the end token or its budget."""

    def __init__(self, job: Job, tokenizer, eos: int | None):
        self.job, self.pieces = job, IncrementalText(tokenizer, eos, job.max_tokens)
        self.text = ""  # kept only when there are stop sequences to look for
        self.reach = max(map(len, job.stops), default=0)  # the longest stop: how far back a new piece can complete one
        self.scored: list[TokenLogprob] = []  # the log-probabilities of the tokens of the piece being completed

    def add(self, token: int, logprob: TokenLogprob | None = None) -> None:
        job = self.job
        if job.future.cancelled() or job.stop_seen:
            return
        if logprob is not None and not self.pieces.done:
            self.scored.append(logprob)
        piece = self.pieces.add(token)
        if not piece:
            return
        scored, self.scored = self.scored, []
        if job.stops:
            start = max(0, len(self.text) - self.reach + 1)  # a stop may straddle two pieces
            self.text += piece
            job.stop_seen = any(self.text.find(s, start) >= 0 for s in job.stops)
        if job.on_text is not None:
            try:
                job.on_text(piece, scored)
            except Exception:  # noqa: BLE001 - a listener's failure never stops the batch
                job.on_text = None


def answer_sink(job: Job, tokenizer, eos: int | None) -> Callable[[int], None] | None:
    """What receives ``job``'s tokens as they are chosen (None when it neither streams nor has stop sequences)."""
    return AnswerText(job, tokenizer, eos).add if job.watched else None


def _admissible(jobs: list[Job], model, tokenizer, eos: int | None) -> list[Job]:
    """The jobs to decode now. One whose time-out passed while it was queued, or whose grammar this model cannot
    take (it was checked against the model current when it arrived; a swap since may bring another tokenizer), is
    answered with that error instead; the others' grammars have their matchers ready."""
    now = time.monotonic()
    live = []
    for job in jobs:
        if job.finished_by_caller(now):
            _resolve(job.future, error=TimeoutError("the request's time-out passed while it was queued"))
            continue
        if job.grammar is not None:
            try:
                job.grammar.check(tokenizer, tokenizer.eos_token_id if eos is None else eos,
                                  vocab_width(model, tokenizer))
            except GrammarError as exc:
                _resolve(job.future, error=exc)
                continue
        live.append(job)
    return live


def _resolve(future: Future, value=None, error: BaseException | None = None) -> None:
    """Set a request's result or error unless its caller already cancelled it (then it goes nowhere)."""
    try:
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(value)
    except InvalidStateError:
        pass


class Engine:
    def __init__(self, loaded: Loaded, queue_size: int = 64, max_batch: int = 16, continuous: bool = True,
                 max_context: int | None = None, max_new_tokens: int | None = None):
        self.current = loaded
        self.queue: queue.Queue[Job] = queue.Queue(maxsize=queue_size)
        self.max_batch = max_batch
        self.continuous = continuous  # continuous batching where the model allows it (serve/continuous.py)
        # the server's limits (serve.max_prompt_tokens, serve.max_tokens_limit): what bounds a row's key span
        self.max_context, self.max_new_tokens = max_context, max_new_tokens
        self._held: deque[Job] = deque()  # taken from the queue for a later batch (another sampling)
        self._stop = threading.Event()
        self._lock = threading.Lock()
        # held while the model computes (a decode step, a static batch, a prompt scored for echo): one user at a time
        self.model_lock = threading.Lock()
        self.last_progress = time.monotonic()  # a decode step, a finished batch, or an idle poll
        self.busy_since: float | None = None  # when the batch in flight started
        self.worker = threading.Thread(target=self._run, name="skilltune-generate", daemon=True)
        self.worker.start()

    def swap(self, loaded: Loaded) -> None:
        with self._lock:
            self.current = loaded

    def pending(self) -> int:
        """Requests waiting for a batch (queued or held back)."""
        return self.queue.qsize() + len(self._held)

    def stalled(self, after_s: float) -> bool:
        """Whether work is waiting or running and the worker has made no progress for ``after_s`` seconds."""
        waiting = self.busy_since is not None or self.pending() > 0
        return waiting and (time.monotonic() - self.last_progress > after_s or not self.worker.is_alive())

    def submit(self, prompt: str, max_tokens: int, temperature: float, timeout_s: float | None = None,
               on_text: Callable[[str], None] | None = None, stops: list[str] | tuple[str, ...] = (),
               top_p: float | None = None, seed: int | None = None, grammar: Grammar | None = None,
               logprobs: int | None = None, shaping: Shaping | None = None) -> Future:
        """Queue a request; its future resolves to (version, Generation). ``on_text`` streams its text as decoded;
        decoding ends at the token that completes one of ``stops`` (the text returned still holds it); ``grammar``
        constrains the answer (structured output); ``logprobs`` (k) scores its tokens; ``shaping`` penalises and
        biases its logits."""
        deadline = time.monotonic() + timeout_s if timeout_s else float("inf")
        job = Job(prompt, max_tokens, temperature, deadline, on_text=on_text, stops=tuple(stops), top_p=top_p,
                  seed=seed, grammar=grammar, logprobs=logprobs, shaping=shaping)
        if len(self._held) >= self.queue.maxsize:  # held-back jobs count against the same bound
            raise QueueFull
        try:
            self.queue.put_nowait(job)
        except queue.Full:
            raise QueueFull from None
        return job.future

    def _next_job(self, timeout: float) -> Job:
        """The oldest held-back job, else the next queued one (raises ``queue.Empty``)."""
        if self._held:
            return self._held.popleft()
        return self.queue.get(timeout=timeout)

    def _take_batch(self) -> list[Job]:
        """Jobs that share their sampling (temperature, top-p, seed), oldest first.

        A job that samples otherwise is held back here for a later batch, never put
        back into the queue: the worker is the queue's only consumer, so a blocking put
        on a full queue would wait for itself forever.
        """
        first = self._next_job(timeout=0.1)
        batch, other = [first], []
        deadline = time.monotonic() + 0.01  # a short window lets concurrent requests join
        while len(batch) < self.max_batch:
            try:
                job = self._next_job(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                break
            same = (job.temperature, job.top_p, job.seed) == (first.temperature, first.top_p, first.seed)
            (batch if same else other).append(job)
            if len(other) >= self.max_batch:
                break
        self._held.extendleft(reversed(other))
        return batch

    def _generate(self, loaded: Loaded, live: list[Job]) -> list[Generation]:
        def stop_rows(idx: list[int]) -> list[bool]:
            now = self.last_progress = time.monotonic()
            return [live[i].ends(now) for i in idx]

        return generate(loaded.model, loaded.tokenizer, [j.prompt for j in live],
                        max_new_tokens=max(j.max_tokens for j in live), batch_size=len(live),
                        temperature=live[0].temperature, top_p=live[0].top_p, seed=live[0].seed, stop_rows=stop_rows,
                        on_step=self._streamer(loaded, live), grammars=[j.grammar for j in live],
                        logprobs=[j.logprobs for j in live], shapings=[j.shaping for j in live])

    @staticmethod
    def _streamer(loaded: Loaded, live: list[Job]):
        """The decode-step callback that hands each watched job's new tokens to its :func:`answer_sink` (None when
        no job is watched)."""
        sinks = {i: answer_sink(j, loaded.tokenizer, loaded.tokenizer.eos_token_id) for i, j in enumerate(live)
                 if j.watched}
        if not sinks:
            return None

        def on_step(idx: list[int], tokens: list[int]) -> None:
            for i, token in zip(idx, tokens):
                if i in sinks:
                    sinks[i](token)
        return on_step

    def batching(self, loaded: Loaded | None = None) -> tuple[str, str | None]:
        """("continuous", None) or ("static", why) for ``loaded`` (default: the current model)."""
        from skilltune.model.decode import decode_refusal

        if not self.continuous:
            return "static", "continuous batching is off"
        loaded = loaded or self.current
        why = decode_refusal(loaded.model, self._widest_row(loaded))
        if why and decode_refusal(loaded.model, 1) is None:  # a sliding window: smaller limits would fit it
            why += "; serve.max_prompt_tokens + serve.max_tokens_limit within the window lets it batch continuously"
        return ("static", why) if why else ("continuous", None)

    def _widest_row(self, loaded: Loaded) -> int | None:
        """The most key columns one row can span in a running batch under the server's limits (None: unbounded).

        Rows admitted together are left-padded to the group's longest prompt, which is under the context cap
        (prompt + max_tokens <= cap is checked before the queue); each then decodes up to its own budget.
        """
        if self.max_new_tokens is None:
            return None
        cap = min(loaded.context_tokens, self.max_context or loaded.context_tokens)
        return cap + min(self.max_new_tokens, cap)

    def _run(self) -> None:
        batch, batch_of = None, None  # the continuous mode's running rows (model/decode.py) and their model
        while not self._stop.is_set():
            with self._lock:
                loaded = self.current
            if batch is not None and batch.rows:  # rows finish on the model they started on
                self._continuous_step(batch, batch_of, admit=batch_of is loaded)
            elif self.batching(loaded)[0] == "continuous":
                if batch is None or batch_of is not loaded:
                    batch, batch_of = DecodeBatch(loaded.model, loaded.tokenizer), loaded
                self._continuous_step(batch, loaded, admit=True)
            else:
                batch = batch_of = None
                self._static_batch(loaded)

    def _continuous_step(self, batch: DecodeBatch, loaded: Loaded, admit: bool) -> None:
        """Admit what arrived, one decode step for every row, resolve the rows that stopped."""
        from skilltune.serve.continuous import take_jobs

        jobs = take_jobs(self, self.max_batch - len(batch.rows), wait=not batch.rows) if admit else []
        live = _admissible(jobs, batch.model, batch.tokenizer, batch.eos)
        if not batch.rows and not live:
            self.last_progress = time.monotonic()
            return
        self.busy_since = self.busy_since or time.monotonic()
        try:
            with self.model_lock:
                if live:
                    batch.admit(live, lambda job: answer_sink(job, batch.tokenizer, batch.eos))
                self._resolve_rows(batch, loaded)
                if batch.rows:
                    batch.step()
                    self._resolve_rows(batch, loaded)
        except Exception as exc:  # noqa: BLE001 - delivered to every waiting request of the batch
            for job in [r.request for r in batch.rows if r.request not in live] + live:
                _resolve(job.future, error=exc)
            batch.rows = []
            batch.cache = None
        finally:
            self.last_progress = time.monotonic()
            if not batch.rows:
                self.busy_since = None

    @staticmethod
    def _resolve_rows(batch: DecodeBatch, loaded: Loaded) -> None:
        now = time.monotonic()
        for row in batch.leave(lambda job: job.ends(now)):
            if row.finished or row.request.stop_seen:
                _resolve(row.request.future, (loaded.version, batch.generation(row, now)))
            elif now > row.request.deadline:
                _resolve(row.request.future, error=TimeoutError("the request's time-out passed while decoding"))

    def _static_batch(self, loaded: Loaded) -> None:
        """The static mode: take a batch of one sampling (temperature, top-p, seed) and generate it to its end."""
        try:
            batch = self._take_batch()
        except queue.Empty:
            self.last_progress = time.monotonic()
            return
        live = _admissible(batch, loaded.model, loaded.tokenizer, None)  # generate's end token: the tokenizer's
        if not live:
            return
        self.busy_since = time.monotonic()
        try:
            with self.model_lock:
                outs = self._generate(loaded, live)
            now = time.monotonic()
            for job, out in zip(live, outs):
                if now > job.deadline and not job.stop_seen:  # cut off at its deadline: not an answer
                    _resolve(job.future, error=TimeoutError("the request's time-out passed while decoding"))
                    continue
                if out.new_tokens > job.max_tokens:  # the batch ran longer than this request asked for
                    ids = loaded.tokenizer(out.text, add_special_tokens=False)["input_ids"][: job.max_tokens]
                    out = Generation(loaded.tokenizer.decode(ids), out.prompt_tokens, job.max_tokens,
                                     out.latency_s, False, out.logprobs and out.logprobs[:job.max_tokens])
                _resolve(job.future, (loaded.version, out))
        except Exception as exc:  # noqa: BLE001 - delivered to the waiting request
            for job in live:
                _resolve(job.future, error=exc)
        finally:
            self.busy_since = None
            self.last_progress = time.monotonic()

    def score(self, loaded: Loaded, ids: list[int], k: int, timeout_s: float | None = None) -> list:
        """Each of ``ids``' tokens scored by ``loaded``'s model given the ones before it
        (:func:`~skilltune.model.decode.prompt_logprobs`), between two of the worker's steps (never beside them on
        the same weights). Blocking: call it off the event loop."""
        from skilltune.model.decode import prompt_logprobs

        deadline = time.monotonic() + timeout_s if timeout_s else float("inf")
        with self.model_lock:
            return prompt_logprobs(loaded.model, ids, k, deadline)

    def close(self) -> None:
        self._stop.set()
        self.worker.join(timeout=5)
