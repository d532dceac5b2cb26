"""The router's ZeroMQ client API: kvd.client against `kvd route` as against an instance.
A conversation follows its prefix and hits the cache, ids and aborts behave as on an
instance, `kvd status` shows the router, a killed instance fails its stream with 502 and
the next requests go elsewhere, and under thousands of requests with aborts no instance
leaks a block. Every wait is bounded."""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest
from harness import log_events, start_daemon, wait_for
from route_harness import SYSTEM, instance, post, start_router

from kvd.client import AsyncClient, Client, KvdError


def turn(question: str) -> list[dict]:
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}]


def test_a_conversation_follows_its_prefix_and_status_shows_the_router(routers):
    with Client(routers["kv"].zmq, timeout=60) as c:
        first = c.generate(chat=turn("Name a planet."), max_tokens=4, temperature=0.0)
        again = c.generate(chat=turn("Name a river."), max_tokens=4, temperature=0.0)
        assert again.num_cached_tokens >= 64  # the system prompt's blocks: where the first turn went
        assert len(first.token_ids) == 4
        st = c.status()
    assert st["role"] == "router" and st["policy"] == "kv" and st["state"] == "ready"
    assert set(st["instances"]) == {"a", "b"} and st["live_requests"] == 0
    load = st["instances"]["a"]["load"]  # the instance's own figures, from its KV events
    assert set(load) == {"waiting", "running", "free_blocks", "num_blocks", "cached_blocks"}
    assert load["num_blocks"] == 256 and load["free_blocks"] + load["cached_blocks"] <= 256
    assert sorted(i["requests"] for i in st["instances"].values())[-1] >= 2  # both turns on one instance
    out = subprocess.run([sys.executable, "-m", "kvd.cli", "status", "--endpoint", routers["kv"].zmq],
                         capture_output=True, text=True, timeout=60)  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("kvd router · ready") and "instance   a up" in out.stdout


def test_ids_bad_frames_and_aborts_behave_as_on_an_instance(routers, pair):
    async def run():
        async with AsyncClient(routers["round_robin"].zmq, timeout=60) as a, \
                AsyncClient(routers["round_robin"].zmq, timeout=60) as b:  # fmt: skip
            stream = a.stream(prompt="A long story. " + SYSTEM, request_id="z-1", max_tokens=400, ignore_eos=True)
            first = await anext(stream)
            assert first.token_ids
            with pytest.raises(KvdError) as e:  # another client, the same live id: the instance's 400
                await b.generate(prompt="again", request_id="z-1", max_tokens=2)
            assert e.value.code == 400 and "already in use" in e.value.message
            await stream.aclose()  # leaving the stream aborts the request on its instance

    asyncio.run(run())

    def aborted() -> list:
        return [d for d in pair.values()
                if any(e["request_id"] == "z-1" for e in log_events(d.log_file, "request_aborted"))]  # fmt: skip

    assert len(wait_for(aborted, 10, "the instance to abort the left stream")) == 1
    with Client(routers["round_robin"].zmq, timeout=30) as c:
        with pytest.raises(KvdError) as e:
            c.generate(prompt="x", max_tokens=-1)  # refused by the client itself, as for an instance
        assert e.value.code == 400
        wait_for(lambda: c.status()["live_requests"] == 0, 10, "the router to end the aborted request")
    for d in pair.values():
        with Client(d.endpoint, timeout=10) as c:
            wait_for(lambda c=c: c.status()["live_requests"] == 0, 10, "the instance to end the aborted request")


def test_a_killed_instance_fails_its_stream_with_502_and_the_rest_go_elsewhere(tmp_path, pair):
    doomed = instance(tmp_path / "c")
    router = start_router(tmp_path / "route", {"c": doomed, "a": pair["a"]})
    try:
        prompt = "This one goes to c. " + SYSTEM  # blocks only c holds
        with Client(doomed.endpoint, timeout=60) as c:
            c.generate(prompt=prompt, max_tokens=1)
        time.sleep(0.5)

        async def run():
            async with AsyncClient(router.zmq, timeout=60) as c:
                stream = c.stream(prompt=prompt, max_tokens=2000, ignore_eos=True)
                await anext(stream)
                os.kill(doomed.proc.pid, signal.SIGKILL)
                t0 = time.monotonic()
                with pytest.raises(KvdError) as e:
                    async for _ in stream:
                        pass
                assert e.value.code == 502 and "instance 'c' failed" in e.value.message
                assert time.monotonic() - t0 < 5
                for i in range(3):  # c is down: each goes to a
                    r = await c.generate(prompt=prompt + f" {i}", max_tokens=2)
                    assert len(r.token_ids) == 2
                return await c.status()

        st = asyncio.run(run())
        assert not st["instances"]["c"]["up"] and st["instances"]["c"]["errors"] == 1
        assert st["instances"]["a"]["requests"] == 3
        with Client(pair["a"].endpoint, timeout=10) as c:  # the survivor leaked nothing
            survivor = wait_for(lambda: (s := c.status())["live_requests"] == 0 and s, 10, "a to be idle")
        assert survivor["integrity"] == "ok" and survivor["blocks"]["held"] == 0, survivor
    finally:
        assert router.stop() == 0
        doomed.stop()


@pytest.mark.slow
def test_an_instance_restarted_on_other_ports_is_found_there(tmp_path, pair):
    """An instance given by its run dir stops and starts again on new random ports: the router
    reads the run dir again before its /health probe and points its HTTP requests, its
    ZeroMQ link and its KV-event sockets there."""
    first = instance(tmp_path / "c")
    router = start_router(tmp_path / "route", {"c": first, "a": pair["a"]})
    second = None
    try:
        with Client(router.zmq, timeout=60) as c:
            wait_for(lambda: c.status()["kv_events"]["snapshots"] >= 2, 30, "the router to sync both instances")
            old = (first.url, first.endpoint)
            assert first.stop() == 0
            wait_for(lambda: not c.status()["instances"]["c"]["up"], 30, "the router to see c gone")
            second = instance(tmp_path / "c")  # the same run dir: new ports in its endpoint files
            assert (second.url, second.endpoint) != old
            prompt = "Only the new c holds this. " + SYSTEM
            assert post(second.url, "/v1/completions", {"prompt": prompt, "max_tokens": 1})[0] == 200
            wait_for(lambda: c.status()["instances"]["c"]["up"], 60, "the router to find c again")
            # c's new epoch, synced through the repointed KV-event sockets: 2 at start, then c again
            wait_for(lambda: c.status()["kv_events"]["snapshots"] >= 3, 30, "the router to resync c")
            out = c.generate(prompt=prompt, max_tokens=1, temperature=0.0)
            assert out.num_cached_tokens >= 16  # where the index said it is held: c, over the repointed link
            st = c.status()["instances"]
            assert st["c"]["requests"] == 1 and st["c"]["url"] == second.url and st["c"]["endpoint"] == second.endpoint
        status, body, headers = post(router.endpoint, "/v1/completions", {"prompt": prompt, "max_tokens": 1})
        assert status == 200 and headers["X-Kvd-Instance"] == "c", body
        assert "instance_moved" in {e.get("event") for e in log_events(router.log_file)}
    finally:
        assert router.stop() == 0
        first.stop()
        if second is not None:
            assert second.stop() == 0


def test_a_router_started_before_its_instance_serves_503_then_finds_it(tmp_path, smollm2_dir):
    """The router starts on the run dir of an instance not started yet: it is ready at once,
    logs the instance down ("not started yet", naming the file in its run dir) and answers a
    request with 503 over HTTP and over ZeroMQ, at once. The instance started after it is found
    (its files, then its /health), its KV events followed (the router's index holds its
    blocks: a routed prompt counts them as hits), and requests go through it."""
    run_dir = tmp_path / "c" / "run"
    router = start_router(tmp_path / "route", {"c": run_dir})
    started = None
    try:
        down = log_events(router.log_file, "instance_down")
        assert len(down) == 1 and down[0]["instance"] == "c", down
        assert "not started yet" in down[0]["reason"] and str(run_dir / "endpoint") in down[0]["reason"], down
        t0 = time.monotonic()
        status, body, _ = post(router.endpoint, "/v1/completions", {"prompt": "Hi", "max_tokens": 1}, timeout=10)
        assert status == 503 and body["error"]["message"] == "route: no instance is up", body
        with pytest.raises(urllib.error.HTTPError) as health:
            urllib.request.urlopen(router.endpoint + "/health", timeout=10)
        assert health.value.code == 503
        with urllib.request.urlopen(router.endpoint + "/metrics", timeout=10) as r:
            assert 'kvd_route_instance_up{instance="c"} 0.0' in r.read().decode()
        with Client(router.zmq, timeout=10) as c:
            with pytest.raises(KvdError) as e:
                c.generate(prompt="Hi", max_tokens=1)
            assert e.value.code == 503 and e.value.message == "route: no instance is up"
            assert time.monotonic() - t0 < 5  # answered, never a hang
            st = c.status()
            assert st["state"] == "no instance up" and not st["instances"]["c"]["up"]
            assert st["instances"]["c"]["url"] == "" and st["instances_connected"] == []

            started = instance(tmp_path / "c")
            wait_for(lambda: c.status()["instances"]["c"]["up"], 60, "the router to find c")
            wait_for(lambda: "c" in c.status()["instances_connected"], 10, "the router's link to c")
            wait_for(lambda: c.status()["kv_events"]["snapshots"] >= 1, 30, "the router to sync c's KV events")
            prompt = "Only c holds this. " + SYSTEM
            seq = c.status()["instances"]["c"]["kv_events_seq"]
            assert post(started.url, "/v1/completions", {"prompt": prompt, "max_tokens": 1})[0] == 200  # straight to c
            wait_for(lambda: c.status()["instances"]["c"]["kv_events_seq"] > seq, 30, "c's blocks in the index")
            status, body, headers = post(router.endpoint, "/v1/completions", {"prompt": prompt, "max_tokens": 1})
            assert status == 200 and headers["X-Kvd-Instance"] == "c", body
            assert body["usage"]["prompt_tokens_details"]["cached_tokens"] >= 64
            st = c.status()
            assert st["prefix_hit_rate"] > 0.5  # the index matched the prompt's blocks on c (its KV events)
            out = c.generate(prompt=prompt, max_tokens=1, temperature=0.0)  # over the ZeroMQ link found late
            assert out.num_cached_tokens >= 64
            st = c.status()["instances"]["c"]
            assert st["requests"] == 2 and st["url"] == started.url and st["endpoint"] == started.endpoint
        with urllib.request.urlopen(router.endpoint + "/health", timeout=10) as r:
            assert r.status == 200 and json.loads(r.read())["instances_up"] == ["c"]
        assert "instance_found" in {e.get("event") for e in log_events(router.log_file)}
    finally:
        assert router.stop() == 0
        if started is not None:
            assert started.stop() == 0


def test_thousands_of_requests_with_aborts_leak_nothing_anywhere(tmp_path, tiny_llama_dir):
    """10,000 requests through the router over loopback, of every 50 one from a client that
    disconnects mid-stream and four aborted mid-stream: every one ends, and both instances'
    blocks all return (integrity ok, nothing live, no block held)."""
    instances = {name: start_daemon(tmp_path / name, tiny_llama_dir, cache={"num_blocks": 512, "block_size": 4},
                                    http={"port": 0}, kv_events={"port": 0}) for name in ("x", "y")}  # fmt: skip
    router = start_router(tmp_path / "route", instances, model=tiny_llama_dir)
    total, streams = 10_000, 32
    try:
        async def worker(k: int, counts: dict[str, int]) -> None:
            rng = random.Random(k)
            async with AsyncClient(router.zmq, timeout=120) as c:
                for i in range(k, total, streams):
                    prompt = f"user {i % 97} says {rng.random():.6f}"  # shared and fresh blocks
                    if i % 50 == 0:  # a client that leaves mid-stream: its socket closes under the request
                        async with AsyncClient(router.zmq, timeout=120) as gone:
                            async for _ in gone.stream(prompt=prompt, max_tokens=64, ignore_eos=True):
                                break
                        counts["left"] += 1
                        continue
                    stream = c.stream(prompt=prompt, max_tokens=8 if i % 10 else 64, ignore_eos=True)
                    async for chunk in stream:
                        if i % 10 == 0:
                            await stream.aclose()
                            counts["aborted"] += 1
                            break
                        if chunk.finish_reason is not None:
                            counts["finished"] += 1

        async def run() -> dict[str, int]:
            counts = {"finished": 0, "aborted": 0, "left": 0}
            await asyncio.wait_for(asyncio.gather(*(worker(k, counts) for k in range(streams))), 600)
            return counts

        counts = asyncio.run(run())
        assert counts == {"finished": 9000, "aborted": 800, "left": 200}, counts
        with Client(router.zmq, timeout=30) as c:
            wait_for(lambda: c.status()["live_requests"] == 0, 30, "the router to end every request")
            served = {n: i["requests"] for n, i in c.status()["instances"].items()}
        assert all(served.values()) and sum(served.values()) >= total, served
        for name, d in instances.items():
            with Client(d.endpoint, timeout=30) as c:
                st = wait_for(lambda c=c: (s := c.status())["live_requests"] == 0 and s["running"] == 0 and s, 30,
                              f"instance {name} to end every request")  # fmt: skip
            assert st["integrity"] == "ok", (name, st["integrity"])
            assert st["blocks"]["held"] == 0, (name, st["blocks"])
    finally:
        assert router.stop() == 0
        for d in instances.values():
            assert d.stop() == 0


def test_sigterm_drains_the_router_new_requests_get_503(tmp_path, pair):
    """SIGTERM: the router refuses new requests (503, HTTP and ZeroMQ) while the ones in flight
    finish on their instances, then exits 0."""
    router = start_router(tmp_path / "route", {"a": pair["a"]})

    async def run():
        async with AsyncClient(router.zmq, timeout=60) as c, AsyncClient(router.zmq, timeout=60) as late:
            stream = c.stream(prompt="Still going. " + SYSTEM, max_tokens=200, ignore_eos=True)
            got = len((await anext(stream)).token_ids)
            router.proc.send_signal(signal.SIGTERM)
            await asyncio.sleep(0.3)
            with pytest.raises(KvdError) as e:
                await late.generate(prompt="too late", max_tokens=2)
            assert e.value.code == 503 and "shutting down" in e.value.message
            status, body, _ = post(router.endpoint, "/v1/completions", {"prompt": "too late", "max_tokens": 2})
            assert status == 503 and "shutting down" in body["error"]["message"]
            async for chunk in stream:
                got += len(chunk.token_ids)
            return got

    assert asyncio.run(run()) == 200
    assert router.proc.wait(30) == 0
    drained = log_events(router.log_file, "route_drained")
    assert drained and drained[0]["left"] == 0
