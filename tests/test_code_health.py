"""Code health (issue #21): the loop's state, registries as the one source of truth, and the GPU paths that
can be exercised on a CPU."""

from __future__ import annotations

import json

import pytest
from helpers import SQL_ROWS, cli, write_jsonl, write_yaml

from skilltune.config import load_config
from skilltune.errors import ConfigError, SkilltuneError


def test_loop_state_round_trips_and_reads_older_checkpoints():
    from skilltune.train.loop import LoopState

    state = LoopState(step=7, best_val=0.5, best_step=5, tokens=100, computed_tokens=60, train_time_s=1.5)
    assert LoopState.from_json(json.loads(json.dumps(state.to_json()))) == state
    old = {"step": 3, "best_val": None, "best_step": None, "bad_evals": 0, "stopped_early": False, "tokens": 9,
           "train_time_s": 0.1}  # written before computed_tokens existed
    assert LoopState.from_json(old).computed_tokens == 0


@pytest.mark.parametrize("field,value,needle", [
    ("adapter.method", "lorra", "unknown method 'lorra' (known: lora, dora, qlora, full"),
    ("data.format", "chatml", "unknown format 'chatml' (known: auto, preference, prompt_completion"),
    ("train.report_to", "[tensorbord]", "unknown tracker 'tensorbord' (known: tensorboard, wandb, mlflow)"),
])
def test_names_are_checked_against_the_registries(tmp_path, field, value, needle):
    data = write_jsonl(tmp_path / "t.jsonl", SQL_ROWS)
    cfg = write_yaml(tmp_path / "c.yaml", {"data": {"train": str(data)}})
    code, out = cli("config", "validate", str(cfg), "--no-data", "--set", f"{field}={value}")
    assert code == 2 and needle in " ".join(out.split()), out


def test_a_registered_plug_in_method_and_format_can_be_named_in_yaml(tmp_path, monkeypatch):
    from skilltune.data.formats import FORMATS
    from skilltune.train import methods
    from skilltune.train.prepare import config_problems

    monkeypatch.setitem(methods.METHODS, "mylora", methods.METHODS["lora"])
    monkeypatch.setitem(FORMATS, "myformat", FORMATS["prompt_completion"])
    data = write_jsonl(tmp_path / "t.jsonl", SQL_ROWS)
    cfg = load_config(write_yaml(tmp_path / "c.yaml", {"data": {"train": str(data), "format": "myformat"},
                                                       "adapter": {"method": "mylora"}}))
    assert config_problems(cfg) == []


def test_the_json_schema_metric_from_a_config(tmp_path, stopping_run_dir):
    schema = tmp_path / "schema.json"
    schema.write_text(json.dumps({"type": "object", "required": ["intent"]}))
    test = write_jsonl(tmp_path / "t.jsonl", [{"prompt": "Say hi.", "completion": '{"intent": "hi"}'}] * 3)
    code, out = cli("eval", str(stopping_run_dir), "--test", str(test), "--no-forgetting", "--metrics", "json_schema",
                    "--set", f"eval.json_schema={schema}", "--out", str(tmp_path / "o"))
    assert code == 0, out
    results = json.loads((tmp_path / "o" / "results.json").read_text())
    assert results["metrics"]["json_schema"]["tuned"] == 0.0  # the one-word model never writes JSON
    code, out = cli("config", "validate", str(write_yaml(tmp_path / "c.yaml", {
        "data": {"train": str(test)}, "eval": {"metrics": ["json_schema"]}})), "--no-data")
    assert code == 2 and "the json_schema metric needs it (set eval.json_schema)" in out


def test_fp16_is_refused_on_a_cpu_with_what_to_do(tmp_path, tiny_model_dir):
    import torch

    from skilltune.train.precision import choose_precision

    with pytest.raises(SkilltuneError, match="fp16 needs a CUDA GPU") as err:
        choose_precision("fp16", torch.device("cpu"))
    assert "bf16" in err.value.hint
    if not torch.cuda.is_available():
        assert choose_precision("auto", torch.device("cpu"))[0] in ("bf16", "fp32")


def test_gathered_trainable_state_is_the_models_own(tmp_path, tiny_model_dir):
    """What checkpoints save (through accelerate's get_state_dict) equals the trainable parameters, by name."""
    import torch

    from skilltune.train import checkpoint as ckpt
    from skilltune.train.loop import _gathered_trainable, setup
    from skilltune.train.reporter import Reporter

    data = write_jsonl(tmp_path / "t.jsonl", SQL_ROWS)
    cfg = load_config(write_yaml(tmp_path / "c.yaml", {"model": {"base": str(tiny_model_dir)},
                                                       "data": {"train": str(data)},
                                                       "train": {"precision": "fp32", "max_steps": 1,
                                                                 "output_dir": str(tmp_path / "runs")}}))
    s = setup(cfg, "g", False, None, False, Reporter())
    direct, gathered = ckpt.trainable_state(s.model), _gathered_trainable(s)
    assert direct.keys() == gathered.keys() and len(direct) > 0
    assert all(torch.equal(direct[k], gathered[k]) for k in direct)


def test_config_problems_are_reported_together(tmp_path):
    from skilltune.evaluate.metrics import metric_problems
    from skilltune.train.prepare import config_problems

    cfg = load_config(None, ["adapter.method=nope", "data.val=missing.jsonl", "eval.metrics=[sql_exec]"])
    problems = config_problems(cfg) + metric_problems(cfg.eval)
    assert len(problems) == 4  # data.train, data.val, method, eval.db
    with pytest.raises(ConfigError):
        from skilltune.train.prepare import preflight

        preflight(cfg)
