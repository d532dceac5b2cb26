"""Clients of a running daemon (DESIGN.md §9): `Client` (blocking), `AsyncClient`, `KvdError`.

    with Client(endpoint) as c:
        r = c.generate(prompt="text", max_tokens=64, temperature=0.0)   # r.token_ids, r.text, r.finish_reason
        c.status()                                                      # dict, as `kvd status --json`
    async with AsyncClient(endpoint) as c:
        async for chunk in c.stream(prompt=..., max_tokens=...): ...    # chunk.token_ids (new), chunk.text
        await c.abort(request_id)

Sampling options are SamplingParams fields given as keywords. Every failure raises
KvdError with `.code` (400, 429, 500, 502, 503, 504) and `.message`; a daemon that does
not answer within `timeout` seconds is a 504, never a hang. Leaving a stream early
aborts its request.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import msgspec
import zmq
import zmq.asyncio

from kvd.messages import (
    Abort,
    ChatMessage,
    Chunk,
    Error,
    ErrorCode,
    Generate,
    ServerMessage,
    Status,
    StatusReply,
)
from kvd.outputs import RequestOutput
from kvd.sampling import SamplingParams

DEFAULT_TIMEOUT_S = 600.0


class KvdError(Exception):
    """Every failure a client sees: `.code` (400, 429, 500, 502, 503, 504) and `.message`."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


def _generate_msg(
    prompt: str | None,
    prompt_token_ids: list[int] | None,
    chat: list[dict[str, str]] | None,
    request_id: str | None,
    stream: bool,
    options: dict[str, Any],
) -> Generate:
    try:
        params = SamplingParams.from_options(options)
        msgs = None if chat is None else [ChatMessage(m["role"], m["content"]) for m in chat]
    except (ValueError, KeyError, TypeError) as e:
        raise KvdError(ErrorCode.BAD_REQUEST, str(e)) from None
    return Generate(request_id=request_id or uuid.uuid4().hex, prompt=prompt, prompt_token_ids=prompt_token_ids,
                    chat=msgs, params=params, stream=stream)  # fmt: skip


class _Collector:
    """Folds a request's chunks into a RequestOutput."""

    def __init__(self, request_id: str) -> None:
        self.out = RequestOutput(request_id=request_id, prompt_token_ids=[], token_ids=[], text="", finish_reason=None)

    def add(self, chunk: Chunk) -> None:
        self.out.token_ids += chunk.token_ids
        self.out.text += chunk.text
        if chunk.finish_reason is not None:
            self.out.finish_reason = chunk.finish_reason
            self.out.num_cached_tokens = chunk.num_cached_tokens
            self.out.logprobs = chunk.logprobs


def _chunk(reply: ServerMessage) -> Chunk | None:
    """A stream's reply as a chunk to yield, None for Accepted; an Error raises KvdError."""
    if isinstance(reply, Error):
        raise KvdError(int(reply.code), reply.message)
    return reply if isinstance(reply, Chunk) else None


def _ends(reply: ServerMessage) -> bool:
    """Whether the daemon has ended the request with this reply (no Abort is owed then)."""
    return isinstance(reply, Error) or (isinstance(reply, Chunk) and reply.finish_reason is not None)


class AsyncClient:
    """Many concurrent requests over one DEALER socket; a reader task routes replies."""

    def __init__(self, endpoint: str, timeout: float = DEFAULT_TIMEOUT_S) -> None:
        self.endpoint = endpoint
        self.timeout = timeout
        self._ctx = zmq.asyncio.Context()
        self._sock = self._ctx.socket(zmq.DEALER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._enc = msgspec.msgpack.Encoder()
        self._dec = msgspec.msgpack.Decoder(ServerMessage)
        self._queues: dict[str, asyncio.Queue] = {}
        self._status: asyncio.Queue[StatusReply] = asyncio.Queue()
        self._reader: asyncio.Task | None = None

    async def __aenter__(self) -> AsyncClient:
        self._sock.connect(self.endpoint)
        self._reader = asyncio.create_task(self._read())
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            self._reader = None
        self._sock.close(linger=0)
        self._ctx.term()

    async def _read(self) -> None:
        while True:
            msg = self._dec.decode(await self._sock.recv())
            if isinstance(msg, StatusReply):
                self._status.put_nowait(msg)
                continue
            q = self._queues.get(msg.request_id) if msg.request_id is not None else None
            if q is not None:
                q.put_nowait(msg)
            elif isinstance(msg, Error) and msg.request_id is None:
                for q in self._queues.values():  # a frame-level error: whoever is waiting hears it
                    q.put_nowait(msg)

    async def _next(self, q: asyncio.Queue, deadline: float) -> ServerMessage:
        try:
            return await asyncio.wait_for(q.get(), max(0.0, deadline - time.monotonic()))
        except TimeoutError:
            raise KvdError(ErrorCode.DEADLINE, f"no reply from {self.endpoint} within {self.timeout} s") from None

    async def stream(
        self,
        prompt: str | None = None,
        *,
        prompt_token_ids: list[int] | None = None,
        chat: list[dict[str, str]] | None = None,
        request_id: str | None = None,
        _stream: bool = True,
        **options: Any,
    ) -> AsyncIterator[Chunk]:
        """Yield chunks as tokens are sampled; the last carries finish_reason."""
        msg = _generate_msg(prompt, prompt_token_ids, chat, request_id, _stream, options)
        request_id = msg.request_id
        q: asyncio.Queue = asyncio.Queue()
        self._queues[request_id] = q
        finished = False
        try:
            await self._sock.send(self._enc.encode(msg))
            deadline = time.monotonic() + self.timeout
            while not finished:
                reply = await self._next(q, deadline)
                finished = _ends(reply)
                if (chunk := _chunk(reply)) is not None:
                    yield chunk
        finally:
            self._queues.pop(request_id, None)
            if not finished and not self._sock.closed:
                await self._sock.send(self._enc.encode(Abort(request_id)))

    async def generate(self, prompt: str | None = None, **kwargs: Any) -> RequestOutput:
        """The whole result at once (sent as a non-streaming request)."""
        request_id = kwargs.get("request_id") or uuid.uuid4().hex
        kwargs["request_id"] = request_id
        col = _Collector(request_id)
        async for chunk in self.stream(prompt, _stream=False, **kwargs):
            col.add(chunk)
        return col.out

    async def abort(self, request_id: str) -> None:
        await self._sock.send(self._enc.encode(Abort(request_id)))

    async def status(self) -> dict[str, Any]:
        await self._sock.send(self._enc.encode(Status()))
        reply = await self._next(self._status, time.monotonic() + self.timeout)
        return reply.status


class Client:
    """The blocking client: one request at a time over a DEALER socket."""

    def __init__(self, endpoint: str, timeout: float = DEFAULT_TIMEOUT_S) -> None:
        self.endpoint = endpoint
        self.timeout = timeout
        self._ctx = zmq.Context()
        self._sock = self._ctx.socket(zmq.DEALER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.connect(endpoint)
        self._enc = msgspec.msgpack.Encoder()
        self._dec = msgspec.msgpack.Decoder(ServerMessage)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._sock.close(linger=0)
        self._ctx.term()

    def _recv(self, deadline: float) -> ServerMessage:
        left_ms = int(max(0.0, deadline - time.monotonic()) * 1000)
        if not self._sock.poll(left_ms, zmq.POLLIN):
            raise KvdError(ErrorCode.DEADLINE, f"no reply from {self.endpoint} within {self.timeout} s")
        return self._dec.decode(self._sock.recv())

    def stream(
        self,
        prompt: str | None = None,
        *,
        prompt_token_ids: list[int] | None = None,
        chat: list[dict[str, str]] | None = None,
        request_id: str | None = None,
        _stream: bool = True,
        **options: Any,
    ) -> Iterator[Chunk]:
        msg = _generate_msg(prompt, prompt_token_ids, chat, request_id, _stream, options)
        request_id = msg.request_id
        self._sock.send(self._enc.encode(msg))
        deadline = time.monotonic() + self.timeout
        finished = False
        try:
            while not finished:
                reply = self._recv(deadline)
                if isinstance(reply, StatusReply) or getattr(reply, "request_id", request_id) not in (request_id, None):
                    continue  # a reply to an earlier, abandoned request
                finished = _ends(reply)
                if (chunk := _chunk(reply)) is not None:
                    yield chunk
        finally:
            if not finished:
                self._sock.send(self._enc.encode(Abort(request_id)))

    def generate(self, prompt: str | None = None, **kwargs: Any) -> RequestOutput:
        request_id = kwargs.get("request_id") or uuid.uuid4().hex
        kwargs["request_id"] = request_id
        col = _Collector(request_id)
        for chunk in self.stream(prompt, _stream=False, **kwargs):
            col.add(chunk)
        return col.out

    def abort(self, request_id: str) -> None:
        self._sock.send(self._enc.encode(Abort(request_id)))

    def status(self) -> dict[str, Any]:
        self._sock.send(self._enc.encode(Status()))
        deadline = time.monotonic() + self.timeout
        while True:
            reply = self._recv(deadline)
            if isinstance(reply, StatusReply):
                return reply.status
