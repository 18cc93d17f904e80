"""GPU paths nobody can run on the CI machine: `make gpu-check` runs these on one CUDA GPU (under 8 minutes).

Without CUDA every test here is skipped with the reason. What they exercise: QLoRA (bitsandbytes 4-bit) on
the embedded model, DPO, bf16 and fp16 training (fp16 with accelerate's loss scaling), a 1-GPU FSDP run through
`accelerate launch`, a merged export, and `serve --engine vllm` answering one request.
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import SQL_ROWS, write_jsonl, write_yaml

torch = pytest.importorskip("torch")

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run `make gpu-check` on one)")]

ROOT = Path(__file__).parents[1]


def _config(tmp_path, **train) -> Path:
    data = write_jsonl(tmp_path / "train.jsonl", SQL_ROWS * 4)
    return write_yaml(tmp_path / "c.yaml", {"data": {"train": str(data), "val_split": 0},
                                            "train": {"max_steps": 3, "batch_size": 4, "save_steps": 3,
                                                      "output_dir": str(tmp_path / "runs"), **train}})


def _train(cfg_path: Path, *overrides: str):
    from skilltune.config import load_config
    from skilltune.train.loop import train

    return train(load_config(cfg_path, list(overrides)), run_name="gpu")


@pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None, reason="bitsandbytes is not installed")
def test_qlora_on_the_embedded_model(tmp_path):
    res = _train(_config(tmp_path), "adapter.method=qlora")
    assert res.summary["steps"] == 3 and res.summary["final_train_loss"] == res.summary["final_train_loss"]
    assert (res.artifact_dir / "adapter_model.safetensors").is_file()


def test_dpo_on_the_embedded_model(tmp_path):
    """DPO on CUDA (the attention goes through SDPA with the 4-D pair mask): step 1 is log 2, then it learns."""
    import math

    rows = [{"prompt": r["prompt"], "chosen": r["completion"], "rejected": r["completion"][::-1] + "!"}
            for r in SQL_ROWS * 4]
    cfg = _config(tmp_path, objective="dpo", lr=5e-4)
    write_jsonl(tmp_path / "train.jsonl", rows)
    res = _train(cfg)
    losses = [json.loads(x)["train_loss"] for x in open(res.run_dir / "metrics.jsonl") if "train_loss" in x]
    assert abs(losses[0] - math.log(2)) < 1e-2 and losses[-1] < losses[0]


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_training(tmp_path, precision):
    if precision == "bf16" and not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bf16")
    res = _train(_config(tmp_path, precision=precision))
    losses = [json.loads(x)["train_loss"] for x in open(res.run_dir / "metrics.jsonl") if "train_loss" in x]
    assert res.summary["precision"] == precision and len(losses) == 3
    assert all(x == x and x < 100 for x in losses)  # finite: fp16 runs with loss scaling, no overflow to inf/nan


def test_fsdp_on_one_gpu_through_accelerate_launch(tmp_path):
    cfg = _config(tmp_path, precision="bf16" if torch.cuda.is_bf16_supported() else "fp32")
    proc = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                           str(ROOT / "examples" / "accelerate" / "fsdp.yaml"), "--num_processes", "1",
                           "-m", "skilltune.cli.main", "train", str(cfg)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    [run] = (tmp_path / "runs").glob("c-*")
    assert (run / "adapter" / "adapter_model.safetensors").is_file()
    assert (run / "checkpoints" / "step-000003" / "COMPLETE").is_file()


@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vllm is not installed")
def test_export_and_vllm_answer_one_request(tmp_path):
    import httpx

    from skilltune.registry.api import Registry
    from skilltune.export.build import ExportRequest, export
    from skilltune.serve.server import vllm_command

    res = _train(_config(tmp_path))
    reg = Registry()
    reg.add(res.run_dir, "gpu")
    merged = export(reg, ExportRequest("gpu@v1", tmp_path / "merged", "hf", check=False)).out
    assert (merged / "config.json").is_file()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = vllm_command(reg, "gpu@v1", "127.0.0.1", port) + ["--gpu-memory-utilization", "0.3"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env={**os.environ})
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            try:
                r = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", timeout=30, json={
                    "model": "gpu", "max_tokens": 8, "messages": [{"role": "user", "content": "List all users."}]})
                if r.status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(2)
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] is not None
    finally:
        proc.terminate()
        proc.wait(timeout=30)
