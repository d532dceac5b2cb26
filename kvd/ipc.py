"""Typed ZeroMQ channels: one small wrapper per socket, one message union per direction.

Each wrapper owns a prebuilt msgpack encoder and a decoder for the union it receives,
so a socket can only carry its channel's messages; a frame that does not decode is the
receiver's to log and count (`BadFrame`), never a reason to stop reading. Sockets close
with linger 0: a stopping process never waits on a peer that is gone.

Endpoints: an instance's internal channels (daemon ⇄ worker, messenger) are ipc://
sockets in a directory only the instance's user can enter (`private_dir`, mode 0700), so
no other local user can connect to them at all; the client and PD endpoints are tcp on
127.0.0.1 by default, with ports picked by the kernel, so two daemons never collide.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Generic, TypeVar

import msgspec
import zmq
import zmq.asyncio
from zmq.utils import z85
from zmq.utils.monitor import parse_monitor_message

T = TypeVar("T")


def bind_random(sock: zmq.Socket, host: str = "127.0.0.1") -> str:
    """Bind to a free port on `host`; returns the endpoint peers connect to."""
    port = sock.bind_to_random_port(f"tcp://{host}")
    return f"tcp://{host}:{port}"


def bind_tcp(sock: zmq.Socket, host: str, port: int) -> str:
    """Bind to `host`:`port` (0: a free port); returns the endpoint peers connect to."""
    if port == 0:
        return bind_random(sock, host)
    endpoint = f"tcp://{host}:{port}"
    sock.bind(endpoint)
    return endpoint


def ipc_base() -> Path:
    """Where instances make their private ipc directories: $XDG_RUNTIME_DIR, else the temp dir."""
    return Path(os.environ.get("XDG_RUNTIME_DIR") or tempfile.gettempdir())


def private_dir() -> Path:
    """A new directory for one instance's ipc:// sockets that only this user can enter (0700),
    with a short path (a unix socket's is limited to 107 bytes). Directories that instances
    which died by kill -9 left behind (their pid is gone) are removed first."""
    base = ipc_base()
    for old in base.glob("kvd-ipc-*-*"):
        pid = old.name.split("-")[2]
        try:
            ours = old.stat().st_uid == os.getuid()
        except OSError:
            continue
        if ours and pid.isdigit() and not Path(f"/proc/{pid}").exists():
            shutil.rmtree(old, ignore_errors=True)
    return Path(tempfile.mkdtemp(prefix=f"kvd-ipc-{os.getpid()}-", dir=base))


def bind_ipc(sock: zmq.Socket, directory: Path, name: str) -> str:
    """Bind `sock` to `directory/name`; returns the endpoint peers connect to."""
    endpoint = f"ipc://{directory / name}"
    sock.bind(endpoint)
    return endpoint


def publish_endpoint(path: Path, endpoint: str) -> None:
    """Write `endpoint` to the file `path` atomically: a reader sees the old one or the new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(endpoint + "\n")
    os.replace(tmp, path)


class Link:
    """A DEALER connected to `endpoint`, and whether its peer is connected (the socket
    monitor's handshake and disconnect events); zmq.ZMQError for an endpoint ZeroMQ cannot
    parse. `ctx` decides sync or asyncio sockets. The clients' socket to a daemon, and the
    router's to each instance.

    Not ZMQ_IMMEDIATE, though POLLOUT would then tell the same: with it, libzmq discards the
    replies received but not yet read when the peer closes the connection, so a daemon that
    sends its last Errors and exits (a worker died, on_worker_death = "exit") would leave its
    clients waiting for them until their timeout."""

    def __init__(self, ctx: zmq.Context, endpoint: str | None) -> None:
        """`endpoint` None: not connected until `repoint` says where (a peer not started yet)."""
        self.sock = ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        # Watched before it connects: a handshake before the monitor would go unseen.
        self.monitor = self.sock.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED)
        self._events = zmq.Socket.shadow(self.monitor.underlying)  # non-blocking reads, sync or asyncio
        self._up = False
        self.drops = 0  # connections lost so far
        self.endpoint = endpoint
        try:
            if endpoint is not None:
                self.sock.connect(endpoint)
        except zmq.ZMQError:
            self.close()
            raise

    def repoint(self, endpoint: str) -> None:
        """Connect to `endpoint` instead (the peer restarted elsewhere); the monitor goes on."""
        try:
            if self.endpoint is not None:
                self.sock.disconnect(self.endpoint)
        except zmq.ZMQError:  # not connected there any more
            pass
        self.sock.connect(endpoint)
        self.endpoint = endpoint

    def up(self) -> bool:
        """Whether the peer is connected, as of the monitor's events so far."""
        while True:
            try:
                event = parse_monitor_message(self._events.recv_multipart(zmq.NOBLOCK))
            except zmq.Again:
                return self._up
            self._up = event["event"] == zmq.EVENT_HANDSHAKE_SUCCEEDED
            self.drops += not self._up

    def close(self, linger: int = 0) -> None:
        """`linger` ms for what is still queued to leave (0: dropped)."""
        if self.sock.closed:
            return
        self.sock.disable_monitor()
        self.monitor.close(linger=0)
        self.sock.close(linger=linger)


class BadFrame(Exception):
    """A received frame that is not a message of the channel's union (the reason says why)."""


def _decode(dec: msgspec.msgpack.Decoder, frame: memoryview):
    try:
        return dec.decode(frame)
    except (msgspec.DecodeError, msgspec.ValidationError) as e:
        raise BadFrame(f"{len(frame)} bytes: {e}") from None


class AsyncChannel(Generic[T]):
    """An asyncio socket that sends encoded Structs and receives the union `recv_type`."""

    def __init__(self, sock: zmq.asyncio.Socket, recv_type: Any) -> None:
        sock.setsockopt(zmq.LINGER, 0)
        self.sock = sock
        self._enc = msgspec.msgpack.Encoder()
        self._dec = msgspec.msgpack.Decoder(recv_type)

    async def send(self, msg: msgspec.Struct) -> None:
        await self.sock.send(self._enc.encode(msg), copy=False)

    async def recv(self) -> T:
        """The next message; BadFrame for a frame that does not decode (the socket reads on)."""
        frame = await self.sock.recv(copy=False)
        return _decode(self._dec, frame.buffer)

    def close(self) -> None:
        self.sock.close(linger=0)


class SyncChannel(Generic[T]):
    """The blocking twin, for child processes that have no event loop."""

    def __init__(self, sock: zmq.Socket, recv_type: Any = None) -> None:
        sock.setsockopt(zmq.LINGER, 0)
        self.sock = sock
        self._enc = msgspec.msgpack.Encoder()
        self._dec = msgspec.msgpack.Decoder(recv_type) if recv_type is not None else None

    def send(self, msg: msgspec.Struct) -> None:
        self.sock.send(self._enc.encode(msg), copy=False)

    def recv(self, timeout_ms: int | None = None) -> T | None:
        """The next message, or None if none arrived within `timeout_ms`."""
        if timeout_ms is not None and not self.sock.poll(timeout_ms, zmq.POLLIN):
            return None
        frame = self.sock.recv(copy=False)
        return _decode(self._dec, frame.buffer)

    def close(self, linger_ms: int = 0) -> None:
        self.sock.close(linger=linger_ms)


def field_error(e: msgspec.ValidationError, whole: str = "frame") -> str:
    """msgspec says `Expected int, got str - at `$.params.max_tokens``: put the field first, as
    kvd's errors do (`whole` names what failed when no field does: a ZeroMQ frame, an HTTP body)."""
    text, _, path = str(e).partition(" - at `$.")
    path = path.rstrip("`")
    for prefix, what in (("Object contains unknown field `", "unknown field"),
                         ("Object missing required field `", "required field missing")):  # fmt: skip
        if text.startswith(prefix):  # the field is named in the text: put it in the path
            name = text.removeprefix(prefix).rstrip("`")
            return f"{path + '.' if path else ''}{name}: {what}"
    if not path:
        return f"{whole}: {text}"
    head = text.partition(":")[0]
    if head == path.rsplit(".", 1)[-1]:
        return text  # our own validation already names the field
    if head.isidentifier():  # ... or a field inside it
        return f"{path}.{text}"
    return f"{path}: {text}"


def curve_pair(secret: str, person: bytes) -> tuple[bytes, bytes]:
    """A CURVE key pair (public, secret; z85) derived from a deployment's shared secret and a
    personalisation naming its use (each socket kind's keys differ from every other's)."""
    sk = z85.encode(hashlib.blake2b(secret.encode(), digest_size=32, person=person).digest())
    return zmq.curve_public(sk), sk


class OnlyKey:
    """A ZAP CURVE check that admits one public key; a refusal is logged as `event`."""

    def __init__(self, key: bytes, log, event: str) -> None:
        self.key = key
        self._log = log
        self._event = event

    def callback(self, domain: str, key: bytes) -> bool:
        if key != self.key:
            self._log.warning(self._event, reason="CURVE key not derived from this deployment's pd.secret")
        return key == self.key
