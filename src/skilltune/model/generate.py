"""Batched generation: left padding, KV cache, greedy by default, stop at the turn end.

Prompts are sorted by length before batching so each batch pads little, and the
outputs are returned in the caller's order.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import torch


@dataclass
class Generation:
    text: str
    prompt_tokens: int
    new_tokens: int
    latency_s: float  # wall time of the batch this prompt was in, shared by its members
    stopped: bool  # ended on the end token (not on max_new_tokens)


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


@torch.inference_mode()
def generate(model, tokenizer, prompts: list[str], max_new_tokens: int = 256, batch_size: int = 16,
             temperature: float = 0.0, eos_token_id: int | None = None, progress=None,
             stop_rows: Callable[[list[int]], list[bool]] | None = None,
             on_step: Callable[[list[int], list[int]], None] | None = None) -> list[Generation]:
    """Generate a completion for each rendered prompt (already chat-templated).

    Args:
        progress: called with the number of prompts finished after each batch.
        stop_rows: called every decode step with the prompts' indices in the running batch; a True
            ends that prompt's decoding early (its text is what was decoded so far).
        on_step: called after every decode step with the prompts' indices in the running batch and the
            token each row just produced (a finished row produces padding): token streaming.
    """
    eos = eos_token_id if eos_token_id is not None else tokenizer.eos_token_id
    old_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    model.eval()
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    results: list[Generation | None] = [None] * len(prompts)
    try:
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            batch = tokenizer([prompts[i] for i in idx], return_tensors="pt", padding=True, add_special_tokens=False)
            batch = {k: v.to(model.device) for k, v in batch.items()}
            sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
            t0 = time.perf_counter()
            if stop_rows is not None:
                from transformers import StoppingCriteriaList

                sampling["stopping_criteria"] = StoppingCriteriaList([_row_stopper(stop_rows, idx)])
            if on_step is not None:
                sampling["streamer"] = _step_streamer(on_step, idx)
            out = model.generate(**batch, max_new_tokens=max_new_tokens, eos_token_id=eos,
                                 pad_token_id=tokenizer.pad_token_id, use_cache=True, **sampling)
            elapsed = time.perf_counter() - t0
            new = out[:, batch["input_ids"].shape[1]:]  # (batch, new_tokens)
            for row, i in enumerate(idx):
                tokens = new[row].tolist()
                stopped = eos in tokens
                if stopped:
                    tokens = tokens[: tokens.index(eos)]
                tokens = [t for t in tokens if t != tokenizer.pad_token_id]
                results[i] = Generation(
                    text=tokenizer.decode(tokens, skip_special_tokens=True),
                    prompt_tokens=int(batch["attention_mask"][row].sum()),
                    new_tokens=len(tokens) + (1 if stopped else 0),
                    latency_s=elapsed,
                    stopped=stopped,
                )
            if progress is not None:
                progress(len(idx))
    finally:
        tokenizer.padding_side = old_side
    return results  # type: ignore[return-value]
