"""API keys with names, and per-key limits, so one client cannot starve the others.

Keys come from an environment variable (one key, named ``default``) and/or a keys
file (``NAME:KEY`` per line). A request's key is compared in constant time with every
known key; its name goes into the request log. Each name has a concurrency limit
(requests in flight) and, optionally, a request rate (a token bucket with bursts of
twice the rate); over either, the server answers 429 with ``Retry-After``.
"""

from __future__ import annotations

import hmac
import math
import os
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from skilltune.errors import SkilltuneError


MIN_KEY_CHARS = 8  # shorter keys are guessed by trying


def load_api_keys(env_name: str | None = None, keys_file: str | Path | None = None) -> dict[str, str]:
    """``{key: name}`` from ``$env_name`` (named ``default``) and ``keys_file`` (``NAME:KEY`` lines).

    Asking for auth and getting none is an error, never a server without auth: an unset variable, a file
    without keys, a key shorter than :data:`MIN_KEY_CHARS`.
    """
    keys: dict[str, str] = {}
    if env_name:
        key = os.environ.get(env_name)
        if not key:
            raise SkilltuneError(f"--api-key-env {env_name}: that environment variable is empty or unset",
                                 hint=f"export {env_name}=... first")
        if len(key) < MIN_KEY_CHARS:
            raise SkilltuneError(f"--api-key-env {env_name}: the key is {len(key)} characters; at least "
                                 f"{MIN_KEY_CHARS} are needed",
                                 hint="a long random one: python -c 'import secrets; print(secrets.token_urlsafe(32))'")
        keys[key] = "default"
    if keys_file:
        keys.update(_keys_file(Path(keys_file), keys))
    return keys


def _keys_file(path: Path, known: dict[str, str]) -> dict[str, str]:
    if not path.is_file():
        raise SkilltuneError(f"API keys file not found: {path}", hint="one NAME:KEY per line")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise SkilltuneError(f"{path}: not UTF-8 text (byte {exc.start})", hint="one NAME:KEY per line") from None
    keys: dict[str, str] = {}
    for lineno, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        name, sep, key = (part.strip() for part in line.partition(":"))
        if not sep or not name or len(key) < MIN_KEY_CHARS:
            raise SkilltuneError(f"{path}:{lineno}: expected NAME:KEY with a key of {MIN_KEY_CHARS}+ characters",
                                 hint="one client per line, e.g. analytics-team:sk-...")
        if key in keys or key in known:
            raise SkilltuneError(f"{path}:{lineno}: the key of {name!r} is already used by "
                                 f"{(keys | known)[key]!r}")
        keys[key] = name
    if not keys:
        raise SkilltuneError(f"{path} holds no keys (blank lines and comments only): the server would run without "
                             "authentication", hint="one client per line, e.g. analytics-team:sk-...")
    return keys


def client_name(keys: dict[str, str], header: str) -> str | None:
    """The name of the key in an ``Authorization: Bearer KEY`` header, or None (compared in constant time)."""
    token = header[7:].strip() if header[:7].lower() == "bearer " else ""
    found = None
    for key, name in keys.items():  # every key is compared, so timing says nothing about which matched
        if hmac.compare_digest(token.encode(), key.encode()):
            found = name
    return found


@dataclass
class KeyLimits:
    """Per-client concurrency and rate limits; ``acquire`` returns None (go) or seconds to wait."""

    concurrency: int = 16
    rate: float | None = None
    _inflight: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    _tokens: dict[str, float] = field(default_factory=dict)
    _stamp: dict[str, float] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def acquire(self, name: str) -> float | None:
        with self._lock:
            if self._inflight[name] >= self.concurrency:
                return 1.0
            if self.rate:
                burst = max(1.0, 2 * self.rate)
                now = time.monotonic()
                tokens = min(burst, self._tokens.get(name, burst) + (now - self._stamp.get(name, now)) * self.rate)
                self._stamp[name] = now
                if tokens < 1:
                    self._tokens[name] = tokens
                    return max(1.0, math.ceil((1 - tokens) / self.rate))
                self._tokens[name] = tokens - 1
            self._inflight[name] += 1
            return None

    def release(self, name: str) -> None:
        with self._lock:
            self._inflight[name] = max(0, self._inflight[name] - 1)
