"""PD through Redis and Mooncake Store, with real servers started by the tests (no mocks),
and `kvd launch pd` as users run it.

- `kvd launch pd --prefill 2 --decode 1 --pool redis`: greedy output identical to the
  offline engine; the same prompt sent twice at once so two prefill instances write the
  same keys together (already-exists is success); the router in front of the decode
  instance serves DIR/http_endpoint; SIGTERM stops every process.
- redis-server killed while a read is pending: 502, blocks back, integrity ok; restarted on
  its port, the next requests succeed (no sticky failure).
- a Redis pool too small for the load (maxmemory, no eviction): refused writes recompute on
  decode, the output is right, both instances stay up and clean.
- Mooncake (in a private loopback-only network namespace, see tests/isolation.py): parity
  through 1 prefill + 1 decode, then mooncake_master killed while a read is pending: 502.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import urllib.request
import signal
import subprocess
import sys

import pytest

from harness import log_events, wait_for
from isolation import run_isolated
from kvd.cache.storage import servers
from kvd.client import AsyncClient, KvdError
from kvd.spawn import daemon_env
from kvd.worker.models import load_tokenizer
from pd_harness import assert_matches, reference, run_all, start_decode, start_prefill, wait_clean, wait_linked

pytestmark = pytest.mark.timeout(400)

TEXT = ("A small boat left the harbour before dawn, its sail patched in three places, and the fisherman "
        "watched the clouds gather over the headland while gulls circled the mast. ") * 3  # fmt: skip


@pytest.fixture(scope="module")
def prompts(smollm2_dir):
    ids = load_tokenizer(smollm2_dir).encode(TEXT, add_special_tokens=False)
    return [ids[:1], ids[:16], ids[:95]]


@pytest.fixture(scope="module")
def refs(prompts, smollm2_dir):
    return reference(smollm2_dir, prompts, 10)


@pytest.fixture(scope="module")
def smollm2_ids(smollm2_dir):
    """Four different 95-token prompts (6 blocks each)."""
    ids = load_tokenizer(smollm2_dir).encode(TEXT * 2, add_special_tokens=False)
    return [ids[k : k + 95] for k in (0, 7, 19, 41)]


@pytest.fixture(scope="module")
def long_refs(smollm2_ids, smollm2_dir):
    return reference(smollm2_dir, smollm2_ids, 8)


def endpoint_of(d) -> str:
    return (d / "endpoint").read_text().strip()


def test_launch_pd_with_redis_two_prefill_instances(tmp_path, prompts, refs):
    run_dir = tmp_path / "pd"
    env = daemon_env()
    conf = tmp_path / "kvd.toml"
    conf.write_text('[model]\ndtype = "float32"\n')  # as the references
    proc = subprocess.Popen([sys.executable, "-m", "kvd.cli", "launch", "pd", "--prefill", "2", "--decode", "1",
                             "--pool", "redis", "--run-dir", str(run_dir), "--http-port", "0",
                             "--config", str(conf)], env=env,
                            stdout=(tmp_path / "launch.txt").open("w"), stderr=subprocess.STDOUT)  # fmt: skip
    try:
        wait_for(lambda: (run_dir / "endpoint").exists() or proc.poll() is not None, 300, "kvd launch")
        assert proc.poll() is None, (tmp_path / "launch.txt").read_text()[-3000:]
        endpoint = endpoint_of(run_dir)  # the router's, in front of the decode instance
        from harness import DaemonHandle

        decode = DaemonHandle(proc, endpoint_of(run_dir / "decode-0"), run_dir / "decode-0",
                              run_dir / "decode-0" / "kvd.log", tmp_path)  # fmt: skip
        wait_linked(decode)
        # Every prompt twice at once: the two prefill instances write the same keys together.
        served = run_all(endpoint, prompts + prompts, 10)
        for i, got in enumerate(served):
            assert not isinstance(got, KvdError), got
            assert_matches(got[0], refs[i % len(prompts)], f"redis prompt {i}")
        prefills = [DaemonHandle(proc, endpoint_of(run_dir / f"prefill-{i}"), run_dir / f"prefill-{i}",
                                 run_dir / f"prefill-{i}" / "kvd.log", tmp_path) for i in range(2)]  # fmt: skip
        stats = wait_clean(decode, *prefills)
        assert all(s["pd"]["handoffs"] >= 1 for s in stats[1:]), "both prefill instances served"
        pids = [e["pid"] for e in log_events(tmp_path / "launch.txt", "pool_server_started")] or []
        # The OpenAI HTTP API: the router's, in front of the decode instance (the prefill ones serve none).
        url = (run_dir / "http_endpoint").read_text().strip()
        assert url != (run_dir / "decode-0" / "http_endpoint").read_text().strip()
        assert not any((run_dir / f"prefill-{i}" / "http_endpoint").exists() for i in range(2))
        body = json.dumps({"prompt": prompts[0], "max_tokens": 10, "temperature": 0}).encode()
        with urllib.request.urlopen(urllib.request.Request(url + "/v1/completions", data=body), timeout=60) as r:
            assert r.headers["X-Kvd-Instance"] == "decode-0"
            assert json.loads(r.read())["choices"][0]["text"] == refs[0].text
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(90)
    assert code == 0, (tmp_path / "launch.txt").read_text()[-3000:]
    assert not any((run_dir / f).exists() for f in ("endpoint", "http_endpoint", "endpoints"))
    assert log_events(run_dir / "route" / "kvd.log", "route_stopped")[0]["exit_code"] == 0
    for pid in pids:  # the redis-server it started is gone
        assert not os.path.exists(f"/proc/{pid}") or "zombie" in open(f"/proc/{pid}/status").read().lower()


@pytest.fixture(scope="module")
def redis_pd(tmp_path_factory, smollm2_dir):
    root = tmp_path_factory.mktemp("pd-redis")
    server = servers.RedisServer()
    pool = {"pool": "redis", "redis_url": server.url}
    p = start_prefill(root / "p", smollm2_dir, pool)
    d = start_decode(root / "d", smollm2_dir, p, {**pool, "fault_read_delay_s": 2.0})
    wait_linked(d)
    yield server, p, d
    d.stop()
    p.stop()
    server.stop()


def test_redis_outage_is_a_502_then_traffic_succeeds_once_it_is_back(redis_pd, prompts, refs):
    # FAILURE_MODES #17: the outage fails the request in flight; no sticky state fails the
    # ones after it once the server is back.
    server, _, d = redis_pd

    async def go():
        async with AsyncClient(d.endpoint, timeout=60) as c:
            task = asyncio.ensure_future(c.generate(prompt_token_ids=prompts[2], max_tokens=4, temperature=0.0))
            await asyncio.get_running_loop().run_in_executor(
                None, lambda: wait_for(lambda: log_events(d.log_file, "kv_read_started"), 60, "the read"))
            server.kill()
            with pytest.raises(KvdError) as e:
                await task
            return e.value

    err = asyncio.run(go())
    assert err.code == 502 and "redis" in err.message.lower()
    wait_clean(d)
    back = servers.RedisServer(port=server.port)
    try:
        for got, ref, k in zip(run_all(d.endpoint, prompts, 10), refs, range(len(prompts))):
            assert not isinstance(got, Exception), f"prompt {k} after the outage: {got}"
            assert_matches(got[0], ref, f"prompt {k} after the outage")
        wait_clean(*redis_pd[1:])
    finally:
        back.stop()


def test_a_pool_too_small_for_the_load_recomputes_and_stays_up(tmp_path, smollm2_dir, smollm2_ids, long_refs):
    # FAILURE_MODES #14: a Redis pool of 2 MB (no eviction) refuses most puts of four
    # 6-block prompts (about 0.7 MB a block); each refused write fails that handoff, decode
    # recomputes it (`on_kv_failure = "recompute"`), the output is right and nothing leaks.
    server = servers.RedisServer(maxmemory="2mb", policy="noeviction")
    pool = {"pool": "redis", "redis_url": server.url}
    p = start_prefill(tmp_path / "p", smollm2_dir, pool)
    d = start_decode(tmp_path / "d", smollm2_dir, p, {**pool, "on_kv_failure": "recompute"})
    try:
        wait_linked(d)
        outs = run_all(d.endpoint, smollm2_ids, 8)
        for got, ref, k in zip(outs, long_refs, range(len(outs))):
            assert not isinstance(got, Exception), f"prompt {k}: {got}"
            assert_matches(got[0], ref, f"prompt {k}")
        assert log_events(d.log_file, "kv_recompute") and log_events(p.log_file, "prefill_replied")
        refused = [e for e in log_events(p.log_file, "kv_write") if e.get("ok") is False]
        assert refused, "the pool refused no write: it was not too small"
        assert all("maxmemory" in e["error"] for e in refused), refused  # the server's own reason
        assert p.proc.poll() is None and d.proc.poll() is None
        wait_clean(p, d)
    finally:
        d.stop()
        p.stop()
        server.stop()


@pytest.mark.skipif(importlib.util.find_spec("mooncake") is None, reason="mooncake not installed")
def test_mooncake_parity_and_master_killed_mid_read(tmp_path, smollm2_dir, prompts, refs):
    def scenario():
        mc = servers.MooncakeServers()
        try:
            pool = {"pool": "mooncake", "mooncake_master": mc.master_address,
                    "mooncake_metadata": mc.metadata_server, "mooncake_segment_gb": 0.25}  # fmt: skip
            env = servers.mooncake_env()
            p = start_prefill(tmp_path / "p", smollm2_dir, pool, env=env)
            d = start_decode(tmp_path / "d", smollm2_dir, p, pool, env=env)
            slow = start_decode(tmp_path / "s", smollm2_dir, p, {**pool, "fault_read_delay_s": 2.0}, env=env)
            try:
                wait_linked(d)
                served = run_all(d.endpoint, prompts, 10)
                for i, (got, ref) in enumerate(zip(served, refs)):
                    assert not isinstance(got, KvdError), got
                    assert_matches(got[0], ref, f"mooncake prompt {i}")
                wait_clean(p, d)
                wait_linked(slow)

                async def killed():
                    async with AsyncClient(slow.endpoint, timeout=60) as c:
                        task = asyncio.ensure_future(c.generate(prompt_token_ids=prompts[2][::-1], max_tokens=4))
                        await asyncio.get_running_loop().run_in_executor(None, lambda: wait_for(
                            lambda: log_events(slow.log_file, "kv_read_started"), 60, "the read"))
                        mc.kill()
                        try:
                            await task
                        except KvdError as e:
                            return e
                        return None

                err = asyncio.run(killed())
                assert err is not None and err.code == 502, err
                wait_clean(slow)
            finally:
                for x in (slow, d, p):
                    x.stop()
        finally:
            mc.stop()

    run_isolated(scenario, timeout_s=360)
