"""The OpenAI-compatible server, driven by the official openai client; auth; errors; load + hot rollback."""

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch
from helpers import SQL_ROWS, cli, write_jsonl

from skilltune.registry.api import Registry


def test_openai_client_chat_stream_completions_models(server):
    from openai import OpenAI

    base, state, _ = server()
    client = OpenAI(base_url=f"{base}/v1", api_key="unused")
    r = client.chat.completions.create(model="svc", messages=[{"role": "user", "content": "List all users."}],
                                       max_tokens=8, temperature=0)
    assert r.model == "svc@v1" and r.choices[0].message.role == "assistant"
    assert r.usage.completion_tokens <= 8
    chunks = list(client.chat.completions.create(model="svc", messages=[{"role": "user", "content": "List all users."}],
                                                 max_tokens=8, temperature=0, stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    # greedy decoding: the streamed chunks join to exactly the answer the non-streamed request got
    assert text == r.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == r.choices[0].finish_reason
    c = client.completions.create(model="svc", prompt="SELECT", max_tokens=5)
    assert c.model == "svc@v1" and c.choices[0].finish_reason in ("stop", "length")
    models = client.models.list()
    assert [m.id for m in models.data] == ["svc"]
    raw = httpx.post(f"{base}/v1/chat/completions", json={"model": "svc", "stream": True, "max_tokens": 4,
                                                          "messages": [{"role": "user", "content": "x"}]})
    assert raw.text.rstrip().endswith("data: [DONE]") and raw.text.startswith("data: {")
    rows = state.log.rows()  # every request, the model listing too, each with its real status
    assert [(r["route"], r["status"]) for r in rows] == [
        ("/v1/chat/completions", 200), ("/v1/chat/completions", 200), ("/v1/completions", 200), ("/v1/models", 200),
        ("/v1/chat/completions", 200)]


@pytest.mark.parametrize("body,status,needle", [
    ('{"model": "svc", "messages": [', 400, "not valid JSON"),
    ('{"model": "nope", "messages": [{"role": "user", "content": "x"}]}', 404, "not served here"),
    ('{"model": "svc"}', 422, "messages"),
    ('{"model": "svc", "messages": []}', 422, "messages"),
    ('{"model": "svc", "messages": [{"role": "wizard", "content": "x"}]}', 422, "role"),
    ('{"model": "svc", "messages": [{"role": "user", "content": "x"}], "max_tokens": 100000}', 400, "limit"),
    ('{"model": "svc", "messages": [{"role": "user", "content": "x"}], "temperature": -1}', 422, "temperature"),
    ('[1, 2]', 422, "body"),
])
def test_bad_requests_get_4xx_with_openai_error_body(server, body, status, needle):
    base, _, _ = server()
    r = httpx.post(f"{base}/v1/chat/completions", content=body, headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert needle in err["message"] and "type" in err
    assert "/" not in err["message"].replace("max_tokens", "")  # no server paths


def test_auth_on_every_route_but_health(server):
    base, _, _ = server(api_key="s3cret")
    routes = [("POST", "/v1/chat/completions", {"model": "svc", "messages": [{"role": "user", "content": "x"}],
                                                "max_tokens": 2}),
              ("POST", "/v1/completions", {"model": "svc", "prompt": "x", "max_tokens": 2}),
              ("GET", "/v1/models", None), ("GET", "/metrics", None)]
    for method, path, body in routes:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
            r = httpx.request(method, base + path, json=body, headers=headers)
            assert r.status_code == 401, (path, headers)
            assert r.json()["error"]["type"] == "authentication_error"
        r = httpx.request(method, base + path, json=body, headers={"Authorization": "Bearer s3cret"})
        assert r.status_code == 200, (path, r.text)
    assert httpx.get(base + "/health").status_code == 200


def test_metrics_are_prometheus(server):
    base, _, _ = server()
    httpx.post(f"{base}/v1/completions", json={"model": "svc", "prompt": "x", "max_tokens": 2})
    text = httpx.get(base + "/metrics").text
    assert "skilltune_requests_total" in text and "skilltune_request_latency_seconds_bucket" in text
    assert 'skilltune_model_version{name="svc",version="svc@v1"} 1.0' in text


def test_queue_full_returns_429(server):
    base, state, _ = server(queue_size=1)
    state.engine.max_batch = 1

    def call(_):
        return httpx.post(f"{base}/v1/completions", json={"model": "svc", "prompt": "x", "max_tokens": 48},
                          timeout=60)

    with ThreadPoolExecutor(12) as pool:
        codes = [r.status_code for r in pool.map(call, range(24))]
    assert 429 in codes and 200 in codes and set(codes) <= {200, 429}


def test_a_promoted_version_that_cannot_load_is_tried_once_and_reported(server, monkeypatch):
    from skilltune.serve import server as server_module

    base, state, reg = server()
    real, tries = server_module.load_version, []

    def broken_v2(registry, ref, *args):
        if ref == "svc@v2":
            tries.append(ref)
            raise OSError("svc@v2: adapter_model.safetensors is truncated")
        return real(registry, ref, *args)

    monkeypatch.setattr(server_module, "load_version", broken_v2)
    reg.promote("svc@v2", reason="a bad release")
    time.sleep(1.0)  # ten polls of the alias
    assert tries == ["svc@v2"]  # not reloaded at every poll
    health = httpx.get(f"{base}/health").json()
    assert health["version"] == "svc@v1" and "svc@v2, which could not be loaded" in health["alias_problem"]
    assert "still serving svc@v1" in httpx.get(f"{base}/ready").json()["alias_problem"]
    r = httpx.post(f"{base}/v1/chat/completions", json={"model": "svc", "messages": [{"role": "user", "content": "q"}],
                                                         "max_tokens": 2})
    assert r.status_code == 200 and r.json()["model"] == "svc@v1"
    reg.rollback("svc", reason="back")  # the alias points at what is served again: the problem is gone
    time.sleep(0.5)
    assert "alias_problem" not in httpx.get(f"{base}/health").json()
    monkeypatch.setattr(server_module, "load_version", real)  # fixed: promoting it again is tried again
    reg.promote("svc@v2", reason="fixed")
    deadline = time.time() + 30
    while httpx.get(f"{base}/health").json()["version"] != "svc@v2" and time.time() < deadline:
        time.sleep(0.1)
    assert httpx.get(f"{base}/health").json()["version"] == "svc@v2"
    reg.rollback("svc", reason="leave the module's registry as it was")  # the alias back on v1


def test_load_with_hot_rollback_mid_way(server):
    """8 clients x 25 requests, 0 errors; a promote then a rollback happen in the middle."""
    base, state, reg = server()
    results = []
    lock = threading.Lock()
    done = [0]

    def client(k):
        with httpx.Client(timeout=60) as http:
            for i in range(25):
                t = time.time()
                r = http.post(f"{base}/v1/chat/completions",
                              json={"model": "svc", "messages": [{"role": "user", "content": f"q {k} {i}"}],
                                    "max_tokens": 4})
                with lock:
                    results.append((t, r.status_code, r.json().get("model"), r.headers.get("x-skilltune-version"),
                                time.time()))
                    done[0] += 1

    threads = [threading.Thread(target=client, args=(k,)) for k in range(8)]
    for th in threads:
        th.start()
    while done[0] < 60:
        time.sleep(0.01)
    before_promote = time.time()
    reg.promote("svc@v2", reason="load test")
    while done[0] < 130:
        time.sleep(0.01)
    reg.rollback("svc", reason="load test rollback")
    t_rollback = time.time()
    for th in threads:
        th.join()
    assert len(results) == 200 and all(code == 200 for _, code, _, _, _ in results)
    assert all(model == header for _, _, model, header, _ in results)
    versions = [m for _, _, m, _, _ in sorted(results)]
    assert versions[0] == "svc@v1" and "svc@v2" in versions and versions[-1] == "svc@v1"
    # answered before the promote began: v1 only (a request sent while it ran may get v2, which is
    # right); sent after the rollback settled: v1 only again
    assert all(m == "svc@v1" for _, _, m, _, answered in results if answered < before_promote)
    assert all(m == "svc@v1" for sent, _, m, _, _ in results if sent > t_rollback + 2)
    assert len(state.log.rows()) == 200


@pytest.mark.usefixtures("db_backend")
def test_request_log_redacts_pii(server):
    base, state, _ = server()
    httpx.post(f"{base}/v1/chat/completions", json={"model": "svc", "max_tokens": 2, "messages": [
        {"role": "user", "content": "my email is jane@example.com"}]})
    row = state.log.rows()[-1]
    assert "jane@example.com" not in row["prompt"] and "[EMAIL]" in row["prompt"] and row["status"] == 200


def test_vllm_command_and_monitor(registered, monkeypatch):
    from skilltune.serve.monitor import drift
    from skilltune.serve.server import vllm_command

    url, base = registered
    monkeypatch.setenv("SKILLTUNE_HOME", str(base / "home"))
    cmd = vllm_command(Registry(url, store=base / "home" / "registry" / "store"), "svc@production", "0.0.0.0", 8001)
    assert cmd[:3] == ["vllm", "serve", cmd[2]] and "--enable-lora" in cmd
    assert any(c.startswith("svc=") for c in cmd) and cmd[-1] == "8001"
    code, out = cli("serve", "svc@production", "--engine", "vllm", "--registry-url", url)
    assert code == 0 and "vllm serve" in out, out
    same = drift(["count the users", "list the orders"] * 10, ["count the users"] * 5)
    shifted = drift(["count the users", "list the orders"] * 10,
                    ["please write a long poem about the ocean and the stars tonight"] * 5)
    assert same["score"] < 0.5 and shifted["score"] > 0.5


def test_request_log_rotates_by_size(tmp_path):
    from skilltune.serve.requestlog import RequestLog

    log = RequestLog(tmp_path / "r.db", max_bytes=40_000)
    for i in range(200):
        log.write("m@v1", "chat", "x" * 200, "y" * 200, 0.1, 10, 10, 200)
    assert (tmp_path / "r.db.1").is_file()
    assert 0 < len(log.rows()) < 200
    log.close()


def test_per_request_timeout_is_504(server):
    base, state, _ = server()
    state.request_timeout_s = 0.0001
    r = httpx.post(f"{base}/v1/completions", json={"model": "svc", "prompt": "x", "max_tokens": 48}, timeout=60)
    assert r.status_code == 504 and r.json()["error"]["type"] == "timeout"
    state.request_timeout_s = 60
    assert httpx.post(f"{base}/v1/completions", json={"model": "svc", "prompt": "x", "max_tokens": 2}).status_code == 200


def test_monitor_summarize_needs_enough_requests(tmp_path, db_backend):
    import os

    from skilltune.serve.monitor import summarize
    from skilltune.serve.requestlog import RequestLog

    train = write_jsonl(tmp_path / "train.jsonl", SQL_ROWS)
    log = RequestLog(os.environ.get("SKILLTUNE_REQUESTLOG_URL") or tmp_path / "r.db", service="m")
    log.write("m@v1", "chat", "write me a poem about whales and the sea at night", "SELECT 1;", 0.5, 10, 3, 200)
    log.write("m@v1", "chat", "x", "", 0.1, 1, 0, 200)
    s = summarize(log, str(train), 0.25)
    assert s["requests"] == 2 and s["error_rate"] == 0.0 and s["latency_p50_s"] == 0.3
    assert s["drift"]["flagged"] is False and "needs 20" in s["drift"]["note"]
    for _ in range(25):
        log.write("m@v1", "chat", "write me a poem about whales and the sea at night", "SELECT 1;", 0.5, 10, 3, 200)
    s = summarize(log, str(train), 0.25)
    assert s["drift"]["flagged"] is True and s["drift"]["oov_rate"] > 0.5
    log.close()


@pytest.mark.usefixtures("db_backend")
def test_failures_reach_the_log_through_the_real_server(server, monkeypatch):
    """A bad request, an auth failure, a 429 and a forced engine error, each logged by the server with its status."""
    from skilltune.model import decode
    from skilltune.serve.engine import QueueFull

    base, state, _ = server(api_key={"k-12345678": "ci"})
    auth = {"Authorization": "Bearer k-12345678"}
    httpx.post(f"{base}/v1/chat/completions", json={"model": "svc"}, headers=auth)  # 422
    httpx.get(f"{base}/v1/models")  # 401
    original = state.engine.submit
    state.engine.submit = lambda *a, **k: (_ for _ in ()).throw(QueueFull())
    httpx.post(f"{base}/v1/completions", json={"model": "svc", "prompt": "x", "max_tokens": 2}, headers=auth)  # 429
    state.engine.submit = original
    state.engine._generate = lambda loaded, live: (_ for _ in ()).throw(RuntimeError("engine broke"))  # static
    monkeypatch.setattr(decode.DecodeBatch, "admit",  # continuous
                        lambda *a: (_ for _ in ()).throw(RuntimeError("engine broke")))
    r = httpx.post(f"{base}/v1/completions", json={"model": "svc", "prompt": "x", "max_tokens": 2}, headers=auth)
    assert r.status_code == 500 and "engine broke" not in r.text  # no internals leak
    rows = state.log.rows()
    assert [(x["status"], x["client"]) for x in rows] == [(422, "ci"), (401, "unauthenticated"), (429, "ci"),
                                                          (500, "ci")]
    assert rows[-1]["error"] == "internal server error"
    metrics = httpx.get(f"{base}/metrics", headers=auth).text
    assert 'route="/v1/completions",status="500"' in metrics and 'route="/v1/models",status="401"' in metrics


def test_streaming_sends_each_token_as_it_is_decoded(server):
    """Token-by-token SSE: the first chunk arrives after the prefill, long before the answer is finished;
    the chunks join to the non-streamed answer; the request log records the whole answer once."""
    from openai import OpenAI

    base, state, _ = server()
    model = state.engine.current.model
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    client = OpenAI(base_url=f"{base}/v1", api_key="unused")
    ask = {"model": "svc", "prompt": "SELECT name FROM", "max_tokens": 12, "temperature": 0}
    whole = client.completions.create(**ask)
    hook = inner.register_forward_pre_hook(lambda module, args: time.sleep(0.15))  # every decode step: 0.15 s
    try:
        t0 = time.perf_counter()
        arrivals, texts = [], []
        for chunk in client.completions.create(**ask, stream=True):
            if chunk.choices[0].text:
                arrivals.append(time.perf_counter() - t0)
                texts.append(chunk.choices[0].text)
        total = time.perf_counter() - t0
    finally:
        hook.remove()
    assert "".join(texts) == whole.choices[0].text
    n_tokens = whole.usage.completion_tokens
    assert n_tokens >= 6, whole  # enough decode steps to see them arrive one by one
    assert len(texts) >= n_tokens // 2  # pieces, not one blob
    assert arrivals[0] < 0.5 * total  # the first piece long before the end
    rows = state.log.rows()
    assert rows[-1]["output"] == whole.choices[0].text and rows[-1]["status"] == 200
    assert rows[-1]["completion_tokens"] == n_tokens


def test_streaming_holds_back_a_stop_sequence(server):
    from openai import OpenAI

    base, state, _ = server()
    client = OpenAI(base_url=f"{base}/v1", api_key="unused")
    ask = {"model": "svc", "prompt": "SELECT name FROM", "max_tokens": 12, "temperature": 0}
    whole = client.completions.create(**ask).choices[0].text
    assert len(whole) > 4, whole
    stop = whole[len(whole) // 2: len(whole) // 2 + 3]
    expected = client.completions.create(**ask, stop=[stop]).choices[0]
    chunks = list(client.completions.create(**ask, stop=[stop], stream=True))
    assert "".join(c.choices[0].text for c in chunks) == expected.text == whole[:whole.index(stop)]
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert state.log.rows()[-1]["output"] == expected.text


@pytest.mark.parametrize("continuous", [True, False])
def test_a_stop_sequence_ends_decoding(server, continuous):
    """A request's stop sequence ends its decoding at the token that completes it: the row is freed and
    usage counts the tokens decoded, not the whole budget (streamed or not, continuous or static)."""
    from openai import OpenAI

    base, state, _ = server(continuous_batching=continuous)
    client = OpenAI(base_url=f"{base}/v1", api_key="unused")
    ask = {"model": "svc", "prompt": "SELECT name FROM", "max_tokens": 40, "temperature": 0}
    whole = client.completions.create(**ask)
    assert whole.usage.completion_tokens == 40 and whole.choices[0].finish_reason == "length", whole
    text = whole.choices[0].text
    stop = text[4:7]
    cut = text[:text.index(stop)]
    early = client.completions.create(**ask, stop=[stop])
    assert early.choices[0].text == cut and early.choices[0].finish_reason == "stop"
    assert early.usage.completion_tokens <= 12, early.usage  # 40 before stop sequences ended decoding
    chunks = list(client.completions.create(**ask, stop=[stop], stream=True))
    assert "".join(c.choices[0].text for c in chunks) == cut and chunks[-1].choices[0].finish_reason == "stop"
    deadline = time.monotonic() + 5
    while len(state.log.rows()) < 3 and time.monotonic() < deadline:  # a stream is logged once its body is sent
        time.sleep(0.02)
    assert sorted(r["completion_tokens"] for r in state.log.rows()) == [early.usage.completion_tokens] * 2 + [40]


@pytest.mark.parametrize("option", [
    {"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]},
    {"tool_choice": "auto"}, {"audio": {"voice": "alloy"}}])
def test_options_the_server_does_not_compute_are_refused_by_name(server, option):
    """An answer that silently ignores tools or audio is worse than a 400 naming them."""
    base, _, _ = server()
    body = {"model": "svc", "max_tokens": 2, "messages": [{"role": "user", "content": "x"}]}
    r = httpx.post(f"{base}/v1/chat/completions", json={**body, **option})
    name = next(k for k in option if k != "temperature")
    assert r.status_code == 400 and r.json()["error"]["param"] == name, r.text
    assert r.json()["error"]["code"] == "unsupported_parameter" and f"'{name}' is not supported" in r.text
    harmless = {"logprobs": False, "response_format": {"type": "text"}, "top_p": 0.5, "tool_choice": "none",
                "user": "u1", "seed": 3, "presence_penalty": 0}  # top_p at temperature 0: greedy either way
    assert httpx.post(f"{base}/v1/chat/completions", json={**body, **harmless}).status_code == 200


@pytest.mark.parametrize("continuous", [True, False], ids=["running batch", "static batches"])
def test_top_p_is_served_per_request(server, continuous):
    """A nucleus of one token is the greedy answer, however hot the temperature; requests with other top_p
    values in the same batch keep theirs."""
    base, _, _ = server(continuous_batching=continuous)
    body = {"model": "svc", "max_tokens": 8, "messages": [{"role": "user", "content": "List all users."}]}
    greedy = httpx.post(f"{base}/v1/chat/completions", json=body).json()["choices"][0]["message"]["content"]
    with ThreadPoolExecutor(6) as pool:
        narrow = pool.map(lambda _: httpx.post(f"{base}/v1/chat/completions", timeout=60,
                                               json={**body, "temperature": 2.0, "top_p": 1e-6}), range(3))
        wide = pool.map(lambda _: httpx.post(f"{base}/v1/chat/completions", timeout=60,
                                             json={**body, "temperature": 2.0, "top_p": 1.0}), range(3))
        narrow, wide = list(narrow), list(wide)
    assert all(r.status_code == 200 for r in narrow + wide)
    assert [r.json()["choices"][0]["message"]["content"] for r in narrow] == [greedy] * 3
    for bad in (0, 1.5, -0.1):
        r = httpx.post(f"{base}/v1/chat/completions", json={**body, "temperature": 1.0, "top_p": bad})
        assert r.status_code == 422 and r.json()["error"]["param"] == "top_p", r.text


def test_a_seed_makes_a_sampled_answer_repeatable_whatever_shares_its_batch(server):
    base, _, _ = server(precision="fp32")  # bf16 logits move with the batch's shape enough to flip a near draw
    body = {"model": "svc", "max_tokens": 8, "temperature": 1.5, "messages": [{"role": "user", "content": "q"}]}

    def ask(extra):
        r = httpx.post(f"{base}/v1/chat/completions", json={**body, **extra}, timeout=60)
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["message"]["content"]

    alone = ask({"seed": 7})
    assert ask({"seed": 7}) == alone
    with ThreadPoolExecutor(6) as pool:  # in a running batch with unseeded and other-seeded rows: its own stream
        together = list(pool.map(ask, [{"seed": 7}, {}, {"seed": 8}, {"seed": 7}, {}, {"seed": 9}]))
    assert together[0] == together[3] == alone
    assert len({ask({"seed": s}) for s in range(10, 16)}) > 1  # seeds do differ (tiny model, 8 tokens at 1.5)


@pytest.mark.parametrize("continuous", [True, False], ids=["running batch", "static batches"])
def test_n_answers_in_one_request(server, continuous):
    """n answers are n rows: with a seed, answer i is the one seed + i gives alone (so they differ and repeat);
    greedy answers are all the greedy one; usage counts the prompt once and every answer's tokens."""
    from openai import OpenAI

    # fp32: bf16 logits move with the batch's shape enough to flip a near draw
    base, state, _ = server(precision="fp32", continuous_batching=continuous)
    client = OpenAI(base_url=f"{base}/v1", api_key="unused")
    ask = {"model": "svc", "messages": [{"role": "user", "content": "q"}], "max_tokens": 8}
    many = client.chat.completions.create(**ask, n=4, temperature=1.5, seed=5)
    alone = [client.chat.completions.create(**ask, temperature=1.5, seed=5 + i) for i in range(4)]
    assert [c.index for c in many.choices] == [0, 1, 2, 3]
    assert [c.message.content for c in many.choices] == [a.choices[0].message.content for a in alone]
    assert len({c.message.content for c in many.choices}) > 1
    assert many.usage.completion_tokens == sum(a.usage.completion_tokens for a in alone)
    assert many.usage.prompt_tokens == alone[0].usage.prompt_tokens
    greedy = client.chat.completions.create(**ask).choices[0].message.content
    assert [c.message.content for c in client.chat.completions.create(**ask, n=3).choices] == [greedy] * 3
    done = client.completions.create(model="svc", prompt="SELECT", max_tokens=4, n=2, temperature=1.0, seed=1)
    assert [c.index for c in done.choices] == [0, 1]
    assert state.log.rows()[-1]["completion_tokens"] == done.usage.completion_tokens
    r = httpx.post(f"{base}/v1/chat/completions", json={**ask, "n": 9})
    assert r.status_code == 422 and r.json()["error"]["param"] == "n", r.text


@pytest.mark.parametrize("continuous", [True, False], ids=["running batch", "static batches"])
def test_n_answers_stream_interleaved_by_index(server, continuous):
    """A streamed request with n answers: each index's chunks join to the answer the same request gives
    unstreamed, each index ends with its own finish reason (a stop sequence cuts only the answers holding it),
    usage counts them all, and the request log records answer 0."""
    from openai import OpenAI

    base, state, _ = server(precision="fp32", continuous_batching=continuous)
    client = OpenAI(base_url=f"{base}/v1", api_key="unused")
    ask = {"model": "svc", "messages": [{"role": "user", "content": "q"}], "max_tokens": 10, "n": 3,
           "temperature": 1.5, "seed": 11}
    whole = client.chat.completions.create(**ask)
    texts = [c.message.content for c in whole.choices]
    assert len(set(texts)) > 1, texts  # the answers differ: interleaving is seen
    stop = next(t[2:4] for t in texts if len(t) > 4)  # in this answer (maybe others): it ends there
    cut = [t[:t.index(stop)] if stop in t else t for t in texts]
    finishes = ["stop" if stop in t else c.finish_reason for t, c in zip(texts, whole.choices)]
    for stops, expected, reasons in (([], texts, [c.finish_reason for c in whole.choices]), ([stop], cut, finishes)):
        chunks = list(client.chat.completions.create(**ask, stop=stops or None, stream=True,
                                                     stream_options={"include_usage": True}))
        by_index: dict[int, list] = {0: [], 1: [], 2: []}
        for chunk in chunks[:-1]:
            (choice,) = chunk.choices
            by_index[choice.index].append(choice)
        assert ["".join(c.delta.content or "" for c in by_index[i]) for i in range(3)] == expected
        assert [[c.finish_reason for c in by_index[i] if c.finish_reason] for i in range(3)] == [[r] for r in reasons]
        assert all(by_index[i][-1].finish_reason for i in range(3))  # the finish reason is each index's last chunk
        assert all(by_index[i][0].delta.role == "assistant" for i in range(3))
        assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens >= 3
    assert chunks[-1].usage.completion_tokens <= whole.usage.completion_tokens
    usage = client.chat.completions.create(**ask, stream=True, stream_options={"include_usage": True})
    assert list(usage)[-1].usage.completion_tokens == whole.usage.completion_tokens
    deadline = time.monotonic() + 5
    while state.log.rows()[-1]["completion_tokens"] != whole.usage.completion_tokens and time.monotonic() < deadline:
        time.sleep(0.02)  # a stream is logged once its body is sent
    assert state.log.rows()[-1]["output"] == texts[0]
    assert state.log.rows()[-1]["completion_tokens"] == whole.usage.completion_tokens
    streamed = list(client.completions.create(model="svc", prompt="SELECT", max_tokens=6, n=2, temperature=1.0,
                                              seed=3, stream=True))
    alone = client.completions.create(model="svc", prompt="SELECT", max_tokens=6, n=2, temperature=1.0, seed=3)
    assert ["".join(c.choices[0].text for c in streamed if c.choices[0].index == i) for i in (0, 1)] == \
        [c.text for c in alone.choices]


@pytest.mark.parametrize("continuous", [True, False], ids=["running batch", "static batches"])
def test_penalties_and_logit_bias_change_the_logits_as_openai_defines(server, continuous):
    """presence/frequency penalties and logit_bias: the greedy answer is the one decoded here token by token from
    the model's logits adjusted by OpenAI's formula (bias added; a token seen c times loses c * frequency +
    presence)."""
    base, state, _ = server(precision="fp32", continuous_batching=continuous)
    loaded = state.engine.current
    tok, model = loaded.tokenizer, loaded.model
    prompt, presence, frequency = "SELECT name FROM", 1.5, 0.7
    ids = tok(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        plain = model(input_ids=ids).logits[0, -1]
    favoured = int(plain.argsort()[-5])  # the fifth most likely first token, lifted by a bias
    bias = {str(favoured): 6.0}
    answer = []
    with torch.no_grad():
        for _ in range(12):
            logits = model(input_ids=ids).logits[0, -1].float()
            logits[favoured] += 6.0
            counts = torch.bincount(torch.tensor(answer or [0]), minlength=logits.shape[0])[:logits.shape[0]]
            if not answer:
                counts.zero_()
            logits -= counts * frequency + (counts > 0).float() * presence
            token = int(logits.argmax())
            if token == tok.eos_token_id:
                break
            answer.append(token)
            ids = torch.cat([ids, torch.tensor([[token]])], 1)
    r = httpx.post(f"{base}/v1/completions", json={"model": "svc", "prompt": prompt, "max_tokens": 12,
                                                  "presence_penalty": presence, "frequency_penalty": frequency,
                                                  "logit_bias": bias}, timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["text"] == tok.decode(answer, skip_special_tokens=True)
    unbiased = httpx.post(f"{base}/v1/completions", json={"model": "svc", "prompt": prompt, "max_tokens": 12})
    assert unbiased.json()["choices"][0]["text"] != r.json()["choices"][0]["text"]  # the adjustments did something
    body = {"model": "svc", "max_tokens": 2, "messages": [{"role": "user", "content": "x"}]}
    for extra, status in (({"logit_bias": {"abc": 1}}, 400), ({"logit_bias": {str(10**9): 1}}, 400),
                          ({"logit_bias": {"5": 101}}, 422), ({"presence_penalty": 2.5}, 422),
                          ({"logit_bias": {str(i): 1 for i in range(301)}}, 400)):
        r = httpx.post(f"{base}/v1/chat/completions", json={**body, **extra})
        assert r.status_code == status and r.json()["error"]["param"].split(".")[0] == next(iter(extra)), r.text


def test_logprob_bytes_are_each_tokens_own(tiny_model_dir):
    """A character split over tokens (byte-level BPE): each token's text is a replacement character, its bytes
    are its part of the character, and the bytes joined are the answer (OpenAI's reason for the field)."""
    from skilltune.model.decode import TokenLogprob
    from skilltune.model.structured import token_table
    from skilltune.model.target import load_target
    from skilltune.serve.app import _chat_logprob

    tok = load_target(str(tiny_model_dir)).tokenizer
    text = "café 😀"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    table = token_table(tok, tok.eos_token_id, len(tok))
    content = [_chat_logprob(tok, table, tok.decode([i]), TokenLogprob(i, -0.5, [(i, -0.5)])) for i in ids]
    assert len(ids) > len(text) and "\ufffd" in "".join(c["token"] for c in content)  # split characters
    assert b"".join(bytes(c["bytes"]) for c in content) == text.encode()
    assert all(c["top_logprobs"][0]["bytes"] == c["bytes"] for c in content)


def test_completions_refuse_best_of(server):
    base, _, _ = server()
    body = {"model": "svc", "prompt": "SELECT", "max_tokens": 2}
    for option in ({"best_of": 3},):
        r = httpx.post(f"{base}/v1/completions", json={**body, **option})
        assert r.status_code == 400 and r.json()["error"]["param"] == next(iter(option)), r.text
    assert httpx.post(f"{base}/v1/completions", json={**body, "logprobs": None, "best_of": 1}).status_code == 200


@pytest.mark.parametrize("continuous", [True, False], ids=["running batch", "static batches"])
def test_logprobs_are_the_models_own(server, continuous):
    """Each answer token's log-probability and the top-k at its place are those of the model's own distribution
    (recomputed here token by token), on completions and chat; asking wrongly is a 4xx."""
    from openai import OpenAI

    base, state, _ = server(precision="fp32", continuous_batching=continuous)
    client = OpenAI(base_url=f"{base}/v1", api_key="unused")
    loaded = state.engine.current
    tok, model = loaded.tokenizer, loaded.model
    prompt = "SELECT name FROM"
    ids = tok(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
    expected = []  # (token text, logprob, top-3 texts) of the greedy answer, by teacher forcing
    with torch.no_grad():
        for _ in range(6):
            lp = torch.log_softmax(model(input_ids=ids).logits[0, -1].float(), -1)
            top = torch.topk(lp, 3)
            token = int(top.indices[0])
            expected.append((tok.decode([token]), float(lp[token]), [tok.decode([t]) for t in top.indices.tolist()]))
            ids = torch.cat([ids, torch.tensor([[token]])], 1)
    done = client.completions.create(model="svc", prompt=prompt, max_tokens=6, logprobs=3).choices[0]
    got = done.logprobs
    assert got.tokens == [e[0] for e in expected] and "".join(got.tokens) == done.text
    assert got.token_logprobs == pytest.approx([e[1] for e in expected], abs=1e-4)
    assert [list(top) for top in got.top_logprobs] == [e[2] for e in expected]
    assert got.text_offset == [sum(len(e[0]) for e in expected[:i]) for i in range(6)]
    chat = client.chat.completions.create(model="svc", messages=[{"role": "user", "content": "List all users."}],
                                          max_tokens=5, logprobs=True, top_logprobs=2).choices[0]
    content = chat.logprobs.content
    assert "".join(c.token for c in content) == chat.message.content and len(content) <= 5
    assert b"".join(bytes(c.bytes) for c in content).decode() == chat.message.content
    for c in content:  # greedy: the chosen token is the most likely one
        assert len(c.top_logprobs) == 2 and c.top_logprobs[0].token == c.token
        assert c.top_logprobs[0].logprob == pytest.approx(c.logprob) and c.logprob <= 0
        assert c.top_logprobs[0].bytes == c.bytes
    body = {"model": "svc", "max_tokens": 2, "messages": [{"role": "user", "content": "x"}]}
    for extra, status, param in (({"top_logprobs": 2}, 400, "top_logprobs"),
                                 ({"logprobs": True, "top_logprobs": 21}, 422, "top_logprobs")):
        r = httpx.post(f"{base}/v1/chat/completions", json={**body, **extra})
        assert r.status_code == status and r.json()["error"]["param"] == param, r.text
    r = httpx.post(f"{base}/v1/completions", json={"model": "svc", "prompt": "x", "logprobs": 6})
    assert r.status_code == 422 and r.json()["error"]["param"] == "logprobs", r.text


@pytest.mark.parametrize("continuous", [True, False], ids=["running batch", "static batches"])
def test_streamed_logprobs_are_the_unstreamed_ones(server, continuous):
    """Streamed with logprobs, the chunks' entries joined are the unstreamed answer's (chat and completions, a stop
    sequence cutting both the same way, n answers each their own); in the running batch each token's entry goes
    out with the chunk that carries its text, in static batches the entries come with the answer's last chunk."""
    from openai import OpenAI

    base, _, _ = server(precision="fp32", continuous_batching=continuous)
    client = OpenAI(base_url=f"{base}/v1", api_key="unused")
    ask = {"model": "svc", "messages": [{"role": "user", "content": "List all users."}], "max_tokens": 8,
           "logprobs": True, "top_logprobs": 2}
    whole = client.chat.completions.create(**ask).choices[0]
    assert len(whole.logprobs.content) >= 4, whole
    stop = whole.message.content[3:5]
    for extra in ({}, {"stop": [stop]}, {"n": 2, "temperature": 1.2, "seed": 4}):
        alone = client.chat.completions.create(**ask, **extra).choices
        chunks = list(client.chat.completions.create(**ask, **extra, stream=True))
        for choice in alone:
            mine = [c.choices[0] for c in chunks if c.choices[0].index == choice.index]
            entries = [e for c in mine if c.logprobs for e in c.logprobs.content]
            assert "".join(c.delta.content or "" for c in mine) == choice.message.content
            assert [e.model_dump() for e in entries] == [e.model_dump() for e in choice.logprobs.content]
            with_text = [c for c in mine if c.delta.content]
            if continuous:  # each text chunk carries its own tokens' entries
                assert all(c.logprobs and "".join(e.token for e in c.logprobs.content) == c.delta.content
                           for c in with_text[:-1]), with_text
            else:
                assert not any(c.logprobs for c in with_text[:-1])
    done = client.completions.create(model="svc", prompt="SELECT name FROM", max_tokens=6, logprobs=3).choices[0]
    chunks = [c.choices[0] for c in client.completions.create(model="svc", prompt="SELECT name FROM", max_tokens=6,
                                                             logprobs=3, stream=True)]
    scored = [c.logprobs for c in chunks if c.logprobs]
    assert [t for lp in scored for t in lp.tokens] == done.logprobs.tokens
    assert [x for lp in scored for x in lp.token_logprobs] == done.logprobs.token_logprobs
    assert [x for lp in scored for x in lp.text_offset] == done.logprobs.text_offset
    assert [x for lp in scored for x in lp.top_logprobs] == done.logprobs.top_logprobs


def test_the_token_table_is_built_when_a_version_is_loaded(server):
    """llguidance's token table (seconds for a 262k vocabulary) is built in the background when the server loads
    a version and after a hot swap, not by the first request that asks for response_format or logprobs."""
    from skilltune.model.structured import _TABLES

    _, state, reg = server()

    def built(loaded) -> bool:
        deadline = time.monotonic() + 20
        while loaded.tokenizer not in _TABLES and time.monotonic() < deadline:
            time.sleep(0.02)
        return loaded.tokenizer in _TABLES

    assert built(state.engine.current)
    reg.promote("svc@v2", reason="swap")
    try:
        deadline = time.monotonic() + 30
        while state.engine.current.version != "svc@v2" and time.monotonic() < deadline:
            time.sleep(0.05)
        assert state.engine.current.version == "svc@v2" and built(state.engine.current)
    finally:
        reg.rollback("svc", reason="leave the module's registry as it was")


@pytest.mark.parametrize("continuous", [True, False], ids=["running batch", "static batches"])
def test_echo_scores_the_prompt_as_the_model_does(server, continuous):
    """echo with logprobs, as lm-evaluation-harness's loglikelihood tasks send it: the prompt's tokens with their
    log-probabilities given the tokens before them (the first: null) and the top k, recomputed here by teacher
    forcing; then the answer's, as unechoed, with offsets past the prompt. max_tokens 0 scores the prompt alone."""
    from openai import OpenAI

    base, state, _ = server(precision="fp32", continuous_batching=continuous)
    client = OpenAI(base_url=f"{base}/v1", api_key="unused")
    loaded = state.engine.current
    tok, model = loaded.tokenizer, loaded.model
    prompt = "SELECT name FROM users WHERE region = 'EU' ORDER BY"
    ids = tok(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
    n = ids.shape[1]
    with torch.no_grad():
        lp = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)
    expected = [float(lp[i, ids[0, i + 1]]) for i in range(n - 1)]
    top2 = [[tok.decode([t]) for t in torch.topk(lp[i], 2).indices.tolist()] for i in range(n - 1)]
    ask = {"model": "svc", "prompt": [prompt], "max_tokens": 1, "logprobs": 2, "echo": True, "temperature": 0,
           "seed": 1234}  # lm-evaluation-harness's payload
    choice = httpx.post(f"{base}/v1/completions", json=ask, timeout=60).json()["choices"][0]
    got = choice["logprobs"]
    assert "".join(got["tokens"][:n]) == prompt and choice["text"].startswith(prompt)
    assert got["token_logprobs"][0] is None and got["top_logprobs"][0] is None
    assert got["token_logprobs"][1:n] == pytest.approx(expected, abs=1e-4)
    assert [list(t) for t in got["top_logprobs"][1:n]] == top2
    plain = client.completions.create(model="svc", prompt=prompt, max_tokens=1, logprobs=2).choices[0]
    assert choice["text"] == prompt + plain.text
    assert len(got["tokens"]) == n + 1  # max_tokens 1: one generated token, the end token too (lm-eval drops it)
    eos = httpx.post(f"{base}/v1/completions", timeout=60, json={**ask, "logit_bias": {str(tok.eos_token_id): 100}}
                     ).json()["choices"][0]  # it answers with its end token at once
    assert eos["finish_reason"] == "stop" and eos["text"] == prompt and len(eos["logprobs"]["tokens"]) == n + 1
    assert eos["logprobs"]["token_logprobs"][:n] == pytest.approx(got["token_logprobs"][:n], abs=1e-6)
    longer = client.completions.create(model="svc", prompt=prompt, max_tokens=4, logprobs=2, echo=True).choices[0]
    alone4 = client.completions.create(model="svc", prompt=prompt, max_tokens=4, logprobs=2).choices[0]
    assert longer.text == prompt + alone4.text
    assert longer.logprobs.token_logprobs[n:n + len(alone4.logprobs.tokens)] == pytest.approx(
        alone4.logprobs.token_logprobs, abs=1e-4)  # teacher-forced here, decoded there: the same
    assert longer.logprobs.text_offset[n:n + len(alone4.logprobs.tokens)] == [
        len(prompt) + o for o in alone4.logprobs.text_offset]
    context = tok(prompt.rsplit(" ", 2)[0], add_special_tokens=False)["input_ids"]  # lm-eval's reading
    assert ids[0, :len(context)].tolist() == context
    assert sum(got["token_logprobs"][len(context):-1]) == pytest.approx(sum(expected[len(context) - 1:]), abs=1e-3)
    alone = client.completions.create(model="svc", prompt=prompt, max_tokens=0, echo=True, logprobs=0)
    assert alone.choices[0].text == prompt and alone.choices[0].finish_reason == "length"
    assert len(alone.choices[0].logprobs.tokens) == n and alone.choices[0].logprobs.top_logprobs[1] == {}
    assert alone.usage.prompt_tokens == n and alone.usage.completion_tokens == 0
    bare = client.completions.create(model="svc", prompt=prompt, max_tokens=3, echo=True, n=2).choices
    assert [c.text for c in bare] == [prompt + plain_text for plain_text in
                                      [client.completions.create(model="svc", prompt=prompt, max_tokens=3).choices[0]
                                       .text] * 2] and bare[0].logprobs is None
    for extra, param in (({"echo": True, "stream": True}, "echo"), ({"max_tokens": 0}, "max_tokens")):
        r = httpx.post(f"{base}/v1/completions", json={"model": "svc", "prompt": prompt, **extra})
        assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text
    r = httpx.post(f"{base}/v1/completions", json={**ask, "prompt": [ids[0].tolist()]})  # token ids: not taken
    assert r.status_code == 422 and r.json()["error"]["param"].startswith("prompt"), r.text


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_prompt_logprobs_in_chunks_are_one_forward_pass(tmp_path, family):
    """The prompt is scored a chunk of positions at a time through the model's cache (on a sliding-window model,
    chunks shorter and longer than its 8-token window): the same log-probabilities as one forward pass."""
    from tiny import build_family_model
    from transformers import AutoModelForCausalLM

    from skilltune.model.decode import prompt_logprobs

    model = AutoModelForCausalLM.from_pretrained(build_family_model(tmp_path / family, family), dtype=torch.float32)
    ids = torch.randint(5, model.config.vocab_size, (1, 29), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        lp = torch.log_softmax(model(input_ids=ids).logits[0].float(), -1)
    whole = [float(lp[i, ids[0, i + 1]]) for i in range(28)]
    for chunk in (5, 11, 1000):
        scored = prompt_logprobs(model, ids[0].tolist(), 3, chunk=chunk)
        assert scored[0] is None and len(scored) == 29
        assert [e.logprob for e in scored[1:]] == pytest.approx(whole, abs=1e-4), chunk
        assert [t for t, _ in scored[5].top] == torch.topk(lp[4], 3).indices.tolist()
    with pytest.raises(TimeoutError):
        prompt_logprobs(model, ids[0].tolist(), 0, deadline=0.0)


def test_streamed_usage_when_asked(server):
    from openai import OpenAI

    base, _, _ = server()
    client = OpenAI(base_url=f"{base}/v1", api_key="unused")
    ask = {"model": "svc", "messages": [{"role": "user", "content": "List all users."}], "max_tokens": 6}
    whole = client.chat.completions.create(**ask)
    chunks = list(client.chat.completions.create(**ask, stream=True, stream_options={"include_usage": True}))
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens
    assert all(c.usage is None for c in chunks[:-1]) and chunks[-2].choices[0].finish_reason is not None
    plain = list(client.chat.completions.create(**ask, stream=True))
    assert all(c.usage is None and c.choices for c in plain)


def test_a_streamed_answer_holds_back_what_could_start_a_stop_sequence():
    """Pieces are sent as they come except a tail that could begin a stop sequence; a stop split over pieces is
    never sent, even in part; text held back that turns out not to start one goes out (at the next piece, or at
    the end). A token's log-probability entry goes out with the last of its text."""
    from types import SimpleNamespace

    from skilltune.serve.app import _StreamedAnswer

    answer = _StreamedAnswer(["cXY", "END"])
    assert [answer.add(p)[0] for p in ("ab", "cX", "Yd")] == ["ab", "", ""]
    assert answer.finish == "stop" and answer.sent == "ab"
    assert answer.end(SimpleNamespace(text="abcXYd", stopped=False, logprobs=None)) == ("", [])
    assert answer.sent == "ab"
    answer = _StreamedAnswer(["cXY", "END"])
    sent = [answer.add(p, [p]) for p in ("ab", "cX", "Z", "E")]  # an entry per piece, here its text
    assert sent == [("ab", ["ab"]), ("", []), ("cXZ", ["cX", "Z"]), ("", [])]
    assert answer.end(SimpleNamespace(text="abcXZE", stopped=True, logprobs=None)) == ("E", [])
    assert answer.finish == "stop" and answer.sent == "abcXZE"
    answer = _StreamedAnswer([])
    assert answer.add("x") == ("x", []) and answer.end(SimpleNamespace(text="xyz", stopped=False, logprobs=None)) == ("yz", [])
    assert answer.finish == "length"


def test_incremental_text_sends_whole_characters_only(tiny_model_dir):
    from transformers import AutoTokenizer

    from skilltune.serve.engine import IncrementalText

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    text = "héllo 😀 wörld — SELECT naïve"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) > len(text) // 2  # byte-level pieces: characters span several tokens
    stream = IncrementalText(tok, tok.eos_token_id, limit=len(ids) + 5)
    pieces = [stream.add(i) for i in ids] + [stream.add(tok.eos_token_id), stream.add(ids[0])]
    assert "".join(pieces) == tok.decode(ids) == text
    assert not any("\ufffd" in p for p in pieces)
    short = IncrementalText(tok, tok.eos_token_id, limit=3)  # the request's own max_tokens
    assert "".join(short.add(i) for i in ids) == tok.decode(ids[:3]).rstrip("\ufffd")


def _loaded(run_dir):
    from skilltune.model.target import load_target
    from skilltune.serve.engine import Loaded

    target = load_target(str(run_dir))
    return Loaded("t@v1", target.model, target.tokenizer)


@pytest.mark.parametrize("which", ["stopping", "random"])
def test_continuous_batching_answers_as_one_at_a_time(stopping_run_dir, tiny_model_dir, monkeypatch, which):
    """Requests that join a running batch at different steps, with different budgets, some stopping on the
    end-of-turn token and some on max_tokens: each greedy answer is the one it gets alone. (The random model's
    near-uniform logits make any change in what a row attends to visible.)"""
    from skilltune.model import decode
    from skilltune.model.generate import generate
    from skilltune.serve.engine import Engine

    loaded = _loaded(stopping_run_dir if which == "stopping" else tiny_model_dir)
    tok = loaded.tokenizer
    joined = []  # how many rows were decoding when requests joined
    merge = decode.DecodeBatch._merge
    monkeypatch.setattr(decode.DecodeBatch, "_merge",
                        lambda self, *a: (joined.append(len(self.rows)), merge(self, *a))[1])
    asks = [("Say hi.", 6), ("Say fox.", 3), ("SELECT name FROM users WHERE", 12), ("Say dog.", 9),
            ("The quick brown", 10), ("Say yes.", 1), ("How many users signed up last month?", 7)]
    prompts = [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
               for p, _ in asks]
    alone = [generate(loaded.model, tok, [p], max_new_tokens=n, batch_size=1)[0] for p, (_, n) in zip(prompts, asks)]
    engine = Engine(loaded, max_batch=4)
    assert engine.batching() == ("continuous", None)
    steps = []
    model = loaded.model.get_base_model() if hasattr(loaded.model, "get_base_model") else loaded.model
    def slow_step(m, a, k):  # 20 ms a forward pass: requests arrive while others decode
        steps.append(k["input_ids"].shape)
        time.sleep(0.02)

    hook = model.register_forward_pre_hook(slow_step, with_kwargs=True)
    try:
        futures = []
        for i, (p, (_, n)) in enumerate(zip(prompts, asks)):
            futures.append(engine.submit(p, n, 0.0))
            time.sleep(0.05 * (i % 3))
        got = [f.result(timeout=60)[1] for f in futures]
    finally:
        hook.remove()
        engine.close()
    for a, g, (_, n) in zip(alone, got, asks):
        assert (g.text, g.stopped, g.new_tokens) == (a.text, a.stopped, a.new_tokens), (a, g)
    if which == "stopping":
        assert any(g.stopped for g in got) and any(not g.stopped for g in got)
    decode_rows = [s[0] for s in steps if s[1] == 1]
    assert max(decode_rows) <= 4  # max_batch
    assert len(set(decode_rows)) > 1 and max(joined) > 0  # rows left, and requests joined a running batch


def test_continuous_batching_steps_aside_for_sliding_windows(stopping_run_dir):
    from skilltune.serve.engine import Engine

    loaded = _loaded(stopping_run_dir)
    loaded.model.config.sliding_window = 64
    engine = Engine(loaded)
    try:
        mode, why = engine.batching()
        assert mode == "static" and "sliding-window" in why
        assert engine.submit("Say hi.", 4, 0.0).result(timeout=60)[1].new_tokens <= 4
        assert Engine.batching(engine, None) == ("static", why)
    finally:
        engine.close()
        loaded.model.config.sliding_window = None


def test_a_sliding_window_model_batches_continuously_when_the_limits_fit_its_window(tmp_path):
    """Gemma 3's sliding layers attend to the last ``window`` keys; the running batch keeps every key, the same
    thing while no row spans more than the window. Under server limits that guarantee it, the engine batches
    continuously and each greedy answer is transformers' own for that prompt alone (its sliding cache); under
    wider limits it serves static batches and says which limits would do."""
    from tiny import build_family_model

    from skilltune.model.target import load_target
    from skilltune.serve.engine import Engine, Loaded

    target = load_target(str(build_family_model(tmp_path / "gemma3", "gemma3", sliding_window=48)))
    model, tok = target.model, target.tokenizer
    loaded = Loaded("g@v1", model, tok, context_tokens=512)
    wide = Engine(loaded, max_context=512, max_new_tokens=16)
    try:
        mode, why = wide.batching()
        assert mode == "static" and "serve.max_prompt_tokens + serve.max_tokens_limit within the window" in why
    finally:
        wide.close()
    asks = [("Say hi.", 6), ("SELECT name FROM users WHERE region", 9), ("fox", 3), ("How many users?", 8),
            ("The quick brown fox jumps", 5)]
    prompts = [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
               for p, _ in asks]
    sizes = [len(tok(p, add_special_tokens=False)["input_ids"]) + n for p, (_, n) in zip(prompts, asks)]
    assert max(sizes) <= 36 and sum(sizes) > 48  # each fits the cap below; together they span far more than the window
    alone = []
    for p, (_, n) in zip(prompts, asks):
        ids = tok(p, return_tensors="pt", add_special_tokens=False)
        with torch.no_grad():
            new = model.generate(**ids, max_new_tokens=n, do_sample=False, pad_token_id=tok.eos_token_id)
        alone.append(tok.decode(new[0, ids["input_ids"].shape[1]:], skip_special_tokens=True))
    engine = Engine(loaded, max_batch=3, max_context=36, max_new_tokens=12)  # 36 + 12 <= 48
    try:
        assert engine.batching() == ("continuous", None)
        futures = []
        for i, (p, (_, n)) in enumerate(zip(prompts, asks)):
            futures.append(engine.submit(p, n, 0.0))
            time.sleep(0.03 * (i % 2))
        got = [f.result(timeout=60)[1].text for f in futures]
    finally:
        engine.close()
    assert got == alone


def test_a_row_that_joins_a_running_batch_sees_exactly_its_own_context(tiny_model_dir):
    """After a merge (left padding, masked), a row's next-token logits are those it gets alone, to 1e-5; a
    row that leaves takes its keys with it and the others' logits do not change."""
    import copy

    from skilltune.model.decode import DecodeBatch
    from skilltune.serve.engine import Job

    loaded = _loaded(tiny_model_dir)
    model, tok = loaded.model, loaded.tokenizer
    batch = DecodeBatch(model, tok)
    long_job, short_job = Job("The quick brown fox jumps over the lazy dog", 8, 0.0), Job("Hello", 8, 0.0)
    batch.admit([long_job])
    batch.step()
    batch.admit([short_job])  # joins a row two tokens into its answer

    def alone(job, row):
        ids = tok(job.prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
        ids = torch.cat([ids, torch.tensor([row.tokens])], 1)
        with torch.inference_mode():
            return model(input_ids=ids).logits[0, -1]

    def batched():
        with torch.inference_mode():
            mask = torch.cat([batch.mask, torch.ones((len(batch.rows), 1), dtype=batch.mask.dtype)], 1)
            pos = torch.tensor([[r.position] for r in batch.rows])
            return model(input_ids=batch.next_tokens[:, None], attention_mask=mask, position_ids=pos,
                         past_key_values=copy.deepcopy(batch.cache), use_cache=True).logits[:, -1]

    logits = batched()
    for i, job in enumerate((long_job, short_job)):
        torch.testing.assert_close(logits[i], alone(job, batch.rows[i]), rtol=0, atol=1e-5)
    batch.rows[0].stopped = True  # the long row leaves: its extra key columns go too
    batch.leave()
    assert batch.mask.shape[1] == batch.rows[0].position and bool(batch.mask.all())
    torch.testing.assert_close(batched()[0], alone(short_job, batch.rows[0]), rtol=0, atol=1e-5)
