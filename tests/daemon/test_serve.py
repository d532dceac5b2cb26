"""The daemon end to end: real processes, real ZeroMQ, no mocks.

Streaming parity with the offline engine for 32 concurrent clients, abort freeing blocks,
500 malformed frames, kill -9 of the worker (restart and exit policies), SIGTERM drain
with sd_notify, and `kvd trace` on the resulting logs. Every wait is bounded.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import socket
import subprocess
import sys
import re
import time
import urllib.request

import msgspec
import pytest
import zmq

from harness import log_events, start_daemon, wait_for
from kvd import LLM, SamplingParams
from kvd.client import AsyncClient, Client, KvdError
from kvd.messages import ErrorCode, Generate, ServerMessage

TIE_LOGPROB_GAP = 1e-3  # the offline engine's own top-2 gap below which batch shape may flip a token


@pytest.fixture(scope="module")
def smol_daemon(tmp_path_factory, smollm2_dir):
    d = start_daemon(tmp_path_factory.mktemp("smol"), smollm2_dir, scheduler={"max_num_seqs": 64},
                     metrics={"prometheus_port": 0})  # fmt: skip
    yield d
    assert d.stop() == 0


def chat_prompts(n: int) -> list[list[dict]]:
    topics = ["the sea", "mountains", "a city at night", "coffee", "trains", "winter", "a library", "rain"]
    kinds = ["Write one sentence about", "Give two facts about", "Describe", "Name three words for"]
    return [[{"role": "user", "content": f"{kinds[i % 4]} {topics[i % 8]}."}] for i in range(n)]


def test_32_concurrent_streams_match_offline_engine(smol_daemon, smollm2_dir):
    convs = chat_prompts(32)
    max_tokens = 24

    async def one(conv):
        async with AsyncClient(smol_daemon.endpoint, timeout=120) as c:
            ids, text, finish = [], "", None
            async for chunk in c.stream(chat=conv, max_tokens=max_tokens, temperature=0.0):
                ids += chunk.token_ids
                text += chunk.text
                finish = chunk.finish_reason
            return ids, text, finish

    async def all_streams():
        return await asyncio.gather(*(one(c) for c in convs))

    served = asyncio.run(all_streams())
    llm = LLM(str(smollm2_dir), dtype="float32")
    offline = llm.chat(convs, SamplingParams(max_tokens=max_tokens, temperature=0.0, logprobs=2))
    for i, ((ids, text, finish), ref) in enumerate(zip(served, offline)):
        assert finish == ref.finish_reason
        for step, (a, b) in enumerate(zip(ids, ref.token_ids)):
            if a != b:
                lp = ref.logprobs[step].top_logprobs
                assert lp[0] - lp[1] < TIE_LOGPROB_GAP, f"stream {i} diverged at step {step} (not a tie)"
                break
        else:
            assert ids == ref.token_ids and text == ref.text, f"stream {i}"
    with Client(smol_daemon.endpoint, timeout=10) as c:
        st = wait_for(lambda: (s := c.status())["live_requests"] == 0 and s, 10, "idle")
    assert st["integrity"] == "ok" and st["blocks"]["held"] == 0
    assert st["metrics_url"].startswith("http://127.0.0.1:")
    # The Prometheus exporter follows within its one-second update.
    def scrape():
        text = urllib.request.urlopen(st["metrics_url"], timeout=5).read().decode()
        return text if re.search(r"kvd_generation_tokens_total [1-9]", text) else None

    text = wait_for(scrape, 10, "metrics")
    assert "kvd_blocks_total" in text and "kvd_integrity_ok 1.0" in text


def test_sync_client_and_chunk_fields(smol_daemon):
    with Client(smol_daemon.endpoint, timeout=60) as c:
        r = c.generate(prompt="The capital of France is", max_tokens=8, temperature=0.0)
        assert r.finish_reason in ("stop", "length") and 0 < len(r.token_ids) <= 8 and r.text
        r2 = c.generate(prompt_token_ids=[1, 2, 3, 4], max_tokens=3, temperature=0.0, ignore_eos=True)
        assert len(r2.token_ids) == 3
        with pytest.raises(KvdError) as e:
            c.generate(prompt="x", max_tokens=0)
        assert e.value.code == 400 and "max_tokens" in e.value.message
        with pytest.raises(KvdError) as e:
            c.generate(prompt="x", temperature=-1.0)
        assert e.value.code == 400 and "temperature" in e.value.message


def test_abort_mid_stream_frees_blocks(smol_daemon):
    async def run():
        async with AsyncClient(smol_daemon.endpoint, timeout=60) as c:
            # Leaving the loop early aborts the request.
            n = 0
            async for _chunk in c.stream(prompt="Tell me a long story about a dragon.", max_tokens=400,
                                         temperature=0.0, ignore_eos=True):  # fmt: skip
                n += 1
                if n == 3:
                    break
            # An explicit abort from another task.
            rid = "explicit-abort-1"
            chunks = []

            async def consume():
                async for chunk in c.stream(prompt="Count to one thousand.", request_id=rid, max_tokens=400,
                                            temperature=0.0, ignore_eos=True):  # fmt: skip
                    chunks.append(chunk)

            task = asyncio.create_task(consume())
            while len(chunks) < 2:
                await asyncio.sleep(0.01)
            await c.abort(rid)
            await asyncio.wait_for(task, 10)
            assert chunks[-1].finish_reason == "abort"

    asyncio.run(run())
    with Client(smol_daemon.endpoint, timeout=10) as c:
        # Idle, and checked at least once since (a daemon fresh for this test has not checked yet).
        st = wait_for(lambda: (s := c.status())["live_requests"] == 0 and s["running"] == 0
                      and s["integrity"] != "not checked" and s, 20, "aborts")  # fmt: skip
        assert st["blocks"]["held"] == 0 and st["integrity"] == "ok"


def malformed_frames(rng: random.Random) -> list[bytes]:
    enc = msgspec.msgpack.encode
    frames: list[bytes] = []
    for _ in range(120):
        frames.append(rng.randbytes(rng.randrange(1, 300)))  # random bytes
    for _ in range(100):  # wrong msgpack types
        frames.append(enc(rng.choice([1, "x", [1, 2], None, 3.5, {"type": 7}, {"type": ["generate"]}])))
    for i in range(100):  # unknown tags
        frames.append(enc({"type": f"nope-{i}", "request_id": "x"}))
    for _ in range(100):  # missing or ill-typed fields
        frames.append(enc(rng.choice([
            {"type": "generate"},
            {"type": "generate", "request_id": 5, "prompt": "x"},
            {"type": "generate", "request_id": "a", "prompt": 3},
            {"type": "generate", "request_id": "a", "prompt": "x", "params": {"max_tokens": "many"}},
            {"type": "generate", "request_id": "a", "prompt": "x", "params": {"bogus": 1}},
            {"type": "abort"},
            {"type": "generate", "request_id": "a", "prompt_token_ids": ["a"]},
        ])))  # fmt: skip
    for i in range(77):  # valid frames, invalid requests
        frames.append(enc(rng.choice([
            Generate(request_id=f"bad-{i}", prompt_token_ids=[1] * 9000),  # longer than the context
            Generate(request_id=f"bad-{i}", prompt=""),
            Generate(request_id=f"bad-{i}", prompt="a", prompt_token_ids=[1]),
            Generate(request_id=f"bad-{i}", prompt_token_ids=[10**9]),
            Generate(request_id=f"bad-{i}", chat=[]),
        ])))  # fmt: skip
    frames.append(b"\x00" * (100 * 2**20))  # a 100 MB frame
    frames += [b"", enc({"type": "status", "extra": 1})]
    return frames


def test_500_malformed_frames_each_get_an_error(smol_daemon):
    frames = malformed_frames(random.Random(0))
    assert len(frames) >= 500
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(smol_daemon.endpoint)
    dec = msgspec.msgpack.Decoder(ServerMessage)
    try:
        for i, frame in enumerate(frames):
            sock.send(frame)
            assert sock.poll(20_000), f"no reply to malformed frame {i} ({frame[:40]!r})"
            reply = dec.decode(sock.recv())
            assert reply.code == ErrorCode.BAD_REQUEST, (i, reply)
        with Client(smol_daemon.endpoint, timeout=60) as c:
            r = c.generate(prompt="Hello", max_tokens=4, temperature=0.0)
            assert r.finish_reason in ("stop", "length")
            st = c.status()
            assert st["malformed_frames"] >= 400 and st["integrity"] == "ok"
    finally:
        sock.close(linger=0)
        ctx.term()


def start_streams(endpoint: str, n: int, max_tokens: int):
    """Start n streaming requests in a background event loop thread; returns (results, thread)."""
    import threading

    results: list = [None] * n
    started = threading.Event()
    counts = [0] * n

    async def one(i):
        try:
            async with AsyncClient(endpoint, timeout=60) as c:
                async for _ in c.stream(prompt=f"story {i}", request_id=f"victim-{i}", max_tokens=max_tokens,
                                        temperature=0.0, ignore_eos=True):  # fmt: skip
                    counts[i] += 1
                    if all(counts):
                        started.set()
            results[i] = ("finished", time.monotonic())
        except KvdError as e:
            results[i] = (e.code, time.monotonic(), e.message)

    async def main():
        await asyncio.gather(*(one(i) for i in range(n)))

    thread = threading.Thread(target=asyncio.run, args=(main(),))
    thread.start()
    return results, thread, started


@pytest.mark.parametrize("policy", ["restart", "exit"])
def test_kill_9_worker_fails_in_flight_requests_within_2s(tmp_path, tiny_llama_dir, daemons, policy):
    d = start_daemon(tmp_path, tiny_llama_dir, cache={"num_blocks": 2048, "block_size": 4},
                     daemon={"on_worker_death": policy})  # fmt: skip
    daemons.append(d)
    with Client(d.endpoint, timeout=10) as c:
        worker_pid = c.status()["processes"]["worker-0"]["pid"]
    results, thread, started = start_streams(d.endpoint, 4, max_tokens=2000)
    assert started.wait(30), "streams did not start"
    killed_at = time.monotonic()
    os.kill(worker_pid, signal.SIGKILL)
    thread.join(10)
    assert not thread.is_alive(), f"a client hung after the worker died: {results}"
    for r in results:
        assert r[0] == 500 and "worker-0 died" in r[2], r
        assert r[1] - killed_at < 2.0, f"error came {r[1] - killed_at:.2f} s after the kill"
    if policy == "exit":
        assert d.proc.wait(30) != 0  # systemd's Restart=on-failure takes over
        return
    with Client(d.endpoint, timeout=10) as c:
        st = wait_for(lambda: (s := c.status())["state"] == "ready" and s, 60, "worker restart")
        assert st["worker_restarts"] == 1 and st["processes"]["worker-0"]["pid"] != worker_pid
        assert st["processes"]["worker-0"]["alive"]
        r = c.generate(prompt="after the restart", max_tokens=5, temperature=0.0, ignore_eos=True)
        assert len(r.token_ids) == 5
    # kvd trace rebuilds a failed request's timeline and names the cause.
    out = subprocess.run([sys.executable, "-m", "kvd.cli", "trace", "victim-0", str(d.log_file)],
                         capture_output=True, text=True, timeout=60)  # fmt: skip
    assert out.returncode == 0, out.stderr
    for event in ("request_queued", "request_scheduled", "first_token", "request_failed"):
        assert event in out.stdout
    assert "FAILED" in out.stdout and "worker-0 died" in out.stdout


def test_sigterm_drains_and_notifies_systemd(tmp_path, tiny_llama_dir, daemons):
    notify_path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(notify_path))
    sock.settimeout(30)
    try:
        d = start_daemon(tmp_path, tiny_llama_dir, env={"NOTIFY_SOCKET": str(notify_path)},
                         cache={"num_blocks": 1024, "block_size": 4}, daemon={"drain_timeout_s": 30.0})  # fmt: skip
        daemons.append(d)
        states = [sock.recv(4096).decode()]
        while not any("WATCHDOG=1" in s for s in states):
            states.append(sock.recv(4096).decode())
        results, thread, started = start_streams(d.endpoint, 2, max_tokens=300)
        assert started.wait(30)
        d.proc.send_signal(signal.SIGTERM)
        while not any("STOPPING=1" in s for s in states):
            states.append(sock.recv(4096).decode())
        # New requests are refused while draining; in-flight ones finish.
        with pytest.raises(KvdError) as e, Client(d.endpoint, timeout=10) as c:
            c.generate(prompt="too late", max_tokens=2)
        assert e.value.code == 503 and 1 <= e.value.retry_after <= 60  # the drain ahead, at the recent rate
        thread.join(60)
        assert [r[0] for r in results] == ["finished", "finished"]
        assert d.proc.wait(30) == 0
        order = [next(i for i, s in enumerate(states) if key in s) for key in ("READY=1", "WATCHDOG=1", "STOPPING=1")]
        assert order == sorted(order), states
        assert not (d.run_dir / "endpoint").exists()
        # The log tells how long start-up and the drain took (the kvd.logs vocabulary).
        (ready,), (stopped,) = log_events(d.log_file, "daemon_ready"), log_events(d.log_file, "daemon_stopped")
        children = log_events(d.log_file, "child_ready")
        assert {e["child"] for e in children} == {"worker-0"}  # a unified instance starts no messenger
        assert 0 < log_events(d.log_file, "worker_ready")[0]["duration_ms"] < ready["duration_ms"]
        assert all(0 < e["duration_ms"] < ready["duration_ms"] for e in children), children
        assert stopped["exit_code"] == 0 and stopped["duration_ms"] > 0
    finally:
        sock.close()
