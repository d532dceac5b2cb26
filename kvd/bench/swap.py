"""Benchmark of swap_cache_layout: `python -m kvd.bench.swap [--quick] [--no-record] [--cuda-only] [--record PATH]`.

Moves n blocks of SmolLM2's KV geometry (30 layers, block 16, 3 KV heads, head dim 64,
float32: 737 KB a block across layers) between the worker layout and the block-major
host layout, both directions, with contiguous and with scattered host slots, and times
in one run: the native op, the pure-torch reference (one gather/scatter per layer), the
naive per-block per-layer copy loop, and a plain memory copy of the same number of bytes
(one contiguous `copy_`, torch's parallel memcpy) — the bound. Where torch has CUDA, the
same on the GPU (caches on the device, the host side in pinned memory; more blocks, so
that a copy runs well past launch overheads) against one cudaMemcpy of the same bytes
between pinned host memory and the device, in its own section. Each figure is the median
of repeated runs after a warm-up; bandwidth counts the bytes moved once.
"""

from __future__ import annotations

import argparse
import datetime
import statistics
from pathlib import Path
from time import perf_counter

import torch

from kvd import ops
from kvd.bench.offline import machine_info, machine_summary, record

LAYERS, BLOCK, KV_HEADS, HEAD_DIM = 30, 16, 3, 64


def median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = perf_counter()
        fn()
        times.append(perf_counter() - t0)
    return statistics.median(times)


Rows = list[tuple[str, str, float, float, float, float]]  # slots, direction, native, ref, loop, memcpy (s)


def run(n: int, repeats: int) -> tuple[Rows, int]:
    num_blocks = slots = 4 * n
    caches = [torch.randn(2, num_blocks, BLOCK, KV_HEADS, HEAD_DIM) for _ in range(LAYERS)]
    host = torch.empty(slots, LAYERS, 2, BLOCK, KV_HEADS, HEAD_DIM)
    nbytes = n * LAYERS * 2 * BLOCK * KV_HEADS * HEAD_DIM * 4
    src, dst = torch.randn(nbytes // 4), torch.empty(nbytes // 4)
    memcpy = median_seconds(lambda: dst.copy_(src), repeats)
    g = torch.Generator().manual_seed(0)
    blocks = torch.randperm(num_blocks, generator=g)[:n]
    rows = []
    for layout, slot_ids in (("contiguous", torch.arange(n)), ("scattered", torch.randperm(slots, generator=g)[:n])):
        for to_host in (True, False):
            def call(f):
                return median_seconds(lambda: f(caches, host, blocks, slot_ids, to_host), repeats)

            native, ref = call(ops.swap_cache_layout), call(ops.swap_cache_layout_ref)
            loop = call(ops.swap_cache_layout_loop)
            rows.append((layout, "to host" if to_host else "to device", native, ref, loop, memcpy))
    return rows, nbytes


def run_cuda(n: int, repeats: int) -> tuple[Rows, int]:
    """The CUDA op (device caches, pinned host) against one cudaMemcpy of the same bytes."""
    num_blocks = slots = 2 * n
    caches = [torch.randn(2, num_blocks, BLOCK, KV_HEADS, HEAD_DIM, device="cuda") for _ in range(LAYERS)]
    host = torch.empty(slots, LAYERS, 2, BLOCK, KV_HEADS, HEAD_DIM).pin_memory()
    nbytes = n * LAYERS * 2 * BLOCK * KV_HEADS * HEAD_DIM * 4
    dev, pinned = torch.empty(nbytes // 4, device="cuda"), torch.empty(nbytes // 4).pin_memory()

    def timed(fn):
        def run_once():
            fn()
            torch.cuda.synchronize()
        return median_seconds(run_once, repeats)

    g = torch.Generator().manual_seed(0)
    blocks = torch.randperm(num_blocks, generator=g)[:n]
    rows = []
    for layout, slot_ids in (("contiguous", torch.arange(n)), ("scattered", torch.randperm(slots, generator=g)[:n])):
        for to_host in (True, False):
            memcpy = timed(lambda: (pinned.copy_(dev, non_blocking=True) if to_host
                                    else dev.copy_(pinned, non_blocking=True)))  # fmt: skip
            native = timed(lambda: ops.swap_cache_layout(caches, host, blocks, slot_ids, to_host))
            ref = timed(lambda: ops.swap_cache_layout_ref(caches, host, blocks, slot_ids, to_host))
            loop = timed(lambda: ops.swap_cache_layout_loop(caches, host, blocks, slot_ids, to_host))
            rows.append((layout, "to host" if to_host else "to device", native, ref, loop, memcpy))
    return rows, nbytes


def render(rows, nbytes: int, n: int, bound: str = "memcpy") -> str:
    gbs = lambda s: nbytes / s / 1e9  # noqa: E731
    lines = [
        f"{n} blocks, {nbytes / 2**20:.1f} MiB each way; GB/s (higher is better) and ratios in one run.",
        "",
        f"| slots | direction | native GB/s | torch ref GB/s | per-block loop GB/s | {bound} GB/s "
        f"| native / {bound} | native / loop |",
        "|---|---|--:|--:|--:|--:|--:|--:|",
    ]
    for layout, direction, native, ref, loop, memcpy in rows:
        lines.append(f"| {layout} | {direction} | {gbs(native):.2f} | {gbs(ref):.2f} | {gbs(loop):.2f} | "
                     f"{gbs(memcpy):.2f} | {memcpy / native:.0%} | {loop / native:.1f}x |")  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small sizes for development; never recorded")
    p.add_argument("--no-record", action="store_true")
    p.add_argument("--cuda-only", action="store_true", help="only the GPU section (an error without CUDA)")
    p.add_argument("--record", type=Path, default=Path("docs/benchmarks.md"), help="where sections are appended")
    args = p.parse_args()
    if ops.native() is None:
        raise SystemExit("swap bench: the native ops are not built (make native)")
    cuda = torch.cuda.is_available() and ops.native_cuda() is not None
    if args.cuda_only and not cuda:
        raise SystemExit("swap bench: --cuda-only, but torch has no CUDA or the CUDA op did not build")
    info = machine_info()
    if cuda:
        info["gpu"] = torch.cuda.get_device_name()
    sections = []
    if not args.cuda_only:
        n, repeats = (16, 5) if args.quick else (128, 15)
        sections.append(("CPU", n, *run(n, repeats)))
    if cuda:
        n, repeats = (64, 5) if args.quick else (1024, 10)
        sections.append(("CUDA", n, *run_cuda(n, repeats)))  # memcpy column: one cudaMemcpy, pinned <-> device
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    for where, n, rows, nbytes in sections:
        body = render(rows, nbytes, n, "cudaMemcpy" if where == "CUDA" else "memcpy")
        body += f"\n\nMachine: {', '.join(f'{k} {v}' for k, v in info.items())}."
        print(f"# swap_cache_layout ({where}), {now}\n\n{body}\n")
        if not (args.quick or args.no_record):
            gpu = f"{info['gpu']}, " if where == "CUDA" else ""
            record(args.record, f"swap_cache_layout ({where}), {now}, {gpu}{machine_summary(info)}", body)


if __name__ == "__main__":
    main()
