"""Serving under hostile input (issue #23), through the real server: each hostile request gets its 4xx,
and a normal request sent right after is answered at its normal latency.

The server runs with two API keys (alice, bob). A "slow model" hook makes each decode step take a
known time, so time-outs, disconnects, stalls and shutdowns can be observed on the tiny model.
"""

from __future__ import annotations

import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

KEYS = {"key-alice-0001": "alice", "key-bob-00000002": "bob"}
ALICE = {"Authorization": "Bearer key-alice-0001"}
BOB = {"Authorization": "Bearer key-bob-00000002"}
NORMAL = {"model": "svc", "messages": [{"role": "user", "content": "List all users."}], "max_tokens": 4}


def _slow(state, step_s: float):
    """Make every forward pass (one decode step) of the served model take ``step_s`` seconds."""
    model = state.engine.current.model
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return inner.register_forward_pre_hook(lambda module, args: time.sleep(step_s))


@pytest.fixture
def hostile(server):
    base, state, _ = server(api_key=KEYS, per_key_concurrency=4, request_timeout_s=20, max_tokens_limit=400)
    t0 = time.perf_counter()
    assert httpx.post(f"{base}/v1/chat/completions", json=NORMAL, headers=ALICE, timeout=30).status_code == 200
    t0 = time.perf_counter()
    assert httpx.post(f"{base}/v1/chat/completions", json=NORMAL, headers=ALICE, timeout=30).status_code == 200
    normal_s = time.perf_counter() - t0

    def still_fine():
        t = time.perf_counter()
        r = httpx.post(f"{base}/v1/chat/completions", json=NORMAL, headers=BOB, timeout=30)
        took = time.perf_counter() - t
        assert r.status_code == 200, r.text
        assert took < max(2.0, 5 * normal_s), f"normal request took {took:.2f} s (normally {normal_s:.2f} s)"

    return base, state, still_fine


def _nested(depth: int) -> dict:
    schema: dict = {"type": "string"}
    for _ in range(depth):
        schema = {"type": "object", "properties": {"a": schema}, "required": ["a"]}
    return schema


DEEP_SCHEMA = _nested(400)
LONG = "word " * 40_000  # 200,000 characters, ~40k tokens: far past the tiny model's 512-token context
HOSTILE = [
    ("malformed JSON", {"content": b'{"model": "svc", "messages": ['}, 400, "not valid JSON"),
    ("empty body", {"content": b""}, 422, "body"),
    ("a JSON array", {"content": b"[1, 2]"}, 422, "body"),
    ("missing messages", {"json": {"model": "svc"}}, 422, "messages"),
    ("non-list messages", {"json": {"model": "svc", "messages": "hi"}}, 422, "messages"),
    ("unknown role", {"json": {"model": "svc", "messages": [{"role": "wizard", "content": "x"}]}}, 422, "role"),
    ("content null", {"json": {"model": "svc", "messages": [{"role": "user", "content": None}]}}, 422, "content"),
    ("content as a list of text parts", {"json": {"model": "svc", "max_tokens": 2, "messages": [
        {"role": "user", "content": [{"type": "text", "text": "List"}, {"type": "text", "text": " users"}]}]}},
     200, None),
    ("max_tokens 10^9", {"json": {**NORMAL, "max_tokens": 10**9}}, 400, "limit"),
    ("max_tokens -5", {"json": {**NORMAL, "max_tokens": -5}}, 422, "max_tokens"),
    ("temperature -1", {"json": {**NORMAL, "temperature": -1}}, 422, "temperature"),
    ("n 9", {"json": {**NORMAL, "n": 9}}, 422, "n"),
    ("a 200k-character message", {"json": {"model": "svc", "messages": [{"role": "user", "content": LONG}]}},
     400, "maximum context length is"),
    ("non-UTF-8 bytes", {"content": b'{"model": "svc", "messages": [{"role": "user", "content": "\xff\xfe"}]}'},
     400, "not valid JSON"),
    ("a form-encoded body", {"data": {"model": "svc", "messages": "hi"}}, 422, "body"),
    # JSON escapes a lone surrogate, which no tokenizer can encode: it was a 500
    ("a lone surrogate", {"content": b'{"model": "svc", "messages": [{"role": "user", "content": "a\\ud800"}]}'},
     422, "messages.0.content: Value error, not valid Unicode: a lone surrogate '\\ud800' at character 1"),
    ("a lone surrogate in a text part", {"content": b'{"model": "svc", "messages": [{"role": "user", "content": '
                                                    b'[{"type": "text", "text": "\\udfff"}]}]}'},
     422, "messages.0.content.0.text: Value error, not valid Unicode"),
    ("a lone surrogate in a stop", {"content": b'{"model": "svc", "messages": [{"role": "user", "content": "x"}], '
                                               b'"stop": ["\\ud800"]}'}, 422, "stop.0: Value error"),
    ("an image part", {"json": {"model": "svc", "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://x/a.png"}}]}]}}, 422, "messages.0.content.0.type: "),
    ("temperature NaN", {"content": b'{"model": "svc", "messages": [{"role": "user", "content": "x"}], '
                                    b'"temperature": NaN}'}, 422, "temperature: Input should be a finite number"),
    ("many stop strings", {"json": {**NORMAL, "stop": [f"s{i}" for i in range(500)]}}, 400, "stop"),
    ("a stop string of a million characters", {"json": {**NORMAL, "stop": ["a" * 10**6]}}, 400,
     "at most 256 characters (one has 1,000,000)"),
    ("a JSON schema nested 400 deep", {"json": {**NORMAL, "response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": DEEP_SCHEMA}}}}, 400, "recursion limit"),
    ("a schema pattern that backtracks", {"json": {**NORMAL, "max_tokens": 20, "response_format": {
        "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "object", "properties": {"s": {
            "type": "string", "pattern": "^(a|aa)*(b{1,1000}){1,1000}$"}}, "required": ["s"]}}}}}, 200, None),
    ("n 8 under a schema with logprobs", {"json": {**NORMAL, "n": 8, "logprobs": True, "top_logprobs": 20,
                                                   "response_format": {"type": "json_object"}}}, 200, None),
    ("logit_bias on a token past the vocabulary", {"json": {**NORMAL, "logit_bias": {str(2**40): 100}}}, 400,
     "is not a token id of this model"),
    ("top_logprobs 10^6", {"json": {**NORMAL, "logprobs": True, "top_logprobs": 10**6}}, 422, "top_logprobs"),
    ("a body over the size limit", {"content": b'{"model": "svc", "x": "' + b"y" * (5 * 2**20) + b'"}'}, 413,
     "over this server's limit of 4,194,304 bytes"),
]


@pytest.mark.parametrize("what,kwargs,status,needle", HOSTILE, ids=[h[0] for h in HOSTILE])
def test_hostile_chat_request(hostile, what, kwargs, status, needle):
    base, state, still_fine = hostile
    headers = dict(ALICE)
    if "content" in kwargs:
        headers["content-type"] = "application/json"
    t0 = time.perf_counter()
    r = httpx.post(f"{base}/v1/chat/completions", headers=headers, timeout=30, **kwargs)
    took = time.perf_counter() - t0
    assert r.status_code == status, r.text
    if needle:
        assert needle in r.json()["error"]["message"]
    if what == "a 200k-character message":
        assert r.json()["error"]["code"] == "context_length_exceeded" and took < 2.0
    if status >= 400:  # logged with its real status and the client's name
        row = state.log.rows()[-1]
        assert (row["status"], row["client"]) == (status, "alice")
    still_fine()


def test_a_body_that_trickles_in_gets_a_408_and_frees_the_keys_slot(server):
    import socket

    base, state, _ = server(api_key=KEYS, per_key_concurrency=1, body_timeout_s=1.0)
    port = int(base.rsplit(":", 1)[1])
    body = b'{"model": "svc", "messages": [{"role": "user", "content": "List all users."}], "max_tokens": 2}'
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     b"Authorization: Bearer key-alice-0001\r\n"
                     + f"Content-Length: {len(body)}\r\n\r\n".encode() + body[:10])
        time.sleep(0.3)  # alice's one slot is held by the trickling request; bob is served meanwhile
        assert httpx.post(f"{base}/v1/chat/completions", json=NORMAL, headers=BOB, timeout=30).status_code == 200
        t0 = time.perf_counter()
        reply = b""
        while b"did not arrive" not in reply and (part := sock.recv(4096)):  # headers and body may come apart
            reply += part
        reply = reply.decode()
        assert reply.startswith("HTTP/1.1 408") and "did not arrive within 1 s" in reply, reply
        assert time.perf_counter() - t0 < 3
    # the slot is free again: alice's next request is answered, not a 429
    assert httpx.post(f"{base}/v1/chat/completions", json=NORMAL, headers=ALICE, timeout=30).status_code == 200
    assert any(r["status"] == 408 and r["client"] == "alice" for r in state.log.rows())


def test_a_chunked_body_over_the_limit_is_a_413(hostile):
    base, state, still_fine = hostile

    def chunks():  # no Content-Length: the limit is found while the body streams in
        yield b'{"model": "svc", "x": "'
        for _ in range(6):
            yield b"y" * 2**20
        yield b'"}'

    r = httpx.post(f"{base}/v1/chat/completions", content=chunks(), timeout=30,
                   headers={**ALICE, "content-type": "application/json"})
    assert r.status_code == 413 and "over this server's limit" in r.json()["error"]["message"], r.text
    assert state.log.rows()[-1]["status"] == 413
    still_fine()


def test_context_limit_names_both_numbers(hostile):
    base, state, still_fine = hostile
    limit = state.prompt_limit(state.engine.current)
    text = "SELECT name FROM users WHERE region = 'EU' " * 60
    r = httpx.post(f"{base}/v1/chat/completions", headers=ALICE, timeout=30,
                   json={"model": "svc", "max_tokens": 60, "messages": [{"role": "user", "content": text}]})
    msg = r.json()["error"]["message"]
    assert r.status_code == 400 and f"maximum context length is {limit} tokens" in msg and "in the messages" in msg
    submitted = []
    state.engine.submit = lambda *a, **k: submitted.append(a)  # nothing over a limit may reach the engine
    r = httpx.post(f"{base}/v1/chat/completions", headers=ALICE, timeout=30,
                   json={"model": "svc", "messages": [{"role": "user", "content": LONG}]})
    assert r.status_code == 400 and submitted == []


def test_prompt_list_on_completions(hostile):
    base, _, still_fine = hostile
    r = httpx.post(f"{base}/v1/completions", headers=ALICE, json={"model": "svc", "prompt": ["a", "b"]})
    assert r.status_code == 400 and "one prompt" in r.json()["error"]["message"]
    still_fine()


def test_a_client_that_disconnects_mid_stream(hostile):
    base, _, still_fine = hostile
    with httpx.stream("POST", f"{base}/v1/chat/completions", headers=ALICE, timeout=30,
                      json={**NORMAL, "stream": True, "max_tokens": 16}) as r:
        assert r.status_code == 200
        next(r.iter_lines())
    still_fine()


def test_a_client_that_leaves_a_stream_of_8_answers_frees_every_row(hostile):
    """n 8 streamed with logprobs, slowly: the client reads one chunk and leaves; all eight rows leave the engine
    at its next steps (not decoded to their 200-token budget) and the server answers normally after."""
    base, state, still_fine = hostile
    hook = _slow(state, 0.05)  # 200 tokens would take 10 s
    try:
        with httpx.stream("POST", f"{base}/v1/chat/completions", headers=ALICE, timeout=30,
                          json={**NORMAL, "stream": True, "max_tokens": 200, "n": 8, "temperature": 1.0,
                                "logprobs": True, "top_logprobs": 5}) as r:
            assert r.status_code == 200
            next(r.iter_lines())
        t0 = time.monotonic()
        while state.engine.busy_since is None and time.monotonic() - t0 < 2:
            time.sleep(0.01)  # (it may already have left)
        while state.engine.busy_since is not None and time.monotonic() - t0 < 3:
            time.sleep(0.02)
        assert state.engine.busy_since is None and state.engine.pending() == 0
    finally:
        hook.remove()
    still_fine()


def test_echo_of_a_long_prompt_is_scored_in_chunks_and_times_out_cleanly(hostile):
    """echo with max_tokens 0, n 8 and logprobs 5 on a long prompt: scored once, a chunk at a time, answered; past
    the time-out it stops between chunks with a 504, and the server answers normally after."""
    base, state, still_fine = hostile
    ask = {"model": "svc", "prompt": "SELECT name FROM users; " * 60, "max_tokens": 0, "echo": True, "n": 8,
           "logprobs": 5}
    forwards = []
    model = state.engine.current.model
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    hook = inner.register_forward_pre_hook(lambda module, args: forwards.append(1))
    try:
        r = httpx.post(f"{base}/v1/completions", headers=ALICE, json=ask, timeout=60)
    finally:
        hook.remove()
    assert r.status_code == 200, r.text
    choices = r.json()["choices"]
    n_tokens = len(choices[0]["logprobs"]["tokens"])
    assert len(choices) == 8 and all(c["logprobs"] == choices[0]["logprobs"] for c in choices)
    assert n_tokens > 300 and len(forwards) == -(-(n_tokens - 1) // 256)  # scored once, 256 positions a pass
    hook = _slow(state, 0.3)
    try:
        state.request_timeout_s = 0.2
        r = httpx.post(f"{base}/v1/completions", headers=ALICE, json=ask, timeout=30)
        assert r.status_code == 504 and "scoring the prompt" in r.json()["error"]["message"], r.text
    finally:
        hook.remove()
        state.request_timeout_s = 20
    still_fine()


def test_64_concurrent_clients_on_one_key_cannot_starve_another(hostile):
    base, state, still_fine = hostile
    hook = _slow(state, 0.02)
    try:
        def alice(_):
            r = httpx.post(f"{base}/v1/chat/completions", headers=ALICE, json={**NORMAL, "max_tokens": 8}, timeout=60)
            return r.status_code, r.headers.get("retry-after")

        with ThreadPoolExecutor(64) as pool:
            flood = pool.map(alice, range(64))
            time.sleep(0.1)
            bob = httpx.post(f"{base}/v1/chat/completions", headers=BOB, json=NORMAL, timeout=60)
            results = list(flood)
    finally:
        hook.remove()
    statuses = [s for s, _ in results]
    assert bob.status_code == 200
    assert set(statuses) <= {200, 429} and statuses.count(200) >= 4 and statuses.count(429) > 0
    assert all(ra for s, ra in results if s == 429)
    still_fine()


def test_a_timed_out_request_frees_the_engine_at_its_next_step(hostile):
    base, state, still_fine = hostile
    hook = _slow(state, 0.05)  # 200 new tokens would take 10 s
    try:
        state.request_timeout_s = 0.5
        t0 = time.perf_counter()
        r = httpx.post(f"{base}/v1/completions", headers=ALICE, timeout=30,
                       json={"model": "svc", "prompt": "SELECT", "max_tokens": 200})
        assert r.status_code == 504 and r.json()["error"]["type"] == "timeout"
        assert time.perf_counter() - t0 < 3
        deadline = time.monotonic() + 2
        while state.engine.busy_since is not None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert state.engine.busy_since is None  # decoding stopped, not run to 200 tokens
    finally:
        hook.remove()
        state.request_timeout_s = 20
    assert state.log.rows()[-1]["status"] == 504
    still_fine()


def test_a_client_that_leaves_frees_the_engine(hostile):
    base, state, still_fine = hostile
    hook = _slow(state, 0.05)
    try:
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{base}/v1/completions", headers=ALICE, timeout=0.4,
                       json={"model": "svc", "prompt": "SELECT", "max_tokens": 200})
        deadline = time.monotonic() + 3
        while state.engine.busy_since is None and time.monotonic() < deadline:  # it was running...
            time.sleep(0.01)
        while state.engine.busy_since is not None and time.monotonic() < deadline:  # ...and stops early
            time.sleep(0.02)
        assert state.engine.busy_since is None
    finally:
        hook.remove()
    time.sleep(0.3)
    assert state.log.rows()[-1]["status"] == 499
    still_fine()


def test_ready_says_503_when_the_engine_is_stuck_while_health_stays_200(server):
    base, state, _ = server(ready_stall_s=0.3)
    assert httpx.get(f"{base}/ready").status_code == 200
    hook = _slow(state, 1.5)
    try:
        worker = threading.Thread(target=lambda: httpx.post(f"{base}/v1/completions", timeout=30,
                                                            json={"model": "svc", "prompt": "x", "max_tokens": 2}))
        worker.start()
        time.sleep(0.9)
        r = httpx.get(f"{base}/ready")
        assert r.status_code == 503 and "no progress" in r.json()["reason"] and r.json()["busy"] is True
        assert httpx.get(f"{base}/health").status_code == 200
        worker.join()
    finally:
        hook.remove()
    assert httpx.get(f"{base}/ready").status_code == 200


def test_sigterm_finishes_in_flight_requests_then_exits(server):
    base, state, _ = server(grace_period_s=10)
    srv = server.last
    hook = _slow(state, 0.05)
    answer = {}

    def slow_request():
        answer["r"] = httpx.post(f"{base}/v1/completions", timeout=30,
                                 json={"model": "svc", "prompt": "SELECT", "max_tokens": 30})

    t = threading.Thread(target=slow_request)
    t.start()
    deadline = time.monotonic() + 5
    while state.engine.busy_since is None and time.monotonic() < deadline:
        time.sleep(0.01)
    srv.handle_exit(signal.SIGTERM, None)
    assert state.draining and state.readiness()[0] is False
    t.join(timeout=20)
    hook.remove()
    assert answer["r"].status_code == 200 and answer["r"].json()["usage"]["completion_tokens"] > 0
    for _ in range(100):
        if not srv.started or srv.should_exit:
            break
        time.sleep(0.05)
    with pytest.raises(httpx.HTTPError):  # no longer accepting
        httpx.get(f"{base}/health", timeout=2)


def test_keys_file_names_clients(tmp_path):
    from skilltune.errors import SkilltuneError
    from skilltune.serve.clients import client_name, load_api_keys

    f = tmp_path / "keys"
    f.write_text("# team keys\nanalytics: sk-analytics-123\nsupport:sk-support-4567  # the help desk\n")
    keys = load_api_keys(None, f)
    assert keys == {"sk-analytics-123": "analytics", "sk-support-4567": "support"}
    assert client_name(keys, "Bearer sk-support-4567") == "support" and client_name(keys, "Bearer nope") is None
    f.write_text("broken line\n")
    with pytest.raises(SkilltuneError, match="keys:1"):
        load_api_keys(None, f)
    # asking for auth and getting none is an error, never a server without auth
    f.write_text("# nobody yet\n\n")
    with pytest.raises(SkilltuneError, match="holds no keys .* without authentication"):
        load_api_keys(None, f)
    f.write_bytes(b"alice:sk-\xff\xfe-key\n")
    with pytest.raises(SkilltuneError, match="not UTF-8"):
        load_api_keys(None, f)


def test_a_short_or_missing_key_in_the_environment_is_refused(monkeypatch):
    from skilltune.errors import SkilltuneError
    from skilltune.serve.clients import load_api_keys

    monkeypatch.setenv("K_SHORT", "abc")
    with pytest.raises(SkilltuneError, match="the key is 3 characters; at least 8"):
        load_api_keys("K_SHORT")
    monkeypatch.delenv("K_UNSET", raising=False)
    with pytest.raises(SkilltuneError, match="empty or unset"):
        load_api_keys("K_UNSET")
    monkeypatch.setenv("K_OK", "s3cret-long-key")
    assert load_api_keys("K_OK") == {"s3cret-long-key": "default"}


def test_per_key_rate_limit():
    from skilltune.serve.clients import KeyLimits

    limits = KeyLimits(concurrency=100, rate=2.0)  # bursts of 4, then 2 a second
    got = [limits.acquire("a") for _ in range(6)]
    assert got[:4] == [None] * 4 and all(w is not None and w >= 1 for w in got[4:])
    assert limits.acquire("b") is None  # another client has its own bucket
