"""What this CPU computes natively, read from /proc/cpuinfo: the one place kvd decides it.

bfloat16 pays on a CPU only with bf16 hardware: AVX512-BF16 (dot products of bf16 pairs)
or AMX (tile matrix multiplies). Without either, every bf16 matmul converts to float32
and back, and runs several times slower than float32 itself (about 8x on AVX2-only
EPYCs). So `model.dtype = "auto"` picks bfloat16 on such CPUs and float32 elsewhere,
and the benchmarks skip bf16 rows on CPUs without it, saying why.
"""

from __future__ import annotations

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
