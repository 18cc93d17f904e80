"""The OpenAI-compatible HTTP API (FastAPI): chat/completions, completions, models, health, ready, metrics.

Errors are OpenAI-shaped (``{"error": {"message", "type", "param", "code"}}``) with 4xx
codes for every client mistake and no server paths in any message. With API keys set,
every route but the probes (``/health``, ``/ready``) needs ``Authorization: Bearer KEY``
(compared in constant time); each key has a name, logged with its requests and limited
on its own (429 + ``Retry-After``). Every response names the registry version that
answered, in the ``model`` field and the ``X-Skilltune-Version`` header.

Limits are checked before anything reaches the engine: the body size (413), the prompt
against the model's context (400 ``context_length_exceeded``, naming both numbers), and
prompt tokens x ``max_tokens`` against a compute budget. A request that times out or
whose client disconnects is cancelled, and the engine stops decoding it at its next step.
One middleware logs every request with its real status (2xx, 4xx, 429, 5xx, time-outs).
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections import deque
from typing import Annotated, Callable, Literal

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import AfterValidator, BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from skilltune.model.decode import Shaping
from skilltune.model.structured import RESPONSE_FORMATS, Grammar, GrammarError, token_table, vocab_width
from skilltune.serve.clients import client_name
from skilltune.model.generate import Generation
from skilltune.serve.engine import Engine, QueueFull
from skilltune.text import lone_surrogate

PROBES = ("/health", "/ready")  # answered without a key and not logged: load balancers call them every second
MAX_STOP = 4  # OpenAI's limit on stop sequences
MAX_STOP_CHARS = 256  # each; held-back text is checked against every prefix of each stop at every streamed piece
MAX_N = 8  # answers per request (each is a row of the batch)
MAX_LOGIT_BIAS = 300  # tokens a request may bias (OpenAI's limit)
CHARS_PER_TOKEN_BOUND = 64  # no tokenizer packs more characters than this into one token on average


class ApiError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        self.status, self.message, self.type, self.param, self.code, self.headers = (
            status, message, type_, param, code, headers or {})


def _error(status: int, message: str, type_: str = "invalid_request_error", param=None, code=None, headers=None):
    return JSONResponse({"error": {"message": message, "type": type_, "param": param, "code": code}},
                        status_code=status, headers=headers)


def _unicode(text: str) -> str:
    """JSON may escape a lone surrogate (``"\\ud800"``), which no tokenizer, log or response can encode: a 422."""
    if (at := lone_surrogate(text)) is not None:
        raise ValueError(f"not valid Unicode: a lone surrogate {text[at]!r} at character {at}; "
                         "send text (UTF-8), not half of a surrogate pair")
    return text


Text = Annotated[str, AfterValidator(_unicode)]  # every string of a request that reaches the model or the log


class TextPart(BaseModel):
    """One content part; only text is served (an image or audio part is a 422 naming the field)."""

    model_config = ConfigDict(extra="allow")
    type: Literal["text"]
    text: Text


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "user", "assistant"]
    content: Text | list[TextPart]

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")
    include_usage: bool = False  # a last chunk (no choices) with the request's token usage, before [DONE]


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="allow", populate_by_name=True)
    name: Text = "response"
    description: Text | None = None
    schema_: dict = Field(alias="schema")  # JSON Schema; `schema` is a BaseModel attribute, hence the alias
    strict: bool | None = None


class ResponseFormat(BaseModel):
    """OpenAI's ``response_format``: plain text, any JSON object, or JSON matching a schema (the answer is decoded
    under that grammar: model/structured.py)."""

    model_config = ConfigDict(extra="allow")
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StructuredOutputs(BaseModel):
    """vLLM's ``structured_outputs`` (its ``extra_body`` field): of its kinds this server takes ``grammar``, a Lark
    grammar the answer is decoded under; JSON goes through ``response_format``."""

    model_config = ConfigDict(extra="allow")
    grammar: Text | None = None


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="allow")  # OpenAI clients send options we do not use
    model: Text
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(0.0, ge=0.0, le=2.0, allow_inf_nan=False)
    top_p: float | None = Field(None, gt=0.0, le=1.0, allow_inf_nan=False)
    seed: int | None = Field(None, ge=-(2**63), lt=2**64)
    stop: Text | list[Text] | None = Field(None, description=f"Up to {MAX_STOP} sequences that end the answer.")
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, le=MAX_N)  # answers to the same messages (sampled ones differ; greedy ones do not)
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputs | None = None
    logprobs: bool | None = None  # each answer token's log-probability
    top_logprobs: int | None = Field(None, ge=0, le=20)  # and the k most likely tokens at its place
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0, allow_inf_nan=False)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0, allow_inf_nan=False)
    logit_bias: dict[str, Annotated[float, Field(ge=-100, le=100, allow_inf_nan=False)]] | None = None


class CompletionRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: Text
    prompt: Text | list[Text]
    max_tokens: int | None = Field(16, ge=0)  # 0: nothing generated (with echo: the prompt scored alone)
    echo: bool = False  # the answer's text starts with the prompt (and its logprobs with the prompt's tokens')
    temperature: float = Field(0.0, ge=0.0, le=2.0, allow_inf_nan=False)
    top_p: float | None = Field(None, gt=0.0, le=1.0, allow_inf_nan=False)
    seed: int | None = Field(None, ge=-(2**63), lt=2**64)
    stop: Text | list[Text] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, le=MAX_N)
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputs | None = None
    logprobs: int | None = Field(None, ge=0, le=5)  # k: each token's log-probability and the k most likely there
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0, allow_inf_nan=False)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0, allow_inf_nan=False)
    logit_bias: dict[str, Annotated[float, Field(ge=-100, le=100, allow_inf_nan=False)]] | None = None


def route_label(app: FastAPI, scope) -> str:
    """The route template a request matches (``/v1/models``), or ``unmatched``.

    Metrics are labelled with this, never the raw path: a client sending random paths
    would otherwise grow ``/metrics`` without bound (one series per path).
    """
    for route in app.router.routes:
        match, _ = route.matches(scope)
        if match == Match.FULL:
            return getattr(route, "path", "unmatched")
    return "unmatched"


class BodyLimit:
    """ASGI middleware: a body over ``limit`` bytes is a 413, by its Content-Length or as it streams in; a body
    that has not arrived whole ``timeout_s`` after the request began is a 408 (a client trickling bytes holds a
    connection, and with a key that key's slots, no longer than that).

    A refusal while the route reads the body is answered here, and the route is told the client left; what it
    would answer then is not sent. The gate logs the refusal's status (``request.state.refused``).
    """

    def __init__(self, app, limit: int, timeout_s: float = 30.0):
        self.app, self.limit, self.timeout_s = app, limit, timeout_s

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            return await self._refuse(scope, receive, send, 413, self._too_large_message(), "request_too_large")
        seen, whole, refused = 0, False, False
        deadline = asyncio.get_running_loop().time() + self.timeout_s

        async def counted():
            nonlocal seen, whole, refused
            if whole:  # after the body only the disconnect is left to wait for, however long the answer takes
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), deadline - asyncio.get_running_loop().time())
            except asyncio.TimeoutError:
                refused = True
                await self._refuse(scope, receive, send, 408, f"the request body did not arrive within "
                                                              f"{self.timeout_s:g} s", "request_timeout")
                return {"type": "http.disconnect"}
            seen += len(message.get("body", b""))
            whole = message["type"] != "http.request" or not message.get("more_body", False)
            if seen > self.limit:
                refused = True
                await self._refuse(scope, receive, send, 413, self._too_large_message(), "request_too_large")
                return {"type": "http.disconnect"}
            return message

        async def unless_refused(message):
            if not refused:
                await send(message)

        await self.app(scope, counted, unless_refused)

    def _too_large_message(self) -> str:
        return f"the request body is over this server's limit of {self.limit:,} bytes"

    @staticmethod
    async def _refuse(scope, receive, send, status: int, message: str, code: str) -> None:
        scope.setdefault("state", {})["refused"] = (status, message)
        await _error(status, message, code=code)(scope, receive, send)


async def _disconnected(request: Request) -> None:
    """Return when the client goes away (the body was read already, so the next message is the disconnect)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _st(request: Request):
    """The :class:`skilltune.serve.server.ServerState` this app serves."""
    return request.app.state.skilltune


# ---------------------------------------------------------------- errors: OpenAI-shaped, 4xx for client mistakes
async def _api_error(request: Request, exc: ApiError):
    request.state.error = exc.message
    return _error(exc.status, exc.message, exc.type, exc.param, exc.code, exc.headers)


async def _validation(request: Request, exc: RequestValidationError):
    errs = exc.errors()
    if any(e.get("type") == "json_invalid" for e in errs):
        request.state.error = "invalid JSON"
        return _error(400, "the request body is not valid JSON", code="invalid_json")
    # of a union's branches (`content` is text or a list of parts) the one that got furthest says what is wrong
    first = max(errs, key=lambda e: (e.get("type") == "value_error", len(e.get("loc", ()))))
    param = ".".join(str(p) for p in first.get("loc", [])[1:] if not _is_branch(p)) or None
    request.state.error = f"{param or 'body'}: {first.get('msg')}"
    return _error(422, request.state.error, param=param, code=first.get("type"))


def _is_branch(part) -> bool:
    """A union branch's tag in a pydantic error location (``str``, ``list[TextPart]``, ``function-after[...]``)."""
    return isinstance(part, str) and (part in ("str", "int", "float", "bool") or part.endswith("]"))


async def _http(request: Request, exc: StarletteHTTPException):
    request.state.error = str(exc.detail)
    if exc.status_code == 400 and "parsing the body" in str(exc.detail):  # FastAPI's words for undecodable bytes
        return _error(400, "the request body is not valid JSON (a UTF-8 JSON object is expected)",
                      code="invalid_json")
    return _error(exc.status_code, str(exc.detail), "invalid_request_error")


async def _internal(request: Request, exc: Exception):  # a bug of ours: no details, no paths
    return _error(500, "internal server error", "server_error")


# ---------------------------------------------------------------- the gate: auth, limits, metrics, the log
def _record(request: Request, route: str, status: int, t0: float, client: str) -> None:
    """Metrics and the request log for one request, whatever its outcome."""
    state = _st(request)
    latency = time.perf_counter() - t0
    if refused := getattr(request.state, "refused", None):  # the body limit answered (413, 408), not the route
        status, request.state.error = refused
    state.metrics.requests.labels(route=route, status=str(status)).inc()
    state.metrics.latency.labels(route=route).observe(latency)
    if status >= 400:
        state.metrics.errors.labels(route=route).inc()
    if state.log is None or request.url.path in PROBES or request.url.path == "/metrics":
        return
    info = getattr(request.state, "log", None) or {}
    state.log.write(info.get("version") or state.engine.current.version, route, info.get("prompt", ""),
                    info.get("output", ""), latency, info.get("prompt_tokens", 0), info.get("completion_tokens", 0),
                    status, getattr(request.state, "error", ""), client)


async def _gate(request: Request, call_next):
    """Auth, per-key limits, then the route; metrics and the log see every outcome."""
    state = _st(request)
    t0 = time.perf_counter()
    route = route_label(request.app, request.scope)
    client = "-"
    if state.keys and request.url.path not in PROBES:
        client = client_name(state.keys, request.headers.get("authorization", ""))
        if client is None:
            request.state.error = "missing or wrong API key"
            _record(request, route, 401, t0, "unauthenticated")
            return _error(401, "missing or wrong API key: send Authorization: Bearer KEY", "authentication_error",
                          code="invalid_api_key")
    limited = bool(state.keys) and request.url.path.startswith("/v1/")  # limits are per key
    if limited:
        wait = state.limits.acquire(client)
        if wait is not None:
            request.state.error = f"per-key limit reached for client {client!r}"
            _record(request, route, 429, t0, client)
            return _error(429, f"too many requests from this API key ({state.limits.concurrency} at a time"
                          + (f", {state.limits.rate:g}/s" if state.limits.rate else "") + "); retry shortly",
                          "rate_limit_error", code="rate_limit_exceeded", headers={"Retry-After": f"{wait:.0f}"})
    try:
        response = await call_next(request)
    except Exception:
        request.state.error = "internal server error"
        _record(request, route, 500, t0, client)
        if limited:
            state.limits.release(client)
        raise

    def done() -> None:
        if limited:
            state.limits.release(client)
        _record(request, route, getattr(request.state, "status", None) or response.status_code, t0, client)

    if "x-skilltune-version" not in response.headers:  # generation routes set the version that answered
        response.headers["X-Skilltune-Version"] = state.engine.current.version
    if getattr(request.state, "streaming", False):  # recorded once the answer has been sent, whole
        response.body_iterator = _then(response.body_iterator, done)
    else:
        done()
    return response


async def _then(body, done):
    """``body``, then ``done()`` — however the stream ends (finished, failed, or the client left)."""
    try:
        async for part in body:
            yield part
    finally:
        done()


# ---------------------------------------------------------------- request checks, before the queue
# Options an OpenAI client may send that would change the answer, and that this server does not compute: a
# request asking for one gets a 400 naming it, never an answer that silently ignores it. option -> asks for it?
UNSUPPORTED: dict[str, Callable[[object, BaseModel], bool]] = {
    "tools": lambda v, r: bool(v), "functions": lambda v, r: bool(v),
    "tool_choice": lambda v, r: v not in (None, "none"), "function_call": lambda v, r: v not in (None, "none"),
    "best_of": lambda v, r: v not in (None, 1),
    "suffix": lambda v, r: bool(v), "audio": lambda v, r: bool(v),
    "modalities": lambda v, r: v not in (None, ["text"]), "prediction": lambda v, r: bool(v),
    # vLLM's older guided decoding fields: ignored, they would leave a client believing its answer was constrained
    **{f"guided_{kind}": lambda v, r: v is not None for kind in ("json", "regex", "choice", "grammar")},
}


def _sampling(req: ChatRequest | CompletionRequest) -> dict:
    """How the request's tokens are chosen: greedy at temperature 0 (top-p and seed do not matter then, so greedy
    requests batch together whatever they send), else sampled with its top-p (None: the model's) and its seed
    (the same seed, the same answer: a row's own random stream in the running batch)."""
    sampling = req.temperature > 0
    return {"temperature": req.temperature, "top_p": req.top_p if sampling else None,
            "seed": req.seed if sampling else None}


def _refuse_unsupported(req: BaseModel) -> None:
    for name, value in (req.model_extra or {}).items():
        if name in UNSUPPORTED and UNSUPPORTED[name](value, req):
            raise ApiError(400, f"'{name}' is not supported by this server: it answers with text (or JSON: "
                           "response_format; or under a Lark grammar: structured_outputs.grammar), greedy or sampled "
                           "at the request's temperature and top_p; leave the option out", param=name,
                           code="unsupported_parameter")


def _logprobs_asked(req: ChatRequest | CompletionRequest) -> int | None:
    """None, or how many alternatives to list at each answer token (OpenAI's logprobs / top_logprobs)."""
    if isinstance(req, ChatRequest):
        if req.top_logprobs is not None and not req.logprobs:
            raise ApiError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        k = (req.top_logprobs or 0) if req.logprobs else None
    else:
        k = req.logprobs
    return k


def _shaping(req: ChatRequest | CompletionRequest, vocab: int) -> Shaping | None:
    """OpenAI's presence/frequency penalties and logit_bias (token id -> -100..100) as one :class:`Shaping`."""
    if len(req.logit_bias or {}) > MAX_LOGIT_BIAS:
        raise ApiError(400, f"logit_bias: at most {MAX_LOGIT_BIAS} tokens", param="logit_bias")
    bias = []
    for key, value in (req.logit_bias or {}).items():
        if not key.isdigit() or not 0 <= int(key) < vocab:
            raise ApiError(400, f"logit_bias: {key[:20]!r} is not a token id of this model (0 to {vocab - 1})",
                           param="logit_bias")
        bias.append((int(key), value))
    if not (bias or req.presence_penalty or req.frequency_penalty):
        return None
    return Shaping(req.presence_penalty, req.frequency_penalty, tuple(bias))


def _decodings(req: ChatRequest | CompletionRequest, grammar: Grammar | None, vocab: int) -> list[dict]:
    """How the engine decodes each of ``req``'s ``n`` answers besides its prompt and budget. With a seed, answer i
    draws from seed + i: the same request gives the same answers, and they differ from each other."""
    one = {**_sampling(req), "grammar": grammar, "logprobs": _logprobs_asked(req), "shaping": _shaping(req, vocab)}
    if one["seed"] is None:
        return [one] * req.n
    return [{**one, "seed": (one["seed"] + i) % 2**64} for i in range(req.n)]


def _format(req: ChatRequest | CompletionRequest) -> tuple[str, object, str]:
    """What the request's answer is decoded under: (a RESPONSE_FORMATS name, its schema or grammar, the field that
    asked), from ``response_format`` or vLLM's ``structured_outputs.grammar``; a request asking both ways, or for a
    structured_outputs kind not served here, is a 400."""
    fmt, wanted = req.response_format, req.structured_outputs
    if wanted is not None:
        others = sorted(set(wanted.model_extra or {}))
        if others or wanted.grammar is None:
            raise ApiError(400, "structured_outputs: this server takes `grammar` (a Lark grammar) only"
                           + (f", not {', '.join(others)}" if others else "") + "; for JSON send response_format",
                           param="structured_outputs")
        if fmt is not None and fmt.type != "text":
            raise ApiError(400, "send response_format or structured_outputs.grammar, not both",
                           param="structured_outputs")
        return "grammar", wanted.grammar, "structured_outputs.grammar"
    if fmt is None or fmt.type == "text":
        return "text", None, "response_format"
    if fmt.type == "json_schema" and fmt.json_schema is None:
        raise ApiError(400, "response_format of type json_schema needs json_schema: {\"name\": ..., \"schema\": {...}}",
                       param="response_format.json_schema")
    return fmt.type, fmt.json_schema.schema_ if fmt.json_schema else None, "response_format"


async def _grammar(req: ChatRequest | CompletionRequest, loaded) -> Grammar | None:
    """The grammar the request asks for (``_format``), compiled for the model serving now (None: plain text)."""
    kind, source, param = _format(req)
    try:
        grammar = RESPONSE_FORMATS[kind](source)
        if grammar is None:
            return None
        await run_in_threadpool(grammar.check, loaded.tokenizer, loaded.tokenizer.eos_token_id,
                                vocab_width(loaded.model, loaded.tokenizer))
    except GrammarError as exc:
        raise ApiError(400, str(exc), param=param, code="invalid_response_format") from None
    return grammar


def _check_model(state, name: str) -> None:
    if name not in state.accepted_names():
        raise ApiError(404, f"model '{name}' is not served here; this server serves '{state.name}'",
                       param="model", code="model_not_found")


def _limit(state, requested: int | None, default: int) -> int:
    value = requested or min(default, state.max_tokens_limit)  # an omitted max_tokens never errs
    if value > state.max_tokens_limit:
        raise ApiError(400, f"max_tokens {value} is over this server's limit of {state.max_tokens_limit}",
                       param="max_tokens", code="max_tokens_too_large")
    return value


def _stops(stop: str | list[str] | None) -> list[str]:
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if len(stops) > MAX_STOP or any(not s for s in stops):
        raise ApiError(400, f"stop: at most {MAX_STOP} non-empty sequences", param="stop")
    if any(len(s) > MAX_STOP_CHARS for s in stops):
        raise ApiError(400, f"stop: each sequence at most {MAX_STOP_CHARS} characters (one has "
                       f"{max(map(len, stops)):,})", param="stop")
    return stops


async def _admit(state, loaded, prompt: str, max_tokens: int, n: int = 1) -> None:
    """Refuse, before the queue, a prompt over the context or a request (its ``n`` answers) over the compute
    budget."""
    limit = state.prompt_limit(loaded)
    if len(prompt) > CHARS_PER_TOKEN_BOUND * limit:  # over for certain: no need to tokenize megabytes
        raise ApiError(400, f"This model's maximum context length is {limit} tokens. However, your messages "
                       f"hold {len(prompt):,} characters, at least {len(prompt) // CHARS_PER_TOKEN_BOUND:,} "
                       "tokens. Please shorten them.", param="messages", code="context_length_exceeded")
    n_prompt = await run_in_threadpool(loaded.count_tokens, prompt)
    if n_prompt + max_tokens > limit:
        raise ApiError(400, f"This model's maximum context length is {limit} tokens. However, you requested "
                       f"{n_prompt + max_tokens} tokens ({n_prompt} in the messages, {max_tokens} in the "
                       "completion). Please reduce the length of the messages or the completion.",
                       param="messages", code="context_length_exceeded")
    if n_prompt * max_tokens * n > state.cfg.max_request_compute:
        times_n = f" x n {n}" if n > 1 else ""
        raise ApiError(400, f"{n_prompt} prompt tokens x max_tokens {max_tokens}{times_n} = "
                       f"{n_prompt * max_tokens * n:,} is over this server's per-request budget of "
                       f"{state.cfg.max_request_compute:,}; lower max_tokens{' or n' if n > 1 else ''} or shorten "
                       "the prompt", param="max_tokens", code="request_too_large")


def _submit(engine: Engine, prompt: str, max_tokens: int, decodings: list[dict], stops: list[str], timeout: float,
            on_text: Callable[[int], Callable[[str, list], None]] | None = None) -> list:
    """Queue one engine job per answer (``on_text(i)``: answer i's listener when streaming); all or none: a full
    queue cancels the ones already queued and answers 429."""
    futures = []
    try:
        for i, decoding in enumerate(decodings):
            futures.append(engine.submit(prompt, max_tokens, timeout_s=timeout, stops=stops,
                                         on_text=on_text(i) if on_text else None, **decoding))
    except QueueFull:
        for fut in futures:
            fut.cancel()
        raise ApiError(429, "the server is busy: too many queued requests; retry shortly", "rate_limit_error",
                       headers={"Retry-After": "1"}) from None
    return futures


async def _run(request: Request, prompt: str, max_tokens: int, decodings: list[dict], stops: list[str]) -> list:
    """Queue the request's answers (one row each) and wait for all; a time-out or a client that leaves cancels
    them in the engine. Returns (version, Generation) per answer."""
    state = _st(request)
    timeout = state.request_timeout_s
    futures = _submit(state.engine, prompt, max_tokens, decodings, stops, timeout)
    waiter = asyncio.ensure_future(asyncio.gather(*map(asyncio.wrap_future, futures)))
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        done, _ = await asyncio.wait({waiter, gone}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        if waiter in done:
            try:
                return waiter.result()  # a TimeoutError from the engine (deadline while queued/decoding) -> 504
            except GrammarError as exc:  # a model swapped in since the check cannot take the grammar
                raise ApiError(400, str(exc), param="response_format", code="invalid_response_format") from None
        if gone in done:
            request.state.status = 499  # logged as nginx does: the client closed the request
            raise ApiError(499, "the client closed the request", code="client_closed_request")
        raise TimeoutError
    except (TimeoutError, asyncio.TimeoutError):
        raise ApiError(504, f"generation did not finish within {timeout:g} s", "timeout") from None
    finally:
        for fut in futures:  # nobody waits for them any more: the engine stops decoding them at its next step
            fut.cancel()
        waiter.cancel()
        gone.cancel()


# ---------------------------------------------------------------- responses
def _note(request: Request, version: str, prompt: str, outs: list, output: str) -> None:
    """What the request log and the token counters record of a request's answers: ``output`` (the first one's
    text) and every answer's tokens."""
    state = _st(request)
    usage = _usage(*outs)
    request.state.log = {"version": version, "prompt": prompt, "output": output,
                         "prompt_tokens": usage["prompt_tokens"], "completion_tokens": usage["completion_tokens"]}
    state.metrics.tokens.labels(kind="prompt").inc(usage["prompt_tokens"])
    state.metrics.tokens.labels(kind="completion").inc(usage["completion_tokens"])


def _cut(text: str, stopped: bool, stops: list[str]) -> tuple[str, str]:
    """The answer up to its first stop sequence, and the finish reason."""
    cuts = [text.index(s) for s in stops if s in text]
    if cuts:
        return text[:min(cuts)], "stop"
    return text, "stop" if stopped else "length"


def _scored(tokenizer, entries: list, text: str) -> list[tuple[str, object]]:
    """Each answer token's text with its :class:`~skilltune.model.decode.TokenLogprob`, up to where ``text`` (the
    answer after any stop sequence cut it) ends."""
    out, length = [], 0
    for e in entries:
        if length >= len(text) and out:
            break
        piece = tokenizer.decode([e.token])
        out.append((piece, e))
        length += len(piece)
    return out if text else []


def _chat_logprob(tokenizer, table, piece: str, e) -> dict:
    """One answer token in OpenAI's chat shape; ``bytes`` are the token's own (a character split over two tokens
    gives each its part), from llguidance's token table when there is one."""
    def raw(token: int, text: str) -> list[int]:
        return list(table.decode_bytes([token]) if table is not None else text.encode("utf-8"))

    top = [(t, tokenizer.decode([t]), lp) for t, lp in e.top]
    return {"token": piece, "logprob": e.logprob, "bytes": raw(e.token, piece),
            "top_logprobs": [{"token": text, "logprob": lp, "bytes": raw(t, text)} for t, text, lp in top]}


async def _byte_table(loaded, asked: bool):
    """llguidance's token table of the serving tokenizer (built once, off the event loop), for exact token bytes;
    None when logprobs are not asked or the tokenizer has none (then a token's bytes are its text's)."""
    if not asked:
        return None
    try:
        return await run_in_threadpool(token_table, loaded.tokenizer, loaded.tokenizer.eos_token_id,
                                       vocab_width(loaded.model, loaded.tokenizer))
    except GrammarError:
        return None


def _completion_logprobs(tokenizer, scored: list, at: int = 0) -> dict:
    """OpenAI's completions logprobs of ``scored`` (text, entry) tokens; ``at``: the first one's offset in the
    answer. An entry None (an echoed prompt's first token: nothing before it) has null ones."""
    offsets = []
    for piece, _ in scored:
        offsets.append(at)
        at += len(piece)
    return {"tokens": [piece for piece, _ in scored], "token_logprobs": [e.logprob if e else None for _, e in scored],
            "top_logprobs": [({tokenizer.decode([t]): lp for t, lp in e.top} if e else None) for _, e in scored],
            "text_offset": offsets}


class _Chunks:
    """The OpenAI server-sent events of one streamed request (chat.completion.chunk or text_completion).

    ``tokenizer`` and ``table`` (llguidance's token bytes, or None) spell out log-probabilities when asked for."""

    def __init__(self, kind: str, rid: str, version: str, tokenizer=None, table=None):
        self.kind, self.rid, self.version, self.created = kind, rid, version, int(time.time())
        self.tokenizer, self.table = tokenizer, table
        self.offsets: dict[int, int] = {}  # completions: where each answer's next scored token starts

    def usage(self, outs: list) -> str:
        """The chunk ``stream_options.include_usage`` asks for: no choices, the whole request's usage."""
        kind = "chat.completion.chunk" if self.kind == "chat" else "text_completion"
        body = {"id": self.rid, "object": kind, "created": self.created, "model": self.version, "choices": [],
                "usage": _usage(*outs)}
        return f"data: {json.dumps(body)}\n\n"

    def piece(self, index: int, text: str | None = None, finish: str | None = None, role: bool = False,
              scored: list | None = None) -> str:
        """One chunk of answer ``index``: its role (chat's first), a piece of text with the log-probabilities of
        the tokens that made it (``scored``: TokenLogprob entries, when asked for), or its finish reason."""
        if self.kind == "chat":
            delta = {"role": "assistant", "content": ""} if role else ({"content": text} if text else {})
            choice = {"index": index, "delta": delta, "finish_reason": finish}
            if scored:
                choice["logprobs"] = {"content": [_chat_logprob(self.tokenizer, self.table,
                                                                self.tokenizer.decode([e.token]), e)
                                                  for e in scored], "refusal": None}
            body = {"id": self.rid, "object": "chat.completion.chunk", "created": self.created, "model": self.version,
                    "choices": [choice]}
        else:
            choice = {"index": index, "text": text or "", "finish_reason": finish}
            if scored:
                pieces = [(self.tokenizer.decode([e.token]), e) for e in scored]
                at = self.offsets.get(index, 0)
                choice["logprobs"] = _completion_logprobs(self.tokenizer, pieces, at)
                self.offsets[index] = at + sum(len(piece) for piece, _ in pieces)
            body = {"id": self.rid, "object": "text_completion", "created": self.created, "model": self.version,
                    "choices": [choice]}
        return f"data: {json.dumps(body)}\n\n"


def _held_back(text: str, stops: list[str]) -> int:
    """How many characters at the end of ``text`` could be the start of a stop sequence (not sent yet)."""
    return max((next((k for k in range(min(len(s) - 1, len(text)), 0, -1) if text.endswith(s[:k])), 0)
                for s in stops), default=0)


class _StreamedAnswer:
    """One answer of a streamed request: its text goes out as it decodes, except what could be the start of a stop
    sequence (held back until it cannot be); at a stop sequence the answer ends there. Log-probabilities (when the
    request asks; ``tokenizer`` set) go out with the text of their tokens, and those not sent by the end (static
    batches give them only then) with the answer's last text, up to where the answer ends, as unstreamed."""

    def __init__(self, stops: list[str], tokenizer=None):
        self.stops, self.tokenizer, self.sent, self.held, self.finish = stops, tokenizer, "", "", None
        self.queued: deque[tuple[int, list]] = deque()  # (where a piece's text ends, its tokens' entries)
        self.given = 0  # how many token entries have been sent

    def add(self, piece: str, scored: list | tuple = ()) -> tuple[str, list]:
        """The text to send now that ``piece`` was decoded ("" while held back, and after the answer ended), and
        the log-probability entries whose text that completes."""
        if self.finish is not None:
            return "", []
        text = self.sent + self.held + piece
        if scored:
            self.queued.append((len(text), list(scored)))
        cuts = [text.find(s, max(0, len(self.sent) - len(s))) for s in self.stops]
        cut = min((c for c in cuts if c >= 0), default=-1)
        if cut >= 0:
            text, self.finish = text[:cut], "stop"
        keep = 0 if self.finish else _held_back(text, self.stops)
        new = text[len(self.sent):len(text) - keep]
        self.sent, self.held = text[:len(text) - keep], text[len(text) - keep:]
        scored = []
        while self.queued and self.queued[0][0] <= len(self.sent):
            scored += self.queued.popleft()[1]
        self.given += len(scored)
        return new, scored

    def end(self, out) -> tuple[str, list]:
        """What is still to send once the answer is whole: the text held back that turned out not to start a stop
        sequence and pieces not seen yet, and the log-probability entries not sent, up to where the answer ends."""
        rest = ""
        if self.finish is None:
            full, self.finish = _cut(out.text, out.stopped, self.stops)
            if full.startswith(self.sent):
                rest, self.sent = full[len(self.sent):], full
        if out.logprobs is None or self.tokenizer is None:
            return rest, []
        kept = [e for _, e in _scored(self.tokenizer, out.logprobs, self.sent)]
        scored, self.given = kept[self.given:], max(self.given, len(kept))
        return rest, scored


async def _stream(request: Request, kind: str, prompt: str, max_tokens: int, decodings: list[dict],
                  stops: list[str], logged_prompt: str, rid: str, include_usage: bool = False):
    """Token-by-token streaming of the request's answers (``n``: one engine row each, chunks tagged with the
    answer's index): each chunk goes out as its tokens are decoded (the first after the prefill).

    Text that could be the start of a stop sequence is held back until it is not; at a stop sequence that answer
    ends with finish_reason "stop". Each answer's last chunk carries its finish reason as soon as it is whole. The
    request log records the first answer's full text once, at the end. Errors after the response has started (a
    time-out while decoding) arrive as an ``error`` event, as OpenAI's do.
    """
    state = _st(request)
    loop = asyncio.get_running_loop()
    pieces: asyncio.Queue[tuple[int, str, list]] = asyncio.Queue()  # (answer, its new text, their entries)

    def listener(i: int) -> Callable[[str, list], None]:
        return lambda text, scored: loop.call_soon_threadsafe(pieces.put_nowait, (i, text, scored))

    loaded = state.engine.current
    scoring = decodings[0]["logprobs"] is not None
    table = await _byte_table(loaded, scoring and kind == "chat")
    futures = _submit(state.engine, prompt, max_tokens, decodings, stops, state.request_timeout_s, listener)
    request.state.streaming = True  # the gate records the request when its body has been sent
    version = loaded.version
    chunks = _Chunks(kind, rid, version, loaded.tokenizer, table)

    async def events():
        answers = [_StreamedAnswer(stops, loaded.tokenizer if scoring else None) for _ in futures]
        waiters = [asyncio.wrap_future(f) for f in futures]
        results: list = [None] * len(futures)
        nxt = None
        try:
            if kind == "chat":
                for i in range(len(answers)):
                    yield chunks.piece(i, role=True)
            while any(r is None for r in results):
                nxt = nxt or asyncio.ensure_future(pieces.get())
                pending = {w for w, r in zip(waiters, results) if r is None}
                done, _ = await asyncio.wait(pending | {nxt}, timeout=state.request_timeout_s + 5,
                                             return_when=asyncio.FIRST_COMPLETED)
                if not done:  # past the time-out and nothing moved: stuck
                    raise TimeoutError
                if nxt in done:
                    i, piece, scored = nxt.result()
                    nxt = None
                    text, scored = answers[i].add(piece, scored) if results[i] is None else ("", [])
                    if text or scored:
                        yield chunks.piece(i, text, scored=scored)
                for i, waiter in enumerate(waiters):
                    if waiter in done and results[i] is None:  # whole: its rest, then its finish reason
                        results[i] = waiter.result()
                        rest, scored = answers[i].end(results[i][1])
                        if rest or scored:
                            yield chunks.piece(i, rest, scored=scored)
                        yield chunks.piece(i, finish=answers[i].finish)
            outs = [out for _, out in results]
            _note(request, results[0][0], logged_prompt, outs, answers[0].sent)
            if include_usage:
                yield chunks.usage(outs)
            yield "data: [DONE]\n\n"
        except (TimeoutError, asyncio.TimeoutError):
            request.state.status, request.state.error = 504, "generation did not finish within the time-out"
            request.state.log = {"version": version, "prompt": logged_prompt, "output": answers[0].sent}
            yield f"data: {json.dumps({'error': {'message': request.state.error, 'type': 'timeout'}})}\n\n"
        except GrammarError as exc:  # a model swapped in since the check cannot take the grammar
            request.state.status, request.state.error = 400, str(exc)
            request.state.log = {"version": version, "prompt": logged_prompt, "output": answers[0].sent}
            yield f"data: {json.dumps({'error': {'message': str(exc), 'type': 'invalid_request_error'}})}\n\n"
        except Exception:  # a failure inside the engine, after the response started: say so, never a traceback
            request.state.status, request.state.error = 500, "internal server error"
            request.state.log = {"version": version, "prompt": logged_prompt, "output": answers[0].sent}
            yield f"data: {json.dumps({'error': {'message': 'internal server error', 'type': 'server_error'}})}\n\n"
        finally:
            if nxt is not None:
                nxt.cancel()
            for waiter in waiters:  # a second answer's error after the first ended the stream: retrieved, not logged
                if waiter.done() and not waiter.cancelled():
                    waiter.exception()
            if any(not f.done() for f in futures):  # the client left (or we stopped early): the engine stops them
                for f in futures:
                    f.cancel()
                if getattr(request.state, "status", None) is None:
                    request.state.status, request.state.error = 499, "the client closed the request"
                    request.state.log = {"version": version, "prompt": logged_prompt, "output": answers[0].sent}

    return StreamingResponse(events(), media_type="text/event-stream", headers={"X-Skilltune-Version": version})


def _include_usage(req) -> bool:
    return bool(req.stream_options and req.stream_options.include_usage)


def _usage(out, *more) -> dict:
    """Token usage of one answer, or of a request's answers (the prompt counted once)."""
    completion = out.new_tokens + sum(o.new_tokens for o in more)
    return {"prompt_tokens": out.prompt_tokens, "completion_tokens": completion,
            "total_tokens": out.prompt_tokens + completion}


# ---------------------------------------------------------------- routes
async def chat(req: ChatRequest, request: Request):
    state = _st(request)
    _check_model(state, req.model)
    _refuse_unsupported(req)
    max_tokens = _limit(state, req.max_completion_tokens or req.max_tokens, state.default_max_tokens)
    stops = _stops(req.stop)
    loaded = state.engine.current
    msgs = [{"role": m.role, "content": m.text()} for m in req.messages]
    if loaded.system_prompt and msgs[0]["role"] != "system":
        msgs.insert(0, {"role": "system", "content": loaded.system_prompt})
    if msgs[-1]["role"] != "user":
        raise ApiError(400, "the last message must be from the user", param="messages")
    request.state.log = {"prompt": msgs[-1]["content"]}
    prompt = loaded.tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    await _admit(state, loaded, prompt, max_tokens, req.n)
    decodings = _decodings(req, await _grammar(req, loaded), vocab_width(loaded.model, loaded.tokenizer))
    rid = f"chatcmpl-{uuid.uuid4().hex[:24]}"
    if req.stream:
        return await _stream(request, "chat", prompt, max_tokens, decodings, stops, msgs[-1]["content"], rid,
                             _include_usage(req))
    table = await _byte_table(loaded, decodings[0]["logprobs"] is not None)
    answers = await _run(request, prompt, max_tokens, decodings, stops)
    choices = [_chat_choice(i, out, stops, loaded.tokenizer, table) for i, (_, out) in enumerate(answers)]
    version = answers[0][0]
    _note(request, version, msgs[-1]["content"], [out for _, out in answers], choices[0]["message"]["content"])
    return JSONResponse({"id": rid, "object": "chat.completion", "created": int(time.time()), "model": version,
                         "choices": choices, "usage": _usage(*[out for _, out in answers])},
                        headers={"X-Skilltune-Version": version})


def _chat_choice(index: int, out, stops: list[str], tokenizer, table) -> dict:
    text, finish = _cut(out.text, out.stopped, stops)
    choice = {"index": index, "message": {"role": "assistant", "content": text}, "finish_reason": finish}
    if out.logprobs is not None:
        choice["logprobs"] = {"content": [_chat_logprob(tokenizer, table, piece, e)
                                          for piece, e in _scored(tokenizer, out.logprobs, text)], "refusal": None}
    return choice


async def completions(req: CompletionRequest, request: Request):
    state = _st(request)
    _check_model(state, req.model)
    _refuse_unsupported(req)
    if isinstance(req.prompt, list):
        if len(req.prompt) != 1:
            raise ApiError(400, "send one prompt per request", param="prompt")
        prompt = req.prompt[0]
    else:
        prompt = req.prompt
    if req.echo and req.stream:
        raise ApiError(400, "'echo' is not streamed by this server: ask without stream", param="echo",
                       code="unsupported_parameter")
    if req.max_tokens == 0 and not req.echo:
        raise ApiError(400, "max_tokens 0 generates nothing: it is for echo: true (the prompt scored alone)",
                       param="max_tokens")
    max_tokens = 0 if req.max_tokens == 0 else _limit(state, req.max_tokens, 16)
    stops = _stops(req.stop)
    request.state.log = {"prompt": prompt}
    loaded = state.engine.current
    await _admit(state, loaded, prompt, max_tokens, req.n)
    decodings = _decodings(req, await _grammar(req, loaded), vocab_width(loaded.model, loaded.tokenizer))
    rid = f"cmpl-{uuid.uuid4().hex[:24]}"
    if req.stream:
        return await _stream(request, "completion", prompt, max_tokens, decodings, stops, prompt, rid,
                             _include_usage(req))
    prompt_ids = await run_in_threadpool(loaded.token_ids, prompt) if req.echo else []
    if max_tokens:
        answers = await _run(request, prompt, max_tokens, decodings, stops)
    else:  # echo alone: the prompt (scored when asked) and nothing generated
        nothing = Generation("", len(prompt_ids), 0, 0.0, False, [] if req.logprobs is not None else None)
        answers = [(loaded.version, nothing)] * req.n
    choices = [_completion_choice(i, out, stops, loaded.tokenizer) for i, (_, out) in enumerate(answers)]
    version = answers[0][0]
    _note(request, version, prompt, [out for _, out in answers], choices[0]["text"])
    if req.echo:
        scored: dict[tuple, list] = {}  # answers with the same tokens (greedy n, max_tokens 0) are scored once
        choices = [await _echoed(request, loaded, (prompt, prompt_ids), choice, out, req.logprobs, scored)
                   for choice, (_, out) in zip(choices, answers)]
    return JSONResponse({"id": rid, "object": "text_completion", "created": int(time.time()), "model": version,
                         "choices": choices, "usage": _usage(*[out for _, out in answers])},
                        headers={"X-Skilltune-Version": version})


def _completion_choice(index: int, out, stops: list[str], tokenizer) -> dict:
    text, finish = _cut(out.text, out.stopped, stops)
    choice = {"index": index, "text": text, "finish_reason": finish}
    if out.logprobs is not None:
        choice["logprobs"] = _completion_logprobs(tokenizer, _scored(tokenizer, out.logprobs, text))
    return choice


async def _echoed(request: Request, loaded, prompt: tuple[str, list[int]], choice: dict, out, k: int | None,
                  done: dict[tuple, list]) -> dict:
    """``choice`` with the prompt in front of its text (OpenAI's ``echo``). With ``logprobs`` (what
    lm-evaluation-harness's loglikelihood tasks read), every token of prompt and answer, the end token it stopped
    on included (``max_tokens`` tokens were generated), with its log-probability given the tokens before it (the
    first token: null) and the top ``k``: one teacher-forced pass over them between two of the engine's steps.
    ``prompt``: its text and token ids; ``done``: the token sequences this request has scored already (identical
    answers are scored once)."""
    text, prompt_ids = prompt
    echoed = {**choice, "text": text + choice["text"]}
    if k is None:
        return echoed
    state, tokenizer = _st(request), loaded.tokenizer
    answer = [e.token for _, e in _scored(tokenizer, out.logprobs or [], choice["text"])]
    # it stopped on its end token (not on a stop sequence): that token was generated too
    ended = out.stopped and choice["finish_reason"] == "stop" and len(answer) == len(out.logprobs or [])
    end = [tokenizer.eos_token_id] if ended else []
    ids = prompt_ids + answer + end
    if tuple(ids) not in done:
        try:
            done[tuple(ids)] = await run_in_threadpool(state.engine.score, loaded, ids, k, state.request_timeout_s)
        except TimeoutError:
            raise ApiError(504, f"scoring the prompt did not finish within {state.request_timeout_s:g} s",
                           "timeout") from None
    pieces = [tokenizer.decode([t]) for t in ids[:len(ids) - len(end)]] + [""] * len(end)  # the end token: no text
    echoed["logprobs"] = _completion_logprobs(tokenizer, list(zip(pieces, done[tuple(ids)])))
    return echoed


async def models(request: Request):
    state = _st(request)
    v = state.engine.current.version
    return {"object": "list", "data": [{"id": state.name, "object": "model", "created": int(state.started),
                                        "owned_by": "skilltune", "version": v}]}


async def health(request: Request):
    """Liveness: the process answers (a load balancer's restart signal)."""
    state = _st(request)
    return {"status": "ok", "version": state.engine.current.version,
            **({"alias_problem": state.alias_problem} if state.alias_problem else {})}


async def ready(request: Request):
    """Readiness: the engine makes progress and the server is not draining (503 otherwise)."""
    state = _st(request)
    ok, reason = state.readiness()
    engine = state.engine
    body = {"status": "ready" if ok else "not ready", "reason": reason, "version": engine.current.version,
            "queue_depth": engine.pending(), "busy": engine.busy_since is not None,
            "last_progress_s_ago": round(time.monotonic() - engine.last_progress, 2),
            **({"alias_problem": state.alias_problem} if state.alias_problem else {})}
    return JSONResponse(body, status_code=200 if ok else 503)


async def metrics(request: Request):
    from prometheus_client import generate_latest

    return PlainTextResponse(generate_latest(_st(request).metrics.registry).decode(),
                             media_type="text/plain; version=0.0.4")


def create_app(state, allowed_hosts: list[str] | None = None) -> FastAPI:
    """The app serving ``state`` (a :class:`skilltune.serve.server.ServerState`).

    ``allowed_hosts``: the ``Host`` header values accepted (DNS-rebinding protection); None accepts any.
    Middleware order, outermost first: trusted hosts, the gate (auth, limits, log), the body limit.
    """
    app = FastAPI(title="skilltune", docs_url=None, redoc_url=None)
    app.state.skilltune = state
    for exc, handler in ((ApiError, _api_error), (RequestValidationError, _validation),
                         (StarletteHTTPException, _http), (Exception, _internal)):
        app.add_exception_handler(exc, handler)
    app.add_middleware(BodyLimit, limit=state.cfg.max_body_bytes, timeout_s=state.cfg.body_timeout_s)
    app.middleware("http")(_gate)
    app.post("/v1/chat/completions")(chat)
    app.post("/v1/completions")(completions)
    for path, route in (("/v1/models", models), ("/health", health), ("/ready", ready), ("/metrics", metrics)):
        app.get(path)(route)
    if allowed_hosts is not None:  # added last, so it runs first: a foreign Host header never reaches a route
        from starlette.middleware.trustedhost import TrustedHostMiddleware

        app.add_middleware(TrustedHostMiddleware, allowed_hosts=allowed_hosts)
    return app
