"""The rater web app: personal links, blind A/B or rubric scoring, keyboard first, saved on submit.

Which model wrote which answer never reaches the page (sides are randomised per item
and kept server-side). Model outputs are HTML-escaped by Jinja's autoescaping. Every
POST carries the rater token (in the URL) and a CSRF token derived from it; both are
compared in constant time and a wrong or missing one gets 403.
"""

from __future__ import annotations

import hashlib
import hmac

from typing import Annotated

from fastapi import FastAPI, Path, Request
from fastapi.responses import HTMLResponse, RedirectResponse
from sqlalchemy import select

from skilltune.scorecard.db import Assignment, Item, Judgement, Rater, Study, token_hash
from skilltune.templates import render

ItemId = Annotated[int, Path(ge=1, le=2**62)]  # a database id: past 64 bits SQLite cannot even look it up (was a 500)


def _field(form, key: str, default: str = "") -> str:
    """A form field as text; a file uploaded under that name is not one (it would be stored as its repr)."""
    value = form.get(key, default)
    return value if isinstance(value, str) else default





# The rater's token is in the URL: no Referer may carry it to another site, no other site may frame the
# page (clickjacking), and only the page's own inline script and style run.
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
                               "form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-store",
}


def csrf_for(secret: str, token: str) -> str:
    return hmac.new(secret.encode(), token.encode(), hashlib.sha256).hexdigest()


def _forbidden(msg: str = "forbidden: unknown rater link or bad form token") -> HTMLResponse:
    return HTMLResponse(f"<!doctype html><p>{msg}</p>", status_code=403)


def create_app(Session, study_name: str) -> FastAPI:
    app = FastAPI(title="skilltune scorecard", docs_url=None, redoc_url=None, openapi_url=None)

    @app.middleware("http")
    async def _security_headers(request: Request, call_next):
        response = await call_next(request)
        response.headers.update(SECURITY_HEADERS)
        return response

    def _rater(s, token: str):
        if not token:
            return None, None
        digest = token_hash(token)
        for r in s.scalars(select(Rater)).all():  # constant-time compare against every rater of the study
            if hmac.compare_digest(r.token.encode(), digest.encode()):
                study = s.get(Study, r.study_id)
                if study.name == study_name:
                    return r, study
        return None, None

    def _queue(s, rater):
        rows = s.execute(select(Assignment.item_id, Judgement.id).outerjoin(
            Judgement, (Judgement.item_id == Assignment.item_id) & (Judgement.rater_id == rater.id))
            .where(Assignment.rater_id == rater.id).order_by(Assignment.position)).all()
        return [{"item_id": item_id, "judged": jid is not None} for item_id, jid in rows]

    def _render(s, rater, study, token, item, error=None, prev=None, status=200):
        queue = _queue(s, rater)
        if prev is None:
            j = s.scalars(select(Judgement).where(Judgement.rater_id == rater.id, Judgement.item_id == item.id)).first()
            prev = j or Judgement(scores={}, notes="", critical=False, critical_criterion="", critical_note="", choice=None,
                                  critical_side="A")
        return HTMLResponse(render("scorecard_item.html", study=study, rater=rater, token=token, item=item, queue=queue,
                                         done=sum(q["judged"] for q in queue), total=len(queue),
                                         sides=["A", "B"] if study.mode == "ab" else ["A"],
                                         csrf=csrf_for(study.secret, token), prev=prev, error=error),
                            status_code=status)

    @app.get("/r/{token}")
    @app.get("/r/{token}/next")
    def next_item(token: str, skip: int | None = None):
        with Session() as s:
            rater, study = _rater(s, token)
            if rater is None:
                return _forbidden()
            queue = _queue(s, rater)
            todo = [q for q in queue if not q["judged"]]
            if skip is not None and len(todo) > 1:
                idx = next((i for i, q in enumerate(todo) if q["item_id"] == skip), -1)
                todo = todo[idx + 1:] + todo[:idx + 1]
            if not todo:
                return HTMLResponse(render("scorecard_done.html", name=rater.name, total=len(queue), token=token,
                                                 first=queue[0]["item_id"] if queue else 0))
            return RedirectResponse(f"/r/{token}/items/{todo[0]['item_id']}", status_code=303)

    @app.get("/r/{token}/items/{item_id}")
    def show(token: str, item_id: ItemId):
        with Session() as s:
            rater, study = _rater(s, token)
            if rater is None:
                return _forbidden()
            if not s.scalars(select(Assignment).where(Assignment.rater_id == rater.id,
                                                      Assignment.item_id == item_id)).first():
                return HTMLResponse("<!doctype html><p>this item is not in your queue</p>", status_code=404)
            return _render(s, rater, study, token, s.get(Item, item_id))

    @app.post("/r/{token}/items/{item_id}")
    async def save(token: str, item_id: ItemId, request: Request):
        form = await request.form()
        with Session() as s, s.begin():
            rater, study = _rater(s, token)
            if rater is None:
                return _forbidden()
            if not hmac.compare_digest(_field(form, "csrf").encode(), csrf_for(study.secret, token).encode()):
                return _forbidden()
            if not s.scalars(select(Assignment).where(Assignment.rater_id == rater.id,
                                                      Assignment.item_id == item_id)).first():
                return HTMLResponse("<!doctype html><p>this item is not in your queue</p>", status_code=404)
            item = s.get(Item, item_id)
            sides = ["A", "B"] if study.mode == "ab" else ["A"]
            scores, missing = {}, []
            for c in study.criteria:
                for side in sides:
                    raw = _field(form, f"score__{c['name']}__{side}")
                    if raw not in {"1", "2", "3", "4", "5"}:
                        missing.append(f"{c['name']} ({side})")
                    else:
                        scores.setdefault(c["name"], {})[side] = int(raw)
            choice = _field(form, "choice") if study.mode == "ab" else None
            critical = _field(form, "critical") == "1"
            prev = Judgement(scores=scores, notes=_field(form, "notes"), critical=critical,
                             critical_criterion=_field(form, "critical_criterion"),
                             critical_note=_field(form, "critical_note").strip(), choice=choice,
                             critical_side=_field(form, "critical_side", "A") if study.mode == "ab" else "A")
            error = None
            if missing:
                error = "score every criterion from 1 to 5: missing " + ", ".join(missing)
            elif study.mode == "ab" and choice not in ("A", "B", "tie", "both_bad"):
                error = "choose A, B, tie or both bad"
            elif critical and not prev.critical_note:
                error = "a critical failure needs a note saying what went wrong"
            elif critical and prev.critical_criterion not in {c["name"] for c in study.criteria}:
                error = "choose the criterion of the critical failure"
            if error:
                return _render(s, rater, study, token, item, error=error, prev=prev, status=422)
            j = s.scalars(select(Judgement).where(Judgement.rater_id == rater.id, Judgement.item_id == item_id)).first()
            if j is None:
                j = Judgement(rater_id=rater.id, item_id=item_id)
                s.add(j)
            j.scores, j.choice, j.notes = scores, choice, prev.notes
            j.critical, j.critical_criterion = critical, prev.critical_criterion if critical else ""
            j.critical_note = prev.critical_note if critical else ""
            j.critical_side = prev.critical_side if prev.critical_side in ("A", "B") else "A"
        return RedirectResponse(f"/r/{token}/next", status_code=303)

    @app.get("/health")
    def health():
        return {"status": "ok", "study": study_name}

    return app
