"""Build the brand-voice example: customer questions answered in Northwind Cloud's fixed voice.

The seed's Example 1. The voice: warm and professional, "we" not "I", no exclamation marks,
one concrete next step, closing with "— The Northwind team". Deterministic; val and test hold
out whole topics, so they measure the voice on questions training never covered (the facts in
those answers are for people to judge: create a scorecard study from the eval).

Usage: python examples/brand_voice/generate.py
"""

from __future__ import annotations

import json
import random
from pathlib import Path

TOPICS = {
    "reset your password": ("open Settings > Security and choose Reset password; the link we email is valid "
                            "for 30 minutes"),
    "change your billing plan": "open Billing > Plan and pick the new plan; the change applies from your next invoice",
    "add a team member": "open Team > Invite, enter their email and choose a role; they join once they accept",
    "export your data": "open Settings > Data and choose Export; we email a download link within an hour",
    "enable two-factor authentication": ("open Settings > Security and turn on Two-factor; keep the recovery codes "
                                         "somewhere safe"),
    "cancel your subscription": ("open Billing > Plan and choose Cancel; your workspace stays available until the "
                                 "end of the paid period"),
    "get an invoice copy": "open Billing > Invoices and download any invoice as a PDF",
    "connect Slack": "open Integrations > Slack and choose Connect; you can pick the channels we post to",
    "restore a deleted file": "open Trash, select the file and choose Restore; files stay there for 30 days",
    "increase your storage": "open Billing > Add-ons and add a storage pack; it is available right away",
    "change the workspace name": "open Settings > General and edit the workspace name; links keep working",
    "report a security issue": "use the form at Settings > Security > Report; we reply within one business day",
    "set up single sign-on": "open Settings > SSO and follow the steps for your identity provider",
    "transfer workspace ownership": "open Team, choose the new owner and select Make owner; both of you get an email",
    "update your payment card": "open Billing > Payment method and add the new card; we charge it from the next invoice",
}
# Questions for the review round (the worked example's scorecard study): topics no split holds, so the
# preference pairs people make from them never touch the test set that measures the result.
REVIEW_TOPICS = {
    "rename a project": "open Projects, choose the project and edit its name under Settings",
    "change the notification emails": "open Settings > Notifications and pick which emails we send you",
    "move a file to another folder": "select the file, choose Move and pick the folder",
    "see who edited a document": "open the document and choose History; every edit is listed with its author",
    "archive a workspace": "open Settings > General and choose Archive; you can restore it for 90 days",
    "share a folder with a client": "open the folder, choose Share and enter their email; choose view or edit access",
    "change the workspace language": "open Settings > General and pick the language; it applies to everyone",
    "download the desktop app": "open Settings > Apps and choose Download for your system",
    "turn off email digests": "open Settings > Notifications and switch off Weekly digest",
    "add a custom domain": "open Settings > Domains, add the domain and follow the DNS steps we show",
}
ASKS = ["How do I {t}?", "Can you help me {t}?", "What's the way to {t}?", "I need to {t}, what should I do?",
        "Quick question: how can I {t}?", "Is it possible to {t}?", "Where do I go to {t}?",
        "Please explain how to {t}.", "What are the steps to {t}?", "I'm trying to {t}. Any tips?",
        "Could you tell me how to {t}?", "Help: I can't figure out how to {t}.",
        "Hi, how would I {t}?", "Remind me how to {t}, please."]
OPEN = ["Thanks for reaching out.", "Thank you for your question.", "Happy to help with that."]
SYSTEM = "You are Northwind Cloud's support assistant."


def answer(topic: str, how: str, rng: random.Random) -> str:
    return (f"{rng.choice(OPEN)} To {topic}, {how}. If anything looks different on your screen, reply here and we "
            f"will walk you through it.\n— The Northwind team")


def main() -> None:
    rng = random.Random(5)
    out = Path(__file__).parent / "data"
    out.mkdir(exist_ok=True)
    splits = {"train": [], "val": [], "test": []}
    topics = list(TOPICS.items())
    for k, (topic, how) in enumerate(topics):
        # whole topics are held out: val and test measure the voice on questions training never covered
        split = "train" if k < len(topics) - 3 else ("val" if k == len(topics) - 3 else "test")
        for ask in ASKS:
            q = ask.format(t=topic)
            q = q[0].upper() + q[1:]
            splits[split].append({"prompt": q, "completion": answer(topic, how, rng)})
    for name, rows in splits.items():
        rng.shuffle(rows)
        (out / f"{name}.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
        print(name, len(rows))
    review_rng = random.Random(11)
    review = [{"prompt": (q := ask.format(t=topic))[0].upper() + q[1:], "completion": answer(topic, how, review_rng)}
              for topic, how in REVIEW_TOPICS.items() for ask in ASKS]
    review_rng.shuffle(review)
    (out / "review.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in review))
    print("review", len(review))


if __name__ == "__main__":
    main()
