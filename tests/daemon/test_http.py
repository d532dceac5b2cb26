"""The OpenAI HTTP API end to end: a real `kvd serve --http-port 0`, the official openai SDK,
raw HTTP for the error cases, 200 concurrent streams with disconnects, and a SIGTERM drain.
Every wait is bounded."""

from __future__ import annotations

import asyncio
import json
import random
import signal
import socket
import threading
import urllib.error
import urllib.request

import aiohttp
import openai
import psutil
import pytest
from harness import log_events, start_daemon, wait_for

from kvd import LLM, SamplingParams
from kvd.client import AsyncClient, Client, KvdError
from kvd.daemon.backoff import MAX_S

API_KEY = "test-key-123"
MODEL = "SmolLM2-135M-Instruct"


@pytest.fixture(scope="module")
def http_daemon(tmp_path_factory, smollm2_dir):
    d = start_daemon(tmp_path_factory.mktemp("http"), None, scheduler={"max_num_seqs": 64},
                     http={"port": 0, "api_key": API_KEY, "max_body_bytes": 65536})  # fmt: skip
    d.url = (d.run_dir / "http_endpoint").read_text().strip()
    yield d
    assert d.stop() == 0


@pytest.fixture(scope="module")
def offline(smollm2_dir):
    return LLM(str(smollm2_dir), dtype="float32")


def sdk(d, **kw) -> openai.OpenAI:
    return openai.OpenAI(base_url=d.url + "/v1", api_key=API_KEY, max_retries=0, timeout=120, **kw)


def post(d, path: str, body: bytes | dict, headers: dict | None = None, method: str = "POST"):
    """(status, JSON body, headers) of a raw request, error statuses included."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    hdrs = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json", **(headers or {})}
    req = urllib.request.Request(d.url + path, data=data if method == "POST" else None, headers=hdrs, method=method)
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read()), r.headers
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read()), e.headers


def test_listens_on_loopback_only_and_writes_its_url(http_daemon):
    assert http_daemon.url.startswith("http://127.0.0.1:")
    port = int(http_daemon.url.rsplit(":", 1)[1])
    listening = [c for c in psutil.net_connections("tcp") if c.status == psutil.CONN_LISTEN and c.laddr.port == port]
    assert listening and all(c.laddr.ip == "127.0.0.1" for c in listening), listening


def test_models_health_metrics(http_daemon):
    models = sdk(http_daemon).models.list()
    assert [m.id for m in models.data] == [MODEL]
    with urllib.request.urlopen(http_daemon.url + "/health", timeout=10) as r:
        assert r.status == 200
    with urllib.request.urlopen(http_daemon.url + "/metrics", timeout=10) as r:
        assert b"kvd_blocks_total" in r.read()


def test_completions_match_the_offline_engine(http_daemon, offline):
    client = sdk(http_daemon)
    prompts = ["The capital of France is", "def fibonacci(n):", "Three colours of the rainbow are"]
    ref = offline.generate(prompts, SamplingParams(max_tokens=12, temperature=0.0))
    raw = client.completions.with_raw_response.create(model=MODEL, prompt=prompts[0], max_tokens=12, temperature=0)
    r = raw.parse()
    assert raw.headers["X-Request-Id"] == r.id and r.id.startswith("cmpl-")
    assert r.choices[0].text == ref[0].text and r.choices[0].finish_reason == ref[0].finish_reason
    assert r.usage.prompt_tokens == len(ref[0].prompt_token_ids) and r.usage.completion_tokens == len(ref[0].token_ids)
    # A list of prompts: one choice each, in order; token ids work as prompts too.
    batch = client.completions.create(model=MODEL, prompt=prompts, max_tokens=12, temperature=0)
    assert [c.text for c in sorted(batch.choices, key=lambda c: c.index)] == [o.text for o in ref]
    by_ids = client.completions.create(model=MODEL, prompt=ref[1].prompt_token_ids, max_tokens=12, temperature=0)
    assert by_ids.choices[0].text == ref[1].text
    # Streamed: the same text, chunk by chunk, then usage.
    stream = client.completions.create(model=MODEL, prompt=prompts[2], max_tokens=12, temperature=0, stream=True,
                                       stream_options={"include_usage": True})  # fmt: skip
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == ref[2].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == ref[2].finish_reason
    assert chunks[-1].usage.completion_tokens == len(ref[2].token_ids)


def test_chat_matches_the_offline_engine(http_daemon, offline):
    client = sdk(http_daemon)
    messages = [{"role": "system", "content": "You are brief."}, {"role": "user", "content": "Name a planet."}]
    (ref,) = offline.chat(messages, SamplingParams(max_tokens=16, temperature=0.0))
    r = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=16, temperature=0)
    assert r.choices[0].message.role == "assistant" and r.choices[0].message.content == ref.text
    assert r.id.startswith("chatcmpl-") and r.usage.completion_tokens == len(ref.token_ids)
    stream = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=16, temperature=0, stream=True)
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == ref.text
    assert chunks[-1].choices[0].finish_reason == ref.finish_reason
    # Content as a list of text parts, and no max_tokens (the context's remainder): still greedy-equal.
    plain = [{"role": "user", "content": "Name a planet."}]
    room = 8192 - len(offline.apply_chat_template(plain))  # the model stops at its end-of-turn long before
    (ref2,) = offline.chat(plain, SamplingParams(max_tokens=room, temperature=0.0))
    parts = [{"role": "user", "content": [{"type": "text", "text": "Name a planet."}]}]
    r2 = client.chat.completions.create(model=MODEL, messages=parts, temperature=0)
    assert r2.choices[0].message.content == ref2.text and r2.choices[0].finish_reason == "stop"


def test_a_repeated_prompt_reports_its_cached_tokens(http_daemon):
    """`usage.prompt_tokens_details.cached_tokens`: 0 for a prompt seen first, whole blocks
    of it the second time; in chat and completions, whole and streamed."""
    client = sdk(http_daemon)
    prompt = "A prompt long enough to fill several blocks of the prefix cache: " + "one two three four " * 12
    first = client.completions.create(model=MODEL, prompt=prompt, max_tokens=2, temperature=0)
    again = client.completions.create(model=MODEL, prompt=prompt, max_tokens=2, temperature=0)
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    cached = again.usage.prompt_tokens_details.cached_tokens
    assert 0 < cached < again.usage.prompt_tokens and cached % 16 == 0, again.usage
    messages = [{"role": "user", "content": prompt}]
    client.chat.completions.create(model=MODEL, messages=messages, max_tokens=2, temperature=0)  # its blocks cached
    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=2, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))  # fmt: skip
    cached = chunks[-1].usage.prompt_tokens_details.cached_tokens
    assert 0 < cached < chunks[-1].usage.prompt_tokens and cached % 16 == 0, chunks[-1].usage


def test_the_request_id_reaches_kvd_trace(http_daemon):
    status, body, headers = post(http_daemon, "/v1/completions", {"prompt": "Hello", "max_tokens": 3},
                                 headers={"X-Request-Id": "trace-me-1"})  # fmt: skip
    assert status == 200 and body["id"] == "trace-me-1" and headers["X-Request-Id"] == "trace-me-1"
    finished = wait_for(lambda: [e for e in log_events(http_daemon.log_file, "request_finished")
                                 if e.get("request_id") == "trace-me-1"], 10, "its log line")  # fmt: skip
    assert finished[0]["finish_reason"] in ("stop", "length")


@pytest.mark.parametrize("case, status, param", [
    ("invalid json", 400, "body"),
    ("unknown field", 400, "bogus"),
    ("ill-typed field", 400, "max_tokens"),
    ("out of range", 400, "temperature"),
    ("n out of range", 400, "n"),
    ("prompt longer than the context", 400, "max_tokens"),
    ("bad prompt type", 400, "prompt"),
    ("unknown chat role", 400, "chat[0].role"),
    ("unknown model", 404, "model"),
    ("unknown path", 404, "path"),
    ("no auth", 401, None),
    ("wrong auth", 401, None),
    ("body too large", 413, "body"),
    ("bad request id", 400, "X-Request-Id"),
])  # fmt: skip
def test_bad_requests_get_openai_error_bodies(http_daemon, case, status, param):
    ok = {"model": MODEL, "prompt": "hi", "max_tokens": 2}
    path, body, headers = "/v1/completions", ok, {}
    if case == "invalid json":
        body = b'{"prompt": "hi",'
    elif case == "unknown field":
        body = ok | {"bogus": 1}
    elif case == "ill-typed field":
        body = ok | {"max_tokens": "many"}
    elif case == "out of range":
        body = ok | {"temperature": -1}
    elif case == "n out of range":
        body = ok | {"n": 0}
    elif case == "prompt longer than the context":
        body = ok | {"prompt": [1] * 9000}
    elif case == "bad prompt type":
        body = ok | {"prompt": 42}
    elif case == "unknown chat role":
        path, body = "/v1/chat/completions", {"messages": [{"role": "wizard", "content": "hi"}], "max_tokens": 2}
    elif case == "unknown model":
        body = ok | {"model": "gpt-9"}
    elif case == "unknown path":
        path = "/v1/embeddings"
    elif case == "no auth":
        headers = {"Authorization": ""}
    elif case == "wrong auth":
        headers = {"Authorization": "Bearer nope"}
    elif case == "body too large":
        body = ok | {"prompt": "x" * 70000}
    elif case == "bad request id":
        headers = {"X-Request-Id": "y" * 200}
    got, reply, _ = post(http_daemon, path, body, headers)
    assert got == status, reply
    err = reply["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["code"] == status and err["message"]
    assert "Traceback" not in err["message"]
    if param is not None:
        assert err["param"] == param, err
    # The SDK raises the matching exception class.
    if case == "unknown model":
        with pytest.raises(openai.NotFoundError):
            sdk(http_daemon).completions.create(model="gpt-9", prompt="hi", max_tokens=2)
    if case == "wrong auth":
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=http_daemon.url + "/v1", api_key="nope", max_retries=0).models.list()


def test_200_streams_a_quarter_disconnected_leave_no_block_held(http_daemon):
    rng = random.Random(3)
    words = "the sea a city mountains rain coffee trains winter library night".split()

    async def one(session: aiohttp.ClientSession, i: int, leave: bool) -> str:
        body = {"model": MODEL, "prompt": " ".join(rng.choices(words, k=rng.randint(3, 40))), "max_tokens": 12,
                "temperature": 0, "ignore_eos": True, "stream": True}  # fmt: skip
        async with session.post(http_daemon.url + "/v1/completions", json=body) as resp:
            assert resp.status == 200, await resp.text()
            events = 0
            async for line in resp.content:
                if not line.startswith(b"data: "):
                    continue
                if line.strip() == b"data: [DONE]":
                    return "done"
                events += 1
                if leave and events == 2:
                    resp.close()  # drop the connection mid-stream
                    return "left"
        return "cut"

    async def run():
        conn = aiohttp.TCPConnector(limit=0, force_close=True)
        headers = {"Authorization": f"Bearer {API_KEY}"}
        async with aiohttp.ClientSession(connector=conn, headers=headers, timeout=aiohttp.ClientTimeout(300)) as s:
            return await asyncio.gather(*(one(s, i, i % 4 == 0) for i in range(200)))

    results = asyncio.run(run())
    assert results.count("left") == 50 and results.count("done") == 150, results
    with Client(http_daemon.endpoint, timeout=10) as c:
        st = wait_for(lambda: (s := c.status())["live_requests"] == 0 and s["running"] == 0
                      and s["integrity"] != "not checked" and s, 60, "idle")  # fmt: skip
        assert st["blocks"]["held"] == 0 and st["integrity"] == "ok"
    aborted = [e for e in log_events(http_daemon.log_file, "request_aborted")]
    assert len(aborted) >= 50


def test_a_full_queue_is_a_429_with_retry_after_over_http_and_zeromq(tmp_path, tiny_llama_dir, daemons):
    # One request runs (max_num_seqs 1) and one waits (max_queue 1): the next is refused. The
    # worker is stopped meanwhile so that nothing completes and the queue stays full.
    d = start_daemon(tmp_path, tiny_llama_dir, cache={"num_blocks": 2048, "block_size": 4},
                     scheduler={"max_num_seqs": 1}, daemon={"max_queue": 1}, http={"port": 0})  # fmt: skip
    daemons.append(d)
    url = (d.run_dir / "http_endpoint").read_text().strip() + "/v1/completions"
    body = {"prompt": "a", "max_tokens": 8, "temperature": 0, "ignore_eos": True}
    with Client(d.endpoint, timeout=30) as c:
        worker = psutil.Process(c.status()["processes"]["worker-0"]["pid"])
        worker.suspend()
        try:

            async def run():
                async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(60)) as s:
                    held = []
                    # One at a time: two sent at once can both reach the queue before the first
                    # is scheduled, and then the second is the one refused.
                    for running, queued in ((1, 0), (1, 1)):
                        held.append(asyncio.create_task(s.post(url, json=body)))
                        for _ in range(300):  # the event loop must run for it to be sent
                            if (st := c.status())["running"] == running and st["queue"] == queued:
                                break
                            await asyncio.sleep(0.1)
                        else:
                            pytest.fail(f"not {running} request running and {queued} waiting after 30 s")
                    async with s.post(url, json=body) as refused:
                        answer = (refused.status, refused.headers.get("Retry-After"), await refused.json())
                    with pytest.raises(KvdError) as e:
                        c.generate("a", max_tokens=2)
                    async with AsyncClient(d.endpoint, timeout=30) as ac:
                        with pytest.raises(KvdError) as ae:
                            await ac.generate("a", max_tokens=2)
                    for task in held:
                        task.cancel()  # the client leaves: both requests are aborted
                    return answer, [e.value, ae.value]

            (status, retry_after, err), zmq_errs = asyncio.run(run())
        finally:
            worker.resume()
    assert status == 429 and err["error"]["code"] == 429 and "queue" in err["error"]["message"]
    # Nothing has completed yet, so nothing says when room will come: the ceiling (backoff.py).
    assert retry_after == str(MAX_S)
    assert [(e.code, e.retry_after) for e in zmq_errs] == [(429, MAX_S)] * 2


def test_a_deadline_is_a_504(tmp_path, tiny_llama_dir, daemons):
    # Ticks every 0.1 s: the deadline is seen long before the tiny model's 2,000 tokens are
    # done (on a fast machine they took about as long as a one-second tick, and won once).
    d = start_daemon(tmp_path, tiny_llama_dir, cache={"num_blocks": 2048, "block_size": 4},
                     daemon={"request_timeout_s": 0.3, "heartbeat_interval_s": 0.1}, http={"port": 0})  # fmt: skip
    daemons.append(d)
    url = (d.run_dir / "http_endpoint").read_text().strip()
    client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=60)
    model = client.models.list().data[0].id
    assert model == tiny_llama_dir.name
    with pytest.raises(openai.APIStatusError) as e:
        client.completions.create(model=model, prompt="a", max_tokens=2000, temperature=0,
                                  extra_body={"ignore_eos": True})  # fmt: skip
    assert e.value.status_code == 504 and "deadline" in e.value.message
    # A stream that already sent tokens ends with an error event, which the SDK raises.
    with pytest.raises(openai.APIError, match="deadline"):
        list(client.completions.create(model=model, prompt="a", max_tokens=2000, temperature=0, stream=True,
                                       extra_body={"ignore_eos": True}))  # fmt: skip


def test_sigterm_drains_http_streams_in_flight(tmp_path, tiny_llama_dir, daemons):
    d = start_daemon(tmp_path, tiny_llama_dir, cache={"num_blocks": 2048, "block_size": 4},
                     daemon={"drain_timeout_s": 30.0}, http={"port": 0})  # fmt: skip
    daemons.append(d)
    url = (d.run_dir / "http_endpoint").read_text().strip()
    client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=120)
    model = client.models.list().data[0].id
    results: list = []
    started = threading.Event()

    def stream():
        chunks = list_with_signal(client.completions.create(model=model, prompt="a b c", max_tokens=300,
                                                            temperature=0, stream=True,
                                                            extra_body={"ignore_eos": True}), started)  # fmt: skip
        results.append(chunks)

    thread = threading.Thread(target=stream)
    thread.start()
    assert started.wait(60), "the stream did not start"
    d.proc.send_signal(signal.SIGTERM)
    # New requests are refused while draining: /health says 503, a completion gets 503.
    wait_for(lambda: _status(url + "/health") == 503, 10, "health to say 503")
    with pytest.raises(openai.APIStatusError) as e:
        client.completions.create(model=model, prompt="too late", max_tokens=2)
    assert e.value.status_code == 503 and 1 <= int(e.value.response.headers["Retry-After"]) <= MAX_S
    thread.join(120)
    (chunks,) = results
    assert chunks[-1].choices[0].finish_reason == "length"
    assert sum(1 for c in chunks if c.choices) >= 2
    assert d.proc.wait(30) == 0
    assert not (d.run_dir / "http_endpoint").exists()


def list_with_signal(stream, started: threading.Event) -> list:
    out = []
    for chunk in stream:
        out.append(chunk)
        started.set()
    return out


def _status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except OSError:
        return -1


def test_http_port_taken_is_a_one_line_start_failure(tmp_path, tiny_llama_dir):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(RuntimeError, match="did not start"):
            start_daemon(tmp_path, tiny_llama_dir, cache={"num_blocks": 64, "block_size": 4}, http={"port": port})
    failed = log_events(tmp_path / "kvd.log", "daemon_start_failed")
    assert failed and "address" in failed[0]["reason"].lower(), failed
