"""The router's ZeroMQ client API: an instance's client socket, in front of several instances.

A client (kvd.client) talks to the router's ROUTER socket as to one instance's: the same
messages (kvd.messages), the same answers. Per Generate: its prompt's token ids as the
instance computes them (`PromptHasher.generate_ids`), matched against the KV index, the
policy's order, and the frame goes unchanged to the first instance that is up, over the
router's one DEALER to it (`kvd.ipc.Link`); the instance's replies come back unchanged.
Request ids are unique across the router's live requests, as across an instance's: a
second live one is refused with the instance's own 400, so a forwarded id is unique on
every instance too, and an abort needs no translation. `Status` is answered by the router
itself (`Router.status`).

Failure, as over HTTP: an instance that is not connected is skipped; one that refuses a
request before accepting it (503: draining, restarting; 429: its queue is full) or whose
connection breaks before it accepted has the request sent to the next in the order, and
with none left the client gets that refusal (or 503, no instance up). A request the
instance accepted fails with 502 when its connection breaks, and with 504 past
`route.request_timeout_s` (the instance is told to abort it); never a hang. A client that
disconnects has its requests aborted on their instances (kvd.daemon.frontend's disconnect
watch). Replies for a request that is no longer live there (a late answer after a
failover) are dropped, and the instance is told to abort it.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING, Any, Protocol

import msgspec
import structlog
import zmq
import zmq.asyncio

from kvd.daemon.backoff import RETRYABLE
from kvd.daemon.frontend import ClientInbox, Malformed, readable_request_id
from kvd.ipc import Link, bind_tcp
from kvd.messages import (
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

if TYPE_CHECKING:
    from kvd.config import KvdConfig
    from kvd.route.backend import Backend
    from kvd.route.policy import Policy
    from kvd.route.prompt import PromptHasher


class Routing(Protocol):
    """What the ZeroMQ API uses of the router (kvd.route.router.Router, which owns it): the
    instances, the ordering of a request's prompt, the accounting both APIs share."""

    cfg: KvdConfig
    backends: dict[str, Backend]
    policy: Policy
    hasher: PromptHasher
    draining: bool

    def matched(self, ids: list[int]) -> dict[str, tuple[int, int]]: ...
    def live_order(self, matched: dict[str, tuple[int, int]] | None) -> list[Backend]: ...
    def started(self, b: Backend) -> None: ...
    def ended(self, b: Backend) -> None: ...
    def counted(self, b: Backend, matched: dict[str, tuple[int, int]] | None) -> None: ...
    def lost(self, b: Backend, why: str) -> None: ...
    def status(self) -> dict[str, Any]: ...

log = structlog.get_logger("kvd.route")

FINAL_LINGER_MS = 500  # at close: the last Errors and Aborts get this long to leave


class _Forward:
    """One live request: where it came from, where it is, and what is left of it."""

    __slots__ = ("identity", "request_id", "frame", "order", "matched", "backend", "accepted", "left", "hint",
                 "timer")  # fmt: skip

    def __init__(self, identity: bytes, msg: Generate, frame: bytes, order: list[Backend],
                 matched: dict[str, tuple[int, int]] | None) -> None:  # fmt: skip
        self.identity = identity
        self.request_id = msg.request_id
        self.frame = frame
        self.order = order  # the instances still to try, best first
        self.matched = matched  # per instance: (prompt blocks it holds, full prompt blocks)
        self.backend: Backend | None = None
        self.accepted = False
        self.left = msg.params.n  # choices not yet finished
        self.hint: bytes | None = None  # an instance's RetryAfter, passed on only with its Error
        self.timer: asyncio.TimerHandle | None = None


class ZmqFront:
    """The ROUTER socket clients use and a Link to each instance with a client endpoint."""

    def __init__(self, router: Routing, ctx: zmq.asyncio.Context) -> None:
        self.router = router
        self.ctx = ctx
        self.max_frame_bytes = router.cfg.daemon.max_frame_bytes
        self.timeout_s = router.cfg.route.request_timeout_s
        self.sock = ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.MAXMSGSIZE, 8 * self.max_frame_bytes)
        # One from a run dir with no files yet has a link that connects once they say where (`repoint`).
        self.links = {b.name: Link(ctx, b.endpoint or None) for b in router.backends.values()
                      if b.endpoint or b.reads_run_dir}  # fmt: skip
        self._drops = dict.fromkeys(self.links, 0)  # each link's connections lost, as handled
        self.inbox = ClientInbox(self.sock, self.max_frame_bytes, self._client_left)
        self._live: dict[str, _Forward] = {}
        self._server_dec = msgspec.msgpack.Decoder(ServerMessage)
        self._enc = msgspec.msgpack.Encoder()
        self.endpoint: str | None = None
        self.num_malformed = 0

    def bind(self) -> str:
        d = self.router.cfg.daemon
        self.endpoint = bind_tcp(self.sock, d.host, d.port)
        return self.endpoint

    async def connected(self, timeout_s: float) -> list[str]:
        """Wait up to `timeout_s` for the connection of every instance up (a request right after
        the router's start would find none; one not started yet is not waited for); returns the
        names still not connected."""
        deadline = time.monotonic() + timeout_s
        backends = self.router.backends
        while (waiting := [n for n in self.links if backends[n].up and not self._connected(backends[n])]) and \
                time.monotonic() < deadline:  # fmt: skip
            await asyncio.sleep(0.01)
        return waiting

    async def run(self) -> None:
        """Serve clients and relay every instance's replies, until cancelled."""
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self._serve())
            for name in self.links:
                tg.create_task(self._relay(name))

    def repoint(self, b: Backend) -> None:
        """`b` restarted at another client endpoint: the link connects there (what was on the
        old connection already failed or moved when it dropped)."""
        if b.name in self.links and b.endpoint:
            self.links[b.name].repoint(b.endpoint)

    def close(self) -> None:
        """Requests still live (past the drain) end with 503 and are aborted on their
        instances; the clients' socket lingers a moment so those errors leave."""
        for f in list(self._live.values()):
            if f.backend is not None:
                self._to(f.backend, Abort(f.request_id))
            self._error(f.identity, f.request_id, ErrorCode.UNAVAILABLE, "route: shutting down")
            self._end(f)
        for link in self.links.values():
            link.close(linger=FINAL_LINGER_MS)
        self.inbox.close()
        self.sock.close(linger=FINAL_LINGER_MS)

    def status(self) -> dict[str, Any]:
        return {"live_requests": len(self._live), "malformed_frames": self.num_malformed,
                "instances_connected": [n for n in self.links if self._connected(self.router.backends[n])]}  # fmt: skip

    # ---- clients -----------------------------------------------------------------------
    async def _serve(self) -> None:
        async for identity, msg, frame in self.inbox.messages():
            self._handle(identity, msg, frame)

    def _send(self, identity: bytes, payload: bytes) -> None:
        # Through the asyncio socket, never its blocking shadow: a send lets libzmq take in what
        # arrived meanwhile, and only the asyncio socket then wakes the poller for it (ZMQ_FD is
        # edge-triggered: a shadow send left a client's frame unread until the next one came).
        # A ROUTER never blocks: the future is done at once, and a gone peer's reply dropped.
        fut = self.sock.send_multipart([identity, payload], copy=False)
        if fut.done() and fut.exception() is not None:
            log.warning("reply_dropped", error=str(fut.exception()))

    def _error(self, identity: bytes, request_id: str | None, code: ErrorCode, message: str) -> None:
        self._send(identity, self._enc.encode(Error(request_id, code, message)))

    def _reject(self, identity: bytes, payload: memoryview | bytes, reason: str) -> None:
        """A frame that is no valid message: one Error 400, as an instance answers it."""
        self.num_malformed += 1
        request_id = readable_request_id(payload)
        log.warning("frame_rejected", request_id=request_id, bytes=len(payload), reason=reason)
        self._error(identity, None if request_id in self._live else request_id, ErrorCode.BAD_REQUEST, reason)

    def _handle(self, identity: bytes, msg: ClientMessage | Malformed, frame: memoryview) -> None:
        if isinstance(msg, Malformed):
            self._reject(identity, msg.payload, msg.reason)
        elif isinstance(msg, Generate):
            self._generate(identity, msg, bytes(frame))
        elif isinstance(msg, Abort):
            f = self._live.get(msg.request_id)
            if f is not None and f.identity == identity and f.backend is not None:
                self._to(f.backend, Abort(f.request_id))
        elif isinstance(msg, Status):
            self._send(identity, self._enc.encode(StatusReply(self.router.status())))

    def _generate(self, identity: bytes, msg: Generate, frame: bytes) -> None:
        if self.router.draining:
            self._error(identity, msg.request_id, ErrorCode.UNAVAILABLE, "route: shutting down")
            return
        if msg.request_id in self._live:
            self._error(identity, msg.request_id, ErrorCode.BAD_REQUEST,
                        f"request_id: {msg.request_id!r} is already in use")  # fmt: skip
            return
        matched = None
        if self.router.policy.uses_prefix:
            ids = self.router.hasher.generate_ids(msg)
            matched = self.router.matched(ids) if ids is not None else None
        f = _Forward(identity, msg, frame, self.router.live_order(matched), matched)
        self._live[msg.request_id] = f
        f.timer = asyncio.get_running_loop().call_later(self.timeout_s, self._timed_out, f)
        self._dispatch(f)

    def _dispatch(self, f: _Forward, refusal: tuple[bytes | None, bytes] | None = None) -> None:
        """Send `f` to the next instance of its order (those up, from `Router.live_order`) that
        is reachable; with none left, end it with the last refusal (or 503)."""
        while f.order:
            b = f.order.pop(0)
            if not self._reachable(b):
                continue
            f.backend = b
            self.router.started(b)
            self._to_raw(b, f.frame)
            return
        if refusal is not None:
            hint, error = refusal
            if hint is not None:
                self._send(f.identity, hint)
            self._send(f.identity, error)
            self._end(f)
            return
        self._error(f.identity, f.request_id, ErrorCode.UNAVAILABLE, "route: no instance is up")
        self._end(f)

    def _end(self, f: _Forward) -> None:
        if self._live.get(f.request_id) is f:
            del self._live[f.request_id]
        if f.timer is not None:
            f.timer.cancel()
        if f.backend is not None:
            self.router.ended(f.backend)
            f.backend = None

    def _client_left(self, identity: bytes) -> None:
        gone = [f for f in self._live.values() if f.identity == identity]
        if gone:
            log.info("client_disconnected", request_ids=sorted(f.request_id for f in gone))
        for f in gone:
            if f.backend is not None:
                self._to(f.backend, Abort(f.request_id))
            self._end(f)

    def _timed_out(self, f: _Forward) -> None:
        f.timer = None
        name = f.backend.name if f.backend is not None else None
        log.warning("instance_failed", instance=name, status=504, request_id=f.request_id,
                    error=f"no answer within {self.timeout_s} s")  # fmt: skip
        if f.backend is not None:
            f.backend.errors += 1
            self._to(f.backend, Abort(f.request_id))
        self._error(f.identity, f.request_id, ErrorCode.DEADLINE,
                    f"route: instance {name!r} gave no answer within {self.timeout_s} s")  # fmt: skip
        self._end(f)

    # ---- instances ---------------------------------------------------------------------
    def _reachable(self, b: Backend) -> bool:
        """Whether a request can go to `b` over ZeroMQ now: it has a client endpoint (a link;
        one given by a bare URL has none) and the link is connected. Whether `b` is up at all
        is the router's (`Backend.up`, in `live_order`), as over HTTP."""
        return b.name in self.links and self._connected(b)

    def _connected(self, b: Backend) -> bool:
        """Whether `b`'s link is up; a connection lost since the last look fails (or moves)
        what was on it, however soon it was made again."""
        link = self.links[b.name]
        up = link.up()
        if link.drops != self._drops[b.name]:
            self._drops[b.name] = link.drops
            self._lost(b, "connection lost")
        return up

    def _to(self, b: Backend, msg: Abort) -> None:
        self._to_raw(b, self._enc.encode(msg))

    def _to_raw(self, b: Backend, frame: bytes) -> None:
        fut = self.links[b.name].sock.send(frame, zmq.NOBLOCK)  # the asyncio socket, as in `_send`
        if fut.done() and fut.exception() is not None:  # its high-water mark: as a broken connection
            self._lost(b, f"its queue in the router is full ({fut.exception()})")

    async def _relay(self, name: str) -> None:
        """Pass `name`'s replies back; a disconnect fails (or moves) its requests."""
        link = self.links[name]
        b = self.router.backends[name]
        poller = zmq.asyncio.Poller()
        poller.register(link.sock, zmq.POLLIN)
        poller.register(link.monitor, zmq.POLLIN)
        sync = zmq.Socket.shadow(link.sock.underlying)
        while True:
            await poller.poll()
            while True:
                try:
                    frame = sync.recv(zmq.NOBLOCK, copy=False)
                except zmq.Again:
                    break
                self._reply(b, frame.buffer)
            self._connected(b)

    def _reply(self, b: Backend, payload: memoryview) -> None:
        try:
            msg = self._server_dec.decode(payload)
        except (msgspec.ValidationError, msgspec.DecodeError) as e:
            log.warning("frame_rejected", channel="instance", instance=b.name, error=str(e))
            return
        if isinstance(msg, StatusReply) or msg.request_id is None:
            return  # no request's: the router asks no instance for its status
        f = self._live.get(msg.request_id)
        if f is None or f.backend is not b:
            if not isinstance(msg, Error) and not (isinstance(msg, Chunk) and msg.finish_reason):
                self._to(b, Abort(msg.request_id))  # a request the router gave up on there
            return
        if isinstance(msg, RetryAfter):
            f.hint = bytes(payload)
            return
        if isinstance(msg, Accepted):
            f.accepted = True
            self.router.counted(b, f.matched)
        elif isinstance(msg, Error):
            if not f.accepted and msg.code in RETRYABLE:  # refused before it started: the next one
                log.info("instance_refused", instance=b.name, request_id=f.request_id, code=int(msg.code))
                b.failovers += 1
                if msg.code == ErrorCode.UNAVAILABLE:  # draining or restarting: no more until /health is 200
                    self.router.lost(b, "answered 503")
                self.router.ended(b)
                f.backend = None
                self._dispatch(f, refusal=(f.hint, bytes(payload)))
                return
            self._send(f.identity, bytes(payload))
            self._end(f)
            return
        elif isinstance(msg, Chunk) and msg.finish_reason is not None:
            f.left -= 1
        self._send(f.identity, bytes(payload))
        if f.left <= 0:
            self._end(f)

    def _lost(self, b: Backend, why: str) -> None:
        """`b`'s connection broke: requests it had not accepted go to the next instance,
        the others fail with 502."""
        on_it = [f for f in self._live.values() if f.backend is b]
        if on_it:
            log.warning("instance_lost", instance=b.name, reason=why, request_ids=sorted(f.request_id for f in on_it))
        self.router.lost(b, why)
        for f in on_it:
            self.router.ended(b)
            f.backend = None
            if not f.accepted:
                self._dispatch(f)
                continue
            b.errors += 1
            self._error(f.identity, f.request_id, ErrorCode(502), f"route: instance {b.name!r} failed: {why}")
            self._end(f)

