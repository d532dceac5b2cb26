"""Policy: the order the router tries instances in, for each of kv, least_loaded, round_robin."""

from __future__ import annotations

import pytest

from kvd.route.policy import Policy


def test_kv_weighs_held_prefix_blocks_against_requests_in_flight():
    p = Policy("kv", load_weight=4.0)
    assert p.order(["a", "b"], {"a": 0, "b": 0}, {"a": 5}) == ["a", "b"]
    assert p.order(["a", "b"], {"a": 2, "b": 0}, {"a": 5}) == ["b", "a"]  # 5 blocks < 2 requests x 4
    assert p.order(["a", "b"], {"a": 2, "b": 0}, {"a": 9}) == ["a", "b"]
    assert p.order(["a", "b"], {"a": 1, "b": 0}, {"a": 4}) == ["b", "a"]  # a tie: the fewer in flight
    assert p.order([], {}, {}) == []


def test_kv_counts_blocks_an_instance_has_no_room_for():
    p = Policy("kv", load_weight=4.0)
    # a holds 5 of the prompt's blocks but lacks room for 6 of the rest: as if it held none
    assert p.order(["a", "b"], {"a": 0, "b": 0}, {"a": 5}, {"a": 6, "b": 0}) == ["b", "a"]
    assert p.order(["a", "b"], {"a": 0, "b": 0}, {"a": 5}, {"a": 4, "b": 0}) == ["a", "b"]
    assert p.order(["a", "b"], {"a": 0, "b": 0}, {}, {"a": 1}) == ["b", "a"]  # nothing held: the roomier
    ll = Policy("least_loaded")
    assert ll.order(["a", "b"], {"a": 0, "b": 1}, {}, {"a": 50}) == ["a", "b"]  # room is kv's business only


def test_ties_spread_by_turns():
    p = Policy("kv")
    firsts = [p.order(["a", "b", "c"], {}, {})[0] for _ in range(6)]
    assert firsts == ["a", "b", "c", "a", "b", "c"]
    rr = Policy("round_robin")
    assert [rr.order(["a", "b"], {"a": 9})[0] for _ in range(4)] == ["a", "b", "a", "b"]  # load is not its business
    ll = Policy("least_loaded")
    assert ll.order(["a", "b", "c"], {"a": 3, "b": 1, "c": 1}) == ["b", "c", "a"]
    assert ll.order(["a", "b", "c"], {"a": 3, "b": 1, "c": 1}, {"a": 99}) == ["b", "c", "a"]  # prefixes are not


def test_unknown_policy_names_the_key():
    with pytest.raises(ValueError, match=r"^route\.policy: expected kv\|round_robin\|least_loaded"):
        Policy("random")
