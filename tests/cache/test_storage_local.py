"""LocalPool (LMDB): round trips into buffers, content addressing, digest checks, eviction, processes."""

from __future__ import annotations

import multiprocessing
import os

import lmdb
import pytest

from kvd.cache.storage.base import HEADER_BYTES, ReadStatus
from kvd.cache.storage.local import LocalPool


def payload(i: int, n: int = 4096) -> bytes:
    return bytes((i * 31 + j) % 251 for j in range(n))


def test_round_trip_into_preallocated_buffers(tmp_path):
    with LocalPool(tmp_path / "pool", capacity_bytes=2**20) as pool:
        keys = [f"ns/{i:032x}" for i in range(8)]
        assert pool.put_many(keys, [payload(i) for i in range(8)]) == [True] * 8
        bufs = [memoryview(bytearray(4096)) for _ in keys]
        assert pool.get_many_into(keys, bufs) == [ReadStatus.OK] * 8
        assert all(bytes(b) == payload(i) for i, b in enumerate(bufs))
        assert pool.exists(keys + ["ns/nope"]) == [True] * 8 + [False]


def test_already_exists_is_success_and_stores_once(tmp_path):
    with LocalPool(tmp_path / "pool", capacity_bytes=2**20) as pool:
        assert pool.put_many(["k"], [payload(1)]) == [True]
        before = pool.stats()
        assert pool.put_many(["k", "k"], [payload(1), payload(1)]) == [True, True]
        assert pool.stats() == before


def test_missing_short_and_corrupt_reads_fail(tmp_path):
    with LocalPool(tmp_path / "pool", capacity_bytes=2**20) as pool:
        pool.put_many(["good", "bad", "short"], [payload(1), payload(2), payload(3)])
        # Flip one payload byte and truncate another object behind the pool's back.
        with pool.env.begin(write=True) as txn:
            obj = bytearray(txn.get(b"bad", db=pool._objects))
            obj[HEADER_BYTES + 100] ^= 0xFF
            txn.put(b"bad", bytes(obj), db=pool._objects)
            txn.put(b"short", txn.get(b"short", db=pool._objects)[:-10], db=pool._objects)
        bufs = [memoryview(bytearray(4096)) for _ in range(4)]
        statuses = pool.get_many_into(["good", "bad", "short", "missing"], bufs)
        assert statuses == [ReadStatus.OK, ReadStatus.CORRUPT, ReadStatus.CORRUPT, ReadStatus.MISSING]
        assert bytes(bufs[1]) == bytes(4096)  # a failed read leaves the buffer untouched
        assert pool.get_many_into(["good"], [memoryview(bytearray(100))]) == [ReadStatus.SIZE_MISMATCH]


def test_bounded_with_oldest_first_eviction(tmp_path):
    obj = 4096 + HEADER_BYTES
    with LocalPool(tmp_path / "pool", capacity_bytes=10 * obj) as pool:
        for i in range(25):
            assert pool.put_many([f"k{i}"], [payload(i)]) == [True]
            assert pool.stats()["bytes"] <= 10 * obj
        assert pool.exists([f"k{i}" for i in range(25)]) == [False] * 15 + [True] * 10
        assert pool.num_evictions == 15
        assert pool.remove(["k24", "k0"]) == 1 and pool.stats()["objects"] == 9


def _writer(path: str, start: int) -> None:
    pool = LocalPool(path, capacity_bytes=2**22)
    for rnd in range(20):
        keys = [f"shared/{i}" for i in range(start, start + 10)]
        assert pool.put_many(keys, [payload(i) for i in range(start, start + 10)]) == [True] * 10
    pool.close()


def test_several_processes_share_one_pool(tmp_path):
    path = str(tmp_path / "pool")
    LocalPool(path, capacity_bytes=2**22).close()
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_writer, args=(path, s)) for s in (0, 5, 5)]  # overlapping, identical content
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    with LocalPool(path, capacity_bytes=2**22) as pool:
        keys = [f"shared/{i}" for i in range(15)]
        bufs = [memoryview(bytearray(4096)) for _ in keys]
        assert pool.get_many_into(keys, bufs) == [ReadStatus.OK] * 15
        assert pool.stats()["objects"] == 15


def test_closed_pool_raises_unavailable(tmp_path):
    from kvd.cache.storage.base import StorageUnavailable

    pool = LocalPool(tmp_path / "pool", capacity_bytes=2**20)
    pool.close()
    with pytest.raises(StorageUnavailable):
        pool.exists(["k"])
    assert os.path.isdir(tmp_path / "pool") and lmdb.version()
