"""`skilltune serve` and `skilltune monitor`: serve a registry version; watch what it receives."""

from __future__ import annotations

import os
import shlex
from typing import Optional

import typer

from skilltune.cli.common import console, quiet_libraries
from skilltune.errors import SkilltuneError


def serve(ref: str = typer.Argument(..., help="NAME@alias or NAME@vN from the registry."),
          host: str = typer.Option("127.0.0.1", "--host"), port: int = typer.Option(8000, "--port"),
          api_key_env: Optional[str] = typer.Option(None, "--api-key-env",
                                                    help="Environment variable holding the API key (auth on)."),
          engine: str = typer.Option("transformers", "--engine", help="transformers (CPU/GPU) | vllm (GPU)"),
          max_tokens_limit: int = typer.Option(1024, "--max-tokens-limit"),
          queue_size: int = typer.Option(64, "--queue-size"),
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

    Example: SKILLTUNE_API_KEY=secret skilltune serve sql-demo@production --api-key-env SKILLTUNE_API_KEY
    """
    quiet_libraries()
    from skilltune.config.schema import ServeConfig
    from skilltune.registry.api import Registry

    registry = Registry(url)
    if engine == "vllm":
        from skilltune.serve.server import vllm_command

        cmd = vllm_command(registry, ref, host, port)
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
    key = None
    if api_key_env:
        key = os.environ.get(api_key_env)
        if not key:
            raise SkilltuneError(f"--api-key-env {api_key_env}: that environment variable is empty or unset",
                                 hint=f"export {api_key_env}=... first")
    from skilltune.serve.server import allowed_hosts_for, build_state, is_loopback

    if not key and not is_loopback(host) and not allow_unauthenticated:
        raise SkilltuneError(f"--host {host} makes the server reachable from other machines, and no API key is set",
                             hint="set one: export SKILLTUNE_API_KEY=...; add --api-key-env SKILLTUNE_API_KEY "
                                  "(or pass --allow-unauthenticated if a proxy in front authenticates)")
    import uvicorn

    from skilltune.serve.app import create_app

    cfg = ServeConfig(host=host, port=port, max_tokens_limit=max_tokens_limit, queue_size=queue_size,
                      log_requests=not no_log, redact_pii=not no_redact)
    state = build_state(ref, cfg, key, registry, trust_remote_code=trust_remote_code)
    console.print(f"serving {state.engine.current.version} as '{state.name}' on http://{host}:{port}/v1 "
                  f"(auth {'on' if key else 'off'}; following {ref})")
    try:
        uvicorn.run(create_app(state, allowed_hosts_for(host, allowed_host)), host=host, port=port,
                    log_level="warning")
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
