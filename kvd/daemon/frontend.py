"""Frontend: the client-facing ROUTER socket — decode, submit, stream back, abort.

Every frame is decoded against the client message union; anything malformed (random
bytes, wrong types, unknown tags or fields, oversize frames) gets one Error 400 reply
naming the field, and the daemon goes on. A Generate goes to `Serving.submit`; once it is
queued the client gets Accepted and then Chunks until the one carrying `finish_reason`,
or a single Error (a 429 or 503 one preceded by a RetryAfter hint): exactly one final
message. Each request's `Outbox` is its `_Route`, on its record: the client identity it
came from and whether it streams; the frontend keeps no table of requests and knows nothing
of the engine. A client that disconnects has its requests aborted so their blocks return
at once.

Disconnects: libzmq's ROUTER_NOTIFY is a draft API that release builds lack, so the
frontend watches the socket's monitor for EVENT_DISCONNECTED (which names the
connection's file descriptor) and maps descriptors to client identities from each
frame's SRCFD. Monitor events are drained before every data frame: a descriptor's
disconnect is queued before any frame of a new connection that reuses it, so a reused
descriptor is never blamed on the new client.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any, NamedTuple

import msgspec
import structlog
import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message

from kvd.daemon import health
from kvd.daemon.backoff import RETRYABLE
from kvd.daemon.owner import Rejected
from kvd.daemon.serving import Serving
from kvd.engine.text import Delta
from kvd.ipc import field_error
from kvd.messages import (
    MAX_REQUEST_ID,
    Abort,
    Accepted,
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

log = structlog.get_logger("kvd.frontend")


class _Loose(msgspec.Struct):
    """Any map with a string request_id: what can be read of a frame that failed to decode."""

    request_id: str | None = None


_LOOSE = msgspec.msgpack.Decoder(_Loose)


def readable_request_id(payload: memoryview | bytes) -> str | None:
    try:
        request_id = _LOOSE.decode(payload).request_id
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None
    return request_id if request_id and len(request_id) <= MAX_REQUEST_ID else None


class DisconnectWatch:
    """Which clients of a ROUTER socket have left (see the module docstring): `seen(frames)`
    for every message received, `gone()` before each (and whenever the monitor polls in)."""

    def __init__(self, sock: zmq.Socket) -> None:
        self._sock = sock
        self.monitor = sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        self._sync = zmq.Socket.shadow(self.monitor.underlying)  # non-blocking reads once polled
        self._fd_clients: dict[int, set[bytes]] = {}

    def seen(self, frames: list[zmq.Frame]) -> bytes:
        """The identity of a message's sender, noted with its connection's descriptor."""
        identity = frames[0].bytes
        self._fd_clients.setdefault(frames[-1].get(zmq.SRCFD), set()).add(identity)
        return identity

    def gone(self) -> list[bytes]:
        """The clients whose connections closed since the last call."""
        out: list[bytes] = []
        while True:
            try:
                event = parse_monitor_message(self._sync.recv_multipart(zmq.NOBLOCK))
            except zmq.Again:
                return out
            if event["event"] == zmq.EVENT_DISCONNECTED:
                out.extend(self._fd_clients.pop(event["value"], ()))

    def close(self) -> None:
        self._sock.disable_monitor()
        self.monitor.close(linger=0)


class Malformed(NamedTuple):
    """A frame that is no valid client message: what can be read of it, and why."""

    payload: memoryview | bytes
    reason: str


class ClientInbox:
    """What arrives on a client-facing ROUTER socket, an instance's (`Frontend`) or the
    router's (kvd.route.zmq_api): each message decoded, or `Malformed` (extra parts, over
    `max_frame_bytes`, not a client message: the reason names the field), with its sender.
    Disconnects are watched (`DisconnectWatch`) and `on_gone(identity)` is called for each
    client that left, before any frame that follows."""

    def __init__(self, sock: zmq.asyncio.Socket, max_frame_bytes: int, on_gone: Callable[[bytes], None]) -> None:
        self.sock = sock
        self.max_frame_bytes = max_frame_bytes
        self.watch = DisconnectWatch(sock)
        self._on_gone = on_gone
        self._sync = zmq.Socket.shadow(sock.underlying)  # non-blocking reads once the poller says ready
        self._dec = msgspec.msgpack.Decoder(ClientMessage)

    async def messages(self) -> AsyncIterator[tuple[bytes, ClientMessage | Malformed, memoryview]]:
        """(sender, message, its frame) as they come, until cancelled (the router forwards the
        frame as it came)."""
        poller = zmq.asyncio.Poller()
        poller.register(self.sock, zmq.POLLIN)
        poller.register(self.watch.monitor, zmq.POLLIN)
        while True:
            await poller.poll()
            self._gone()
            while True:
                try:
                    frames = self._sync.recv_multipart(zmq.NOBLOCK, copy=False)
                except zmq.Again:
                    break
                self._gone()
                yield self.watch.seen(frames), self._decode(frames), frames[-1].buffer

    def _gone(self) -> None:
        for identity in self.watch.gone():
            self._on_gone(identity)

    def _decode(self, frames: list[zmq.Frame]) -> ClientMessage | Malformed:
        if len(frames) != 2:  # a message is one part: extra parts make it ambiguous
            return Malformed(frames[1].buffer if len(frames) > 1 else b"",
                             f"frame: a message is one part, got {len(frames) - 1}")  # fmt: skip
        payload = frames[1].buffer
        if len(payload) > self.max_frame_bytes:
            return Malformed(b"", f"frame: {len(payload)} bytes exceeds max_frame_bytes {self.max_frame_bytes}")
        try:
            return self._dec.decode(payload)
        except (msgspec.ValidationError, msgspec.DecodeError, ValueError) as e:
            return Malformed(payload, field_error(e) if isinstance(e, msgspec.ValidationError) else f"frame: {e}")

    def close(self) -> None:
        self.watch.close()


class _Route:
    """One request's way back: the client identity it came from, its id there and whether it
    streams. It is the `Outbox` of the request's records (its n choices share it), kept on
    them: the frontend keeps no table of requests."""

    __slots__ = ("frontend", "identity", "request_id", "stream", "failed", "aborted")

    def __init__(self, frontend: Frontend, identity: bytes, request_id: str, stream: bool) -> None:
        self.frontend = frontend
        self.identity = identity
        self.request_id = request_id
        self.stream = stream
        self.failed = False
        self.aborted = False  # the client aborted (or left) while the request's grammar compiled

    async def deliver(self, delta: Delta) -> None:
        await self.frontend.deliver(self, delta)

    async def fail(self, request_id: str, code: ErrorCode, message: str) -> None:
        if not self.failed:  # its choices fail together: the client hears it once
            self.failed = True
            await self.frontend._send_error(self.identity, self.request_id, code, message)


class Frontend:
    """The ZeroMQ client socket; each request that came through it has a `_Route` back."""

    def __init__(self, sock: zmq.asyncio.Socket, serving: Serving, status: Callable[[], dict[str, Any]],
                 max_frame_bytes: int) -> None:  # fmt: skip
        self.sock = sock
        self.serving = serving
        self.status = status
        self._enc = msgspec.msgpack.Encoder()
        self.num_malformed = 0
        self._admitting: set[_Route] = set()  # requests whose grammar compiles: no record yet to abort
        self.inbox = ClientInbox(sock, max_frame_bytes, self.on_disconnect)

    async def send(self, identity: bytes, msg: ServerMessage) -> None:
        try:
            await self.sock.send_multipart([identity, self._enc.encode(msg)], copy=False)
        except zmq.ZMQError as e:  # the peer is gone; its requests are aborted on disconnect
            log.warning("reply_dropped", error=str(e))

    async def run(self) -> None:
        try:
            async for identity, msg, _ in self.inbox.messages():
                await self.handle(identity, msg)
        finally:
            self.inbox.close()

    async def handle(self, identity: bytes, msg: ClientMessage | Malformed) -> None:
        if isinstance(msg, Malformed):
            await self.reject(identity, msg.payload, msg.reason)
        elif isinstance(msg, Generate):
            await self.on_generate(identity, msg)
        elif isinstance(msg, Abort):
            self.on_abort(msg.request_id, identity)
        elif isinstance(msg, Status):
            await self.send(identity, StatusReply(self.status()))

    async def reject(self, identity: bytes, payload: memoryview | bytes, reason: str) -> None:
        """One Error for a frame that is no valid message, tied to its request when its
        request_id can be read, so the client's other requests never hear of it."""
        self.num_malformed += 1
        request_id = readable_request_id(payload)
        log.warning("frame_rejected", request_id=request_id, bytes=len(payload), reason=reason)
        if self._route(request_id) is not None:  # a live request's id: the error must not end that stream
            request_id = None
        await self.send(identity, Error(request_id, ErrorCode.BAD_REQUEST, reason))

    async def on_generate(self, identity: bytes, msg: Generate) -> None:
        route = _Route(self, identity, msg.request_id, msg.stream)
        if msg.params.structured_outputs is not None:  # its grammar compiles while the socket reads on
            self._admitting.add(route)
            self.serving.spawn(self._admit(route, msg))
        else:
            await self._admit(route, msg)

    async def _admit(self, route: _Route, msg: Generate) -> None:
        try:
            await self.serving.admit(msg, route)
        except Rejected as e:
            await self._send_error(route.identity, msg.request_id, e.code, e.message)
            return
        finally:
            self._admitting.discard(route)
        await self.send(route.identity, Accepted(msg.request_id))
        if route.aborted:  # while it compiled: it ends now, as an abort of a queued request does
            self.serving.abort(msg.request_id, route)

    def _route(self, request_id: str | None) -> _Route | None:
        """The route of a live request that came through this socket."""
        live = self.serving.live(request_id) if request_id is not None else []
        outbox = live[0].owner.outbox if live else None
        return outbox if isinstance(outbox, _Route) and outbox.frontend is self else None

    def on_abort(self, request_id: str, identity: bytes) -> None:
        route = self._route(request_id)
        admitting = [r for r in self._admitting if r.request_id == request_id and r.identity == identity]
        if route is None and admitting:
            admitting[0].aborted = True
            log.info("abort_deferred", request_id=request_id, reason="its grammar is compiling")
            return
        if route is None or route.identity != identity:
            log.info("abort_ignored", request_id=request_id, reason="not a live request of this client")
            return
        self.serving.abort(request_id)

    def on_disconnect(self, identity: bytes) -> None:
        gone = {r.owner.outbox.request_id for r in self.serving.records() if r.owner is not None
                and not r.owner.ended and isinstance(r.owner.outbox, _Route) and r.owner.outbox.frontend is self
                and r.owner.outbox.identity == identity}  # fmt: skip
        for route in self._admitting:
            route.aborted = route.aborted or route.identity == identity
        if gone:
            log.info("client_disconnected", request_ids=sorted(gone))
            for request_id in gone:
                self.serving.abort(request_id)

    async def deliver(self, route: _Route, delta: Delta) -> None:
        """Stream one step's tokens (of choice `delta.index`); a choice's final delta ends it."""
        out = delta.output
        if out is None:
            if route.stream:
                await self.send(route.identity, Chunk(request_id=route.request_id, token_ids=delta.token_ids,
                                                      text=delta.text, logprobs=delta.logprobs, index=delta.index,
                                                      prompt_logprobs=delta.prompt_logprobs))  # fmt: skip
            return
        chunk = Chunk(
            request_id=route.request_id,
            token_ids=delta.token_ids if route.stream else out.token_ids,
            text=delta.text if route.stream else out.text,
            finish_reason=out.finish_reason,
            logprobs=delta.logprobs if route.stream else out.logprobs,
            num_prompt_tokens=len(out.prompt_token_ids),
            num_cached_tokens=out.num_cached_tokens,
            index=delta.index,
            prompt_logprobs=delta.prompt_logprobs if route.stream else out.prompt_logprobs,
        )
        await self.send(route.identity, chunk)

    async def _send_error(self, identity: bytes, request_id: str, code: ErrorCode, message: str) -> None:
        """A request's Error (a refusal, or its failure: worker death, deadline, shutdown, a
        failed handoff); a 429 or 503 first says when to try again."""
        if code in RETRYABLE:
            await self.send(identity, RetryAfter(request_id, float(health.retry_after(self.serving))))
        await self.send(identity, Error(request_id, code, message))
