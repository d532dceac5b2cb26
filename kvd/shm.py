"""The worker's KV cache in shared memory, for the cache messenger to map (PD roles).

`create(shape, dtype)` allocates a tensor in a memfd of this process; `open_shared(pid, fd,
shape, dtype)` maps another process's memfd through /proc/<pid>/fd/<fd> (same user). The
memory goes away with the last process that maps it, so a kill -9 leaves no file behind.
Both populate their mapping up front (MADV_POPULATE_WRITE): otherwise every first touch of
a 4 KiB page — the worker's first write into a block, the messenger's first copy of it —
is a page fault, which on these paths costs more than the copy itself.
"""

from __future__ import annotations

import ctypes
import math
import os

import torch

_MADV_POPULATE_WRITE = 23  # Linux 5.14+
_PAGE = os.sysconf("SC_PAGE_SIZE")


def populate(t: torch.Tensor) -> None:
    """Fault in every page of a CPU tensor's memory now (best effort)."""
    nbytes = t.numel() * t.element_size()
    start = t.data_ptr() // _PAGE * _PAGE
    length = t.data_ptr() + nbytes - start
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(length), _MADV_POPULATE_WRITE) != 0:
        flat = t.view(-1).view(torch.uint8) if t.is_contiguous() else None  # older kernels: touch each page
        if flat is not None:
            flat[:: _PAGE].add_(0)


def _map(path: str, shape: tuple[int, ...] | list[int], dtype: torch.dtype) -> torch.Tensor:
    flat = torch.from_file(path, shared=True, size=math.prod(shape), dtype=dtype)
    t = flat.view(*shape)
    populate(t)
    return t


def create(shape: tuple[int, ...], dtype: torch.dtype) -> tuple[torch.Tensor, int]:
    """A zeroed tensor in a new memfd of this process, and the fd."""
    fd = os.memfd_create("kvd-kv-cache", 0)
    os.ftruncate(fd, math.prod(shape) * torch.empty((), dtype=dtype).element_size())
    return _map(f"/proc/{os.getpid()}/fd/{fd}", shape, dtype), fd


def open_shared(pid: int, fd: int, shape: list[int], dtype: torch.dtype) -> torch.Tensor:
    """Map another process's memfd tensor (see `create`)."""
    return _map(f"/proc/{pid}/fd/{fd}", shape, dtype)
