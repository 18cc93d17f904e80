"""First-run experience (issue #25): usage errors are messages, long steps report progress, output that
logs and editors can read, hints that work as printed, the demo outside the checkout."""

from __future__ import annotations

import io
import json
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import SQL_ROWS, cli, write_jsonl, write_yaml
from rich.console import Console


def _leaf_commands():
    """Every command path of the CLI with whether it takes a required argument (from the app itself)."""
    import typer

    from skilltune.cli.main import app

    root = typer.main.get_command(app)
    out = []

    def walk(cmd, path):
        subs = getattr(cmd, "commands", None)
        if subs:
            for name, sub in subs.items():
                walk(sub, path + [name])
        else:
            required = any(getattr(p, "required", False) and p.param_type_name == "argument" for p in cmd.params)
            out.append((path, required))

    walk(root, [])
    return out


LEAVES = _leaf_commands()


def test_every_command_is_covered():
    names = {" ".join(p) for p, _ in LEAVES}
    assert {"train", "eval", "data audit", "registry promote", "scorecard create", "serve", "checklist"} <= names
    assert len(LEAVES) >= 30


@pytest.mark.parametrize("path", [p for p, _ in LEAVES], ids=lambda p: " ".join(p))
def test_a_wrong_option_is_a_usage_message_with_exit_2(path):
    code, out = cli(*path, "--no-such-option")
    assert code == 2, out
    assert "No such option: --no-such-option" in out and "Usage: skilltune " + " ".join(path) in out
    assert "Traceback" not in out


@pytest.mark.parametrize("path", [p for p, req in LEAVES if req], ids=lambda p: " ".join(p))
def test_a_missing_argument_is_a_usage_message_with_exit_2(path):
    code, out = cli(*path)
    assert code == 2, out
    assert "Missing argument" in out and "Traceback" not in out


def _numeric_options():
    """(command path, option, its lower bound or None, the values its required parameters need) for every
    int/float option of the CLI."""
    import typing

    import typer

    from skilltune.cli.main import app

    out = []

    def walk(cmd, path):
        for name, sub in (getattr(cmd, "commands", None) or {}).items():
            walk(sub, path + [name])
        if getattr(cmd, "commands", None):
            return
        needed = [v for p in cmd.params if p.required
                  for v in ([p.opts[0], "x"] if p.param_type_name == "option" else ["x"])]
        for p in cmd.params:
            annotation = p.type_descriptor.annotation
            kind = next((a for a in typing.get_args(annotation) if a is not type(None)), annotation)
            if kind in (int, float):
                out.append((path, p.opts[0], p.min, needed))

    walk(typer.main.get_command(app), [])
    return out


NUMERIC = _numeric_options()
# checked where a lower bound cannot say it: any seed is a seed; the split fractions must sum below 1 and the mix
# ratio is a share (the command's own message); the server's flags pass its config schema (test above)
UNBOUNDED = {"--seed", "--val", "--test", "--ratio", "--port", "--max-tokens-limit", "--queue-size"}


def test_every_count_or_size_option_has_a_lower_bound():
    assert len(NUMERIC) >= 30
    unbounded = [(" ".join(path), opt) for path, opt, low, _ in NUMERIC if low is None and opt not in UNBOUNDED]
    assert unbounded == [], "give these options min= (a negative count is a traceback or a silent no-op)"


@pytest.mark.parametrize("path,opt,low,needed", [n for n in NUMERIC if n[2] is not None],
                         ids=lambda v: " ".join(v) if isinstance(v, list) and v and v[0] != "x" else None)
def test_a_value_below_an_options_bound_is_a_usage_message(path, opt, low, needed):
    code, out = cli(*path, *needed, opt, str(low - 1))
    assert code == 2, out
    assert f"Invalid value for '{opt}'" in out and "Traceback" not in out


@pytest.mark.parametrize("argv,needle", [
    (["nosuchcmd"], "No such command 'nosuchcmd'"),
    (["data", "audti", "x"], "Did you mean 'audit'?"),
    (["eval", "x", "--ouy", "y"], "(Possible options: --out)"),
    (["train", "--bogus"], "No such option: --bogus"),
    (["registry", "add"], "Missing argument"),
    (["export", "m@v1", "--fomat", "gguf"], "No such option: --fomat"),
])
def test_usage_errors_in_a_real_process(argv, needle):
    proc = subprocess.run([sys.executable, "-m", "skilltune.cli.main", *argv], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 2, proc.stderr
    assert needle in proc.stderr and "Usage: skilltune" in proc.stderr and "Traceback" not in proc.stderr


# ---------------------------------------------------------------- progress
def test_console_stages_print_lines_off_a_terminal():
    from skilltune.cli.common import ConsoleStages

    buf = io.StringIO()
    stages = ConsoleStages(Console(file=buf, width=60), every_s=0)
    with stages.stage("generating 3 answers with the base model", total=3) as advance:
        for _ in range(3):
            advance(1)
    lines = buf.getvalue().splitlines()
    assert lines[0] == "generating 3 answers with the base model (3) ..."
    assert lines[1].startswith("  generating 3 answers with the base model: 1/3 (") and "ETA" in lines[1]
    assert lines[-1].startswith("  generating 3 answers with the base model: done 3/3 in ")


def test_console_stages_draw_a_bar_on_a_terminal():
    from skilltune.cli.common import ConsoleStages

    buf = io.StringIO()
    with ConsoleStages(Console(file=buf, force_terminal=True, width=100)).stage("merging", total=2) as advance:
        advance(2)
    assert "merging" in buf.getvalue() and "2/2" in buf.getvalue()


# ---------------------------------------------------------------- machine-readable findings
def test_piped_audit_prints_one_greppable_line_per_finding(tmp_path):
    rows = [{"prompt": "Say hi to me please.", "completion": "hi"}] * 3 + [{"prompt": "mail bob@example.com", "completion": "ok"}]
    path = write_jsonl(tmp_path / "a-very-long-folder-name-that-would-wrap" / "train.jsonl", rows + ["{bad json"])
    code, out = cli("data", "audit", str(path), "--no-tokenizer")
    assert code == 1
    lines = out.splitlines()
    assert f"{path}:5: format: invalid JSON at column 2: Expecting property name enclosed in double quotes" in lines
    assert any(line.startswith(f"{path}:4: pii_secrets: ") for line in lines)
    assert f"{path}:1: duplicates: exact duplicate x3 (with {path}:2, {path}:3)" in lines
    assert lines[-1].startswith(f"{path}: ") and "error(s)" in lines[-1]


# ---------------------------------------------------------------- hints that work as printed
def test_train_next_line_is_a_command_that_works(tmp_path, tiny_model_dir, monkeypatch):
    data = write_jsonl(tmp_path / "train.jsonl", SQL_ROWS)
    test = write_jsonl(tmp_path / "test.jsonl", SQL_ROWS[:3])
    cfg = write_yaml(tmp_path / "c.yaml", {"model": {"base": str(tiny_model_dir)},
                                           "data": {"train": str(data), "test": str(test)},
                                           "train": {"max_steps": 2, "batch_size": 4, "precision": "fp32",
                                                     "output_dir": str(tmp_path / "runs")},
                                           "eval": {"max_new_tokens": 4}})
    code, out = cli("train", str(cfg))
    assert code == 0, out
    assert "chat template" in out and "model; each answer ends with <|im_end|>" in out  # the plan says which
    [nxt] = [line for line in out.splitlines() if line.startswith("next: ")]
    assert "--test" not in nxt  # the config names its test set
    argv = shlex.split(nxt[len("next: "):])
    assert argv[0] == "skilltune"
    code, out = cli(*argv[1:], "--no-forgetting")
    assert code == 0, out
    assert "generating 3 answers with the base model" in out and "eval: exact_match: base" in out


def test_eval_of_a_path_that_does_not_exist_says_so(tmp_path):
    code, out = cli("eval", str(tmp_path / "runs" / "typo"))
    assert code == 1 and "is not a run directory" in out and "no test set" not in out


# ---------------------------------------------------------------- the demo outside the checkout
def test_examples_are_found_in_the_installed_share_folder(tmp_path, monkeypatch):
    import shutil

    from skilltune import demo

    prefix = tmp_path / "prefix"
    shutil.copytree(Path(__file__).parents[1] / "examples" / "sql", prefix / "share" / "skilltune" / "examples" / "sql")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(demo, "__file__", str(tmp_path / "site-packages" / "skilltune" / "demo.py"))
    monkeypatch.setattr(sys, "prefix", str(prefix))
    found = demo.find_example("sql")
    assert found == prefix / "share" / "skilltune" / "examples" / "sql"
    monkeypatch.setattr(sys, "prefix", str(tmp_path / "empty"))
    monkeypatch.setattr(sys, "base_prefix", str(tmp_path / "empty"))
    monkeypatch.setattr("site.getuserbase", lambda: str(tmp_path / "empty"))
    with pytest.raises(Exception, match="cannot find the 'sql' example; looked in"):
        demo.find_example("sql")


def test_the_wheel_ships_the_examples():
    import tomllib

    meta = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    files = meta["tool"]["setuptools"]["data-files"]
    shipped = {Path(f).name for patterns in files.values() for f in patterns}
    assert {"config.yaml", "*.jsonl", "*.db"} <= shipped
    assert "share/skilltune/examples/sql/data" in files


def test_every_file_an_example_names_is_in_the_wheel():
    """The files an example's config (and its README usage) reads travel with it: a pip-installed demo whose
    config names a file the wheel lacks fails at its first stage."""
    import fnmatch
    import tomllib

    from skilltune.config import load_config
    from skilltune.config.load import _PATH_FIELDS

    root = Path(__file__).parents[1]
    files = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["data-files"]
    shipped = [pattern for patterns in files.values() for pattern in patterns]
    named = []
    for config in sorted((root / "examples").glob("*/config.yaml")):
        cfg = load_config(config)
        named += [Path(getattr(getattr(cfg, section), field)) for section, field in _PATH_FIELDS
                  if getattr(getattr(cfg, section), field)]
    named.append(root / "examples" / "json_extraction" / "ticket.schema.json")  # README: --set eval.json_schema=
    assert any(p.name == "sql.lark" for p in named)
    missing = [str(p.relative_to(root)) for p in named
               if not any(fnmatch.fnmatch(str(p.relative_to(root)), pattern) for pattern in shipped)]
    assert missing == []


def test_every_data_file_of_the_package_is_in_the_wheel():
    """A file the code reads at run time (chat templates, cards, HTML templates) must match a package-data
    pattern, or a pip-installed skilltune lacks it (the chat templates once did)."""
    import fnmatch
    import tomllib

    root = Path(__file__).parents[1]
    patterns = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    src = root / "src"
    missing = []
    for f in sorted((src / "skilltune").rglob("*")):
        if not f.is_file() or f.suffix in (".py", ".pyc") or "__pycache__" in f.parts or ".egg-info" in str(f):
            continue
        for parent in f.parents:  # the nearest package whose patterns match the file's path below it
            package = ".".join(parent.relative_to(src).parts)
            rel = f.relative_to(parent).as_posix()
            if any(fnmatch.fnmatch(rel, pat) for pat in patterns.get(package, [])):
                break
            if parent == src / "skilltune":
                missing.append(str(f.relative_to(src)))
                break
    assert missing == [], "add these to [tool.setuptools.package-data] in pyproject.toml"


# ---------------------------------------------------------------- one templating path
def test_html_reports_escape_untrusted_text(tmp_path):
    from skilltune.data.audit.base import CheckResult, Finding
    from skilltune.data.audit.run import AuditReport, render_html

    rep = AuditReport("<script>x</script>.jsonl", [CheckResult("format", "FAIL", 1, "bad <b>",
                                                               [Finding("f:1", "<img src=x onerror=alert(1)>")])],
                      {"sha256": "0"})
    page = render_html(rep)
    assert "<script>x</script>" not in page and "&lt;script&gt;" in page and "<img src=x" not in page


def test_completion_is_offered():
    code, out = cli("--help")
    assert code == 0 and "--install-completion" in out


def test_json_output_is_unchanged_by_pipes(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", SQL_ROWS)
    code, out = cli("data", "audit", str(path), "--no-tokenizer", "--format", "json")
    assert json.loads(out)["path"] == str(path)


def _command_options():
    """{'data audit': {'--test', '--format', ...}, ...} from the CLI itself."""
    import typer

    from skilltune.cli.main import app

    out = {}

    def walk(cmd, path):
        subs = getattr(cmd, "commands", None)
        if subs:
            for name, sub in subs.items():
                walk(sub, path + [name])
            return
        opts = set()
        for p in cmd.params:
            opts.update(o for o in list(p.opts) + list(getattr(p, "secondary_opts", [])) if o.startswith("--"))
        out[" ".join(path)] = opts | {"--help"}

    walk(typer.main.get_command(app), [])
    return out


def test_every_command_the_code_suggests_exists_with_its_options():
    """Hints (`next:`, `what to do:`, help examples) name commands and options that exist as printed."""
    import re

    options = _command_options()
    commands = sorted(options, key=len, reverse=True)
    src = Path(__file__).parents[1] / "src" / "skilltune"
    checked, bad = 0, []
    for file in src.rglob("*.py"):
        for m in re.finditer(r"skilltune ((?:[a-z][a-z-]* ?)+)([^\"'`\n;&|]*)", file.read_text()):
            words = m.group(1).split()
            cmd = next((c for c in commands if words[:len(c.split())] == c.split()), None)
            if cmd is None:
                continue
            checked += 1
            rest = " ".join(words[len(cmd.split()):]) + " " + m.group(2)
            for flag in re.findall(r"(?<![\w-])(--[a-z][a-z-]*)", rest):
                if flag not in options[cmd]:
                    bad.append(f"{file.name}: skilltune {cmd} ... {flag}")
    assert checked > 40 and bad == []


def test_serve_flags_out_of_range_are_config_errors_not_tracebacks():
    code, out = cli("serve", "nope@production", "--port", "0", "--max-tokens-limit", "-3")
    assert code == 2, out
    assert "serve.port: got 0" in out and "serve.max_tokens_limit: got -3" in out
    assert "Traceback" not in out


def test_an_argument_that_is_not_utf8_is_a_message_not_a_traceback(tmp_path):
    # a terminal passing bytes that are not UTF-8: Python keeps them as lone surrogates (surrogateescape)
    bad = b"caf\xe9".decode("utf-8", "surrogateescape")
    code, out = cli("generate", "embedded:smollm2-135m-instruct", bad)
    assert code == 2 and "argument b'caf\\xe9' is not UTF-8 text" in out and "Traceback" not in out
    code, out = cli("registry", "promote", "m@v1", f"--reason={bad}")
    assert code == 2 and "is not UTF-8 text" in out
    named = tmp_path / ("rows" + b"\xff".decode("utf-8", "surrogateescape") + ".jsonl")  # an existing file's name
    named.write_text("")
    code, out = cli("data", "audit", str(named), "--no-tokenizer")
    assert code == 1 and "the file is empty" in out


def test_serve_on_a_port_in_use_says_so_before_loading_anything():
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        code, out = cli("serve", "never-registered@production", "--port", str(port))
    assert code == 1 and f"cannot listen on 127.0.0.1:{port}: Address already in use" in out, out
    assert "choose another port with --port" in out and "Traceback" not in out
