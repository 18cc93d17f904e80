"""Metrics as registered plug-ins: name, direction, a per-example score, an aggregate.

Built-ins register through :func:`register_metric`, the same call a third party
uses; ``module:function`` in ``eval.metrics`` loads a user's own (a function
``(prediction, reference, context) -> float``, averaged).
"""

from __future__ import annotations

import importlib
import json
import os
import re
import statistics
from dataclasses import dataclass, field
from typing import Callable

from skilltune.errors import ConfigError


@dataclass(frozen=True)
class Metric:
    name: str
    score: Callable[[str, str, dict], float]  # (prediction, reference, context) -> per-example score
    higher_is_better: bool = True
    description: str = ""
    aggregate: Callable[[list[float]], float] = field(default=lambda xs: statistics.fmean(xs) if xs else 0.0)


METRICS: dict[str, Metric] = {}


def register_metric(metric: Metric) -> None:
    METRICS[metric.name] = metric


def normalize(text: str) -> str:
    return re.sub(r"\s+", " ", text.strip().lower()).rstrip(" .;")


def _exact(pred: str, ref: str, ctx: dict) -> float:
    return float(normalize(pred) == normalize(ref))


def _rouge(kind: str):
    def score(pred: str, ref: str, ctx: dict) -> float:
        from rouge_score import rouge_scorer

        scorer = ctx.setdefault("_rouge", rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True))
        return scorer.score(ref, pred)[kind].fmeasure
    return score


def _bleu(pred: str, ref: str, ctx: dict) -> float:
    import sacrebleu

    return sacrebleu.sentence_bleu(pred, [ref]).score / 100


def _chrf(pred: str, ref: str, ctx: dict) -> float:
    import sacrebleu

    return sacrebleu.sentence_chrf(pred, [ref]).score / 100


def _parse_json(text: str):
    text = text.strip()
    fence = re.search(r"```(?:json)?\s*(.*?)```", text, re.DOTALL)
    if fence:
        text = fence.group(1).strip()
    try:
        return json.loads(text)
    except RecursionError:  # model output such as "[[[[...]]]]" 100k deep: invalid, not a crash
        raise ValueError("JSON nested too deeply") from None


def _json_valid(pred: str, ref: str, ctx: dict) -> float:
    try:
        _parse_json(pred)
        return 1.0
    except (json.JSONDecodeError, ValueError):
        return 0.0


def _json_schema(pred: str, ref: str, ctx: dict) -> float:
    import jsonschema

    schema_path = ctx.get("json_schema")
    if not schema_path:
        raise ConfigError(["eval.json_schema: the json_schema metric needs a JSON Schema file"])
    schema = ctx.setdefault("_schema", json.loads(open(schema_path, encoding="utf-8").read()))
    try:
        jsonschema.validate(_parse_json(pred), schema)
        return 1.0
    except (json.JSONDecodeError, ValueError, jsonschema.ValidationError):
        return 0.0


def json_field_scores(pred: str, ref: str) -> tuple[float, float]:
    """(share of reference keys whose value is right, 1 if the key set is exactly right)."""
    try:
        ref_obj = _parse_json(ref)
    except (json.JSONDecodeError, ValueError):
        raise ValueError(f"the reference is not JSON: {ref[:80]!r}") from None
    try:
        pred_obj = _parse_json(pred)
    except (json.JSONDecodeError, ValueError):
        return 0.0, 0.0
    if not isinstance(ref_obj, dict) or not isinstance(pred_obj, dict):
        return float(pred_obj == ref_obj), float(pred_obj == ref_obj)
    right = sum(1 for k, v in ref_obj.items() if k in pred_obj and pred_obj[k] == v)
    return (right / len(ref_obj) if ref_obj else 1.0), float(set(pred_obj) == set(ref_obj))


def _sql_exec(pred: str, ref: str, ctx: dict) -> float:
    from skilltune.evaluate.sql import sql_exec_score

    db = ctx.get("db")
    if not db:
        raise ConfigError(["eval.db: the sql_exec metric needs a SQLite database (set eval.db or pass --db)"])
    return sql_exec_score(pred, ref, db, ctx.get("sql_timeout_s", 2.0))


def _sql_valid(pred: str, ref: str, ctx: dict) -> float:
    from skilltune.evaluate.sql import sql_valid_score

    return sql_valid_score(pred)


for _m in [
    Metric("exact_match", _exact, description="normalised exact match (case, whitespace, trailing . or ;)"),
    Metric("rouge1", _rouge("rouge1"), description="ROUGE-1 F1 (rouge-score)"),
    Metric("rouge2", _rouge("rouge2"), description="ROUGE-2 F1 (rouge-score)"),
    Metric("rougeL", _rouge("rougeL"), description="ROUGE-L F1 (rouge-score)"),
    Metric("bleu", _bleu, description="sentence BLEU / 100 (sacrebleu)"),
    Metric("chrf", _chrf, description="sentence chrF / 100 (sacrebleu)"),
    Metric("json_valid", _json_valid, description="output parses as JSON"),
    Metric("json_schema", _json_schema, description="output validates against eval.json_schema"),
    Metric("json_fields", lambda p, r, c: json_field_scores(p, r)[0], description="share of reference keys right"),
    Metric("json_keys_exact", lambda p, r, c: json_field_scores(p, r)[1], description="key set exactly right"),
    Metric("sql_exec", _sql_exec, description="same result set as the reference on eval.db (Spider rules)"),
    Metric("sql_valid", _sql_valid, description="parses as SQLite (sqlglot)"),
]:
    register_metric(_m)

# Metrics that bring companions along (json_fields reports the exact-key share too; sql_exec the validity).
COMPANIONS = {"json_fields": ["json_keys_exact", "json_valid"], "sql_exec": ["sql_valid"]}


def load_plugin_metrics() -> None:
    """Register metrics that installed packages declare under the ``skilltune.metrics`` entry-point group."""
    from importlib.metadata import entry_points

    for ep in entry_points(group="skilltune.metrics"):
        if ep.name not in METRICS:
            obj = ep.load()
            register_metric(obj if isinstance(obj, Metric) else Metric(ep.name, obj, description=f"plug-in {ep.value}"))


# eval.response_format -> the eval field naming the file it decodes under, and what that file is
FORMAT_SOURCES = {"json_schema": ("json_schema", "a JSON Schema file"), "grammar": ("grammar", "a Lark grammar file")}


def metric_problems(ecfg) -> list[str]:
    """What is wrong with an ``eval`` config section, found without a model: metric names and their inputs."""
    if any(m not in METRICS and ":" not in m for m in ecfg.metrics):
        load_plugin_metrics()
    problems = [f"eval.metrics: unknown metric {m!r} (built-in: {', '.join(METRICS)})"
                for m in ecfg.metrics if ":" not in m and m not in METRICS]
    from skilltune.evaluate.targets import OPERATIONAL

    evaluated = set(ecfg.metrics) | {c for m in ecfg.metrics for c in COMPANIONS.get(m, [])}
    problems += [f"eval.targets: {name!r} is neither a metric of eval.metrics ({', '.join(ecfg.metrics)}) nor one "
                 f"of {', '.join(OPERATIONAL)}" for name in ecfg.targets if name not in evaluated | set(OPERATIONAL)]
    from skilltune.model.structured import RESPONSE_FORMATS

    if ecfg.response_format not in RESPONSE_FORMATS:
        problems.append(f"eval.response_format: {ecfg.response_format!r} is not one of {', '.join(RESPONSE_FORMATS)}")
    source, _ = FORMAT_SOURCES.get(ecfg.response_format, (None, None))
    if source and not getattr(ecfg, source):
        problems.append(f"eval.{source}: eval.response_format {ecfg.response_format} decodes under it "
                        f"(set eval.{source})")
    for path_field, metric in (("db", "sql_exec"), ("json_schema", "json_schema"), ("grammar", None)):
        value = getattr(ecfg, path_field)
        if value and not os.path.isfile(value):
            problems.append(f"eval.{path_field}: file not found: {value}")
        if metric in ecfg.metrics and not value:
            problems.append(f"eval.{path_field}: the {metric} metric needs it (set eval.{path_field})")
    return problems


def resolve_metrics(names: list[str], allow_code: bool = False) -> list[Metric]:
    """Metric objects for ``names`` (built-in, entry-point plug-ins, or ``module:function``), companions included.

    A ``module:function`` name imports and runs Python code named by a config file, so it
    is loaded only with the operator's consent (``allow_code``: ``--allow-code-metrics``
    or ``SKILLTUNE_ALLOW_CODE_METRICS=1``); installed plug-ins were chosen by whoever
    installed them and need none.
    """
    allow_code = allow_code or os.environ.get("SKILLTUNE_ALLOW_CODE_METRICS") == "1"
    if any(n not in METRICS and ":" not in n for n in names):
        load_plugin_metrics()
    out: list[Metric] = []
    problems = []
    for name in names:
        if ":" in name and not allow_code:
            problems.append(f"eval.metrics: '{name}' would import and run Python code named by the config; "
                            "pass --allow-code-metrics (or set SKILLTUNE_ALLOW_CODE_METRICS=1) if you trust it")
        elif ":" in name:
            mod, _, fn = name.partition(":")
            try:
                func = getattr(importlib.import_module(mod), fn)
            except (ImportError, AttributeError) as exc:
                problems.append(f"eval.metrics: cannot load '{name}' ({exc})")
                continue
            out.append(Metric(name, func, description=f"user metric {name}"))
        elif name in METRICS:
            out.append(METRICS[name])
            out += [METRICS[c] for c in COMPANIONS.get(name, []) if c not in names]
        else:
            problems.append(f"eval.metrics: unknown metric '{name}' (built-in: {', '.join(METRICS)})")
    if problems:
        raise ConfigError(problems)
    seen, unique = set(), []
    for m in out:
        if m.name not in seen:
            seen.add(m.name)
            unique.append(m)
    return unique
