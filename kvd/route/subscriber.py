"""KVEventSubscriber: follows instances' KV events into a KVIndex, resyncing from snapshots.

    sub = KVEventSubscriber(secret=cfg.pd.secret)        # the deployment's secret: CURVE
    sub.add("a", events_endpoint, snapshot_endpoint)     # or sub.add_run_dir("a", run_dir); "", "": not yet known
    sub.repoint("a", events_endpoint, snapshot_endpoint) # it restarted on other ports (or is found at last)
    await sub.run()                                      # one follower per instance, until cancelled
    sub.index.prefix_match(hashes)
    sub.loads["a"]                                       # its Load as of its last batch (None: none yet)
    sub.close()

Per instance: a SUB socket on its events endpoint and a DEALER on its snapshot endpoint.
A follower asks for a snapshot first (unless the index already knows the instance), then
applies each batch in order; a gap (a lost batch, a restarted instance) makes it ask for a
snapshot again and go on from its number (`kvd.route.index`). Batches that arrive while a
snapshot is awaited wait in the SUB socket and are applied or dropped after it. A frame
that does not decode is logged and skipped. The wire: kvd.kv_events.

An instance need not be up when it is added: one added with no endpoints is followed from
its first `repoint`, and one added by a run dir without its endpoint files yet (not started)
from when they appear (read again after a back-off, 0.1 s doubling up to
MAX_LOCATE_INTERVAL_S).
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import msgspec
import structlog
import zmq
import zmq.asyncio

from kvd.kv_events import (
    EventKeys,
    Load,
    Snapshot,
    SnapshotRequest,
    batch_decoder,
    encoder,
    snapshot_decoder,
)
from kvd.route.index import Applied, KVIndex

log = structlog.get_logger("kvd.route")

MAX_LOCATE_INTERVAL_S = 5.0


class _Source:
    """One instance's two sockets."""

    def __init__(self, ctx: zmq.asyncio.Context, name: str, events: str, snapshots: str,
                 keys: EventKeys | None, run_dir: Path | None = None) -> None:  # fmt: skip
        self.name = name
        self.run_dir = run_dir  # where its endpoints are read while it has none
        self.located = asyncio.Event()  # it has endpoints: the follower may ask for a snapshot
        self.sub = ctx.socket(zmq.SUB)
        self.dealer = ctx.socket(zmq.DEALER)
        for sock in (self.sub, self.dealer):
            sock.setsockopt(zmq.LINGER, 0)
            if keys is not None:
                sock.curve_serverkey = keys.server_public
                sock.curve_publickey = keys.subscriber_public
                sock.curve_secretkey = keys.subscriber_secret
        self.sub.setsockopt(zmq.SUBSCRIBE, b"")
        self.endpoints = ("", "")
        if events:
            self.repoint(events, snapshots)

    def repoint(self, events: str, snapshots: str) -> None:
        """Follow the instance at new endpoints (it restarted elsewhere): a new epoch there makes
        the follower resync, and a snapshot request still unanswered is asked again there."""
        for sock, old, new in zip((self.sub, self.dealer), self.endpoints, (events, snapshots)):
            try:
                if old:
                    sock.disconnect(old)
            except zmq.ZMQError:
                pass
            sock.connect(new)
        self.endpoints = (events, snapshots)
        self.located.set()

    def close(self) -> None:
        self.sub.close(linger=0)
        self.dealer.close(linger=0)


class KVEventSubscriber:
    """The sockets that keep a KVIndex current, and counts of what they did."""

    def __init__(self, index: KVIndex | None = None, secret: str = "", snapshot_timeout_s: float = 5.0) -> None:
        self.index = index if index is not None else KVIndex()
        self.ctx = zmq.asyncio.Context()
        self._keys = EventKeys.derive(secret) if secret else None
        self._sources: dict[str, _Source] = {}
        self.loads: dict[str, Load | None] = {}  # each instance's last reported load: the status feed
        self._timeout = snapshot_timeout_s
        self._enc = encoder()
        self._batches = batch_decoder()
        self._snapshots = snapshot_decoder()
        self.num_batches = 0
        self.num_gaps = 0  # gaps seen after a first sync (lost batches, restarts)
        self.num_snapshots = 0
        self.num_rejected = 0

    def add(self, name: str, events_endpoint: str, snapshot_endpoint: str, run_dir: Path | None = None) -> None:
        """Follow an instance under `name` (the key of the index); endpoints "": from its first
        `repoint` (or from `run_dir`'s files once they appear)."""
        if name in self._sources:
            raise ValueError(f"name: instance {name!r} is already followed")
        self._sources[name] = _Source(self.ctx, name, events_endpoint, snapshot_endpoint, self._keys, run_dir)

    def repoint(self, name: str, events_endpoint: str, snapshot_endpoint: str) -> None:
        """`name` now publishes at these endpoints (one not followed since the start stays so)."""
        if name in self._sources:
            self._sources[name].repoint(events_endpoint, snapshot_endpoint)

    def add_run_dir(self, name: str, run_dir: str | Path) -> None:
        """Follow the instance whose run directory holds `kv_events_endpoint` and
        `kv_snapshot_endpoint` (now, or once it starts and writes them)."""
        run_dir = Path(run_dir)
        self.add(name, *(_read_endpoints(run_dir) or ("", "")), run_dir=run_dir)

    async def run(self) -> None:
        """Follow every instance added, until cancelled."""
        async with asyncio.TaskGroup() as tg:
            for name in self._sources:
                tg.create_task(self.follow(name))

    async def follow(self, name: str) -> None:
        """Apply `name`'s batches in order, resyncing on each gap, until cancelled."""
        src = self._sources[name]
        await self._locate(src)
        if self.index.seq(name) is None:
            await self.resync(name)
        while True:
            frame = await src.sub.recv(copy=False)
            try:
                batch = self._batches.decode(frame.buffer)
            except (msgspec.DecodeError, msgspec.ValidationError) as e:
                self.num_rejected += 1
                log.warning("frame_rejected", channel="kv_events", instance=name, error=str(e))
                continue
            self.num_batches += 1
            self.loads[name] = batch.load  # current whatever the batch's place in the sequence
            if self.index.apply(name, batch) == Applied.GAP:
                self.num_gaps += 1
                log.info("kv_events_gap", instance=name, seq=batch.seq, applied=self.index.seq(name))
                await self.resync(name)

    async def _locate(self, src: _Source) -> None:
        """Return once `src` has endpoints: given by `repoint`, or read from its run dir."""
        wait = 0.1
        while not src.located.is_set():
            if src.run_dir is not None and (found := _read_endpoints(src.run_dir)):
                log.info("kv_events_found", instance=src.name, endpoint=found[0], snapshot_endpoint=found[1])
                src.repoint(*found)
                return
            try:
                await asyncio.wait_for(src.located.wait(), wait if src.run_dir is not None else None)
            except TimeoutError:
                wait = min(2 * wait, MAX_LOCATE_INTERVAL_S)

    async def snapshot(self, name: str) -> Snapshot:
        """Ask `name` for its snapshot, retrying every `snapshot_timeout_s` until one comes."""
        src = self._sources[name]
        while True:
            await src.dealer.send(self._enc.encode(SnapshotRequest()))
            while True:
                try:
                    frame = await asyncio.wait_for(src.dealer.recv(copy=False), self._timeout)
                except TimeoutError:
                    log.warning("kv_snapshot_timeout", instance=name, timeout_s=self._timeout)
                    break  # ask again (a reply to the lost request is still taken if it comes)
                try:
                    return self._snapshots.decode(frame.buffer)
                except (msgspec.DecodeError, msgspec.ValidationError) as e:
                    self.num_rejected += 1
                    log.warning("frame_rejected", channel="kv_snapshot", instance=name, error=str(e))

    async def resync(self, name: str) -> Snapshot:
        """Load `name`'s snapshot into the index; batches up to its number are stale after."""
        snap = await self.snapshot(name)
        self.index.load(name, snap)
        self.num_snapshots += 1
        log.info("kv_events_synced", instance=name, seq=snap.seq, epoch=snap.epoch, device=len(snap.device),
                 host=len(snap.host), pool=len(snap.pool))  # fmt: skip
        return snap

    def close(self) -> None:
        for src in self._sources.values():
            src.close()
        self.ctx.term()


def _read_endpoints(run_dir: Path) -> tuple[str, str] | None:
    """(events, snapshot) endpoints from an instance's run dir; None while either file is missing."""
    try:
        return ((run_dir / "kv_events_endpoint").read_text().strip(),
                (run_dir / "kv_snapshot_endpoint").read_text().strip())  # fmt: skip
    except OSError:
        return None
