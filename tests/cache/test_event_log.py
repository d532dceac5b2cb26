"""KVEventLog under the real scheduler and block manager: what each block change records."""

from __future__ import annotations

from kvd.cache.event_log import KVEventLog
from kvd.cache.hashing import hash_blocks
from kvd.cache.kv_manager import KVCacheManager
from kvd.config import SchedulerConfig
from kvd.kv_events import AllCleared, BlockRemoved, BlockStored
from kvd.request import Request
from kvd.sampling import SamplingParams
from kvd.scheduler.output import ModelOutput
from kvd.scheduler.scheduler import Scheduler

BS = 4


def make(num_blocks=64, budget=64, **kw) -> tuple[Scheduler, KVEventLog]:
    log = KVEventLog(BS)
    kv = KVCacheManager(num_blocks, BS, events=log)
    return Scheduler(SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=budget), kv, **kw), log


def request(rid: str, ids: list[int], max_tokens: int = 2) -> Request:
    return Request(rid, ids, SamplingParams(max_tokens=max_tokens, ignore_eos=True))


def run(s: Scheduler, max_steps: int = 200) -> None:
    for _ in range(max_steps):
        if not s.has_unfinished():
            return
        so = s.schedule()
        ids = [r for r in so.num_scheduled_tokens if s.requests[r].num_computed_tokens == s.requests[r].num_tokens]
        s.update(ModelOutput(so.step, ids, [7] * len(ids)))
        s.check_integrity()  # the log's device tier equals the pool's index, every step
    raise AssertionError("did not finish")


def stored(events, tier="device") -> list[BlockStored]:
    return [e for e in events if isinstance(e, BlockStored) and e.tier == tier]


def test_stored_blocks_carry_the_chain_hashes_and_parent():
    s, log = make()
    prefix = list(range(100, 112))  # 3 full blocks
    s.add_request(request("a", prefix + [1, 2, 3, 4, 5]))
    run(s)
    events = log.take()
    (first,) = stored(events)
    assert first.hashes == hash_blocks(prefix + [1, 2, 3, 4, 5, 7], BS)[:4] and first.parent is None
    assert first.block_size == BS
    # a second prompt sharing the prefix: only its own blocks are news, chained from the prefix
    s.add_request(request("b", prefix + [9, 9, 9, 9, 9]))
    run(s)
    (second,) = stored(log.take())
    chain = hash_blocks(prefix + [9, 9, 9, 9, 9], BS)
    assert second.parent == chain[2] and second.hashes == chain[3:4]
    assert log.device == s.kv.pool.cached_hashes()


def test_evictions_are_removed_events():
    s, log = make(num_blocks=6)
    s.add_request(request("a", list(range(16))))
    run(s)
    first = set(stored(log.take())[0].hashes)
    s.add_request(request("b", list(range(50, 66))))
    run(s)
    events = log.take()
    removed = {h for e in events if isinstance(e, BlockRemoved) for h in e.hashes}
    assert removed and removed <= first
    assert log.device == s.kv.pool.cached_hashes() and not (removed & log.device)
    # removals come before the stores that reuse their blocks
    kinds = [type(e) for e in events]
    assert kinds.index(BlockRemoved) < max(i for i, k in enumerate(kinds) if k is BlockStored)


def test_swap_out_and_in_are_host_tier_events():
    s, log = make(num_blocks=6, preempt="swap", num_host_slots=4)
    s.add_request(request("old", list(range(8)), max_tokens=8))
    s.add_request(request("new", list(range(50, 58)), max_tokens=8))
    run(s)
    assert s.num_swaps >= 1
    events = log.take()
    host_in = [h for e in stored(events, "host") for h in e.hashes]
    host_out = [h for e in events if isinstance(e, BlockRemoved) and e.tier == "host" for h in e.hashes]
    assert host_in and sorted(host_in) == sorted(host_out)
    assert set(host_in) <= set(hash_blocks(list(range(50, 58)) + [7] * 8, BS))
    assert not log.host


def test_host_tier_counts_shared_hashes():
    log = KVEventLog(BS)
    a, b = [b"a" * 16, b"b" * 16], [b"a" * 16, b"c" * 16]
    log.host_in(a)
    log.host_in(b)  # shares its first block with a
    assert [e.hashes for e in log.take()] == [a, [b"c" * 16]]
    log.host_out(a)
    assert [e.hashes for e in log.take()] == [[b"b" * 16]]  # "a" is still held by b
    log.host_out(b)
    assert sorted(log.take()[0].hashes) == [b"a" * 16, b"c" * 16] and not log.host


def test_pool_tier_is_bounded_and_cleared_leaves_it():
    log = KVEventLog(BS, pool_capacity=3)
    log.pool_written([b"1" * 16, b"2" * 16])
    log.pool_written([b"1" * 16, b"2" * 16, b"3" * 16, b"4" * 16])
    events = log.take()
    assert [(type(e).__name__, e.hashes) for e in events] == [
        ("BlockStored", [b"1" * 16, b"2" * 16]), ("BlockStored", [b"3" * 16, b"4" * 16]),
        ("BlockRemoved", [b"1" * 16])]  # fmt: skip
    assert events[1].parent == b"2" * 16
    log.device.add(b"x" * 16)
    log.cleared()
    assert log.take() == [AllCleared(["device", "host"])]
    assert log.tiers() == {"device": [], "host": [], "pool": [b"2" * 16, b"3" * 16, b"4" * 16]}
