"""`skilltune eval`: base vs finetuned on the same held-out prompts, in one report.

:func:`evaluate` is the whole workflow: resolve what to compare -> generate (batched)
-> score with the metric registry -> overfitting (val vs test) and latency/cost ->
write per-example JSONL, ``results.json``, ``report.md`` and ``report.html``.
For a LoRA/DoRA target the baseline is the same weights with the adapter switched
off, so no second copy of the base model is loaded.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from skilltune.config.load import config_from_dict, load_config
from skilltune.config.schema import EvalConfig, SkilltuneConfig
from skilltune.data.reader import load_examples
from skilltune.data.tokenize import encode_example, prompt_text
from skilltune.errors import SkilltuneError
from skilltune.model.generate import generate
from skilltune.model.kernels import generation_kernels
from skilltune.model.loading import release_memory
from skilltune.model.structured import RESPONSE_FORMATS, Grammar, GrammarError
from skilltune.evaluate import forgetting
from skilltune.evaluate.metrics import FORMAT_SOURCES, Metric, resolve_metrics
from skilltune.evaluate.targets import OPERATIONAL, gate, judge_targets
from skilltune.evaluate.stats import bootstrap_delta, percentile
from skilltune.model.target import LoadPolicy, Target, artifact_run_dir, find_artifact, load_target
from skilltune.model.tokenizer import turn_end_token
from skilltune.paths import atomic_write_text
from skilltune.progress import SILENT, Stages
from skilltune.train.precision import inference_dtype


class EvalError(SkilltuneError):
    pass


@dataclass
class EvalPlan:
    target: str
    run_dir: Path | None
    cfg: SkilltuneConfig
    test_file: str
    val_file: str | None
    baseline: str | None  # None: the adapter switched off
    forgetting: bool = True
    policy: LoadPolicy = field(default_factory=LoadPolicy)  # how the target's base is loaded
    version: str | None = None  # NAME@vN when a registry version is evaluated
    recorded_run_dir: str | None = None  # the run the evaluated artifact came from (for results.json)
    against: str | None = None  # NAME@vN the candidate is gated against (its checkout is the baseline)
    baseline_policy: LoadPolicy | None = None  # how to load the baseline (a registry version's base, by hash)


def _registry_plan(ref: str, overrides: list[str] | None, trust_remote_code: bool) -> tuple[Path, SkilltuneConfig,
                                                                                              LoadPolicy, str, str]:
    """A registry version: its verified checkout from the store, with the config the registry kept.

    The run directory it came from is never read: it may have changed (or been
    replaced) since the version was registered.
    """
    from skilltune.registry.api import Registry

    co = Registry().checkout(ref, trust_remote_code)
    v, version = co.version, co.ref
    run_config = v.lineage.get("run_config")
    if run_config is None:
        raise EvalError(f"{version} was registered by an older skilltune that kept no copy of its config, so "
                        "its test set and metrics are unknown",
                        hint=f"re-register the run (skilltune registry add RUN_DIR --name {v.name}), or evaluate "
                             "the run directory itself")
    cfg = config_from_dict(run_config, overrides, source=f"the registry's config of {version}")
    return co.path, cfg, co.policy, version, v.lineage.get("run_dir")


def _is_registry_ref(target: str) -> bool:
    return not Path(target).exists() and "@" in target and not target.startswith("embedded:")


def plan_eval(target: str, test: str | None, baseline: str | None, metrics: list[str] | None,
              db: str | None, overrides: list[str] | None = None, forgetting: bool = True,
              trust_remote_code: bool = False, against: str | None = None) -> EvalPlan:
    """Work out what to evaluate from a registry version, a run directory, an adapter directory or a model spec."""
    path = Path(target)
    run_dir = version = recorded = None
    policy = LoadPolicy(trust_remote_code=trust_remote_code)
    if _is_registry_ref(target):
        path, cfg, policy, version, recorded = _registry_plan(target, overrides, trust_remote_code)
        target = str(path)
    elif path.is_dir() and (path / "run.json").is_file():
        run_dir = path
        recorded = str(path.resolve())
        cfg = load_config(path / "config.yaml", overrides)
    else:
        if not path.exists():  # not a folder: a model spec, resolved now so a typo fails here, not after loading
            from skilltune.model.sources import resolve_model

            try:
                resolve_model(target)
            except SkilltuneError as exc:
                raise EvalError(f"{target} is not a run directory, an adapter directory, a registry version "
                                f"(NAME@vN) or a model that can be loaded here",
                                hint=f"check the path (runs are written under train.output_dir, runs/ by default); "
                                     f"for a model: {exc.hint}") from None
        artifact = find_artifact(path) if path.is_dir() else None
        run = artifact_run_dir(artifact) if artifact is not None else None  # only the run it lies in
        cfg = load_config(run / "config.yaml" if run and (run / "config.yaml").is_file() else None, overrides)
    if metrics:
        cfg.eval.metrics = metrics
    if db:
        cfg.eval.db = str(Path(db).resolve())
    test_file = test or cfg.data.test
    if not test_file:
        raise EvalError("no test set: pass --test FILE (or set data.test in the run's config)")
    val_file = cfg.data.val if (run_dir or version) else None
    plan = EvalPlan(target, run_dir, cfg, test_file, val_file, baseline, forgetting, policy, version, recorded)
    if against:
        if baseline:
            raise EvalError("pass --baseline or --against, not both")
        from skilltune.registry.api import Registry

        co = Registry().checkout(against, trust_remote_code)  # the release gate: same prompts, same decoding
        plan.against, plan.baseline, plan.baseline_policy = co.ref, str(co.path), co.policy
    return plan


def overfitting_check(metric: str, val: float, test: float, val_loss: float, test_loss: float,
                      threshold: float) -> dict:
    """Flag a validation score that beats the test score by more than ``threshold``.

    Validation steered training (early stopping, best checkpoint), so a much better
    validation than test score means the run fitted the validation data, not the skill.
    """
    gap = val - test
    return {"metric": metric, "val": val, "test": test, "gap": gap, "val_loss": val_loss, "test_loss": test_loss,
            "threshold": threshold, "flagged": gap > threshold}


def _prompts(tokenizer, examples) -> list[str]:
    return [prompt_text(tokenizer, ex) for ex in examples]


def heldout_loss(model, tokenizer, examples, batch_size: int = 8) -> float | None:
    """Mean completion-token loss of ``examples`` (teacher forced; None for none)."""
    from skilltune.train.loss import CompletionLoss, mean_loss, supports_shared_prefix

    end = turn_end_token(tokenizer)
    share = "cache" if supports_shared_prefix(model, gradient_checkpointing=False) else None
    return mean_loss(CompletionLoss(model, None), [encode_example(tokenizer, ex, end) for ex in examples],
                     tokenizer.pad_token_id, batch_size, share_prefix=share, device=model.device)


def _score(metrics: list[Metric], outputs: list[str], refs: list[str], ctx: dict) -> dict[str, list[float]]:
    return {m.name: [m.score(o, r, ctx) for o, r in zip(outputs, refs)] for m in metrics}


def _single_latency(target: Target, prompts: list[str], ecfg: EvalConfig, grammar: Grammar | None, n: int = 3,
                    progress=None) -> list[float]:
    """Latency of requests served one at a time (what a user of an unbatched server sees)."""
    out = []
    for p in prompts[:n]:
        t0 = time.perf_counter()
        generate(target.model, target.tokenizer, [p], max_new_tokens=ecfg.max_new_tokens, batch_size=1,
                 grammars=[grammar])
        out.append(time.perf_counter() - t0)
        if progress is not None:
            progress(1)
    return out


@dataclass
class _Side:
    """One model's answers on the test prompts."""

    label: str
    gens: list
    wall_s: float
    general: dict | None = None  # the forgetting suite's result


def evaluate(plan: EvalPlan, out_dir: Path, stages: Stages = SILENT, allow_code_metrics: bool = False) -> dict:
    """Run the evaluation in ``plan`` and write the report files into ``out_dir``.

    ``allow_code_metrics``: the operator's consent to import ``module:function`` metrics named in the config.
    """
    ecfg = plan.cfg.eval
    metrics = resolve_metrics(ecfg.metrics, allow_code=allow_code_metrics)
    ctx = {"db": ecfg.db, "json_schema": ecfg.json_schema}
    if any(m.name == "sql_exec" for m in metrics) and not (ecfg.db and Path(ecfg.db).is_file()):
        raise EvalError(f"sql_exec needs the SQLite database; eval.db = {ecfg.db!r} does not exist",
                        hint="pass --db FILE")
    unknown = [t for t in ecfg.targets if t not in {m.name for m in metrics} | set(OPERATIONAL)]
    if unknown:
        raise EvalError(f"eval.targets names {', '.join(map(repr, unknown))}, which this evaluation does not measure",
                        hint=f"targets can name {', '.join(m.name for m in metrics)} or {', '.join(OPERATIONAL)}")
    examples = load_examples(plan.test_file, plan.cfg.data.format, plan.cfg.data.columns, plan.cfg.data.system_prompt)
    refs = [ex.completion for ex in examples]
    grammar = _response_grammar(ecfg)
    precision, dtype = inference_dtype(ecfg.precision)
    target = load_target(plan.target, dtype=dtype, policy=plan.policy)
    prompts = _prompts(target.tokenizer, examples)
    base, tuned = _generate_both(plan, target, prompts, stages, dtype, grammar)
    forgot = forgetting.compare(base.general, tuned.general, ecfg.forgetting_threshold) if plan.forgetting else None
    stages.message(f"scoring with {', '.join(m.name for m in metrics)}")
    tuned_scores = _score(metrics, [g.text for g in tuned.gens], refs, ctx)
    base_scores = _score(metrics, [g.text for g in base.gens], refs, ctx)
    headline = _headline(metrics, base_scores, tuned_scores)
    with generation_kernels(target.model):  # the finetuned weights stay as they are from here on
        overfit = _overfitting(plan, target, metrics, headline, examples, ctx, stages, grammar)
        latency = _latency_cost(target, prompts, tuned, base, ecfg, stages, grammar)
    rows = [{"line": ex.line, "prompt": ex.turns[-2].content if len(ex.turns) > 1 else "",
             "reference": refs[i], "base_output": base.gens[i].text, "tuned_output": tuned.gens[i].text,
             "base": {m.name: base_scores[m.name][i] for m in metrics},
             "tuned": {m.name: tuned_scores[m.name][i] for m in metrics},
             "tuned_stopped": tuned.gens[i].stopped} for i, ex in enumerate(examples)]
    primary = metrics[0].name
    regressions = [r for r in rows if r["base"][primary] > r["tuned"][primary]]
    results = {
        "target": plan.version or plan.target, "run_dir": plan.recorded_run_dir, "baseline": base.label,
        "precision": precision, "response_format": ecfg.response_format,
        "test_file": str(plan.test_file), "n_examples": len(examples), "metrics": headline,
        "primary_metric": primary, "overfitting": overfit, "latency_cost": latency,
        "forgetting": forgot, "regressions": len(regressions), "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "scorecard_criteria": ecfg.scorecard_criteria,
    }
    results["targets"] = judge_targets(ecfg.targets, metrics, tuned_scores, results)
    if plan.against:
        results["gate"] = gate(headline, results["targets"], plan.against)
    _write_reports(plan, out_dir, results, rows, regressions, sorted(rows, key=lambda r: r["tuned"][primary])[:10])
    return results


def _response_grammar(ecfg: EvalConfig) -> Grammar | None:
    """The grammar answers are decoded under (eval.response_format; None: plain text), checked before any model
    loads."""
    if ecfg.response_format not in RESPONSE_FORMATS:
        raise EvalError(f"eval.response_format {ecfg.response_format!r} is not one of {', '.join(RESPONSE_FORMATS)}")
    source, kind = FORMAT_SOURCES.get(ecfg.response_format, (None, None))
    given = getattr(ecfg, source) if source else None
    try:
        return RESPONSE_FORMATS[ecfg.response_format](Path(given) if given else None)
    except GrammarError as exc:
        raise EvalError(f"eval.response_format {ecfg.response_format}: {exc}",
                        hint=f"set eval.{source} to {kind}" if source else None) from None


def _generate_both(plan: EvalPlan, target: Target, prompts: list[str], stages: Stages,
                   dtype: torch.dtype, grammar: Grammar | None) -> tuple[_Side, _Side]:
    """The baseline's answers, then the finetuned model's (with the forgetting suite on each).

    The base runs first with the adapter switched off (no second copy of the weights); then
    the adapter is merged into the weights for every finetuned measurement (unmerged LoRA
    costs ~40% of generation speed on CPU). ``--against``/``--baseline`` load their own model.
    """
    ecfg = plan.cfg.eval

    def run(label: str, t: Target) -> _Side:
        with generation_kernels(t.model):  # once for the test answers and the general suite
            with stages.stage(f"generating {len(prompts)} answers with the {label} model", total=len(prompts)) as adv:
                t0 = time.perf_counter()
                gens = generate(t.model, t.tokenizer, prompts, ecfg.max_new_tokens, ecfg.batch_size,
                                ecfg.temperature, progress=adv, grammars=[grammar] * len(prompts))
                side = _Side(label, gens, time.perf_counter() - t0)
            if plan.forgetting:
                side.general = forgetting.run_suite(t, stages=stages, label=f"{label} model")
        return side

    if plan.baseline is None and target.adapter_dir is not None and hasattr(target.model, "disable_adapter"):
        with target.model.disable_adapter():
            base = run("base", target)
        base.label = f"{target.base_spec} (adapter off)"
    else:
        spec = plan.baseline or target.base_spec
        policy = plan.baseline_policy or LoadPolicy(trust_remote_code=plan.policy.trust_remote_code)
        other = load_target(spec, dtype=dtype, policy=policy) if spec != plan.target else target
        base = run("production" if plan.against else "base", other)
        base.label = plan.against or spec
        if other is not target:  # its weights go before the finetuned model runs: one model in memory, not two
            del other
            release_memory()
    if target.adapter_dir is not None and hasattr(target.model, "merge_adapter"):
        target.model.merge_adapter()
    return base, run("finetuned", target)


def _headline(metrics: list[Metric], base_scores: dict, tuned_scores: dict) -> dict:
    """Per metric: base and tuned aggregate, the paired difference and its bootstrap interval."""
    headline = {}
    for m in metrics:
        delta, lo, hi = bootstrap_delta(base_scores[m.name], tuned_scores[m.name])
        headline[m.name] = {"base": m.aggregate(base_scores[m.name]), "tuned": m.aggregate(tuned_scores[m.name]),
                            "delta": delta, "delta_ci95": [lo, hi], "higher_is_better": m.higher_is_better,
                            "description": m.description}
    return headline


def _overfitting(plan: EvalPlan, target: Target, metrics, headline: dict, examples, ctx: dict,
                 stages: Stages, grammar: Grammar | None) -> dict | None:
    """The same metrics and the loss on validation and test (None without a validation file)."""
    ecfg = plan.cfg.eval
    if not (plan.val_file and Path(plan.val_file).is_file()):
        return None
    val_ex = load_examples(plan.val_file, plan.cfg.data.format, plan.cfg.data.columns, plan.cfg.data.system_prompt)
    with stages.stage(f"overfitting check: {len(val_ex)} validation answers", total=len(val_ex)) as adv:
        val_gens = generate(target.model, target.tokenizer, _prompts(target.tokenizer, val_ex),
                            ecfg.max_new_tokens, ecfg.batch_size, ecfg.temperature, progress=adv,
                            grammars=[grammar] * len(val_ex))
    val_scores = _score(metrics, [g.text for g in val_gens], [e.completion for e in val_ex], ctx)
    primary = metrics[0]
    return overfitting_check(primary.name, primary.aggregate(val_scores[primary.name]),
                             headline[primary.name]["tuned"], heldout_loss(target.model, target.tokenizer, val_ex),
                             heldout_loss(target.model, target.tokenizer, examples), ecfg.overfit_gap)


def _latency_cost(target: Target, prompts: list[str], tuned: _Side, base: _Side, ecfg: EvalConfig,
                  stages: Stages, grammar: Grammar | None) -> dict:
    per_request = [g.latency_s for g in tuned.gens]
    with stages.stage("latency: requests one at a time", total=min(3, len(prompts))) as adv:
        single = _single_latency(target, prompts, ecfg, grammar, progress=adv)
    seconds_per_request = tuned.wall_s / max(len(prompts), 1)
    return {
        "batched_wall_s": tuned.wall_s, "batch_size": ecfg.batch_size, "requests": len(prompts),
        "batch_latency_p50_s": percentile(per_request, 50), "batch_latency_p95_s": percentile(per_request, 95),
        "single_latency_p50_s": percentile(single, 50), "single_latency_p95_s": percentile(single, 95),
        "generated_tokens_per_s": sum(g.new_tokens for g in tuned.gens) / max(tuned.wall_s, 1e-9),
        "price_per_hour": ecfg.price_per_hour,
        "cost_per_1000_requests": ecfg.price_per_hour * seconds_per_request * 1000 / 3600,
        "base_batched_wall_s": base.wall_s,
        "device": str(target.model.device), "threads": torch.get_num_threads(),
    }


def _write_reports(plan: EvalPlan, out_dir: Path, results: dict, rows, regressions, worst) -> None:
    from skilltune.evaluate.report import render_html, render_markdown

    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / "per_example.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    atomic_write_text(out_dir / "results.json", json.dumps(results, indent=2))
    loss_png = plan.run_dir / "loss.png" if plan.run_dir and (plan.run_dir / "loss.png").is_file() else None
    atomic_write_text(out_dir / "report.md", render_markdown(results, rows, regressions, worst))
    atomic_write_text(out_dir / "report.html", render_html(results, rows, regressions, worst, loss_png))
