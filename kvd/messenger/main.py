"""The cache messenger process: the instance's storage-pool client (PD roles).

It maps the worker's KV cache (shared memory, see `KVShare`) and owns a block-major
staging buffer of `pd.transfer_batch_blocks` blocks. A CacheTask moves a request's
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
CacheTaskDone comes back on the report channel. In the unified role there is no pool and
no KV to map; the process still starts, reports Ready and answers Shutdown, without
importing torch (the class that moves blocks is in `kvd.messenger.cache_messenger`).
"""

from __future__ import annotations

import os

import structlog

from kvd.child import Started, run_child
from kvd.config import KvdConfig
from kvd.messages import KVShare, Ready, ToMessenger

log = structlog.get_logger("kvd.messenger")


def _start(name: str, kv: KVShare | None):
    def start(cfg: KvdConfig):
        if kv is None:
            log.info("messenger_ready", pool=None)
            return Started(Ready(process=name, pid=os.getpid()), lambda msg: None)
        from kvd.cache.storage import open_pool
        from kvd.messenger.cache_messenger import CacheMessenger, map_kv
        from kvd.worker.models import default_cache_dir

        cache_dir = cfg.model.cache_dir or default_cache_dir()
        messenger = CacheMessenger(open_pool(cfg.pd, cache_dir), map_kv(kv), cfg.pd.transfer_batch_blocks,
                                   cfg.pd.fault_read_delay_s, cfg.pd.fault_write_delay_s)  # fmt: skip
        log.info("messenger_ready", pool=cfg.pd.pool, block_bytes=messenger.block_bytes)
        return Started(Ready(process=name, pid=os.getpid()), messenger.handle, messenger.pool.close)

    return start


def messenger_main(name: str, config_json: bytes, task_endpoint: str, report_endpoint: str,
                   kv: bytes | None = None) -> None:  # fmt: skip
    import msgspec

    share = msgspec.msgpack.decode(kv, type=KVShare) if kv else None
    run_child(name, config_json, task_endpoint, report_endpoint, ToMessenger, _start(name, share))
