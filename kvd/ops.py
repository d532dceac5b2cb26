"""Native ops and their pure-torch references.

`native()` builds (once per machine and checkout: the build directory is keyed by the
sources' path and hash and the CPU's flags, under the kvd cache dir) and loads the C++
extension in native/, or returns None where it cannot be built — every caller then uses the torch reference,
which gives the same results. `make` builds it during set-up (`python -m kvd.ops`), so
tests and the daemon only load it.

- `paged_decode_attention(q, cache, block_table, lens, scale)`: one query token per
  sequence against its paged K/V, reading the blocks in place (CPU, float32 or bfloat16,
  accumulating in float32).
- `swap_cache_layout(caches, host, block_ids, slot_ids, to_host)`: move blocks between
  the worker's per-layer layout `(2, num_blocks, block_size, KVH, D)` and the block-major
  host layout `(num_slots, L, 2, block_size, KVH, D)`; registered as
  `torch.ops.kvd.swap_cache_layout`, with a CUDA implementation (`native_cuda()`, built
  where torch has CUDA: caches on the GPU, host in pinned memory, ordered on the current
  stream — synchronise before reading the host side).
- `sample_rows(x, temperature, kth, min_p, top_p, uniform)`: sampled rows' logits turned
  in place into u = exp((x - max) / T), their kept set (min-p, top-k, top-p as one
  threshold on u) and a draw from it, without a sort; the sampler's torch path
  (`kvd.worker.sampler`) is its reference.
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
_SOURCES = ["paged_attention.cpp", "prefill_attention.cpp", "fused.cpp", "swap_cache_layout.cpp", "quant_linear.cpp",
            "sampling.cpp", "decode_layers.cpp"]


_CUDA_SOURCES = ["swap_cache_layout.cu"]
# Every header the sources include (kvd_avx2.h among them) is part of the build's cache key.
_HEADERS = sorted(p.name for p in NATIVE_DIR.glob("*.h"))


def _build_dir(sources: list[str] = _SOURCES) -> Path:
    from kvd.worker.models import default_cache_dir

    # The checkout's path is part of the key: cpp_extension's build file names the source
    # paths, so two checkouts sharing a directory rebuilt it each time the other one loaded.
    h = hashlib.sha256(torch.__version__.encode() + str(NATIVE_DIR).encode())
    for name in sources + _HEADERS:
        h.update((NATIVE_DIR / name).read_bytes())
    try:
        with open("/proc/cpuinfo") as f:
            h.update(next((line for line in f if line.startswith("flags")), "").encode())
    except OSError:
        pass
    return default_cache_dir() / "native" / h.hexdigest()[:16]


def _load(name: str, sources: list[str], **kwargs):
    import ninja
    from torch.utils import cpp_extension

    # cpp_extension runs `ninja` from PATH; the venv's copy may not be on it.
    os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
    build = _build_dir(sources)
    build.mkdir(parents=True, exist_ok=True)
    return cpp_extension.load(name=name, sources=[str(NATIVE_DIR / s) for s in sources],
                              build_directory=str(build), verbose=False, **kwargs)  # fmt: skip


@functools.cache
def native_cuda():
    """The CUDA implementation of swap_cache_layout (registered on torch.ops.kvd), or None.

    Built only where torch has CUDA (`make native-cuda`); needs `native()` first, which
    declares the op.
    """
    if not torch.cuda.is_available() or native() is None:
        return None
    try:
        return _load("kvd_native_cuda", _CUDA_SOURCES, extra_cuda_cflags=["-O3"], is_python_module=False)
    except Exception as e:  # noqa: BLE001 - no nvcc, no headers: the reference serves, loudly
        log.warning("native_cuda_ops_unavailable", error=f"{type(e).__name__}: {e}")
        return None


def compile_cuda_object(arch: str = "sm_90") -> Path:
    """Compile the CUDA sources with nvcc into one object, without linking; returns its path.

    The build check where torch has no CUDA: nothing can load or run the object, but every
    type and syntax error of the .cu shows. torch's CPU wheel ships the CUDA headers except
    one generated at torch's build, `c10/cuda/impl/cuda_cmake_macros.h`, which is written
    here with its upstream content. Cached by the sources' hash; raises RuntimeError with
    nvcc's errors.
    """
    import shutil
    import subprocess
    import sysconfig

    from torch.utils import cpp_extension

    nvcc = shutil.which("nvcc")
    if nvcc is None:
        raise FileNotFoundError("nvcc is not on PATH")
    out = _build_dir(_CUDA_SOURCES) / f"check-{arch}"
    obj = out / "swap_cache_layout.o"
    if obj.exists():
        return obj
    shim = out / "include" / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h"
    shim.parent.mkdir(parents=True, exist_ok=True)
    shim.write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
    includes = [*cpp_extension.include_paths(), str(Path(nvcc).resolve().parent.parent / "include"),
                sysconfig.get_paths()["include"], str(out / "include")]  # fmt: skip
    cmd = [nvcc, "-c", *(str(NATIVE_DIR / s) for s in _CUDA_SOURCES), "-o", str(obj) + ".tmp", "-std=c++20", "-O3",
           f"-arch={arch}", "-Xcompiler", "-fPIC", f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
           "-DTORCH_EXTENSION_NAME=kvd_native_cuda", *cpp_extension.COMMON_NVCC_FLAGS,
           *(f"-I{d}" for d in includes)]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode:
        raise RuntimeError(f"nvcc failed ({done.returncode}):\n{done.stderr[-4000:]}")
    os.replace(str(obj) + ".tmp", obj)
    return obj


@functools.cache
def native():
    """The loaded extension module, or None (logged) where it cannot be built."""
    if not all((NATIVE_DIR / s).exists() for s in _SOURCES):
        return None
    try:
        # -fopenmp: at::parallel_for is OpenMP in torch's CPU build; without it the pragma
        # is ignored and the op runs on one thread.
        return _load("kvd_native", _SOURCES, extra_cflags=["-O3", "-march=native", "-fopenmp"],
                     extra_ldflags=["-fopenmp"])  # fmt: skip
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
    """Native where it applies (CPU, float32 or bfloat16, extension built), else the reference."""
    mod = native() if q.device.type == "cpu" and q.dtype in (torch.float32, torch.bfloat16) else None
    if mod is None:
        return paged_decode_attention_ref(q, cache, block_table, lens, scale)
    q = q.contiguous()
    out = torch.empty_like(q)
    mod.paged_decode_attention(out, q, cache, block_table, lens, scale)
    return out


def prefill_attention_ref(
    q: torch.Tensor,  # (T, H, D)
    cache: torch.Tensor,  # (2, NB, BS, KVH, D)
    block_table: torch.Tensor,  # (blocks,) int64, covering num_computed + T
    num_computed: int,
    scale: float,
) -> torch.Tensor:
    """The pure-torch reference: gather the context, causal mask offset by num_computed, SDPA. (T, H, D)."""
    t, _, d = q.shape
    kvh, ctx = cache.shape[3], num_computed + t
    kv = cache[:, block_table].reshape(2, -1, kvh, d)[:, :ctx].transpose(1, 2)  # (2, KVH, C, D)
    mask = torch.arange(ctx, device=q.device)[None] <= torch.arange(num_computed, ctx, device=q.device)[:, None]
    o = F.scaled_dot_product_attention(q.transpose(0, 1), kv[0], kv[1], attn_mask=mask, scale=scale,
                                       enable_gqa=True)  # fmt: skip
    return o.transpose(0, 1)


def prefill_attention(q: torch.Tensor, cache: torch.Tensor, block_table: torch.Tensor, num_computed: int,
                      scale: float, out: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
    """A prefill chunk's causal attention over its paged KV, natively (into `out` if given);
    only where `prefill_attention_applies(q)` (CPU, float32/bfloat16, a head size the build covers)."""
    if q.stride(2) != 1 or q.stride(1) != q.shape[2]:  # heads not token-major (transformers' (1, H, N, D) view)
        q = q.contiguous()
    if out is None:
        out = q.new_empty(q.shape)
    native().prefill_attention(out, q, cache, block_table, num_computed, scale)
    return out


def prefill_attention_applies(q: torch.Tensor) -> bool:
    """Whether `prefill_attention` runs q (asked by every layer of a step: cheap)."""
    return q.device.type == "cpu" and q.dtype in (torch.float32, torch.bfloat16) and _prefill_kernel(q.shape[-1])


@functools.cache
def _prefill_kernel(head_dim: int) -> bool:
    mod = native()
    return mod is not None and mod.prefill_attention_supported(head_dim)


def _check_swap(caches: list[torch.Tensor], host: torch.Tensor, block_ids: torch.Tensor,
                slot_ids: torch.Tensor, to_host: bool) -> None:
    """ValueError naming what is wrong, before any byte moves."""
    if not caches:
        raise ValueError("caches: empty")
    shape, dtype = caches[0].shape, caches[0].dtype
    if len(shape) != 5 or shape[0] != 2:
        raise ValueError(f"caches: expected (2, num_blocks, block_size, kv_heads, head_dim), got {tuple(shape)}")
    for i, c in enumerate(caches):
        if c.shape != shape or c.dtype != dtype or c.device != caches[0].device or not c.is_contiguous():
            raise ValueError(f"caches[{i}]: must match caches[0] in shape, dtype and device, and be contiguous")
    want = (len(caches), 2, *shape[2:])
    if host.dim() != 6 or tuple(host.shape[1:]) != want:
        raise ValueError(f"host: expected (num_slots, {', '.join(map(str, want))}), got {tuple(host.shape)}")
    if host.dtype != dtype:
        raise ValueError(f"host: dtype {host.dtype} differs from the caches' {dtype}")
    if not host.is_contiguous():
        raise ValueError("host: must be contiguous")
    if block_ids.shape != slot_ids.shape or block_ids.dim() != 1:
        raise ValueError(f"block_ids, slot_ids: {tuple(block_ids.shape)} vs {tuple(slot_ids.shape)}, expected equal 1-D")
    for name, ids, bound in (("block_ids", block_ids, shape[1]), ("slot_ids", slot_ids, host.shape[0])):
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= bound):
            raise ValueError(f"{name}: ids must lie in [0, {bound})")
    dst = slot_ids if to_host else block_ids
    if dst.unique().numel() != dst.numel():
        raise ValueError(f"{'slot_ids' if to_host else 'block_ids'}: a destination is written twice")


def swap_cache_layout(
    caches: list[torch.Tensor],  # L x (2, NB, BS, KVH, D)
    host: torch.Tensor,  # (S, L, 2, BS, KVH, D)
    block_ids,
    slot_ids,
    to_host: bool,
) -> None:
    """Copy blocks caches → host slots (to_host) or host slots → caches, in place."""
    block_ids = torch.as_tensor(block_ids, dtype=torch.long).contiguous()
    slot_ids = torch.as_tensor(slot_ids, dtype=torch.long).contiguous()
    _check_swap(caches, host, block_ids, slot_ids, to_host)
    on_cpu = host.device.type == "cpu" and caches[0].device.type == "cpu"
    cuda_ok = caches[0].is_cuda and host.device.type == "cpu" and host.is_pinned() and native_cuda() is not None
    if (on_cpu and native() is not None) or cuda_ok:
        torch.ops.kvd.swap_cache_layout(caches, host, block_ids, slot_ids, to_host)
    else:
        swap_cache_layout_ref(caches, host, block_ids, slot_ids, to_host)


def swap_cache_layout_ref(caches, host, block_ids, slot_ids, to_host: bool) -> None:
    """Pure torch, one gather or scatter per layer: the fallback where the native op is absent."""
    b = block_ids.to(caches[0].device)
    s = slot_ids.to(host.device)
    for layer, cache in enumerate(caches):
        if to_host:
            host[s, layer] = cache[:, b].transpose(0, 1).to(host.device)  # (n, 2, BS, KVH, D)
        else:
            cache[:, b] = host[s, layer].transpose(0, 1).to(cache.device)


def swap_cache_layout_loop(caches, host, block_ids, slot_ids, to_host: bool) -> None:
    """The naive per-block, per-layer copy loop (the benchmark's baseline)."""
    for b, s in zip(block_ids.tolist(), slot_ids.tolist()):
        for layer, cache in enumerate(caches):
            if to_host:
                host[s, layer].copy_(cache[:, b])
            else:
                cache[:, b].copy_(host[s, layer])


if __name__ == "__main__":
    mod = native()
    print("native ops:", "built" if mod is not None else "unavailable (torch fallback)", file=sys.stderr)
    if "--cuda" in sys.argv[1:]:
        if torch.cuda.is_available():
            if native_cuda() is None:
                sys.exit("CUDA ops did not build (see the log above)")
            print("CUDA ops: built", file=sys.stderr)
        else:
            print(f"torch has no CUDA; compile-only check: {compile_cuda_object()}", file=sys.stderr)


def sample_rows(
    x: torch.Tensor,  # (n, V) float32 logits, turned into u = exp((x - max) / T) in place
    temperature: torch.Tensor,  # (n,) float32, > 0
    kth: torch.Tensor,  # (n,) int64: the index of the k-th largest logit under top-k, -1: none
    min_p: torch.Tensor,  # (n,) float32, 0: off
    top_p: torch.Tensor,  # (n,) float64, 1: off
    uniform: torch.Tensor,  # (n,) float64 in [0, 1); < 0: no draw for that row
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(tokens (n,), thresholds (n,)): each row keeps u >= its threshold and, where uniform >= 0,
    draws from that set in proportion to u. None where the native op does not apply (not a
    contiguous CPU float32 tensor, or no extension): the caller takes its torch path."""
    mod = native() if x.device.type == "cpu" and x.dtype == torch.float32 and x.is_contiguous() else None
    if mod is None:
        return None
    tokens = torch.zeros(len(x), dtype=torch.long)
    threshold = torch.empty(len(x), dtype=torch.float32)
    params = [t.contiguous() for t in (temperature, kth, min_p, top_p, uniform)]
    mod.sample_rows(x, *params, tokens, threshold)
    return tokens, threshold
