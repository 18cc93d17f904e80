from pathlib import Path

import pytest
from helpers import cli, write_yaml

from skilltune.config import load_config, parse_overrides
from skilltune.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


def test_defaults_need_only_the_data_file(tmp_path):
    cfg = load_config(write_yaml(tmp_path / "c.yaml", {"data": {"train": "train.jsonl"}}))
    assert cfg.model.base == "embedded:smollm2-135m-instruct"
    assert cfg.adapter.method == "lora" and cfg.adapter.r == 16 and cfg.adapter.alpha == 32
    assert cfg.data.train == str(tmp_path / "train.jsonl")  # relative to the config file


def test_all_errors_reported_together(tmp_path):
    path = write_yaml(tmp_path / "bad.yaml", {
        "adapter": {"method": "lorax"},
        "train": {"lr": -1, "batch_size": 0},
        "data": {"trian": "x.jsonl"},
    })
    with pytest.raises(ConfigError) as err:
        load_config(path)
    problems = err.value.problems
    assert len(problems) == 3  # the schema's errors, all at once
    text = str(err.value)
    for needle in ("train.lr", "-1", "train.batch_size", "data.trian", "unknown field"):
        assert needle in text
    # names are checked against the registries (a plug-in's method is valid), with what is allowed
    from skilltune.train.prepare import config_problems

    problems = config_problems(load_config(None, ["adapter.method=lorax"]))
    assert any("'lorax'" in p and "lora" in p for p in problems)


def test_cli_validate_lists_every_error_without_traceback(tmp_path):
    path = write_yaml(tmp_path / "bad.yaml", {"train": {"lr": "fast", "epochs": 0, "precision": "fp8"}})
    code, out = cli("config", "validate", str(path))
    assert code == 2
    assert "4 configuration errors" in out  # the schema's three and the missing data file, in one run
    assert "train.lr" in out and "train.epochs" in out and "train.precision" in out and "data.train: not set" in out
    assert "Traceback" not in out


@pytest.mark.parametrize("command", [("config", "validate"), ("train",)])
def test_schema_and_registry_errors_are_reported_in_one_run(tmp_path, command):
    # a wrong type, an unknown method, a base model that is not there and a missing data file: one run lists all
    path = write_yaml(tmp_path / "bad.yaml", {"data": {"train": "missing.jsonl"}, "train": {"lr": "fast"},
                                              "adapter": {"method": "lorra", "r": 0},
                                              "model": {"base": "embedded:nope"}})
    code, out = cli(*command, str(path))
    assert code == 2, out
    assert "5 configuration errors" in out
    for needle in ("train.lr", "adapter.r", "adapter.method: unknown method 'lorra'", "model.base: unknown embedded",
                   "data.train: data file not found"):
        assert needle in out
    assert "Traceback" not in out


def test_a_chat_template_is_jinja_or_a_built_in_name():
    from skilltune.train.prepare import config_problems

    for ok in ("plain", "chatml", "family", "{{ messages[0]['content'] }}"):
        assert not any("chat_template" in p for p in config_problems(load_config(None, [f"model.chat_template={ok}"])))
    problems = config_problems(load_config(None, ["model.chat_template=plian"]))
    assert any("model.chat_template: unknown built-in template 'plian' (known: plain, chatml, family)" in p
               for p in problems), problems


def test_a_field_the_schema_refuses_is_not_reported_twice(tmp_path):
    # data.train of the wrong type falls back to its default for the other checks, which must not add "not set"
    path = write_yaml(tmp_path / "bad.yaml", {"data": {"train": ["a", "b"]}})
    from skilltune.train.prepare import config_problems

    with pytest.raises(ConfigError) as err:
        load_config(path, checks=config_problems)
    assert len(err.value.problems) == 1 and err.value.problems[0].startswith("data.train:")


def test_model_problem_names_what_is_wrong_with_each_kind_of_source(tmp_path, monkeypatch):
    from skilltune.model.sources import model_problem

    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    assert model_problem("embedded:smollm2-135m-instruct") is None
    assert "unknown embedded model 'x'" in model_problem("embedded:x")
    assert "GGUF file not found" in model_problem(str(tmp_path / "m.gguf"))
    assert "no config.json" in model_problem(str(tmp_path))
    (tmp_path / "config.json").write_text("{}")
    assert model_problem(str(tmp_path)) is None
    assert "no model named 'never-registered'" in model_problem("never-registered@v1")
    assert "or in the local Hugging Face cache" in model_problem("someone/some-model")


def test_set_overrides_are_typed_and_validated(tmp_path):
    path = write_yaml(tmp_path / "c.yaml", {"train": {"lr": 1e-3}})
    cfg = load_config(path, ["train.lr=1e-4", "adapter.method=dora", "adapter.target_modules=[q_proj, v_proj]"])
    assert cfg.train.lr == pytest.approx(1e-4)
    assert cfg.adapter.method == "dora"
    assert cfg.adapter.target_modules == ["q_proj", "v_proj"]
    with pytest.raises(ConfigError, match="train.epochs"):
        load_config(path, ["train.epochs=-2"])
    with pytest.raises(ConfigError, match="SECTION.FIELD=VALUE"):
        parse_overrides(["nonsense"])


def test_yaml_syntax_error_names_the_line(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("train:\n  lr: 1e-4\n  epochs: [1,\n")
    with pytest.raises(ConfigError, match=r"broken.yaml:\d+"):
        load_config(path)


def test_config_show_prints_resolved_values(tmp_path):
    path = write_yaml(tmp_path / "c.yaml", {"train": {"epochs": 7}})
    code, out = cli("config", "show", str(path), "--set", "adapter.r=8")
    assert code == 0
    assert "epochs: 7" in out and "r: 8" in out and "base: embedded:smollm2-135m-instruct" in out


# examples/accelerate/ holds accelerate launcher configs (tests/test_accelerate_configs.py)
@pytest.mark.parametrize("path", sorted(p for p in ROOT.glob("examples/**/*.yaml") if "accelerate" not in p.parts),
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_every_example_config_validates(path):
    cfg = load_config(path)
    for f in (cfg.data.train, cfg.data.val, cfg.data.test):
        assert f is None or Path(f).is_file(), f"{path}: data file {f} is missing"


def test_example_configs_exist():
    assert list(ROOT.glob("examples/*/config.yaml")), "ship at least one example config"
