"""Two prefill instances behind one decode instance: cross-instance prefix reuse through
the pool (`prefix_from_pool`), a prefill instance drained by SIGTERM mid-request, and
failover when a prefill instance dies mid-request."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import pytest

from harness import log_events, wait_for
from kvd.client import AsyncClient, Client
from kvd.worker.models import load_tokenizer
from pd_harness import assert_matches, reference, start_prefill, wait_clean, wait_linked

pytestmark = pytest.mark.timeout(300)

TEXT = ("Rivers carve valleys over thousands of years, carrying silt to the plains where farmers "
        "have grown wheat and barley since the first villages were built beside the water. ") * 12  # fmt: skip


@pytest.fixture(scope="module")
def two_prefills(tmp_path_factory, smollm2_dir):
    """[p0, p1, d]; a test that stops a prefill instance puts its restarted handle back."""
    root = tmp_path_factory.mktemp("pd-two")
    pool = {"local_path": str(root / "pool"), "local_capacity_gb": 1.0}
    p0 = start_prefill_of_two(root / "p0", smollm2_dir, pool)
    p1 = start_prefill_of_two(root / "p1", smollm2_dir, pool)
    d = start_daemon_two(root / "d", smollm2_dir, [p0, p1], pool)
    wait_linked(d)
    insts = [p0, p1, d]
    yield insts
    for x in insts:
        if x.proc.poll() is None:
            x.stop()


def start_prefill_of_two(root, model_dir, pool):
    # Their own prefix caches off: a prompt's shared prefix can only come from the pool.
    return start_prefill(root, model_dir, {**pool, "prefix_from_pool": True},
                         cache={"num_blocks": 512, "enable_prefix_caching": False})  # fmt: skip


def start_daemon_two(root, model_dir, prefills, pool):
    from harness import start_daemon
    from pd_harness import FAST, ONE_THREAD, SECRET

    return start_daemon(root, model_dir, daemon={"role": "decode", **FAST}, cache={"num_blocks": 512}, model=ONE_THREAD,
                        pd={**pool, "prefill_endpoints": [str(p.run_dir) for p in prefills],
                            "heartbeat_timeout_s": 3.0, "secret": SECRET})  # fmt: skip


async def generate(endpoint, prompt, max_tokens=10):
    async with AsyncClient(endpoint, timeout=120) as c:
        return (await c.generate(prompt_token_ids=prompt, max_tokens=max_tokens, temperature=0.0)).token_ids


async def taker_of(num_tokens, *prefills):
    """The prefill instance that received the PrefillRequest of a `num_tokens` prompt."""

    def taken():
        for p in prefills:
            if any(e["num_tokens"] == num_tokens for e in log_events(p.log_file, "prefill_received")):
                return p
        return None

    return await asyncio.to_thread(wait_for, taken, 60, f"a prefill instance to take the {num_tokens}-token prompt")


def test_prefix_from_pool_reads_the_shared_prefix_and_matches(two_prefills, smollm2_dir):
    p0, p1, d = two_prefills
    ids = load_tokenizer(smollm2_dir).encode(TEXT, add_special_tokens=False)
    a, b = ids[:200], ids[:192] + ids[300:340]  # b shares a's first 12 blocks
    got_a = asyncio.run(generate(d.endpoint, a))
    got_b = asyncio.run(generate(d.endpoint, b))
    ref_a, ref_b = reference(smollm2_dir, [a, b], 10)
    assert_matches(got_a, ref_a, "first prompt")
    assert_matches(got_b, ref_b, "prompt with its prefix in the pool")
    reads = [e for p in (p0, p1) for e in log_events(p.log_file, "kv_prefix_read")]
    assert any(e["num_tokens"] == 192 for e in reads), reads  # 12 blocks read, not recomputed
    wait_clean(p0, p1, d)


def test_a_draining_prefill_instance_finishes_its_handoff_and_sheds_new_ones(two_prefills, smollm2_dir):
    # SIGTERM to a prefill instance mid-prefill: it finishes that handoff (PrefillDone, the
    # right tokens), refuses new ones, tells decode it drains, and exits 0; requests sent
    # meanwhile go to the other instance (or fail over to it when refused) and all succeed.
    p0, p1, d = two_prefills
    ids = load_tokenizer(smollm2_dir).encode(TEXT, add_special_tokens=False)
    long = (ids * 4)[3:1003]
    shorts = [(ids * 2)[k : k + 40] for k in (11, 53, 97, 131)]

    async def go():
        first = asyncio.ensure_future(generate(d.endpoint, long, 8))
        victim = await taker_of(len(long), p0, p1)
        victim.proc.send_signal(signal.SIGTERM)
        rest = await asyncio.gather(*(generate(d.endpoint, s, 6) for s in shorts))
        return await first, rest, victim

    out, rest, victim = asyncio.run(go())
    assert_matches(out, reference(smollm2_dir, [long], 8)[0], "the handoff in flight at SIGTERM")
    for got, ref, k in zip(rest, reference(smollm2_dir, shorts, 6), range(4)):
        assert_matches(got, ref, f"request {k} sent during the drain")
    assert victim.proc.wait(30) == 0
    (drain,) = log_events(victim.log_file, "prefill_draining")
    assert drain["in_flight"] >= 1
    (received,) = [e for e in log_events(victim.log_file, "prefill_received") if e["num_tokens"] == len(long)]
    replies = [e["message"] for e in log_events(victim.log_file, "prefill_replied")
               if e["request_id"] == received["request_id"]]  # fmt: skip
    assert replies == ["PrefillDone"], replies
    refused = log_events(victim.log_file, "prefill_refused")
    failovers = [e for e in log_events(d.log_file, "prefill_failover") if "reason" in e]
    assert len(failovers) == len(refused), (refused, failovers)
    # Back in service from the same run directory; decode finds it again.
    i = two_prefills.index(victim)
    two_prefills[i] = start_prefill_of_two(victim.run_dir.parent, smollm2_dir,
                                           {"local_path": str(victim.run_dir.parent.parent / "pool"),
                                            "local_capacity_gb": 1.0})  # fmt: skip
    with Client(d.endpoint, timeout=10) as c:
        wait_for(lambda: any(x["alive"] and x["instance"].endswith(f":{two_prefills[i].proc.pid}")
                             for x in c.status()["pd"]["prefill_instances"]),
                 60, "the decode instance to link the restarted prefill instance")  # fmt: skip
    wait_clean(*two_prefills)


def test_a_dead_prefill_instance_fails_over_to_the_other(two_prefills, smollm2_dir):
    p0, p1, d = two_prefills
    ids = load_tokenizer(smollm2_dir).encode(TEXT, add_special_tokens=False)
    prompt = (ids * 4)[7:1207]

    async def go():
        task = asyncio.ensure_future(generate(d.endpoint, prompt, 8))
        victim = await taker_of(len(prompt), p0, p1)
        os.kill(victim.proc.pid, signal.SIGKILL)
        t0 = time.monotonic()
        out = await task
        return out, time.monotonic() - t0, victim

    out, waited, victim = asyncio.run(go())
    assert_matches(out, reference(smollm2_dir, [prompt], 8)[0], "after failover")
    assert log_events(d.log_file, "prefill_failover")
    survivor = p1 if victim is p0 else p0
    wait_clean(survivor, d)
