"""Frontend: the client-facing ROUTER socket — validate, admit, stream back, abort.

Every frame is decoded against the client message union; anything malformed (random
bytes, wrong types, unknown tags or fields, oversize frames) gets one Error 400 reply
naming the field, and the daemon goes on. A Generate that passes validation is
Accepted and then receives Chunks until the one carrying `finish_reason`, or a single
Error: exactly one final message. A client that disconnects has its requests aborted
so their blocks return at once.

Disconnects: libzmq's ROUTER_NOTIFY is a draft API that release builds lack, so the
frontend watches the socket's monitor for EVENT_DISCONNECTED (which names the
connection's file descriptor) and maps descriptors to client identities from each
frame's SRCFD. Monitor events are drained before every data frame: a descriptor's
disconnect is queued before any frame of a new connection that reuses it, so a reused
descriptor is never blamed on the new client.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING

import msgspec
import structlog
import zmq
import zmq.asyncio
from zmq.utils.monitor import parse_monitor_message

from kvd.engine.engine import Delta
from kvd.logs import RequestClock
from kvd.messages import (
    Abort,
    Accepted,
    Chunk,
    ClientMessage,
    Error,
    ErrorCode,
    Generate,
    ServerMessage,
    Status,
    StatusReply,
)

if TYPE_CHECKING:
    from kvd.daemon.main import Daemon

log = structlog.get_logger("kvd.frontend")


def _field_error(e: msgspec.ValidationError) -> str:
    """msgspec says `... - at `$.params.max_tokens``: put the field first, as kvd's errors do."""
    text = str(e)
    if " - at `$." in text:
        msg, path = text.rsplit(" - at `$.", 1)
        path = path.rstrip("`")
        if msg.startswith(path.rsplit(".", 1)[-1] + ":"):
            return msg  # our own validation already names the field
        return f"{path}: {msg}"
    return f"frame: {text}"


class _Live:
    __slots__ = ("identity", "stream", "clock", "first_token", "scheduled")

    def __init__(self, identity: bytes, stream: bool) -> None:
        self.identity = identity
        self.stream = stream
        self.clock = RequestClock()  # duration_ms / since_arrival_ms of each logged step
        self.first_token: float | None = None
        self.scheduled = False


class Frontend:
    def __init__(self, daemon: Daemon, sock: zmq.asyncio.Socket, max_frame_bytes: int) -> None:
        self.daemon = daemon
        self.sock = sock
        self.max_frame_bytes = max_frame_bytes
        self._dec = msgspec.msgpack.Decoder(ClientMessage)
        self._enc = msgspec.msgpack.Encoder()
        self.live: dict[str, _Live] = {}
        self.idle = asyncio.Event()  # set while no request is live (the drain awaits it)
        self.idle.set()
        self.num_malformed = 0
        self._monitor = sock.get_monitor_socket(zmq.EVENT_DISCONNECTED)
        # Blocking twins of both sockets for non-blocking reads once the poller says ready.
        self._sync = zmq.Socket.shadow(sock.underlying)
        self._sync_monitor = zmq.Socket.shadow(self._monitor.underlying)
        self._fd_clients: dict[int, set[bytes]] = {}

    async def send(self, identity: bytes, msg: ServerMessage) -> None:
        try:
            await self.sock.send_multipart([identity, self._enc.encode(msg)], copy=False)
        except zmq.ZMQError as e:  # the peer is gone; its requests are aborted on disconnect
            log.warning("reply_dropped", error=str(e))

    async def run(self) -> None:
        poller = zmq.asyncio.Poller()
        poller.register(self.sock, zmq.POLLIN)
        poller.register(self._monitor, zmq.POLLIN)
        try:
            while True:
                await poller.poll()
                self._drain_monitor()
                while True:
                    try:
                        frames = self._sync.recv_multipart(zmq.NOBLOCK, copy=False)
                    except zmq.Again:
                        break
                    self._drain_monitor()
                    identity = frames[0].bytes
                    self._fd_clients.setdefault(frames[-1].get(zmq.SRCFD), set()).add(identity)
                    await self.handle(identity, frames[-1].buffer)
        finally:
            self.sock.disable_monitor()
            self._monitor.close(linger=0)

    def _drain_monitor(self) -> None:
        while True:
            try:
                event = parse_monitor_message(self._sync_monitor.recv_multipart(zmq.NOBLOCK))
            except zmq.Again:
                return
            if event["event"] == zmq.EVENT_DISCONNECTED:
                for identity in self._fd_clients.pop(event["value"], ()):
                    self.on_disconnect(identity)

    async def handle(self, identity: bytes, payload: memoryview) -> None:
        if len(payload) > self.max_frame_bytes:
            self.num_malformed += 1
            log.warning("frame_rejected", bytes=len(payload), reason="too large")
            await self.send(identity, Error(None, ErrorCode.BAD_REQUEST,
                                            f"frame: {len(payload)} bytes exceeds max_frame_bytes "
                                            f"{self.max_frame_bytes}"))  # fmt: skip
            return
        try:
            msg = self._dec.decode(payload)
        except (msgspec.ValidationError, msgspec.DecodeError, ValueError) as e:
            self.num_malformed += 1
            text = _field_error(e) if isinstance(e, msgspec.ValidationError) else f"frame: {e}"
            log.warning("frame_rejected", reason=text)
            await self.send(identity, Error(None, ErrorCode.BAD_REQUEST, text))
            return
        if isinstance(msg, Generate):
            await self.on_generate(identity, msg)
        elif isinstance(msg, Abort):
            self.daemon.abort(msg.request_id, identity)
        elif isinstance(msg, Status):
            await self.send(identity, StatusReply(self.daemon.status()))

    async def on_generate(self, identity: bytes, msg: Generate) -> None:
        rid = msg.request_id
        with structlog.contextvars.bound_contextvars(request_id=rid):
            refusal = self.daemon.refusal()
            if refusal is None and rid in self.live:
                refusal = (ErrorCode.BAD_REQUEST, f"request_id: {rid!r} is already in use")
            if refusal is None:
                try:
                    self.daemon.admit(msg)
                except ValueError as e:
                    refusal = (ErrorCode.BAD_REQUEST, str(e))
            if refusal is not None:
                code, text = refusal
                log.warning("request_rejected", code=int(code), error=text)
                await self.send(identity, Error(rid, code, text))
                return
            self.live[rid] = _Live(identity, msg.stream)
            self.idle.clear()
            log.info("request_queued", stream=msg.stream)
            await self.send(identity, Accepted(rid))

    def on_disconnect(self, identity: bytes) -> None:
        gone = [rid for rid, lv in self.live.items() if lv.identity == identity]
        if gone:
            log.info("client_disconnected", request_ids=gone)
            for rid in gone:
                self.daemon.abort(rid, identity)

    def on_scheduled(self, rid: str, num_cached_tokens: int) -> None:
        lv = self.live.get(rid)
        if lv is not None and not lv.scheduled:
            lv.scheduled = True
            log.info("request_scheduled", request_id=rid, num_cached_tokens=num_cached_tokens, **lv.clock.step())

    async def deliver(self, delta: Delta) -> None:
        """Stream one step's tokens; the final delta ends the request."""
        lv = self.live.get(delta.request_id)
        if lv is None:
            return  # already ended (aborted or failed): late output is dropped
        now = time.monotonic()
        if lv.first_token is None and delta.token_ids:
            lv.first_token = now
            log.info("first_token", request_id=delta.request_id, **lv.clock.step(now))
            self.daemon.metrics_observe_ttft(now - lv.clock.arrival)
        out = delta.output
        if out is None:
            if lv.stream:
                await self.send(lv.identity, Chunk(request_id=delta.request_id, token_ids=delta.token_ids,
                                                   text=delta.text))  # fmt: skip
            return
        self._end(delta.request_id)
        e2e = now - lv.clock.arrival
        event = "request_aborted" if out.finish_reason == "abort" else "request_finished"
        log.info(event, request_id=delta.request_id, finish_reason=out.finish_reason,
                 num_tokens=len(out.token_ids), **lv.clock.step(now))  # fmt: skip
        self.daemon.metrics_observe_finish(out.finish_reason, e2e)
        chunk = Chunk(
            request_id=delta.request_id,
            token_ids=delta.token_ids if lv.stream else out.token_ids,
            text=delta.text if lv.stream else out.text,
            finish_reason=out.finish_reason,
            logprobs=out.logprobs if not lv.stream else None,
            num_prompt_tokens=len(out.prompt_token_ids),
            num_cached_tokens=out.num_cached_tokens,
        )
        await self.send(lv.identity, chunk)

    async def fail(self, rid: str, code: ErrorCode, message: str) -> None:
        """End a live request with one Error (worker death, deadline, shutdown)."""
        lv = self.live.get(rid)
        if lv is None:
            return
        self._end(rid)
        log.error("request_failed", request_id=rid, code=int(code), error=message,
                  **lv.clock.step())  # fmt: skip
        self.daemon.metrics_observe_finish("error", time.monotonic() - lv.clock.arrival)
        await self.send(lv.identity, Error(rid, code, message))

    def _end(self, rid: str) -> None:
        del self.live[rid]
        if not self.live:
            self.idle.set()

    def owner(self, rid: str) -> bytes | None:
        lv = self.live.get(rid)
        return lv.identity if lv else None

    def expired(self, timeout_s: float) -> list[str]:
        now = time.monotonic()
        return [rid for rid, lv in self.live.items() if now - lv.clock.arrival > timeout_s]
