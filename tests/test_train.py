"""Training on the tiny model: run directory, correctness (packing, EOS, determinism), resume, DDP, bad input."""

import json
import shutil
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import SQL_ROWS, cli, encode_rows, write_jsonl, write_yaml

from skilltune.train.methods import METHODS
from safetensors.torch import load_file

from skilltune.config import load_config
from skilltune.errors import TrainingError
from skilltune.train.loop import TrainingInterrupted, train


def _config(tmp_path, model_dir, rows=SQL_ROWS, **train_over):
    data = write_jsonl(tmp_path / "data" / "train.jsonl", rows)
    train_cfg = {"epochs": 3, "batch_size": 2, "lr": 5e-3, "save_steps": 4, "output_dir": str(tmp_path / "runs"),
                 "max_seq_len": 128, "logging_steps": 1, "precision": "fp32", **train_over}
    return write_yaml(tmp_path / "cfg.yaml", {"model": {"base": str(model_dir)}, "data": {"train": str(data)},
                                              "train": train_cfg})


def _adapter(run_dir: Path) -> dict:
    return load_file(str(run_dir / "adapter" / "adapter_model.safetensors"))


def test_lora_run_directory_and_loss_goes_down(tmp_path, tiny_model_dir):
    rows = [{"prompt": f"Say {w}.", "completion": w} for w in ("hi", "yes", "no", "ok", "fox", "dog")] * 2
    cfg = load_config(_config(tmp_path, tiny_model_dir, rows=rows, epochs=10, lr=3e-2))
    res = train(cfg, run_name="t")
    run = res.run_dir
    for name in ("config.yaml", "run.json", "metrics.jsonl", "summary.json", "loss.png", "tensorboard",
                 "adapter/adapter_config.json", "adapter/adapter_model.safetensors", "adapter/tokenizer.json",
                 "adapter/skilltune_adapter.json"):
        assert (run / name).exists(), name
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    tok_cfg = json.loads((run / "adapter" / "tokenizer_config.json").read_text())
    assert "chat_template" in tok_cfg or (run / "adapter" / "chat_template.jinja").is_file()
    meta = json.loads((run / "run.json").read_text())
    assert meta["identity"]["data"]["train"]["sha256"] and meta["base_model"]["hash"]
    assert meta["environment"]["packages"]["torch"]
    losses = [json.loads(x)["train_loss"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3 * 0.95  # a random 2-layer model learns slowly with LoRA
    # Plain peft loads the adapter.
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(str(tiny_model_dir))
    model = PeftModel.from_pretrained(base, str(run / "adapter"))
    assert sum(p.numel() for n, p in model.named_parameters() if "lora_" in n) == res.summary["trainable_params"]


def test_packed_and_padded_losses_agree(tiny_model_dir):
    from skilltune.config.schema import AdapterConfig, ModelConfig
    from skilltune.data.tokenize import encode_example
    from skilltune.data.types import Example, Turn
    from skilltune.model.loading import load_model
    from skilltune.model.tokenizer import turn_end_token
    from skilltune.train.batches import collate
    from skilltune.train.loss import CompletionLoss
    from skilltune.train.methods import METHODS

    lm = load_model(ModelConfig(base=str(tiny_model_dir)))
    model = METHODS["lora"].wrap(lm.model, AdapterConfig())
    tok = lm.tokenizer
    items = [encode_example(tok, Example([Turn("user", r["prompt"]), Turn("assistant", r["completion"], True)]),
                            turn_end_token(tok)) for r in SQL_ROWS[:6] + [{"prompt": "x", "completion": "y " * 40}]]
    loss_fn = CompletionLoss(model, None).eval()
    with torch.no_grad():
        packed = collate(items, tok.pad_token_id, True, 512)
        padded = collate(items, tok.pad_token_id, False, 512)
        assert packed["input_ids"].shape[0] < padded["input_ids"].shape[0]  # it really packed
        lp, lu = loss_fn(**packed).item(), loss_fn(**padded).item()
        # and the same as the model's own loss, one example at a time
        ref = 0.0
        for e in items:
            out = lm.model(input_ids=torch.tensor([e.input_ids]), labels=torch.tensor([e.labels]))
            ref += out.loss.item() * sum(1 for x in e.labels[1:] if x != -100)
    assert lp == pytest.approx(lu, rel=1e-5)
    assert lp == pytest.approx(ref, rel=1e-4)


def test_same_config_same_adapter(tmp_path, tiny_model_dir):
    cfg = load_config(_config(tmp_path, tiny_model_dir, epochs=2))
    a = _adapter(train(cfg, run_name="a").run_dir)
    b = _adapter(train(cfg, run_name="b").run_dir)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("template", [None, "plain"], ids=["own template", "built-in plain"])
def test_model_learns_to_stop(tmp_path, tiny_model_dir, template):
    """After training, generation ends with the EOS token instead of running to max_new_tokens."""
    rows = [{"prompt": f"Say {w}.", "completion": w} for w in ("hi", "yes", "no", "ok", "fox", "dog")] * 4
    cfg = load_config(_config(tmp_path, tiny_model_dir, rows=rows, epochs=15, lr=1e-2, batch_size=4),
                      ["adapter.method=full", "data.val_split=0"] + ([f"model.chat_template={template}"] * bool(template)))
    res = train(cfg, run_name="stop")
    if template:  # the run, and the artifact eval and serving load, carry the built-in template
        assert json.loads((res.run_dir / "run.json").read_text())["tokenizer"]["chat_template_source"] == "builtin:plain"
    from skilltune.model.generate import generate
    from skilltune.model.target import load_target

    target = load_target(str(res.run_dir))
    prompts = [target.tokenizer.apply_chat_template([{"role": "user", "content": f"Say {w}."}], tokenize=False,
                                                    add_generation_prompt=True) for w in ("hi", "fox")]
    if template:
        assert prompts[0].endswith("Question: Say hi.\nAnswer:\n")
    outs = generate(target.model, target.tokenizer, prompts, max_new_tokens=30)
    assert all(o.stopped for o in outs), [o.text for o in outs]
    assert [o.text for o in outs] == ["hi", "fox"]


def test_interrupt_saves_checkpoint_and_resume_matches_uninterrupted(tmp_path, tiny_model_dir):
    cfg = load_config(_config(tmp_path, tiny_model_dir, epochs=4))
    full = train(cfg, run_name="full")
    with pytest.raises(TrainingInterrupted) as err:
        train(cfg, run_name="cut", stop_after=5)
    assert "--resume" in str(err.value)
    run = sorted((tmp_path / "runs").glob("cut-*"))[0]
    assert (run / "checkpoints" / "step-000005" / "COMPLETE").is_file()
    resumed = train(cfg, run_name="cut", resume=True)
    assert resumed.run_dir == run
    a, b = _adapter(full.run_dir), _adapter(run)
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-5
    lrs_full = [json.loads(x)["lr"] for x in (full.run_dir / "metrics.jsonl").read_text().splitlines()]
    lrs_cut = [json.loads(x)["lr"] for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert lrs_cut == pytest.approx(lrs_full)  # the schedule did not restart


def test_sigkill_mid_run_then_resume(tmp_path, tiny_model_dir):
    cfg_path = _config(tmp_path, tiny_model_dir, epochs=60, save_steps=10, logging_steps=50)
    cfg = load_config(cfg_path)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    run_dir = tmp_path / "runs" / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "skilltune.cli.main", "train", str(cfg_path),
                             "--run-dir", str(run_dir)], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not list((run_dir / "checkpoints").glob("step-*/COMPLETE")):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = sorted((run_dir / "checkpoints").glob("step-*/COMPLETE"))
    assert done, "no checkpoint was written before the kill"
    assert not (run_dir / "adapter").exists(), "the run finished before it could be killed; make it longer"
    resumed = train(cfg, resume=True, run_dir=run_dir)
    full = train(cfg, run_name="ref")
    a, b = _adapter(full.run_dir), _adapter(resumed.run_dir)
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-5


def test_resume_refuses_changed_config_unless_forced(tmp_path, tiny_model_dir):
    cfg = load_config(_config(tmp_path, tiny_model_dir, epochs=4))
    with pytest.raises(TrainingInterrupted):
        train(cfg, run_name="r", stop_after=3)
    changed = load_config(_config(tmp_path, tiny_model_dir, epochs=4, lr=1e-3))
    with pytest.raises(TrainingError, match=r"train.lr: 0.005 -> 0.001"):
        train(changed, run_name="r", resume=True)
    res = train(changed, run_name="r", resume=True, force=True)
    assert res.summary["steps"] == res.summary["total_steps"]


def test_resume_refuses_a_changed_chat_template(tmp_path, tiny_model_dir):
    """The rendered text is part of what a checkpoint resumes: a template that changed with no config field (the
    model's own edited, a default changed by an upgrade) is refused, naming it; a checkpoint from before the
    template was recorded is checked against its run record's template source."""
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    cfg = load_config(_config(tmp_path, model, epochs=4))
    with pytest.raises(TrainingInterrupted):
        train(cfg, run_name="r", stop_after=5)
    tok_file = model / "tokenizer_config.json"
    original = tok_file.read_text()
    tok = json.loads(original)
    jinja = model / "chat_template.jinja"
    if jinja.is_file():
        jinja.write_text(jinja.read_text().replace("<|im_start|>", "<|im_start|> "))
    else:
        tok["chat_template"] = tok["chat_template"].replace("<|im_start|>", "<|im_start|> ")
        tok_file.write_text(json.dumps(tok))
    with pytest.raises(TrainingError, match=r"template.sha256: "):
        train(cfg, run_name="r", resume=True)
    tok_file.write_text(original)
    if jinja.is_file():
        jinja.write_text(jinja.read_text().replace("<|im_start|> ", "<|im_start|>"))
    checkpoint = sorted((tmp_path / "runs").glob("r-*/checkpoints/step-*"))[-1]  # the one a resume starts from
    identity = json.loads((checkpoint / "identity.json").read_text())
    assert identity["template"]["source"] == "model"
    del identity["template"]  # as written before the template was part of it
    (checkpoint / "identity.json").write_text(json.dumps(identity))
    run_json = checkpoint.parent.parent / "run.json"
    record = json.loads(run_json.read_text())
    run_json.write_text(json.dumps({**record, "tokenizer": {**record["tokenizer"], "chat_template_source": "chatml"}}))
    with pytest.raises(TrainingError, match=r"template.source: 'chatml' -> 'model'"):
        train(cfg, run_name="r", resume=True)
    run_json.write_text(json.dumps(record))
    res = train(cfg, run_name="r", resume=True)  # the same source and end token: resumed (the text was not recorded)
    assert res.summary["steps"] == res.summary["total_steps"]


def test_early_stopping_and_validation(tmp_path, tiny_model_dir):
    cfg = load_config(_config(tmp_path, tiny_model_dir, epochs=40, lr=5e-2, eval_steps=1,
                              early_stopping_patience=2), ["data.val_split=0.25"])
    res = train(cfg, run_name="es")
    s = res.summary
    assert s["stopped_early"] and s["steps"] < s["total_steps"]
    vals = [json.loads(x) for x in (res.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert all("val_loss" in v for v in vals)
    assert s["best_val_loss"] == min(v["val_loss"] for v in vals)


@pytest.mark.parametrize("method", ["dora", "full"])
def test_other_methods_train(tmp_path, tiny_model_dir, method):
    cfg = load_config(_config(tmp_path, tiny_model_dir, epochs=1), [f"adapter.method={method}"])
    res = train(cfg, run_name=method)
    assert res.artifact_dir.name == ("model" if method == "full" else "adapter")
    if method == "dora":
        assert json.loads((res.artifact_dir / "adapter_config.json").read_text())["use_dora"] is True


def test_loraplus_gives_the_b_matrices_their_own_learning_rate(tmp_path, tiny_model_dir):
    """LoRA+: after one step from B = 0, Adam moves each B element by about its learning rate, so B at ratio 16 is
    16 x B at ratio 1; A (its gradient is zero while B is) does not move in either. Refused for a full finetune."""
    adapters = []
    for ratio in (1, 16):
        cfg = load_config(_config(tmp_path / str(ratio), tiny_model_dir, max_steps=1, lr=1e-3, warmup_ratio=0),
                          [f"train.loraplus_lr_ratio={ratio}"])
        adapters.append(_adapter(train(cfg, run_name=f"plus{ratio}").run_dir))
    one, sixteen = adapters
    b_names = [n for n in one if "lora_B" in n]
    assert b_names and all(one[n].abs().max() > 0 for n in b_names)
    for name in one:
        expected = one[name] * (16 if "lora_B" in name else 1)
        assert torch.allclose(sixteen[name], expected, rtol=1e-3, atol=1e-7), name
    code, out = cli("train", str(_config(tmp_path / "full", tiny_model_dir)), "--set", "adapter.method=full",
                    "--set", "train.loraplus_lr_ratio=16")
    assert code == 2 and "train.loraplus_lr_ratio: LoRA+ sets the learning rate of an adapter's B matrices" in out


def test_qlora_on_cpu_says_it_needs_a_gpu(tmp_path, tiny_model_dir):
    if torch.cuda.is_available():
        pytest.skip("has a GPU")
    cfg = load_config(_config(tmp_path, tiny_model_dir), ["adapter.method=qlora"])
    with pytest.raises(TrainingError, match="QLoRA needs a CUDA GPU") as err:
        train(cfg)
    assert "adapter.method: lora" in err.value.hint


def test_bad_inputs_fail_clearly_before_loading(tmp_path, tiny_model_dir):
    long_rows = SQL_ROWS + [{"prompt": "long", "completion": "word " * 300}]
    code, out = cli("train", str(_config(tmp_path, tiny_model_dir, rows=long_rows)))
    assert code == 1 and "longer than train.max_seq_len=128" in out and "train.jsonl:13" in out
    assert "Traceback" not in out
    path = _config(tmp_path, tiny_model_dir)
    code, out = cli("train", str(path), "--set", f"data.train={tmp_path}/nope.jsonl")
    assert code == 2 and "data file not found" in out
    val = write_jsonl(tmp_path / "val.jsonl", SQL_ROWS[:2])
    code, out = cli("train", str(path), "--set", f"data.val={val}")
    assert code == 1 and "also appear in the training data" in out


_DDP_SCRIPT = """
import sys
from skilltune.config import load_config
from skilltune.train.loop import TrainingInterrupted, train
cfg, run_dir, stop = load_config(sys.argv[1]), sys.argv[2], int(sys.argv[3])
cfg.data.val_split = 0
try:
    train(cfg, run_dir=run_dir, resume=stop < 0, stop_after=stop if stop > 0 else None)
except TrainingInterrupted:
    pass
"""


def test_two_processes_match_one_and_resume_exactly(tmp_path, tiny_model_dir):
    """Data-parallel with accumulation (2 CPU processes, gloo, grad_accum 2) equals 1 process with
    grad_accum 4; a 2-process run interrupted after a step and resumed (each process gets its own
    optimizer and RNG state back) equals the uninterrupted one."""
    rows = SQL_ROWS[:12]
    one = _config(tmp_path / "one", tiny_model_dir, rows=rows, epochs=2, batch_size=1, grad_accum=4)
    two = _config(tmp_path / "two", tiny_model_dir, rows=rows, epochs=2, batch_size=1, grad_accum=2)
    script = tmp_path / "ddp_train.py"
    script.write_text(_DDP_SCRIPT)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script)]
    for cmd in ([sys.executable, str(script), str(one), str(tmp_path / "r1"), "0"],
                [*torchrun, str(two), str(tmp_path / "r2"), "0"],
                [*torchrun, str(two), str(tmp_path / "cut"), "2"],
                [*torchrun, str(two), str(tmp_path / "cut"), "-1"]):
        r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert json.loads((tmp_path / "r2" / "run.json").read_text())["world_size"] == 2
    assert all((d / "state-rank1.pt").is_file() for d in (tmp_path / "cut" / "checkpoints").glob("step-*"))
    a, b, c = _adapter(tmp_path / "r1"), _adapter(tmp_path / "r2"), _adapter(tmp_path / "cut")
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-4
    assert max(float((b[k] - c[k]).abs().max()) for k in a) <= 1e-6
    metrics = [json.loads(x) for x in (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == list(range(1, 7))  # 12 rows / (2 processes x 2 x 1) x 2 epochs


def test_a_short_last_step_is_still_one_whole_optimizer_step(tmp_path, tiny_model_dir):
    """10 rows in micro-batches of 2 with grad_accum 2 make steps of 2, 2 and 1 micro-batches; the short
    one must still be an accumulation boundary (one optimizer step over its tokens), exactly as batches of
    4, 4 and 2 without accumulation."""
    rows = SQL_ROWS[:10]
    runs = {}
    for name, bs, accum in (("accum", 2, 2), ("whole", 4, 1)):
        cfg = load_config(_config(tmp_path / name, tiny_model_dir, rows=rows, epochs=2, batch_size=bs,
                                  grad_accum=accum, **{"save_steps": 100}))
        cfg.data.val_split = 0
        runs[name] = train(cfg, run_name=name)
    assert runs["accum"].summary["steps"] == runs["whole"].summary["steps"] == 6
    a, b = _adapter(runs["accum"].run_dir), _adapter(runs["whole"].run_dir)
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-5


def test_a_launcher_accumulation_count_that_differs_is_refused(tmp_path, tiny_model_dir, monkeypatch):
    monkeypatch.setenv("ACCELERATE_GRADIENT_ACCUMULATION_STEPS", "3")
    cfg = load_config(_config(tmp_path, tiny_model_dir, grad_accum=2))
    with pytest.raises(TrainingError, match="accumulates over 3 micro-batches .* train.grad_accum is 2"):
        train(cfg, run_name="gas")


def test_resuming_with_another_process_count_is_refused(tmp_path, tiny_model_dir):
    from skilltune.train import checkpoint as ckpt

    cfg = load_config(_config(tmp_path, tiny_model_dir, epochs=4))
    with pytest.raises(TrainingInterrupted):
        train(cfg, run_name="r", stop_after=2)
    step = sorted((tmp_path / "runs").glob("r-*/checkpoints/step-*"))[-1]
    with pytest.raises(TrainingError, match=r"written by 1 process\(es\); this run has 2") as err:
        ckpt.load_checkpoint(step, None, None, rank=1, world_size=2)
    assert "--nproc 1" in err.value.hint


def test_not_enough_disk_is_refused_before_training(tmp_path, tiny_model_dir, monkeypatch):
    import shutil
    from collections import namedtuple

    Usage = namedtuple("Usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: Usage(10**9, 10**9 - 1000, 1000))
    cfg = load_config(_config(tmp_path, tiny_model_dir))
    with pytest.raises(TrainingError, match="not enough disk space"):
        train(cfg, run_name="disk")
    run = sorted((tmp_path / "runs").glob("disk-*"))[0]
    assert not (run / "checkpoints").exists()


def test_a_disk_that_fills_mid_run_is_a_message_and_resume_continues_exactly(tmp_path, tiny_model_dir, monkeypatch):
    from safetensors import SafetensorError

    from skilltune.train import checkpoint

    cfg = load_config(_config(tmp_path, tiny_model_dir, epochs=4))
    full = train(cfg, run_name="full")
    real_save, calls = checkpoint.save_file, []

    def fills_up(*args, **kwargs):  # the second checkpoint meets a full disk, as safetensors reports it
        calls.append(1)
        if len(calls) == 2:
            raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
        return real_save(*args, **kwargs)

    monkeypatch.setattr(checkpoint, "save_file", fills_up)
    with pytest.raises(TrainingError) as err:
        train(cfg, run_name="full-disk")
    run = sorted((tmp_path / "runs").glob("full-disk-*"))[0]
    assert "the disk filled up" in err.value.message and "step-000004, is intact" in err.value.message
    assert f"--resume --run-dir {run}" in err.value.hint
    assert [p.name for p in (run / "checkpoints").iterdir()] == ["step-000004"]  # no half-written step-000008
    monkeypatch.setattr(checkpoint, "save_file", real_save)  # space freed
    train(cfg, run_dir=run, resume=True)
    a, b = _adapter(full.run_dir), _adapter(run)
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-5


def test_a_run_directory_is_trained_by_one_process_at_a_time(tmp_path, tiny_model_dir):
    """A second `--resume` while the first still trains (two terminals, a scheduler's retry) is refused: the two
    would interleave checkpoints and metrics. The lock goes with the process, so after a kill resume works."""
    cfg_path = _config(tmp_path, tiny_model_dir, epochs=200, save_steps=5, logging_steps=50)
    run = tmp_path / "runs" / "locked"
    first = subprocess.Popen([sys.executable, "-m", "skilltune.cli.main", "train", str(cfg_path), "--run-dir", str(run)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while not list(run.glob("checkpoints/step-*/COMPLETE")) and time.time() < deadline:
            time.sleep(0.2)
        code, out = cli("train", str(cfg_path), "--resume", "--run-dir", str(run))
        assert code == 1 and f"is being trained by another process (pid {first.pid})" in out, out
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    with pytest.raises(TrainingInterrupted):  # the kill released the lock: resuming takes it
        train(load_config(cfg_path), run_dir=run, resume=True, stop_after=1)
    with pytest.raises(TrainingInterrupted):  # and train() released it again when it ended
        train(load_config(cfg_path), run_dir=run, resume=True, stop_after=1)


@pytest.mark.parametrize("err,needles", [
    ((28, "No space left on device"), ("the disk is full (", "free space and run the command again")),
    ((13, "Permission denied"), ("permission denied (", "fix that path's permissions")),
    ((30, "Read-only file system"), ("the file system is read-only (", "write to a writable folder")),
], ids=["disk full", "permission denied", "read-only"])
def test_a_file_system_refusal_in_any_command_is_a_message_not_a_traceback(tmp_path, monkeypatch, err, needles):
    from skilltune.data import ops

    def refuse(path, text):  # as root a real chmod would not refuse, so the OS error is raised as the OS would
        raise OSError(err[0], err[1], str(path))

    monkeypatch.setattr(ops, "atomic_write_text", refuse)
    data = write_jsonl(tmp_path / "in.jsonl", SQL_ROWS)
    code, out = cli("data", "split", str(data), "--out-dir", str(tmp_path / "out"))
    assert code == 1, out
    assert all(n in out for n in needles) and str(tmp_path / "out") in out and "Traceback" not in out


@pytest.mark.parametrize("layout,kernels", [("cache", False), ("cache", True), ("packed", True)])
def test_shared_prefix_layout_gives_the_same_loss_and_gradients(tiny_model_dir, layout, kernels):
    from skilltune.config.schema import AdapterConfig, ModelConfig
    from skilltune.model.loading import load_model
    from skilltune.train.batches import MIN_SHARED_PREFIX, collate, shared_prefix_len
    from skilltune.train.kernels import install_kernels
    from skilltune.train.loss import CompletionLoss, supports_shared_prefix

    lm = load_model(ModelConfig(base=str(tiny_model_dir)))
    torch.manual_seed(0)
    model = METHODS["lora"].wrap(lm.model, AdapterConfig(r=4, alpha=8))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.1)
    if kernels:
        install_kernels(model)
    assert supports_shared_prefix(model, gradient_checkpointing=False)
    assert not supports_shared_prefix(model, gradient_checkpointing=True)
    tok = lm.tokenizer
    system = "You are a helpful assistant. Please answer politely and concisely."
    rows = SQL_ROWS[:5] + [{"prompt": "x", "completion": "y " * 30}]
    items = encode_rows(tok, rows, system)
    prefix = shared_prefix_len(items)
    assert prefix >= MIN_SHARED_PREFIX
    loss_fn = CompletionLoss(model, None)

    def loss_and_grads(batch):
        model.zero_grad(set_to_none=True)
        loss = loss_fn(**batch)
        loss.backward()
        return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    shared = collate(items, tok.pad_token_id, True, 512, share_prefix=layout)
    rest = max(len(e.input_ids) for e in items) - prefix
    if layout == "cache":
        assert shared["prefix_ids"].shape == (1, prefix) and shared["input_ids"].shape == (len(items), rest)
    else:  # one row: the prefix once, then the remainders, padded to a multiple of PACKED_ROW_MULTIPLE
        from skilltune.train.batches import PACKED_ROW_MULTIPLE

        real = prefix + sum(len(e.input_ids) - prefix for e in items)
        width = shared["input_ids"].shape[1]
        assert width % PACKED_ROW_MULTIPLE == 0 and real <= width < real + PACKED_ROW_MULTIPLE
        assert shared["input_ids"][0, :prefix].tolist() == items[0].input_ids[:prefix]
        lengths = [len(e.input_ids) - prefix for e in items]
        assert shared["segments"].tolist() == lengths  # the padding after them belongs to no remainder
        assert shared["labels"][0, real:].eq(-100).all() and width > real  # this batch has padding to keep out
    ls, gs = loss_and_grads(shared)
    lu, gu = loss_and_grads(collate(items, tok.pad_token_id, False, 512))
    assert ls == pytest.approx(lu, rel=1e-5)
    for name in gu:
        torch.testing.assert_close(gs[name], gu[name], rtol=1e-4, atol=1e-6, msg=name)

    # Training on the inputs puts labels in the prefix: no sharing, the ordinary layout.
    trained_inputs = encode_rows(tok, rows, system, train_on_inputs=True)
    assert shared_prefix_len(trained_inputs) < MIN_SHARED_PREFIX
    plain = collate(trained_inputs, tok.pad_token_id, True, 512, share_prefix=layout)
    assert "prefix_ids" not in plain and "shared_prefix" not in plain


def test_packed_layout_refuses_to_run_without_the_attention_kernel(tiny_model_dir):
    from skilltune.config.schema import ModelConfig
    from skilltune.model.loading import load_model
    from skilltune.train.batches import collate
    from skilltune.train.loss import CompletionLoss

    lm = load_model(ModelConfig(base=str(tiny_model_dir)))
    items = encode_rows(lm.tokenizer, SQL_ROWS[:3], system="You are a helpful assistant. Please answer politely.")
    batch = collate(items, lm.tokenizer.pad_token_id, True, 512, share_prefix="packed")
    assert "shared_prefix" in batch
    with pytest.raises(RuntimeError, match="attention kernel"):
        CompletionLoss(lm.model, None)(**batch)


def test_run_with_a_system_prompt_shares_it_and_records_the_kernels(tmp_path, tiny_model_dir):
    system = "You are a helpful assistant. Please answer politely and concisely."
    cfg = load_config(_config(tmp_path, tiny_model_dir, epochs=1, batch_size=4, max_seq_len=256),
                      [f"data.system_prompt={system}"])
    res = train(cfg, run_name="shared")
    meta = json.loads((res.run_dir / "run.json").read_text())
    assert meta["kernels"] == {"lora_linear": 14, "rms_norm": 5, "attention": 2}
    assert meta["share_prefix"] == "packed"
    s = res.summary
    assert 0 < s["computed_tokens"] < s["tokens"]  # the system prompt ran once per micro-batch
    assert s["final_val_loss"] is not None  # validation ran through the same layout
    off = train(load_config(_config(tmp_path / "off", tiny_model_dir, epochs=1, batch_size=4, max_seq_len=256),
                            [f"data.system_prompt={system}", "train.kernels=false", "train.share_prefix=false"]),
                run_name="stock")
    assert json.loads((off.run_dir / "run.json").read_text())["kernels"] == {}
    cache = train(load_config(_config(tmp_path / "cache", tiny_model_dir, epochs=1, batch_size=4, max_seq_len=256),
                              [f"data.system_prompt={system}", "train.kernels=false"]), run_name="cache")
    assert json.loads((cache.run_dir / "run.json").read_text())["share_prefix"] == "cache"
    # the two-pass layout computes the prefix once per micro-batch, then the remainders padded to the
    # longest; the packed layout the prefix once and the remainders back to back, rounded up to 64
    from skilltune.model.loading import load_tokenizer
    from skilltune.train.batches import StepPlan, collate
    from skilltune.train.prepare import prepare_data

    ccfg = load_config(cache.run_dir / "config.yaml")
    tok = load_tokenizer(ccfg.model)[0]
    data = prepare_data(ccfg, tok)
    plan = StepPlan(len(data.train), ccfg.train.batch_size, 1, 1, ccfg.train.seed)
    expected = {"cache": 0, "packed": 0}
    for step in range(cache.summary["steps"]):
        for mb in plan.micro_batches(step):
            items = [data.train[i] for i in mb]
            for layout in expected:
                batch = collate(items, tok.pad_token_id, True, 256, layout)
                expected[layout] += batch["input_ids"].numel() + (batch["prefix_ids"].numel()
                                                                  if "prefix_ids" in batch else 0)
    assert cache.summary["computed_tokens"] == expected["cache"]
    assert s["computed_tokens"] == expected["packed"]
    assert off.summary["computed_tokens"] >= off.summary["tokens"]
    # fp32: the optimised run follows the stock run closely
    assert s["final_train_loss"] == pytest.approx(off.summary["final_train_loss"], rel=1e-3)


def test_neftune_noises_the_embeddings_in_training_mode_only(tiny_model_dir):
    """The hook the loop installs: noise of the configured size while training, none in eval mode or after undo."""
    from skilltune.train.loop import _embedding_noise
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    emb = model.get_input_embeddings()
    ids = torch.tensor([[1, 5, 9, 12, 3]])
    clean = emb(ids).detach()
    undo = _embedding_noise(model, 5.0)
    model.train()
    noisy_a, noisy_b = emb(ids).detach(), emb(ids).detach()
    bound = 5.0 / (ids.shape[1] * clean.shape[-1]) ** 0.5
    assert 0 < float((noisy_a - clean).abs().max()) <= bound * (1 + 1e-6)
    assert not torch.equal(noisy_a, noisy_b)  # fresh noise each pass
    model.eval()
    assert torch.equal(emb(ids).detach(), clean)  # validation and evaluation see the clean embeddings
    undo()
    model.train()
    assert torch.equal(emb(ids).detach(), clean) and not hasattr(emb, "neftune_noise_alpha")


def test_neftune_changes_training_and_resumes_exactly(tmp_path, tiny_model_dir):
    plain = train(load_config(_config(tmp_path, tiny_model_dir, epochs=4)), run_name="plain")
    cfg = load_config(_config(tmp_path, tiny_model_dir, epochs=4, neftune_noise_alpha=5.0))
    noisy = train(cfg, run_name="noisy")
    a, b = _adapter(plain.run_dir), _adapter(noisy.run_dir)
    assert max(float((a[k] - b[k]).abs().max()) for k in a) > 1e-4  # the noise reached the training steps
    with pytest.raises(TrainingInterrupted):
        train(cfg, run_name="cut", stop_after=5)
    run = sorted((tmp_path / "runs").glob("cut-*"))[0]
    resumed = train(cfg, run_name="cut", resume=True)
    assert resumed.run_dir == run
    c = _adapter(resumed.run_dir)
    assert max(float((b[k] - c[k]).abs().max()) for k in b) <= 1e-5  # the same noise after the restart


def test_neftune_is_refused_outside_supervised_finetuning(tmp_path):
    from skilltune.errors import ConfigError

    path = write_yaml(tmp_path / "c.yaml", {"data": {"train": "pairs.jsonl"},
                                            "train": {"objective": "dpo", "neftune_noise_alpha": 5}})
    with pytest.raises(ConfigError, match=r"neftune_noise_alpha.*'dpo'.*train.objective: sft"):
        load_config(path)
    with pytest.raises(ConfigError, match="neftune_noise_alpha"):
        load_config(None, ["train.neftune_noise_alpha=0"])
