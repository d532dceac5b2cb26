"""KVIndex: batches applied in order, gaps, stale batches, restarts and snapshots."""

from __future__ import annotations

import msgspec

from kvd.kv_events import AllCleared, BlockRemoved, BlockStored, EventBatch, Load, Snapshot, batch_decoder, encoder
from kvd.route.index import Applied, KVIndex

H = [bytes([i]) * 16 for i in range(8)]


def snap(seq=0, epoch=1, device=(), host=(), pool=()) -> Snapshot:
    return Snapshot("i", epoch, seq, 4, "xxh3_128", list(device), list(host), list(pool))


def batch(seq, *events, epoch=1) -> EventBatch:
    return EventBatch("i", epoch, seq, 0.0, list(events))


def test_batches_in_order_then_prefix_match():
    idx = KVIndex()
    assert idx.apply("a", batch(1, BlockStored("device", H[:2], None, 4))) == Applied.GAP  # not loaded yet
    idx.load("a", snap())
    idx.load("b", snap(device=H[:1]))
    assert idx.apply("a", batch(1, BlockStored("device", H[:3], None, 4))) == Applied.OK
    assert idx.apply("a", batch(2, BlockStored("pool", H[3:4], H[2], 4), BlockRemoved("device", [H[1]]))) == Applied.OK
    assert idx.where(H[0]) == {"a": {"device"}, "b": {"device"}}
    assert idx.prefix_match(H[:4]) == {"a": 1, "b": 1}  # a lost block 1 on the device
    assert idx.prefix_match([H[0], H[2], H[3]]) == {"a": 3, "b": 1}
    assert idx.prefix_match([H[0], H[2], H[3]], tiers=("device",)) == {"a": 2, "b": 1}
    assert idx.apply("a", batch(3, AllCleared(["device", "host"]))) == Applied.OK
    assert idx.hashes("a", "device") == set() and idx.hashes("a", "pool") == {H[3]}
    assert idx.where(H[0]) == {"b": {"device"}}


def test_gaps_stale_batches_heartbeats_and_restarts():
    idx = KVIndex()
    idx.load("a", snap(seq=5, device=H[:2]))
    assert idx.apply("a", batch(4, BlockRemoved("device", H[:2]))) == Applied.STALE  # in the snapshot already
    assert idx.apply("a", batch(5)) == Applied.OK  # a heartbeat repeating the last number
    assert idx.apply("a", batch(7, BlockStored("device", H[2:3], H[1], 4))) == Applied.GAP  # 6 was lost
    assert idx.apply("a", batch(6)) == Applied.GAP  # a heartbeat after a lost batch
    assert idx.apply("a", batch(6, BlockStored("device", H[2:3], None, 4), epoch=2)) == Applied.GAP  # restarted
    assert idx.seq("a") == 5 and idx.hashes("a", "device") == set(H[:2])
    idx.load("a", snap(seq=6, epoch=2, host=H[4:5]))
    assert idx.hashes("a", "device") == set() and idx.where(H[4]) == {"a": {"host"}}
    idx.drop("a")
    assert idx.instances == [] and idx.where(H[4]) == {}


def test_a_load_without_cached_blocks_reads_as_none_cached():
    """An instance of the version before `Load.cached_blocks` sends four fields: a router reads
    them with 0 cached-only blocks (its blocks short then count the empty ones alone)."""
    old = msgspec.msgpack.encode(["batch", "i", 1, 0, 0.0, [], [2, 3, 10, 64]])
    assert batch_decoder().decode(old).load == Load(2, 3, 10, 64, 0)
    new = batch_decoder().decode(encoder().encode(EventBatch("i", 1, 0, 0.0, [], Load(2, 3, 10, 64, 7))))
    assert new.load.cached_blocks == 7
