"""The link between PD instances: a prefill instance's ROUTER, a decode instance's DEALERs.

A prefill instance binds one ROUTER (`pd.host`, `pd.port`, 0 = a random free port) and
publishes it in `<run_dir>/pd_endpoint`. A decode instance connects one DEALER per
prefill endpoint in `pd.prefill_endpoints` (an endpoint, or a run directory holding a
`pd_endpoint` file) and pings each every heartbeat interval; a prefill instance that has
not answered for `pd.heartbeat_timeout_s` is dead until it answers again. Sends never
block: DEALERs are IMMEDIATE (nothing queues for a peer that is not connected) and a
send that cannot go out at once reports False, so the caller fails over instead of
leaving a request behind a dead peer.

With `pd.secret` set (`kvd launch` makes one per deployment), the link is ZeroMQ CURVE:
both sides derive one key pair for prefill instances and one for decode instances from
the secret, the prefill ROUTER encrypts and admits only the decode key (a ZAP handler),
so a peer without the secret can neither read the link nor put a frame on it, on one
host or across machines. A frame that does not decode is logged and dropped.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import NamedTuple

import msgspec
import structlog
import zmq
import zmq.asyncio
from zmq.auth.asyncio import AsyncioAuthenticator

from kvd.ipc import OnlyKey, bind_tcp, curve_pair, publish_endpoint
from kvd.messages import FromPrefill, Ping, Pong, ToPrefill

log = structlog.get_logger("kvd.peers")


def resolve_endpoint(spec: str) -> str | None:
    """`tcp://host:port` as is; a directory: the endpoint in its `pd_endpoint` file (None until written)."""
    if "://" in spec:
        return spec
    path = Path(spec).expanduser() / "pd_endpoint"
    try:
        return path.read_text().strip() or None
    except OSError:
        return None


class LinkKeys(NamedTuple):
    """The CURVE keys of a PD deployment, all derived from its shared secret (z85)."""

    server_public: bytes
    server_secret: bytes
    client_public: bytes
    client_secret: bytes

    @classmethod
    def derive(cls, secret: str) -> LinkKeys:
        return cls(*curve_pair(secret, b"kvd-pd-prefill"), *curve_pair(secret, b"kvd-pd-decode"))


class PrefillServer:
    """The prefill side: decode instances' requests in, replies out, by DEALER identity."""

    def __init__(self, ctx: zmq.asyncio.Context, host: str, port: int, run_dir: Path, secret: str = "") -> None:
        self.sock = ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self._auth: AsyncioAuthenticator | None = None
        if secret:
            keys = LinkKeys.derive(secret)
            self._auth = AsyncioAuthenticator(ctx)
            self._auth.configure_curve_callback("*", OnlyKey(keys.client_public, log, "pd_peer_refused"))
            self._auth.start()
            self.sock.curve_server = True
            self.sock.curve_secretkey = keys.server_secret
            self.sock.curve_publickey = keys.server_public
        self.endpoint = bind_tcp(self.sock, host, port)
        self._enc = msgspec.msgpack.Encoder()
        self._dec = msgspec.msgpack.Decoder(ToPrefill)
        self._file = run_dir / "pd_endpoint"
        publish_endpoint(self._file, self.endpoint)

    async def run(self, handle: Callable[[bytes, ToPrefill], Awaitable[None]]) -> None:
        while True:
            identity, payload = await self.sock.recv_multipart(copy=False)
            try:
                msg = self._dec.decode(payload.buffer)
            except (msgspec.DecodeError, msgspec.ValidationError) as e:
                log.warning("pd_frame_rejected", error=str(e))
                continue
            await handle(identity.bytes, msg)

    async def send(self, identity: bytes, msg: FromPrefill) -> None:
        try:
            await self.sock.send_multipart([identity, self._enc.encode(msg)], flags=zmq.NOBLOCK)
        except zmq.ZMQError as e:  # the decode instance is gone: its lease ends the handoff there
            log.warning("pd_reply_dropped", error=str(e), message=type(msg).__name__)

    def close(self, linger_ms: int = 0) -> None:
        self.sock.close(linger=linger_ms)
        if self._auth is not None:
            self._auth.stop()
        try:
            if self._file.read_text().strip() == self.endpoint:
                self._file.unlink()
        except OSError:
            pass


class PrefillLink:
    """The decode side's connection to one prefill instance, with its heartbeat state."""

    def __init__(self, ctx: zmq.asyncio.Context, spec: str, secret: str = "") -> None:
        self.ctx = ctx
        self.spec = spec
        self._keys = LinkKeys.derive(secret) if secret else None
        self.endpoint: str | None = None
        self.sock: zmq.asyncio.Socket | None = None
        self.connected = asyncio.Event()  # set while `sock` is connected (its reader awaits it)
        self.alive = False
        self.seen = False  # answered at least once
        self.instance = spec
        self.namespace = ""
        self.draining = False  # the peer said it is shutting down: send it nothing new
        self.last_pong = 0.0
        self.outstanding = 0  # handoffs dispatched here and not yet answered
        self._seq = 0
        self._enc = msgspec.msgpack.Encoder()
        self._dec = msgspec.msgpack.Decoder(FromPrefill)

    def connect(self) -> bool:
        """Connect once the endpoint is known (a run directory's file may not exist yet)."""
        if self.sock is not None:
            return True
        self.endpoint = resolve_endpoint(self.spec)
        if self.endpoint is None:
            return False
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.IMMEDIATE, 1)
        if self._keys is not None:
            self.sock.curve_serverkey = self._keys.server_public
            self.sock.curve_publickey = self._keys.client_public
            self.sock.curve_secretkey = self._keys.client_secret
        self.sock.connect(self.endpoint)
        self.connected.set()
        return True

    def reset(self) -> None:
        """Drop the connection: the next ping resolves the endpoint again (a restarted prefill
        instance publishes a new port in its run directory)."""
        if self.sock is not None:
            self.sock.close(linger=0)
        self.sock = None
        self.connected.clear()

    def send(self, msg: ToPrefill) -> bool:
        """Queue `msg` for a connected peer at once; False if it cannot go out now."""
        if self.sock is None:
            return False
        # Through the asyncio socket itself: a send on a shadow socket can swallow the edge of
        # the descriptor the event loop waits on, and a reply would then sit unread.
        fut = self.sock.send(self._enc.encode(msg), flags=zmq.NOBLOCK)
        if fut.done() and fut.exception() is not None:
            return False
        return True

    def ping(self) -> None:
        # A peer that does not answer may have been restarted on a new port after this link
        # resolved its run directory (even the old one's file, when that was read before the
        # old instance removed it): follow the file until the peer answers again.
        if not self.alive and self.sock is not None and "://" not in self.spec:
            now = resolve_endpoint(self.spec)
            if now != self.endpoint:
                log.info("prefill_endpoint_changed", spec=self.spec, old=self.endpoint, new=now)
                self.reset()
        if self.connect():
            self._seq += 1
            self.send(Ping(self._seq))

    async def recv(self) -> FromPrefill:
        frame = await self.sock.recv(copy=False)
        return self._dec.decode(frame.buffer)

    def on_pong(self, pong: Pong) -> bool:
        """Record an answer; True when the peer just came (back) to life."""
        self.last_pong = time.monotonic()
        self.instance, self.namespace, self.draining = pong.instance, pong.namespace, pong.draining
        revived = not self.alive
        self.alive = self.seen = True
        return revived

    def expired(self, timeout_s: float) -> bool:
        """True once, when a live peer has been silent for longer than `timeout_s`."""
        if self.alive and time.monotonic() - self.last_pong > timeout_s:
            self.alive = False
            return True
        return False

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close(linger=0)
