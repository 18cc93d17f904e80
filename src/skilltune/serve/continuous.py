"""Continuous batching in the server: requests join the running batch between decode steps.

The batch itself — rows joining and leaving one KV cache — is :class:`skilltune.model.decode.DecodeBatch`,
which offline generation uses too; the engine (engine.py) takes the queued requests here and admits
them between two decode steps, so a request that arrives while others decode waits one step, not
for the batch to finish. Models whose cache cannot take rows in and out
(:func:`~skilltune.model.decode.decode_refusal`: sliding-window or linear-attention layers) are
served in static batches, and the server says so.
"""

from __future__ import annotations

import queue


def take_jobs(engine, capacity: int, wait: bool) -> list:
    """Up to ``capacity`` queued jobs (held-back ones first); waits briefly for one when the batch is idle."""
    jobs = []
    while len(jobs) < capacity:
        try:
            jobs.append(engine._next_job(timeout=0.1 if (wait and not jobs) else 0.0))
        except queue.Empty:
            break
    return jobs
