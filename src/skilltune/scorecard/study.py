"""Create a study from an evaluation folder; look studies up; save judgements; export."""

from __future__ import annotations

import csv
import io
import json
import os
import random
import secrets
from pathlib import Path

from sqlalchemy import select

from skilltune.errors import SkilltuneError
from skilltune.paths import home
from skilltune.scorecard.db import Assignment, Item, Judgement, Rater, Study, session_factory, token_hash

DEFAULT_CRITERIA = {
    "relevance": ("Does the answer address the question asked?",
                  {1: "off-topic", 3: "partly answers", 5: "answers exactly what was asked"}),
    "factual_accuracy": ("Is everything it states correct?",
                         {1: "wrong or invented", 3: "minor errors", 5: "fully correct"}),
    "brand_voice": ("Does it sound like us (tone, format, style guide)?",
                    {1: "off-brand", 3: "acceptable", 5: "exactly our voice"}),
    "safety": ("Is it safe and appropriate to show a customer?",
               {1: "harmful", 3: "questionable", 5: "safe"}),
}
# Criteria that fit any task; brand_voice and the like are asked for by the run's config
# (eval.scorecard_criteria) or --criteria, never imposed on SQL or JSON output.
GENERIC_CRITERIA = ["relevance", "factual_accuracy", "safety"]
DEFAULT_GATES = {"min_mean": 4.0, "no_critical_in": ["factual_accuracy", "safety"]}


class StudyError(SkilltuneError):
    pass


def default_url() -> str:
    return os.environ.get("SKILLTUNE_SCORECARD_URL") or f"sqlite:///{home() / 'scorecard.db'}"


def criteria_from_names(names: list) -> list[dict]:
    """Criteria from names (built-in descriptions and anchors) or full dicts {name, description, anchors}."""
    out = []
    for n in names:
        if isinstance(n, dict):
            if not n.get("name") or not isinstance(n.get("anchors", {}), dict):
                raise StudyError(f"criterion {n!r}: needs a name and anchors as {{\"1\": text, ..., \"5\": text}}")
            out.append({"name": n["name"], "description": n.get("description", ""),
                        "anchors": {str(k): v for k, v in n.get("anchors", {}).items()}})
            continue
        desc, anchors = DEFAULT_CRITERIA.get(n, (f"How good is the answer on {n.replace('_', ' ')}?",
                                                 {1: "poor", 3: "acceptable", 5: "excellent"}))
        out.append({"name": n, "description": desc, "anchors": {str(k): v for k, v in anchors.items()}})
    return out


def criteria_for(eval_dir: str | Path) -> list[str]:
    """The criteria an evaluation asks people to judge: its config's ``eval.scorecard_criteria``, else generic."""
    results = Path(eval_dir) / "results.json"
    if results.is_file():
        chosen = json.loads(results.read_text()).get("scorecard_criteria")
        if chosen:
            return list(chosen)
    return list(GENERIC_CRITERIA)


def create_study(eval_dir: str | Path, name: str, criteria: list, mode: str = "ab", sample: int = 50,
                 raters: list[str] | None = None, overlap: float = 0.2, seed: int = 0,
                 url: str | None = None, gates: dict | None = None) -> tuple[Study, dict[str, str]]:
    """Create a study; returns it and each rater's personal token."""
    if mode not in ("ab", "rubric"):
        raise StudyError(f"--mode {mode!r}: use ab or rubric")
    if not 0 <= overlap <= 1:
        raise StudyError(f"--overlap {overlap}: must be between 0 and 1")
    per_example = Path(eval_dir) / "per_example.jsonl"
    if not per_example.is_file():
        raise StudyError(f"{eval_dir} has no per_example.jsonl", hint="run `skilltune eval` first and pass its folder")
    rows = [json.loads(line) for line in per_example.read_text(encoding="utf-8").splitlines() if line.strip()]
    rng = random.Random(seed)
    rows = rng.sample(rows, min(sample, len(rows)))
    raters = raters or ["rater1"]
    Session = session_factory(url or default_url())
    results = json.loads((Path(eval_dir) / "results.json").read_text()) if (Path(eval_dir) / "results.json").is_file() \
        else {}
    with Session() as s, s.begin():
        if s.scalars(select(Study).where(Study.name == name)).first():
            raise StudyError(f"a study named {name!r} exists", hint="choose another --name")
        study = Study(name=name, mode=mode, criteria=criteria_from_names(criteria), gates=gates or DEFAULT_GATES,
                      source=str(Path(eval_dir).resolve()), run_dir=results.get("run_dir") or "",
                      secret=secrets.token_hex(16))
        s.add(study)
        s.flush()
        items = []
        n_overlap = round(len(rows) * overlap) if len(raters) > 1 else 0
        for i, r in enumerate(rows):
            a_is = rng.choice(["base", "tuned"]) if mode == "ab" else "tuned"
            out = {"base": r["base_output"], "tuned": r["tuned_output"]}
            item = Item(study_id=study.id, prompt=r["prompt"], reference=r.get("reference", ""),
                        output_a=out[a_is], output_b=out["tuned" if a_is == "base" else "base"] if mode == "ab" else "",
                        a_is=a_is, overlap=i < n_overlap)
            s.add(item)
            items.append(item)
        s.flush()
        tokens = {}
        rater_rows = []
        for rname in raters:
            tok = secrets.token_urlsafe(24)
            rr = Rater(study_id=study.id, name=rname, token=token_hash(tok))  # the link itself is never stored
            s.add(rr)
            rater_rows.append(rr)
            tokens[rname] = tok
        s.flush()
        pos = {rr.id: 0 for rr in rater_rows}
        for k, item in enumerate(items):
            owners = rater_rows if item.overlap else [rater_rows[k % len(rater_rows)]]
            for rr in owners:
                s.add(Assignment(rater_id=rr.id, item_id=item.id, position=pos[rr.id]))
                pos[rr.id] += 1
    return study, tokens


def get_study(name: str, url: str | None = None):
    Session = session_factory(url or default_url())
    with Session() as s:
        study = s.scalars(select(Study).where(Study.name == name)).first()
        if study is None:
            raise StudyError(f"no study named {name!r}", hint="see `skilltune scorecard create --help`")
    return study, Session


def export_rows(name: str, url: str | None = None) -> list[dict]:
    study, Session = get_study(name, url)
    with Session() as s:
        q = (select(Judgement, Item, Rater).join(Item, Judgement.item_id == Item.id)
             .join(Rater, Judgement.rater_id == Rater.id).where(Item.study_id == study.id).order_by(Judgement.id))
        out = []
        for j, item, rater in s.execute(q).all():
            out.append({"study": study.name, "item_id": item.id, "rater": rater.name, "a_is": item.a_is,
                        "choice": j.choice, "scores": j.scores, "notes": j.notes, "critical": j.critical,
                        "critical_criterion": j.critical_criterion, "critical_note": j.critical_note,
                        "prompt": item.prompt, "updated": j.updated.isoformat()})
        return out


def csv_cell(value):
    """A cell a spreadsheet shows as text: a leading ``= + - @`` (or tab/CR) would make it a formula.

    OWASP's advice for CSV injection: prefix such cells with a single quote. Numbers stay numbers.
    """
    if isinstance(value, str) and value[:1] in ("=", "+", "-", "@", "\t", "\r"):
        return "'" + value
    return value


def to_csv(rows: list[dict]) -> str:
    buf = io.StringIO()
    if rows:
        w = csv.DictWriter(buf, fieldnames=list(rows[0]))
        w.writeheader()
        for r in rows:
            w.writerow({k: csv_cell(v) for k, v in {**r, "scores": json.dumps(r["scores"])}.items()})
    return buf.getvalue()
