"""MooncakePool against a real mooncake_master, no mocks.

The Mooncake client listens on all interfaces whatever MC_TCP_BIND_ADDRESS says (see
servers.py), so every scenario that runs a client runs in a forked child inside a private
network namespace holding only loopback: the master, the clients and their listeners are
reachable from nowhere else. The child stops its servers by PID on the way out, and they
carry PR_SET_PDEATHSIG, so a child killed on timeout takes them along.
"""

from __future__ import annotations

import importlib.util
import os
import threading
import time

import pytest

from isolation import run_isolated
from kvd.cache.storage import servers
from kvd.cache.storage.base import HEADER_BYTES, ReadStatus, StorageUnavailable, frame

pytestmark = pytest.mark.skipif(importlib.util.find_spec("mooncake") is None,
                                reason="mooncake-transfer-engine-non-cuda not installed")  # fmt: skip

def payload(i: int, n: int = 16384) -> bytes:
    return bytes((i * 13 + j) % 251 for j in range(256)) * (n // 256)


def pool(mc, **kw):
    from kvd.cache.storage.mooncake import MooncakePool

    kw.setdefault("segment_bytes", 64 * 2**20)
    return MooncakePool(mc.master_address, metadata_server=mc.metadata_server, **kw)


def raw_put(p, items: dict[str, bytes]) -> list[int]:
    """Store bytes as they are, behind the pool's back: no framing, no checks."""
    import ctypes

    area = bytearray(b"".join(items.values()))
    p.register_buffer(memoryview(area))
    base, ptrs = ctypes.addressof(ctypes.c_char.from_buffer(area)), []
    for v in items.values():
        ptrs.append(base)
        base += len(v)
    return p._store.batch_put_from(list(items), ptrs, [len(v) for v in items.values()])


def bounded(fn, limit_s: float):
    """fn()'s result, or its StorageUnavailable; either within limit_s seconds."""
    t0 = time.monotonic()
    try:
        out = fn()
    except StorageUnavailable as e:
        out = e
    assert time.monotonic() - t0 < limit_s, f"took {time.monotonic() - t0:.1f}s"
    return out


# ---- servers, host network namespace (no client here) ------------------------------------
@pytest.mark.timeout(60)
def test_servers_listen_on_loopback_only_and_stop_by_pid():
    with servers.MooncakeServers(metadata="http") as mc:
        assert mc.metadata_server.startswith("http://127.0.0.1:")
        pids = mc.pids
        for pid in pids:
            addrs = servers.listening_addresses(pid)
            assert addrs and all(host == "127.0.0.1" for host, _ in addrs), (pid, addrs)
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)


# ---- the pool, each scenario in a private network namespace ------------------------------
@pytest.mark.timeout(120)
def test_round_trip_of_many_blocks_staged_and_registered():
    def scenario():
        keys = [f"ns/{i:032x}" for i in range(96)]
        data = [payload(i) for i in range(96)]
        with servers.MooncakeServers() as mc, pool(mc, staging_bytes=256 * 2**10) as p:  # several chunks a batch
            assert p.put_many(keys, data) == [True] * 96
            bufs = [memoryview(bytearray(16384)) for _ in keys]
            assert p.get_many_into(keys, bufs) == [ReadStatus.OK] * 96
            assert all(bytes(b) == d for b, d in zip(bufs, data))
            # A registered staging area: puts from and reads into its slices move no copy.
            area = memoryview(bytearray(64 * 16384))
            p.register_buffer(area)
            for i in range(32):
                area[i * 16384 : (i + 1) * 16384] = payload(1000 + i)
            slices = [area[i * 16384 : (i + 1) * 16384] for i in range(64)]
            assert p.put_many([f"reg/{i}" for i in range(32)], slices[:32]) == [True] * 32
            assert p.get_many_into([f"reg/{i}" for i in range(32)], slices[32:]) == [ReadStatus.OK] * 32
            assert all(bytes(slices[32 + i]) == payload(1000 + i) for i in range(32))
            assert p.get_many_into(keys[:32], slices[32:]) == [ReadStatus.OK] * 32  # staged-written, read in place
            assert all(bytes(slices[32 + i]) == data[i] for i in range(32))
            assert p.exists(keys[:2] + ["ns/none"]) == [True, True, False]

    run_isolated(scenario)


@pytest.mark.timeout(120)
def test_http_metadata_server_round_trip():
    def scenario():
        with servers.MooncakeServers(metadata="http") as mc, pool(mc) as p:
            assert p.put_many(["a", "b"], [payload(1), payload(2)]) == [True, True]
            bufs = [memoryview(bytearray(16384)) for _ in range(2)]
            assert p.get_many_into(["a", "b"], bufs) == [ReadStatus.OK] * 2 and bytes(bufs[1]) == payload(2)

    run_isolated(scenario)


@pytest.mark.timeout(120)
def test_already_exists_is_success_for_two_writers_at_once():
    def scenario():
        keys = [f"shared/{i}" for i in range(64)]
        with servers.MooncakeServers() as mc, pool(mc) as a, pool(mc) as b:
            results, go = {}, threading.Barrier(2)

            def write(name, p):
                go.wait()
                for _ in range(5):
                    results.setdefault(name, []).extend(p.put_many(keys, [payload(i) for i in range(64)]))

            threads = [threading.Thread(target=write, args=(n, p)) for n, p in (("a", a), ("b", b))]
            for t in threads:
                t.start()
            for t in threads:
                t.join(60)
            assert results["a"] == [True] * 320 and results["b"] == [True] * 320
            assert a.put_many(keys[:2] * 2, [payload(0), payload(1)] * 2) == [True] * 4  # repeats in one batch
            bufs = [memoryview(bytearray(16384)) for _ in keys]
            assert b.get_many_into(keys, bufs) == [ReadStatus.OK] * 64
            assert all(bytes(buf) == payload(i) for i, buf in enumerate(bufs))

    run_isolated(scenario)


@pytest.mark.timeout(120)
def test_missing_corrupt_and_size_mismatch_reads_fail():
    def scenario():
        with servers.MooncakeServers() as mc, pool(mc) as p:
            good = frame(payload(1))
            flipped = bytearray(frame(payload(2)))
            flipped[HEADER_BYTES + 7] ^= 1
            foreign = b"X" * len(good)  # right size, not a frame
            assert raw_put(p, {"flipped": bytes(flipped), "foreign": foreign, "short": good[:-10], "good": good,
                               "other_size": frame(payload(3, n=8192))}) == [0] * 5  # fmt: skip
            keys = ["good", "flipped", "foreign", "short", "other_size", "missing"]
            bufs = [memoryview(bytearray(16384)) for _ in keys]
            assert p.get_many_into(keys, bufs) == [ReadStatus.OK, ReadStatus.CORRUPT, ReadStatus.CORRUPT,
                                                   ReadStatus.CORRUPT, ReadStatus.SIZE_MISMATCH,
                                                   ReadStatus.MISSING]  # fmt: skip
            assert bytes(bufs[0]) == payload(1)
            assert bytes(bufs[1]) == bytes(16384)  # staged read: a failed read leaves the buffer alone
            assert p.get_many_into(["good"], [memoryview(bytearray(100))]) == [ReadStatus.SIZE_MISMATCH]
            assert p.get_many_into(["good"], [memoryview(bytearray(20000))]) == [ReadStatus.SIZE_MISMATCH]
            # Overwrite a pool-written object after remove: the digest check still catches it.
            assert p.put_many(["k"], [payload(4)]) == [True] and p.remove(["k"]) == 1
            evil = bytearray(frame(payload(4)))
            evil[-1] ^= 0xFF
            assert raw_put(p, {"k": bytes(evil)}) == [0]
            area = memoryview(bytearray(16384))
            p.register_buffer(area)  # the in-place check of a zero-copy read
            assert p.get_many_into(["k", "good"], [area, memoryview(bytearray(16384))]) == [ReadStatus.CORRUPT,
                                                                                            ReadStatus.OK]  # fmt: skip

    run_isolated(scenario)


@pytest.mark.timeout(120)
def test_remove_counts_present_keys_and_removes_leased_ones():
    def scenario():
        with servers.MooncakeServers(lease_ttl_ms=60000) as mc, pool(mc) as p:
            assert p.put_many(["a", "b", "c"], [payload(1), payload(2), payload(3)]) == [True] * 3
            assert p.get_many_into(["a", "b"], [memoryview(bytearray(16384)) for _ in range(2)]) == [ReadStatus.OK] * 2
            assert p._store.batch_remove(["a"], False) == [-706]  # the read's lease: OBJECT_HAS_LEASE
            assert p.remove(["a", "b", "b", "c", "none"]) == 3
            assert p.exists(["a", "b", "c"]) == [False] * 3
            assert p.remove(["a"]) == 0
            assert p.put_many(["a"], [payload(9)]) == [True]  # a removed key can be written again

    run_isolated(scenario)


@pytest.mark.timeout(120)
def test_pool_too_small_fails_puts_not_the_process():
    def scenario():
        n = 2**20
        with servers.MooncakeServers() as mc, pool(mc, segment_bytes=16 * n, staging_bytes=48 * n) as p:
            keys = [f"big/{i}" for i in range(40)]
            ok = p.put_many(keys, [payload(i, n=n) for i in range(40)])
            assert 0 < sum(ok) < 40, ok
            stored = [k for k, good in zip(keys, ok) if good]
            bufs = [memoryview(bytearray(n)) for _ in stored]
            statuses = p.get_many_into(stored, bufs)
            assert all(s in (ReadStatus.OK, ReadStatus.MISSING) for s in statuses)  # MISSING: evicted since
            assert all(bytes(b) == payload(keys.index(k), n=n) for k, b, s in zip(stored, bufs, statuses) if s == 0)
            assert p.put_many(["small"], [payload(1)]) in ([True], [False])  # still answers

    run_isolated(scenario)


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_master_killed_mid_use_is_unavailable_within_bounded_time():
    def scenario():
        with servers.MooncakeServers() as mc:
            p = pool(mc)
            assert p.put_many(["k"], [payload(0)]) == [True]
            mc.kill()
            buf = [memoryview(bytearray(16384))]
            for fn in (lambda: p.put_many(["k2"], [payload(1)]), lambda: p.get_many_into(["k"], buf),
                       lambda: p.exists(["k"]), lambda: p.remove(["k"])):  # fmt: skip
                out = bounded(fn, 15)
                assert isinstance(out, StorageUnavailable) or out in ([False], [ReadStatus.MISSING], 0), out
            bounded(p.close, 15)
            with pytest.raises(StorageUnavailable):
                p.exists(["k"])  # closed
            assert isinstance(bounded(lambda: pool(mc), 10), StorageUnavailable)  # master gone: no setup wait

    run_isolated(scenario)


@pytest.mark.timeout(150)
def test_partial_blocks_expire_and_the_object_count_stays_bounded_over_a_long_run():
    # FAILURE_MODES #16: Mooncake objects carry no TTL. The pool removes the one-shot
    # partial blocks it wrote once their TTL has passed (a reader within the TTL still gets
    # them), and the master's eviction bounds the full blocks kept for prefix reuse: over a
    # run that writes several times the segment, the key count and the bytes stay bounded.
    def scenario():
        n, segment = 2**18, 16 * 2**20  # 256 KiB objects, 64 of them fill the segment
        with servers.MooncakeServers() as mc, pool(mc, partial_ttl_s=1.0) as p:  # room to spare: no eviction
            keys = ["ns/full-0", "ns/full-1", "ns/0123:partial:7"]
            assert p.put_many(keys, [payload(i) for i in range(3)]) == [True] * 3
            time.sleep(0.5)
            assert p.put_many(["ns/full-2"], [payload(3)]) == [True] and p.exists(keys) == [True] * 3
            time.sleep(0.6)
            assert p.put_many(["ns/full-3"], [payload(4)]) == [True]  # past the TTL: this call removes it
            assert p.exists(keys) == [True, True, False]
            assert mc.master.metrics()["master_key_count"] == 4
        with (servers.MooncakeServers(eviction_high_watermark=0.7) as mc,
              pool(mc, segment_bytes=segment, staging_bytes=4 * n, partial_ttl_s=1.0) as p):  # fmt: skip
            partials, written, counts = [], 0, []
            for r in range(80):  # 80 handoffs x 4 objects: 80 MiB through a 16 MiB segment
                keys = [f"ns/{r:08x}{i:024x}" for i in range(3)] + [f"ns/{r:032x}:partial:7"]
                ok = p.put_many(keys, [payload(4 * r + i, n=n) for i in range(4)])
                written += sum(ok)
                if ok[-1]:
                    partials.append(keys[-1])
                    buf = memoryview(bytearray(n))  # the decode side, within the TTL: present and whole
                    assert p.get_many_into(keys[-1:], [buf]) == [ReadStatus.OK] and bytes(buf) == payload(4 * r + 3, n=n)
                m = mc.master.metrics()
                counts.append(m["master_key_count"])
                assert m["master_allocated_bytes"] <= m["master_total_capacity_bytes"] == segment
                time.sleep(0.04)
            assert written >= 200, written  # eviction kept making room: puts did not wedge
            assert max(counts) <= segment // n, counts  # bounded by what the segment holds
            time.sleep(1.1)
            assert p.put_many(["ns/after"], [payload(0)]) == [True]  # a later call: the TTL's removals run
            assert partials and p.exists(partials) == [False] * len(partials)
            assert mc.master.metrics()["master_key_count"] <= segment // n

    run_isolated(scenario, timeout_s=140)
