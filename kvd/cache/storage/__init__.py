"""KV storage pools: where a prefill instance leaves a request's blocks for a decode instance.

`open_pool(pd, cache_dir)` builds the backend `[pd] pool` names: `local` (LMDB under
`pd.local_path`, default `/dev/shm/kvd-<uid>/pool` — tmpfs: a handoff cache needs no disk,
and its pages cost no writeback — or `<cache_dir>/pool` where /dev/shm is missing), `redis` (`pd.redis_url`) or `mooncake`
(`pd.mooncake_master`). Backends are imported only when chosen.
"""

from __future__ import annotations

import os
from pathlib import Path

from kvd.cache.storage.base import StoragePool

SHM = Path("/dev/shm")


def local_pool_path(pd, cache_dir: Path) -> Path:
    if pd.local_path:
        return Path(pd.local_path).expanduser()
    if SHM.is_dir() and os.access(SHM, os.W_OK):
        return SHM / f"kvd-{os.getuid()}" / "pool"
    return Path(cache_dir) / "pool"


def open_pool(pd, cache_dir: Path) -> StoragePool:
    """The configured pool backend (pd: kvd.config.PDConfig)."""
    if pd.pool == "local":
        from kvd.cache.storage.local import LocalPool

        return LocalPool(local_pool_path(pd, cache_dir), capacity_bytes=int(pd.local_capacity_gb * 2**30))
    if pd.pool == "redis":
        from kvd.cache.storage.redis import RedisPool

        return RedisPool(pd.redis_url, partial_ttl_s=pd.partial_ttl_s)
    if pd.pool == "mooncake":
        from kvd.cache.storage.mooncake import MooncakePool

        return MooncakePool.from_config(pd)
    raise ValueError(f"pd.pool: unknown backend {pd.pool!r}")
