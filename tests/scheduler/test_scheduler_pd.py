"""The scheduler with the PD connector, without a model: preallocation under the KV-wait
budget, arrival and failure of pool KV, a prefill instance's held blocks, deferred frees."""

from __future__ import annotations

import pytest

from kvd.cache.kv_manager import KVCacheManager
from kvd.config import SchedulerConfig
from kvd.connector.pool import PoolConnector
from kvd.request import RequestStatus
from kvd.scheduler.scheduler import Scheduler
from test_scheduler import fake_run, make_request


def make_scheduler(num_blocks=64, block_size=4, load=None, save=False, wait_blocks=None) -> Scheduler:
    kv = KVCacheManager(num_blocks, block_size)
    connector = PoolConnector(block_size, num_blocks if wait_blocks is None else wait_blocks, load, save)
    return Scheduler(SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=32), kv, connector=connector)


recv = make_request  # on a decode instance (load="prompt") every request's prompt comes from the pool


def end_transfer(s: Scheduler, request_id: str) -> None:
    request = s.requests.get(request_id)
    if request is not None:
        s.connector.end_transfer(request)
    s.release(request_id)


def test_decode_request_preallocates_then_decodes_without_prefill():
    s = make_scheduler(block_size=4, load="prompt")
    s.add_request(recv("a", 10, max_tokens=3))
    so = s.schedule()
    assert so.is_empty and not s.has_unfinished()  # waiting for KV: nothing to compute
    (req,) = s.connector.take_loads()
    assert req.status == RequestStatus.WAITING_FOR_KV and len(s.kv.block_ids("a")) == 3
    assert s.connector.take_loads() == []
    s.check_integrity()
    s.append_token("a", 5)  # the first token, sampled by the prefill instance
    assert s.kv_loaded("a")
    assert not s.kv_loaded("a")  # a duplicate is ignored
    so = s.schedule()
    (new,) = so.new_reqs
    assert new.num_computed_tokens == 10 and new.token_ids[-1] == 5 and so.num_scheduled_tokens == {"a": 1}
    s.update(fake_run(s, so))
    s.check_integrity()
    so = s.schedule()
    s.update(fake_run(s, so))
    assert not s.has_unfinished() and s.kv.pool.num_held == 0
    s.check_integrity()


def test_kv_wait_budget_keeps_blocks_for_running_requests():
    s = make_scheduler(num_blocks=16, block_size=4, load="prompt", wait_blocks=5)
    s.add_request(recv("a", 12))  # 3 blocks
    s.add_request(recv("b", 12))  # 3 more would pass the budget of 5
    s.add_request(make_request("c", 4))
    s.schedule()
    assert [r.request_id for r in s.connector.take_loads()] == ["a"]
    assert s.num_kv_wait_blocks == 3 and [r.request_id for r in s.waiting] == ["b", "c"]
    s.check_integrity()
    assert s.kv_load_failed("a")  # recompute: blocks back, computes everything itself
    assert s.requests["a"].num_computed_tokens == 0 and s.kv.pool.num_held == 0
    s.check_integrity()


def test_abort_during_transfer_defers_the_free():
    s = make_scheduler(block_size=4, load="prompt")
    s.add_request(recv("a", 8))
    s.schedule()
    (req,) = s.connector.take_loads()
    s.connector.begin_transfer(req)
    s.finish_requests(["a"], RequestStatus.FINISHED_ABORTED)
    assert s.kv.pool.num_held == 2 and "a" in s.requests  # the messenger may still write them
    assert s.get("a") is None  # not live
    s.check_integrity()
    end_transfer(s, "a")
    end_transfer(s, "a")  # idempotent
    assert s.kv.pool.num_held == 0 and not s.requests
    s.check_integrity()


def test_prefill_request_holds_its_blocks_after_the_first_token():
    s = make_scheduler(block_size=4, save=True)
    r = make_request("p", 10, max_tokens=50)
    s.add_request(r)
    so = s.schedule()
    (eo,) = s.update(fake_run(s, so))
    assert eo.finish_reason == "length" and eo.new_token_ids == [7]
    assert s.kv.pool.num_held == 3 and "p" in s.requests and not s.has_unfinished()
    s.check_integrity()
    end_transfer(s, "p")
    assert s.kv.pool.num_held == 0
    assert s.kv.pool.num_cached_only == 2  # its full blocks stay as prefix cache
    s.check_integrity()


def test_first_token_that_stops_needs_no_read():
    s = make_scheduler(block_size=4, load="prompt")
    s.add_request(recv("a", 6, max_tokens=1))
    s.schedule()
    s.connector.take_loads()
    eo = s.append_token("a", 9)
    assert eo.finish_reason == "length" and not s.has_unfinished() and s.kv.pool.num_held == 0
    s.check_integrity()


@pytest.mark.parametrize("n", [1, 4, 5])
def test_prefix_read_only_covers_full_blocks_before_the_last_token(n):
    s = make_scheduler(block_size=4, load="prefix")
    r = make_request("p", n)
    s.add_request(r)
    assert r.transfer.load_tokens == (n - 1) // 4 * 4
    so = s.schedule()
    pre = s.connector.take_loads()
    if r.transfer.load_tokens == 0:
        assert pre == [] and so.num_scheduled_tokens == {"p": n}
    else:
        assert pre == [r] and so.is_empty
        assert s.kv_loaded("p", 4)
        so = s.schedule()
        assert so.num_scheduled_tokens == {"p": n - 4} and so.new_reqs[0].num_computed_tokens == 4
    s.check_integrity()
