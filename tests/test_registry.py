"""Registry: lineage, promote/rollback with history, refusal rules, concurrency, tamper detection, export."""

import json
import os
import subprocess
import sys

import pytest
import torch
from helpers import SQL_ROWS, cli, write_jsonl, write_yaml

from skilltune.config import load_config
from skilltune.registry.api import Registry, RegistryError
from skilltune.registry.store import TamperedArtifact

# every test here runs on SQLite and on a real PostgreSQL server (tests/conftest.py)
pytestmark = pytest.mark.usefixtures("db_backend")


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory, tiny_model_dir):
    from skilltune.train.loop import train

    base = tmp_path_factory.mktemp("regruns")
    data = write_jsonl(base / "train.jsonl", SQL_ROWS)
    runs = []
    for lr in (5e-3, 1e-2):
        cfg_path = write_yaml(base / f"c{lr}.yaml", {"model": {"base": str(tiny_model_dir)},
                                                    "data": {"train": str(data)},
                                                    "train": {"epochs": 1, "lr": lr, "batch_size": 4,
                                                              "output_dir": str(base / "runs"), "precision": "fp32"}})
        runs.append(train(load_config(cfg_path), run_name=f"r{lr}").run_dir)
    return runs


def test_add_show_list_diff(two_runs):
    reg = Registry()
    v1 = reg.add(two_runs[0], "sql", note="first")
    v2 = reg.add(two_runs[1], "sql")
    assert (v1.number, v2.number) == (1, 2)
    lin = reg.get("sql@v1").lineage
    assert lin["base_model"]["hash"] and lin["data"]["train"]["sha256"] and lin["method"] == "lora"
    assert lin["adapter_config"]["r"] == 16 and lin["skilltune_version"]
    code, out = cli("registry", "diff", "sql@v1", "sql@v2")
    assert code == 0 and "train.lr: 0.005 -> 0.01" in out.replace("config.", "")
    code, out = cli("registry", "list", "sql")
    assert code == 0 and "sql@v1" in out and "sql@v2" in out


def test_promote_rollback_history_and_refusals(two_runs):
    reg = Registry()
    for run in two_runs:
        reg.add(run, "m")
    with pytest.raises(RegistryError, match="already registered as m@v1"):
        reg.add(two_runs[0], "m")
    reg.add(two_runs[0], "m", allow_duplicate=True)  # v3
    with pytest.raises(RegistryError, match="not set"):
        reg.rollback("m")
    reg.promote("m@v1", reason="first")
    with pytest.raises(RegistryError, match="no earlier version"):
        reg.rollback("m")
    reg.promote("m@v2")
    reg.promote("m@v3")
    assert reg.get("m@production").number == 3
    assert reg.rollback("m", dry_run=True) == (3, 2)
    assert reg.get("m@production").number == 3  # dry run moves nothing
    assert reg.rollback("m", reason="bad latency") == (3, 2)
    assert reg.get("m@production").number == 2
    assert reg.rollback("m") == (2, 1)
    events = reg.history("m")
    assert [(e.action, e.from_number, e.to_number) for e in events] == [
        ("promote", None, 1), ("promote", 1, 2), ("promote", 2, 3), ("rollback-dry-run", 3, 2),
        ("rollback", 3, 2), ("rollback", 2, 1)]
    assert events[4].reason == "bad latency" and events[4].who
    with pytest.raises(RegistryError, match="target of alias"):
        reg.delete("m@v1")
    reg.delete("m@v3")
    code, out = cli("registry", "history", "m")
    assert code == 0 and "rollback" in out


def test_concurrent_promotes_never_corrupt(two_runs, isolated_home):
    reg = Registry()
    for _ in range(4):
        reg.add(two_runs[0], "c", allow_duplicate=True)
    reg.promote("c@v1")
    script = ("import sys\nfrom skilltune.registry.api import Registry\nr = Registry()\n"
              "for i in range(10):\n    r.promote(f'c@v{2 + (i + int(sys.argv[1])) % 3}', reason=sys.argv[1])\n"
              "    r.rollback('c') if i % 5 == 4 else None\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    procs = [subprocess.Popen([sys.executable, "-c", script, str(k)], env=env, stderr=subprocess.PIPE)
             for k in range(8)]  # 8 writers at once, on SQLite and on PostgreSQL
    for p in procs:
        _, err = p.communicate(timeout=240)
        assert p.returncode == 0, err.decode()[-2000:]
    events = reg.history("c")
    assert len(events) == 1 + 8 * 10 + 8 * 2  # no alias move lost
    assert reg.get("c@production").number in (1, 2, 3, 4)
    # replaying the log gives the alias where it is
    stack = []
    for e in events:
        if e.action == "promote":
            stack.append(e.to_number)
        elif e.action == "rollback":
            stack.pop()
    assert stack[-1] == reg.get("c@production").number


def test_tampered_artifact_is_refused(two_runs):
    reg = Registry()
    v = reg.add(two_runs[0], "t")
    assert (reg.materialize("t@v1") / "adapter_model.safetensors").is_file()
    digest = v.manifest["adapter_model.safetensors"]
    obj = reg.store.root / "objects" / digest[:2] / digest[2:]
    obj.write_bytes(obj.read_bytes()[:-4] + b"evil")
    with pytest.raises(TamperedArtifact, match="sha256"):
        reg.materialize("t@v1")


def test_export_adapter_and_merged_give_same_greedy_output(two_runs, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from skilltune.model.generate import generate
    from skilltune.model.target import load_target

    Registry().add(two_runs[1], "e")
    test = write_jsonl(tmp_path / "test.jsonl", SQL_ROWS[:3])  # the runs have no test set of their own
    code, out = cli("export", "e@v1", "--adapter", str(tmp_path / "ad"), "--test", str(test))
    assert code == 0, out
    code, out = cli("export", "e@v1", "--merged", str(tmp_path / "merged"), "--test", str(test))
    assert code == 0 and "3/3 greedy answers identical" in out, out
    ours = load_target(str(two_runs[1]))
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "merged"))
    prompt = tok.apply_chat_template([{"role": "user", "content": "List all users."}], tokenize=False,
                                     add_generation_prompt=True)
    expect = generate(ours.model, ours.tokenizer, [prompt], max_new_tokens=12)[0].text
    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"))
    meta = json.loads((tmp_path / "ad" / "skilltune_adapter.json").read_text())
    base = AutoModelForCausalLM.from_pretrained(meta["model"]["base"])
    adapter = PeftModel.from_pretrained(base, str(tmp_path / "ad"))
    for model in (merged, adapter):
        ids = tok(prompt, return_tensors="pt", add_special_tokens=False)
        with torch.no_grad():
            out_ids = model.generate(**ids, max_new_tokens=12, do_sample=False, eos_token_id=tok.eos_token_id,
                                     pad_token_id=tok.pad_token_id)
        text = tok.decode(out_ids[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)
        assert text == expect


def test_eval_accepts_a_registry_version(two_runs):
    from skilltune.evaluate.runner import plan_eval

    Registry().add(two_runs[0], "ev")
    Registry().promote("ev@v1")
    plan = plan_eval("ev@production", "x.jsonl", None, None, None)
    # the verified checkout from the store, never the run directory (which may have changed since)
    assert plan.run_dir is None and plan.version == "ev@v1" and plan.target == str(Registry().materialize("ev@v1"))
    assert plan.recorded_run_dir == str(two_runs[0].resolve())


def test_concurrent_adds_never_lose_a_version_number(two_runs):
    script = ("import sys\nfrom skilltune.registry.api import Registry\nr = Registry()\n"
              f"[r.add({str(two_runs[0])!r}, 'n', allow_duplicate=True) for _ in range(3)]\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    Registry()  # the schema exists before the writers start
    procs = [subprocess.Popen([sys.executable, "-c", script], env=env, stderr=subprocess.PIPE) for _ in range(8)]
    for p in procs:
        _, err = p.communicate(timeout=240)
        assert p.returncode == 0, err.decode()[-2000:]
    assert [v.number for v in Registry().list("n")] == list(range(1, 25))  # none lost, none repeated


def test_an_old_registry_is_upgraded_and_a_newer_one_refused(tmp_path, db_backend):
    """A database with the schema skilltune 0.1 made (before migrations) opens and is upgraded; one from a newer
    skilltune is refused and left untouched."""
    from sqlalchemy import create_engine, inspect, text

    from skilltune.registry.migrate import SchemaError, head

    url = os.environ.get("SKILLTUNE_REGISTRY_URL") or f"sqlite:///{tmp_path / 'old.db'}"
    engine = create_engine(url)
    with engine.begin() as c:  # the 0.1 schema, made the way 0.1 made it (create_all, no alembic_version)
        c.execute(text("CREATE TABLE versions (id INTEGER PRIMARY KEY, name VARCHAR(200), number INTEGER, "
                       "created TIMESTAMP, note TEXT, method VARCHAR(20), manifest JSON, lineage JSON, metrics JSON, "
                       "UNIQUE (name, number))"))
        c.execute(text("CREATE TABLE aliases (id INTEGER PRIMARY KEY, name VARCHAR(200), alias VARCHAR(100), "
                       "version_id INTEGER REFERENCES versions(id), UNIQUE (name, alias))"))
        c.execute(text("CREATE TABLE alias_events (id INTEGER PRIMARY KEY, name VARCHAR(200), alias VARCHAR(100), "
                       "action VARCHAR(30), from_number INTEGER, to_number INTEGER, who VARCHAR(200), "
                       "\"when\" TIMESTAMP, reason TEXT)"))
        c.execute(text("INSERT INTO versions (id, name, number, note, method, manifest, lineage, metrics) VALUES "
                       "(1, 'old', 1, 'from 0.1', 'lora', '{}', '{}', '{}')"))
    if db_backend == "postgresql":  # a shared registry is not changed on open: the user is told the command
        code, out = cli("registry", "list", "--registry-url", url)
        assert code == 1 and "skilltune registry upgrade" in out
        code, out = cli("registry", "upgrade", "--registry-url", url)
        assert code == 0 and f"schema 0001 -> {head()}" in out, out
    reg = Registry(url)  # SQLite upgrades on open
    assert [(v.name, v.number, v.note) for v in reg.list()] == [("old", 1, "from 0.1")]
    indexes = {i["name"] for i in inspect(create_engine(url)).get_indexes("alias_events")}
    assert "ix_alias_events_name_alias_id" in indexes
    with create_engine(url).begin() as c:
        c.execute(text("UPDATE alembic_version SET version_num = '9999'"))
    with pytest.raises(SchemaError, match="newer than this skilltune knows"):
        Registry(url)
    code, out = cli("registry", "list", "--registry-url", url)
    assert code == 1 and "upgrade skilltune" in out


def test_passwords_never_reach_errors(monkeypatch):
    from skilltune.registry.db import shown

    url = "postgresql+psycopg://alice:s3cr3t-pw@127.0.0.1:1/registry"
    assert "s3cr3t-pw" not in shown(url) and "***" in shown(url)
    code, out = cli("registry", "list", "--registry-url", url)  # nothing listens on port 1
    assert code == 1 and "s3cr3t-pw" not in out and "alice" in out


def test_the_store_location_is_configurable(two_runs, tmp_path, monkeypatch):
    monkeypatch.setenv("SKILLTUNE_STORE", str(tmp_path / "shared-store"))
    v = Registry().add(two_runs[0], "st")
    digest = v.manifest["adapter_model.safetensors"]
    assert (tmp_path / "shared-store" / "objects" / digest[:2] / digest[2:]).is_file()


@pytest.fixture
def own_model_cache(isolated_home):
    """A model cache of the test's own: gc removes merged copies no version of its registry names, and the
    shared cache holds other tests' (tests/conftest.py links it into every home)."""
    (isolated_home / "models").unlink()
    (isolated_home / "models").mkdir()


@pytest.mark.usefixtures("own_model_cache")
def test_gc_frees_only_what_no_version_uses(two_runs):
    reg = Registry()
    v1, v2 = reg.add(two_runs[0], "g"), reg.add(two_runs[1], "g")
    checkouts = [reg.materialize("g@v1"), reg.materialize("g@v2")]
    code, out = cli("registry", "delete", "g@v1")
    assert code == 0 and "registry gc" in out
    only_v1 = set(v1.manifest.values()) - set(v2.manifest.values())
    assert only_v1 and set(v2.manifest.values()) - set(v1.manifest.values())  # the adapters differ, the rest is shared

    def obj(digest):
        return reg.store.root / "objects" / digest[:2] / digest[2:]

    from skilltune.model.sources import merged_version_dir

    merged = [merged_version_dir("g", n, v.manifest) for n, v in ((1, v1), (2, v2))]  # as DPO on a version makes
    for folder in merged:
        folder.mkdir(parents=True)
        (folder / "model.safetensors").write_bytes(b"w" * 1000)
    code, out = cli("registry", "gc", "--dry-run")
    assert code == 0 and f"would remove {len(only_v1)} store files no version uses" in out
    assert "would remove 2 checkouts and merged copies of deleted versions" in out, out
    assert str(checkouts[0]) in out.replace("\n", "")
    assert all(obj(d).is_file() for d in only_v1) and checkouts[0].is_dir()  # a dry run removes nothing
    cleanup = reg.gc()
    assert {p.parent.name + p.name for p in cleanup.unused} == only_v1
    assert cleanup.checkouts == [checkouts[0], merged[0]] and not merged[0].exists() and merged[1].is_dir()
    assert cleanup.sizes["unused"] == sum(len((two_runs[0] / "adapter" / rel).read_bytes())
                                          for rel, d in v1.manifest.items() if d in only_v1)
    assert not any(obj(d).exists() for d in only_v1) and not checkouts[0].exists()
    reg.store.verify(v2.manifest)  # every file of the version left is there, with its hash
    assert reg.store.matches(v2.manifest, checkouts[1]) and reg.gc().sizes == {"unused": 0, "partial": 0,
                                                                                 "checkouts": 0}
    assert cleanup.sizes["checkouts"] >= 1000


@pytest.mark.usefixtures("own_model_cache")
def test_gc_waits_for_no_add_and_cleans_up_after_a_killed_one(two_runs):
    """A `registry add` killed mid-copy leaves a partial object; gc is refused while the add runs (it could take
    objects not yet in a version) and removes the partial copy once the kill released the store."""
    script = ("import shutil, sys, time\n"
              "def stuck(fin, fout, *a, **k):\n"
              "    fout.write(fin.read(10)); fout.flush(); print('copying', flush=True); time.sleep(600)\n"
              "shutil.copyfileobj = stuck\n"
              "from skilltune.registry.api import Registry\nRegistry().add(sys.argv[1], 'k')\n")
    reg = Registry()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen([sys.executable, "-c", script, str(two_runs[0])], env=env, stdout=subprocess.PIPE)
    try:
        assert proc.stdout.readline().strip() == b"copying"
        with pytest.raises(RegistryError, match="in use: a `registry add` or a checkout is running"):
            reg.gc()
    finally:
        proc.kill()
        proc.wait(timeout=30)
    cleanup = reg.gc()
    assert len(cleanup.partial) == 1 and ".tmp" in cleanup.partial[0].name and cleanup.sizes["partial"] == 10
    assert not cleanup.partial[0].exists() and reg.list("k") == []
    assert reg.add(two_runs[0], "k").number == 1  # the store works as before


@pytest.mark.usefixtures("own_model_cache")
def test_gc_on_a_file_system_without_locks_says_so(two_runs, monkeypatch):
    """Some network mounts refuse file locks (ENOLCK): an add or a checkout goes ahead (a reader), gc refuses with
    what to do instead of a traceback."""
    import errno
    import fcntl

    def no_locks(fh, op):
        if op & fcntl.LOCK_UN:
            return
        raise OSError(errno.ENOLCK, "No locks available")

    reg = Registry()
    monkeypatch.setattr(fcntl, "flock", no_locks)
    assert reg.add(two_runs[0], "nl").number == 1 and reg.materialize("nl@v1").is_dir()
    code, out = cli("registry", "gc")
    assert code != 0 and "the file system offers no file locks" in out and "Traceback" not in out, out
