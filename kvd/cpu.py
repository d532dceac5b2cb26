"""What this CPU computes natively, read from /proc/cpuinfo: the one place kvd decides it.

bfloat16 pays on a CPU only with bf16 hardware: AVX512-BF16 (dot products of bf16 pairs)
or AMX (tile matrix multiplies). Without either, every bf16 matmul converts to float32
and back, and runs several times slower than float32 itself (about 8x on AVX2-only
EPYCs). So `model.dtype = "auto"` picks bfloat16 on such CPUs and float32 elsewhere,
and the benchmarks skip bf16 rows on CPUs without it, saying why.

Huge pages: a decode step streams every weight from memory, 4 KiB page after page, and
each new page costs a TLB walk and a cold start of the hardware prefetcher. torch's CPU
allocator puts a tensor of 2 MiB or more in transparent huge pages (madvise) when
THP_MEM_ALLOC_ENABLE=1 is in the environment at its first allocation; `use_huge_pages`
sets it from `model.huge_pages` (measured: docs/benchmarks.md, "Weights in huge pages").
"""

from __future__ import annotations

import os
from collections.abc import Set as AbstractSet
from pathlib import Path

BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def cpu_flags(cpuinfo: str) -> frozenset[str]:
    """The flags of the first processor in a /proc/cpuinfo text."""
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags":
            return frozenset(value.split())
    return frozenset()


def machine_flags() -> frozenset[str]:
    """This machine's CPU flags; empty where /proc/cpuinfo cannot be read (not Linux)."""
    try:
        return cpu_flags(Path("/proc/cpuinfo").read_text())
    except OSError:
        return frozenset()


def no_bf16_reason(flags: AbstractSet[str]) -> str | None:
    """Why bfloat16 is slow on a CPU with these flags; None: it has bf16 hardware."""
    if flags & set(BF16_FLAGS):
        return None
    return f"no bf16 hardware (neither {' nor '.join(BF16_FLAGS)} in the CPU flags)"


def auto_cpu_dtype(flags: AbstractSet[str]) -> tuple[str, str]:
    """(dtype, why) for `model.dtype = "auto"` on a CPU with these flags."""
    reason = no_bf16_reason(flags)
    if reason is None:
        return "bfloat16", f"bf16 hardware: {', '.join(f for f in BF16_FLAGS if f in flags)}"
    return "float32", reason


# ---- memory pages ------------------------------------------------------------------------------
THP_ENV = "THP_MEM_ALLOC_ENABLE"  # torch's: CPU tensors of 2 MiB or more madvised into huge pages
THP_SETTING = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def use_huge_pages(on: bool) -> None:
    """Ask torch for huge pages (or not) in this process and the processes it starts. torch
    reads the variable once, at the process's first tensor allocation: the daemon sets it
    before it starts its children; an in-process LLM gets it only if no tensor came first."""
    os.environ[THP_ENV] = "1" if on else "0"


def thp_mode() -> str:
    """The kernel's transparent huge page mode (always, madvise or never; unknown where
    unreadable): under never no process gets huge pages, under madvise those that ask."""
    try:
        text = THP_SETTING.read_text()
    except OSError:
        return "unknown"
    return next((w[1:-1] for w in text.split() if w.startswith("[")), "unknown")


def huge_pages_mb() -> int:
    """MiB of this process's anonymous memory in huge pages (0 where unreadable)."""
    try:
        text = Path("/proc/self/smaps_rollup").read_text()
    except OSError:
        return 0
    for line in text.splitlines():
        if line.startswith("AnonHugePages:"):
            return int(line.split()[1]) // 1024
    return 0
