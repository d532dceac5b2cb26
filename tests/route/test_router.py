"""`kvd route` end to end: real unified instances (KV events and HTTP on) behind real router
processes, raw HTTP. A conversation's next turn goes where its first was and hits the cache,
round-robin alternates, the router's hashes are the instance's own, a killed instance fails
its stream cleanly and the rest go to the other, bad input is the instance's one-line 400.
Every wait is bounded."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import time
import urllib.error
import urllib.request

import aiohttp
import pytest
from harness import log_events, wait_for
from route_harness import BS, SYSTEM, chat, instance, post, start_router

from kvd.client import Client
from kvd.route.prompt import PromptHasher
from kvd.route.subscriber import KVEventSubscriber
from kvd.worker.models import load_tokenizer


def test_a_conversation_follows_its_prefix_and_round_robin_alternates(routers):
    url = routers["kv"].endpoint
    for topic in ("planets", "rivers"):  # two conversations, each with a system prompt of its own
        # the topic first: the two conversations share no block
        turn1 = [{"role": "system", "content": f"Topic: {topic}. {SYSTEM}"}, {"role": "user", "content": "Name one."}]
        status, r1, h1 = post(url, "/v1/chat/completions", chat(turn1))
        assert status == 200 and r1["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
        time.sleep(0.5)  # the instance's KV events reach the router (a user's next turn comes later still)
        turn2 = turn1 + [{"role": "assistant", "content": r1["choices"][0]["message"]["content"]},
                         {"role": "user", "content": "And another?"}]  # fmt: skip
        status, r2, h2 = post(url, "/v1/chat/completions", chat(turn2))
        assert status == 200 and h2["X-Kvd-Instance"] == h1["X-Kvd-Instance"] in ("a", "b")
        cached = r2["usage"]["prompt_tokens_details"]["cached_tokens"]
        assert cached >= 4 * BS and cached % BS == 0, r2["usage"]
    metrics = urllib.request.urlopen(url + "/metrics", timeout=10).read().decode()
    hits = sum(float(line.split()[-1]) for line in metrics.splitlines()
               if line.startswith("kvd_route_prefix_hit_blocks_total{"))  # fmt: skip
    assert hits >= 8, metrics  # the two second turns' blocks at least
    # Round-robin: the same prompt four times goes a, b, a, b (or b, a, b, a).
    body = {"prompt": SYSTEM, "max_tokens": 2, "temperature": 0}
    seen = [post(routers["round_robin"].endpoint, "/v1/completions", body)[2]["X-Kvd-Instance"] for _ in range(4)]
    assert seen[0] != seen[1] and seen[:2] == seen[2:], seen


def test_the_routers_hashes_are_the_instances_own(pair, smollm2_dir):
    hasher = PromptHasher(load_tokenizer(smollm2_dir))
    bodies = {"/v1/chat/completions": chat([{"role": "system", "content": SYSTEM + " Hashes."},
                                            {"role": "user", "content": "Which hash?"}]),  # fmt: skip
              "/v1/completions": {"prompt": "Completion hashes. " + SYSTEM, "max_tokens": 2}}  # blocks a lacks

    async def check() -> None:
        sub = KVEventSubscriber()
        sub.add_run_dir("a", pair["a"].run_dir)
        follow = asyncio.create_task(sub.run())
        try:
            async with aiohttp.ClientSession() as session:
                for path, body in bodies.items():
                    raw = json.dumps(body).encode()
                    hashes = hasher.hashes(hasher.token_ids(path, raw), BS, "xxh3_128")
                    assert len(hashes) >= 4 and sub.index.prefix_match(hashes).get("a", 0) == 0
                    async with session.post(pair["a"].url + path, data=raw) as r:
                        assert r.status == 200, await r.text()
                    deadline = time.monotonic() + 10
                    while sub.index.prefix_match(hashes).get("a", 0) < len(hashes):
                        assert time.monotonic() < deadline, f"{path}: the instance never stored the router's hashes"
                        await asyncio.sleep(0.05)
                    assert sub.index.layout("a") == (BS, "xxh3_128")
        finally:
            follow.cancel()
            sub.close()

    asyncio.run(check())


@pytest.mark.parametrize(("body", "param"), [(b'{"prompt": "x", "max_tokens": 2', "body"),
                                             ({"prompt": "x", "max_tokenz": 2}, "max_tokenz")])  # fmt: skip
def test_bad_input_is_the_instances_one_line_400(routers, pair, body, param):
    status, err, headers = post(routers["kv"].endpoint, "/v1/completions", body)
    assert status == 400 and "\n" not in err["error"]["message"] and err["error"]["param"] == param, err
    assert headers["X-Kvd-Instance"] in pair
    assert (status, err) == post(pair[headers["X-Kvd-Instance"]].url, "/v1/completions", body)[:2]


def test_models_health_metrics(routers):
    url = routers["kv"].endpoint
    assert url.startswith("http://127.0.0.1:")
    with urllib.request.urlopen(url + "/v1/models", timeout=10) as r:
        assert json.loads(r.read())["data"][0]["id"] == "SmolLM2-135M-Instruct"
    with urllib.request.urlopen(url + "/health", timeout=10) as r:
        assert sorted(json.loads(r.read())["instances_up"]) == ["a", "b"]
    with urllib.request.urlopen(url + "/metrics", timeout=10) as r:
        assert b'kvd_route_requests_total{instance="a"}' in r.read()


def test_a_client_that_leaves_a_routed_stream_aborts_its_request(routers, pair):
    body = {"prompt": "Leaving early. " + SYSTEM, "max_tokens": 300, "ignore_eos": True, "stream": True}
    req = urllib.request.Request(routers["kv"].endpoint + "/v1/completions", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})  # fmt: skip
    with urllib.request.urlopen(req, timeout=30) as r:
        name, request_id = r.headers["X-Kvd-Instance"], r.headers["X-Request-Id"]
        assert r.readline().startswith(b"data: {")
    # the router's handler is cancelled, its upstream connection closed: the instance aborts the request
    wait_for(lambda: [e for e in log_events(pair[name].log_file, "request_aborted") if e["request_id"] == request_id],
             10, "the instance to abort the left stream")  # fmt: skip
    with Client(pair[name].endpoint, timeout=10) as c:
        assert c.status()["live_requests"] == 0


def test_a_killed_instance_fails_its_stream_cleanly_and_the_rest_go_elsewhere(tmp_path, pair):
    doomed = instance(tmp_path / "c")
    with socket.socket() as s:  # a port nothing listens on: "gone" refuses every connection
        s.bind(("127.0.0.1", 0))
        gone = f"http://127.0.0.1:{s.getsockname()[1]}"
    router = start_router(tmp_path / "route", {"c": doomed, "a": pair["a"], "gone": gone})
    try:
        prompt = "This one goes to c. " + SYSTEM  # blocks only c holds
        assert post(doomed.url, "/v1/completions", {"prompt": prompt, "max_tokens": 1})[0] == 200  # c holds it
        time.sleep(0.5)
        body = {"prompt": prompt, "max_tokens": 300, "ignore_eos": True, "stream": True}
        req = urllib.request.Request(router.endpoint + "/v1/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})  # fmt: skip
        t0 = time.monotonic()
        with urllib.request.urlopen(req, timeout=30) as r:
            assert r.headers["X-Kvd-Instance"] == "c"
            first = r.readline()
            assert first.startswith(b"data: {")
            os.kill(doomed.proc.pid, signal.SIGKILL)  # the daemon: its HTTP server goes with it
            rest = r.read().decode()
        events = [line[6:] for line in rest.splitlines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]" and json.loads(events[-2])["error"]["code"] == 502, rest[-500:]
        assert time.monotonic() - t0 < 30
        for i in range(3):  # c is down; gone refuses (and is down after): each goes to a, none hangs
            # prompts under a block: no instance holds them, so the order goes by turns and gone comes first once
            status, r, headers = post(router.endpoint, "/v1/completions", {"prompt": f"Count to {i}.", "max_tokens": 2},
                                      timeout=30)  # fmt: skip
            assert status == 200 and headers["X-Kvd-Instance"] == "a", r
        with urllib.request.urlopen(router.endpoint + "/health", timeout=10) as h:
            assert json.loads(h.read())["instances_up"] == ["a"]
        metrics = urllib.request.urlopen(router.endpoint + "/metrics", timeout=10).read().decode()
        assert 'kvd_route_instance_up{instance="c"} 0.0' in metrics  # down since its stream broke
        assert 'kvd_route_failovers_total{instance="gone"} 1.0' in metrics  # tried once, first in the order
        assert 'kvd_route_errors_total{instance="c"} 1.0' in metrics
        wait_for(lambda: doomed.proc.poll() is not None, 10, "the killed daemon's exit")
    finally:
        assert router.stop() == 0
        doomed.stop()


def test_a_draining_instance_sends_new_requests_elsewhere(tmp_path, pair):
    """SIGTERM: the instance answers new requests 503 while its own finish; the router takes
    that as not started and sends them to the next instance."""
    draining = instance(tmp_path / "d")
    router = start_router(tmp_path / "route", {"d": draining, "a": pair["a"]})
    try:
        prompt = "Drained. " + SYSTEM * 3  # blocks only d holds: enough to outweigh its busy stream (its load)
        assert post(draining.url, "/v1/completions", {"prompt": prompt, "max_tokens": 1})[0] == 200
        time.sleep(0.5)
        body = {"prompt": "Keeps d busy.", "max_tokens": 2000, "ignore_eos": True, "stream": True}
        req = urllib.request.Request(draining.url + "/v1/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})  # fmt: skip
        with urllib.request.urlopen(req, timeout=30) as busy:
            assert busy.readline().startswith(b"data: {")
            draining.proc.send_signal(signal.SIGTERM)
            wait_for(lambda: post(draining.url, "/v1/completions", {"prompt": "x", "max_tokens": 1})[0] == 503, 10,
                     "the instance to drain")  # fmt: skip
            status, r, headers = post(router.endpoint, "/v1/completions", {"prompt": prompt, "max_tokens": 2})
            assert status == 200 and headers["X-Kvd-Instance"] == "a", r
        metrics = urllib.request.urlopen(router.endpoint + "/metrics", timeout=10).read().decode()
        assert 'kvd_route_failovers_total{instance="d"} 1.0' in metrics
    finally:
        assert router.stop() == 0
        draining.stop()


def test_the_router_tells_systemd_ready_watchdog_and_stopping(tmp_path, pair):
    """As kvd.service's daemon does: READY=1 once http_endpoint is written, WATCHDOG=1 every half
    WATCHDOG_USEC, STOPPING=1 at SIGTERM, then exit 0 with its endpoint file gone."""
    notify_path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(notify_path))
    sock.settimeout(30)
    try:
        router = start_router(tmp_path / "route", {"a": pair["a"]},
                              env={"NOTIFY_SOCKET": str(notify_path), "WATCHDOG_USEC": "200000"})  # fmt: skip
        states = [sock.recv(4096).decode()]
        assert states[0].startswith("READY=1") and router.endpoint in states[0], states
        t0 = time.monotonic()
        while sum("WATCHDOG=1" in s for s in states) < 3:  # every 0.1 s
            states.append(sock.recv(4096).decode())
        assert time.monotonic() - t0 < 5, states
        router.proc.send_signal(signal.SIGTERM)
        while "STOPPING=1" not in states[-1]:
            states.append(sock.recv(4096).decode())
        assert router.proc.wait(30) == 0
        assert not (router.run_dir / "http_endpoint").exists()
        assert log_events(router.log_file, "route_stopped")[0]["exit_code"] == 0
    finally:
        sock.close()
