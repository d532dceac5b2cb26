"""The cache messenger process: the instance's storage-pool client (PD roles).

It starts beside the worker: it imports torch and opens the pool while the worker loads,
then maps the worker's KV cache that its first message, MapKV, names (shared memory, see
`KVShare`), and reports Ready. It owns a block-major staging buffer of
`pd.transfer_batch_blocks` blocks. A CacheTask moves a request's
blocks in batches:

    write: KV blocks ──swap_cache_layout──▶ staging ──put_many──▶ pool
    read:  pool ──get_many_into (digest checked)──▶ staging ──swap_cache_layout──▶ KV blocks

Every key's status is checked: one failed put, or a missing, corrupt or short read fails
the task (CacheTaskDone ok=False naming the key) — a read that failed never reaches the
KV blocks. A task never touches blocks past its deadline (a read does not write them, a
write does not gather them), so once a lease has expired (plus a grace) the daemon may
free the blocks even if this process is slow. A
prefix read (`prefix=True`, for prefill's `prefix_from_pool`) moves the longest leading
run of keys that is present and verifies and reports how many.

The daemon never waits on this process: tasks go out on a PUSH socket and their
CacheTaskDone comes back on the report channel. Only a role that moves KV through the
pool starts this process (the unified role starts none); the class that moves blocks is
in `kvd.messenger.cache_messenger`.
"""

from __future__ import annotations

import os

import structlog

from kvd.child import Started, run_child
from kvd.config import KvdConfig
from kvd.messages import MapKV, Ready, ToMessenger

log = structlog.get_logger("kvd.messenger")


def _start(name: str):
    def start(cfg: KvdConfig, recv):
        from kvd.cache.storage import open_pool
        from kvd.messenger.cache_messenger import CacheMessenger, map_kv
        from kvd.worker.models import default_cache_dir

        # While the worker loads: torch is imported and the pool opened; then the KV cache.
        pool = open_pool(cfg.pd, cfg.model.cache_dir or default_cache_dir())
        try:
            msg = recv()
            if not isinstance(msg, MapKV):
                raise RuntimeError(f"messenger: expected MapKV first, got {type(msg).__name__}")
            messenger = CacheMessenger(pool, map_kv(msg.kv), cfg.pd.transfer_batch_blocks,
                                       cfg.pd.fault_read_delay_s, cfg.pd.fault_write_delay_s)  # fmt: skip
        except BaseException:
            pool.close()
            raise
        log.info("messenger_ready", pool=cfg.pd.pool, block_bytes=messenger.block_bytes)
        return Started(Ready(process=name, pid=os.getpid()), messenger.handle, pool.close)

    return start


def messenger_main(name: str, config_json: bytes, task_endpoint: str, report_endpoint: str) -> None:
    run_child(name, config_json, task_endpoint, report_endpoint, ToMessenger, _start(name))
