"""Scorecard: study creation, every route (auth, CSRF, validation, escaping), agreement maths, a real browser."""

import json
import re
import shutil
import socket
import threading
import time

import pytest
import uvicorn
from fastapi.testclient import TestClient
from helpers import cli

from skilltune.scorecard.app import create_app, csrf_for
from skilltune.scorecard.report import cohen_kappa, krippendorff_alpha, study_report
from skilltune.scorecard.study import create_study, get_study

# every test here runs on SQLite and on a real PostgreSQL server (tests/conftest.py)
pytestmark = pytest.mark.usefixtures("db_backend")

XSS = "<script>alert('x')</script>"


@pytest.fixture
def eval_dir(tmp_path):
    d = tmp_path / "eval"
    d.mkdir()
    rows = [{"line": i, "prompt": f"Question {i} {XSS if i == 0 else ''}", "reference": f"ref {i}",
             "base_output": f"first answer {i}", "tuned_output": f"second answer {i} {XSS}"} for i in range(10)]
    (d / "per_example.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (d / "results.json").write_text(json.dumps({"run_dir": str(tmp_path / "run")}))
    return d


def _study(eval_dir, raters=("alice", "bob"), mode="ab", overlap=0.2, name="s1"):
    study, tokens = create_study(eval_dir, name, ["relevance", "safety"], mode, 10, list(raters), overlap)
    _, Session = get_study(name)
    return study, tokens, TestClient(create_app(Session, name))


def _form(study, token, **extra):
    data = {"csrf": csrf_for(study.secret, token), "score__relevance__A": "4", "score__relevance__B": "2",
            "score__safety__A": "5", "score__safety__B": "5", "choice": "A", "notes": "fine"}
    data.update(extra)
    return {k: v for k, v in data.items() if v is not None}


def test_create_assigns_overlap_to_everyone(eval_dir):
    study, tokens, client = _study(eval_dir)
    _, Session = get_study("s1")
    from sqlalchemy import select

    from skilltune.scorecard.db import Assignment, Item
    with Session() as s:
        items = s.scalars(select(Item).where(Item.study_id == study.id)).all()
        assert len(items) == 10 and sum(i.overlap for i in items) == 2
        assert {i.a_is for i in items} == {"base", "tuned"}  # sides randomised
        counts = [len(s.scalars(select(Assignment).join(Item, Item.id == Assignment.item_id)
                                .where(Assignment.rater_id == rid)).all()) for rid in (1, 2)]
    assert counts == [6, 6]  # 2 shared + 4 each


def test_pages_escape_outputs_and_never_name_the_models(eval_dir):
    study, tokens, client = _study(eval_dir)
    r = client.get(f"/r/{tokens['alice']}", follow_redirects=True)
    assert r.status_code == 200
    page = r.text
    assert XSS not in page and "&lt;script&gt;" in page
    for word in ("tuned", "smollm", "run_dir", "a_is"):
        assert word not in page.lower()


def test_tokens_and_csrf_are_enforced(eval_dir):
    study, tokens, client = _study(eval_dir)
    assert client.get("/r/not-a-token").status_code == 403
    assert client.get("/r/").status_code in (403, 404)
    item = int(re.search(r"/items/(\d+)", client.get(f"/r/{tokens['alice']}", follow_redirects=False)
                         .headers["location"]).group(1))
    url = f"/r/{tokens['alice']}/items/{item}"
    assert client.post(url, data=_form(study, tokens["alice"], csrf=None)).status_code == 403
    assert client.post(url, data=_form(study, tokens["alice"], csrf="0" * 64)).status_code == 403
    assert client.post(f"/r/wrong/items/{item}", data=_form(study, tokens["alice"])).status_code == 403
    # bob's csrf token does not work on alice's link
    assert client.post(url, data=_form(study, tokens["alice"], csrf=csrf_for(study.secret, tokens["bob"]))
                       ).status_code == 403


def test_validation_errors_are_422_with_a_message(eval_dir):
    study, tokens, client = _study(eval_dir)
    t = tokens["alice"]
    item = int(re.search(r"/items/(\d+)", client.get(f"/r/{t}", follow_redirects=False).headers["location"]).group(1))
    url = f"/r/{t}/items/{item}"
    r = client.post(url, data=_form(study, t, score__safety__B=None))
    assert r.status_code == 422 and "missing safety (B)" in r.text
    r = client.post(url, data=_form(study, t, choice="C"))
    assert r.status_code == 422 and "choose A, B, tie or both bad" in r.text
    r = client.post(url, data=_form(study, t, critical="1", critical_note=""))
    assert r.status_code == 422 and "needs a note" in r.text
    r = client.post(url, data=_form(study, t, score__relevance__A="9"))
    assert r.status_code == 422
    r = client.post(url, data=_form(study, t), follow_redirects=False)
    assert r.status_code == 303
    assert client.get(f"/r/{t}/items/99999").status_code == 404
    for wild in ("99999999999999999999999", "-1", "0"):  # past 64 bits was a 500 (SQLite cannot bind it)
        assert client.get(f"/r/{t}/items/{wild}").status_code == 422
        assert client.post(f"/r/{t}/items/{wild}", data=_form(study, t)).status_code == 422
    # a file uploaded as the notes is not text: it is not stored as the upload's repr
    r = client.post(url, data=_form(study, t, notes=None), files={"notes": ("a.txt", b"hello")}, follow_redirects=False)
    assert r.status_code == 303
    from skilltune.scorecard.db import Judgement
    with get_study("s1")[1]() as s:
        assert [j.notes for j in s.query(Judgement).all()] == [""]
    # an item in alice's queue but not bob's (not shared) is a 404 for bob, and bob's save is refused too
    from sqlalchemy import select

    from skilltune.scorecard.db import Assignment, Rater
    with get_study("s1")[1]() as s:
        queue = {r.name: {a.item_id for a in s.scalars(select(Assignment).where(Assignment.rater_id == r.id))}
                 for r in s.scalars(select(Rater))}
    only_alice = sorted(queue["alice"] - queue["bob"])
    assert only_alice
    assert client.get(f"/r/{tokens['bob']}/items/{only_alice[0]}").status_code == 404
    r = client.post(f"/r/{tokens['bob']}/items/{only_alice[0]}", data=_form(study, tokens["bob"]))
    assert r.status_code == 404


def test_report_verdict_and_export(eval_dir, tmp_path):
    study, tokens, client = _study(eval_dir, raters=("alice",), overlap=0.0, name="s2")
    t = tokens["alice"]
    for _ in range(10):
        r = client.get(f"/r/{t}", follow_redirects=False)
        if r.status_code != 303:
            break
        url = r.headers["location"]
        item = int(url.rsplit("/", 1)[1])
        from skilltune.scorecard.db import Item

        _, Session = get_study("s2")
        with Session() as s:
            a_is = s.get(Item, item).a_is
        tuned_side = "A" if a_is == "tuned" else "B"
        base_side = "B" if tuned_side == "A" else "A"
        client.post(url, data=_form(study, t, **{f"score__relevance__{tuned_side}": "5",
                                                 f"score__relevance__{base_side}": "2",
                                                 f"score__safety__{tuned_side}": "4",
                                                 f"score__safety__{base_side}": "4", "choice": tuned_side}))
    rep = study_report("s2")
    assert rep["judgements"] == 10 and rep["passed"] is True
    assert rep["per_model"]["tuned"]["relevance"]["mean"] == 5.0 and rep["ab"]["tuned"] == 1.0
    code, out = cli("scorecard", "export", "s2", "--out", str(tmp_path / "j.csv"))
    assert code == 0 and (tmp_path / "j.csv").read_text().count("\n") == 11
    # one critical safety failure of the tuned model flips the verdict
    url = f"/r/{t}/items/1"
    with get_study("s2")[1]() as s:
        from skilltune.scorecard.db import Item
        side = "A" if s.get(Item, 1).a_is == "tuned" else "B"
    client.post(url, data=_form(study, t, critical="1", critical_criterion="safety", critical_side=side,
                                critical_note="leaks a customer's address",
                                **{f"score__relevance__{side}": "5", f"score__safety__{side}": "4"}))
    rep = study_report("s2")
    assert rep["passed"] is False and "leaks a customer's address" in rep["verdict"]


def test_agreement_matches_hand_computed_values():
    # Cohen's kappa: 10 items, raters agree on 8; both say yes 6 times and no 4 times
    a = ["y"] * 6 + ["n"] * 4
    b = ["y"] * 5 + ["n"] + ["n"] * 3 + ["y"]
    po, pe = 0.8, (6 * 6 + 4 * 4) / 100  # observed and chance agreement
    assert cohen_kappa(a, b) == pytest.approx((po - pe) / (1 - pe))
    assert cohen_kappa(a, b) == pytest.approx(0.58333, abs=1e-5)
    # Krippendorff's alpha: perfect agreement among the coders who rated a unit is 1, missing values ignored
    units = [[1, 1, None], [2, 2, None], [3, 3, None], [3, 3, None], [2, 2, None], [1, 1, None], [4, 4, None],
             [1, 1, None], [2, 2, None], [None, None, None], [None, None, None], [None, None, None]]
    # a simpler exactly-computable case: two coders, one disagreement in 4 units
    u2 = [[1, 1], [1, 1], [2, 2], [1, 2]]
    # n = 8 values (five 1s, three 2s). Do = 2 disagreeing ordered pairs / 8 = 0.25;
    # De = 2 * 5 * 3 / (8 * 7) = 30/56; alpha = 1 - Do/De = 0.5333
    assert krippendorff_alpha(u2, "nominal") == pytest.approx(1 - 0.25 / (30 / 56))
    assert krippendorff_alpha(u2, "nominal") == pytest.approx(0.53333, abs=1e-5)
    assert krippendorff_alpha(units, "nominal") == pytest.approx(1.0)
    assert krippendorff_alpha([[1, 2], [2, 3], [3, 4]], "interval") < krippendorff_alpha([[1, 1], [2, 2], [3, 3]],
                                                                                           "interval") == 1.0


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(shutil.which("chromium") is None, reason="Debian chromium is not installed")
def test_real_browser_scores_with_keyboard_and_mouse(eval_dir):
    from playwright.sync_api import sync_playwright

    study, tokens, _ = _study(eval_dir, raters=("carol",), overlap=0.0, name="s3")
    _, Session = get_study("s3")
    port = _free_port()
    srv = uvicorn.Server(uvicorn.Config(create_app(Session, "s3"), host="127.0.0.1", port=port, log_level="error"))
    th = threading.Thread(target=srv.run, daemon=True)
    th.start()
    while not srv.started:
        time.sleep(0.02)
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=shutil.which("chromium"),
                                        args=["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                                              "--disable-background-networking"])
            page = browser.new_page()
            page.goto(f"http://127.0.0.1:{port}/r/{tokens['carol']}")
            first_url = page.url
            assert "tuned" not in page.content().lower()
            page.locator("body").click(position={"x": 5, "y": 5})
            for key in ["4", "5", "2", "3"]:  # relevance A, safety A, relevance B, safety B
                page.keyboard.press(key)
            page.keyboard.press("a")  # choose A
            page.get_by_label("Notes").fill("clear and correct")  # the mouse/keyboard on a field
            page.get_by_role("button", name=re.compile("Save")).click()
            page.wait_for_url(re.compile(r"/items/\d+$"))
            assert page.url != first_url
            page.goto(first_url)  # reload the judged item: the judgement is there
            assert page.locator('input[name="score__relevance__A"][value="4"]').is_checked()
            assert page.locator('input[name="choice"][value="A"]').is_checked()
            browser.close()
    finally:
        srv.should_exit = True
        th.join(timeout=10)
    rows = [r for r in __import__("skilltune.scorecard.study", fromlist=["x"]).export_rows("s3")]
    assert len(rows) == 1 and rows[0]["rater"] == "carol" and rows[0]["choice"] == "A"
    # keys 4, 5, 2, 3 score the groups in page order: relevance A, safety A, relevance B, safety B
    assert rows[0]["scores"] == {"relevance": {"A": 4, "B": 2}, "safety": {"A": 5, "B": 3}}
    assert rows[0]["notes"] == "clear and correct"


def test_custom_criteria_from_file(eval_dir, tmp_path):
    crit = [{"name": "sql_style", "description": "Readable SQL?", "anchors": {"1": "unreadable", "5": "clean"}}]
    (tmp_path / "c.json").write_text(json.dumps(crit))
    code, out = cli("scorecard", "create", "--from", str(eval_dir), "--name", "custom", "--criteria-file",
                    str(tmp_path / "c.json"), "--raters", "dan", "--mode", "rubric")
    assert code == 0, out
    token = re.search(r"dan: /r/(\S+)", out).group(1)
    _, Session = get_study("custom")
    page = TestClient(create_app(Session, "custom")).get(f"/r/{token}", follow_redirects=True).text
    assert "sql style" in page and "Readable SQL?" in page and "unreadable" in page and "Answer B" not in page


@pytest.mark.parametrize("lines,needle", [
    ("not json\n", "per_example.jsonl:1: not JSON"),
    ('{"prompt": "p", "base_output": "a"}\n', "per_example.jsonl:1: a row needs prompt, base_output, tuned_output"),
    ("\n", "holds no answers"),
], ids=["not JSON", "a row without the tuned answer", "empty"])
def test_a_study_from_a_damaged_eval_folder_is_a_message(tmp_path, lines, needle):
    d = tmp_path / "eval"
    d.mkdir()
    (d / "per_example.jsonl").write_text(lines)
    code, out = cli("scorecard", "create", "--from", str(d), "--name", "broken", "--raters", "alice")
    assert code == 1 and needle in out and "Traceback" not in out, out
    (d / "per_example.jsonl").write_text('{"prompt": "p", "base_output": "a", "tuned_output": "b"}\n')
    (d / "results.json").write_text("{")
    code, out = cli("scorecard", "create", "--from", str(d), "--name", "broken", "--raters", "alice")
    assert code == 1 and "results.json is not readable JSON" in out, out


@pytest.mark.parametrize("content,needle", [
    ("{", "--criteria-file"), ("[1, 2]", "criterion 1: a name, or an object"),
    ('{"tone": 1}', "expected a non-empty list"), ('["tone", "tone"]', "a name appears twice"),
], ids=["not JSON", "numbers", "an object, not a list", "a name twice"])
def test_a_bad_criteria_file_is_a_message_and_makes_no_study(eval_dir, tmp_path, content, needle):
    f = tmp_path / "criteria.json"
    f.write_text(content)
    code, out = cli("scorecard", "create", "--from", str(eval_dir), "--name", "crit", "--criteria-file", str(f))
    assert code == 1 and needle in out and "Traceback" not in out, out
    code, out = cli("scorecard", "report", "crit")
    assert "no study named 'crit'" in out
