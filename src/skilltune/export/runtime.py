"""The real runtime: a GGUF export loaded by llama.cpp itself (through ``llama-cpp-python``).

Where the ``llamacpp`` extra is installed, GGUF and Ollama exports are also checked in
llama.cpp: each held-out prompt is rendered from the file's chat template the way
llama-server does (a BOS the template writes is dropped; llama.cpp adds its own when the
vocabulary says so), tokenized by llama.cpp's tokenizer (not transformers'), compared with
the training ids, and answered greedily by llama.cpp's kernels; the primary metric must be
within 3 points of the registry version. Tokens per second are measured on the way.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

RUNTIME_TOLERANCE = 0.03


def available() -> bool:
    try:
        import llama_cpp  # noqa: F401
    except ImportError:
        return False
    return True


def llama_cpp_answers(path: Path, prompts: list[str], max_new_tokens: int, n_ctx: int = 2048,
                      threads: int | None = None) -> tuple[list[list[int]], list[str], dict]:
    """llama.cpp's token ids for each rendered prompt, its greedy answers, and the timing."""
    from llama_cpp import Llama

    llm = Llama(model_path=str(path), n_ctx=n_ctx, n_threads=threads or os.cpu_count() or 1, verbose=False,
                seed=0)
    ids, answers = [], []
    generated = 0
    t0 = time.perf_counter()
    for text in prompts:
        tokens = llm.tokenize(text.encode("utf-8"), add_bos=True, special=True)  # add_bos: as the vocabulary says
        ids.append(tokens)
        out = llm.create_completion(prompt=tokens, max_tokens=max_new_tokens, temperature=0.0, top_k=1,
                                    repeat_penalty=1.0)
        answers.append(out["choices"][0]["text"])
        generated += out["usage"]["completion_tokens"]
        llm.reset()
    wall = time.perf_counter() - t0
    threads = llm.n_threads if hasattr(llm, "n_threads") else threads
    llm.close()  # now, not in a destructor at interpreter exit
    return ids, answers, {"generated_tokens": generated, "wall_s": wall, "tokens_per_s": generated / max(wall, 1e-9),
                          "threads": threads}


def check(path: Path, target_prompts: list[str], trained_ids: list[list[int]], registry_answers: list[str],
          refs: list[str], metric, ctx: dict, max_new_tokens: int) -> dict:
    """Template and answer parity in llama.cpp itself (see the module docstring)."""
    ids, answers, timing = llama_cpp_answers(path, target_prompts, max_new_tokens)
    same = [a == b for a, b in zip(ids, trained_ids)]
    reg = sum(metric.score(a, r, ctx) for a, r in zip(registry_answers, refs)) / max(len(refs), 1)
    got = sum(metric.score(a, r, ctx) for a, r in zip(answers, refs)) / max(len(refs), 1)
    return {"ok": all(same) and reg - got <= RUNTIME_TOLERANCE + 1e-9, "n": len(ids), "template_identical": sum(same),
            "answers_identical": sum(a.strip() == b.strip() for a, b in zip(answers, registry_answers)),
            "metric": metric.name, "registry_score": reg, "llama_cpp_score": got, "cost_points": (reg - got) * 100,
            "rule": f"{metric.name} within {RUNTIME_TOLERANCE * 100:.0f} points in llama.cpp", **timing}
