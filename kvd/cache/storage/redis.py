"""RedisPool: the KV pool on a Redis server, for sites that already run one.

Objects are framed (see base) and written with `SET key value NX`: a key that already
exists is left alone and counts as success (content addressing; two prefill instances
writing the same prompt at once both succeed). Reads are one MGET per batch; writes,
existence checks and removals are pipelined, one round trip per batch. The one-shot
partial-block objects (`...:partial:<N>`) carry a TTL so an abandoned handoff cannot
pile up. The server's own `maxmemory` / eviction policy bounds the pool; an evicted key
is a MISSING read. A server that cannot be reached raises StorageUnavailable.
"""

from __future__ import annotations

from collections.abc import Sequence

import redis

from kvd.cache.hashing import is_partial_key
from kvd.cache.storage.base import (
    Buffer,
    ReadStatus,
    StoragePool,
    StorageUnavailable,
    frame,
    unframe_into,
)


class RedisPool(StoragePool):
    """A Redis client: SET NX pipelines for writes, MGET for reads, a TTL on partial blocks."""

    def __init__(self, url: str, partial_ttl_s: float = 600.0, timeout_s: float = 5.0) -> None:
        self.url = url
        self.partial_ttl_s = max(1, round(partial_ttl_s))  # SET EX takes whole seconds
        self.client = redis.Redis.from_url(url, socket_timeout=timeout_s, socket_connect_timeout=timeout_s)

    def _call(self, fn):
        try:
            return fn()
        except (redis.ConnectionError, redis.TimeoutError) as e:
            raise StorageUnavailable(f"redis pool {self.url}: {e}") from e

    def put_many(self, keys: Sequence[str], payloads: Sequence[Buffer]) -> list[bool]:
        if len(keys) != len(payloads):
            raise ValueError(f"put_many: {len(keys)} keys but {len(payloads)} payloads")

        def run():
            pipe = self.client.pipeline(transaction=False)
            for key, payload in zip(keys, payloads):
                ttl = self.partial_ttl_s if is_partial_key(key) else None
                pipe.set(key, frame(payload), nx=True, ex=ttl)
            return pipe.execute(raise_on_error=False)

        # SET NX answers True when written and None when the key existed: both are success.
        results = self._call(run)
        self.last_refusal = next((f"redis: {r}" for r in results if isinstance(r, Exception)), "")
        return [not isinstance(r, Exception) for r in results]

    def get_many_into(self, keys: Sequence[str], buffers: Sequence[memoryview]) -> list[ReadStatus]:
        if len(keys) != len(buffers):
            raise ValueError(f"get_many_into: {len(keys)} keys but {len(buffers)} buffers")
        if not keys:
            return []
        values = self._call(lambda: self.client.mget(list(keys)))
        return [
            ReadStatus.MISSING if v is None else unframe_into(v, memoryview(buf).cast("B"))
            for v, buf in zip(values, buffers)
        ]

    def exists(self, keys: Sequence[str]) -> list[bool]:
        def run():
            pipe = self.client.pipeline(transaction=False)
            for key in keys:
                pipe.exists(key)
            return pipe.execute()

        return [bool(n) for n in self._call(run)]

    def remove(self, keys: Sequence[str]) -> int:
        return int(self._call(lambda: self.client.delete(*keys))) if keys else 0

    def close(self) -> None:
        self.client.close()
