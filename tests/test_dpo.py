"""DPO: the loss against TRL's DPOTrainer, the pair layouts, training, resume, and the data it needs."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from helpers import write_jsonl, write_yaml

from skilltune.config import load_config
from skilltune.errors import DataError

PAIRS = [{"prompt": f"What is the answer {i}?", "chosen": "SELECT name FROM users;" * (1 + i % 2),
          "rejected": f"hello world {i}"} for i in range(4)]


def _trl_batch_and_loss(model_dir, beta: float):
    """TRL's own batch and sigmoid loss for PAIRS, with a reference model that differs from the policy."""
    trl = pytest.importorskip("trl")
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.pad_token = tok.eos_token
    policy = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    ref = copy.deepcopy(policy)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.05 * torch.randn_like(p))
    rows = [{"prompt": [{"role": "user", "content": r["prompt"]}],
             "chosen": [{"role": "assistant", "content": r["chosen"]}],
             "rejected": [{"role": "assistant", "content": r["rejected"]}]} for r in PAIRS]
    import tempfile

    args = trl.DPOConfig(output_dir=tempfile.mkdtemp(), beta=beta, use_cpu=True, per_device_train_batch_size=4,
                         report_to=[], max_length=None, bf16=False, fp16=False)
    trainer = trl.DPOTrainer(copy.deepcopy(policy), ref_model=copy.deepcopy(ref), args=args,
                             train_dataset=Dataset.from_list(rows), processing_class=tok)
    batch = next(iter(trainer.get_train_dataloader()))
    return policy, ref, batch, trainer.compute_loss(trainer.model, batch).item()


def _pairs_from_trl(batch):
    """TRL's rows (chosen rows, then rejected rows) as our pairs: the same token ids."""
    from skilltune.train.preference import EncodedPair

    ids, mask, comp = batch["input_ids"], batch["attention_mask"].bool(), batch["completion_mask"].bool()
    n = ids.shape[0] // 2
    pairs = []
    for i in range(n):
        prompt = ids[i][mask[i] & ~comp[i]].tolist()
        assert prompt == ids[n + i][mask[n + i] & ~comp[n + i]].tolist()
        pairs.append(EncodedPair(prompt, ids[i][comp[i]].tolist(), ids[n + i][comp[n + i]].tolist(), i))
    return pairs


@pytest.mark.parametrize("layout,kernels", [("shared", False), ("shared", True), ("plain", False)])
def test_dpo_loss_equals_trl_sigmoid_loss(tiny_model_dir, layout, kernels):
    """Same batch, same policy and reference: our summed-then-averaged loss is TRL's to 1e-5 (fp32)."""
    from skilltune.train.kernels import install_kernels
    from skilltune.train.preference import PreferenceLoss, collate_pairs

    beta = 0.3
    policy, ref, batch, trl_loss = _trl_batch_and_loss(tiny_model_dir, beta)
    pairs = _pairs_from_trl(batch)
    undo = install_kernels(policy)[1] if kernels else (lambda: None)
    try:
        tensors = collate_pairs(pairs, 2, 512, layout)
        ref_loss = PreferenceLoss(ref, None, beta)
        with torch.no_grad():
            table = ref_loss.answer_logps(**tensors)
        ours = PreferenceLoss(policy, None, beta)
        ours.reference = table
        loss = ours(**tensors) / len(pairs)
    finally:
        undo()
    assert abs(loss.item() - trl_loss) < 1e-5, (loss.item(), trl_loss)
    assert abs(trl_loss - math.log(2)) > 1e-3  # the reference differs from the policy: not the trivial log 2
    assert ours.stats["pairs"] == len(pairs)


def test_shared_layout_gradients_equal_the_plain_layout(tiny_model_dir):
    """Each answer sees its prompt and itself only: the packed layout's gradients are the padded rows'."""
    from transformers import AutoModelForCausalLM

    from skilltune.train.preference import EncodedPair, PreferenceLoss, collate_pairs

    pairs = [EncodedPair([1, 5, 9, 12, 7], [30, 31, 2], [40, 2], 0), EncodedPair([1, 6, 7], [50, 51, 52, 2], [60, 2], 1),
             EncodedPair([1, 5, 9], [70, 2], [80, 81, 82, 83, 2], 2)]
    grads = {}
    for layout in ("shared", "plain"):
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
        loss_fn = PreferenceLoss(model, None, 0.5)
        loss_fn.reference = torch.tensor([[-20.0, -10.0], [-25.0, -9.0], [-8.0, -30.0]])
        loss_fn(**collate_pairs(pairs, 2, 512, layout)).backward()
        grads[layout] = {n: p.grad.clone() for n, p in model.named_parameters()}
    for name, g in grads["plain"].items():
        torch.testing.assert_close(grads["shared"][name], g, rtol=1e-4, atol=1e-6)


def _dpo_config(tmp_path, model_dir, val_split=0.25, **train):
    rows = [{"prompt": f"Question {i}: what is {w}?", "chosen": f"The answer is {w}.", "rejected": f"{w}!! I dunno"}
            for i, w in enumerate(["hello", "world", "fox", "dog", "answer", "question", "user", "system"] * 2)]
    data = write_jsonl(tmp_path / "prefs.jsonl", rows)
    conf = {"model": {"base": str(model_dir)}, "data": {"train": str(data), "val_split": val_split},
            "train": {"objective": "dpo", "dpo_beta": 0.2, "epochs": 2, "lr": 5e-3, "batch_size": 4,
                      "precision": "fp32", "output_dir": str(tmp_path / "runs"), "save_steps": 2, **train}}
    return load_config(write_yaml(tmp_path / "c.yaml", conf))


def test_dpo_training_learns_the_preference_and_logs_rewards(tmp_path, tiny_model_dir):
    from skilltune.train.loop import train
    from skilltune.train.preference import REFERENCE_FILE

    result = train(_dpo_config(tmp_path, tiny_model_dir), run_name="dpo")
    metrics = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert abs(metrics[0]["train_loss"] - math.log(2)) < 1e-4  # step 1: the policy is the reference
    assert metrics[0]["reward_margin"] == pytest.approx(0, abs=1e-5)
    for key in ("reward_accuracy", "logp_chosen", "logp_rejected"):
        assert key in metrics[0]
    last_val = [m for m in metrics if "val_loss" in m][-1]
    assert last_val["val_loss"] < math.log(2) and last_val["val_reward_accuracy"] > 0.5
    assert (result.run_dir / REFERENCE_FILE).is_file()
    run = json.loads((result.run_dir / "run.json").read_text())
    assert run["objective"] == "dpo" and run["share_prefix"] == "shared"
    assert result.summary["objective"] == "dpo"
    best = next(m for m in metrics if m["step"] == result.summary["best_step"])
    assert result.summary["val_reward_accuracy"] == best["val_reward_accuracy"]  # of the weights kept


def test_dpo_resume_after_interruption_equals_the_uninterrupted_run(tmp_path, tiny_model_dir):
    from safetensors.torch import load_file

    from skilltune.train.loop import TrainingInterrupted, train

    whole = train(_dpo_config(tmp_path / "a", tiny_model_dir), run_name="dpo")
    cfg = _dpo_config(tmp_path / "b", tiny_model_dir)
    with pytest.raises(TrainingInterrupted):
        train(cfg, run_name="dpo", stop_after=2)
    resumed = train(cfg, run_name="dpo", resume=True)
    a = load_file(str(whole.artifact_dir / "adapter_model.safetensors"))
    b = load_file(str(resumed.artifact_dir / "adapter_model.safetensors"))
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-6)


def test_objective_and_data_must_match(tmp_path, tiny_model_dir):
    from skilltune.train.loop import train

    cfg = _dpo_config(tmp_path, tiny_model_dir)
    sft = cfg.model_copy(update={"train": cfg.train.model_copy(update={"objective": "sft", "dpo_beta": 0.1})})
    with pytest.raises(DataError, match="(?s)preference pair.*train.objective=dpo"):
        train(sft, run_name="x")
    demos = write_jsonl(tmp_path / "demos.jsonl", [{"prompt": "a", "completion": "b"}] * 4)
    dpo = cfg.model_copy(update={"data": cfg.data.model_copy(update={"train": str(demos)})})
    with pytest.raises(DataError, match="(?s)demonstration.*preference pairs"):
        train(dpo, run_name="x")


def test_dpo_config_is_validated_up_front(tmp_path):
    from pydantic import ValidationError

    from skilltune.config.schema import SkilltuneConfig
    from skilltune.train.prepare import config_problems

    with pytest.raises(ValidationError, match="dpo_beta"):
        SkilltuneConfig.model_validate({"train": {"dpo_beta": 0.5}})
    with pytest.raises(ValidationError):
        SkilltuneConfig.model_validate({"train": {"objective": "dpo", "dpo_beta": 0}})
    data = write_jsonl(tmp_path / "t.jsonl", PAIRS)
    cfg = SkilltuneConfig.model_validate({"data": {"train": str(data)}, "train": {"objective": "ppo"}})
    assert any("unknown objective 'ppo'" in p and "dpo" in p for p in config_problems(cfg))


# ---------------------------------------------------------------- from a scorecard study to pairs
def _eval_dir(tmp_path, n=6):
    d = tmp_path / "eval"
    d.mkdir(parents=True)
    rows = [{"line": i, "prompt": f"Question {i}", "reference": f"ref {i}", "base_output": f"base answer {i}",
             "tuned_output": f"tuned answer {i}"} for i in range(n)]
    (d / "per_example.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (d / "results.json").write_text(json.dumps({"run_dir": ""}))
    return d


def test_scorecard_preferences_keep_only_agreed_winners(tmp_path):
    from helpers import cli

    from skilltune.data.reader import read_file
    from skilltune.scorecard.study import create_study, rater_items, record_judgement

    create_study(_eval_dir(tmp_path), "review", ["brand_voice"], "ab", 6, ["r1", "r2", "r3"], overlap=1.0)
    items = rater_items("review", "r1")
    plan = [("A", "A", "B"), ("tie", "tie", "A"), ("A", "B", "tie"), ("both_bad",) * 3, ("B", "B", "B"), ()]
    for item, votes in zip(items, plan):
        for rater, vote in zip(("r1", "r2", "r3"), votes):
            record_judgement("review", rater, item["item_id"], vote, {"brand_voice": {"A": 3, "B": 3}})
    out = tmp_path / "prefs.jsonl"
    code, text = cli("scorecard", "export", "review", "--preferences", str(out))
    assert code == 0, text
    for said in ("2 preference pairs from 6 items (15 judgements)", "1 tie", "1 both bad", "1 no majority",
                 "1 not judged", "more than half of its raters"):
        assert said in text, (said, text)
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    by_item = {i["item_id"]: i for i in items}
    first, fifth = by_item[rows[0]["item_id"]], by_item[rows[1]["item_id"]]
    assert (rows[0]["chosen"], rows[0]["rejected"]) == (first["A"], first["B"])  # A won 2 of 3
    assert (rows[1]["chosen"], rows[1]["rejected"]) == (fifth["B"], fifth["A"])
    assert rows[0]["study"] == "review" and rows[0]["raters"] == 3 and rows[0]["agreeing"] == 2
    report = read_file(out)
    assert report.format == "preference" and not report.problems
    assert report.examples[0].meta == {"study": "review", "item_id": rows[0]["item_id"]}
    code, text = cli("scorecard", "export", "review")
    assert code == 2 and "exactly one of --out" in text
    create_study(_eval_dir(tmp_path / "b"), "unjudged", ["brand_voice"], "ab", 6, ["r1"])
    code, text = cli("scorecard", "export", "unjudged", "--preferences", str(tmp_path / "none.jsonl"))
    assert code == 1 and "no preference pairs" in text and "6 not judged" in text
    assert not (tmp_path / "none.jsonl").exists()


def test_record_judgement_refuses_what_the_app_refuses(tmp_path):
    from skilltune.scorecard.study import StudyError, create_study, rater_items, record_judgement

    create_study(_eval_dir(tmp_path), "r", ["brand_voice"], "ab", 6, ["r1"])
    item = rater_items("r", "r1")[0]["item_id"]
    with pytest.raises(StudyError, match="choice"):
        record_judgement("r", "r1", item, "C", {"brand_voice": {"A": 3, "B": 3}})
    with pytest.raises(StudyError, match="brand_voice"):
        record_judgement("r", "r1", item, "A", {"brand_voice": {"A": 9, "B": 3}})
    with pytest.raises(StudyError, match="no rater"):
        record_judgement("r", "mallory", item, "A", {"brand_voice": {"A": 3, "B": 3}})


def test_review_to_dpo_loop_with_lineage(tmp_path, tiny_model_dir):
    """SFT -> registry -> eval -> study -> (scripted) judgements -> preferences -> DPO on top of the SFT
    version -> registry: the DPO version's lineage names the study, the file, the run and its parent."""
    from helpers import cli

    from skilltune.registry.api import Registry
    from skilltune.scorecard.study import rater_items, record_judgement

    train_rows = [{"prompt": f"Question {i}: what is {w}?", "completion": f"The answer is {w}."}
                  for i, w in enumerate(["hello", "world", "fox", "dog", "answer", "question"] * 3)]
    test_rows = [{"prompt": f"Tell me about {w}.", "completion": f"The answer is {w}."} for w in ["user", "system"] * 2]
    data = write_jsonl(tmp_path / "train.jsonl", train_rows)
    test = write_jsonl(tmp_path / "test.jsonl", test_rows)
    sft = write_yaml(tmp_path / "sft.yaml", {
        "model": {"base": str(tiny_model_dir)}, "data": {"train": str(data), "test": str(test), "val_split": 0,
                                                         "system_prompt": "Answer briefly."},
        "eval": {"max_new_tokens": 8}, "train": {"epochs": 1, "lr": 5e-3, "precision": "fp32",
                                                 "output_dir": str(tmp_path / "runs")}})
    assert cli("train", str(sft), "--run-name", "sft")[0] == 0
    sft_run = next((tmp_path / "runs").glob("sft-*"))
    assert cli("registry", "add", str(sft_run), "--name", "voice")[0] == 0
    review = _eval_dir(tmp_path / "review")  # two answers per review question (what `skilltune eval` writes)
    assert cli("scorecard", "create", "--from", str(review), "--name", "round-1", "--criteria",
               "brand_voice", "--raters", "scripted")[0] == 0
    for item in rater_items("round-1", "scripted"):  # a stand-in for people: the longer answer wins
        choice = "A" if len(item["A"]) >= len(item["B"]) else "B"
        record_judgement("round-1", "scripted", item["item_id"], choice, {"brand_voice": {"A": 3, "B": 3}})
    prefs = tmp_path / "prefs.jsonl"
    assert cli("scorecard", "export", "round-1", "--preferences", str(prefs))[0] == 0
    n_pairs = len(prefs.read_text().splitlines())
    dpo = write_yaml(tmp_path / "dpo.yaml", {
        "model": {"base": "voice@v1"}, "data": {"train": str(prefs), "val_split": 0},
        "train": {"objective": "dpo", "epochs": 1, "lr": 1e-3, "batch_size": 2, "precision": "fp32",
                  "output_dir": str(tmp_path / "runs")}})
    code, text = cli("train", str(dpo), "--run-name", "dpo")
    assert code == 0, text
    assert "reward acc" in text  # the progress lines say how the preference is learnt
    assert "Answer briefly." in text  # the SFT version's system prompt, inherited and said so
    dpo_run = next((tmp_path / "runs").glob("dpo-*"))
    assert cli("registry", "add", str(dpo_run), "--name", "voice")[0] == 0
    v2 = Registry().get("voice@v2")
    assert v2.lineage["parent"] == "voice@v1" and v2.lineage["objective"] == "dpo"
    assert v2.lineage["provenance"] == {"studies": {"round-1": n_pairs}}
    code, text = cli("registry", "show", "voice@v2")
    assert code == 0 and "study 'round-1'" in text and "on top of voice@v1" in text and "dpo run" in text
    code, text = cli("generate", "voice@v2", "Tell me about fox.", "--max-new-tokens", "4")
    assert code == 0, text  # loads: the parent merged from the registry, hash-checked, then the DPO adapter
    code, text = cli("registry", "delete", "voice@v1")
    assert code != 0 and "base of voice@v2" in text


# ---------------------------------------------------------------- preference rows: reading and the audit
def test_preference_rows_in_every_shape(tmp_path):
    from skilltune.data.reader import read_file, write_jsonl as write_examples

    rows = [
        {"prompt": "Hi", "chosen": "Hello, we can help.", "rejected": "yo", "study": "s", "item_id": 3},
        {"system": "S", "prompt": "Q", "chosen": [{"role": "assistant", "content": "A"}],
         "rejected": {"role": "assistant", "content": "B"}},
        {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                      {"role": "user", "content": "c"}], "chosen": "d", "rejected": "e"},
        {"prompt": "x", "chosen": "same", "rejected": " same "},
        {"prompt": "x", "chosen": "", "rejected": "y"},
        {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}],
         "chosen": "d", "rejected": "e"},
        {"prompt": "x", "chosen": "a"},
        {"prompt": "x", "chosen": [{"role": "user", "content": "a"}], "rejected": "b"},
    ]
    report = read_file(write_jsonl(tmp_path / "p.jsonl", rows))
    assert report.format == "preference" and len(report.examples) == 3
    first, second, third = report.examples
    assert (first.completion, first.rejected, first.meta) == ("Hello, we can help.", "yo", {"study": "s", "item_id": 3})
    assert [t.role for t in second.turns] == ["system", "user", "assistant"] and second.rejected == "B"
    assert [t.train for t in third.turns] == [False, False, False, True]  # earlier answers are context only
    problems = {p.line: (p.field, p.kind) for p in report.problems}
    assert problems == {4: ("rejected", "identical_pair"), 5: ("chosen", "empty_field"),
                        6: ("messages[1]", "role_order"), 7: ("rejected", "missing_field"),
                        8: ("chosen.role", "role_order")}
    out = tmp_path / "again.jsonl"
    write_examples(out, report.examples)  # written back as preference rows, read back the same
    again = read_file(out)
    assert [(e.turns, e.rejected) for e in again.examples] == [(e.turns, e.rejected) for e in report.examples]


def test_audit_of_preference_pairs(tmp_path):
    from skilltune.data.audit import audit_file

    rows = [{"prompt": f"Question {i}?", "chosen": f"A long and careful answer number {i} that we wrote.",
             "rejected": f"short {i}"} for i in range(12)]
    rows += [{"prompt": "Question 0?", "chosen": "short 0", "rejected": rows[0]["chosen"]},  # contradicts row 1
             rows[1],  # the same pair again
             {"prompt": "Mail me", "chosen": "We will write to you soon.", "rejected": "at bob@example.com"}]
    test = write_jsonl(tmp_path / "test.jsonl", [{"prompt": "Question 5?", "completion": "x"}])
    rep = audit_file(write_jsonl(tmp_path / "p.jsonl", rows), test=str(test))
    by = {r.name: r for r in rep.results}
    assert "conflicting_completions" not in by and "balance" not in by  # SFT-only checks step aside
    assert by["contradicting_pairs"].status == "FAIL" and by["contradicting_pairs"].count == 1
    assert "p.jsonl:1" in by["contradicting_pairs"].findings[0].where
    assert by["duplicates"].stats["exact_groups"] == 1
    bias = by["length_bias"]
    assert bias.status == "WARN" and bias.stats["chosen_longer_share"] > 0.75 and bias.stats["mean_length_ratio"] > 1.5
    assert by["leakage"].status == "FAIL" and by["leakage"].count == 1
    assert any("rejected answer" in f.message for f in by["pii_secrets"].findings)
    balanced = [{"prompt": f"Q{i}", "chosen": ("short" if i % 2 else "a much longer answer here"),
                 "rejected": ("a much longer answer here" if i % 2 else "short")} for i in range(12)]
    rep = audit_file(write_jsonl(tmp_path / "b.jsonl", balanced))
    assert {r.name: r.status for r in rep.results}["length_bias"] == "PASS"


_DDP_SCRIPT = """
import sys
from skilltune.config import load_config
from skilltune.train.loop import train
train(load_config(sys.argv[1]), run_dir=sys.argv[2])
"""


def test_dpo_on_two_processes_equals_one(tmp_path, tiny_model_dir):
    """DPO under DDP (2 CPU processes, gloo): the step is still the mean over all its pairs, the reference
    table the same on every process, and the rewards summed over processes."""
    import os
    import subprocess
    import sys

    from safetensors.torch import load_file

    configs = {}
    for name, accum in (("one", 2), ("two", 1)):
        _dpo_config(tmp_path / name, tiny_model_dir, val_split=0.0, batch_size=2, grad_accum=accum, epochs=1)
        configs[name] = tmp_path / name / "c.yaml"
    script = tmp_path / "ddp_dpo.py"
    script.write_text(_DDP_SCRIPT)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script)]
    for cmd in ([sys.executable, str(script), str(configs["one"]), str(tmp_path / "r1")],
                [*torchrun, str(configs["two"]), str(tmp_path / "r2")]):
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    a = load_file(str(tmp_path / "r1" / "adapter" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "r2" / "adapter" / "adapter_model.safetensors"))
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-4
    m1 = [json.loads(x) for x in (tmp_path / "r1" / "metrics.jsonl").read_text().splitlines()]
    m2 = [json.loads(x) for x in (tmp_path / "r2" / "metrics.jsonl").read_text().splitlines()]
    assert len(m1) == len(m2) == 4
    for x, y in zip(m1, m2):
        assert abs(x["train_loss"] - y["train_loss"]) < 1e-4 and x["reward_accuracy"] == y["reward_accuracy"]


@pytest.mark.parametrize("method", ["dora", "full"])
def test_dpo_with_other_methods_starts_at_the_reference_and_learns(tmp_path, tiny_model_dir, method):
    from skilltune.train.loop import train

    cfg = _dpo_config(tmp_path, tiny_model_dir, epochs=2)
    cfg = cfg.model_copy(update={"adapter": cfg.adapter.model_copy(update={"method": method})})
    result = train(cfg, run_name=method)
    metrics = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert abs(metrics[0]["train_loss"] - math.log(2)) < 1e-4  # the reference is the starting model
    assert metrics[-1]["train_loss"] < metrics[0]["train_loss"]
    assert (result.run_dir / ("model" if method == "full" else "adapter")).is_dir()
