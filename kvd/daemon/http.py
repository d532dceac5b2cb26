"""The OpenAI-compatible HTTP API, served by aiohttp in the daemon's own event loop.

    GET  /v1/models             the served model
    POST /v1/completions        prompt: a string, token ids, or a list of either
    POST /v1/chat/completions   messages through the model's chat template
    GET  /health                200 when ready, 503 while a worker restarts or the daemon drains
    GET  /metrics               the daemon's Prometheus registry

One prompt of an HTTP request is one kvd request, admitted through the same
`Serving.submit` as a ZeroMQ client's: its id (`cmpl-…` / `chatcmpl-…`, or the client's
own `X-Request-Id`; `<id>-<i>` for the i-th of several prompts) comes back in the
`X-Request-Id` header and the response's `id`, so `kvd trace` finds it. Its `Outbox` is a
`_Choice`: deltas land in the HTTP request's queue and the handler turns them into the JSON
response or server-sent events ending in `data: [DONE]`. A streamed response starts with
its first token, so a request that fails before it (a refused or failed PD handoff, a
deadline) still gets its HTTP status. Every error is an OpenAI error body; a 429 or 503
carries `Retry-After` in whole seconds (kvd/daemon/backoff.py). A client that
disconnects cancels its handler (aiohttp's handler cancellation), which aborts its
requests: their blocks return at once.
"""

from __future__ import annotations

import asyncio
import hmac
import time
import uuid
from typing import Any

import msgspec
import structlog
from aiohttp import web

from kvd.config import KvdConfig
from kvd.daemon import health, tokenizer_api, tools
from kvd.daemon.backoff import RETRYABLE
from kvd.daemon.openai_api import (
    DONE,
    JSON,
    ChatRequest,
    CompletionRequest,
    Shape,
    TokenText,
    error_body,
    sse,
    start_site,
)
from kvd.daemon.owner import Rejected
from kvd.daemon.serving import Serving
from kvd.engine.text import Delta
from kvd.ipc import field_error
from kvd.messages import MAX_REQUEST_ID, ChatMessage, ErrorCode, Generate

log = structlog.get_logger("kvd.http")

GUARDED = ("/v1/", "/tokenize", "/detokenize", "/tokenizer_info")  # what [http] api_key guards


class HttpError(Exception):
    """A request refused before any kvd request exists: its status and message."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class _Failure:
    __slots__ = ("code", "message")

    def __init__(self, code: ErrorCode, message: str) -> None:
        self.code = code
        self.message = message


def _json(status: int, obj: Any, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(status=status, body=JSON.encode(obj), content_type="application/json", headers=headers)


def error_response(status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    return _json(status, error_body(status, message), headers)


class _Choice:
    """One prompt's way back to the HTTP request it serves (the `Outbox` of its kvd records:
    its n choices share it): that HTTP request's queue, where its choices' responses start
    (`first`: the prompt's index times n), and `done` once every choice's end was queued."""

    __slots__ = ("queue", "first", "left", "done")

    def __init__(self, queue: asyncio.Queue, first: int, n: int) -> None:
        self.queue = queue
        self.first = first
        self.left = n  # choices whose final delta has not come
        self.done = False

    async def deliver(self, delta: Delta) -> None:
        if delta.output is not None:
            self.left -= 1
            self.done = not self.left
        self.queue.put_nowait((self.first + delta.index, delta))

    async def fail(self, request_id: str, code: ErrorCode, message: str) -> None:
        if not self.done:  # its choices fail together: the handler hears it once
            self.done = True
            self.queue.put_nowait((self.first, _Failure(code, message)))


class HttpFrontend:
    """The HTTP server: each HTTP request's kvd requests feed its queue through their `_Choice`."""

    def __init__(self, cfg: KvdConfig, serving: Serving, model_name: str, metrics) -> None:
        self.cfg = cfg.http
        self.serving = serving
        self.model_name = model_name
        self.accepted_models = {model_name} | ({cfg.model.model} if cfg.model.model else set())
        self.metrics = metrics
        self.created = int(time.time())
        self.token_text = TokenText(serving.text.tokenizer)
        self.url: str | None = None
        self._runner: web.AppRunner | None = None

    async def start(self) -> str:
        """Bind (port 0: a free one) and serve; returns the base URL."""
        app = web.Application(client_max_size=self.cfg.max_body_bytes, middlewares=[self._guard])
        app.router.add_get("/v1/models", self.models)
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_post("/v1/chat/completions", self.chat_completions)
        app.router.add_post("/tokenize", self.tokenize)
        app.router.add_post("/detokenize", self.detokenize)
        app.router.add_get("/tokenizer_info", self.tokenizer_info)
        app.router.add_get("/health", self.health)
        app.router.add_get("/metrics", self.metrics_page)
        self._runner, self.url = await start_site(app, self.cfg.host, self.cfg.port)
        log.info("http_serving", url=self.url, auth=bool(self.cfg.api_key))
        return self.url

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    # ---- middleware: auth, error bodies, Retry-After -----------------------------------
    @web.middleware
    async def _guard(self, request: web.Request, handler) -> web.StreamResponse:
        response = await self._answer(request, handler)
        if response.status in RETRYABLE and not response.prepared:  # however it was refused
            response.headers["Retry-After"] = str(health.retry_after(self.serving))
        return response

    async def _answer(self, request: web.Request, handler) -> web.StreamResponse:
        try:
            if self.cfg.api_key and request.path.startswith(GUARDED):
                given = request.headers.get("Authorization", "").encode()
                if not hmac.compare_digest(given, f"Bearer {self.cfg.api_key}".encode()):
                    return error_response(401, "Authorization: a valid 'Bearer <api_key>' is required")
            return await handler(request)
        except HttpError as e:
            return error_response(e.status, e.message)
        except web.HTTPException as e:  # aiohttp's own: no route, wrong method, body too large
            if e.status < 400:
                raise
            return error_response(e.status, _describe(request, e, self.cfg.max_body_bytes))
        except (ConnectionResetError, asyncio.CancelledError):
            raise  # the client left; its requests were aborted
        except Exception as e:  # noqa: BLE001 - one line in the log, an error body to the client
            log.error("http_handler_failed", path=request.path, error=f"{type(e).__name__}: {e}")
            return error_response(500, f"internal: {type(e).__name__}: {e}")

    # ---- endpoints ---------------------------------------------------------------------
    async def health(self, request: web.Request) -> web.Response:
        state = health.state(self.serving)
        if state != "ready":
            reasons = health.problems(self.serving) or [state]
            return error_response(503, f"health: {state} ({'; '.join(reasons)})")
        return _json(200, {"status": "ok"})

    async def metrics_page(self, request: web.Request) -> web.Response:
        from prometheus_client import CONTENT_TYPE_LATEST

        return web.Response(body=self.metrics.render(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def models(self, request: web.Request) -> web.Response:
        engine = self.serving.engine
        card = {"id": self.model_name, "object": "model", "created": self.created, "owned_by": "kvd",
                "max_model_len": engine.max_model_len if engine is not None else None}  # fmt: skip
        return _json(200, {"object": "list", "data": [card]})

    async def tokenize(self, request: web.Request) -> web.Response:
        body = await self._decode(request, tokenizer_api.TokenizeRequest)
        engine = self.serving.engine
        try:
            return _json(200, tokenizer_api.tokenize(self.serving.text, body, engine.max_model_len if engine else None))
        except ValueError as e:
            raise HttpError(400, str(e)) from None

    async def detokenize(self, request: web.Request) -> web.Response:
        body = await self._decode(request, tokenizer_api.DetokenizeRequest)
        try:
            return _json(200, tokenizer_api.detokenize(self.serving.text, body, len(self.serving.text.tokenizer)))
        except ValueError as e:
            raise HttpError(400, str(e)) from None

    async def tokenizer_info(self, request: web.Request) -> web.Response:
        engine = self.serving.engine
        return _json(200, tokenizer_api.tokenizer_info(self.serving.text, engine.max_model_len if engine else None))

    async def completions(self, request: web.Request) -> web.StreamResponse:
        body = await self._decode(request, CompletionRequest)
        try:
            prompts = body.prompts()
            params = body.sampling(16 if body.max_tokens is None else body.max_tokens, self.serving.text.word_ids)
        except ValueError as e:
            raise HttpError(400, str(e)) from None
        base = self._request_id(request, "cmpl")
        gens = [Generate(request_id=rid, params=params, stream=body.stream,
                         **({"prompt": p} if isinstance(p, str) else {"prompt_token_ids": p}))
                for rid, p in zip(_ids(base, len(prompts)), prompts)]  # fmt: skip
        wants_logprobs = params.logprobs is not None or params.prompt_logprobs is not None
        decode = self.serving.text.tokenizer.decode
        echo = [p if isinstance(p, str) else decode(p) for p in prompts] if body.echo else None
        shape = Shape(False, base, self.model_name, self.token_text if wants_logprobs else None, echo, params.n,
                      drop_output=body.echo and body.max_tokens == 0)  # fmt: skip
        return await self._serve(request, shape, gens, body)

    async def chat_completions(self, request: web.Request) -> web.StreamResponse:
        body = await self._decode(request, ChatRequest)
        base = self._request_id(request, "chatcmpl")
        text = self.serving.text
        try:
            messages = body.chat()
            plan = body.tool_plan(self.cfg.tool_call_parser)
            max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
            params = body.sampling_with(1 if max_tokens is None else max_tokens, text.word_ids, plan)
            if plan is None and not any("tool_calls" in m or m["role"] == "tool" for m in messages):
                prompt: dict[str, Any] = {"chat": [ChatMessage(m["role"], m["content"]) for m in messages]}
            else:  # tools, calls or answers: templated here, in the Hermes form where the template has no tools
                messages, defs = tools.render(messages, plan.tools if plan else [], str(text.tokenizer.chat_template))
                prompt = {"prompt_token_ids": text.chat_ids(messages, tools=defs)}
        except ValueError as e:
            raise HttpError(400, str(e)) from None
        gen = Generate(request_id=base, params=params, stream=body.stream, **prompt)
        # No max_tokens: as much as the context leaves after the templated prompt.
        shape = Shape(True, base, self.model_name, self.token_text if params.logprobs is not None else None,
                      tools=plan)  # fmt: skip
        return await self._serve(request, shape, [gen], body, max_tokens is None)

    # ---- helpers -----------------------------------------------------------------------
    async def _decode(self, request: web.Request, kind: type):
        length = request.content_length
        if length is not None and length > self.cfg.max_body_bytes:
            raise HttpError(413, f"body: {length} bytes exceeds max_body_bytes {self.cfg.max_body_bytes}")
        raw = await request.read()
        try:
            body = msgspec.json.decode(raw, type=kind)
        except msgspec.ValidationError as e:
            raise HttpError(400, field_error(e, "body")) from None
        except msgspec.DecodeError as e:
            raise HttpError(400, f"body: invalid JSON: {e}") from None
        if body.model is not None and body.model not in self.accepted_models:
            raise HttpError(404, f"model: the model {body.model!r} does not exist (this server has "
                                 f"{self.model_name!r})")  # fmt: skip
        bad = body.unsupported()
        if bad is not None:
            raise HttpError(400, f"{bad[0]}: {bad[1]}")
        return body

    def _request_id(self, request: web.Request, kind: str) -> str:
        given = request.headers.get("X-Request-Id")
        if given is None:
            return f"{kind}-{uuid.uuid4().hex}"
        if not 0 < len(given) <= MAX_REQUEST_ID or not given.isprintable():
            raise HttpError(400, f"X-Request-Id: must be 1 to {MAX_REQUEST_ID} printable characters")
        return given

    async def _serve(self, request: web.Request, shape: Shape, gens: list[Generate], body,
                     fill_max_tokens: bool = False) -> web.StreamResponse:  # fmt: skip
        """Submit every prompt, then answer; a client that leaves aborts what is still running."""
        q: asyncio.Queue = asyncio.Queue()
        mine: list[tuple[str, _Choice]] = []  # what this handler submitted: another's request is never touched
        try:
            n = gens[0].params.n
            for i, gen in enumerate(gens):
                choice = _Choice(q, i * n, n)
                try:
                    await self.serving.admit(gen, choice, fill_max_tokens)
                except Rejected as e:
                    return error_response(int(e.code), e.message, {"X-Request-Id": shape.request_id})
                mine.append((gen.request_id, choice))
            if body.stream:
                return await self._stream(request, shape, q, len(gens) * n, body.include_usage)
            return await self._collect(shape, q, len(gens) * n)
        finally:
            for request_id, choice in mine:
                if not choice.done:
                    self.serving.abort(request_id, choice)

    async def _collect(self, shape: Shape, q: asyncio.Queue, n: int) -> web.Response:
        outputs: list = [None] * n
        while any(out is None for out in outputs):
            index, item = await q.get()
            if isinstance(item, _Failure):
                return error_response(int(item.code), item.message, {"X-Request-Id": shape.request_id})
            if item.output is not None:
                outputs[index] = item.output
        return _json(200, shape.response(outputs), {"X-Request-Id": shape.request_id})

    async def _stream(self, request: web.Request, shape: Shape, q: asyncio.Queue, n: int,
                      include_usage: bool) -> web.StreamResponse:  # fmt: skip
        resp: web.StreamResponse | None = None
        prompt_tokens = completion_tokens = cached_tokens = 0
        while n:
            index, item = await q.get()
            if isinstance(item, _Failure):
                if resp is None:  # nothing sent yet: the status says it
                    return error_response(int(item.code), item.message, {"X-Request-Id": shape.request_id})
                await resp.write(sse(error_body(int(item.code), item.message)))
                break
            if resp is None:
                resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                                                   "X-Request-Id": shape.request_id})  # fmt: skip
                await resp.prepare(request)
            if item.text or item.output is not None:
                chunk = shape.chunk(index, item)
                if chunk:  # empty: text the tool call parser holds
                    await resp.write(chunk)
            if item.output is not None:
                n -= 1
                if item.index == 0:  # each prompt counts once
                    prompt_tokens += len(item.output.prompt_token_ids)
                    cached_tokens += item.output.num_cached_tokens
                completion_tokens += 0 if shape.drop_output else len(item.output.token_ids)
        if include_usage and n == 0:
            await resp.write(shape.usage_chunk(prompt_tokens, completion_tokens, cached_tokens))
        await resp.write(DONE)
        await resp.write_eof()
        return resp


def _ids(base: str, n: int) -> list[str]:
    return [base] if n == 1 else [f"{base}-{i}" for i in range(n)]


def _describe(request: web.Request, e: web.HTTPException, max_body: int) -> str:
    if isinstance(e, web.HTTPRequestEntityTooLarge):
        return f"body: exceeds max_body_bytes {max_body}"
    if isinstance(e, web.HTTPNotFound):
        return f"path: no endpoint {request.path!r} (see /v1/models, /v1/completions, /v1/chat/completions)"
    if isinstance(e, web.HTTPMethodNotAllowed):
        return f"method: {request.method} is not allowed on {request.path}"
    return e.reason or f"HTTP {e.status}"
