"""`skilltune serve` and `skilltune monitor`: serve a registry version; watch what it receives."""

from __future__ import annotations

import contextlib
import os
import shlex
import time
from pathlib import Path
from typing import Optional

import typer

from skilltune.cli.common import ConsoleStages, console, listen_problem, plain, quiet_libraries
from skilltune.errors import SkilltuneError


def serve(ref: str = typer.Argument(..., help="NAME@alias or NAME@vN from the registry."),
          config: Optional[Path] = typer.Option(None, "--config", help="A config file whose serve: section sets the "
                                                                      "defaults (flags override it)."),
          set_: Optional[list[str]] = typer.Option(None, "--set", help="Override a serve field, e.g. "
                                                                       "--set serve.per_key_rate=5 (repeatable)."),
          host: Optional[str] = typer.Option(None, "--host", help="Interface (default 127.0.0.1)."),
          port: Optional[int] = typer.Option(None, "--port", help="Port (default 8000)."),
          api_key_env: Optional[str] = typer.Option(None, "--api-key-env",
                                                    help="Environment variable holding the API key (auth on)."),
          api_keys_file: Optional[Path] = typer.Option(None, "--api-keys-file",
                                                       help="File of NAME:KEY lines: several clients, each logged "
                                                            "and limited by name (auth on)."),
          engine: str = typer.Option("transformers", "--engine", help="transformers (CPU/GPU) | vllm (GPU)"),
          max_tokens_limit: Optional[int] = typer.Option(None, "--max-tokens-limit"),
          queue_size: Optional[int] = typer.Option(None, "--queue-size"),
          no_log: bool = typer.Option(False, "--no-request-log", help="Do not record requests."),
          no_redact: bool = typer.Option(False, "--no-redact", help="Keep PII in the request log."),
          allow_unauthenticated: bool = typer.Option(
              False, "--allow-unauthenticated",
              help="Serve on a non-loopback address without an API key (refused otherwise)."),
          allowed_host: Optional[list[str]] = typer.Option(
              None, "--allowed-host", help="Host header to accept (repeatable; default: loopback names when "
                                           "serving on loopback, any otherwise)."),
          trust_remote_code: bool = typer.Option(False, "--trust-remote-code",
                                                 help="Run modelling code shipped with the base model."),
          url: Optional[str] = typer.Option(None, "--registry-url")) -> None:
    """Serve a registry version with an OpenAI-compatible API; follows the alias for hot rollback.

    Limits (body size, prompt vs context, per-request compute, per-key concurrency and rate, time-out,
    graceful shutdown) come from the serve: section of --config, --set, then the flags.

    Example: SKILLTUNE_API_KEY=$(openssl rand -hex 16) skilltune serve sql-demo@production --api-key-env SKILLTUNE_API_KEY
    """
    quiet_libraries()
    from skilltune.config.load import load_config, validate
    from skilltune.registry.api import Registry

    flags = {"host": host, "port": port, "api_key_env": api_key_env, "max_tokens_limit": max_tokens_limit,
             "queue_size": queue_size, "api_keys_file": str(api_keys_file) if api_keys_file else None}
    flags = {k: v for k, v in flags.items() if v is not None}
    if no_log:
        flags["log_requests"] = False
    if no_redact:
        flags["redact_pii"] = False
    data = load_config(config, set_).model_dump()
    data["serve"].update(flags)
    cfg = validate(data, source="the serve flags").serve  # the flags pass the schema's checks too
    registry = Registry(url)
    if engine == "vllm":
        from skilltune.serve.server import vllm_command

        cmd = vllm_command(registry, ref, cfg.host, cfg.port)
        console.print(" ".join(shlex.quote(c) for c in cmd), highlight=False, markup=False)
        try:
            import torch
            import vllm  # noqa: F401

            if torch.cuda.is_available():
                os.execvp(cmd[0], cmd)
        except ImportError:
            pass
        console.print("vLLM with a GPU is not available here: run the command above on a GPU machine.")
        return
    if engine != "transformers":
        raise SkilltuneError(f"unknown engine '{engine}'", hint="transformers or vllm")
    from skilltune.serve.clients import load_api_keys
    from skilltune.serve.server import allowed_hosts_for, build_state, is_loopback, make_server

    if problem := listen_problem(cfg.host, cfg.port):  # before the model loads (seconds to minutes)
        raise SkilltuneError(problem[0], hint=problem[1])
    keys = load_api_keys(cfg.api_key_env, cfg.api_keys_file)
    if not keys and not is_loopback(cfg.host) and not allow_unauthenticated:
        raise SkilltuneError(f"--host {cfg.host} makes the server reachable from other machines, and no API key is "
                             "set", hint="set one: export SKILLTUNE_API_KEY=...; add --api-key-env SKILLTUNE_API_KEY "
                                         "(or pass --allow-unauthenticated if a proxy in front authenticates)")
    state = build_state(ref, cfg, keys, registry, trust_remote_code=trust_remote_code)
    mode, why = state.engine.batching()
    console.print(f"serving {state.engine.current.version} as '{state.name}' on http://{cfg.host}:{cfg.port}/v1 "
                  f"(auth {'on: ' + ', '.join(sorted(set(keys.values()))) if keys else 'off'}; following {ref}; "
                  f"{mode} batching{f': {why}' if why else ''})", highlight=False, soft_wrap=True)
    try:
        make_server(state, cfg.host, cfg.port, allowed_hosts_for(cfg.host, allowed_host)).run()
    finally:
        state.stop()


def monitor(name: str = typer.Argument(..., help="Model name (the served NAME)."),
            threshold: float = typer.Option(0.25, "--threshold", min=0.0, help="Drift score that is flagged."),
            window: float = typer.Option(300, "--window", min=1.0, help="Window length in seconds for the per-window table."),
            check: bool = typer.Option(False, "--check", help="Exit 1 on any alert (an error spike in the latest "
                                                              "window, or input drift): for cron or CI."),
            url: Optional[str] = typer.Option(None, "--registry-url")) -> int:
    """Volume, errors by class, 429s, latency percentiles per time window, error spikes, and input drift.

    Example: skilltune monitor sql-demo --window 60 --check
    """
    from skilltune.registry.api import Registry
    from skilltune.serve.monitor import spike, summarize, windows
    from skilltune.serve.requestlog import RequestLog, default_target

    target = default_target(name)
    if isinstance(target, Path) and not target.is_file():
        raise SkilltuneError(f"no request log for '{name}' ({target})",
                             hint=f"serve it first: skilltune serve {name}@production")
    log = RequestLog(target, service=name)
    reg = Registry(url)
    try:
        train_file = reg.get(f"{name}@production").lineage["data"]["train"]["path"]
    except SkilltuneError:
        train_file = reg.get(name).lineage["data"]["train"]["path"]
    s = summarize(log, train_file, threshold)
    plain(f"{name}: {s['requests']} requests, error rate {s['error_rate']:.1%} "
          f"({', '.join(f'{k} {v}' for k, v in s['by_class'].items())}), latency p50 {s['latency_p50_s'] or 0:.2f} s / "
          f"p95 {s['latency_p95_s'] or 0:.2f} s, versions {', '.join(s['versions'])}")
    wins = windows(log.rows(), window)
    for w in wins[-12:]:
        plain(f"  {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(w['start']))}: {w['requests']} requests, "
              f"errors {w['error_rate']:.1%} ({', '.join(f'{k} {v}' for k, v in sorted(w['by_class'].items()))}), "
              f"429 {w['rate_limited']}, p50 {w['latency_p50_s'] or 0:.2f} s, p95 {w['latency_p95_s'] or 0:.2f} s")
    alerts = []
    jump = spike(wins)
    if jump:
        alerts.append(f"error spike: {jump['errors']} errors, {jump['error_rate']:.0%} of the latest window against "
                      f"{jump['before']:.0%} before ({jump['by_class']})")
    d = s["drift"]
    if d:
        verdict = ("FLAGGED" if d["flagged"] else "OK") if not d["note"] else f"not judged ({d['note']})"
        plain(f"input drift: length KS {d['length_ks']}, unseen-word rate {d['oov_rate']} -> score {d['score']} "
              f"{verdict}")
        if d["flagged"]:
            alerts.append(f"input drift: score {d['score']} > {d['threshold']}")
    for alert in alerts:
        plain(f"ALERT {name}: {alert}")
    if not alerts:
        plain(f"{name}: no alerts")
    return 1 if check and alerts else 0


def _client_counts(text: str) -> list[int]:
    """``--concurrency 1,4,16`` as client counts, each a whole number from 1."""
    parts = [c.strip() for c in text.split(",") if c.strip()]
    if not parts or not all(c.isdigit() and int(c) >= 1 for c in parts):
        raise typer.BadParameter(f"{text!r}: give client counts of 1 or more, comma-separated (e.g. 1,4,16)",
                                 param_hint="--concurrency")
    return [int(c) for c in parts]


def loadtest(ref: str = typer.Argument(..., help="NAME@alias or NAME@vN from the registry."),
             url: Optional[str] = typer.Option(None, "--url", help="A running server (default: start one here "
                                                                   "on a free loopback port)."),
             concurrency: str = typer.Option("1,4,16", "--concurrency", help="Closed-loop client counts."),
             rate: Optional[float] = typer.Option(None, "--rate", min=0.01, help="Also an open-loop run at this many "
                                                                       "requests/s."),
             duration: float = typer.Option(20, "--duration", min=1.0, help="Seconds per level."),
             max_tokens: int = typer.Option(64, "--max-tokens", min=1),
             price_per_hour: Optional[float] = typer.Option(None, "--price-per-hour", min=0.0, help="Cost of the serving "
                                                            "machine (default: the run's eval.price_per_hour)."),
             expected_rps: Optional[float] = typer.Option(None, "--expected-rps", min=0.0, help="The load to carry "
                                                          "(default: the run's serve.expected_rps)."),
             api_key_env: Optional[str] = typer.Option(None, "--api-key-env", help="Variable holding the key for "
                                                                                   "--url."),
             out: Optional[Path] = typer.Option(None, "--out", help="Write the results as JSON here."),
             plot_file: Optional[Path] = typer.Option(None, "--plot", help="Write latency vs load (PNG) here."),
             registry_url: Optional[str] = typer.Option(None, "--registry-url")) -> int:
    """Throughput, latency p50/p95/p99, time to first token, errors, 429s and cost under load; recorded with the
    version for the readiness checklist.

    Example: skilltune loadtest sql-demo@production --concurrency 1,4,16 --duration 20 --expected-rps 2
    """
    quiet_libraries()
    from skilltune.registry.api import Registry
    from skilltune.serve.loadtest import meets_expected_load, plot, run_loadtest, to_json

    levels_c = _client_counts(concurrency)
    registry = Registry(registry_url)
    v = registry.get(ref)
    version, cfg = f"{v.name}@v{v.number}", v.lineage.get("run_config") or {}
    prompts = _test_prompts(cfg)
    price = price_per_hour if price_per_hour is not None else (cfg.get("eval") or {}).get("price_per_hour", 1.0)
    expected = expected_rps if expected_rps is not None else (cfg.get("serve") or {}).get("expected_rps")
    stages = ConsoleStages()
    with _server_for(registry, version, url) as (base, key):
        levels = run_loadtest(base, v.name, prompts, levels_c, rate, duration, max_tokens, price,
                              key or (os.environ.get(api_key_env) if api_key_env else None), say=stages.message)
    for lv in levels:
        plain(f"{version}: {lv['mode']} {lv['level']:g}: {lv['throughput_rps']:.2f} req/s, "
              f"{lv['generated_tokens_per_s']:.1f} tokens/s, p50 {lv['latency_p50_s']} s, p95 {lv['latency_p95_s']} s, "
              f"p99 {lv['latency_p99_s']} s, TTFT p50 {lv['ttft_p50_s']} s, errors {lv['error_rate']:.1%}, "
              f"429 {lv['rate_limited_rate']:.1%}, ${lv['cost_per_1000_requests']} per 1,000 requests at ${price}/h")
    met = meets_expected_load(levels, expected) if expected else None
    record = {"levels": levels, "expected_rps": expected, "meets_expected": met is not None if expected else None,
              "at_expected": met, "price_per_hour": price, "max_tokens": max_tokens, "duration_s": duration,
              "prompts": len(prompts), "url": url or "in-process", "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
    registry.attach_metrics(version, "loadtest", record)
    if out:
        from skilltune.paths import atomic_write_text

        atomic_write_text(out, to_json(levels, version=version, expected_rps=expected))
    if plot_file:
        plot(levels, plot_file)
    if expected:
        plain(f"{version}: expected load {expected:g} req/s " + (
            f"served at {met['mode']} {met['level']:g} ({met['throughput_rps']:.2f} req/s, p95 {met['latency_p95_s']} s)"
            if met else "NOT served with <= 1% errors at any level"))
    return 0 if (met is not None or not expected) else 1


def _test_prompts(cfg: dict) -> list[str]:
    """The user messages of the version's test set (the traffic it was built for)."""
    from skilltune.config.load import config_from_dict
    from skilltune.data.reader import load_examples

    data = config_from_dict(cfg).data if cfg else None
    if not data or not data.test:
        raise SkilltuneError("this version's config names no test set to draw load-test prompts from",
                             hint="re-register a run whose config sets data.test")
    return [ex.turns[-2].content for ex in load_examples(data.test, data.format, data.columns) if len(ex.turns) >= 2]


@contextlib.contextmanager
def _server_for(registry, version: str, url: str | None, settings: dict | None = None):
    """(base URL, API key) of the server to load: ``url`` as given, or one started here for the test
    (``settings``: serve config fields for it, e.g. ``{"continuous_batching": False}``)."""
    if url:
        yield url, None
        return
    import secrets
    import socket
    import threading

    from skilltune.config.schema import ServeConfig
    from skilltune.paths import home
    from skilltune.serve.server import build_state, make_server

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    key = secrets.token_urlsafe(16)
    state = build_state(version, ServeConfig(port=port, per_key_concurrency=1024, **(settings or {})),
                        {key: "loadtest"}, registry,
                        log_path=home() / "serving" / f"{version.split('@')[0]}.loadtest.requests.db", record=False)
    server = make_server(state, "127.0.0.1", port)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started and thread.is_alive():
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}", key
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        state.stop()
