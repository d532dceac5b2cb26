"""The prefill group inside the daemon: `[prefill.parallel]` makes the worker own a group
that prefills long prompts whole; output is token-identical to the offline engine, and a
rank killed mid-prefill fails the in-flight request with 500 (no hang) while the worker
restarts with a new group and serves the next request."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import pytest

from harness import log_events, start_daemon, wait_for
from kvd import LLM, SamplingParams
from kvd.client import AsyncClient, Client, KvdError
from kvd.worker.models import load_tokenizer

pytestmark = pytest.mark.timeout(300)

TEXT = ("The old map showed a road through the forest that no one had walked in a hundred years, "
        "and the travellers argued about whether the bridge at the river would still stand. ") * 20  # fmt: skip


@pytest.fixture(scope="module")
def group_daemon(tmp_path_factory, smollm2_dir):
    d = start_daemon(tmp_path_factory.mktemp("group"), smollm2_dir, model={"threads": 1},
                     cache={"num_blocks": 512}, prefill={"group_min_tokens": 64},
                     **{"prefill.parallel": {"sp": 2, "collective_timeout_s": 20.0}})  # fmt: skip
    yield d
    d.stop()


def test_daemon_prefills_long_prompts_on_the_group_token_identical(group_daemon, smollm2_dir):
    ids = load_tokenizer(smollm2_dir).encode(TEXT, add_special_tokens=False)
    prompts = [ids[:17], ids[:300], ids[5:305][::-1]]  # 17: below group_min_tokens, on the worker
    with Client(group_daemon.endpoint, timeout=180) as c:
        got = [c.generate(prompt_token_ids=p, max_tokens=10, temperature=0.0).token_ids for p in prompts]
    refs = LLM(str(smollm2_dir), dtype="float32").generate(prompts, SamplingParams(max_tokens=10, temperature=0.0, logprobs=2))
    for g, ref in zip(got, refs):
        for step, (a, b) in enumerate(zip(g, ref.token_ids)):
            if a != b:  # only a near tie may flip a greedy token
                lp = ref.logprobs[step].top_logprobs
                assert lp[0] - lp[1] < 1e-3, f"diverged at step {step}"
                break
        else:
            assert g == ref.token_ids
    assert log_events(group_daemon.log_file, "prefill_group_ready")


def test_a_killed_rank_fails_the_request_and_the_worker_restarts(group_daemon, smollm2_dir):
    ids = load_tokenizer(smollm2_dir).encode(TEXT, add_special_tokens=False)
    ready = log_events(group_daemon.log_file, "prefill_group_ready")[-1]
    victim = ready["rank_pids"][1]

    async def go():
        async with AsyncClient(group_daemon.endpoint, timeout=120) as c:
            prompt = [t + 1 for t in (ids * 3)[:1500]]  # no prefix hit: the whole prompt goes to the group
            task = asyncio.ensure_future(c.generate(prompt_token_ids=prompt, max_tokens=4))
            await asyncio.sleep(0.7)  # inside the group's prefill (a few seconds for 1,500 tokens)
            os.kill(victim, signal.SIGKILL)
            t0 = time.monotonic()
            with pytest.raises(KvdError) as e:
                await task
            return e.value, time.monotonic() - t0

    err, waited = asyncio.run(go())
    assert err.code == 500 and "worker-0 died" in err.message and waited < 30
    wait_for(lambda: len(log_events(group_daemon.log_file, "prefill_group_ready")) >= 2, 120, "a new group")
    with Client(group_daemon.endpoint, timeout=180) as c:
        wait_for(lambda: c.status()["state"] == "ready", 120, "the restarted worker")
        r = c.generate(prompt_token_ids=ids[:200], max_tokens=4, temperature=0.0)
        assert len(r.token_ids) == 4
