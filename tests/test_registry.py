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
              "for i in range(15):\n    r.promote(f'c@v{2 + (i + int(sys.argv[1])) % 3}', reason=sys.argv[1])\n"
              "    r.rollback('c') if i % 5 == 4 else None\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    procs = [subprocess.Popen([sys.executable, "-c", script, str(k)], env=env, stderr=subprocess.PIPE)
             for k in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err.decode()[-2000:]
    events = reg.history("c")
    assert len(events) == 1 + 2 * 15 + 2 * 3
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

    from skilltune.evaluate.generate import generate
    from skilltune.model.target import load_target

    Registry().add(two_runs[1], "e")
    code, out = cli("export", "e@v1", "--adapter", str(tmp_path / "ad"))
    assert code == 0, out
    code, out = cli("export", "e@v1", "--merged", str(tmp_path / "merged"))
    assert code == 0, out
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
