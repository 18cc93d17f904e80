"""The built-in audit checks: format, duplicates, length, PII, leakage, volume, targets, balance, rare shapes."""

from __future__ import annotations

import json
import re
from collections import Counter, defaultdict

import numpy as np

from skilltune.data.audit.base import FAIL, PASS, WARN, AuditContext, Check, CheckResult, Finding, register_check
from skilltune.data.pii import find_pii
from skilltune.data.types import Example

MAX_FINDINGS = 50


def _norm(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip().lower()


def _prompt_key(ex: Example) -> str:
    return _norm("\x1f".join(f"{t.role}:{t.content}" for t in ex.turns[:-1]))


# ---------------------------------------------------------------- format
def check_format(ctx: AuditContext) -> CheckResult:
    problems = ctx.report.problems
    notes = ctx.report.notes
    findings = [Finding(p.where, (f"[{p.field}] " if p.field else "") + p.message) for p in problems[:MAX_FINDINGS]]
    kinds = Counter(p.kind for p in problems)
    warn_notes = [n for n in notes if "BOM" in n or "CRLF" in n]
    findings += [Finding(n.split(": ", 1)[0], n.split(": ", 1)[-1]) for n in notes]
    status = FAIL if problems else (WARN if warn_notes else PASS)
    summary = (f"{len(problems)} malformed row(s) of {ctx.report.rows}: "
               + ", ".join(f"{k} x{v}" for k, v in kinds.most_common()) if problems
               else f"{ctx.report.rows} rows read, format {ctx.report.format or 'unknown'}")
    return CheckResult("format", status, len(problems), summary, findings,
                       fix="fix the rows named above, or drop them with `skilltune data clean IN OUT`",
                       stats={"format": ctx.report.format, "rows": ctx.report.rows, "kinds": dict(kinds)})


# ---------------------------------------------------------------- duplicates
def _shingles(text: str, k: int = 3) -> set[bytes]:
    words = _norm(text).split()
    if len(words) < k:
        return {" ".join(words).encode()}
    return {" ".join(words[i:i + k]).encode() for i in range(len(words) - k + 1)}


def minhash_signatures(examples: list[Example], num_perm: int = 64):
    from datasketch import MinHash

    sets = [_shingles(" ".join(t.content for t in ex.turns)) for ex in examples]
    return MinHash.bulk(sets, num_perm=num_perm)


def near_duplicate_pairs(sigs_a, sigs_b, threshold: float, same: bool) -> list[tuple[int, int, float]]:
    """Pairs (i in a, j in b) with estimated Jaccard >= threshold (LSH, then verified)."""
    from datasketch import MinHashLSH

    lsh = MinHashLSH(threshold=threshold, num_perm=len(sigs_a[0].hashvalues) if sigs_a else 64)
    for j, s in enumerate(sigs_b):
        lsh.insert(j, s)
    pairs = []
    for i, s in enumerate(sigs_a):
        for j in lsh.query(s):
            if same and j <= i:
                continue
            sim = s.jaccard(sigs_b[j])
            if sim >= threshold:
                pairs.append((i, j, sim))
    return pairs


def _signatures(ctx: AuditContext):
    if "sigs" not in ctx.cache:
        ctx.cache["sigs"] = minhash_signatures(ctx.examples) if ctx.examples else []
    return ctx.cache["sigs"]


def check_duplicates(ctx: AuditContext) -> CheckResult:
    exs = ctx.examples
    groups: dict[str, list[Example]] = defaultdict(list)
    for ex in exs:
        groups[ex.key()].append(ex)
    exact = [g for g in groups.values() if len(g) > 1]
    findings = [Finding(" = ".join(e.where for e in g[:5]), f"exact duplicate x{len(g)}") for g in exact]
    exact_keys = {id(e) for g in exact for e in g}
    near = []
    if len(exs) > 1:
        for i, j, sim in near_duplicate_pairs(_signatures(ctx), _signatures(ctx), ctx.near_dup_threshold, same=True):
            if exs[i].key() != exs[j].key():
                near.append((i, j, sim))
    findings += [Finding(f"{exs[i].where} ~ {exs[j].where}", f"near-duplicate (Jaccard {sim:.2f})")
                 for i, j, sim in near[:MAX_FINDINGS]]
    n_dup = sum(len(g) - 1 for g in exact)
    status = WARN if (exact or near) else PASS
    del exact_keys
    return CheckResult("duplicates", status, n_dup + len(near),
                       f"{n_dup} exact duplicate row(s), {len(near)} near-duplicate pair(s) "
                       f"(threshold {ctx.near_dup_threshold})", findings[:MAX_FINDINGS],
                       fix="`skilltune data clean IN OUT --near-dups` drops them; duplicates over-weight an answer",
                       stats={"exact_groups": len(exact), "near_pairs": len(near)})


def check_conflicts(ctx: AuditContext) -> CheckResult:
    by_prompt: dict[str, list[Example]] = defaultdict(list)
    for ex in ctx.examples:
        by_prompt[_prompt_key(ex)].append(ex)
    conflicts = [g for g in by_prompt.values() if len({_norm(e.completion) for e in g}) > 1]
    findings = [Finding(" / ".join(e.where for e in g[:5]),
                        f"same prompt, {len({_norm(e.completion) for e in g})} different completions")
                for g in conflicts[:MAX_FINDINGS]]
    return CheckResult("conflicting_completions", WARN if conflicts else PASS, len(conflicts),
                       f"{len(conflicts)} prompt(s) with conflicting completions", findings,
                       fix="keep the one right answer per prompt; contradictions teach the model to guess")


# ---------------------------------------------------------------- length
def token_counts(ctx: AuditContext) -> list[tuple[int, int]] | None:
    """(prompt tokens, completion tokens) per example with the chosen tokenizer."""
    if ctx.tokenizer is None:
        return None
    if "tokens" not in ctx.cache:
        from skilltune.data.tokenize import encode_example

        counts = []
        for ex in ctx.examples:
            enc = encode_example(ctx.tokenizer, ex, ctx.end_token)
            trained = enc.n_trained
            if ex.is_pair:  # the longer side decides whether the pair fits
                trained = max(trained, encode_example(ctx.tokenizer, ex.with_answer(ex.rejected), ctx.end_token).n_trained)
            counts.append((len(enc.input_ids) - enc.n_trained, trained))
        ctx.cache["tokens"] = counts
    return ctx.cache["tokens"]


def _dist(values) -> dict:
    if not len(values):
        return {}
    arr = np.asarray(values)
    return {"min": int(arr.min()), "p50": int(np.percentile(arr, 50)), "p95": int(np.percentile(arr, 95)),
            "max": int(arr.max()), "mean": round(float(arr.mean()), 1)}


def check_length(ctx: AuditContext) -> CheckResult:
    counts = token_counts(ctx)
    if counts is None:
        return CheckResult("length", WARN, 0, "skipped: no tokenizer (pass --model)", fix="pass --model MODEL",
                           skipped=True)
    total = [p + c for p, c in counts]
    stats = {"prompt": _dist([p for p, _ in counts]), "completion": _dist([c for _, c in counts]),
             "total": _dist(total), "max_seq_len": ctx.max_seq_len}
    over = [(ex, t) for ex, t in zip(ctx.examples, total) if t > ctx.max_seq_len]
    short = [ex for ex, (_, c) in zip(ctx.examples, counts) if c <= 2]
    findings = [Finding(ex.where, f"{t} tokens > max_seq_len {ctx.max_seq_len}: the completion would be cut")
                for ex, t in over[:MAX_FINDINGS]]
    findings += [Finding(ex.where, f"very short completion: {ex.completion[:40]!r}") for ex in short[:10]]
    status = FAIL if over else (WARN if short else PASS)
    s = stats["total"]
    summary = (f"tokens per example min {s.get('min')} / p50 {s.get('p50')} / p95 {s.get('p95')} / max {s.get('max')}"
               f"; {len(over)} over max_seq_len {ctx.max_seq_len}; {len(short)} very short completion(s)")
    fixes = []
    if over:
        fixes.append(f"raise train.max_seq_len to at least {max(total)} or drop the long rows")
    if short:
        fixes.append("check the very short completions: a one- or two-token answer teaches little (or is a "
                     "truncated row)")
    return CheckResult("length", status, len(over), summary, findings, fix="; ".join(fixes), stats=stats)


# ---------------------------------------------------------------- PII and secrets
def check_pii(ctx: AuditContext) -> CheckResult:
    kinds: Counter = Counter()
    findings = []
    secrets = 0
    for ex in ctx.examples:
        texts = [(t.content, f"turn {i} ({t.role})") for i, t in enumerate(ex.turns)]
        texts += [(ex.rejected, "the rejected answer")] if ex.is_pair else []
        for text, part in texts:
            for hit in find_pii(text):
                kinds[hit.kind] += 1
                secrets += hit.secret
                if len(findings) < MAX_FINDINGS:
                    shown = hit.text if not hit.secret else hit.text[:6] + "…"
                    findings.append(Finding(ex.where, f"{hit.kind} in {part}: {shown!r}"))
    total = sum(kinds.values())
    status = FAIL if secrets else (WARN if total else PASS)
    return CheckResult("pii_secrets", status, total,
                       ", ".join(f"{k} x{v}" for k, v in kinds.most_common()) or "none found", findings,
                       fix="`skilltune data clean IN OUT --redact` replaces them with typed placeholders; "
                           "rotate any leaked key", stats=dict(kinds))


# ---------------------------------------------------------------- leakage
def check_leakage(ctx: AuditContext) -> CheckResult:
    if ctx.test_report is None:
        return CheckResult("leakage", WARN, 0, "skipped: no --test file given", fix="pass --test TEST.jsonl",
                           skipped=True)
    test = ctx.test_report.examples
    train_keys = {e.key(): e for e in ctx.examples}
    train_prompts = {_prompt_key(e): e for e in ctx.examples}
    findings, n_exact = [], 0
    exact_ids = set()
    for t in test:
        match = train_keys.get(t.key()) or train_prompts.get(_prompt_key(t))
        if match is not None:
            n_exact += 1
            exact_ids.add(id(t))
            findings.append(Finding(f"{t.where} = {match.where}", "test example (or its prompt) is in the training data"))
    near = []
    if test and ctx.examples:
        test_sigs = minhash_signatures(test)
        for i, j, sim in near_duplicate_pairs(test_sigs, _signatures(ctx), ctx.near_dup_threshold, same=False):
            if id(test[i]) not in exact_ids:
                near.append((i, j, sim))
        seen = set()
        for i, j, sim in near:
            if i not in seen:
                seen.add(i)
                findings.append(Finding(f"{test[i].where} ~ {ctx.examples[j].where}",
                                        f"near-duplicate across train/test (Jaccard {sim:.2f})"))
    n_near = len({i for i, _, _ in near})
    leaked = n_exact + n_near
    return CheckResult("leakage", FAIL if leaked else PASS, leaked,
                       f"{n_exact} exact and {n_near} near-duplicate test example(s) also in train (of {len(test)})",
                       findings[:MAX_FINDINGS],
                       fix="re-split with `skilltune data split`, which keeps near-duplicate clusters in one split")


# ---------------------------------------------------------------- volume
def check_volume(ctx: AuditContext) -> CheckResult:
    n = len(ctx.examples)
    if n < 100:
        status, word = FAIL, "too few: collect data first (at least 100; 500-2,000 is the sweet spot)"
    elif n < 500:
        status, word = WARN, "workable, but 500-2,000 examples is the sweet spot"
    elif n <= 2000:
        status, word = PASS, "in the 500-2,000 sweet spot"
    else:
        status, word = PASS, "above 2,000: check that quality kept up with quantity"
    return CheckResult("volume", status, n, f"{n} valid examples: {word}", fix="add examples of the skill")


# ---------------------------------------------------------------- target consistency (JSON)
def _json_obj(text: str):
    """The JSON object or array ``text`` holds, else None (a bare number or string is not a JSON target)."""
    try:
        value = json.loads(text)
    except (json.JSONDecodeError, ValueError, RecursionError):
        return None
    return value if isinstance(value, (dict, list)) else None


def check_targets(ctx: AuditContext) -> CheckResult:
    exs = ctx.examples
    parsed = [_json_obj(ex.completion) for ex in exs]
    n_json = sum(p is not None for p in parsed)
    if not exs or n_json / len(exs) < 0.5:
        return CheckResult("json_targets", PASS, 0, f"{n_json}/{len(exs)} completions are JSON: not a JSON task")
    findings = [Finding(ex.where, f"completion is not valid JSON: {ex.completion[:60]!r}")
                for ex, p in zip(exs, parsed) if p is None]
    keysets = Counter(tuple(sorted(p)) for p in parsed if isinstance(p, dict))
    outliers = []
    if keysets:
        common, _ = keysets.most_common(1)[0]
        for ex, p in zip(exs, parsed):
            if isinstance(p, dict) and tuple(sorted(p)) != common:
                missing, extra = set(common) - set(p), set(p) - set(common)
                outliers.append(Finding(ex.where, f"keys differ from the usual {list(common)}: "
                                                  f"missing {sorted(missing)}, extra {sorted(extra)}"))
    bad = len(findings)
    status = FAIL if bad else (WARN if outliers else PASS)
    return CheckResult("json_targets", status, bad + len(outliers),
                       f"{n_json}/{len(exs)} completions are JSON; {bad} invalid, {len(outliers)} with unusual keys",
                       (findings + outliers)[:MAX_FINDINGS],
                       fix="every target of a JSON task must parse and share one schema",
                       stats={"keysets": {",".join(k): v for k, v in keysets.most_common(5)}})


# ---------------------------------------------------------------- balance
def check_balance(ctx: AuditContext) -> CheckResult:
    exs = ctx.examples
    if not exs:
        return CheckResult("balance", PASS, 0, "no examples")
    answers = Counter(_norm(ex.completion) for ex in exs)
    first = Counter((_norm(ex.completion).split() or [""])[0] for ex in exs)
    top_answer, top_n = answers.most_common(1)[0]
    share = top_n / len(exs)
    lengths = [len(ex.completion) for ex in exs]
    stats = {"completion_chars": _dist(lengths), "top_first_words": dict(first.most_common(5)),
             "top_answer_share": round(share, 3)}
    if share > 0.3 and len(exs) >= 10:
        return CheckResult("balance", WARN, top_n, f"one answer is {share:.0%} of all completions: {top_answer[:60]!r}",
                           [Finding(ex.where, "dominant answer") for ex in exs if _norm(ex.completion) == top_answer][:10],
                           fix="rebalance: the model will learn to give this answer by default", stats=stats)
    return CheckResult("balance", PASS, 0, f"most common answer {share:.0%}; first words {dict(first.most_common(3))}",
                       stats=stats)


# ---------------------------------------------------------------- rare answer shapes
def answer_shape(text: str) -> str:
    """An answer with its literals masked: quoted strings become '' (or ""), numbers 0 (`WHERE region = 'EU' LIMIT 5` and
    `WHERE region = 'NA' LIMIT 10` share a shape). Templated targets (SQL, JSON, commands) fall into a few shapes;
    free text into nearly one per row."""
    return _norm(_LITERAL.sub(_mask, text))


def _mask(match: re.Match) -> str:
    text = match.group(0)
    if match.group("key"):  # a JSON key is part of the shape
        return text
    return "0" if text[0].isdigit() else text[0] * 2


# a quoted string (SQL's '' escape, JSON's backslash escapes; a JSON key is kept) or a number, in one pass so quotes
# inside strings stay put
_LITERAL = re.compile(r"'(?:[^']|'')*'|\"(?:[^\"\\]|\\.)*\"(?P<key>\s*:)?|\b\d+(?:\.\d+)?\b")


def check_rare_shapes(ctx: AuditContext) -> CheckResult:
    """Answer shapes (an intent's SQL, a JSON layout) with far fewer rows than the others: the model seldom writes them.

    Applies when the targets are templated: at least RARE_SHAPES_MIN_ROWS rows and at most one shape per ten rows.
    A shape is rare below a third of an even share (rows / shapes)."""
    exs = ctx.examples
    shapes = Counter(answer_shape(ex.completion) for ex in exs)
    if len(exs) < RARE_SHAPES_MIN_ROWS or not 3 <= len(shapes) <= len(exs) / 10:
        return CheckResult("rare_shapes", PASS, 0, f"{len(shapes)} answer shape(s) over {len(exs)} rows: nothing "
                           f"to compare (it takes {RARE_SHAPES_MIN_ROWS}+ rows, 3+ shapes and at most one shape per "
                           "ten rows: templated targets)", stats={"shapes": len(shapes)})
    even = len(exs) / len(shapes)
    rare = {shape: n for shape, n in shapes.items() if n < even / 3}
    stats = {"shapes": len(shapes), "even_share": round(even, 1), "counts": sorted(shapes.values())}
    if not rare:
        return CheckResult("rare_shapes", PASS, 0, f"{len(shapes)} answer shapes, the smallest with "
                           f"{min(shapes.values())} rows (an even share: {even:.0f})", stats=stats)
    first = {}
    for ex in exs:
        first.setdefault(answer_shape(ex.completion), ex.where)
    findings = [Finding(first[shape], f"{n} row(s) answer in this shape: {shape[:80]!r}")
                for shape, n in sorted(rare.items(), key=lambda kv: kv[1])]
    return CheckResult("rare_shapes", WARN, len(rare),
                       f"{len(rare)} of {len(shapes)} answer shapes have under a third of an even share "
                       f"({even / 3:.0f} rows): {', '.join(str(n) for n in sorted(rare.values()))} rows",
                       findings[:MAX_FINDINGS],
                       fix="add rows whose answers take these shapes (other values, other phrasings): the model learns "
                           "a shape from a handful of rows far less well than from its share", stats=stats)


# Rows below which, or shapes above one per ten rows, the shape comparison says nothing.
RARE_SHAPES_MIN_ROWS = 50


# ---------------------------------------------------------------- preference pairs
def check_contradictions(ctx: AuditContext) -> CheckResult:
    """A > B and B > A for the same prompt: the two rows cancel and teach noise."""
    groups: dict[tuple, dict[tuple, list[Example]]] = defaultdict(lambda: defaultdict(list))
    for ex in ctx.examples:
        chosen, rejected = _norm(ex.completion), _norm(ex.rejected)
        groups[(_prompt_key(ex), min(chosen, rejected), max(chosen, rejected))][(chosen, rejected)].append(ex)
    findings = []
    for ways in groups.values():
        if len(ways) == 2:
            one, other = ways.values()
            findings.append(Finding(" / ".join(e.where for e in one[:3]) + " <-> " + " / ".join(e.where for e in other[:3]),
                                    f"the same two answers, preferred both ways ({len(one)} vs {len(other)} rows)"))
    return CheckResult("contradicting_pairs", FAIL if findings else PASS, len(findings),
                       f"{len(findings)} pair(s) of answers preferred both ways (A > B and B > A for one prompt)",
                       findings[:MAX_FINDINGS],
                       fix="drop both rows or have the item judged again: `skilltune scorecard export --preferences` "
                           "keeps only items whose raters agree")


def _length(ctx: AuditContext, text: str) -> int:
    if ctx.tokenizer is not None:
        return len(ctx.tokenizer(text, add_special_tokens=False)["input_ids"])
    return len(text.split())


def check_length_bias(ctx: AuditContext) -> CheckResult:
    """Chosen answers systematically longer: DPO then learns verbosity, not quality."""
    pairs = [(_length(ctx, ex.completion), _length(ctx, ex.rejected)) for ex in ctx.examples]
    if not pairs:
        return CheckResult("length_bias", PASS, 0, "no pairs")
    unit = "tokens" if ctx.tokenizer is not None else "words"
    longer = sum(c > r for c, r in pairs) / len(pairs)
    # geometric mean: a pair twice as long and one half as long average to 1, not 1.25
    ratio = float(np.exp(np.mean([np.log(max(c, 1) / max(r, 1)) for c, r in pairs])))
    biased = len(pairs) >= 10 and (longer >= LENGTH_BIAS_SHARE or ratio >= LENGTH_BIAS_RATIO)
    stats = {"chosen_longer_share": round(longer, 3), "mean_length_ratio": round(ratio, 3), "unit": unit,
             "chosen": _dist([c for c, _ in pairs]), "rejected": _dist([r for _, r in pairs])}
    summary = (f"chosen is longer in {longer:.0%} of {len(pairs)} pairs; chosen/rejected length ratio "
               f"{ratio:.2f} (geometric mean, {unit})")
    return CheckResult("length_bias", WARN if biased else PASS, round(longer * len(pairs)), summary,
                       fix="balance the pairs (add ones where the shorter answer wins) or keep DPO's beta high: "
                           "a length bias teaches the model that longer is better", stats=stats)


# A preference file is length-biased when the chosen answer is longer this often, or this much longer on average.
LENGTH_BIAS_SHARE, LENGTH_BIAS_RATIO = 0.75, 1.5

SFT, PREFERENCE = ("sft",), ("preference",)
for _check in [
    Check("format", "rows parse and have the right fields and role order", check_format),
    Check("duplicates", "exact and near-duplicate rows (pairs: the same prompt and answers)", check_duplicates),
    Check("conflicting_completions", "same prompt, different answers", check_conflicts, SFT),
    Check("contradicting_pairs", "A preferred to B and B to A for the same prompt", check_contradictions, PREFERENCE),
    Check("length_bias", "chosen answers systematically longer than rejected ones", check_length_bias, PREFERENCE),
    Check("length", "token counts and truncation at max_seq_len", check_length),
    Check("pii_secrets", "emails, phones, cards, IBANs, IPs, API keys, private keys", check_pii),
    Check("leakage", "test examples that also appear in train", check_leakage),
    Check("volume", "number of examples against the 100 / 500-2,000 guidance", check_volume),
    Check("json_targets", "JSON completions parse and share keys", check_targets, SFT),
    Check("balance", "one answer dominating", check_balance, SFT),
    Check("rare_shapes", "answer shapes (templated targets) with far fewer rows than the others", check_rare_shapes, SFT),
]:
    register_check(_check)
