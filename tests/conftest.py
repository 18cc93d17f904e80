"""Shared fixtures: isolated skilltune home, tiny local models, the embedded SmolLM2."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from tiny import build_tiny_model  # noqa: E402

import socket  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402

from helpers import SQL_ROWS, write_jsonl, write_yaml  # noqa: E402

from skilltune.config.schema import ServeConfig  # noqa: E402
from skilltune.registry.api import Registry  # noqa: E402

# The embedded model's converted cache is shared across the session (conversion takes ~20 s).
_SHARED_HOME = Path(os.environ.get("SKILLTUNE_TEST_CACHE", Path.home() / ".cache" / "skilltune-tests"))


@pytest.fixture(autouse=True)
def isolated_home(tmp_path, monkeypatch):
    """Every test gets its own skilltune home, with the converted model cache shared."""
    home = tmp_path / "skilltune-home"
    (home).mkdir()
    shared_models = _SHARED_HOME / "models"
    shared_models.mkdir(parents=True, exist_ok=True)
    (home / "models").symlink_to(shared_models, target_is_directory=True)
    monkeypatch.setenv("SKILLTUNE_HOME", str(home))
    return home


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="session")
def tiny_base_model_dir(tmp_path_factory) -> Path:
    """A tiny 'base' model whose tokenizer has no chat template."""
    return build_tiny_model(tmp_path_factory.mktemp("tinybase") / "model", chat_template=None)


@pytest.fixture(scope="session")
def embedded_model():
    """The real embedded SmolLM2, loaded once per session (from the converted cache)."""
    from skilltune.config.schema import ModelConfig
    from skilltune.model.loading import load_model

    old = os.environ.get("SKILLTUNE_HOME")
    os.environ["SKILLTUNE_HOME"] = str(_SHARED_HOME)
    try:
        return load_model(ModelConfig())
    finally:
        if old is not None:
            os.environ["SKILLTUNE_HOME"] = old


@pytest.fixture(scope="session")
def stopping_run_dir(tmp_path_factory, tiny_model_dir):
    """A tiny model fully finetuned to give one-word answers and stop (a run directory)."""
    from helpers import write_jsonl, write_yaml

    from skilltune.config import load_config
    from skilltune.train.loop import train

    base = tmp_path_factory.mktemp("stopper")
    rows = [{"prompt": f"Say {w}.", "completion": w} for w in ("hi", "yes", "no", "ok", "fox", "dog")] * 4
    data = write_jsonl(base / "train.jsonl", rows)
    cfg = write_yaml(base / "c.yaml", {"model": {"base": str(tiny_model_dir)},
                                       "data": {"train": str(data), "val_split": 0},
                                       "adapter": {"method": "full"},
                                       "train": {"epochs": 15, "lr": 1e-2, "batch_size": 4, "precision": "fp32",
                                                 "output_dir": str(base / "runs")}})
    return train(load_config(cfg), run_name="stopper").run_dir


# ---------------------------------------------------------------- a served registry (test_serve*, test_security)
@pytest.fixture(scope="session")
def registered(tmp_path_factory, tiny_model_dir):
    """Two registered versions of 'svc' in a registry under a module-wide home."""
    import os

    from skilltune.config import load_config
    from skilltune.train.loop import train

    base = tmp_path_factory.mktemp("serve")
    data = write_jsonl(base / "train.jsonl", SQL_ROWS)
    url = f"sqlite:///{base / 'reg.db'}"
    old_home = os.environ.get("SKILLTUNE_HOME")
    os.environ["SKILLTUNE_HOME"] = str(base / "home")
    try:
        reg = Registry(url, store=base / "home" / "registry" / "store")
        for lr in (5e-3, 1e-2):
            cfg = write_yaml(base / f"c{lr}.yaml", {"model": {"base": str(tiny_model_dir)}, "data": {"train": str(data)},
                                                    "train": {"epochs": 1, "lr": lr, "output_dir": str(base / "runs"),
                                                              "precision": "fp32"}})
            reg.add(train(load_config(cfg), run_name="svc").run_dir, "svc")
        reg.promote("svc@v1")
    finally:
        if old_home is not None:
            os.environ["SKILLTUNE_HOME"] = old_home
    return url, base


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def server(registered, tmp_path):
    from skilltune.serve.server import build_state, make_server

    def start(api_key=None, queue_size=64, max_tokens_limit=64, **settings):
        url, base = registered
        reg = Registry(url, store=base / "home" / "registry" / "store")
        cfg = ServeConfig(queue_size=queue_size, max_tokens_limit=max_tokens_limit, **settings)
        shared_log = os.environ.get("SKILLTUNE_REQUESTLOG_URL")  # set by db_backend: log to PostgreSQL
        state = build_state("svc@production", cfg, api_key, reg, log_path=None if shared_log else tmp_path / "requests.db",
                            poll_s=0.1)
        port = free_port()
        srv = make_server(state, "127.0.0.1", port)
        th = threading.Thread(target=srv.run, daemon=True)
        th.start()
        while not srv.started:
            time.sleep(0.02)
        started.append((srv, th, state))
        start.last = srv
        return f"http://127.0.0.1:{port}", state, reg

    started = []
    yield start
    for srv, th, state in started:
        srv.should_exit = True
        th.join(timeout=10)
        state.stop()




# ---------------------------------------------------------------- a throwaway PostgreSQL cluster
class PgCluster:
    def __init__(self, port: int):
        self.port = port
        self.n = 0

    def new_database(self) -> str:
        """A fresh, empty database on the cluster; its SQLAlchemy URL."""
        import psycopg

        self.n += 1
        name = f"t{os.getpid()}_{self.n}"
        with psycopg.connect(f"host=127.0.0.1 port={self.port} user=postgres dbname=postgres", autocommit=True) as c:
            c.execute(f'CREATE DATABASE "{name}"')
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/{name}"


@pytest.fixture(scope="session")
def postgres():
    """PostgreSQL started for this test session in a temp folder (as the postgres user under root), then stopped."""
    import glob
    import importlib.util
    import shutil
    import subprocess
    import tempfile

    initdb = shutil.which("initdb") or next(iter(sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))), None)
    if initdb is None:
        pytest.skip("PostgreSQL server binaries (initdb, pg_ctl) are not installed: apt-get install postgresql")
    if importlib.util.find_spec("psycopg") is None:
        pytest.skip("the PostgreSQL driver is not installed: pip install 'skilltune[postgres]'")
    pg_ctl = str(Path(initdb).with_name("pg_ctl"))
    base = Path(tempfile.mkdtemp(prefix="skilltune-pg-"))
    prefix = []
    if os.geteuid() == 0:  # PostgreSQL refuses to run as root
        shutil.chown(base, "postgres", "postgres")
        prefix = ["runuser", "-u", "postgres", "--"]
    data = base / "data"
    subprocess.run(prefix + [initdb, "-D", str(data), "-A", "trust", "-U", "postgres", "--no-sync"],
                   check=True, capture_output=True)
    port = free_port()
    opts = f"-p {port} -k {base} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200"
    started = subprocess.run(prefix + [pg_ctl, "-D", str(data), "-l", str(base / "log"), "-w", "-o", opts, "start"],
                             capture_output=True, text=True)
    if started.returncode != 0:
        pytest.skip(f"PostgreSQL did not start: {started.stderr[-500:]}")
    try:
        yield PgCluster(port)
    finally:
        subprocess.run(prefix + [pg_ctl, "-D", str(data), "-m", "immediate", "stop"], capture_output=True)
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(params=["sqlite", "postgresql"])
def db_backend(request, monkeypatch):
    """Run a test on SQLite (the default home) and on a fresh PostgreSQL database (registry, scorecard, request log)."""
    if request.param == "postgresql":
        url = request.getfixturevalue("postgres").new_database()
        monkeypatch.setenv("SKILLTUNE_REGISTRY_URL", url)
        monkeypatch.setenv("SKILLTUNE_SCORECARD_URL", url)
        monkeypatch.setenv("SKILLTUNE_REQUESTLOG_URL", url)
    return request.param
