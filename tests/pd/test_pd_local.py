"""PD through the embedded local pool (LMDB): real prefill and decode daemons, no mocks.

Parity with the offline engine for prompts of 1 token, block_size - 1, exactly one block,
two blocks and many blocks plus a partial one; 300 requests aborted at random points of
the chain; a corrupted stored block (502, never tokens); keys deleted or corrupted between
write and read (recompute gives the right tokens); a lease expiring while the read is in
flight (504, blocks back); kill -9 of the prefill instance (502 within the heartbeat
timeout). Every scenario ends with both instances idle, no block held, integrity ok.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import time

import lmdb
import pytest

from harness import log_events, wait_for
from kvd.cache.storage.keys import request_keys
from kvd.cache.storage.local import LocalPool
from kvd.client import AsyncClient, Client, KvdError
from kvd.worker.models import load_tokenizer
from pd_harness import (
    assert_matches,
    reference,
    run_all,
    start_decode,
    start_prefill,
    wait_clean,
    wait_linked,
)

pytestmark = pytest.mark.timeout(300)

TEXT = (
    "The history of the lighthouse begins in the ancient world, where fires burned on hilltops to guide "
    "ships home. Over the centuries keepers tended lamps of oil and then of kerosene, polishing lenses and "
    "winding clockwork that turned the light through the night. Today most lights are automatic, yet the "
    "towers still stand on rocky coasts, white and red against the sea, and sailors still look for them "
    "when the weather turns and the harbour is hidden by rain. Engineers who built them had to reckon with "
    "waves that could move boulders, with salt that ate iron, and with the long isolation of the men and "
    "women who lived inside."
)


@pytest.fixture(scope="module")
def prompts(smollm2_dir):
    ids = load_tokenizer(smollm2_dir).encode(TEXT + " " + TEXT, add_special_tokens=False)
    assert len(ids) >= 150
    # 1 token, block_size - 1, exactly one block, two blocks, many blocks plus a partial one.
    return [ids[:1], ids[:15], ids[:16], ids[:32], ids[:150]]


@pytest.fixture(scope="module")
def pd(tmp_path_factory, smollm2_dir):
    root = tmp_path_factory.mktemp("pd-local")
    pool = {"local_path": str(root / "pool"), "local_capacity_gb": 1.0}
    p = start_prefill(root / "p", smollm2_dir, pool)
    d = start_decode(root / "d", smollm2_dir, p, pool, http={"port": 0})
    wait_linked(d)
    d.url = (d.run_dir / "http_endpoint").read_text().strip()
    yield p, d, root / "pool"
    assert d.stop() == 0
    if p.proc.poll() is None:
        assert p.stop() == 0


def namespace(d) -> str:
    with Client(d.endpoint, timeout=10) as c:
        return c.status()["pd"]["namespace"]


def test_pd_greedy_output_matches_the_offline_engine(pd, prompts, smollm2_dir):
    p, d, _ = pd
    max_tokens = 12
    served = run_all(d.endpoint, prompts, max_tokens)
    refs = reference(smollm2_dir, prompts, max_tokens)
    for i, (got, ref) in enumerate(zip(served, refs)):
        assert not isinstance(got, KvdError), f"prompt {i}: {got}"
        ids, finish = got
        assert finish == ref.finish_reason
        assert_matches(ids, ref, f"prompt of {len(prompts[i])} tokens")
    # Chat prompts, through the same chain.
    conv = [{"role": "user", "content": "Name three colours."}]
    with Client(d.endpoint, timeout=120) as c:
        r = c.generate(chat=conv, max_tokens=10, temperature=0.0)
    from kvd import LLM, SamplingParams

    ref = LLM(str(smollm2_dir), dtype="float32").chat([conv], SamplingParams(max_tokens=10, temperature=0.0))[0]
    assert r.token_ids == ref.token_ids and r.text == ref.text
    pst, dst = wait_clean(p, d)
    assert dst["pd"]["handoffs"] >= len(prompts) + 1 and dst["pd"]["kv_failures"] == 0
    assert pst["pd"]["handoffs"] >= len(prompts) + 1
    # Each step of the chain is a named, timed event on both sides.
    for event in ("kv_preallocated", "prefill_dispatched", "prefill_done", "kv_read_started", "kv_admitted"):
        assert all("duration_ms" in e and e["role"] == "decode" for e in log_events(d.log_file, event)), event
        assert log_events(d.log_file, event), event
    for event in ("prefill_received", "prefill_first_token", "kv_written", "prefill_replied"):
        assert log_events(p.log_file, event), event
    # The pool holds every block of every prompt, the partial ones under <hash>:partial:<N>.
    with LocalPool(pd[2], capacity_bytes=2**30) as pool:
        keys = request_keys(namespace(d), prompts[4], 16)
        assert keys[-1].endswith(":partial:6") and all(pool.exists(keys))


def test_n_choices_and_logprobs_through_pd(pd, smollm2_dir):
    """n = 3 crosses the pool once (one handoff) and gives what the offline engine gives;
    logprobs come back through the chain (the first token's from the prefill instance)."""
    p, d, _ = pd
    with Client(d.endpoint, timeout=10) as c:
        before = c.status()["pd"]["handoffs"]
    with Client(d.endpoint, timeout=120) as c:
        outs = c.generate(prompt="The three primary colours are", n=3, max_tokens=8, temperature=1.0, seed=5,
                          logprobs=2, ignore_eos=True)  # fmt: skip
    from kvd import LLM, SamplingParams

    refs = LLM(str(smollm2_dir), dtype="float32").generate(
        "The three primary colours are", SamplingParams(n=3, max_tokens=8, temperature=1.0, seed=5, logprobs=2,
                                                        ignore_eos=True))  # fmt: skip
    assert [o.token_ids for o in outs] == [r.token_ids for r in refs]
    for o, r in zip(outs, refs):
        assert len(o.logprobs) == 8 and all(abs(a.logprob - b.logprob) < 1e-3 for a, b in zip(o.logprobs, r.logprobs))
    _, dst = wait_clean(p, d)
    assert dst["pd"]["handoffs"] == before + 1


def test_structured_output_through_pd(pd):
    """The first token (sampled on the prefill instance) obeys the grammar, and the decode
    instance's matcher continues from it."""
    import re

    p, d, _ = pd
    phone = r"\(\d{3}\) \d{3}-\d{4}"
    with Client(d.endpoint, timeout=120) as c:
        outs = c.generate(prompt="My number is", n=3, max_tokens=24, temperature=1.0, seed=2,
                          structured_outputs={"regex": phone})  # fmt: skip
    assert all(re.fullmatch(phone, o.text) and o.finish_reason == "stop" for o in outs), [o.text for o in outs]
    wait_clean(p, d)


def test_tool_calls_through_pd(pd):
    """Named and required tool choices over the decode instance's HTTP API: their grammar
    holds across the handoff (the first token comes from the prefill instance)."""
    import json

    import jsonschema
    import openai

    p, d, _ = pd
    params = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                               "days": {"type": "integer", "minimum": 1, "maximum": 7}},
              "required": ["city", "days"], "additionalProperties": False}  # fmt: skip
    tools = [{"type": "function", "function": {"name": "forecast", "parameters": params}}]
    sdk = openai.OpenAI(base_url=d.url + "/v1", api_key="none", max_retries=0, timeout=120)
    ask = [{"role": "user", "content": "Weather in Oslo for three days?"}]
    for choice in ({"type": "function", "function": {"name": "forecast"}}, "required"):
        r = sdk.chat.completions.create(model=None, messages=ask, tools=tools, tool_choice=choice, n=3, max_tokens=60,
                                        temperature=1.0, seed=6)  # fmt: skip
        for c in r.choices:
            assert c.message.tool_calls and c.finish_reason in ("stop", "tool_calls"), c
            for call in c.message.tool_calls:
                jsonschema.validate(json.loads(call.function.arguments), params)
    wait_clean(p, d)


def test_prefill_role_refuses_client_generate(pd):
    p, _, _ = pd
    with Client(p.endpoint, timeout=10) as c:
        with pytest.raises(KvdError) as e:
            c.generate(prompt="hello", max_tokens=2)
    assert e.value.code == 400 and "prefill instance" in e.value.message


def test_300_requests_aborted_at_random_points_of_the_chain(pd, prompts, smollm2_dir):
    p, d, _ = pd
    rng = random.Random(7)
    base = prompts[4][:64]  # short prompts: the point is the chain's steps, not load on 2 cores

    async def one(i: int, sem: asyncio.Semaphore):
        n = rng.randint(1, len(base))
        prompt = base[len(base) - n :] if i % 3 else base[:n]
        cut = rng.choice([0, 1, 2, 3, None])  # abort after this many chunks (0: as soon as accepted)
        delay = rng.uniform(0, 0.3)
        async with sem, AsyncClient(d.endpoint, timeout=120) as c:
            if cut == 0:
                rid = f"abort-{i}"
                task = asyncio.ensure_future(_drain(c, prompt, rid))
                await asyncio.sleep(delay)
                await c.abort(rid)
                return await task
            got = 0
            try:
                async for chunk in c.stream(prompt_token_ids=prompt, max_tokens=6, temperature=0.0):
                    got += 1
                    if cut is not None and got >= cut:
                        break  # leaving the stream aborts the request
            except KvdError as e:
                return e.code
            return "ok"

    async def _drain(c, prompt, rid):
        try:
            async for _ in c.stream(prompt_token_ids=prompt, max_tokens=6, temperature=0.0, request_id=rid):
                pass
        except KvdError as e:
            return e.code
        return "ok"

    async def go():
        sem = asyncio.Semaphore(16)
        return await asyncio.gather(*(one(i, sem) for i in range(300)))

    results = asyncio.run(go())
    assert all(r == "ok" for r in results), {r for r in results if r != "ok"}
    wait_clean(p, d, timeout=60)
    phases = {e["phase"] for e in log_events(d.log_file, "handoff_aborted")}
    assert {"PREFILLING", "READING"} <= phases, phases  # aborts landed inside the chain, not only around it
    # Later requests still get exactly the right tokens (no block was freed under a transfer).
    served = run_all(d.endpoint, prompts[2:], 8)
    for got, ref, prompt in zip(served, reference(smollm2_dir, prompts[2:], 8), prompts[2:]):
        assert_matches(got[0], ref, f"after the abort storm, prompt of {len(prompt)}")
    wait_clean(p, d)


def corrupt(pool_dir, key: str) -> None:
    """Flip one payload byte of a stored object behind the pool's back."""
    env = lmdb.open(str(pool_dir), max_dbs=3, subdir=True, lock=True, map_size=3 * 2**30)
    try:
        db = env.open_db(b"objects")
        with env.begin(write=True, db=db) as txn:
            obj = bytearray(txn.get(key.encode()))
            obj[-100] ^= 0xFF
            txn.put(key.encode(), bytes(obj))
    finally:
        env.close()


def test_a_corrupted_stored_block_is_a_502_never_tokens(pd, prompts):
    p, d, pool_dir = pd
    prompt = list(reversed(prompts[4][:40]))  # new to the pool
    keys = request_keys(namespace(d), prompt, 16)
    # Store the prompt's blocks, then corrupt its partial block: the next handoff of the same
    # prompt finds it present (content-addressed, so the prefill does not overwrite it), and
    # the decode instance reads it (its own prefix cache holds the full blocks, never the
    # partial one) and must refuse it.
    with Client(d.endpoint, timeout=120) as c:
        c.generate(prompt_token_ids=prompt, max_tokens=2, temperature=0.0)
        corrupt(pool_dir, keys[-1])
        with pytest.raises(KvdError) as e:
            c.generate(prompt_token_ids=prompt, max_tokens=4, temperature=0.0)
    assert e.value.code == 502 and keys[-1].split("/")[-1] in e.value.message and "CORRUPT" in e.value.message
    wait_clean(p, d)


@pytest.fixture(scope="module")
def slow_decodes(pd, tmp_path_factory, smollm2_dir):
    """Decode instances whose messenger waits before each read: one that recomputes on failure,
    one whose lease runs out while the read is in flight."""
    p, _, pool_dir = pd
    root = tmp_path_factory.mktemp("pd-slow")
    pool = {"local_path": str(pool_dir), "local_capacity_gb": 1.0}
    recompute = start_decode(root / "r", smollm2_dir, p, {**pool, "on_kv_failure": "recompute",
                                                         "fault_read_delay_s": 2.0})  # fmt: skip
    expiring = start_decode(root / "e", smollm2_dir, p, {**pool, "lease_s": 2.5, "transfer_grace_s": 0.5,
                                                        "fault_read_delay_s": 3.5})  # fmt: skip
    wait_linked(recompute)
    wait_linked(expiring)
    yield recompute, expiring
    assert recompute.stop() == 0 and expiring.stop() == 0


@pytest.mark.parametrize("damage", ["delete", "corrupt"])
def test_kv_damaged_between_write_and_read_recomputes_the_right_tokens(pd, slow_decodes, prompts, smollm2_dir,
                                                                       damage):  # fmt: skip
    p, _, pool_dir = pd
    d, _ = slow_decodes
    prompt = [t + (1 if damage == "delete" else 2) for t in prompts[4][:70]]  # new to the pool
    keys = request_keys(namespace(d), prompt, 16)

    async def go():
        task = asyncio.ensure_future(run_one(d.endpoint, prompt))
        with LocalPool(pool_dir, capacity_bytes=2**30) as pool:  # the window: the messenger waits 2 s
            await asyncio.get_running_loop().run_in_executor(
                None, lambda: wait_for(lambda: all(pool.exists(keys)), 30, "the prefill's write"))
            if damage == "delete":
                assert pool.remove(keys[2:4]) == 2
        if damage == "corrupt":
            corrupt(pool_dir, keys[3])
        return await task

    ids = asyncio.run(go())
    assert_matches(ids, reference(smollm2_dir, [prompt], 10)[0], f"recomputed after {damage}")
    st = wait_clean(p, d)[1]
    assert st["pd"]["recomputes"] >= 1 and st["pd"]["kv_failures"] >= 1


async def run_one(endpoint, prompt, max_tokens: int = 10):
    async with AsyncClient(endpoint, timeout=120) as c:
        out = await c.generate(prompt_token_ids=prompt, max_tokens=max_tokens, temperature=0.0)
        return out.token_ids


def test_lease_expiring_while_the_read_is_in_flight_is_a_504_and_blocks_return(pd, slow_decodes, prompts):
    p, _, _ = pd
    _, d = slow_decodes
    t0 = time.monotonic()
    with Client(d.endpoint, timeout=60) as c:
        with pytest.raises(KvdError) as e:
            c.generate(prompt_token_ids=prompts[3], max_tokens=4, temperature=0.0)
    assert e.value.code == 504 and time.monotonic() - t0 < 15
    # The messenger finishes its (late) read without touching the blocks; then they return.
    wait_clean(p, d)


def test_a_slow_pool_write_is_never_read_early(pd, tmp_path, prompts, smollm2_dir):
    # FAILURE_MODES #11: the first token, and so the read, come only after every write
    # reported success — however slow the pool is to take it.
    _, _, pool_dir = pd
    pool = {"local_path": str(pool_dir), "local_capacity_gb": 1.0}
    p = start_prefill(tmp_path / "p", smollm2_dir, {**pool, "fault_write_delay_s": 1.5})
    d = start_decode(tmp_path / "d", smollm2_dir, p, pool)
    try:
        wait_linked(d)
        prompt = prompts[4][3:]  # a prompt no earlier test wrote
        (got,) = run_all(d.endpoint, [prompt], 6)
        assert_matches(got[0], reference(smollm2_dir, [prompt], 6)[0], "after a slow write")
        (written,) = log_events(p.log_file, "kv_written")
        (done,) = log_events(d.log_file, "prefill_done")
        (read,) = log_events(d.log_file, "kv_read_started")
        (write,) = [e for e in log_events(p.log_file, "kv_write") if e["process"] == "messenger"]
        assert write["duration_ms"] >= 1500
        assert written["ts"] <= done["ts"] <= read["ts"], (written["ts"], done["ts"], read["ts"])
        wait_clean(p, d)
    finally:
        d.stop()
        p.stop()


def test_killed_messengers_are_restarted_with_the_kv_cache_mapped_and_traffic_goes_on(pd, prompts, smollm2_dir):
    """kill -9 of either instance's cache messenger: the daemon starts a new one, which maps
    the running worker's KV cache (MapKV); the next handoff writes and reads through both."""
    p, d, _ = pd
    killed = {}
    for daemon in (p, d):
        with Client(daemon.endpoint, timeout=10) as c:
            old = killed[daemon.run_dir] = c.status()["processes"]["messenger"]["pid"]
            os.kill(old, signal.SIGKILL)

            def restarted(c=c, old=old):
                m = c.status()["processes"]["messenger"]
                return m["alive"] and m["pid"] != old

            wait_for(restarted, 60, "a new messenger")
    prompt = prompts[4][7:]  # a prompt no earlier test wrote
    (got,) = run_all(d.endpoint, [prompt], 6)
    assert_matches(got[0], reference(smollm2_dir, [prompt], 6)[0], "through the restarted messengers")
    for daemon in (p, d):
        (event,) = [e for e in log_events(daemon.log_file, "child_restarted") if e["child"] == "messenger"]
        assert event["child_pid"] != killed[daemon.run_dir]
    (read,) = [e for e in log_events(d.log_file, "kv_read") if e["process"] == "messenger"][-1:]
    assert read["num_blocks"] == len(prompt) // 16 + 1, read
    wait_clean(p, d)


def test_kill_prefill_mid_request_fails_fast_with_502(pd, prompts):
    """Last in this module: it kills the shared prefill instance."""
    p, d, _ = pd
    long_prompt = (prompts[4] * 10)[:1400]  # a prefill of a few seconds

    async def go():
        task = asyncio.ensure_future(run_one(d.endpoint, long_prompt))
        await asyncio.get_running_loop().run_in_executor(
            None, lambda: wait_for(lambda: log_events(p.log_file, "prefill_received")[-1:]
                                   and log_events(p.log_file, "prefill_received")[-1]["num_tokens"] == 1400,
                                   30, "the prefill to start"))  # fmt: skip
        os.kill(p.proc.pid, signal.SIGKILL)
        t_kill = time.monotonic()
        try:
            await task
        except KvdError as e:
            return e, time.monotonic() - t_kill
        raise AssertionError("the request succeeded without its prefill instance")

    err, waited = asyncio.run(go())
    assert err.code == 502 and "stopped answering" in err.message
    assert waited < 3.0 + 3.0  # heartbeat_timeout_s plus a tick or two, never the whole lease
    wait_clean(d)
