"""The scheduler's PD bookkeeping, without a model: preallocation under the KV-wait budget,
arrival and failure of pool KV, a prefill instance's held blocks, deferred frees."""

from __future__ import annotations

import pytest

from kvd.request import RequestStatus
from test_scheduler import fake_run, make_request, make_scheduler


def recv(rid: str, n: int, **kw):
    r = make_request(rid, n, **kw)
    r.kv_recv_tokens = n
    return r


def test_decode_request_preallocates_then_decodes_without_prefill():
    s = make_scheduler(block_size=4)
    s.add_request(recv("a", 10, max_tokens=3))
    so = s.schedule()
    assert so.is_empty and not s.has_unfinished()  # waiting for KV: nothing to compute
    (req,) = s.take_preallocated()
    assert req.status == RequestStatus.WAITING_FOR_KV and len(s.kv.block_ids("a")) == 3
    assert s.take_preallocated() == []
    s.check_integrity()
    s.append_token("a", 5)  # the first token, sampled by the prefill instance
    assert s.kv_arrived("a")
    assert not s.kv_arrived("a")  # a duplicate is ignored
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
    s = make_scheduler(num_blocks=16, block_size=4)
    s.kv_wait_blocks = 5
    s.add_request(recv("a", 12))  # 3 blocks
    s.add_request(recv("b", 12))  # 3 more would pass the budget of 5
    s.add_request(make_request("c", 4))
    s.schedule()
    assert [r.request_id for r in s.take_preallocated()] == ["a"]
    assert s.num_kv_wait_blocks == 3 and [r.request_id for r in s.waiting] == ["b", "c"]
    s.check_integrity()
    assert s.kv_failed("a")  # recompute: blocks back, computes everything itself
    assert s.requests["a"].num_computed_tokens == 0 and s.kv.pool.num_held == 0
    s.check_integrity()


def test_abort_during_transfer_defers_the_free():
    s = make_scheduler(block_size=4)
    s.add_request(recv("a", 8))
    s.schedule()
    s.take_preallocated()
    s.begin_transfer("a")
    s.finish_requests(["a"], RequestStatus.FINISHED_ABORTED)
    assert s.kv.pool.num_held == 2 and "a" in s.deferred  # the messenger may still write them
    s.check_integrity()
    s.end_transfer("a")
    s.end_transfer("a")  # idempotent
    assert s.kv.pool.num_held == 0 and not s.deferred
    s.check_integrity()


def test_prefill_request_holds_its_blocks_after_the_first_token():
    s = make_scheduler(block_size=4)
    r = make_request("p", 10, max_tokens=50)
    r.kv_send = True
    s.add_request(r)
    so = s.schedule()
    (eo,) = s.update(fake_run(s, so))
    assert eo.finish_reason == "length" and eo.new_token_ids == [7]
    assert s.kv.pool.num_held == 3 and "p" in s.deferred and not s.has_unfinished()
    s.check_integrity()
    s.end_transfer("p")
    assert s.kv.pool.num_held == 0
    assert s.kv.pool.num_cached_only == 2  # its full blocks stay as prefix cache
    s.check_integrity()


def test_first_token_that_stops_needs_no_read():
    s = make_scheduler(block_size=4)
    s.add_request(recv("a", 6, max_tokens=1))
    s.schedule()
    s.take_preallocated()
    eo = s.append_token("a", 9)
    assert eo.finish_reason == "length" and not s.has_unfinished() and s.kv.pool.num_held == 0
    s.check_integrity()


@pytest.mark.parametrize("n", [1, 4, 5])
def test_prefix_read_only_covers_full_blocks_before_the_last_token(n):
    s = make_scheduler(block_size=4)
    r = make_request("p", n)
    r.kv_recv_tokens = (n - 1) // 4 * 4
    s.add_request(r)
    so = s.schedule()
    pre = s.take_preallocated()
    if r.kv_recv_tokens == 0:
        assert pre == [] and so.num_scheduled_tokens == {"p": n}
    else:
        assert pre == [r] and so.is_empty
        assert s.kv_arrived("p", 4)
        so = s.schedule()
        assert so.num_scheduled_tokens == {"p": n - 4} and so.new_reqs[0].num_computed_tokens == 4
    s.check_integrity()
