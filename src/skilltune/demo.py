"""`skilltune demo`: the whole workflow on the embedded SmolLM2 model, teaching it text-to-SQL.

advise -> audit -> train (LoRA, CPU) -> eval base vs tuned (sql_exec) -> register and
promote -> readiness checklist. :func:`run_demo` is the whole job; each stage is one
call into the library, exactly what a user would run by hand.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from skilltune.errors import SkilltuneError
from skilltune.progress import SILENT, Stages


@dataclass
class DemoResult:
    workdir: Path
    run_dir: Path | None = None
    version: str | None = None
    eval_results: dict | None = None
    checklist: list = field(default_factory=list)
    stage_seconds: dict = field(default_factory=dict)
    report: Path | None = None


def example_roots() -> list[Path]:
    """Where examples are looked for: ./examples, the source checkout, then the installed copy
    (``<prefix>/share/skilltune/examples``, shipped in the wheel)."""
    import site
    import sys

    roots = [Path.cwd() / "examples", Path(__file__).resolve().parents[2] / "examples"]
    for prefix in dict.fromkeys([sys.prefix, sys.base_prefix, site.getuserbase()]):
        roots.append(Path(prefix) / "share" / "skilltune" / "examples")
    return roots


def find_example(name: str = "sql") -> Path:
    """The example folder NAME (its config.yaml and data), from the first root that has it."""
    roots = example_roots()
    for root in roots:
        if (root / name / "config.yaml").is_file():
            return root / name
    raise SkilltuneError(f"cannot find the '{name}' example; looked in: {', '.join(str(r) for r in roots)}",
                         hint="reinstall skilltune (the wheel ships the examples under share/skilltune/examples), "
                              "or run from a skilltune checkout")


def _subset(src: Path, dst: Path, n: int) -> Path:
    lines = src.read_text(encoding="utf-8").splitlines()[:n]
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return dst


def run_demo(workdir: Path, quick: bool = False, overrides: list[str] | None = None, name: str = "sql-demo",
             stage: Callable[[str], None] = lambda s: None, say: Callable[[str], None] = lambda s: None,
             reporter=None, stages: Stages = SILENT) -> DemoResult:
    from skilltune.config import load_config
    from skilltune.data.audit import audit_file
    from skilltune.data.records import record_audit
    from skilltune.evaluate.runner import evaluate, plan_eval
    from skilltune.model.loading import load_tokenizer, release_memory
    from skilltune.readiness.advise import advise
    from skilltune.readiness.checklist import checklist
    from skilltune.registry.api import Registry
    from skilltune.train.loop import train
    from skilltune.train.prepare import config_problems

    example = find_example("sql")
    workdir = Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    res = DemoResult(workdir)
    extra = [f"train.output_dir={workdir / 'runs'}", *(overrides or [])]
    if quick:  # a few steps on small subsets: for tests and a first look
        data = workdir / "quick-data"
        extra += [f"data.train={_subset(example / 'data' / 'train.jsonl', data / 'train.jsonl', 48)}",
                  f"data.val={_subset(example / 'data' / 'val.jsonl', data / 'val.jsonl', 8)}",
                  f"data.test={_subset(example / 'data' / 'test.jsonl', data / 'test.jsonl', 8)}",
                  "train.max_steps=3", "train.eval_steps=3", "train.save_steps=3", "eval.max_new_tokens=24",
                  "eval.batch_size=8"]
    cfg = load_config(example / "config.yaml", extra, checks=config_problems)  # a wrong --model fails here, first

    def timed(label: str, fn):
        stage(label)
        t0 = time.perf_counter()
        out = fn()
        res.stage_seconds[label] = round(time.perf_counter() - t0, 1)
        return out

    # advise and audit always look at the full example data (quick mode trains on a subset of it)
    full = load_config(example / "config.yaml", overrides)
    a = timed("advise", lambda: advise(full.data.train, full.data.test))
    say(f"advise: {a.verdict.upper()} — " + "; ".join(a.reasons[:3]))

    def do_audit():
        tok = load_tokenizer(cfg.model)[0]
        rep = audit_file(full.data.train, full.data.test, tok, cfg.train.max_seq_len, cfg.data.near_dup_threshold)
        record_audit(rep)
        return rep
    rep = timed("audit", do_audit)
    say(f"audit: {rep.errors} error(s), {rep.warnings} warning(s): "
        + ", ".join(f"{r.name} {r.status}" for r in rep.results))
    if rep.errors:
        raise SkilltuneError("the audit found errors in the demo data; stopping before training",
                             hint=f"skilltune data audit {full.data.train}")

    result = timed("train", lambda: train(cfg, run_name=name, reporter=reporter))
    res.run_dir = result.run_dir
    release_memory()  # training's model, optimizer and activations are gone: eval's peak is then eval's own
    s = result.summary
    say(f"train: {s['steps']} steps in {s['train_time_s']:.0f} s ({s['tokens_per_s']:.0f} tokens/s), "
        f"val loss {s.get('best_val_loss') or float('nan'):.4f}")

    plan = plan_eval(str(result.run_dir), None, None, None, None, extra)
    res.eval_results = timed("eval", lambda: evaluate(plan, result.run_dir / "eval", stages))
    res.report = result.run_dir / "eval" / "report.html"

    def register():
        reg = Registry()
        v = reg.add(result.run_dir, name, note="skilltune demo" + (" (quick)" if quick else ""))
        reg.promote(f"{name}@v{v.number}", "production", reason="demo: sql_exec measured on held-out test")
        try:  # with an earlier version behind the alias, prove the rollback path works (recorded, nothing moves)
            reg.rollback(name, "production", reason="demo: rollback dry-run", dry_run=True)
        except SkilltuneError:
            pass  # first version: nothing to roll back to yet; the checklist says so
        return v
    v = timed("register", register)
    res.version = f"{name}@v{v.number}"
    res.checklist = timed("checklist", lambda: checklist(res.version)[1])
    return res
