"""kvd.bench.route's workload and figures, without daemons: the users are the same for the same
seed and sized as documented, and a run's figures come out of its turns as documented."""

import pytest

from kvd.bench.route import BLOCKS_FRACTION, parse, targets
from kvd.bench.route_client import RunStats, Turn
from kvd.bench.route_workload import (
    MESSAGE_TOKENS,
    START_S,
    SYSTEM_TOKENS,
    THINK_S,
    conversation,
    conversation_blocks,
    make_users,
)
from kvd.engine.text import TextStage
from kvd.worker.models import load_tokenizer


@pytest.fixture(scope="module")
def text(smollm2_dir) -> TextStage:
    return TextStage(load_tokenizer(smollm2_dir))


def counter(text: TextStage):
    return lambda s: len(text.tokenizer.encode(s, add_special_tokens=False))


def test_the_users_are_the_same_for_the_same_seed_and_sized_as_documented(text):
    count = counter(text)
    users = make_users(6, 3, seed=0, count=count)
    assert users == make_users(6, 3, seed=0, count=count)
    assert users[:2] == make_users(2, 3, seed=0, count=count)  # user u does not depend on --users
    assert [u.system for u in make_users(6, 3, seed=1, count=count)] != [u.system for u in users]
    firsts = set()
    for u in users:
        assert SYSTEM_TOKENS <= count(u.system) <= SYSTEM_TOKENS + 30
        assert len(u.messages) == len(u.waits) == 3
        assert all(MESSAGE_TOKENS[0] <= count(m) <= MESSAGE_TOKENS[1] + 5 for m in u.messages)
        assert 0 <= u.waits[0] <= START_S and all(THINK_S[0] <= w <= THINK_S[1] for w in u.waits[1:])
        firsts.add(tuple(text.chat_ids(conversation(u, []))[:16]))
    assert len(firsts) == len(users)  # no two users share their first KV block


def test_a_conversation_and_the_blocks_it_fills(text):
    u = make_users(1, 3, seed=0, count=counter(text))[0]
    turn2 = conversation(u, ["first answer", "second answer"])
    assert [m["role"] for m in turn2] == ["system", "user", "assistant", "user", "assistant", "user"]
    assert turn2[-1]["content"] == u.messages[2] and turn2[2]["content"] == "first answer"
    (blocks,) = conversation_blocks([u], lambda m: len(text.chat_ids(m)), max_tokens=32, block_size=16)
    last = len(text.chat_ids(conversation(u, [" ".join(["word"] * 32)] * 2))) + 32
    assert blocks == -(-last // 16)
    assert 0.5 < BLOCKS_FRACTION < 1  # one instance cannot hold every conversation, two can


def turn(user: int, n: int, instance: str, ttft: float, prompt: int, cached: int) -> Turn:
    return Turn(user, n, instance, sent_s=float(n), ttft_s=ttft, done_s=n + 1.0, prompt_tokens=prompt,
                cached_tokens=cached, completion_tokens=32, answer="")  # fmt: skip


def test_run_stats():
    turns = [turn(0, 0, "a", 1.0, 1000, 0), turn(0, 1, "a", 0.1, 1100, 992), turn(0, 2, "b", 0.9, 1200, 0),
             turn(1, 0, "b", 2.0, 1000, 0), turn(1, 1, "b", 0.2, 1100, 992)]  # fmt: skip
    s = RunStats.of(turns, wall_s=4.0)
    assert s.requests == 5 and s.hit_rate == pytest.approx(1984 / 5400)
    assert s.ttft_p50_ms == pytest.approx(900) and 1000 < s.ttft_p99_ms <= 2000
    assert s.tok_s == 40 and s.per_instance == {"a": 2, "b": 3} and s.moves == 1  # user 0's third turn moved
    base = RunStats.of(turns[:2], 1.0)
    lines = targets({(1, "baseline"): base, (2, "kv"): s, (2, "round_robin"): s}, 2)
    assert "NOT met" in lines[0] and lines[1].endswith("(target >= 2.0: NOT met)")


def test_flags():
    a = parse([])
    assert (a.users, a.turns, a.instances, a.max_tokens, a.overhead) == (24, 6, [2, 3], None, False)
    assert a.policies == ["kv", "round_robin", "least_loaded"]
    assert parse(["--instances", "3,2", "--policies", "kv"]).instances == [2, 3]
    with pytest.raises(SystemExit):
        parse(["--policies", "random"])


def test_help(capsys):
    with pytest.raises(SystemExit) as e:
        parse(["--help"])
    assert e.value.code == 0 and "--overhead" in capsys.readouterr().out
