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
    if not isinstance(names, list) or not names:
        raise StudyError(f"criteria: expected a non-empty list of names or {{name, description, anchors}} objects, "
                         f"got {type(names).__name__}")
    out = []
    for n in names:
        if not isinstance(n, (str, dict)) or not n:
            raise StudyError(f"criterion {n!r}: a name, or an object {{name, description, anchors}}")
        if isinstance(n, dict):
            if not isinstance(n.get("name"), str) or not n["name"] or not isinstance(n.get("anchors", {}), dict):
                raise StudyError(f"criterion {n!r}: needs a name and anchors as {{\"1\": text, ..., \"5\": text}}")
            out.append({"name": n["name"], "description": n.get("description", ""),
                        "anchors": {str(k): v for k, v in n.get("anchors", {}).items()}})
            continue
        desc, anchors = DEFAULT_CRITERIA.get(n, (f"How good is the answer on {n.replace('_', ' ')}?",
                                                 {1: "poor", 3: "acceptable", 5: "excellent"}))
        out.append({"name": n, "description": desc, "anchors": {str(k): v for k, v in anchors.items()}})
    if len({c["name"] for c in out}) != len(out):
        raise StudyError(f"criteria: a name appears twice ({', '.join(c['name'] for c in out)})")
    return out


def criteria_for(eval_dir: str | Path) -> list[str]:
    """The criteria an evaluation asks people to judge: its config's ``eval.scorecard_criteria``, else generic."""
    chosen = _eval_results(eval_dir).get("scorecard_criteria")
    return list(chosen) if chosen else list(GENERIC_CRITERIA)


def _eval_results(eval_dir: str | Path) -> dict:
    """The evaluation's ``results.json`` ({} when it has none)."""
    path = Path(eval_dir) / "results.json"
    if not path.is_file():
        return {}
    try:
        results = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, OSError) as exc:
        raise StudyError(f"{path} is not readable JSON ({exc})", hint="run `skilltune eval` again") from None
    if not isinstance(results, dict):
        raise StudyError(f"{path} is not an evaluation's results (a JSON object)", hint="run `skilltune eval` again")
    return results


_ROW_FIELDS = ("prompt", "base_output", "tuned_output")


def _eval_rows(per_example: Path) -> list[dict]:
    """The evaluation's answers, one per line; a line that is not one names itself."""
    rows = []
    for lineno, line in enumerate(per_example.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError as exc:
            raise StudyError(f"{per_example}:{lineno}: not JSON ({exc})", hint="run `skilltune eval` again") from None
        if not isinstance(row, dict) or not all(isinstance(row.get(k), str) for k in _ROW_FIELDS):
            raise StudyError(f"{per_example}:{lineno}: a row needs {', '.join(_ROW_FIELDS)} as text",
                             hint="pass the folder `skilltune eval` wrote (it compares base and tuned answers)")
        rows.append(row)
    if not rows:
        raise StudyError(f"{per_example} holds no answers", hint="run `skilltune eval` on a non-empty test set")
    return rows


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
    rows = _eval_rows(per_example)
    rng = random.Random(seed)
    rows = rng.sample(rows, min(sample, len(rows)))
    raters = raters or ["rater1"]
    Session = session_factory(url or default_url())
    results = _eval_results(eval_dir)
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


# ---------------------------------------------------------------- preferences (the DPO loop)
CHOICES = ("A", "B", "tie", "both_bad")
PREFERENCE_RULE = ("an item becomes a pair when more than half of its raters chose the same answer (A or B); "
                   "items whose majority is tie or both bad, or whose raters split, are left out")


def preference_pairs(name: str, url: str | None = None) -> tuple[list[dict], dict]:
    """Each A/B item with an agreed winner as a preference row, and the counts of what was left out."""
    from collections import Counter, defaultdict

    study, Session = get_study(name, url)
    if study.mode != "ab":
        raise StudyError(f"study {name!r} is a rubric study: preference pairs need A/B judgements",
                         hint="create a study with --mode ab (the default)")
    with Session() as s:
        items = s.scalars(select(Item).where(Item.study_id == study.id).order_by(Item.id)).all()
        votes: dict[int, list[str]] = defaultdict(list)
        q = select(Judgement).join(Item, Judgement.item_id == Item.id).where(Item.study_id == study.id)
        for j in s.scalars(q).all():
            if j.choice in CHOICES:
                votes[j.item_id].append(j.choice)
    counts: Counter = Counter()
    rows = []
    for item in items:
        cast = votes.get(item.id, [])
        if not cast:
            counts["not judged"] += 1
            continue
        top, n = Counter(cast).most_common(1)[0]
        if 2 * n <= len(cast):
            counts["no majority"] += 1
            continue
        if top in ("tie", "both_bad"):
            counts[top.replace("_", " ")] += 1
            continue
        other = "B" if top == "A" else "A"
        answers = {"A": item.output_a, "B": item.output_b}
        if not answers[top].strip() or not answers[other].strip() or answers[top].strip() == answers[other].strip():
            counts["empty or identical answers"] += 1
            continue
        model = {"A": item.a_is, "B": "base" if item.a_is == "tuned" else "tuned"}
        rows.append({"prompt": item.prompt, "chosen": answers[top], "rejected": answers[other],
                     "study": study.name, "item_id": item.id, "raters": len(cast), "agreeing": n,
                     "chosen_model": model[top]})
        counts["pairs"] += 1
    counts["votes"] = sum(len(v) for v in votes.values())
    return rows, {"items": len(items), **counts}


def record_judgement(name: str, rater: str, item_id: int, choice: str | None, scores: dict,
                     notes: str = "", url: str | None = None) -> None:
    """Save one rater's judgement of one item, as the rater app does (for imports and scripted raters).

    ``scores``: {criterion: {"A": 1-5, "B": 1-5}} (rubric studies: side "A" only).
    """
    study, Session = get_study(name, url)
    sides = ["A", "B"] if study.mode == "ab" else ["A"]
    if study.mode == "ab" and choice not in CHOICES:
        raise StudyError(f"choice {choice!r}: use one of {', '.join(CHOICES)}")
    for c in study.criteria:
        for side in sides:
            if (scores.get(c["name"]) or {}).get(side) not in (1, 2, 3, 4, 5):
                raise StudyError(f"score {c['name']} ({side}) from 1 to 5 for item {item_id}")
    with Session() as s, s.begin():
        r = s.scalars(select(Rater).where(Rater.study_id == study.id, Rater.name == rater)).first()
        if r is None:
            raise StudyError(f"study {name!r} has no rater {rater!r}")
        if not s.scalars(select(Assignment).where(Assignment.rater_id == r.id, Assignment.item_id == item_id)).first():
            raise StudyError(f"item {item_id} is not in {rater}'s queue")
        j = s.scalars(select(Judgement).where(Judgement.rater_id == r.id, Judgement.item_id == item_id)).first()
        if j is None:
            j = Judgement(rater_id=r.id, item_id=item_id)
            s.add(j)
        j.scores, j.choice, j.notes = scores, choice if study.mode == "ab" else None, notes


def rater_items(name: str, rater: str, url: str | None = None) -> list[dict]:
    """The items in one rater's queue, in order, with what the rater sees (prompt, A, B)."""
    study, Session = get_study(name, url)
    with Session() as s:
        r = s.scalars(select(Rater).where(Rater.study_id == study.id, Rater.name == rater)).first()
        if r is None:
            raise StudyError(f"study {name!r} has no rater {rater!r}")
        q = (select(Item).join(Assignment, Assignment.item_id == Item.id).where(Assignment.rater_id == r.id)
             .order_by(Assignment.position))
        return [{"item_id": i.id, "prompt": i.prompt, "A": i.output_a, "B": i.output_b} for i in s.scalars(q).all()]
