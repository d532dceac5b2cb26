"""The life of every child process of the daemon (workers, the cache messenger).

`run_child` connects the two sockets, calls `start(cfg, recv)` — which loads what the
process owns (taking its first messages with `recv` if it needs them) and returns `Started`:
its Ready message, a handler, and what releases the rest — sends Ready, then feeds each
received message to the handler and sends back what it returns. Shutdown ends it cleanly.
Any exception sends Dead with the reason and exits non-zero (a broken child never limps
on). If the daemon disappears (our parent pid changes), the child exits too. Either way it
releases what it owns and then exits at once, without the interpreter's teardown: with
torch and a model loaded that teardown takes seconds.
"""

from __future__ import annotations

import os
import sys
import traceback
from collections.abc import Callable
from typing import Any, NamedTuple

import msgspec
import structlog
import zmq

from kvd.config import KvdConfig
from kvd.ipc import BadFrame, SyncChannel
from kvd.messages import Dead, Ready, Shutdown

log = structlog.get_logger("kvd.child")

PARENT_POLL_MS = 1000
Handler = Callable[[Any], msgspec.Struct | None]


class Stopped(Exception):
    """Shutdown arrived (code 0) or the daemon is gone (code 1): the process ends."""

    def __init__(self, code: int) -> None:
        super().__init__(code)
        self.code = code


class Started(NamedTuple):
    """What a child's start function returns: its Ready, its message handler, what releases the rest."""

    ready: Ready
    handle: Handler
    close: Callable[[], None] | None = None  # releases what the OS would not: a pool client, rank processes


def _receiver(inbox: SyncChannel, parent: int) -> Callable[[], Any]:
    def recv() -> Any:
        """The next message; Stopped on Shutdown or when the daemon (`parent`) is gone."""
        while True:
            try:
                msg = inbox.recv(PARENT_POLL_MS)
            except BadFrame as e:  # logged and dropped: the channel reads on
                log.warning("frame_rejected", channel="inbox", reason=str(e))
                continue
            if isinstance(msg, Shutdown):
                log.info("child_stopping")
                raise Stopped(0)
            if msg is not None:
                return msg
            if os.getppid() != parent:
                log.error("child_orphaned", reason="the daemon process is gone")
                raise Stopped(1)

    return recv


def run_child(
    name: str,
    config_json: bytes,
    in_endpoint: str,
    report_endpoint: str,
    recv_type: Any,
    start: Callable[[KvdConfig, Callable[[], Any]], Started],
) -> None:
    cfg = msgspec.json.decode(config_json, type=KvdConfig)
    from kvd.logs import configure_logging

    configure_logging(cfg.log, process=name, role=cfg.daemon.role)
    ctx = zmq.Context()
    inbox = SyncChannel(ctx.socket(zmq.PULL), recv_type)
    inbox.sock.connect(in_endpoint)
    report = SyncChannel(ctx.socket(zmq.PUSH))
    report.sock.connect(report_endpoint)
    code = 0
    started: Started | None = None

    recv = _receiver(inbox, os.getppid())

    try:
        started = start(cfg, recv)
        report.send(started.ready)
        while True:
            reply = started.handle(recv())
            if reply is not None:
                report.send(reply)
    except Stopped as e:
        code = e.code
    except BaseException as e:  # noqa: BLE001 - any failure ends the child, loudly
        reason = f"{type(e).__name__}: {e}"
        log.error("child_dead", reason=reason, traceback=traceback.format_exc())
        try:
            report.send(Dead(name, reason, os.getpid()))
        except zmq.ZMQError:
            pass
        code = 1
    finally:
        if started is not None and started.close is not None:
            try:
                started.close()
            except Exception as e:  # noqa: BLE001 - logged; the process ends either way
                log.error("child_close_failed", error=f"{type(e).__name__}: {e}")
                code = code or 1
        inbox.close()
        report.close(linger_ms=1000 if code else 0)  # a Dead report leaves before the process does
        ctx.term()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # everything this process owns is released above or by the OS
