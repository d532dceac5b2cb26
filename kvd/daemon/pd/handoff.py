"""What both PD roles share: a request's handoff, and the role base that moves its blocks.

A `Handoff` is one request's way through the PD chain (docs/architecture.md, "The PD
event chain") on one instance, kept on the request's record (`request.owner.handoff`)
while the request is in the chain: no table beside the record holds it. Its `engine_id`
is the id the instance's engine knows the request by — on a decode instance the
client's `request_id`, on a prefill instance the `handoff_id` of the attempt — and
`request_id` (the client's) goes on every log line of both instances, so `kvd trace`
follows one request across them.

`PDRole` holds what both roles keep: the storage namespace and keys, the pool
connector its engine uses (the scheduler half) and the transfers in flight (the worker
half, `kvd.connector.transfers.PoolTransfers`, one per engine). A block is never freed
while a transfer may write it: the connector holds the request's blocks until the
messenger reports or, for a silent messenger, `transfer_grace_s` after the lease. Late or
duplicate messages are logged and ignored.
"""

from __future__ import annotations

import enum
import os
import socket
from typing import Any

import structlog

from kvd.cache.storage.keys import request_keys, storage_namespace
from kvd.config import KvdConfig
from kvd.connector.pool import PoolConnector
from kvd.connector.transfers import PoolTransfers
from kvd.daemon.role import Role
from kvd.daemon.serving import Serving
from kvd.engine.engine import Engine
from kvd.logs import RequestClock
from kvd.messages import CacheTaskDone
from kvd.model_info import ModelInfo
from kvd.request import Request

log = structlog.get_logger("kvd.pd")


class Phase(enum.IntEnum):
    """Where a handoff is in the chain."""

    QUEUED = 0  # waiting for blocks to preallocate
    UNDISPATCHED = 1  # decode: blocks held; no prefill instance has answered yet
    PREFILLING = 2  # decode: PrefillRequest sent
    READING = 3  # CacheTask(read) sent
    WRITING = 4  # prefill: CacheTask(write) sent


class Handoff:
    """One request's way through the chain on this instance."""

    def __init__(self, engine_id: str, request_id: str) -> None:
        self.engine_id = engine_id  # the engine's id: decode, the client's; prefill, the handoff id
        self.request_id = request_id  # the client's, on every log line of both instances
        self.phase = Phase.QUEUED
        self.deadline = float("inf")  # time.monotonic()
        self.read_from = 0  # first block index a pool read fills
        self.task_id = -1
        self.clock = RequestClock()
        self.owner = None  # the daemon's part of its record, which holds it (`PDRole.begin`)

    @property
    def live(self) -> bool:
        """Still in the chain (`PDRole.end` was not called on it)."""
        return self.owner is not None and self.owner.handoff is self


class PDRole(Role):
    """The books of both PD roles: namespace, keys, handoffs on the records, transfers."""

    moves_kv = True
    load: str | None = None  # what the pool connector loads: "prompt", "prefix" or nothing
    save = False  # whether it saves each request's blocks after its first token

    def __init__(self, cfg: KvdConfig, serving: Serving, ctx, run_dir) -> None:
        super().__init__(cfg, serving, ctx, run_dir)
        self.cfg = cfg.pd
        self.serving = serving
        self.transfers: PoolTransfers | None = None  # the engine's, from `attach`
        self.namespace = ""
        self.instance = f"{socket.gethostname()}:{os.getpid()}"
        self.counts = {"handoffs": 0, "kv_failures": 0, "recomputes": 0, "late_messages": 0, "reaped": 0}

    @property
    def engine(self) -> Engine:
        return self.serving.engine

    def connector(self, info: ModelInfo) -> PoolConnector:
        # Requests waiting for pool KV hold at most this share of the blocks: they never starve running ones.
        wait_blocks = max(1, int(info.num_blocks * self.cfg.kv_wait_fraction))
        return PoolConnector(info.block_size, wait_blocks, self.load, self.save, self.group_min_tokens)

    def attach(self, engine: Engine) -> None:
        """The engine is (re)built: derive the storage namespace from the model it serves; its
        transfers start afresh (a report about an earlier engine's task is late)."""
        info = engine.info
        self.namespace = storage_namespace(info.fingerprint, info.kv_dtype, info.block_size)
        self.transfers = PoolTransfers(engine, self.serving.supervisor.send_cache_task, self.cfg.transfer_grace_s)

    def keys(self, token_ids: list[int]) -> list[str]:
        kv = self.engine.kv
        return request_keys(self.namespace, token_ids, kv.block_size, kv.hash_algo)

    # ---- handoffs on the records -------------------------------------------------------
    def begin(self, request: Request, h: Handoff) -> None:
        """`request` enters the chain."""
        h.owner = request.owner
        request.owner.handoff = h
        self.counts["handoffs"] += 1

    @staticmethod
    def end(h: Handoff) -> None:
        """`h` leaves the chain (its record may live on: a decode request that joins the batch)."""
        if h.live:
            h.owner.handoff = None

    def handoff(self, engine_id: str) -> Handoff | None:
        request = self.serving.record(engine_id)
        return request.owner.handoff if request is not None and request.owner is not None else None

    def handoffs(self) -> list[Handoff]:
        """Every request's handoff in the chain now."""
        records = self.serving.records()
        return [r.owner.handoff for r in records if r.owner is not None and r.owner.handoff is not None]

    # ---- transfers ---------------------------------------------------------------------
    def read(self, h: Handoff, keys: list[str], prefix: bool) -> None:
        """Read `keys` into the request's blocks from `h.read_from` on."""
        request = self.serving.record(h.engine_id)
        if request is None:
            return  # ended meanwhile: no blocks to fill
        if not keys:
            self.arrived(h, 0)
            return
        block_ids = self.engine.kv.block_ids(h.engine_id)[h.read_from : h.read_from + len(keys)]
        h.phase = Phase.READING
        h.task_id = self.transfers.load(request, keys, block_ids, h.deadline, prefix)
        log.info("kv_read_started", request_id=h.request_id, num_blocks=len(keys), prefix=prefix, **h.clock.step())

    def arrived(self, h: Handoff, num_blocks: int) -> None:
        """A read of `num_blocks` blocks from `h.read_from` on succeeded."""
        raise NotImplementedError

    async def task_done(self, h: Handoff, done: CacheTaskDone) -> None:
        """The messenger reported on `h`'s live task."""
        raise NotImplementedError

    async def on_cache_done(self, done: CacheTaskDone) -> None:
        # The blocks are ours again (freed now if the request ended); None: a task no longer in flight.
        request = self.transfers.done(done) if self.transfers is not None else None
        if request is None:
            self.counts["late_messages"] += 1
            log.info("late_message_ignored", message="CacheTaskDone", task_id=done.task_id)
            return
        self.serving.wake()
        h = request.owner.handoff if request.owner is not None else None
        if h is None or h.task_id != done.task_id:
            return  # aborted or failed meanwhile
        await self.task_done(h, done)

    async def messenger_lost(self) -> None:
        """No transfer can still write; every task in flight failed."""
        for done in self.transfers.lost() if self.transfers is not None else []:
            await self.on_cache_done(done)

    def reap_transfers(self) -> None:
        """Transfers silent past their deadline and the grace: the messenger no longer writes."""
        for task_id, request in self.transfers.expired() if self.transfers is not None else []:
            self.counts["reaped"] += 1
            log.warning("transfer_reaped", request_id=request.request_id, task_id=task_id)
            h = request.owner.handoff if request.owner is not None else None
            if h is not None and h.task_id == task_id:
                self.transfer_expired(h)
            self.serving.wake()

    def transfer_expired(self, h: Handoff) -> None:
        """`h`'s transfer was reaped."""
        raise NotImplementedError

    def status(self) -> dict[str, Any]:
        phases = {p.name.lower(): 0 for p in Phase}
        for h in self.handoffs():
            phases[h.phase.name.lower()] += 1
        return {"pool": self.cfg.pool, "namespace": self.namespace, "in_flight": phases,
                "transfers": len(self.transfers) if self.transfers is not None else 0, **self.counts}  # fmt: skip
