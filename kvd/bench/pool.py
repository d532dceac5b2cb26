"""Bandwidth of the KV storage pools against memcpy: `python -m kvd.bench.pool [--blocks N] [--repeats R]`.

Puts and then gets N blocks (default 64 of 1.5 MiB, one prefill's worth) in one batch call
each, through every backend in one run — local (LMDB), redis (a RedisServer it starts),
mooncake (a master it starts and one client: with unregistered buffers, one staging copy;
with a registered staging area, zero-copy; and through a second client that mounts no
memory, so every byte crosses the TCP transport) — and times a plain memcpy of the same bytes
(slice assignment per block) and the xxh3-128 digest every put and get computes. Each put
writes fresh keys (a put of a present key is a no-op); each get reads them back into
preallocated buffers and checks the bytes once, untimed. Figures are the median of R runs
after a warm-up; GB/s counts payload bytes once (1 GB = 1e9 bytes).

The Mooncake client listens on all interfaces (see kvd/cache/storage/servers.py), so the
benchmark first moves itself into a loopback-only network namespace; where the kernel
refuses, the Mooncake rows are skipped with the reason.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
from collections.abc import Callable
from pathlib import Path
from time import perf_counter

import xxhash

from kvd.cache.storage import servers
from kvd.cache.storage.base import ReadStatus, StoragePool, StorageUnavailable

MiB = 2**20


def median_seconds(fn: Callable[[int], None], repeats: int) -> float:
    """fn(run) for a warm-up run and `repeats` timed runs; fn gets the run's index."""
    fn(-1)
    times = []
    for run in range(repeats):
        t0 = perf_counter()
        fn(run)
        times.append(perf_counter() - t0)
    return statistics.median(times)


def blocks(n: int, size: int) -> tuple[memoryview, list[memoryview]]:
    area = memoryview(bytearray(os.urandom(n * size)))
    return area, [area[i * size : (i + 1) * size] for i in range(n)]


def bench_memcpy(src: list[memoryview], repeats: int) -> float:
    _, dst = blocks(len(src), src[0].nbytes)

    def copy(_run):
        for d, s in zip(dst, src):
            d[:] = s

    return median_seconds(copy, repeats)


def bench_digest(src: list[memoryview], repeats: int) -> float:
    return median_seconds(lambda _run: [xxhash.xxh3_128_digest(s) for s in src], repeats)


def bench_pool(pool: StoragePool, src: list[memoryview], dst: list[memoryview], repeats: int) -> tuple[float, float]:
    """(put seconds, get seconds), medians; every run's keys are removed after its get."""
    put_t, get_t = [], []
    for run in range(-1, repeats):  # -1: warm-up
        keys = [f"bench/{run}/{i}" for i in range(len(src))]
        t0 = perf_counter()
        ok = pool.put_many(keys, src)
        t1 = perf_counter()
        statuses = pool.get_many_into(keys, dst)
        t2 = perf_counter()
        if not all(ok) or any(s != ReadStatus.OK for s in statuses) or any(d != s for d, s in zip(dst, src)):
            raise RuntimeError(f"{type(pool).__name__}: run {run} did not round-trip ({sum(ok)} puts ok, {statuses})")
        pool.remove(keys)
        if run >= 0:
            put_t.append(t1 - t0)
            get_t.append(t2 - t1)
    return statistics.median(put_t), statistics.median(get_t)


def run_local(src, dst, repeats):
    from kvd.cache.storage.local import LocalPool

    total = sum(s.nbytes for s in src)
    shm = "/dev/shm" if os.path.isdir("/dev/shm") else None  # where the local pool lives by default
    with tempfile.TemporaryDirectory(prefix="kvd-bench-pool-", dir=shm) as d, LocalPool(Path(d), 4 * total) as pool:
        return bench_pool(pool, src, dst, repeats)


def run_redis(src, dst, repeats):
    from kvd.cache.storage.redis import RedisPool

    with servers.RedisServer() as server, RedisPool(server.url) as pool:
        return bench_pool(pool, src, dst, repeats)


def run_mooncake(src, dst, repeats, registered: bool, peer: bool = False):
    """One client mounting the segment; with `peer`, a second client that mounts none does
    the puts and gets, so every byte crosses the TCP transport (a decode instance reading
    what a prefill instance's segment holds)."""
    from kvd.cache.storage.mooncake import MooncakePool

    total = sum(s.nbytes for s in src)
    with servers.MooncakeServers() as mc:
        with MooncakePool(mc.master_address, segment_bytes=max(4 * total, 64 * MiB),
                          staging_bytes=total + 64 * MiB) as owner:  # fmt: skip
            if not peer:
                return _bench_mooncake(owner, src, dst, repeats, registered)
            with MooncakePool(mc.master_address, segment_bytes=0, staging_bytes=total + 64 * MiB) as client:
                return _bench_mooncake(client, src, dst, repeats, registered)


def _bench_mooncake(pool, src, dst, repeats, registered: bool):
    if registered:
        # Callers register their staging area once; here the source and destination blocks
        # are slices of two such areas.
        pool.register_buffer(_area(src))
        pool.register_buffer(_area(dst))
    return bench_pool(pool, src, dst, repeats)


def _area(views: list[memoryview]) -> memoryview:
    return memoryview(views[0].obj)  # every block is a slice of one bytearray (see blocks())


def machine() -> str:
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor())  # fmt: skip
    return f"{cpu}, {os.cpu_count()} cores, Linux {platform.release()}, Python {platform.python_version()}"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--blocks", type=int, default=64)
    ap.add_argument("--block-mib", type=float, default=1.5)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args(argv)
    try:
        servers.enter_private_netns()  # first, while this process has one thread
        netns_error = None
    except OSError as e:
        netns_error = str(e)
    size = int(args.block_mib * MiB)
    _, src = blocks(args.blocks, size)
    _, dst = blocks(args.blocks, size)
    nbytes = args.blocks * size
    print(f"# {args.blocks} blocks x {args.block_mib} MiB = {nbytes / MiB:.0f} MiB a batch, "
          f"median of {args.repeats} runs\n# {machine()}")  # fmt: skip
    memcpy = bench_memcpy(src, args.repeats)
    rows: list[tuple[str, float | None, float | None, str]] = [
        ("memcpy", memcpy, memcpy, ""),
        ("xxh3-128 digest", bench_digest(src, args.repeats), None, ""),
    ]
    backends = [("local (LMDB)", lambda: run_local(src, dst, args.repeats)),
                ("redis", lambda: run_redis(src, dst, args.repeats)),
                ("mooncake, staged", lambda: run_mooncake(src, dst, args.repeats, registered=False)),
                ("mooncake, registered", lambda: run_mooncake(src, dst, args.repeats, registered=True)),
                ("mooncake, peer over TCP", lambda: run_mooncake(src, dst, args.repeats, registered=True, peer=True))]  # fmt: skip
    for name, fn in backends:
        if name.startswith("mooncake") and netns_error:
            rows.append((name, None, None, f"skipped: no loopback-only network namespace ({netns_error})"))
            continue
        try:
            put_s, get_s = fn()
            rows.append((name, put_s, get_s, ""))
        except (OSError, RuntimeError, StorageUnavailable) as e:  # a backend that cannot start here: say why, go on
            rows.append((name, None, None, f"skipped: {e}".splitlines()[0]))
    print(f"{'':24}{'put GB/s':>10}{'get GB/s':>10}{'put/memcpy':>12}{'get/memcpy':>12}")
    for name, put_s, get_s, note in rows:
        cells = [f"{nbytes / t / 1e9:10.2f}" if t else f"{'-':>10}" for t in (put_s, get_s)]
        ratios = [f"{memcpy / t:12.2f}" if t else f"{'-':>12}" for t in (put_s, get_s)]
        print(f"{name:24}{''.join(cells)}{''.join(ratios)}  {note}".rstrip())


if __name__ == "__main__":
    main()
