"""`skilltune serve NAME@alias`: load a registry version, follow its alias, serve it.

Adapters are loaded only from the registry's verified store — never from a path or
URL in a request. A watcher polls the alias; when ``registry promote``/``rollback``
moves it, the new version is loaded in the background and swapped in atomically.
"""

from __future__ import annotations

import copy
import logging
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from skilltune.config.schema import ServeConfig
from skilltune.registry.api import Registry, parse_ref, version_system_prompt
from skilltune.registry.db import shown
from skilltune.serve.clients import KeyLimits
from skilltune.serve.engine import Engine, Loaded
from skilltune.serve.requestlog import RequestLog, default_target

logger = logging.getLogger(__name__)


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


def load_version(registry: Registry, ref: str, trust_remote_code: bool = False, precision: str = "fp32") -> Loaded:
    """Load a registry version (verified against its sha256 manifest) with its training system prompt.

    The base model is the one the registry's lineage names, checked against its hash;
    nothing in the artifact can switch on remote code (only the operator's flag can).
    ``precision``: the weights' dtype (``serve.precision``). The generation kernels stay installed
    (the served weights never change).
    """
    from skilltune.model.kernels import keep_generation_kernels
    from skilltune.model.target import load_target
    from skilltune.train.precision import inference_dtype

    co = registry.checkout(ref, trust_remote_code)
    target = load_target(str(co.path), dtype=inference_dtype(precision)[1], policy=co.policy)
    if co.version.method in ("lora", "dora") and hasattr(target.model, "merge_adapter"):
        target.model.merge_adapter()  # served as one set of weights: unmerged LoRA costs ~40% of the speed
    keep_generation_kernels(target.model)
    context = getattr(target.model.config, "max_position_embeddings", None) or 2048
    return Loaded(co.ref, target.model, target.tokenizer, version_system_prompt(co.version), int(context),
                  counter=copy.deepcopy(target.tokenizer))


@dataclass
class ServerState:
    name: str
    ref: str
    registry: Registry
    engine: Engine
    keys: dict[str, str]  # API key -> client name; empty: auth off
    max_tokens_limit: int
    request_timeout_s: float
    log: RequestLog | None
    cfg: ServeConfig = field(default_factory=ServeConfig)  # the limits (body, prompt, compute, per key)
    default_max_tokens: int = 256
    metrics: Metrics = field(default_factory=Metrics)
    started: float = field(default_factory=time.time)
    poll_s: float = 1.0
    trust_remote_code: bool = False  # the operator's flag, used for every version the alias moves to
    draining: bool = False  # SIGTERM received: /ready says 503 while in-flight requests finish
    limits: KeyLimits = field(default_factory=KeyLimits)
    alias_problem: str | None = None  # the alias points at a version that failed to load: why (still serving)
    _failed: str | None = None  # that version, not tried again until the alias moves
    _stop: threading.Event = field(default_factory=threading.Event)

    def prompt_limit(self, loaded: Loaded) -> int:
        """The most tokens prompt + completion may take: the model's context, or the configured cap."""
        return min(loaded.context_tokens, self.cfg.max_prompt_tokens or loaded.context_tokens)

    def readiness(self) -> tuple[bool, str]:
        if self.draining:
            return False, "shutting down: finishing in-flight requests"
        if self.engine.stalled(self.cfg.ready_stall_s):
            return False, f"the engine made no progress for over {self.cfg.ready_stall_s:g} s with work waiting"
        return True, "ready"

    def accepted_names(self) -> set[str]:
        current = self.engine.current.version
        return {self.name, self.ref, current}

    def follow_alias(self) -> None:
        """Poll the alias; load and swap when it moves (in this background thread)."""
        while not self._stop.wait(self.poll_s):
            try:
                v = self.registry.get(self.ref)
            except Exception:  # noqa: BLE001 - the registry is briefly unreachable: keep serving, ask again
                continue
            self._move_to(f"{v.name}@v{v.number}")

    def _move_to(self, wanted: str) -> None:
        """Serve ``wanted`` if it is not served yet. A version that fails to load is tried once, not at every poll
        (a load takes seconds of CPU): the current version keeps serving and /health and /ready say why, until
        the alias moves again."""
        current = self.engine.current.version
        if wanted == current:
            self.alias_problem = self._failed = None
            return
        if wanted == self._failed:
            return
        try:
            loaded = load_version(self.registry, wanted, self.trust_remote_code, self.cfg.precision)
        except Exception as exc:  # noqa: BLE001 - whatever broke the new version, the current one keeps serving
            first = (str(exc).strip().splitlines() or [""])[0][:300]
            self._failed = wanted
            self.alias_problem = (f"{self.ref} points at {wanted}, which could not be loaded "
                                  f"({type(exc).__name__}: {first}); still serving {current}")
            logger.warning("%s", self.alias_problem)
            return
        self.engine.swap(loaded)
        self.alias_problem = self._failed = None
        self.metrics.version.labels(name=self.name, version=current).set(0)
        self.metrics.version.labels(name=self.name, version=wanted).set(1)
        self.record_serving(wanted)
        warm_token_table(loaded)  # after the swap: a rollback never waits for it

    def record_serving(self, version: str) -> None:
        """Monitoring evidence for the checklist, on every version this server actually serves (after a hot
        promote or rollback too, not only the one it started with)."""
        self.registry.attach_metrics(version, "monitoring", {
            "request_log": self.log is not None, "redact_pii": self.cfg.redact_pii,
            "log_path": (str(self.log.path or shown(self.log.url))) if self.log else None,
            "drift_threshold": self.cfg.drift_threshold,
            "since": time.strftime("%Y-%m-%dT%H:%M:%S")})

    def stop(self) -> None:
        self._stop.set()
        self.engine.close()
        if self.log is not None:
            self.log.close()


def warm_token_table(loaded: Loaded) -> None:
    """Build llguidance's table of ``loaded``'s tokens now (Gemma 3's 262,144 tokens: ~5 s), so the first request
    asking for ``response_format`` or ``logprobs`` does not wait for it. Nothing when llguidance is not installed;
    a tokenizer it cannot read is reported by the request that needs the table, as before."""
    import importlib.util

    if importlib.util.find_spec("llguidance") is None:
        return
    from skilltune.model.structured import token_table, vocab_width

    try:
        token_table(loaded.tokenizer, loaded.tokenizer.eos_token_id, vocab_width(loaded.model, loaded.tokenizer))
    except Exception as exc:  # noqa: BLE001 - only a warm-up
        logger.debug("no token table for %s: %s", loaded.version, exc)


def build_state(ref: str, cfg: ServeConfig, api_keys: dict[str, str] | str | None, registry: Registry | None = None,
                log_path: Path | None = None, poll_s: float = 1.0, trust_remote_code: bool = False,
                record: bool = True) -> ServerState:
    """Load ``ref`` and everything the app serves it with; ``api_keys``: ``{key: client name}`` (or one key).

    ``record``: note in the registry that this version is served (monitoring evidence); a load test's
    private server does not.
    """
    registry = registry or Registry()
    name, _ = parse_ref(ref)
    loaded = load_version(registry, ref, trust_remote_code, cfg.precision)
    engine = Engine(loaded, queue_size=cfg.queue_size, continuous=cfg.continuous_batching,
                    max_context=cfg.max_prompt_tokens, max_new_tokens=cfg.max_tokens_limit)
    log = None
    if cfg.log_requests:
        log = RequestLog(log_path or default_target(name), redact_pii=cfg.redact_pii, service=name)
    keys = {api_keys: "default"} if isinstance(api_keys, str) else dict(api_keys or {})
    state = ServerState(name, ref, registry, engine, keys, cfg.max_tokens_limit, cfg.request_timeout_s, log, cfg,
                        poll_s=poll_s, trust_remote_code=trust_remote_code,
                        limits=KeyLimits(cfg.per_key_concurrency, cfg.per_key_rate))
    state.metrics.version.labels(name=name, version=loaded.version).set(1)
    if record:
        state.record_serving(loaded.version)
    threading.Thread(target=state.follow_alias, name="skilltune-alias-watch", daemon=True).start()
    threading.Thread(target=warm_token_table, args=(loaded,), name="skilltune-token-table", daemon=True).start()
    return state


def make_server(state: ServerState, host: str, port: int, allowed_hosts: list[str] | None = None):
    """A uvicorn server for ``state`` that shuts down gracefully.

    On SIGTERM/SIGINT it stops accepting connections, flips /ready to 503 (so a load
    balancer stops sending), lets in-flight requests finish for up to
    ``serve.grace_period_s``, then exits: a rolling restart loses no request.
    """
    import uvicorn

    from skilltune.serve.app import create_app

    class GracefulServer(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            state.draining = True
            super().handle_exit(sig, frame)

    config = uvicorn.Config(create_app(state, allowed_hosts), host=host, port=port, log_level="warning",
                            timeout_graceful_shutdown=int(state.cfg.grace_period_s) or None)
    return GracefulServer(config)


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
    from skilltune.model.tokenizer import with_default_system
    from skilltune.paths import atomic_write_text, home

    co = registry.checkout(ref)
    v, artifact = co.version, co.path
    base = v.lineage["base_model"]
    base_path = base.get("path") or base.get("spec")
    cmd = ["vllm", "serve", str(base_path), "--enable-lora", "--lora-modules", f"{v.name}={artifact}",
           "--max-lora-rank", str((v.lineage.get("adapter_config") or {}).get("r", 16))]
    template = _trained_chat_template(artifact)
    system = version_system_prompt(v)
    if template:  # the template (and system prompt) the adapter was trained with, not the base model's
        path = home() / "serving" / f"{v.name}-v{v.number}.chat_template.jinja"
        atomic_write_text(path, with_default_system(template, system) if system else template)
        cmd += ["--chat-template", str(path)]
    return cmd + ["--host", host, "--port", str(port)]


def _trained_chat_template(artifact: Path) -> str | None:
    import json

    if (artifact / "chat_template.jinja").is_file():
        return (artifact / "chat_template.jinja").read_text(encoding="utf-8")
    config = artifact / "tokenizer_config.json"
    return json.loads(config.read_text()).get("chat_template") if config.is_file() else None
