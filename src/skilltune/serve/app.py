"""The OpenAI-compatible HTTP API (FastAPI): chat/completions, completions, models, health, metrics.

Errors are OpenAI-shaped (``{"error": {"message", "type", "param", "code"}}``) with 4xx
codes for every client mistake and no server paths in any message. With an API key
set, every route but ``/health`` needs ``Authorization: Bearer KEY`` (compared in
constant time). Every response names the registry version that answered, in the
``model`` field and the ``X-Skilltune-Version`` header.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from typing import Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from skilltune.serve.engine import Engine, QueueFull


class ApiError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        self.status, self.message, self.type, self.param, self.code, self.headers = (
            status, message, type_, param, code, headers or {})


def _error(status: int, message: str, type_: str = "invalid_request_error", param=None, code=None, headers=None):
    return JSONResponse({"error": {"message": message, "type": type_, "param": param, "code": code}},
                        status_code=status, headers=headers)


class TextPart(BaseModel):
    """One content part; only text is served (an image or audio part is a 422 naming the field)."""

    model_config = ConfigDict(extra="allow")
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "user", "assistant"]
    content: str | list[TextPart]

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="allow")  # OpenAI clients send options we do not use
    model: str
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(0.0, ge=0.0, le=2.0)
    stream: bool = False
    n: int = Field(1, ge=1, le=1)


class CompletionRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str
    prompt: str | list[str]
    max_tokens: int | None = Field(16, ge=1)
    temperature: float = Field(0.0, ge=0.0, le=2.0)
    stream: bool = False
    n: int = Field(1, ge=1, le=1)


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


def create_app(state, allowed_hosts: list[str] | None = None) -> FastAPI:
    """``state`` is a :class:`skilltune.serve.server.ServerState` (engine, name, settings, log, metrics).

    ``allowed_hosts``: the ``Host`` header values accepted (DNS-rebinding protection); None accepts any.
    """
    app = FastAPI(title="skilltune", docs_url=None, redoc_url=None)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        return _error(exc.status, exc.message, exc.type, exc.param, exc.code, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        errs = exc.errors()
        if any(e.get("type") == "json_invalid" for e in errs):
            return _error(400, "the request body is not valid JSON", code="invalid_json")
        first = errs[0]
        param = ".".join(str(p) for p in first.get("loc", [])[1:]) or None
        return _error(422, f"{param or 'body'}: {first.get('msg')}", param=param, code=first.get("type"))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        return _error(exc.status_code, str(exc.detail), "invalid_request_error")

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception):  # a bug of ours: no details, no paths
        # This handler runs outside the middleware below, so it counts the failure itself.
        route = route_label(app, request.scope)
        state.metrics.requests.labels(route=route, status="500").inc()
        state.metrics.errors.labels(route=route).inc()
        return _error(500, "internal server error", "server_error")

    @app.middleware("http")
    async def _auth_and_metrics(request: Request, call_next):
        t0 = time.perf_counter()
        route = route_label(app, request.scope)
        if state.api_key and request.url.path != "/health":
            header = request.headers.get("authorization", "")
            token = header[7:] if header.lower().startswith("bearer ") else ""
            if not hmac.compare_digest(token.encode(), state.api_key.encode()):
                state.metrics.requests.labels(route=route, status="401").inc()
                state.metrics.errors.labels(route=route).inc()
                return _error(401, "missing or wrong API key: send Authorization: Bearer KEY", "authentication_error",
                              code="invalid_api_key")
        response = await call_next(request)
        state.metrics.requests.labels(route=route, status=str(response.status_code)).inc()
        state.metrics.latency.labels(route=route).observe(time.perf_counter() - t0)
        if response.status_code >= 400:
            state.metrics.errors.labels(route=route).inc()
        if "x-skilltune-version" not in response.headers:  # generation routes set the version that answered
            response.headers["X-Skilltune-Version"] = state.engine.current.version
        return response

    def _check_model(name: str) -> None:
        if name not in state.accepted_names():
            raise ApiError(404, f"model '{name}' is not served here; this server serves '{state.name}'",
                           param="model", code="model_not_found")

    def _limit(requested: int | None, default: int) -> int:
        value = requested or default
        if value > state.max_tokens_limit:
            raise ApiError(400, f"max_tokens {value} is over this server's limit of {state.max_tokens_limit}",
                           param="max_tokens", code="max_tokens_too_large")
        return value

    async def _run(prompt: str, max_tokens: int, temperature: float):
        engine: Engine = state.engine
        try:
            fut = engine.submit(prompt, max_tokens, temperature)
        except QueueFull:
            raise ApiError(429, "the server is busy: too many queued requests; retry shortly", "rate_limit_error",
                           headers={"Retry-After": "1"}) from None
        try:
            return await asyncio.wait_for(asyncio.wrap_future(fut), timeout=state.request_timeout_s)
        except asyncio.TimeoutError:
            fut.cancel()
            raise ApiError(504, f"generation did not finish within {state.request_timeout_s:g} s", "timeout") from None

    def _log(route, prompt, output, t0, ptoks, ctoks, status, version, error=""):
        state.metrics.tokens.labels(kind="prompt").inc(ptoks)
        state.metrics.tokens.labels(kind="completion").inc(ctoks)
        if state.log is not None:
            state.log.write(version, route, prompt, output, time.perf_counter() - t0, ptoks, ctoks, status, error)

    def _stream(kind: str, version: str, text: str, finish: str, rid: str):
        created = int(time.time())

        def chunk(delta: dict | str, fin=None):
            if kind == "chat":
                body = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": version,
                        "choices": [{"index": 0, "delta": delta, "finish_reason": fin}]}
            else:
                body = {"id": rid, "object": "text_completion", "created": created, "model": version,
                        "choices": [{"index": 0, "text": delta, "finish_reason": fin}]}
            return f"data: {json.dumps(body)}\n\n"

        def events():
            if kind == "chat":
                yield chunk({"role": "assistant", "content": ""})
            words = text.split(" ")
            for i, w in enumerate(words):
                piece = w if i == 0 else " " + w
                yield chunk({"content": piece} if kind == "chat" else piece)
            yield chunk({} if kind == "chat" else "", finish)
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"X-Skilltune-Version": version})

    @app.post("/v1/chat/completions")
    async def chat(req: ChatRequest):
        t0 = time.perf_counter()
        _check_model(req.model)
        max_tokens = _limit(req.max_completion_tokens or req.max_tokens, state.default_max_tokens)
        loaded = state.engine.current
        msgs = [{"role": m.role, "content": m.text()} for m in req.messages]
        if loaded.system_prompt and msgs[0]["role"] != "system":
            msgs.insert(0, {"role": "system", "content": loaded.system_prompt})
        if msgs[-1]["role"] != "user":
            raise ApiError(400, "the last message must be from the user", param="messages")
        prompt = loaded.tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        version, out = await _run(prompt, max_tokens, req.temperature)
        finish = "stop" if out.stopped else "length"
        _log("chat", msgs[-1]["content"], out.text, t0, out.prompt_tokens, out.new_tokens, 200, version)
        rid = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        if req.stream:
            return _stream("chat", version, out.text, finish, rid)
        return JSONResponse({"id": rid, "object": "chat.completion", "created": int(time.time()), "model": version,
                             "choices": [{"index": 0, "message": {"role": "assistant", "content": out.text},
                                          "finish_reason": finish}],
                             "usage": {"prompt_tokens": out.prompt_tokens, "completion_tokens": out.new_tokens,
                                       "total_tokens": out.prompt_tokens + out.new_tokens}},
                            headers={"X-Skilltune-Version": version})

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest):
        t0 = time.perf_counter()
        _check_model(req.model)
        if isinstance(req.prompt, list):
            if len(req.prompt) != 1:
                raise ApiError(400, "send one prompt per request", param="prompt")
            prompt = req.prompt[0]
        else:
            prompt = req.prompt
        max_tokens = _limit(req.max_tokens, 16)
        version, out = await _run(prompt, max_tokens, req.temperature)
        finish = "stop" if out.stopped else "length"
        _log("completions", prompt, out.text, t0, out.prompt_tokens, out.new_tokens, 200, version)
        rid = f"cmpl-{uuid.uuid4().hex[:24]}"
        if req.stream:
            return _stream("completion", version, out.text, finish, rid)
        return JSONResponse({"id": rid, "object": "text_completion", "created": int(time.time()), "model": version,
                             "choices": [{"index": 0, "text": out.text, "finish_reason": finish}],
                             "usage": {"prompt_tokens": out.prompt_tokens, "completion_tokens": out.new_tokens,
                                       "total_tokens": out.prompt_tokens + out.new_tokens}},
                            headers={"X-Skilltune-Version": version})

    @app.get("/v1/models")
    async def models():
        v = state.engine.current.version
        return {"object": "list", "data": [{"id": state.name, "object": "model", "created": int(state.started),
                                            "owned_by": "skilltune", "version": v}]}

    @app.get("/health")
    async def health():
        return {"status": "ok", "version": state.engine.current.version}

    @app.get("/metrics")
    async def metrics():
        from prometheus_client import generate_latest

        return PlainTextResponse(generate_latest(state.metrics.registry).decode(),
                                 media_type="text/plain; version=0.0.4")

    if allowed_hosts is not None:  # added last, so it runs first: a foreign Host header never reaches a route
        from starlette.middleware.trustedhost import TrustedHostMiddleware

        app.add_middleware(TrustedHostMiddleware, allowed_hosts=allowed_hosts)
    return app
