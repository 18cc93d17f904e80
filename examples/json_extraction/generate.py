"""Build the JSON-extraction example: customer support messages -> one JSON object with fixed keys.

The seed's "JSON adherence" case. Keys: intent, product, order_id (or null), urgency (low|medium|high),
sentiment (negative|neutral|positive). Deterministic; val/test use message templates held out of training.

Usage: python examples/json_extraction/generate.py
"""

from __future__ import annotations

import json
import random
from pathlib import Path

PRODUCTS = ["wireless earbuds", "standing desk", "coffee grinder", "running shoes", "smart thermostat",
            "yoga mat", "laptop stand", "air purifier", "electric kettle", "backpack"]
INTENTS = {
    "refund": ["I want my money back for the {p}.", "Please refund my {p}, order {o}.",
               "Can I get a refund on the {p}? Order {o}.", "Refund request: {p} (order {o})",
               "I returned the {p} last week and still have no refund.", "How do I get reimbursed for the {p}?"],
    "delivery_status": ["Where is my {p}? Order {o}.", "My {p} hasn't arrived yet, order {o}.",
                        "Tracking for order {o} ({p}) hasn't moved in days.", "When will the {p} be delivered?",
                        "Order {o}: still waiting on the {p}.", "Is my {p} shipped yet?"],
    "defect": ["The {p} stopped working after two days.", "My {p} arrived broken, order {o}.",
               "There's a crack in the {p} I received (order {o}).", "The {p} makes a weird noise.",
               "Order {o}: the {p} won't turn on.", "Defective {p}, what now?"],
    "product_question": ["Does the {p} come with a warranty?", "What colours does the {p} come in?",
                         "Is the {p} suitable for beginners?", "How long does the {p} battery last?",
                         "Can the {p} be used outdoors?", "What's the difference between the {p} models?"],
}
MOOD = {"negative": ["This is unacceptable.", "I'm really frustrated.", "Very disappointed."],
        "neutral": ["", "Thanks.", "Let me know."],
        "positive": ["Love your shop otherwise!", "Thanks so much for the help!", "Great service so far."]}
URGENT = {"high": ["I need this sorted today.", "URGENT.", "Please respond ASAP."], "medium": ["", "Soon please."],
          "low": ["No rush.", "Whenever you can."]}
SYSTEM = ("Extract the support ticket as JSON with exactly these keys: intent (refund, delivery_status, defect, "
          "product_question), product, order_id (string or null), urgency (low, medium, high), sentiment "
          "(negative, neutral, positive). Answer with the JSON object only.")


def build(n_train=400, n_val=60, n_test=60, seed=3):
    rng = random.Random(seed)
    rows = {"train": [], "val": [], "test": []}
    seen = set()
    for split, n in (("train", n_train), ("val", n_val), ("test", n_test)):
        while len(rows[split]) < n:
            intent = rng.choice(list(INTENTS))
            templates = INTENTS[intent][:-2] if split == "train" else INTENTS[intent][-2:]
            t = rng.choice(templates)
            p = rng.choice(PRODUCTS)
            o = f"A{rng.randint(10000, 99999)}"
            sentiment = rng.choice(list(MOOD))
            urgency = rng.choice(list(URGENT))
            msg = " ".join(x for x in (t.format(p=p, o=o), rng.choice(MOOD[sentiment]), rng.choice(URGENT[urgency])) if x)
            if msg in seen:
                continue
            seen.add(msg)
            target = {"intent": intent, "product": p, "order_id": o if "{o}" in t else None, "urgency": urgency,
                      "sentiment": sentiment}
            rows[split].append({"prompt": msg, "completion": json.dumps(target)})
    return rows


def main():
    out = Path(__file__).parent / "data"
    out.mkdir(exist_ok=True)
    for split, rows in build().items():
        (out / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        print(split, len(rows))


if __name__ == "__main__":
    main()
