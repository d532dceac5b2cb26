"""KVIndex: which instance holds which KV block, and in which tier, from their KV events.

    index.apply(name, batch) -> Applied  # OK, STALE (seen already) or GAP (resync from a snapshot)
    index.load(name, snapshot)           # an instance's whole state, as of snapshot.seq
    index.prefix_match(hashes)           # {instance: leading blocks it holds, in any tier}
    index.where(block_hash)              # {instance: tiers}
    index.layout(name)                   # (block_size, hash_algo) its hashes are made with

Pure: no sockets, no clock (kvd.route.subscriber feeds it). Per instance it keeps the epoch
and the last sequence number applied. A batch is applied only when its number follows
that one in the same epoch; an event batch numbered above it, a heartbeat numbered above
it (the batch before the heartbeat was lost) or another epoch (the instance restarted)
is a GAP: the caller loads a snapshot, after which batches up to its number are STALE.
An instance not yet loaded answers GAP to everything. Hashes are kvd's chained block
hashes, the bytes kvd.cache.hashing computes (kvd.kv_events says which).
"""

from __future__ import annotations

import enum

from kvd.kv_events import (
    TIERS,
    AllCleared,
    BlockRemoved,
    BlockStored,
    EventBatch,
    Snapshot,
    Tier,
)


class Applied(enum.IntEnum):
    OK = 0
    STALE = 1  # numbered at or below what was applied: dropped
    GAP = 2  # a batch is missing (or the instance restarted): load a snapshot


class _Instance:
    """What the index knows of one instance: its place in its event stream and its blocks."""

    __slots__ = ("epoch", "seq", "block_size", "hash_algo", "held")

    def __init__(self, snapshot: Snapshot) -> None:
        self.epoch = snapshot.epoch
        self.seq = snapshot.seq
        self.block_size = snapshot.block_size
        self.hash_algo = snapshot.hash_algo
        self.held: dict[Tier, set[bytes]] = {tier: set() for tier in TIERS}


class KVIndex:
    """block hash -> {instance: tiers}, and per instance the hashes of each tier."""

    def __init__(self) -> None:
        self._where: dict[bytes, dict[str, set[Tier]]] = {}
        self._instances: dict[str, _Instance] = {}

    # ---- queries -----------------------------------------------------------------------
    @property
    def instances(self) -> list[str]:
        return list(self._instances)

    def seq(self, name: str) -> int | None:
        """The last batch applied for `name` (None until its first snapshot)."""
        state = self._instances.get(name)
        return state.seq if state is not None else None

    def epoch(self, name: str) -> int | None:
        state = self._instances.get(name)
        return state.epoch if state is not None else None

    def layout(self, name: str) -> tuple[int, str] | None:
        """(block_size, hash_algo) of `name`'s hashes, from its snapshot (None before one)."""
        state = self._instances.get(name)
        return (state.block_size, state.hash_algo) if state is not None else None

    def hashes(self, name: str, tier: Tier) -> set[bytes]:
        """What `name` holds in `tier` (a copy)."""
        state = self._instances.get(name)
        return set(state.held[tier]) if state is not None else set()

    def where(self, block_hash: bytes) -> dict[str, frozenset[Tier]]:
        return {name: frozenset(tiers) for name, tiers in self._where.get(block_hash, {}).items()}

    def prefix_match(self, hashes: list[bytes], tiers: tuple[Tier, ...] = TIERS) -> dict[str, int]:
        """Per instance, how many leading blocks of a prompt (its chained hashes, in order) it
        holds in one of `tiers`; instances that hold none are left out."""
        out: dict[str, int] = {}
        alive: set[str] | None = None
        for i, h in enumerate(hashes):
            holders = {name for name, held in self._where.get(h, {}).items() if held.intersection(tiers)}
            alive = holders if alive is None else alive & holders
            if not alive:
                break
            for name in alive:
                out[name] = i + 1
        return out

    # ---- updates -----------------------------------------------------------------------
    def load(self, name: str, snapshot: Snapshot) -> None:
        """Replace everything known of `name` by its snapshot."""
        self.drop(name)
        state = self._instances[name] = _Instance(snapshot)
        for tier, hashes in ((t, getattr(snapshot, t)) for t in TIERS):
            for h in hashes:
                self._add(name, state, tier, h)

    def drop(self, name: str) -> None:
        """Forget `name` (it stopped, or is about to be reloaded)."""
        state = self._instances.pop(name, None)
        if state is None:
            return
        for tier in TIERS:
            for h in state.held[tier]:
                self._forget(name, tier, h)

    def apply(self, name: str, batch: EventBatch) -> Applied:
        state = self._instances.get(name)
        if state is None or batch.epoch != state.epoch:
            return Applied.GAP
        if not batch.events:  # a heartbeat repeats the last number sent
            return Applied.GAP if batch.seq > state.seq else Applied.OK
        if batch.seq <= state.seq:
            return Applied.STALE
        if batch.seq != state.seq + 1:
            return Applied.GAP
        for event in batch.events:
            if isinstance(event, BlockStored):
                for h in event.hashes:
                    self._add(name, state, event.tier, h)
            elif isinstance(event, BlockRemoved):
                for h in event.hashes:
                    self._remove(name, state, event.tier, h)
            elif isinstance(event, AllCleared):
                for tier in event.tiers:
                    for h in list(state.held[tier]):
                        self._remove(name, state, tier, h)
        state.seq = batch.seq
        return Applied.OK

    # ---- helpers -----------------------------------------------------------------------
    def _add(self, name: str, state: _Instance, tier: Tier, h: bytes) -> None:
        state.held[tier].add(h)
        self._where.setdefault(h, {}).setdefault(name, set()).add(tier)

    def _remove(self, name: str, state: _Instance, tier: Tier, h: bytes) -> None:
        state.held[tier].discard(h)
        self._forget(name, tier, h)

    def _forget(self, name: str, tier: Tier, h: bytes) -> None:
        holders = self._where.get(h)
        if holders is None or name not in holders:
            return
        holders[name].discard(tier)
        if not holders[name]:
            del holders[name]
            if not holders:
                del self._where[h]
