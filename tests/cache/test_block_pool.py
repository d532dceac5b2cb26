"""BlockPool and KVCacheManager: allocation, ref counts, eviction order, prefix hits, integrity."""

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from kvd.cache.block_pool import BlockPool
from kvd.cache.kv_manager import KVCacheManager
from kvd.request import Request
from kvd.sampling import SamplingParams


def make_request(rid: str, tokens: list[int]) -> Request:
    return Request(rid, tokens, SamplingParams(max_tokens=8))


def test_allocate_returns_none_when_short_and_changes_nothing():
    pool = BlockPool(4)
    got = pool.allocate(3)
    assert [b.ref_cnt for b in got] == [1, 1, 1]
    assert pool.allocate(2) is None
    assert pool.num_free == 1
    pool.check_integrity()


def test_free_queue_is_lru_and_cached_blocks_evict_from_head():
    pool = BlockPool(3)
    a, b, c = pool.allocate(3)
    pool.cache(a, b"ha")
    pool.cache(b, b"hb")
    pool.free([b, a, c])  # b first in eviction order
    assert pool.num_cached_only == 2
    assert pool.get_cached(b"hb") is b
    (x,) = pool.allocate(1)
    assert x is b and pool.get_cached(b"hb") is None and x.block_hash is None
    assert pool.num_evictions == 1
    pool.touch([a])  # a prefix hit pulls a cached-only block off the queue
    assert a.ref_cnt == 1 and pool.num_free == 1
    pool.free([a, x])
    pool.check_integrity()


def test_double_free_and_duplicate_hash():
    pool = BlockPool(2)
    a, b = pool.allocate(2)
    assert pool.cache(a, b"h") and not pool.cache(b, b"h")  # one block per hash
    pool.free([a])
    with pytest.raises(RuntimeError, match="already 0"):
        pool.free([a])
    pool.free([b])
    pool.check_integrity()


def test_integrity_catches_corruption():
    pool = BlockPool(3)
    (a,) = pool.allocate(1)
    a.ref_cnt = -1
    with pytest.raises(RuntimeError, match="negative"):
        pool.check_integrity()
    a.ref_cnt = 0  # ref 0 but not queued
    with pytest.raises(RuntimeError, match="not in the free queue"):
        pool.check_integrity()


def test_manager_prefix_hits_leave_the_last_token():
    kv = KVCacheManager(num_blocks=16, block_size=4)
    r1 = make_request("a", list(range(12)))
    assert kv.allocate_slots(r1, 12, kv.get_computed_blocks(r1)) is not None
    kv.cache_blocks(r1, 12)
    kv.free("a")
    kv.check_integrity()
    # Same 12 tokens: at most (12 - 1) // 4 = 2 blocks can hit; the last must be computed.
    r2 = make_request("b", list(range(12)))
    hits = kv.get_computed_blocks(r2)
    assert len(hits) == 2
    r3 = make_request("c", list(range(13)))
    assert len(kv.get_computed_blocks(r3)) == 3
    assert kv.prefix_hits == 5 * 4


def test_manager_double_holding_detected_and_free_is_idempotent():
    kv = KVCacheManager(num_blocks=8, block_size=4)
    r = make_request("a", list(range(8)))
    kv.allocate_slots(r, 8)
    kv.free("a")
    kv.free("a")
    kv.check_integrity()
    kv.allocate_slots(r, 8)
    kv.req_blocks["a"].append(kv.req_blocks["a"][0])
    with pytest.raises(RuntimeError, match="twice"):
        kv.check_integrity()


def test_allocation_counts_evictable_hits():
    # 3 blocks; a cached-only block that is also a hit cannot be counted as free as well.
    kv = KVCacheManager(num_blocks=3, block_size=2)
    r = make_request("a", [1, 2, 3, 4, 5, 6])
    kv.allocate_slots(r, 6)
    kv.cache_blocks(r, 6)
    kv.free("a")
    r2 = make_request("b", [1, 2, 3, 4, 9, 9, 9, 9, 9])
    hits = kv.get_computed_blocks(r2)
    assert len(hits) == 2
    assert kv.allocate_slots(r2, 5, hits) is None  # needs 3 new blocks, only 1 non-hit block left
    kv.check_integrity()
    assert kv.allocate_slots(r2, 2, hits) is not None
    kv.check_integrity()


class PoolMachine(RuleBasedStateMachine):
    """Random allocate / cache / hit / free sequences keep every invariant."""

    def __init__(self):
        super().__init__()
        self.kv = KVCacheManager(num_blocks=12, block_size=2)
        self.live: dict[str, Request] = {}
        self.n = 0

    @rule(tokens=st.lists(st.integers(0, 3), min_size=1, max_size=10))
    def add(self, tokens):
        rid = f"r{self.n}"
        self.n += 1
        r = make_request(rid, tokens)
        hits = self.kv.get_computed_blocks(r)
        new = self.kv.allocate_slots(r, len(tokens) - 2 * len(hits), hits)
        if new is None:
            assert rid not in self.kv.req_blocks
            return
        r.num_computed_tokens = len(tokens)
        self.kv.cache_blocks(r, len(tokens))
        self.live[rid] = r

    @precondition(lambda self: self.live)
    @rule(data=st.data())
    def free(self, data):
        rid = data.draw(st.sampled_from(sorted(self.live)))
        self.kv.free(rid)
        del self.live[rid]

    @invariant()
    def integrity(self):
        self.kv.check_integrity()


TestPoolMachine = PoolMachine.TestCase
TestPoolMachine.settings = settings(max_examples=60, stateful_step_count=30, deadline=None)
