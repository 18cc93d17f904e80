"""`skilltune loadtest`: latency, throughput and cost of a served version under load.

An asyncio + httpx driver (measured lighter than locust for this: one process, no
web UI, and its numbers are what the checklist needs). Closed loop: N clients each
send a request as soon as their last one is answered, for a fixed time. Open loop:
requests arrive at a fixed average rate (Poisson), answered or not — what real traffic
does to a saturated server. Prompts are sampled from the version's own test set. Every
level reports requests/s, generated tokens/s, latency p50/p95/p99, time to first token
(every 4th request streams), error and 429 rates, and the cost per 1,000 requests at a
stated price per hour. The driver is bounded in count and time and stops by itself.
"""

from __future__ import annotations

import asyncio
import json
import random
import time
from dataclasses import dataclass

import numpy as np

STREAM_EVERY = 4  # every 4th request streams, for time to first token
MAX_IN_FLIGHT = 512  # open loop: beyond this many unanswered requests, arrivals are dropped and counted


@dataclass(frozen=True)
class Endpoint:
    url: str  # .../v1/chat/completions
    headers: dict
    model: str
    max_tokens: int


@dataclass
class Sample:
    start: float
    latency_s: float
    status: int  # HTTP status; 0 for a transport error or a dropped arrival
    completion_tokens: int = 0
    ttft_s: float | None = None


def _has_text(event: str) -> bool:
    try:
        choice = (json.loads(event).get("choices") or [{}])[0]
    except (ValueError, AttributeError):
        return False
    return bool((choice.get("delta") or {}).get("content") or choice.get("text"))


async def _one(client, ep: Endpoint, prompt: str, stream: bool) -> Sample:
    body = {"model": ep.model, "max_tokens": ep.max_tokens, "temperature": 0, "stream": stream,
            "messages": [{"role": "user", "content": prompt}]}
    t0 = time.perf_counter()
    try:
        if not stream:
            r = await client.post(ep.url, json=body, headers=ep.headers)
            tokens = (r.json().get("usage") or {}).get("completion_tokens", 0) if r.status_code == 200 else 0
            return Sample(t0, time.perf_counter() - t0, r.status_code, tokens)
        ttft = None
        async with client.stream("POST", ep.url, json=body, headers=ep.headers) as r:
            async for line in r.aiter_lines():
                if ttft is None and line.startswith("data: {") and _has_text(line[6:]):
                    ttft = time.perf_counter() - t0  # the first chunk with text (not the role-only first chunk)
            return Sample(t0, time.perf_counter() - t0, r.status_code, 0, ttft)
    except Exception:  # noqa: BLE001 - a refused or broken connection is an error of the level, not of the driver
        return Sample(t0, time.perf_counter() - t0, 0)


async def _closed(client, ep: Endpoint, prompts: list[str], clients: int, duration_s: float) -> list[Sample]:
    end = time.perf_counter() + duration_s
    samples: list[Sample] = []
    counter = iter(range(10**9))

    async def worker(seed: int):
        rng = random.Random(seed)
        while time.perf_counter() < end:
            k = next(counter)
            samples.append(await _one(client, ep, rng.choice(prompts), k % STREAM_EVERY == 3))

    await asyncio.gather(*(worker(i) for i in range(clients)))
    return samples


async def _open(client, ep: Endpoint, prompts: list[str], rate: float, duration_s: float) -> list[Sample]:
    rng = np.random.default_rng(0)
    end = time.perf_counter() + duration_s
    tasks: list[asyncio.Task] = []
    dropped: list[Sample] = []
    k = 0
    while True:
        await asyncio.sleep(float(rng.exponential(1 / rate)))
        now = time.perf_counter()
        if now >= end:
            break
        if sum(not t.done() for t in tasks) >= MAX_IN_FLIGHT:
            dropped.append(Sample(now, 0.0, 0))
        else:
            tasks.append(asyncio.ensure_future(_one(client, ep, prompts[k % len(prompts)], k % STREAM_EVERY == 3)))
        k += 1
    return [*(await asyncio.gather(*tasks)), *dropped]


def summarize(samples: list[Sample], wall_s: float, price_per_hour: float, mode: str, level: float) -> dict:
    ok = [s for s in samples if s.status == 200]
    lat = [s.latency_s for s in ok]
    ttft = [s.ttft_s for s in ok if s.ttft_s is not None]
    n = len(samples)
    rps = len(ok) / wall_s if wall_s else 0.0

    def pct(values, q):
        return round(float(np.percentile(values, q)), 4) if values else None

    return {"mode": mode, "level": level, "duration_s": round(wall_s, 2), "requests": n, "ok": len(ok),
            "throughput_rps": round(rps, 3), "generated_tokens_per_s": round(sum(s.completion_tokens for s in ok)
                                                                             / wall_s, 2) if wall_s else 0.0,
            "latency_p50_s": pct(lat, 50), "latency_p95_s": pct(lat, 95), "latency_p99_s": pct(lat, 99),
            "ttft_p50_s": pct(ttft, 50), "ttft_p95_s": pct(ttft, 95),
            "error_rate": round(sum(s.status != 200 and s.status != 429 for s in samples) / n, 4) if n else 0.0,
            "rate_limited_rate": round(sum(s.status == 429 for s in samples) / n, 4) if n else 0.0,
            "cost_per_1000_requests": round(price_per_hour / 3600 / rps * 1000, 5) if rps else None}


async def _run_all(url: str, model: str, api_key: str | None, prompts: list[str], concurrency: list[int],
                   rate: float | None, duration_s: float, max_tokens: int, price_per_hour: float, timeout_s: float,
                   say) -> list[dict]:
    import httpx

    ep = Endpoint(url.rstrip("/") + "/v1/chat/completions",
                  {"Authorization": f"Bearer {api_key}"} if api_key else {}, model, max_tokens)
    levels = []
    limits = httpx.Limits(max_connections=MAX_IN_FLIGHT, max_keepalive_connections=64)
    async with httpx.AsyncClient(timeout=timeout_s, limits=limits) as client:
        for c in concurrency:
            say(f"closed loop: {c} client(s) for {duration_s:g} s")
            t0 = time.perf_counter()
            samples = await _closed(client, ep, prompts, c, duration_s)
            levels.append(summarize(samples, time.perf_counter() - t0, price_per_hour, "closed", c))
        if rate:
            say(f"open loop: {rate:g} requests/s for {duration_s:g} s")
            t0 = time.perf_counter()
            samples = await _open(client, ep, prompts, rate, duration_s)
            levels.append(summarize(samples, time.perf_counter() - t0, price_per_hour, "open", rate))
    return levels


def run_loadtest(url: str, model: str, prompts: list[str], concurrency: list[int], rate: float | None = None,
                 duration_s: float = 20.0, max_tokens: int = 64, price_per_hour: float = 1.0,
                 api_key: str | None = None, timeout_s: float = 120.0, say=lambda m: None) -> list[dict]:
    """Drive ``url`` (a skilltune or any OpenAI-compatible server serving ``model``) at each level."""
    if not prompts:
        raise ValueError("no prompts to send")
    return asyncio.run(_run_all(url, model, api_key, prompts, concurrency, rate, duration_s, max_tokens,
                                price_per_hour, timeout_s, say))


def meets_expected_load(levels: list[dict], expected_rps: float, max_error_rate: float = 0.01) -> dict | None:
    """The best level that served ``expected_rps`` or more with at most 1% errors, or None."""
    good = [lv for lv in levels if lv["throughput_rps"] >= expected_rps and lv["error_rate"] <= max_error_rate]
    return min(good, key=lambda lv: lv["latency_p95_s"] or float("inf")) if good else None


def plot(levels: list[dict], out) -> None:
    """Latency (p50, p95) against throughput, one point per level."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    xs = [lv["throughput_rps"] for lv in levels]
    for key, label in (("latency_p50_s", "p50"), ("latency_p95_s", "p95")):
        ax.plot(xs, [lv[key] or 0 for lv in levels], marker="o", label=label)
    for lv, x in zip(levels, xs):
        ax.annotate(f"{lv['mode']} {lv['level']:g}", (x, lv["latency_p95_s"] or 0), fontsize=8)
    ax.set_xlabel("throughput (requests/s)")
    ax.set_ylabel("latency (s)")
    ax.set_title("skilltune load test: latency vs load")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)


def to_json(levels: list[dict], **meta) -> str:
    return json.dumps({**meta, "levels": levels}, indent=2)
