"""The review loop's numbers (review_loop.sh), as a table: SFT vs DPO.

    python summarize_loop.py WORK STUDY
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from skilltune.scorecard.report import study_report


def main(work: Path, study: str) -> None:
    sft = json.loads((work / "eval-sft" / "results.json").read_text())
    dpo = json.loads((work / "eval-dpo" / "results.json").read_text())
    run = Path(dpo["run_dir"])
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    ab = study_report(study)["ab"] or {}
    voice = "voice:voice"
    print("\n| | SFT (round 1) | DPO (round 2) |\n|---|---|---|")
    print(f"| voice rules followed, test set ({sft['n_examples']} held-out questions) | "
          f"{sft['metrics'][voice]['tuned']:.3f} | {dpo['metrics'][voice]['tuned']:.3f} |")
    for m in ("rougeL", "chrf"):
        if m in sft["metrics"] and m in dpo["metrics"]:
            print(f"| {m} vs the reference answers | {sft['metrics'][m]['tuned']:.3f} | {dpo['metrics'][m]['tuned']:.3f} |")
    val = [m for m in metrics if "val_reward_accuracy" in m]
    best = min(val, key=lambda m: m["val_loss"]) if val else {}
    print(f"| held-out reward accuracy (validation pairs; the weights kept: best val loss, step "
          f"{best.get('step', '-')}) | - (the reference itself: every margin is 0) | "
          f"{best.get('val_reward_accuracy', float('nan')):.2f} |")
    if ab:
        print(f"| scripted raters' A/B on the test set ({ab['n']} judgements): DPO wins / SFT wins / tie | | "
              f"{ab['tuned']:.0%} / {ab['base']:.0%} / {ab['tie']:.0%} |")


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2])
