"""Native ops and their pure-torch references.

`native()` builds (once per machine: the build directory is keyed by the source's hash
and the CPU's flags, under the kvd cache dir) and loads the C++ extension in native/,
or returns None where it cannot be built — every caller then uses the torch reference,
which gives the same results. `make` builds it during set-up (`python -m kvd.ops`), so
tests and the daemon only load it.

- `paged_decode_attention(q, cache, block_table, lens, scale)`: one query token per
  sequence against its paged K/V, reading the blocks in place (CPU, float32).
"""

from __future__ import annotations

import functools
import hashlib
import os
import sys
from pathlib import Path

import structlog
import torch
import torch.nn.functional as F

log = structlog.get_logger(__name__)

NATIVE_DIR = Path(__file__).resolve().parent.parent / "native"
_SOURCES = ["paged_attention.cpp"]


def _build_dir() -> Path:
    from kvd.worker.models import default_cache_dir

    h = hashlib.sha256(torch.__version__.encode())
    for name in _SOURCES:
        h.update((NATIVE_DIR / name).read_bytes())
    try:
        with open("/proc/cpuinfo") as f:
            h.update(next((line for line in f if line.startswith("flags")), "").encode())
    except OSError:
        pass
    return default_cache_dir() / "native" / h.hexdigest()[:16]


@functools.cache
def native():
    """The loaded extension module, or None (logged) where it cannot be built."""
    if not all((NATIVE_DIR / s).exists() for s in _SOURCES):
        return None
    try:
        import ninja
        from torch.utils import cpp_extension

        # cpp_extension runs `ninja` from PATH; the venv's copy may not be on it.
        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
        build = _build_dir()
        build.mkdir(parents=True, exist_ok=True)
        return cpp_extension.load(
            name="kvd_native",
            sources=[str(NATIVE_DIR / s) for s in _SOURCES],
            # -fopenmp: at::parallel_for is OpenMP in torch's CPU build; without it the pragma
            # is ignored and the op runs on one thread.
            extra_cflags=["-O3", "-march=native", "-fopenmp"],
            extra_ldflags=["-fopenmp"],
            build_directory=str(build),
            verbose=False,
        )
    except Exception as e:  # noqa: BLE001 - no compiler, no headers: fall back, loudly
        log.warning("native_ops_unavailable", error=f"{type(e).__name__}: {e}")
        return None


def paged_decode_attention_ref(
    q: torch.Tensor,  # (B, H, D)
    cache: torch.Tensor,  # (2, NB, BS, KVH, D)
    block_table: torch.Tensor,  # (B, MB) int64
    lens: torch.Tensor,  # (B,) int64
    scale: float,
) -> torch.Tensor:
    """The pure-torch reference: gather the blocks, mask past each length, SDPA. (B, H, D)."""
    b, _, d = q.shape
    kvh, bs = cache.shape[3], cache.shape[2]
    kv = cache[:, block_table].view(2, b, -1, kvh, d).transpose(2, 3)  # (2, B, KVH, L, D)
    mask = torch.arange(block_table.shape[1] * bs, device=q.device)[None] < lens[:, None]  # (B, L)
    o = F.scaled_dot_product_attention(q.unsqueeze(2), kv[0], kv[1], attn_mask=mask[:, None, None, :],
                                       scale=scale, enable_gqa=True)  # fmt: skip
    return o[:, :, 0]


def paged_decode_attention(
    q: torch.Tensor, cache: torch.Tensor, block_table: torch.Tensor, lens: torch.Tensor, scale: float
) -> torch.Tensor:
    """Native where it applies (CPU, float32, extension built), else the reference."""
    mod = native() if q.device.type == "cpu" and q.dtype == torch.float32 else None
    if mod is None:
        return paged_decode_attention_ref(q, cache, block_table, lens, scale)
    q = q.contiguous()
    out = torch.empty_like(q)
    mod.paged_decode_attention(out, q, cache, block_table, lens, scale)
    return out


if __name__ == "__main__":
    mod = native()
    print("native ops:", "built" if mod is not None else "unavailable (torch fallback)", file=sys.stderr)
