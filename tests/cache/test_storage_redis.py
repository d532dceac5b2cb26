"""RedisPool against a real redis-server (servers.RedisServer: 127.0.0.1, a free port, stopped by PID)."""

from __future__ import annotations

import shutil

import pytest

from kvd.cache.storage import servers
from kvd.cache.storage.base import HEADER_BYTES, ReadStatus, StorageUnavailable
from kvd.cache.storage.redis import RedisPool

pytestmark = pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server not installed")


@pytest.fixture
def redis_server():
    with servers.RedisServer() as server:  # 127.0.0.1, a free port, stopped by PID even on failure
        yield server


def payload(i: int, n: int = 4096) -> bytes:
    return bytes((i * 7 + j) % 253 for j in range(n))


def test_round_trip_and_content_addressing(redis_server):
    url = redis_server.url
    with RedisPool(url) as pool:
        keys = [f"ns/{i:032x}" for i in range(6)]
        assert pool.put_many(keys, [payload(i) for i in range(6)]) == [True] * 6
        assert pool.put_many(keys[:2], [payload(0), payload(1)]) == [True, True]  # already there: success
        bufs = [memoryview(bytearray(4096)) for _ in keys]
        assert pool.get_many_into(keys, bufs) == [ReadStatus.OK] * 6
        assert all(bytes(b) == payload(i) for i, b in enumerate(bufs))
        assert pool.exists(keys[:1] + ["ns/none"]) == [True, False]
        assert pool.remove(keys[:2] + ["ns/none"]) == 2


def test_partial_blocks_carry_a_ttl(redis_server):
    url = redis_server.url
    with RedisPool(url, partial_ttl_s=30) as pool:
        pool.put_many(["ns/ab:partial:3", "ns/cd"], [payload(1), payload(2)])
        assert 0 < pool.client.ttl("ns/ab:partial:3") <= 30
        assert pool.client.ttl("ns/cd") == -1


def test_corrupt_truncated_and_missing_reads_fail(redis_server):
    url = redis_server.url
    with RedisPool(url) as pool:
        pool.put_many(["a", "b"], [payload(1), payload(2)])
        raw = bytearray(pool.client.get("a"))
        raw[HEADER_BYTES + 7] ^= 1
        pool.client.set("a", bytes(raw))
        pool.client.set("b", pool.client.get("b")[:-1])
        bufs = [memoryview(bytearray(4096)) for _ in range(3)]
        assert pool.get_many_into(["a", "b", "c"], bufs) == [ReadStatus.CORRUPT, ReadStatus.CORRUPT,
                                                             ReadStatus.MISSING]  # fmt: skip
        assert bytes(bufs[0]) == bytes(4096)


def test_server_gone_is_storage_unavailable(redis_server):
    pool = RedisPool(redis_server.url, timeout_s=1.0)
    pool.put_many(["k"], [payload(0)])
    redis_server.kill()
    with pytest.raises(StorageUnavailable):
        pool.get_many_into(["k"], [memoryview(bytearray(4096))])
    with pytest.raises(StorageUnavailable):
        pool.put_many(["k2"], [payload(1)])
