"""KVEventPublisher: an instance's KV events out on a PUB socket, its snapshots on a ROUTER.

    publisher.log                    # the KVEventLog the engine's block manager records into
    publisher.step()                 # after each schedule(): the pending events go out as a batch
    publisher.load = lambda: Load(...)   # the instance's load, sent with every batch
    publisher.tick()                 # every second: stragglers, else a heartbeat if the load changed or
                                     # nothing went out for a while
    await publisher.run()            # answers SnapshotRequests
    publisher.close()

Sends never block the step loop: the PUB socket drops a batch for a subscriber whose queue
holds `kv_events.send_hwm` batches, and that subscriber sees the gap in the sequence
numbers and asks for a snapshot. A snapshot first sends what is pending, so the hashes it
carries are the state after batch `seq` exactly (one event loop: nothing changes between).

The sockets live on a ZeroMQ context of their own, so their ZAP handler (with `pd.secret`
set: CURVE, admitting only the subscriber key derived from the secret, `EventKeys`) is
theirs alone; a prefill instance's PD link keeps its own on the daemon's context. The
wire: kvd.kv_events. The design: docs/architecture.md, "KV events".
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec
import structlog
import zmq
import zmq.asyncio
from zmq.auth.asyncio import AsyncioAuthenticator

from kvd.cache.event_log import KVEventLog
from kvd.config import KvdConfig
from kvd.ipc import OnlyKey, bind_tcp, publish_endpoint
from kvd.kv_events import (
    EventBatch,
    EventKeys,
    KVEvent,
    Load,
    Snapshot,
    encoder,
    request_decoder,
)

log = structlog.get_logger("kvd.kv_events")


class KVEventPublisher:
    """The KV-event sockets of one instance, its sequence numbers and its event log."""

    def __init__(self, cfg: KvdConfig, run_dir: Path) -> None:
        ev = cfg.kv_events
        self.cfg = ev
        self.block_size = cfg.cache.block_size
        self.hash_algo = cfg.cache.hash_algo
        self.log = KVEventLog(cfg.cache.block_size)
        self.instance = ev.instance_id or f"{socket.gethostname()}:{os.getpid()}"
        self.epoch = int.from_bytes(os.urandom(8)) >> 1  # a restarted instance has another
        self.seq = 0
        self.num_batches = 0
        self.num_snapshots = 0
        self._interval_s = ev.flush_interval_ms / 1e3
        self._heartbeat_s = cfg.daemon.heartbeat_interval_s
        self._last_sent = 0.0
        self.load: Callable[[], Load | None] = lambda: None
        self._last_load: Load | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._enc = encoder()
        self._dec = request_decoder()
        self.ctx = zmq.asyncio.Context()
        self._auth: AsyncioAuthenticator | None = None
        # PUB is a plain socket: its send never blocks (past the HWM it drops), so no future is needed.
        self.pub = zmq.Context.shadow(self.ctx.underlying).socket(zmq.PUB)
        self.pub.setsockopt(zmq.SNDHWM, ev.send_hwm)
        self.snap = self.ctx.socket(zmq.ROUTER)
        for sock in (self.pub, self.snap):
            sock.setsockopt(zmq.LINGER, 0)
        if cfg.pd.secret:
            keys = EventKeys.derive(cfg.pd.secret)
            self._auth = AsyncioAuthenticator(self.ctx)
            self._auth.configure_curve_callback("*", OnlyKey(keys.subscriber_public, log, "kv_events_peer_refused"))
            self._auth.start()
            for sock in (self.pub, self.snap):
                sock.curve_server = True
                sock.curve_secretkey = keys.server_secret
                sock.curve_publickey = keys.server_public
        self.endpoint = bind_tcp(self.pub, ev.host, ev.port)
        self.snapshot_endpoint = bind_tcp(self.snap, ev.host, ev.snapshot_port)
        self._files = ((run_dir / "kv_events_endpoint", self.endpoint),
                       (run_dir / "kv_snapshot_endpoint", self.snapshot_endpoint))  # fmt: skip
        for path, endpoint in self._files:
            publish_endpoint(path, endpoint)
        log.info("kv_events_serving", endpoint=self.endpoint, snapshot_endpoint=self.snapshot_endpoint,
                 instance=self.instance, curve=bool(cfg.pd.secret))  # fmt: skip

    # ---- batches -----------------------------------------------------------------------
    def step(self) -> None:
        """After a schedule() (and when the engine goes idle): the pending events go out now,
        or at the flush interval's end; with none pending, a heartbeat if the requests waiting
        or running changed (a request arrived or ended), so the load a router weighs is a step old."""
        if not self.log.num_pending:
            load, last = self.load(), self._last_load
            if load is not None and (last is None or (load.waiting, load.running) != (last.waiting, last.running)):
                self._send([])
            return
        wait = self._last_sent + self._interval_s - time.monotonic()
        if wait <= 0:
            self.flush()
        elif self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(wait, self.flush)

    def flush(self) -> None:
        """Every pending event, in batches of at most `max_batch_events`."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        events = self.log.take()
        n = self.cfg.max_batch_events
        for i in range(0, len(events), n):
            self.seq += 1
            self._send(events[i : i + n])

    def clear(self) -> None:
        """The instance's KV cache is gone (its worker lost, or a new engine): `cleared`, sent now."""
        self.log.cleared()
        self.flush()

    def tick(self) -> None:
        """Every second: what is pending, else a heartbeat if the load changed or nothing went
        out for a while."""
        if self.log.num_pending:
            self.flush()
        elif self.load() != self._last_load or time.monotonic() - self._last_sent >= self._heartbeat_s:
            self._send([])

    def _send(self, events: list[KVEvent]) -> None:
        if self.pub.closed:  # the daemon is stopping
            return
        self._last_load = self.load()
        batch = EventBatch(self.instance, self.epoch, self.seq, time.time(), events, self._last_load)
        self.pub.send(self._enc.encode(batch), zmq.NOBLOCK, copy=False)  # past the HWM PUB drops, never blocks
        self.num_batches += 1
        self._last_sent = time.monotonic()

    # ---- snapshots ---------------------------------------------------------------------
    def snapshot(self) -> Snapshot:
        """Every hash held, consistent with the batches sent so far (pending ones go out first)."""
        self.flush()
        tiers = self.log.tiers()
        return Snapshot(self.instance, self.epoch, self.seq, self.block_size, self.hash_algo, **tiers)

    async def run(self) -> None:
        """Answer each SnapshotRequest (from a DEALER, or a REQ with its empty delimiter)."""
        while True:
            frames = await self.snap.recv_multipart(copy=False)
            try:
                self._dec.decode(frames[-1].buffer)
            except (msgspec.DecodeError, msgspec.ValidationError) as e:
                log.warning("frame_rejected", channel="kv_snapshot", error=str(e))
                continue
            self.num_snapshots += 1
            reply = [f.bytes for f in frames[:-1]] + [self._enc.encode(self.snapshot())]
            try:
                await self.snap.send_multipart(reply, flags=zmq.NOBLOCK)
            except zmq.ZMQError as e:  # the subscriber is gone: it asks again when it returns
                log.warning("kv_snapshot_dropped", error=str(e))

    # ---- lifetime ----------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        return {"endpoint": self.endpoint, "snapshot_endpoint": self.snapshot_endpoint, "instance": self.instance,
                "seq": self.seq, "batches": self.num_batches, "snapshots": self.num_snapshots}  # fmt: skip

    def close(self) -> None:
        if self.pub.closed:
            return
        if self._timer is not None:
            self._timer.cancel()
        self.pub.close(linger=0)
        self.snap.close(linger=0)
        if self._auth is not None:
            self._auth.stop()
        self.ctx.term()
        for path, endpoint in self._files:
            try:
                if path.read_text().strip() == endpoint:
                    path.unlink()
            except OSError:
                pass

