"""Clients of a running daemon: `Client` (blocking), `AsyncClient`, `KvdError`
(docs/architecture.md, "Interfaces users see").

    with Client(endpoint) as c:
        r = c.generate(prompt="text", max_tokens=64, temperature=0.0)   # r.token_ids, r.text, r.finish_reason
        c.status()                                                      # dict, as `kvd status --json`
    async with AsyncClient(endpoint) as c:
        async for chunk in c.stream(prompt=..., max_tokens=...): ...    # chunk.token_ids (new), chunk.text
        await c.abort(request_id)

Sampling options are SamplingParams fields given as keywords. Every failure raises
KvdError with `.code` (400, 429, 500, 502, 503, 504) and `.message` (and for a daemon's
429 or 503, `.retry_after`: seconds to wait before trying again): a request the client
can tell is bad (a field the daemon would refuse, a request id already streaming on this
client) is refused here, before anything is sent; no daemon accepting connections at the
endpoint within `connect_timeout` is a 503, and one that does not answer within
`timeout` seconds a 504, never a hang. Leaving a stream early aborts its request. An
error the daemon cannot tie to one request reaches no request's stream.
"""

from __future__ import annotations

import asyncio
import math
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import msgspec
import zmq
import zmq.asyncio

from kvd.ipc import Link, field_error
from kvd.messages import (
    Abort,
    Chunk,
    ClientMessage,
    Error,
    ErrorCode,
    Generate,
    RetryAfter,
    ServerMessage,
    Status,
    StatusReply,
)
from kvd.outputs import RequestOutput
from kvd.sampling import MAX_N, SamplingParams

DEFAULT_TIMEOUT_S = 600.0
CONNECT_TIMEOUT_S = 5.0
_CHECK = msgspec.msgpack.Decoder(ClientMessage)  # the daemon's own decoder: what it refuses, we refuse first


class KvdError(Exception):
    """Every failure a client sees: `.code` (400, 429, 500, 502, 503, 504) and `.message`;
    `.retry_after`: the seconds the daemon asks a refused client (429, 503) to wait before
    trying again (its RetryAfter message), None where it gave none (no daemon answered, or
    a daemon from before the hint)."""

    def __init__(self, code: int, message: str, retry_after: float | None = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.retry_after = retry_after


def _generate_msg(
    prompt: str | None,
    prompt_token_ids: list[int] | None,
    chat: list[dict[str, str]] | None,
    request_id: str | None,
    stream: bool,
    options: dict[str, Any],
) -> bytes:
    """The encoded Generate, checked as the daemon will check it; KvdError(400) naming the field."""
    try:
        params = SamplingParams.from_options(options)
        msg = Generate(request_id=uuid.uuid4().hex if request_id is None else request_id, prompt=prompt,
                       prompt_token_ids=prompt_token_ids, chat=chat, params=params, stream=stream)  # fmt: skip
        frame = _ENC.encode(msg)
        _CHECK.decode(frame)
    except msgspec.ValidationError as e:
        raise KvdError(ErrorCode.BAD_REQUEST, field_error(e, "request")) from None
    except (ValueError, TypeError, OverflowError) as e:
        raise KvdError(ErrorCode.BAD_REQUEST, _named(e)) from None
    return frame


def _named(e: Exception) -> str:
    """An error's text with a field first, as the daemon's are (an integer too large to send)."""
    text = str(e)
    return text if ":" in text.split(" ", 1)[0] else f"request: {text}"


_ENC = msgspec.msgpack.Encoder()


def _link(ctx: zmq.Context, endpoint: str) -> Link:
    """The DEALER to the daemon; KvdError(400) for an endpoint ZeroMQ cannot parse."""
    try:
        return Link(ctx, endpoint)
    except zmq.ZMQError as e:
        raise KvdError(ErrorCode.BAD_REQUEST, f"endpoint: {endpoint!r} is not a ZeroMQ endpoint "
                                              f"such as tcp://127.0.0.1:PORT ({e})") from None  # fmt: skip


def _unreachable(endpoint: str, seconds: float) -> KvdError:
    return KvdError(ErrorCode.UNAVAILABLE, f"no daemon accepting connections at {endpoint} within {seconds} s")


class _Collector:
    """Folds a request's chunks into a RequestOutput per choice (n of them for n > 1)."""

    def __init__(self, request_id: str, n: Any) -> None:
        n = n if type(n) is int and 1 <= n <= MAX_N else 1  # a bad n is refused before any chunk comes
        self.outs = [RequestOutput(request_id=request_id, prompt_token_ids=[], token_ids=[], text="",
                                   finish_reason=None, index=i) for i in range(n)]  # fmt: skip

    def add(self, chunk: Chunk) -> None:
        if not 0 <= chunk.index < len(self.outs):
            return
        out = self.outs[chunk.index]
        out.token_ids += chunk.token_ids
        out.text += chunk.text
        if chunk.prompt_logprobs is not None:
            out.prompt_logprobs = chunk.prompt_logprobs
        if chunk.finish_reason is not None:
            out.finish_reason = chunk.finish_reason
            out.num_cached_tokens = chunk.num_cached_tokens
            out.logprobs = chunk.logprobs

    def result(self) -> RequestOutput | list[RequestOutput]:
        return self.outs[0] if len(self.outs) == 1 else self.outs


def _num_choices(frame: bytes) -> tuple[str, int]:
    msg = _CHECK.decode(frame)
    return msg.request_id, msg.params.n


def _chunk(reply: ServerMessage, hint: RetryAfter | None = None) -> Chunk | None:
    """A stream's reply as a chunk to yield, None for Accepted; an Error raises KvdError,
    with the seconds of the RetryAfter that came just before it."""
    if isinstance(reply, Error):
        seconds = hint.seconds if hint is not None else None
        sane = seconds is not None and 0 <= seconds < math.inf  # a NaN or negative hint is no hint
        raise KvdError(int(reply.code), reply.message, seconds if sane else None)
    return reply if isinstance(reply, Chunk) else None


def _final(reply: ServerMessage) -> bool:
    """Whether this reply ends one choice of the request (an Error ends them all)."""
    return isinstance(reply, Chunk) and reply.finish_reason is not None


class AsyncClient:
    """Many concurrent requests over one DEALER socket; a reader task routes replies."""

    def __init__(self, endpoint: str, timeout: float = DEFAULT_TIMEOUT_S,
                 connect_timeout: float = CONNECT_TIMEOUT_S) -> None:  # fmt: skip
        self.endpoint = endpoint
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self._ctx = zmq.asyncio.Context()
        try:
            self._link = _link(self._ctx, endpoint)
        except KvdError:
            self._ctx.term()
            raise
        self._sock = self._link.sock
        self._connecting = asyncio.Lock()
        self._enc = msgspec.msgpack.Encoder()
        self._dec = msgspec.msgpack.Decoder(ServerMessage)
        self._queues: dict[str, asyncio.Queue] = {}
        self._status: asyncio.Queue[StatusReply] = asyncio.Queue()
        self._reader: asyncio.Task | None = None

    async def __aenter__(self) -> AsyncClient:
        self._reader = asyncio.create_task(self._read())
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
            self._reader = None
        self._link.close()
        self._ctx.term()

    async def _send(self, frame: bytes) -> None:
        """Send once a daemon is connected (503 if none within connect_timeout)."""
        deadline = time.monotonic() + self.connect_timeout
        # One task at a time watches the monitor: the first to read the handshake would leave
        # the others' polls waiting for an event that has been taken.
        async with self._connecting:
            while not self._link.up():
                left_ms = int((deadline - time.monotonic()) * 1000)
                if left_ms <= 0 or not await self._link.monitor.poll(left_ms, zmq.POLLIN):
                    raise _unreachable(self.endpoint, self.connect_timeout)
        await self._sock.send(frame)

    def _send_now(self, frame: bytes) -> None:
        """Send if a daemon is connected (an abort: a daemon that is gone has ended the request)."""
        if self._link.up():
            fut = self._sock.send(frame, flags=zmq.NOBLOCK)
            if fut.done():
                fut.exception()  # EAGAIN at the high-water mark: the abort is not worth a wait

    async def _read(self) -> None:
        while True:
            try:
                msg = self._dec.decode(await self._sock.recv())
            except (msgspec.DecodeError, msgspec.ValidationError):
                continue  # not a reply of this protocol: no request's business
            if isinstance(msg, StatusReply):
                self._status.put_nowait(msg)
                continue
            # An error with no request id belongs to no request: it reaches no stream.
            q = self._queues.get(msg.request_id) if msg.request_id is not None else None
            if q is not None:
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
        frame = _generate_msg(prompt, prompt_token_ids, chat, request_id, _stream, options)
        request_id, left = _num_choices(frame)
        if request_id in self._queues:  # the live one keeps its stream
            raise KvdError(ErrorCode.BAD_REQUEST, f"request_id: {request_id!r} is already in use on this client")
        q: asyncio.Queue = asyncio.Queue()
        self._queues[request_id] = q
        finished = sent = False
        try:
            await self._send(frame)
            sent = True
            deadline = time.monotonic() + self.timeout
            hint = None
            while not finished:
                reply = await self._next(q, deadline)
                if isinstance(reply, RetryAfter):
                    hint = reply  # the Error it is for comes next
                    continue
                left -= _final(reply)
                finished = isinstance(reply, Error) or not left
                if (chunk := _chunk(reply, hint)) is not None:
                    yield chunk
        finally:
            self._queues.pop(request_id, None)
            if sent and not finished and not self._sock.closed:
                self._send_now(self._enc.encode(Abort(request_id)))

    async def generate(self, prompt: str | None = None, **kwargs: Any) -> RequestOutput | list[RequestOutput]:
        """The whole result at once (sent as a non-streaming request); with n > 1, a list of
        the n choices' outputs."""
        request_id = kwargs["request_id"] if kwargs.get("request_id") is not None else uuid.uuid4().hex
        kwargs["request_id"] = request_id
        col = _Collector(request_id, kwargs.get("n", 1))
        async for chunk in self.stream(prompt, _stream=False, **kwargs):
            col.add(chunk)
        return col.result()

    async def abort(self, request_id: str) -> None:
        self._send_now(self._enc.encode(Abort(request_id)))

    async def status(self) -> dict[str, Any]:
        await self._send(self._enc.encode(Status()))
        reply = await self._next(self._status, time.monotonic() + self.timeout)
        return reply.status


class Client:
    """The blocking client: one request at a time over a DEALER socket."""

    def __init__(self, endpoint: str, timeout: float = DEFAULT_TIMEOUT_S,
                 connect_timeout: float = CONNECT_TIMEOUT_S) -> None:  # fmt: skip
        self.endpoint = endpoint
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self._ctx = zmq.Context()
        try:
            self._link = _link(self._ctx, endpoint)
        except KvdError:
            self._ctx.term()
            raise
        self._sock = self._link.sock
        self._enc = msgspec.msgpack.Encoder()
        self._dec = msgspec.msgpack.Decoder(ServerMessage)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._link.close()
        self._ctx.term()

    def _send(self, frame: bytes) -> None:
        """Send once a daemon is connected (503 if none within connect_timeout)."""
        deadline = time.monotonic() + self.connect_timeout
        while not self._link.up():
            left_ms = int((deadline - time.monotonic()) * 1000)
            if left_ms <= 0 or not self._link.monitor.poll(left_ms, zmq.POLLIN):
                raise _unreachable(self.endpoint, self.connect_timeout)
        self._sock.send(frame)

    def _recv(self, deadline: float) -> ServerMessage | None:
        """The next reply (None for a frame of another protocol); 504 past the deadline."""
        left_ms = int(max(0.0, deadline - time.monotonic()) * 1000)
        if not self._sock.poll(left_ms, zmq.POLLIN):
            raise KvdError(ErrorCode.DEADLINE, f"no reply from {self.endpoint} within {self.timeout} s")
        try:
            return self._dec.decode(self._sock.recv())
        except (msgspec.DecodeError, msgspec.ValidationError):
            return None

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
        frame = _generate_msg(prompt, prompt_token_ids, chat, request_id, _stream, options)
        request_id, left = _num_choices(frame)
        self._send(frame)
        deadline = time.monotonic() + self.timeout
        finished = False
        hint = None
        try:
            while not finished:
                reply = self._recv(deadline)
                if reply is None or isinstance(reply, StatusReply) or reply.request_id != request_id:
                    continue  # a reply to an earlier, abandoned request, or to no request
                if isinstance(reply, RetryAfter):
                    hint = reply  # the Error it is for comes next
                    continue
                left -= _final(reply)
                finished = isinstance(reply, Error) or not left
                if (chunk := _chunk(reply, hint)) is not None:
                    yield chunk
        finally:
            if not finished and self._link.up():  # a daemon that is gone has ended the request
                try:
                    self._sock.send(self._enc.encode(Abort(request_id)), flags=zmq.NOBLOCK)
                except zmq.ZMQError:
                    pass  # at the high-water mark: the abort is not worth a wait

    def generate(self, prompt: str | None = None, **kwargs: Any) -> RequestOutput | list[RequestOutput]:
        """The whole result at once; with n > 1, a list of the n choices' outputs."""
        request_id = kwargs["request_id"] if kwargs.get("request_id") is not None else uuid.uuid4().hex
        kwargs["request_id"] = request_id
        col = _Collector(request_id, kwargs.get("n", 1))
        for chunk in self.stream(prompt, _stream=False, **kwargs):
            col.add(chunk)
        return col.result()

    def abort(self, request_id: str) -> None:
        self._send(self._enc.encode(Abort(request_id)))

    def status(self) -> dict[str, Any]:
        self._send(self._enc.encode(Status()))
        deadline = time.monotonic() + self.timeout
        while True:
            reply = self._recv(deadline)
            if isinstance(reply, StatusReply):
                return reply.status
