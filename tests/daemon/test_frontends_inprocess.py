"""The ZeroMQ and HTTP frontends in-process, on Serving with the fake step of
test_serving_inprocess: real sockets on loopback, the real clients, no daemon process."""

from __future__ import annotations

import asyncio

import aiohttp
import msgspec
import pytest
import zmq
import zmq.asyncio

from kvd.client import AsyncClient, KvdError
from kvd.config import HttpConfig, KvdConfig
from kvd.daemon.frontend import Frontend
from kvd.daemon.http import HttpFrontend
from kvd.ipc import bind_random
from test_serving_inprocess import TEXT, Harness, run


async def with_zmq_frontend(h: Harness, body):
    ctx = zmq.asyncio.Context()
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    endpoint = bind_random(sock, "127.0.0.1")
    frontend = Frontend(sock, h.serving, lambda: {"state": "ready"}, 1 << 20)
    task = asyncio.create_task(frontend.run())
    try:
        await body(endpoint, frontend)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)  # its monitor socket closes on the way out
        sock.close(linger=0)
        ctx.term()


def test_zeromq_frontend_streams_aborts_and_rejects(tokenizer):
    async def body(endpoint, frontend):
        async with AsyncClient(endpoint, timeout=20) as c:
            out = await c.generate(prompt=TEXT, max_tokens=12, ignore_eos=True)
            assert out.finish_reason == "length" and len(out.token_ids) == 12
            assert out.text == tokenizer.decode(out.token_ids, skip_special_tokens=True)
            pieces = []
            async for chunk in c.stream(prompt=TEXT, request_id="s", max_tokens=400, ignore_eos=True):
                pieces.append(chunk)
                if len(pieces) == 3:
                    await c.abort("s")
            assert pieces[-1].finish_reason == "abort" and len(pieces) < 400
            with pytest.raises(KvdError) as e:
                await c.generate(prompt_token_ids=[1, 10**6], max_tokens=2)
            assert e.value.code == 400 and e.value.message.startswith("prompt_token_ids")
        # A malformed frame gets one Error back and the frontend reads on.
        ctx = zmq.asyncio.Context()
        raw = ctx.socket(zmq.DEALER)
        raw.setsockopt(zmq.LINGER, 0)
        raw.connect(endpoint)
        await raw.send(b"\x93not msgpack at all")
        reply = msgspec.msgpack.decode(await asyncio.wait_for(raw.recv(), 5))
        assert 400 in (reply.values() if isinstance(reply, dict) else reply)
        raw.close()
        ctx.term()
        assert frontend.num_malformed == 1

    async def main():
        with Harness(tokenizer) as h:
            await with_zmq_frontend(h, body)
            await h.settle()

    run(main())


def test_http_frontend_completions_and_chat_stream(chat_tokenizer):
    async def main():
        with Harness(chat_tokenizer) as h:
            cfg = KvdConfig(http=HttpConfig(port=0))
            http = HttpFrontend(cfg, h.serving, "toy", metrics=None)
            url = await http.start()
            try:
                async with aiohttp.ClientSession() as s:
                    async with s.post(f"{url}/v1/completions", json={"prompt": TEXT, "max_tokens": 8,
                                                                     "ignore_eos": True}) as r:
                        body = await r.json()
                        assert r.status == 200, body
                        assert body["choices"][0]["finish_reason"] == "length"
                        assert body["usage"]["completion_tokens"] == 8
                    events = []
                    async with s.post(f"{url}/v1/chat/completions", json={
                            "messages": [{"role": "user", "content": TEXT}], "max_tokens": 6, "stream": True,
                            "ignore_eos": True}) as r:  # fmt: skip
                        assert r.status == 200
                        async for line in r.content:
                            if line.startswith(b"data: "):
                                events.append(line[6:].strip())
                    assert events[-1] == b"[DONE]"
                    chunks = [msgspec.json.decode(e) for e in events[:-1]]
                    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
                    assert chunks[-1]["choices"][0]["finish_reason"] == "length" and text
                    async with s.post(f"{url}/v1/completions", json={"prompt": TEXT, "max_tokens": 0}) as r:
                        assert r.status == 400 and "max_tokens" in (await r.json())["error"]["message"]
                    # A second request with a live request's X-Request-Id is refused, and the live
                    # one goes on untouched.
                    dup = {"X-Request-Id": "dup"}
                    live = asyncio.create_task(s.post(f"{url}/v1/completions", headers=dup, json={
                        "prompt": TEXT, "max_tokens": 60, "ignore_eos": True}))  # fmt: skip
                    while h.serving.record("dup") is None:
                        await asyncio.sleep(0.005)
                    async with s.post(f"{url}/v1/completions", headers=dup, json={"prompt": TEXT}) as r:
                        assert r.status == 400 and "already in use" in (await r.json())["error"]["message"]
                    async with await live as r:
                        body = await r.json()
                        assert r.status == 200 and body["choices"][0]["finish_reason"] == "length", body
            finally:
                await http.close()
            await h.settle()

    run(main())
