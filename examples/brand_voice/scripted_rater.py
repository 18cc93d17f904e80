"""A scripted rater: it stands in for people in the worked example and the tests. It is not a person.

    python scripted_rater.py STUDY [--noise 0.1] [--url DB_URL]

Every rater of STUDY judges every item in its queue as the voice rules say (voice.py): the answer
that follows more of them wins; equal counts are a tie. Each rater errs on ``--noise`` of its items
(it picks the other answer, seeded by its name), as people sometimes do, so the export's majority rule
has something to do. It scores only the study's brand_voice criterion (1-5 from the rules followed).
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from voice import voice  # noqa: E402

from skilltune.scorecard.study import get_study, rater_items, record_judgement  # noqa: E402


def judge(a: str, b: str) -> str:
    va, vb = voice(a), voice(b)
    return "tie" if va == vb else ("A" if va > vb else "B")


def rate_study(name: str, noise: float = 0.0, url: str | None = None) -> dict[str, int]:
    study, Session = get_study(name, url)
    from sqlalchemy import select

    from skilltune.scorecard.db import Rater

    with Session() as s:
        raters = [r.name for r in s.scalars(select(Rater).where(Rater.study_id == study.id)).all()]
    counts: dict[str, int] = {}
    for rater in raters:
        rng = random.Random(f"{name}:{rater}")
        for item in rater_items(name, rater, url):
            choice = judge(item["A"], item["B"])
            if choice != "tie" and rng.random() < noise:
                choice = "B" if choice == "A" else "A"
            scores = {c["name"]: {side: 1 + round(4 * voice(item[side])) for side in ("A", "B")}
                      for c in study.criteria}
            record_judgement(name, rater, item["item_id"], choice, scores, notes="scripted rater (voice rules)",
                             url=url)
            counts[choice] = counts.get(choice, 0) + 1
    return counts


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("study")
    parser.add_argument("--noise", type=float, default=0.0)
    parser.add_argument("--url", default=None)
    args = parser.parse_args()
    print(f"scripted raters judged {args.study}: {rate_study(args.study, args.noise, args.url)}")
