"""The clients' link to a daemon (kvd.ipc.Link): requests wait for the connection, and a
daemon's last replies before it closes the connection are read, not dropped. A bare ROUTER
socket plays the daemon, so the timing is the test's."""

from __future__ import annotations

import asyncio
import threading
import time

import msgspec
import pytest
import zmq

from kvd.client import AsyncClient, Client, KvdError
from kvd.messages import ClientMessage, Error, ErrorCode, Generate

DEC = msgspec.msgpack.Decoder(ClientMessage)
ENC = msgspec.msgpack.Encoder()


def free_endpoint() -> str:
    ctx = zmq.Context.instance()
    s = ctx.socket(zmq.ROUTER)
    port = s.bind_to_random_port("tcp://127.0.0.1")
    s.close(0)
    return f"tcp://127.0.0.1:{port}"


def fake_daemon(endpoint: str, delay_s: float, replies: int) -> threading.Thread:
    """Bind after `delay_s`, answer `replies` Generates with an Error 400 naming their id, then
    close at once (with 500 ms for the answers to leave, as kvd's daemon does)."""

    def run():
        time.sleep(delay_s)
        ctx = zmq.Context()
        s = ctx.socket(zmq.ROUTER)
        s.bind(endpoint)
        for _ in range(replies):
            identity, frame = s.recv_multipart()
            msg = DEC.decode(frame)
            assert isinstance(msg, Generate)
            error = Error(msg.request_id, ErrorCode.BAD_REQUEST, "fake: " + msg.request_id)
            s.send_multipart([identity, ENC.encode(error)])
        s.close(linger=500)
        ctx.term()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def test_concurrent_first_requests_all_wait_for_the_connection():
    """Eight requests sent at once before the daemon is up: each gets the daemon's answer,
    none a 503 because another request took the connection's handshake event."""
    endpoint = free_endpoint()
    daemon = fake_daemon(endpoint, 0.3, 8)

    async def one(c: AsyncClient, i: int) -> str:
        with pytest.raises(KvdError) as e:
            await c.generate(prompt="x", request_id=f"r{i}", max_tokens=1)
        return f"{e.value.code} {e.value.message}"

    async def run():
        async with AsyncClient(endpoint, timeout=10, connect_timeout=5) as c:
            return await asyncio.gather(*(one(c, i) for i in range(8)))

    assert asyncio.run(run()) == [f"400 fake: r{i}" for i in range(8)]
    daemon.join(10)


def test_the_last_replies_before_the_daemon_closes_are_read():
    """The daemon answers and closes its socket at once (a daemon giving up after a worker
    died): the blocking client still reads its answer (ZMQ_IMMEDIATE would drop it)."""
    endpoint = free_endpoint()
    daemon = fake_daemon(endpoint, 0.0, 1)
    with Client(endpoint, timeout=10, connect_timeout=5) as c:
        time.sleep(0.3)  # connected; the answer will come and the connection close before we read
        with pytest.raises(KvdError) as e:
            c.generate(prompt="x", request_id="last", max_tokens=1)
    assert e.value.code == 400 and e.value.message == "fake: last"
    daemon.join(10)


def test_no_daemon_is_a_503_within_connect_timeout():
    t0 = time.monotonic()
    with Client(free_endpoint(), timeout=10, connect_timeout=0.5) as c, pytest.raises(KvdError) as e:
        c.generate(prompt="x", max_tokens=1)
    assert e.value.code == 503 and "no daemon accepting connections" in e.value.message
    assert time.monotonic() - t0 < 3
