"""Benchmark of the distributed prefill group: `python -m kvd.bench.prefill_group [--quick] [--repeats N]`.

In one run, on SmolLM2 (float32, CPU, gloo on loopback): the prefill time of 1,000- and
4,000-token prompts for (sp, pp) = (1, 1) (one rank: the one-process baseline, same code
path), (2, 1) with each sync strategy, and (1, 2); per configuration the speedup over (1, 1)
and the scaling efficiency (speedup / ranks), the per-layer KV sync time, the bytes moved
(KV exchange + pipeline hidden states, each byte once) and the share of communication; and
per rank the weight memory (parameter bytes, and the process RSS) against one process.

Communication is reported two ways, because a rank's time inside a collective is not all
transfer: it also waits for the slowest peer (sequence chunks later in the prompt attend to
more keys) and, in a pipeline, for the stage before (the bubble).
- "waits": the raw time inside the KV exchange and the pipeline sends/receives, the
  slowest rank's share of the prefill;
- "transfer (est.)": per layer and round the KV exchange's time on the rank that arrived
  last (it waited for no one: what is left is the transfer), plus the pipeline bytes over
  the loopback gloo bandwidth measured at the start; the slowest rank's share.
Ranks split the machine's cores (threads = cores // ranks); on a machine with fewer cores
than ranks x threads they compete, and the efficiency column says so. Every group starts
first; then each of `--repeats` rounds runs every configuration in turn and the fastest
prefill counts, so on a shared machine all configurations meet the same bursts of load.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import socket
import statistics
from pathlib import Path
from time import perf_counter

import psutil
import torch

from kvd.bench.offline import machine_info, record
from kvd.distributed import ParallelConfig, PrefillGroup, PrefillResult
from kvd.worker.models import resolve_model

# (sp, pp, sync, threads per rank); None: the machine's cores split evenly among the ranks.
CONFIGS = [(1, 1, "-", 1), (1, 1, "-", None), (2, 1, "all_gather", None), (2, 1, "ring", None),
           (1, 2, "-", None)]  # fmt: skip
BASELINE = (1, 1, "-", 1)  # one process on one core: efficiency = its time / (time x ranks)
LENGTHS = (1000, 4000)
QUICK_LENGTHS = (1000,)


def prompt(n: int, vocab: int = 49152) -> list[int]:
    """Deterministic token ids (the time does not depend on which)."""
    return [100 + (i * 7919) % (vocab - 100) for i in range(n)]


# ---- loopback bandwidth: two gloo ranks, one send/recv pair ---------------------------------
def _bw_rank(rank: int, port: int, nbytes: int, repeats: int, out) -> None:
    import torch.distributed as dist

    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    store = dist.TCPStore("127.0.0.1", port, is_master=False)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=2)
    t = torch.ones(nbytes // 4)
    times = []
    for _ in range(repeats + 1):
        dist.barrier()
        t0 = perf_counter()
        if rank == 0:
            dist.send(t, 1)
        else:
            dist.recv(t, 0)
        times.append(perf_counter() - t0)
    if rank == 1:
        out.put(nbytes / statistics.median(times[1:]))
    dist.destroy_process_group()


def loopback_bandwidth(nbytes: int = 8 << 20, repeats: int = 10) -> float:
    """Bytes per second of one gloo send/recv over 127.0.0.1 (the median of `repeats`)."""
    import torch.distributed as dist
    import torch.multiprocessing as mp

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    port = sock.getsockname()[1]
    store = dist.TCPStore("127.0.0.1", port, 2, is_master=True, wait_for_workers=False,  # noqa: F841 - kept alive
                          master_listen_fd=sock.detach(), use_libuv=True)  # fmt: skip
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_bw_rank, args=(r, port, nbytes, repeats, out), daemon=True) for r in range(2)]
    for p in procs:
        p.start()
    try:
        return out.get(timeout=120)
    finally:
        for p in procs:
            p.join(10)
            if p.is_alive():
                p.kill()
                p.join()


# ---- one configuration -------------------------------------------------------------------------
def summarize(result: PrefillResult, sp: int, bandwidth: float) -> dict[str, float]:
    """The figures of one prefill; with sp == 1 the "sync" is a local append, not communication."""
    stats = result.stats
    wall = result.wall_s
    kv_transfer = []  # per rank: the KV exchange's time on whichever rank arrived last, per layer
    for s in stats:
        stage = s.rank // sp
        peers = stats[stage * sp : (stage + 1) * sp]
        kv_transfer.append(sum(min(p.layer_sync_s[i] for p in peers) for i in range(len(s.layer_sync_s))))
    sync = [s.sync_s if sp > 1 else 0.0 for s in stats]
    kv_transfer = kv_transfer if sp > 1 else [0.0] * len(stats)
    layers = sum(len(s.layer_sync_s) for s in stats)
    return {
        "wall_s": wall,
        "sync_s": max(sync),
        "layer_sync_ms": 1e3 * sum(sync) / layers,
        "layer_transfer_ms": 1e3 * sum(kv_transfer) / layers,
        "p2p_s": max(s.p2p_s for s in stats),
        "bytes": sum(s.sync_bytes + s.p2p_bytes for s in stats),
        "waits": max(y + s.p2p_s for y, s in zip(sync, stats)) / wall,
        "transfer": max(k + s.p2p_bytes / bandwidth for k, s in zip(kv_transfer, stats)) / wall,
    }


def bench(model_dir: Path, lengths, repeats: int, bandwidth: float) -> dict:
    """Every configuration's figures. All groups start first, then each repeat runs every
    configuration in turn, and the fastest prefill of each counts: on a shared machine every
    configuration meets the same bursts of other load."""
    with contextlib.ExitStack() as stack:
        groups, start_s = {}, {}
        for sp, pp, _, threads in CONFIGS:
            if (sp, pp, threads) in groups:
                continue  # the sync strategy is chosen per prefill: ring and all_gather share a group
            t0 = perf_counter()
            cfg = ParallelConfig(sp=sp, pp=pp, collective_timeout_s=300)
            group = stack.enter_context(PrefillGroup(model_dir, cfg, max_tokens=max(lengths), threads_per_rank=threads))
            start_s[(sp, pp, threads)] = perf_counter() - t0
            group.prefill(prompt(64))  # warm-up: first-call allocations and thread pools
            groups[(sp, pp, threads)] = group
        best: dict[tuple, dict[int, PrefillResult]] = {c: {} for c in CONFIGS}
        for _ in range(repeats):
            for n in lengths:
                for sp, pp, sync, threads in CONFIGS:
                    r = groups[(sp, pp, threads)].prefill(prompt(n), sync=sync if sp > 1 else None)
                    kept = best[(sp, pp, sync, threads)].get(n)
                    if kept is None or r.wall_s < kept.wall_s:
                        best[(sp, pp, sync, threads)][n] = r
        results = {}
        for sp, pp, sync, threads in CONFIGS:
            group = groups[(sp, pp, threads)]
            rows = {n: summarize(r, sp, bandwidth) for n, r in best[(sp, pp, sync, threads)].items()}
            memory = [
                (r.rank, r.first_layer, r.end_layer, r.weight_bytes, psutil.Process(r.pid).memory_info().rss)
                for r in group.ranks
            ]  # fmt: skip
            results[(sp, pp, sync, threads)] = (group.threads, start_s[(sp, pp, threads)], rows, memory)
        return results


# ---- report ------------------------------------------------------------------------------------
def render(results, lengths, bandwidth: float, load: tuple[float, float]) -> str:
    base = {n: results[BASELINE][2][n]["wall_s"] for n in lengths}
    lines = [
        "| sp | pp | sync | threads/rank | tokens | prefill s | vs 1 core | efficiency | KV sync s (max rank) "
        "| per-layer sync ms (transfer est.) | pipeline waits s | MB moved | comm waits | comm transfer (est.) |",
        "|--:|--:|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for (sp, pp, sync, _), (threads, _, rows, _) in results.items():
        for n in lengths:
            r = rows[n]
            speedup = base[n] / r["wall_s"]
            cores = sp * pp * threads
            kv = "-" if sp == 1 else f"{r['sync_s']:.3f}"
            per_layer = "-" if sp == 1 else f"{r['layer_sync_ms']:.2f} ({r['layer_transfer_ms']:.2f})"
            lines.append(
                f"| {sp} | {pp} | {sync} | {threads} | {n} | {r['wall_s']:.2f} | {speedup:.2f}x "
                f"| {speedup / cores:.0%} | {kv} | {per_layer} | {r['p2p_s']:.3f} "
                f"| {r['bytes'] / 2**20:.1f} | {r['waits']:.1%} | {r['transfer']:.1%} |"
            )
    one = max(m[3] for m in results[BASELINE][3])
    lines += ["", "| sp | pp | rank | layers | weights MiB | x one process | RSS MiB | start s |",
              "|--:|--:|--:|---|--:|--:|--:|--:|"]  # fmt: skip
    for (sp, pp, sync, threads), (_, start_s, _, memory) in results.items():
        if sync == "ring" or (sp, pp, threads) == (1, 1, None):
            continue  # the same shapes as rows above
        for rank, lo, hi, weights, rss in memory:
            lines.append(f"| {sp} | {pp} | {rank} | {lo}-{hi - 1} | {weights / 2**20:.0f} | {weights / one:.2f}x "
                         f"| {rss / 2**20:.0f} | {start_s:.1f} |")  # fmt: skip
    lines += [
        "",
        "vs 1 core: the speedup over one process on one thread; efficiency: that speedup over the cores used"
        " (ranks x threads). Comm waits: the slowest rank's time in the KV exchange and pipeline sends/receives"
        " (peer skew and the pipeline bubble included); transfer (est.): the exchange's time on the last-arriving"
        " rank plus pipeline bytes / loopback bandwidth.",
        f"Loopback gloo bandwidth (one send/recv, 8 MiB): {bandwidth / 1e9:.2f} GB/s. "
        f"Load average (1 min) before / after: {load[0]:.2f} / {load[1]:.2f} on {os.cpu_count()} cores.",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m kvd.bench.prefill_group", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help=f"only {QUICK_LENGTHS} tokens")
    p.add_argument("--repeats", type=int, default=2, help="rounds over every configuration; the fastest counts")
    p.add_argument("--record", type=Path, default=None, help="append the tables to this markdown file")
    args = p.parse_args(argv)
    lengths = QUICK_LENGTHS if args.quick else LENGTHS
    model_dir = resolve_model(None)
    load_before = os.getloadavg()[0]
    bandwidth = loopback_bandwidth()
    results = bench(model_dir, lengths, args.repeats, bandwidth)
    info = machine_info()
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    body = render(results, lengths, bandwidth, (load_before, os.getloadavg()[0]))
    body += f"\n\nMachine: {', '.join(f'{k} {v}' for k, v in info.items())}."
    print(f"# Distributed prefill group, {now}\n\n{body}")
    if args.record:
        record(args.record, f"Distributed prefill group (CPU, gloo), {now}", body)


if __name__ == "__main__":
    main()
