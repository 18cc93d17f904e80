"""`skilltune advise DATA`: teach a skill (finetune) or provide knowledge (RAG)?

Finetuning teaches *how* to answer (a format, a voice, a task); it is a poor way to
store facts. The advisor measures, on the data itself:

- **derivability**: how much of each completion's vocabulary already appears in its prompt;
- **knowledge load**: completions carrying facts (names, numbers, dates, URLs) found nowhere
  in the prompt and rarely repeated across examples — facts to look up, not a skill;
- **format uniformity**: how alike the completions are in shape (first word, JSON, length);
- **volume** against the 100 / 500-2,000 guidance.
"""

from __future__ import annotations

import json
import re
import statistics
from collections import Counter
from dataclasses import dataclass, field

from skilltune.data.reader import load_examples

_WORD = re.compile(r"[A-Za-z0-9_']+")
_FACT = re.compile(r"https?://\S+|\b\d{4}-\d{2}-\d{2}\b|\b\d[\d,.]*\d\b|\b[A-Z][a-z]+(?:\s[A-Z][a-z]+)*\b")


@dataclass
class Advice:
    verdict: str  # finetune | rag | both
    reasons: list[str]
    numbers: dict = field(default_factory=dict)
    next_command: str = ""


def _facts(text: str) -> set[str]:
    out = set()
    for m in _FACT.finditer(text):
        tok = m.group()
        start = m.start()
        at_sentence_start = start == 0 or re.search(r"[.!?:]\s*$", text[:start]) is not None
        if tok[0].isupper() and at_sentence_start and " " not in tok:
            continue  # an ordinary capitalised first word
        out.add(tok.lower())
    return out


def advise(path: str, test: str | None = None, fmt: str = "auto", columns=None) -> Advice:
    exs = load_examples(path, fmt, columns)
    n = len(exs)
    overlaps, fact_counts = [], Counter()
    per_row_novel: list[set[str]] = []
    for ex in exs:
        prompt = " ".join(t.content for t in ex.turns[:-1]).lower()
        words = [w.lower() for w in _WORD.findall(ex.completion)]
        overlaps.append(sum(w in prompt for w in words) / len(words) if words else 1.0)
        novel = {f for f in _facts(ex.completion) if not _derivable(f, prompt)}
        per_row_novel.append(novel)
        fact_counts.update(novel)
    # a fact repeated in many rows is part of the skill's vocabulary (a table name, a product); rare ones are knowledge
    rare_limit = max(2, int(0.02 * n))
    knowledge_rows = sum(1 for s in per_row_novel if any(fact_counts[f] <= rare_limit for f in s))
    first_words = Counter((_WORD.findall(ex.completion) or [""])[0].lower() for ex in exs)
    json_share = sum(_is_json(ex.completion) for ex in exs) / n
    lengths = [len(ex.completion) for ex in exs]
    cv = statistics.pstdev(lengths) / statistics.fmean(lengths) if n > 1 and statistics.fmean(lengths) else 0.0
    uniformity = max(first_words.most_common(1)[0][1] / n, json_share, max(0.0, 1 - cv))
    numbers = {"examples": n, "derivability": round(statistics.fmean(overlaps), 3),
               "knowledge_share": round(knowledge_rows / n, 3), "format_uniformity": round(uniformity, 3),
               "top_first_word": first_words.most_common(1)[0][0], "json_share": round(json_share, 3),
               "length_cv": round(cv, 3)}
    reasons = [f"{numbers['derivability']:.0%} of completion words already appear in the prompt",
               f"{numbers['knowledge_share']:.0%} of completions carry facts absent from the prompt and rare "
               f"across the data (knowledge)",
               f"format uniformity {numbers['format_uniformity']:.2f} (1 = every completion has the same shape)"]
    know, skill = numbers["knowledge_share"], numbers["format_uniformity"]
    if know >= 0.5 and skill < 0.6:
        verdict = "rag"
        reasons.append("the data is mostly facts to look up: retrieval (RAG) will be more accurate and easier to "
                       "update than weights")
        nxt = "put these documents in a retrieval index; finetune later only if the answer *format* needs teaching"
    elif know >= 0.3:
        verdict = "both"
        reasons.append("a consistent format with many unique facts: finetune the format, retrieve the facts")
        nxt = f"skilltune data audit {path}   # then finetune on the format, with facts supplied by retrieval"
    else:
        verdict = "finetune"
        reasons.append("the completions follow from the prompt in a consistent way: this is a skill to teach")
        nxt = f"skilltune data audit {path}" + (f" --test {test}" if test else "")
    if n < 100:
        reasons.append(f"only {n} examples: collect at least 100 (500-2,000 is the sweet spot) before training")
    elif n < 500:
        reasons.append(f"{n} examples: workable; 500-2,000 is the sweet spot")
    else:
        reasons.append(f"{n} examples: enough volume")
    return Advice(verdict, reasons, numbers, nxt)


def _derivable(fact: str, prompt: str) -> bool:
    """A fact is derivable when it, or one of its parts (a year in a date, a word in a name), is in the prompt."""
    if fact in prompt:
        return True
    parts = [p for p in re.split(r"[^0-9a-z]+", fact) if len(p) >= 3 or (p.isdigit() and len(p) >= 2)]
    return any(p in prompt for p in parts if not p.startswith("http"))


def _is_json(text: str) -> bool:
    try:
        json.loads(text)
        return True
    except (json.JSONDecodeError, ValueError, RecursionError):
        return False
