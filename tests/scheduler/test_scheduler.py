"""The pure scheduler, driven without a model: a fake step samples token 7 for every request that caught up."""

from __future__ import annotations

from kvd.cache.kv_manager import KVCacheManager
from kvd.config import SchedulerConfig
from kvd.request import Request, RequestStatus
from kvd.sampling import SamplingParams
from kvd.scheduler.output import ModelOutput, SchedulerOutput
from kvd.scheduler.scheduler import Scheduler


def make_scheduler(num_blocks=64, block_size=4, max_num_seqs=8, budget=32) -> Scheduler:
    kv = KVCacheManager(num_blocks, block_size)
    return Scheduler(SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=budget), kv)


def make_request(rid: str, n: int, max_tokens: int = 4, first: int = 0) -> Request:
    return Request(rid, list(range(first, first + n)), SamplingParams(max_tokens=max_tokens, ignore_eos=True))


def fake_run(s: Scheduler, so: SchedulerOutput) -> ModelOutput:
    """Sample for requests whose computed tokens caught up with their tokens."""
    ids = [rid for rid in so.num_scheduled_tokens if s.requests[rid].num_computed_tokens == s.requests[rid].num_tokens]
    return ModelOutput(so.step, ids, [7] * len(ids))


def run_to_end(s: Scheduler, max_steps: int = 500) -> list[SchedulerOutput]:
    outs = []
    for _ in range(max_steps):
        if not s.has_unfinished():
            break
        so = s.schedule()
        outs.append(so)
        s.update(fake_run(s, so))
        s.check_integrity()
    assert not s.has_unfinished()
    return outs


def test_chunked_prefill_then_decode_one_rule():
    s = make_scheduler(budget=32)
    s.add_request(make_request("a", 100, max_tokens=3))
    steps = run_to_end(s)
    assert [so.num_scheduled_tokens["a"] for so in steps] == [32, 32, 32, 4, 1, 1]
    assert s.kv.pool.num_held == 0


def test_budget_shared_between_decodes_and_a_new_prefill():
    s = make_scheduler(budget=16)
    s.add_request(make_request("a", 8, max_tokens=10))
    so = s.schedule()
    s.update(fake_run(s, so))
    s.add_request(make_request("b", 40, first=100))
    so = s.schedule()
    assert so.num_scheduled_tokens == {"a": 1, "b": 15}
    assert [r.request_id for r in so.new_reqs] == ["b"] and [r.request_id for r in so.cached_reqs] == ["a"]


def test_max_num_seqs():
    s = make_scheduler(max_num_seqs=2, budget=100)
    for i in range(4):
        s.add_request(make_request(f"r{i}", 5, first=10 * i))
    so = s.schedule()
    assert list(so.num_scheduled_tokens) == ["r0", "r1"] and len(s.waiting) == 2
    s.update(fake_run(s, so))
    run_to_end(s)


def test_diff_sends_full_data_once_then_new_blocks_only():
    s = make_scheduler(block_size=4, budget=64)
    s.add_request(make_request("a", 6, max_tokens=8))
    so1 = s.schedule()
    assert so1.new_reqs[0].block_ids == [0, 1] and so1.new_reqs[0].token_ids == list(range(6))
    s.update(fake_run(s, so1))
    so2 = s.schedule()  # token 7 (position 6) still fits block 1
    assert so2.new_reqs == [] and so2.cached_reqs[0].new_block_ids == []
    s.update(fake_run(s, so2))
    so3 = s.schedule()  # position 8 needs a third block
    s.update(fake_run(s, so3))
    so4 = s.schedule()
    assert so4.cached_reqs[0].new_block_ids == [2] or so3.cached_reqs[0].new_block_ids == [2]


def test_finished_ids_reported_once_at_the_next_schedule():
    s = make_scheduler()
    s.add_request(make_request("a", 4, max_tokens=1))
    so = s.schedule()
    s.update(fake_run(s, so))
    assert "a" not in s.requests
    assert s.schedule().finished_request_ids == ["a"]
    assert s.schedule().finished_request_ids == []


def test_preempts_newest_and_resumes_with_all_tokens():
    # 6 blocks of 4: two requests of 8 prompt tokens + 8 outputs cannot both finish in place.
    s = make_scheduler(num_blocks=6, block_size=4, budget=64)
    s.add_request(make_request("old", 8, max_tokens=8))
    s.add_request(make_request("new", 8, max_tokens=8, first=50))
    preempted = []
    resumed = []
    for _ in range(100):
        if not s.has_unfinished():
            break
        so = s.schedule()
        preempted += so.preempted_request_ids
        resumed += [(r.request_id, len(r.token_ids)) for r in so.new_reqs if r.token_ids != list(range(50, 58))
                    and r.request_id == "new"]  # fmt: skip
        s.update(fake_run(s, so))
        s.check_integrity()
    assert preempted and set(preempted) == {"new"}
    assert resumed and all(n > 8 for _, n in resumed)  # resumed with prompt + outputs so far
    assert s.num_preemptions == len(preempted)


def test_stale_and_duplicate_outputs_are_ignored():
    s = make_scheduler()
    s.add_request(make_request("a", 4, max_tokens=5))
    so = s.schedule()
    mo = fake_run(s, so)
    s.finish_requests(["a"], RequestStatus.FINISHED_ABORTED)
    assert s.update(mo) == []  # the step's token arrives after the abort
    assert s.finish_requests(["a", "nope"], RequestStatus.FINISHED_ABORTED) == []
    s.check_integrity()
    assert s.kv.pool.num_held == 0


def test_prefix_hit_starts_a_request_part_way():
    s = make_scheduler(block_size=4, budget=64)
    s.add_request(make_request("a", 20, max_tokens=1))
    run_to_end(s)
    s.add_request(make_request("b", 22, max_tokens=1))
    so = s.schedule()
    assert so.new_reqs[0].num_computed_tokens == 20 and so.num_scheduled_tokens["b"] == 2
    s.update(fake_run(s, so))
    s.check_integrity()


def test_same_step_prefix_hit():
    s = make_scheduler(block_size=4, budget=200)
    s.add_request(make_request("a", 40, max_tokens=1))
    s.add_request(make_request("b", 41, max_tokens=1))
    so = s.schedule()
    assert so.num_scheduled_tokens == {"a": 40, "b": 1}  # b reads a's blocks, written earlier in each layer


def test_swap_preemption_keeps_computed_tokens_and_returns_host_slots():
    kv = KVCacheManager(6, 4)
    s = Scheduler(SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=64), kv, preempt="swap", num_host_slots=4)
    s.add_request(make_request("old", 8, max_tokens=8))
    s.add_request(make_request("new", 8, max_tokens=8, first=50))
    outs, swapped_slots = [], {}
    for _ in range(100):
        if not s.has_unfinished():
            break
        so = s.schedule()
        outs.append(so)
        if so.swap_out:
            swapped_slots = dict(so.swap_out)
            assert s.requests["new"].num_computed_tokens > 0  # kept: its KV is on the host
        if so.swap_in:
            assert sorted(slot for _, slot in so.swap_in) == sorted(swapped_slots.values())
            resumed = next(r for r in so.new_reqs if r.request_id == "new")
            assert resumed.num_computed_tokens >= 8 and resumed.block_ids[: len(so.swap_in)] == [
                b for b, _ in so.swap_in
            ]
        s.update(fake_run(s, so))
        s.check_integrity()
    assert s.num_swaps >= 1 and any(so.swap_in for so in outs)
    assert sorted(s.host_free) == [0, 1, 2, 3]


def test_swap_falls_back_to_recompute_when_the_host_pool_is_full():
    kv = KVCacheManager(6, 4)
    s = Scheduler(SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=64), kv, preempt="swap", num_host_slots=1)
    s.add_request(make_request("old", 8, max_tokens=8))
    s.add_request(make_request("new", 8, max_tokens=8, first=50))
    for _ in range(100):
        if not s.has_unfinished():
            break
        so = s.schedule()
        assert not so.swap_out  # "new" holds 3 computed blocks, the pool 1 slot
        s.update(fake_run(s, so))
        s.check_integrity()
    assert s.num_preemptions >= 1 and s.num_swaps == 0
