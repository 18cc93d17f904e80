"""`skilltune serve NAME@alias`: load a registry version, follow its alias, serve it.

Adapters are loaded only from the registry's verified store — never from a path or
URL in a request. A watcher polls the alias; when ``registry promote``/``rollback``
moves it, the new version is loaded in the background and swapped in atomically.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from skilltune.config.schema import ServeConfig
from skilltune.registry.api import Registry, base_load_policy, parse_ref
from skilltune.serve.engine import Engine, Loaded
from skilltune.serve.requestlog import RequestLog


class Metrics:
    def __init__(self):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        self.requests = Counter("skilltune_requests", "HTTP requests", ["route", "status"], registry=self.registry)
        self.errors = Counter("skilltune_errors", "HTTP requests that failed", ["route"], registry=self.registry)
        self.latency = Histogram("skilltune_request_latency_seconds", "request latency", ["route"],
                                 registry=self.registry, buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120))
        self.tokens = Counter("skilltune_tokens", "tokens processed", ["kind"], registry=self.registry)
        self.version = Gauge("skilltune_model_version", "registry version being served", ["name", "version"],
                             registry=self.registry)


def load_version(registry: Registry, ref: str, trust_remote_code: bool = False) -> Loaded:
    """Load a registry version (verified against its sha256 manifest) with its training system prompt.

    The base model is the one the registry's lineage names, checked against its hash;
    nothing in the artifact can switch on remote code (only the operator's flag can).
    """
    from skilltune.model.target import load_target

    v = registry.get(ref)
    artifact = registry.materialize(f"{v.name}@v{v.number}")
    target = load_target(str(artifact), policy=base_load_policy(v.lineage, trust_remote_code))
    system = (v.lineage.get("config", {}).get("data") or {}).get("system_prompt")
    return Loaded(f"{v.name}@v{v.number}", target.model, target.tokenizer, system)


@dataclass
class ServerState:
    name: str
    ref: str
    registry: Registry
    engine: Engine
    api_key: str | None
    max_tokens_limit: int
    request_timeout_s: float
    log: RequestLog | None
    default_max_tokens: int = 256
    metrics: Metrics = field(default_factory=Metrics)
    started: float = field(default_factory=time.time)
    poll_s: float = 1.0
    trust_remote_code: bool = False  # the operator's flag, used for every version the alias moves to
    _stop: threading.Event = field(default_factory=threading.Event)

    def accepted_names(self) -> set[str]:
        current = self.engine.current.version
        return {self.name, self.ref, current}

    def follow_alias(self) -> None:
        """Poll the alias; load and swap when it moves (in this background thread)."""
        while not self._stop.wait(self.poll_s):
            try:
                v = self.registry.get(self.ref)
                wanted = f"{v.name}@v{v.number}"
                if wanted != self.engine.current.version:
                    loaded = load_version(self.registry, wanted, self.trust_remote_code)
                    old = self.engine.current.version
                    self.engine.swap(loaded)
                    self.metrics.version.labels(name=self.name, version=old).set(0)
                    self.metrics.version.labels(name=self.name, version=wanted).set(1)
            except Exception:  # noqa: BLE001 - keep serving the current version; retried next poll
                continue

    def stop(self) -> None:
        self._stop.set()
        self.engine.close()
        if self.log is not None:
            self.log.close()


def build_state(ref: str, cfg: ServeConfig, api_key: str | None, registry: Registry | None = None,
                log_path: Path | None = None, poll_s: float = 1.0, trust_remote_code: bool = False) -> ServerState:
    from skilltune.paths import home

    registry = registry or Registry()
    name, _ = parse_ref(ref)
    loaded = load_version(registry, ref, trust_remote_code)
    engine = Engine(loaded, queue_size=cfg.queue_size)
    log = None
    if cfg.log_requests:
        log = RequestLog(log_path or home() / "serving" / f"{name}.requests.db", redact_pii=cfg.redact_pii)
    state = ServerState(name, ref, registry, engine, api_key, cfg.max_tokens_limit, cfg.request_timeout_s, log,
                        poll_s=poll_s, trust_remote_code=trust_remote_code)
    state.metrics.version.labels(name=name, version=loaded.version).set(1)
    registry.attach_metrics(loaded.version, "monitoring", {
        "request_log": cfg.log_requests, "redact_pii": cfg.redact_pii,
        "log_path": str(log.path) if log else None, "drift_threshold": cfg.drift_threshold,
        "since": time.strftime("%Y-%m-%dT%H:%M:%S")})
    threading.Thread(target=state.follow_alias, name="skilltune-alias-watch", daemon=True).start()
    return state


LOOPBACK_HOSTS = ["localhost", "127.0.0.1", "::1", "[::1]"]


def is_loopback(host: str) -> bool:
    import ipaddress

    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return host == "localhost"


def allowed_hosts_for(host: str, extra: list[str] | None = None) -> list[str] | None:
    """The Host headers to accept: a loopback server accepts loopback names only (a web page that
    rebinds its DNS name to 127.0.0.1 cannot reach it); a public one accepts ``extra`` or any."""
    if extra:
        return list(extra)
    return LOOPBACK_HOSTS + [host] if is_loopback(host) else None


def vllm_command(registry: Registry, ref: str, host: str, port: int) -> list[str]:
    """The equivalent `vllm serve` command line for a GPU deployment of a LoRA version."""
    v = registry.get(ref)
    artifact = registry.materialize(f"{v.name}@v{v.number}")
    base = v.lineage["base_model"]
    base_path = base.get("path") or base.get("spec")
    return ["vllm", "serve", str(base_path), "--enable-lora", "--lora-modules", f"{v.name}={artifact}",
            "--max-lora-rank", str((v.lineage.get("adapter_config") or {}).get("r", 16)),
            "--host", host, "--port", str(port)]
