"""CacheMessenger: moves a CacheTask's blocks between the worker's KV cache (mapped from
its shared memory) and the storage pool, through a block-major staging buffer and the
swap_cache_layout op. The process around it is `kvd.messenger.main`."""

from __future__ import annotations

import time

import structlog
import torch

from kvd import ops, shm
from kvd.cache.storage.base import ReadStatus, StorageUnavailable
from kvd.messages import CacheTask, CacheTaskDone, ErrorCode, KVShare

log = structlog.get_logger("kvd.messenger")


class TransferError(Exception):
    """A task that failed: its error code and a message naming the key and how."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code


def map_kv(share: KVShare) -> torch.Tensor:
    """The worker's KV cache, mapped from its memfd: (L, 2, NB, BS, KVH, D)."""
    return shm.open_shared(share.pid, share.fd, share.shape, getattr(torch, share.dtype))


class CacheMessenger:
    """Moves blocks between the worker's KV cache and the pool, through a staging buffer."""

    def __init__(self, pool, kv_all: torch.Tensor, batch_blocks: int, read_delay_s: float = 0.0,
                 write_delay_s: float = 0.0) -> None:  # fmt: skip
        self.pool = pool
        self.read_delay_s = read_delay_s  # fault tests widen the window between write and read
        self.write_delay_s = write_delay_s  # ... or make the pool slow to take a write
        self.caches = list(kv_all.unbind(0))  # L x (2, NB, BS, KVH, D)
        layers, _, _, bs, kvh, d = kv_all.shape
        self.block_shape = (layers, 2, bs, kvh, d)
        self.block_bytes = layers * 2 * bs * kvh * d * kv_all.element_size()
        self.batch = batch_blocks
        # Block-major staging, as bytes for the pool and typed for the layout op.
        self.staging_bytes = torch.empty(batch_blocks, self.block_bytes, dtype=torch.uint8)
        shm.populate(self.staging_bytes)
        self.staging = self.staging_bytes.view(kv_all.dtype).view(batch_blocks, *self.block_shape)
        self._views = [memoryview(self.staging_bytes[i].numpy()) for i in range(batch_blocks)]
        register = getattr(pool, "register_buffer", None)
        if register is not None:
            register(memoryview(self.staging_bytes.numpy()).cast("B"))

    def handle(self, task: CacheTask) -> CacheTaskDone:
        t0 = time.perf_counter()
        try:
            if len(task.keys) != len(task.block_ids):
                raise TransferError(ErrorCode.INTERNAL, f"task: {len(task.keys)} keys for {len(task.block_ids)} blocks")
            n = self._write(task) if task.write else self._read(task)
            ok, code, error = True, ErrorCode.KV_TRANSFER_FAILED, ""
        except TransferError as e:
            n, ok, code, error = 0, False, e.code, str(e)
        except StorageUnavailable as e:
            n, ok, code, error = 0, False, ErrorCode.KV_TRANSFER_FAILED, f"pool unavailable: {e}"
        ms = (time.perf_counter() - t0) * 1e3
        event = "kv_write" if task.write else "kv_read"
        (log.info if ok else log.warning)(event, request_id=task.request_id, ok=ok, num_blocks=n,
                                          nbytes=n * self.block_bytes, duration_ms=round(ms, 3),
                                          error=error or None)  # fmt: skip
        return CacheTaskDone(task_id=task.task_id, request_id=task.request_id, ok=ok, num_blocks=n,
                             nbytes=n * self.block_bytes, duration_ms=ms, code=code, error=error)  # fmt: skip

    def _write(self, task: CacheTask) -> int:
        if self.write_delay_s:
            time.sleep(self.write_delay_s)
        for i in range(0, len(task.keys), self.batch):
            keys, blocks = task.keys[i : i + self.batch], task.block_ids[i : i + self.batch]
            if time.monotonic() > task.deadline:  # the blocks may be reclaimed and reused: never read them now
                raise TransferError(ErrorCode.DEADLINE, "lease expired before the KV was written")
            ops.swap_cache_layout(self.caches, self.staging, blocks, list(range(len(blocks))), to_host=True)
            stored = self.pool.put_many(keys, self._views[: len(keys)])
            bad = next((k for k, ok in zip(keys, stored) if not ok), None)
            if bad is not None:
                raise TransferError(ErrorCode.KV_TRANSFER_FAILED,
                                    f"write {bad}: the pool refused it ({self.pool.last_refusal or 'no reason given'})")
        return len(task.keys)

    def _read(self, task: CacheTask) -> int:
        if self.read_delay_s:
            time.sleep(self.read_delay_s)
        done = 0
        for i in range(0, len(task.keys), self.batch):
            keys, blocks = task.keys[i : i + self.batch], task.block_ids[i : i + self.batch]
            statuses = self.pool.get_many_into(keys, self._views[: len(keys)])
            good = next((j for j, s in enumerate(statuses) if s != ReadStatus.OK), len(keys))
            if good < len(keys) and not task.prefix:
                raise TransferError(ErrorCode.KV_TRANSFER_FAILED, f"read {keys[good]}: {statuses[good].name}")
            if time.monotonic() > task.deadline:  # the daemon may free these blocks now: hands off
                raise TransferError(ErrorCode.DEADLINE, "lease expired before the KV was in place")
            if good:
                ops.swap_cache_layout(self.caches, self.staging, blocks[:good], list(range(good)), to_host=False)
            done += good
            if good < len(keys):  # a prefix read stops at the first block it cannot use
                break
        return done
