"""Security regressions (issue #26): each test reproduces an attack and asserts it now fails safely.

Artifacts, checkpoints, run folders, data files and model outputs are data, never code:
see SECURITY.md for the threat model these tests stand for.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import stat
import threading
import time
from pathlib import Path

import pytest
from helpers import SQL_ROWS, cli, write_jsonl, write_yaml

from skilltune.config import load_config
from skilltune.errors import SkilltuneError
from skilltune.registry.api import Registry, RegistryError

EVIL_MODULE = """
from pathlib import Path
Path({marker!r}).write_text("code from the artifact ran")
from transformers import LlamaConfig, LlamaForCausalLM
class EvilConfig(LlamaConfig):
    model_type = "evil"
class EvilModel(LlamaForCausalLM):
    config_class = EvilConfig
"""


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny_model_dir):
    """A finished LoRA run on the tiny model."""
    from skilltune.train.loop import train

    base = tmp_path_factory.mktemp("secrun")
    data = write_jsonl(base / "train.jsonl", SQL_ROWS)
    cfg = write_yaml(base / "c.yaml", {"model": {"base": str(tiny_model_dir)},
                                       "data": {"train": str(data), "test": str(data)},
                                       "train": {"epochs": 1, "batch_size": 4, "precision": "fp32",
                                                 "output_dir": str(base / "runs")}})
    return train(load_config(cfg), run_name="sec").run_dir


def _copy_run(run_dir: Path, dest: Path) -> Path:
    shutil.copytree(run_dir, dest, symlinks=True)
    return dest


def _evil_base(folder: Path, tiny_model_dir: Path, marker: Path) -> Path:
    """A model folder whose config asks for remote code that writes ``marker`` when imported."""
    shutil.copytree(tiny_model_dir, folder)
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(model_type="evil", architectures=["EvilModel"],
               auto_map={"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"})
    (folder / "config.json").write_text(json.dumps(cfg))
    tok_cfg = json.loads((folder / "tokenizer_config.json").read_text())
    tok_cfg["auto_map"] = {"AutoTokenizer": ["evil.EvilTokenizer", None]}
    (folder / "tokenizer_config.json").write_text(json.dumps(tok_cfg))
    (folder / "evil.py").write_text(EVIL_MODULE.format(marker=str(marker)))
    return folder


def _crafted_run(run_dir: Path, tiny_model_dir: Path, tmp_path: Path) -> tuple[Path, Path]:
    """A copy of ``run_dir`` whose adapter record switches on remote code and points at an evil base.

    Returns (the crafted run, the marker file the evil code would write)."""
    from skilltune.model.sources import model_fingerprint

    marker = tmp_path / "pwned"
    evil = _evil_base(tmp_path / "evilbase", tiny_model_dir, marker)
    crafted = _copy_run(run_dir, tmp_path / "crafted")
    meta_file = crafted / "adapter" / "skilltune_adapter.json"
    meta = json.loads(meta_file.read_text())
    meta["model"].update(base=str(evil), trust_remote_code=True, allow_pickle=True)
    meta["base_hash"] = model_fingerprint(evil)  # the attacker controls the recorded hash too
    meta_file.write_text(json.dumps(meta))
    return crafted, marker


# ---------------------------------------------------------------- 1. remote code from adapter metadata
def test_adapter_metadata_cannot_switch_on_remote_code(run_dir, tiny_model_dir, tmp_path):
    from skilltune.model.target import load_target

    crafted, marker = _crafted_run(run_dir, tiny_model_dir, tmp_path)
    with pytest.raises(SkilltuneError):
        load_target(str(crafted / "adapter"))
    code, out = cli("generate", str(crafted / "adapter"), "hi", "--max-new-tokens", "2")
    assert code != 0 and "Traceback" not in out
    assert not marker.exists()


def test_served_version_takes_its_base_from_the_registry_not_the_artifact(run_dir, tiny_model_dir, tmp_path):
    """A version whose artifact names an evil base still loads the base its lineage recorded, by hash."""
    from skilltune.serve.server import load_version

    crafted, marker = _crafted_run(run_dir, tiny_model_dir, tmp_path)
    reg = Registry()
    reg.add(crafted, "svc")
    loaded = load_version(reg, "svc@v1")
    assert loaded.version == "svc@v1" and not marker.exists()


def test_a_different_base_is_refused_by_hash(run_dir, tiny_model_dir, tmp_path):
    from skilltune.model.target import LoadPolicy, load_target
    from tiny import build_tiny_model

    other = build_tiny_model(tmp_path / "other", seed=1)  # same shapes, different weights
    with pytest.raises(SkilltuneError, match="not the one this adapter was trained on"):
        load_target(str(run_dir), policy=LoadPolicy(base=str(other)))
    corrupted = tmp_path / "corrupt-base"
    shutil.copytree(tiny_model_dir, corrupted)
    with open(corrupted / "model.safetensors", "r+b") as fh:  # flip bytes in the weights, not the header
        fh.seek(-64, os.SEEK_END)
        fh.write(b"\x7f" * 16)
    with pytest.raises(SkilltuneError, match="different or corrupted"):
        load_target(str(run_dir), policy=LoadPolicy(base=str(corrupted)))
    assert load_target(str(run_dir)).adapter_dir is not None  # the recorded base still loads


def test_converted_cache_entry_is_checked_against_its_recorded_hashes(tmp_path):
    from skilltune.model.sources import CACHE_MARKER, _cache_entry_intact, _file_hashes

    entry = tmp_path / "entry"
    entry.mkdir()
    (entry / "model.safetensors").write_bytes(b"weights" * 100)
    (entry / "config.json").write_text("{}")
    (entry / CACHE_MARKER).write_text(json.dumps({"sha256": "x", "files": _file_hashes(entry)}))
    assert _cache_entry_intact(entry)
    (entry / "model.safetensors").write_bytes(b"weightz" * 100)
    assert not _cache_entry_intact(entry)
    (entry / CACHE_MARKER).write_text(json.dumps({"sha256": "x"}))  # written before hashes were recorded
    assert not _cache_entry_intact(entry)


# ---------------------------------------------------------------- 2. pickle on resume
def test_crafted_checkpoint_state_does_not_run_on_resume(tmp_path, tiny_model_dir):
    import torch

    from skilltune.train.loop import TrainingInterrupted, train

    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    data = write_jsonl(tmp_path / "train.jsonl", SQL_ROWS)
    cfg = load_config(write_yaml(tmp_path / "c.yaml", {
        "model": {"base": str(tiny_model_dir)}, "data": {"train": str(data), "val_split": 0},
        "train": {"max_steps": 4, "batch_size": 4, "precision": "fp32", "output_dir": str(tmp_path / "runs")}}))
    with pytest.raises(TrainingInterrupted):
        train(cfg, run_name="p", stop_after=2)
    [ckpt] = (tmp_path / "runs").glob("p-*/checkpoints/step-000002")
    torch.save({"optimizer": Evil(), "scheduler": {}, "rng": {}}, ckpt / "state.pt")
    with pytest.raises(SkilltuneError, match="can load safely"):
        train(cfg, run_name="p", resume=True, run_dir=ckpt.parent.parent)
    assert not marker.exists()


# ---------------------------------------------------------------- 3. symlinks in a run directory
def test_registry_add_refuses_symlinks(run_dir, tmp_path):
    secret = tmp_path / "id_rsa"
    secret.write_text("-----BEGIN OPENSSH PRIVATE KEY----- top secret")
    secret.chmod(0o600)
    crafted = _copy_run(run_dir, tmp_path / "crafted")
    (crafted / "adapter" / "notes.txt").symlink_to(secret)
    code, out = cli("registry", "add", str(crafted), "--name", "leak")
    assert code == 1 and "symbolic link" in out and "notes.txt" in out
    store = Path(os.environ["SKILLTUNE_HOME"]) / "registry" / "store"
    leaked = [p for p in store.rglob("*") if p.is_file() and b"top secret" in p.read_bytes()]
    assert leaked == [] and Registry().list("leak") == []


# a truncated or corrupt copy: refused at registration, a message (not a traceback) when loaded directly
@pytest.mark.parametrize("damage", ["truncated weights", "garbage tokenizer", "run record without lineage",
                                    "eval results not JSON"])
def test_a_damaged_run_is_refused_by_the_registry_and_explained_by_generate(run_dir, tmp_path, damage):
    damaged = _copy_run(run_dir, tmp_path / "damaged")
    if damage == "truncated weights":
        weights = damaged / "adapter" / "adapter_model.safetensors"
        weights.write_bytes(weights.read_bytes()[:-100])
        needles = ("adapter_model.safetensors (", "the adapter cannot be read (SafetensorError")
    elif damage == "garbage tokenizer":
        (damaged / "adapter" / "tokenizer.json").write_text("{garbage")
        needles = ("tokenizer.json (", "the tokenizer cannot be read (")
    elif damage == "run record without lineage":
        (damaged / "run.json").write_text(json.dumps({"base_model": "x"}))
        needles = ("not a run record skilltune wrote", None)
    else:
        (damaged / "eval").mkdir(exist_ok=True)
        (damaged / "eval" / "results.json").write_text("{")
        needles = ("results.json is not readable JSON", None)
    code, out = cli("registry", "add", str(damaged), "--name", "damaged")
    assert code == 1 and needles[0] in out and "Traceback" not in out, out
    assert Registry().list("damaged") == []
    if needles[1]:
        code, out = cli("generate", str(damaged), "List all users.", "--max-new-tokens", "2")
        assert code == 1 and needles[1] in out and "copy the run directory again" in out, out
        assert "Traceback" not in out


# ---------------------------------------------------------------- 4. manifest paths
@pytest.mark.parametrize("bad", ["../../escaped.txt", "/tmp/skilltune-abs-escape.txt", "a/../../b.txt", "./x"])
def test_manifest_paths_cannot_leave_the_checkout(run_dir, tmp_path, bad):
    from sqlalchemy import select

    from skilltune.registry.db import Version
    from skilltune.registry.store import TamperedArtifact

    reg = Registry()
    v = reg.add(run_dir, "m")
    with reg.tx() as s:
        row = s.scalars(select(Version).where(Version.id == v.id)).one()
        digest = next(iter(row.manifest.values()))
        row.manifest = {**row.manifest, bad: digest}
    with pytest.raises(TamperedArtifact, match="unsafe path"):
        reg.materialize("m@v1")
    checkout = Path(os.environ["SKILLTUNE_HOME"]) / "registry" / "checkout"
    assert not (checkout.parent / "escaped.txt").exists() and not Path("/tmp/skilltune-abs-escape.txt").exists()


# ---------------------------------------------------------------- 5. verified copies
def test_checkout_keeps_only_the_manifest_and_eval_uses_it(run_dir, tmp_path):
    from skilltune.evaluate.runner import plan_eval

    reg = Registry()
    reg.add(run_dir, "ev")
    first = reg.materialize("ev@v1")
    (first / "extra.py").write_text("print('smuggled')")
    again = reg.materialize("ev@v1")
    assert not (again / "extra.py").exists()
    plan = plan_eval("ev@v1", None, None, None, None)
    assert Path(plan.target) == again and plan.version == "ev@v1" and plan.run_dir is None
    assert plan.test_file == load_config(run_dir / "config.yaml").data.test  # the config the registry kept


def test_eval_of_a_version_ignores_a_changed_run_directory(run_dir, tmp_path):
    from skilltune.evaluate.runner import plan_eval

    copy = _copy_run(run_dir, tmp_path / "run")
    Registry().add(copy, "ev2")
    (copy / "config.yaml").write_text("eval: {metrics: ['evil_module:run']}\n")  # changed after registering
    plan = plan_eval("ev2@v1", None, None, None, None)
    assert plan.cfg.eval.metrics == ["exact_match"] and str(copy) not in plan.target


# ---------------------------------------------------------------- 6. model-written SQL
@pytest.mark.parametrize("sql", ["ATTACH DATABASE '{out}' AS x", "VACUUM INTO '{out}'",
                                 "SELECT * FROM t; ATTACH DATABASE '{out}' AS y", "PRAGMA journal_mode=DELETE",
                                 "SELECT load_extension('{out}')"])
def test_sql_metric_cannot_create_files(tmp_path, sql):
    from skilltune.evaluate.sql import QueryFailed, run_query, sql_exec_score

    db = tmp_path / "d.db"
    con = sqlite3.connect(db)
    con.execute("CREATE TABLE t (a INT)")
    con.execute("INSERT INTO t VALUES (1)")
    con.commit()
    con.close()
    out = tmp_path / "created.db"
    with pytest.raises(QueryFailed):
        run_query(db, sql.format(out=out))
    assert sql_exec_score(sql.format(out=out), "SELECT a FROM t", db) == 0.0
    assert not out.exists()
    assert run_query(db, "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x+1 FROM c WHERE x<3) "
                         "SELECT COUNT(*), lower('A') FROM c") == [(3, "a")]


# ---------------------------------------------------------------- 7. engine deadlock
def test_engine_never_deadlocks_on_mixed_temperatures_with_a_full_queue(monkeypatch):
    from skilltune.model.generate import Generation
    from skilltune.serve import engine as engine_mod

    def stub_generate(model, tokenizer, prompts, max_new_tokens, batch_size, temperature, **options):
        time.sleep(0.01)
        return [Generation(f"t={temperature}", 1, 1, 0.01, True) for _ in prompts]

    monkeypatch.setattr(engine_mod, "generate", stub_generate)
    eng = engine_mod.Engine(engine_mod.Loaded("x@v1", None, None), queue_size=4, max_batch=2)
    try:
        futures = []
        deadline = time.monotonic() + 10
        while len(futures) < 40 and time.monotonic() < deadline:
            try:
                futures.append(eng.submit("p", 4, [0.0, 0.7][len(futures) % 2]))
            except engine_mod.QueueFull:
                time.sleep(0.005)
        assert len(futures) == 40
        results = [f.result(timeout=10) for f in futures]
        assert [r[1].text for r in results] == [f"t={[0.0, 0.7][i % 2]}" for i in range(40)]
    finally:
        eng.close()


# ---------------------------------------------------------------- 8./11. the server: metrics, hosts, parts
@pytest.fixture
def app_client(run_dir):
    from fastapi.testclient import TestClient

    from skilltune.config.schema import ServeConfig
    from skilltune.serve.app import create_app
    from skilltune.serve.server import allowed_hosts_for, build_state

    reg = Registry()
    reg.add(run_dir, "svc")
    reg.promote("svc@v1")
    state = build_state("svc@production", ServeConfig(), "k3y", reg, poll_s=60)
    clients = []

    def make(host="127.0.0.1"):
        c = TestClient(create_app(state, allowed_hosts_for(host)), base_url="http://127.0.0.1:8000")
        clients.append(c)
        return c

    yield make
    state.stop()


def test_metrics_stay_bounded_under_random_paths(app_client):
    client = app_client()
    for i in range(300):
        assert client.get(f"/nope/{i}-{os.urandom(8).hex()}").status_code == 401
        client.get(f"/v1/x{i}", headers={"Authorization": "Bearer k3y"})
    text = client.get("/metrics", headers={"Authorization": "Bearer k3y"}).text
    assert len(text) < 20_000 and "/nope/" not in text and "/v1/x1" not in text
    assert 'route="unmatched",status="401"' in text and 'route="unmatched",status="404"' in text


def test_dns_rebinding_host_is_refused_on_loopback(app_client):
    client = app_client("127.0.0.1")
    assert client.get("/health", headers={"Host": "attacker.example"}).status_code == 400
    assert client.get("/health", headers={"Host": "localhost:8000"}).status_code == 200
    assert app_client("0.0.0.0").get("/health", headers={"Host": "my-box.internal"}).status_code == 200


def test_non_text_content_part_is_a_4xx_not_a_500(app_client):
    client = app_client()
    for content in ([{"type": "text", "text": 123}], [{"type": "image_url", "image_url": {"url": "x"}}], [{}]):
        r = client.post("/v1/chat/completions", headers={"Authorization": "Bearer k3y"},
                        json={"model": "svc", "messages": [{"role": "user", "content": content}]})
        assert 400 <= r.status_code < 500 and r.json()["error"]["message"], (content, r.text)


def test_serving_on_all_interfaces_needs_a_key(monkeypatch):
    monkeypatch.delenv("NO_SUCH_KEY", raising=False)
    code, out = cli("serve", "svc@production", "--host", "0.0.0.0")
    assert code == 1 and "--allow-unauthenticated" in out and "API key" in out


# ---------------------------------------------------------------- 9. file modes and rater tokens
def test_sensitive_files_are_owner_only(run_dir, tmp_path):
    from skilltune.paths import home
    from skilltune.scorecard.db import Rater, session_factory
    from skilltune.scorecard.study import create_study, default_url
    from skilltune.serve.requestlog import RequestLog

    def mode(p: Path) -> int:
        return stat.S_IMODE(p.stat().st_mode)

    reg = Registry()
    reg.add(run_dir, "modes")
    root = home()
    assert mode(root) == 0o700
    assert mode(root / "registry" / "registry.db") == 0o600
    objects = [p for p in (root / "registry" / "store" / "objects").rglob("*") if p.is_file()]
    assert objects and all(mode(p) == 0o600 for p in objects)
    log = RequestLog(root / "serving" / "x.requests.db")
    log.write("x@v1", "chat", "hi", "ho", 0.1, 1, 1, 200)
    assert mode(root / "serving" / "x.requests.db") == 0o600
    log.close()
    ev = tmp_path / "ev"
    write_jsonl(ev / "per_example.jsonl", [{"prompt": "p", "reference": "r", "base_output": "a", "tuned_output": "b"}])
    _, tokens = create_study(ev, "st", ["relevance"], raters=["alice"])
    assert mode(root / "scorecard.db") == 0o600
    with session_factory(default_url())() as s:
        stored = [r.token for r in s.query(Rater).all()]
    assert tokens["alice"] not in stored and len(stored[0]) == 64
    assert tokens["alice"].encode() not in (root / "scorecard.db").read_bytes()


# ---------------------------------------------------------------- 10. redaction
@pytest.mark.parametrize("text,kind", [
    ("call +4915112345678 now", "PHONE"), ("reach me on +49 151 12345678", "PHONE"),
    ("SSN 123-45-6789 on file", "SSN"), ("card 4111.1111.1111.1111 ok", "CREDIT_CARD"),
    ("card 4111  1111  1111  1111 ok", "CREDIT_CARD"), ("iban de89 3704 0044 0532 0130 00", "IBAN"),
    ("IBAN DE89-3704-0044-0532-0130-00", "IBAN"), ("stripe sk_live_4eC39HqLyjWDarjtT1zdp7dc", "STRIPE_KEY"),
    ("google AIzaSyA1234567890abcdefghijklmnopqrstuv", "GOOGLE_API_KEY"),
    ("hub hf_abcdefghijklmnopqrstuvwxyzABCDEFGH", "HF_TOKEN"), ("gitlab glpat-abcdefghij1234567890", "GITLAB_TOKEN"),
    ("jwt eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.dozjgNryP4J3jVmNHl0w5N_XgL0n3I9PlFUP0THsR8U", "JWT"),
    ("Authorization: Bearer abcdef0123456789abcdef", "BEARER_TOKEN"),
    ("aws_secret_access_key = wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY", "AWS_SECRET_KEY"),
    ("password: hunter22", "PASSWORD"), ('{"password": "s3cr3t pass"}', "PASSWORD"),
    ("host 2001:db8::8a2e:370:7334 down", "IP_ADDRESS"), ("write to jürgen.müller@bücher.de", "EMAIL"),
])
def test_redaction_covers_the_reported_gaps(text, kind):
    from skilltune.data.pii import find_pii, redact

    assert [h.kind for h in find_pii(text)] == [kind]
    assert f"[{kind}]" in redact(text)[0]


@pytest.mark.parametrize("text", ["at 12:30:45 the job ran", "std::vector and a::b", "price 1,234,567.89",
                                  "Order ORD-2024-00123 shipped", "use a bearer token in the header",
                                  "the password manager", "hash 5d41402abc4b2a76b9719d911017c592"])
def test_redaction_leaves_ordinary_text(text):
    from skilltune.data.pii import find_pii

    assert find_pii(text) == []


def test_password_redaction_keeps_the_key():
    from skilltune.data.pii import redact

    assert redact('{"password": "hunter22", "user": "bob"}')[0] == '{"password": "[PASSWORD]", "user": "bob"}'


# ---------------------------------------------------------------- 12. names, aliases, notes
@pytest.mark.parametrize("name", ["a@b", "line\nbreak", "cr\rname", "../up", "", "-dash", "x" * 101])
def test_bad_model_names_are_refused(run_dir, name):
    with pytest.raises(RegistryError, match="invalid model name"):
        Registry().add(run_dir, name)


@pytest.mark.parametrize("alias", ["v1", "latest", "v22", "bad alias", "al\nias", "1st"])
def test_bad_aliases_are_refused(run_dir, alias):
    reg = Registry()
    reg.add(run_dir, "al")
    with pytest.raises(RegistryError):
        reg.promote("al@v1", alias=alias)
    assert reg.aliases("al") == {}


def test_control_characters_never_reach_the_terminal(run_dir):
    reg = Registry()
    v = reg.add(run_dir, "ansi", note="ok\x1b[2J\x1b[31mred\rX")
    assert v.note == "ok[2J[31mredX"
    reg.promote("ansi@v1", reason="why\x1b]0;title\x07")
    assert reg.history("ansi")[0].reason == "why]0;title"


# ---------------------------------------------------------------- 13. scorecard export and headers
def test_scorecard_csv_cells_cannot_be_formulas():
    from skilltune.scorecard.study import to_csv

    text = to_csv([{"prompt": "=HYPERLINK(\"http://x\")", "notes": "+1", "rater": "@bob", "choice": "-2",
                    "scores": {}, "ok": "plain", "n": -3}])
    row = text.splitlines()[1]
    assert "'=HYPERLINK" in row and "'+1" in row and "'@bob" in row and "'-2" in row and ",-3" in row


def test_scorecard_pages_send_security_headers(tmp_path):
    from fastapi.testclient import TestClient

    from skilltune.scorecard.app import create_app
    from skilltune.scorecard.study import create_study, default_url, get_study

    ev = tmp_path / "ev"
    write_jsonl(ev / "per_example.jsonl", [{"prompt": "p", "reference": "r", "base_output": "a", "tuned_output": "b"}])
    _, tokens = create_study(ev, "hdr", ["relevance"], raters=["alice"], url=default_url())
    _, Session = get_study("hdr")
    client = TestClient(create_app(Session, "hdr"))
    r = client.get(f"/r/{tokens['alice']}", follow_redirects=True)
    assert r.status_code == 200 and "Answer A" in r.text
    assert r.headers["x-frame-options"] == "DENY" and r.headers["referrer-policy"] == "no-referrer"
    assert "frame-ancestors 'none'" in r.headers["content-security-policy"]
    assert client.get("/r/" + "x" * 32).status_code == 403


# ---------------------------------------------------------------- 14. hostile data files
def test_hostile_data_files_give_clear_errors(tmp_path):
    from skilltune.data.reader import CSV_FIELD_LIMIT

    deep = write_jsonl(tmp_path / "deep.jsonl", [{"prompt": "a", "completion": "b"}, "[" * 100_000 + "]" * 100_000])
    code, out = cli("data", "audit", str(deep))
    assert code == 1 and "deep.jsonl:2" in out and "nested too deeply" in out and "Traceback" not in out

    big = tmp_path / "big.csv"
    big.write_text('prompt,completion\n"a","b"\n"' + "x" * (CSV_FIELD_LIMIT + 10) + '","y"\n')
    code, out = cli("data", "audit", str(big))
    assert code == 2 and "big.csv:" in out and "unreadable CSV" in out and "Traceback" not in out

    import pyarrow as pa
    import pyarrow.parquet as pq

    good = tmp_path / "good.parquet"
    pq.write_table(pa.table({"prompt": ["a"] * 100, "completion": ["b"] * 100}), good)
    cut = tmp_path / "cut.parquet"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    code, out = cli("data", "audit", str(cut))
    assert code == 2 and "unreadable Parquet" in out and "Traceback" not in out


def test_deeply_nested_model_output_scores_zero():
    from skilltune.evaluate.metrics import METRICS

    deep = "[" * 100_000 + "]" * 100_000
    assert METRICS["json_valid"].score(deep, "{}", {}) == 0.0


# ---------------------------------------------------------------- 15. configs that name code
def test_a_copied_adapter_does_not_pull_in_the_config_its_record_names(run_dir, tmp_path):
    from skilltune.evaluate.runner import plan_eval

    adapter = tmp_path / "adapter"
    shutil.copytree(run_dir / "adapter", adapter)
    plan = plan_eval(str(adapter), "t.jsonl", None, None, None)
    assert plan.cfg.data.train is None  # defaults: the run folder named in the record was not read
    assert plan_eval(str(run_dir / "adapter"), "t.jsonl", None, None, None).cfg.data.train  # in its run: read


def test_code_metrics_need_the_operators_flag(run_dir, tmp_path, monkeypatch):
    marker = tmp_path / "ran"
    (tmp_path / "evilmetric.py").write_text(f"open({str(marker)!r}, 'w').write('x')\n"
                                            "def score(p, r, c):\n    return 1.0\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    test = write_jsonl(tmp_path / "t.jsonl", SQL_ROWS[:2])
    code, out = cli("eval", str(run_dir), "--test", str(test), "--no-forgetting", "--metrics", "evilmetric:score",
                    "--out", str(tmp_path / "o"))
    assert code == 2 and "--allow-code-metrics" in out and not marker.exists()


def test_server_threads_survive_a_burst_of_bad_requests(app_client):
    client = app_client()
    errors = []

    def hammer():
        for _ in range(20):
            r = client.post("/v1/chat/completions", headers={"Authorization": "Bearer k3y"}, content=b"\xff\xfe{")
            if not 400 <= r.status_code < 500:
                errors.append(r.status_code)

    threads = [threading.Thread(target=hammer) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and client.get("/health").status_code == 200


def test_rater_tokens_stored_by_older_versions_are_hashed_on_open(tmp_path):
    from sqlalchemy import create_engine, text

    from skilltune.scorecard.db import Rater, session_factory, token_hash

    url = f"sqlite:///{tmp_path / 'old.db'}"
    session_factory(url)  # today's tables
    with create_engine(url).begin() as con:  # a row as an older skilltune wrote it: the token itself
        con.execute(text("INSERT INTO studies (id, name, mode, criteria, gates, source, run_dir, secret, created) "
                         "VALUES (1, 's', 'ab', '[]', '{}', '', '', 'sec', '2026-01-01')"))
        con.execute(text("INSERT INTO raters (study_id, name, token) VALUES (1, 'bob', 'plain-old-token-32-chars-long-xx')"))
    with session_factory(url)() as s:
        assert [r.token for r in s.query(Rater).all()] == [token_hash("plain-old-token-32-chars-long-xx")]


def test_a_damaged_database_file_is_a_message_naming_it(tmp_path, monkeypatch):
    """The registry, the request log and a scorecard study are SQLite files by default: a damaged one (or
    another file in its place) is a message saying which and what to do, not a SQLAlchemy traceback."""
    from skilltune.scorecard.db import session_factory
    from skilltune.serve.requestlog import RequestLog

    monkeypatch.delenv("SKILLTUNE_REGISTRY_URL", raising=False)
    monkeypatch.setenv("SKILLTUNE_HOME", str(tmp_path / "home"))
    damaged = b"SQLite format 3\x00" + b"not a page" * 50
    (tmp_path / "home" / "registry").mkdir(parents=True)
    (tmp_path / "home" / "registry" / "registry.db").write_bytes(damaged)
    code, out = cli("registry", "list")
    assert code == 1 and "cannot open the registry database" in out and "file is not a database" in out, out
    assert "restore it from a backup" in out and "Traceback" not in out
    (tmp_path / "log.db").write_bytes(damaged)
    with pytest.raises(SkilltuneError, match="cannot open the request log .*log.db: file is not a database"):
        RequestLog(tmp_path / "log.db", service="svc")
    with pytest.raises(SkilltuneError, match="cannot open the scorecard database"):
        session_factory(f"sqlite:///{tmp_path / 'log.db'}")
