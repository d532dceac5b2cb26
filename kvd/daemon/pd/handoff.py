"""What both PD roles share: a request's handoff, and the role base that moves its blocks.

A `Handoff` is one request's way through the PD chain (docs/architecture.md, "The PD
event chain") on one instance. Its
`engine_id` is the id the instance's engine knows the request by — on a decode instance
the client's `request_id`, on a prefill instance the `handoff_id` of the attempt — and
`request_id` (the client's) goes on every log line of both instances, so `kvd trace`
follows one request across them.

`PDRole` holds the books both roles keep: the storage namespace and keys, the messenger
tasks in flight with their deadlines, the pool connector its engine uses, and the rules
for them. A block is never freed while a transfer may write it: the connector holds the
request's blocks until `Engine.end_transfer`, called when
the messenger reports or, for a silent messenger, `transfer_grace_s` after the lease (the
messenger never writes a block past a task's deadline, which makes that reclaim safe).
Late or duplicate messages are logged and ignored.
"""

from __future__ import annotations

import asyncio
import enum
import itertools
import os
import socket
import time
from typing import Any

import structlog

from kvd.cache.storage.keys import request_keys, storage_namespace
from kvd.config import KvdConfig
from kvd.connector.pool import PoolConnector
from kvd.daemon.role import Role
from kvd.daemon.serving import Serving
from kvd.engine.engine import Engine
from kvd.logs import RequestClock
from kvd.messages import CacheTask, CacheTaskDone
from kvd.model_info import ModelInfo

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


class Handoffs(dict):
    """Handoffs by engine id; `empty` is set while there are none (a draining prefill
    instance awaits it)."""

    def __init__(self) -> None:
        super().__init__()
        self.empty = asyncio.Event()
        self.empty.set()

    def __setitem__(self, engine_id: str, h: Handoff) -> None:
        super().__setitem__(engine_id, h)
        self.empty.clear()

    def pop(self, *args):
        h = super().pop(*args)
        if not self:
            self.empty.set()
        return h

    def clear(self) -> None:
        super().clear()
        self.empty.set()


class PDRole(Role):
    """The books of both PD roles: namespace, keys, messenger tasks and their deadlines."""

    moves_kv = True
    load: str | None = None  # what the pool connector loads: "prompt", "prefix" or nothing
    save = False  # whether it saves each request's blocks after its first token

    def __init__(self, cfg: KvdConfig, serving: Serving, ctx, run_dir) -> None:
        super().__init__(cfg, serving, ctx, run_dir)
        self.cfg = cfg.pd
        self.serving = serving
        self.handoffs = Handoffs()
        self.tasks: dict[int, tuple[str, float]] = {}  # messenger task id -> (engine id, deadline)
        self._task_ids = itertools.count(1)
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
        """The engine is (re)built: derive the storage namespace from the model it serves."""
        info = engine.info
        self.namespace = storage_namespace(info.fingerprint, info.kv_dtype, info.block_size)

    def keys(self, token_ids: list[int]) -> list[str]:
        kv = self.engine.kv
        return request_keys(self.namespace, token_ids, kv.block_size, kv.hash_algo)

    # ---- messenger tasks ---------------------------------------------------------------
    def send_task(self, h: Handoff, write: bool, keys: list[str], block_ids: list[int], prefix: bool = False) -> None:
        h.task_id = next(self._task_ids)
        self.tasks[h.task_id] = (h.engine_id, h.deadline)
        self.serving.supervisor.send_cache_task(CacheTask(
            task_id=h.task_id, request_id=h.engine_id, write=write, keys=keys, block_ids=block_ids,
            deadline=h.deadline, prefix=prefix,
        ))  # fmt: skip

    def read(self, h: Handoff, keys: list[str], prefix: bool) -> None:
        """Read `keys` into the request's blocks from `h.read_from` on."""
        if not keys:
            self.arrived(h, 0)
            return
        block_ids = self.engine.kv.block_ids(h.engine_id)[h.read_from : h.read_from + len(keys)]
        h.phase = Phase.READING
        request = self.serving.record(h.engine_id)
        if request is not None:  # as before the record: a request already gone holds no blocks to guard
            self.engine.connector.begin_transfer(request)
        self.send_task(h, False, keys, block_ids, prefix)
        log.info("kv_read_started", request_id=h.request_id, num_blocks=len(keys), prefix=prefix, **h.clock.step())

    def arrived(self, h: Handoff, num_blocks: int) -> None:
        """A read of `num_blocks` blocks from `h.read_from` on succeeded."""
        raise NotImplementedError

    async def task_done(self, h: Handoff, done: CacheTaskDone) -> None:
        """The messenger reported on `h`'s live task."""
        raise NotImplementedError

    async def on_cache_done(self, done: CacheTaskDone) -> None:
        entry = self.tasks.pop(done.task_id, None)
        if entry is None:
            self.counts["late_messages"] += 1
            log.info("late_message_ignored", message="CacheTaskDone", task_id=done.task_id)
            return
        engine_id, _ = entry
        self._end_transfer(engine_id)  # the blocks are ours again (freed now if the request ended)
        self.serving.wake()
        h = self.handoffs.get(engine_id)
        if h is None or h.task_id != done.task_id:
            return  # aborted or failed meanwhile
        await self.task_done(h, done)

    async def messenger_lost(self) -> None:
        """No transfer can still write; every task in flight failed."""
        for task_id, (engine_id, _) in list(self.tasks.items()):
            await self.on_cache_done(CacheTaskDone.failed(task_id, engine_id, "the cache messenger died"))

    def reap_transfers(self) -> None:
        """Transfers silent past their deadline and the grace: the messenger no longer writes."""
        now = time.monotonic()
        for task_id, (engine_id, deadline) in list(self.tasks.items()):
            if now <= deadline + self.cfg.transfer_grace_s:
                continue
            del self.tasks[task_id]
            self.counts["reaped"] += 1
            log.warning("transfer_reaped", request_id=engine_id, task_id=task_id)
            self._end_transfer(engine_id)
            h = self.handoffs.get(engine_id)
            if h is not None and h.task_id == task_id:
                self.transfer_expired(h)
            self.serving.wake()

    def _end_transfer(self, engine_id: str) -> None:
        request = self.serving.record(engine_id)
        if request is not None:
            self.engine.end_transfer(request)

    def transfer_expired(self, h: Handoff) -> None:
        """`h`'s transfer was reaped."""
        raise NotImplementedError

    def status(self) -> dict[str, Any]:
        phases = {p.name.lower(): 0 for p in Phase}
        for h in self.handoffs.values():
            phases[h.phase.name.lower()] += 1
        return {"pool": self.cfg.pool, "namespace": self.namespace, "in_flight": phases,
                "transfers": len(self.tasks), **self.counts}  # fmt: skip
