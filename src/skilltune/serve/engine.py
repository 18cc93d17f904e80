"""The generation engine: one worker thread batches queued requests; the model can be swapped live.

Requests wait in a bounded queue (full -> the caller answers 429). The worker takes
what is queued (up to ``max_batch``, same sampling temperature), generates them as one
left-padded batch, and resolves each request's future. ``swap`` replaces the model
between batches: a batch in flight finishes on the model it started with.
"""

from __future__ import annotations

import queue
from collections import deque
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field

from skilltune.evaluate.generate import Generation, generate


class QueueFull(Exception):
    pass


@dataclass
class Loaded:
    version: str  # e.g. sql-demo@v3
    model: object
    tokenizer: object
    system_prompt: str | None = None


@dataclass
class Job:
    prompt: str  # rendered with the chat template
    max_tokens: int
    temperature: float
    future: Future = field(default_factory=Future)


class Engine:
    def __init__(self, loaded: Loaded, queue_size: int = 64, max_batch: int = 16):
        self.current = loaded
        self.queue: queue.Queue[Job] = queue.Queue(maxsize=queue_size)
        self.max_batch = max_batch
        self._held: deque[Job] = deque()  # taken from the queue for a later batch (another temperature)
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self.worker = threading.Thread(target=self._run, name="skilltune-generate", daemon=True)
        self.worker.start()

    def swap(self, loaded: Loaded) -> None:
        with self._lock:
            self.current = loaded

    def submit(self, prompt: str, max_tokens: int, temperature: float) -> Future:
        job = Job(prompt, max_tokens, temperature)
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
        """Jobs that share a sampling temperature, oldest first.

        A job with another temperature is held back here for a later batch, never put
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
            (batch if job.temperature == first.temperature else other).append(job)
            if len(other) >= self.max_batch:
                break
        self._held.extendleft(reversed(other))
        return batch

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                batch = self._take_batch()
            except queue.Empty:
                continue
            with self._lock:
                loaded = self.current
            live = [j for j in batch if not j.future.cancelled()]
            if not live:
                continue
            try:
                outs: list[Generation] = generate(loaded.model, loaded.tokenizer, [j.prompt for j in live],
                                                  max_new_tokens=max(j.max_tokens for j in live),
                                                  batch_size=len(live), temperature=live[0].temperature)
                for job, out in zip(live, outs):
                    if out.new_tokens > job.max_tokens:  # the batch ran longer than this request asked for
                        ids = loaded.tokenizer(out.text, add_special_tokens=False)["input_ids"][: job.max_tokens]
                        out = Generation(loaded.tokenizer.decode(ids), out.prompt_tokens, job.max_tokens,
                                         out.latency_s, False)
                    job.future.set_result((loaded.version, out))
            except Exception as exc:  # noqa: BLE001 - delivered to the waiting request
                for job in live:
                    if not job.future.done():
                        job.future.set_exception(exc)

    def close(self) -> None:
        self._stop.set()
        self.worker.join(timeout=5)
