"""`skilltune serve` and `skilltune monitor`: serve a registry version; watch what it receives."""

from __future__ import annotations

import os
import shlex
from pathlib import Path
from typing import Optional

import typer

from skilltune.cli.common import console, quiet_libraries
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

    Example: SKILLTUNE_API_KEY=secret skilltune serve sql-demo@production --api-key-env SKILLTUNE_API_KEY
    """
    quiet_libraries()
    from skilltune.config.load import load_config
    from skilltune.registry.api import Registry

    flags = {"host": host, "port": port, "api_key_env": api_key_env, "max_tokens_limit": max_tokens_limit,
             "queue_size": queue_size, "api_keys_file": str(api_keys_file) if api_keys_file else None}
    flags = {k: v for k, v in flags.items() if v is not None}
    if no_log:
        flags["log_requests"] = False
    if no_redact:
        flags["redact_pii"] = False
    cfg = load_config(config, set_).serve.model_copy(update=flags)
    cfg = type(cfg).model_validate(cfg.model_dump())  # the flags pass the schema's checks too
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

    keys = load_api_keys(cfg.api_key_env, cfg.api_keys_file)
    if not keys and not is_loopback(cfg.host) and not allow_unauthenticated:
        raise SkilltuneError(f"--host {cfg.host} makes the server reachable from other machines, and no API key is "
                             "set", hint="set one: export SKILLTUNE_API_KEY=...; add --api-key-env SKILLTUNE_API_KEY "
                                         "(or pass --allow-unauthenticated if a proxy in front authenticates)")
    state = build_state(ref, cfg, keys, registry, trust_remote_code=trust_remote_code)
    console.print(f"serving {state.engine.current.version} as '{state.name}' on http://{cfg.host}:{cfg.port}/v1 "
                  f"(auth {'on: ' + ', '.join(sorted(set(keys.values()))) if keys else 'off'}; following {ref})",
                  highlight=False, soft_wrap=True)
    try:
        make_server(state, cfg.host, cfg.port, allowed_hosts_for(cfg.host, allowed_host)).run()
    finally:
        state.stop()


def monitor(name: str = typer.Argument(..., help="Model name (the served NAME)."),
            threshold: float = typer.Option(0.25, "--threshold", help="Drift score that is flagged."),
            url: Optional[str] = typer.Option(None, "--registry-url")) -> int:
    """Volume, error rate, latency percentiles and input drift against the training data.

    Example: skilltune monitor sql-demo
    """
    from skilltune.paths import home
    from skilltune.registry.api import Registry
    from skilltune.serve.monitor import summarize

    log = home() / "serving" / f"{name}.requests.db"
    if not log.is_file():
        raise SkilltuneError(f"no request log for '{name}' ({log})", hint=f"serve it first: skilltune serve {name}@production")
    reg = Registry(url)
    try:
        train_file = reg.get(f"{name}@production").lineage["data"]["train"]["path"]
    except SkilltuneError:
        train_file = reg.get(name).lineage["data"]["train"]["path"]
    s = summarize(log, train_file, threshold)
    console.print(f"requests {s['requests']}, error rate {s['error_rate']:.1%}, latency p50 "
                  f"{s['latency_p50_s'] or 0:.2f} s / p95 {s['latency_p95_s'] or 0:.2f} s, versions {s['versions']}")
    d = s["drift"]
    if d:
        verdict = ("[red]FLAGGED[/red]" if d["flagged"] else "[green]OK[/green]") if not d["note"] else \
            f"[yellow]not judged[/yellow] ({d['note']})"
        console.print(f"input drift: length KS {d['length_ks']}, unseen-word rate {d['oov_rate']} -> score "
                      f"{d['score']} {verdict}")
    return 1 if d and d["flagged"] else 0
