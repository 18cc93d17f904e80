#!/usr/bin/env bash
# The review loop on the brand-voice example, end to end from the CLI:
#   SFT -> a scorecard study -> preference pairs -> DPO on top of the SFT version -> a second study.
# Scripted raters (scripted_rater.py: they apply the voice rules of voice.py) stand in for people, so the
# loop runs unattended; with people, share the study's links instead (`skilltune scorecard serve STUDY`).
#
#   bash examples/brand_voice/review_loop.sh            # WORK=runs/review-loop, ~15 min on 2 CPU cores
#
# Round 1 is a deliberately short SFT (SFT_STEPS=10, 80 examples seen): a first round that has the voice
# mostly, not always, so the reviews have something to teach. The study compares two samples of the SFT
# model on review questions (temperature 0.8), the way preference data is usually collected: pairs of the
# current model's own answers, judged. Review questions are topics no split holds (data/review.jsonl), so
# no pair touches the test set that measures the result.
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
ST="${SKILLTUNE:-skilltune}"
WORK="${WORK:-runs/review-loop}"
NAME="${NAME:-brand-voice}"
STAMP="$(date +%Y%m%d-%H%M%S)"
RATERS="${RATERS:-scripted-1,scripted-2,scripted-3}"
mkdir -p "$WORK"
export PYTHONPATH="$HERE${PYTHONPATH:+:$PYTHONPATH}"   # voice.py: the voice metric and the scripted raters' rules
VOICE=(--metrics voice:voice --allow-code-metrics --no-forgetting)
latest() { ls -td "$WORK"/runs/"$1"-* | head -1; }
registered() { sed -n 's/^registered \([^ ]*\) .*/\1/p'; }

echo "== 1. SFT (round 1)"
"$ST" train "$HERE/config.yaml" --run-name sft --set train.output_dir="$WORK/runs" --set train.max_steps="${SFT_STEPS:-10}"
SFT_RUN="$(latest sft)"
SFT="$("$ST" registry add "$SFT_RUN" --name "$NAME" --allow-duplicate --note "review loop round 1 (SFT)" | registered)"
echo "registered $SFT"

echo "== 2. a study on the SFT model's answers to review questions (two samples each), judged"
"$ST" eval "$SFT_RUN" --baseline "$SFT_RUN" --test "$HERE/data/review.jsonl" --set eval.temperature=0.8 \
  --out "$WORK/review-1" "${VOICE[@]}" || true   # a sample against a sample: no gate to pass here
"$ST" scorecard create --from "$WORK/review-1" --name "voice-1-$STAMP" --criteria brand_voice --raters "$RATERS" \
  --sample 140 --overlap 1.0
python "$HERE/scripted_rater.py" "voice-1-$STAMP" --noise 0.1
"$ST" scorecard export "voice-1-$STAMP" --preferences "$WORK/prefs.jsonl"
"$ST" data audit "$WORK/prefs.jsonl" --model "$SFT" --test "$HERE/data/test.jsonl" || true  # a report (70 items: volume FAILs)

echo "== 3. DPO on top of $SFT"
"$ST" train "$HERE/dpo.yaml" --run-name dpo --set train.output_dir="$WORK/runs" --set model.base="$SFT" \
  --set data.train="$WORK/prefs.jsonl"
DPO_RUN="$(latest dpo)"
DPO="$("$ST" registry add "$DPO_RUN" --name "$NAME" --allow-duplicate --note "review loop round 2 (DPO)" | registered)"
"$ST" registry show "$DPO" | grep '^chain:'

echo "== 4. measured on the test set (held-out topics): SFT vs DPO, and a second study"
"$ST" eval "$SFT_RUN" --out "$WORK/eval-sft" "${VOICE[@]}" || true
"$ST" eval "$DPO_RUN" --out "$WORK/eval-dpo" "${VOICE[@]}" || true   # its baseline is its base: the SFT version
"$ST" scorecard create --from "$WORK/eval-dpo" --name "voice-2-$STAMP" --criteria brand_voice --raters "$RATERS" \
  --sample 28 --overlap 1.0
python "$HERE/scripted_rater.py" "voice-2-$STAMP" --noise 0.1
"$ST" scorecard report "voice-2-$STAMP" || true
python "$HERE/summarize_loop.py" "$WORK" "voice-2-$STAMP"
