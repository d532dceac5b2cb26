"""KV storage pools: where a prefill instance leaves a request's blocks for a decode instance.

`open_pool(pd, cache_dir)` builds the backend `[pd] pool` names: `local` (LMDB under
`pd.local_path`, default `<cache_dir>/pool`), `redis` (`pd.redis_url`) or `mooncake`
(`pd.mooncake_master`). Backends are imported only when chosen.
"""

from __future__ import annotations

from pathlib import Path

from kvd.cache.storage.base import StoragePool


def local_pool_path(pd, cache_dir: Path) -> Path:
    return Path(pd.local_path).expanduser() if pd.local_path else Path(cache_dir) / "pool"


def open_pool(pd, cache_dir: Path) -> StoragePool:
    """The configured pool backend (pd: kvd.config.PDConfig)."""
    if pd.pool == "local":
        from kvd.cache.storage.local import LocalPool

        return LocalPool(local_pool_path(pd, cache_dir), capacity_bytes=int(pd.local_capacity_gb * 2**30))
    if pd.pool == "redis":
        from kvd.cache.storage.redis import RedisPool

        return RedisPool(pd.redis_url)
    if pd.pool == "mooncake":
        from kvd.cache.storage.mooncake import MooncakePool

        return MooncakePool.from_config(pd)
    raise ValueError(f"pd.pool: unknown backend {pd.pool!r}")
