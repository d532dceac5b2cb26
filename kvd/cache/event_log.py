"""KVEventLog: the KV events of one instance not yet published, and the state they describe.

The block pool, the KV cache manager and the scheduler record here where a block's state
changes: a full block indexed in the prefix cache (device, stored) or evicted from it
(device, removed), a request's computed blocks swapped to host slots (host, stored) and
back or dropped (host, removed), blocks written to the storage pool (pool, stored). The
daemon's publisher (`kvd.daemon.kv_events`) takes the pending events after each step and
sends them as one batch. Pure bookkeeping: no I/O, no clock.

The log also keeps, per tier, the set of hashes its events describe, so a snapshot is
exactly the state a subscriber reaches by applying every event so far. The device set
mirrors the pool's hash index (`KVCacheManager.check_integrity` compares them). Host slots
may hold one hash for several swapped requests (a shared prefix): the host tier counts
them and reports a hash stored on its first holder and removed after its last. The pool
tier is a bounded record of what this instance wrote (the pool evicts without telling):
past `pool_capacity` hashes the oldest is forgotten, with a removed event.
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from collections.abc import Sequence

from kvd.kv_events import (
    DEVICE,
    HOST,
    POOL,
    AllCleared,
    BlockRemoved,
    BlockStored,
    KVEvent,
    Tier,
)

POOL_CAPACITY = 1 << 16  # pool-tier hashes remembered (1 MiB of xxh3-128 digests)


class KVEventLog:
    """Pending events plus the per-tier hash sets they lead to."""

    def __init__(self, block_size: int, pool_capacity: int = POOL_CAPACITY) -> None:
        self.block_size = block_size
        self.pool_capacity = pool_capacity
        self.device: set[bytes] = set()
        self.host: Counter[bytes] = Counter()
        self.pool: OrderedDict[bytes, None] = OrderedDict()
        self._pending: list[KVEvent] = []
        self._removed: list[bytes] | None = None  # the hashes of a trailing BlockRemoved, to extend in place
        self._removed_tier: Tier | None = None

    # ---- what the cache records ------------------------------------------------------
    def stored(self, tier: Tier, chain: Sequence[bytes], new: Sequence[bool], parent: bytes | None = None) -> None:
        """`chain[i]` is now held in `tier` where `new[i]`: consecutive blocks of one sequence,
        in order, `chain[0]` following `parent` (None: a sequence's first block). Each run of
        new blocks is one BlockStored."""
        run: list[bytes] = []
        for i, (h, is_new) in enumerate(zip(chain, new)):
            if is_new:
                if not run:
                    parent = chain[i - 1] if i else parent
                run.append(h)
            elif run:
                self._stored(tier, run, parent)
                run = []
        if run:
            self._stored(tier, run, parent)

    def removed(self, tier: Tier, block_hash: bytes) -> None:
        if tier == DEVICE:
            self.device.discard(block_hash)
        if self._removed is None or self._removed_tier != tier:
            self._removed, self._removed_tier = [], tier
            self._pending.append(BlockRemoved(tier, self._removed))  # its list grows until another event
        self._removed.append(block_hash)

    def host_in(self, hashes: Sequence[bytes]) -> None:
        """A request's computed blocks went to host slots."""
        new = [self.host[h] == 0 for h in hashes]
        self.host.update(hashes)
        self.stored(HOST, hashes, new)

    def host_out(self, hashes: Sequence[bytes]) -> None:
        """A swapped request's host slots were freed (it resumed, or ended)."""
        for h in hashes:
            self.host[h] -= 1
            if self.host[h] <= 0:
                del self.host[h]
                self.removed(HOST, h)

    def pool_written(self, hashes: Sequence[bytes]) -> None:
        """Full blocks of one sequence (in chain order, from its first) were written to the pool."""
        new = []
        for h in hashes:
            new.append(h not in self.pool)
            self.pool[h] = None
            self.pool.move_to_end(h)
        self.stored(POOL, hashes, new)
        while len(self.pool) > self.pool_capacity:
            old, _ = self.pool.popitem(last=False)
            self.removed(POOL, old)

    def cleared(self) -> None:
        """The worker's KV cache is gone (a fresh engine): device and host tiers are empty."""
        self.device.clear()
        self.host.clear()
        self._append(AllCleared([DEVICE, HOST]))

    # ---- what the publisher takes ------------------------------------------------------
    @property
    def num_pending(self) -> int:
        return len(self._pending)

    def take(self) -> list[KVEvent]:
        """The pending events, in order; the log starts a new list."""
        out, self._pending = self._pending, []
        self._removed = None
        return out

    def tiers(self) -> dict[Tier, list[bytes]]:
        """Every hash held, per tier (what a snapshot carries)."""
        return {DEVICE: list(self.device), HOST: list(self.host), POOL: list(self.pool)}

    # ---- helpers -----------------------------------------------------------------------
    def _stored(self, tier: Tier, run: list[bytes], parent: bytes | None) -> None:
        if tier == DEVICE:
            self.device.update(run)
        self._append(BlockStored(tier, run, parent, self.block_size))

    def _append(self, event: KVEvent) -> None:
        self._removed = None
        self._pending.append(event)
