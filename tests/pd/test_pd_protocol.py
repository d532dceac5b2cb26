"""The decode side of the PD protocol against a scripted prefill peer.

A real decode daemon (real scheduler, messenger and local pool) talks to a ROUTER socket
this test drives by hand, speaking the real wire messages — the way to make a prefill
instance fall silent, answer twice, answer late, answer for another layout or answer
exactly as the client aborts. The failure modes this covers (docs/reliability.md): #1 a
silent prefill (the lease frees the blocks), #2 and #8 late, duplicate and racing
completions (logged and ignored), #19 a layout mismatch (a clear 502).
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time

import msgspec
import pytest
import zmq

from harness import wait_for
from kvd.cache.storage.keys import request_keys
from kvd.client import AsyncClient, Client, KvdError
from kvd.daemon.pd.peers import LinkKeys
from kvd.messages import ErrorCode, FromPrefill, Ping, Pong, PrefillAbort, PrefillDone, PrefillFailed, PrefillRequest
from kvd.messages import ToPrefill
from pd_harness import SECRET, start_decode, wait_clean, wait_linked

pytestmark = pytest.mark.timeout(240)


class ScriptedPrefill:
    """A ROUTER on 127.0.0.1 that answers pings and hands every other message to the test."""

    def __init__(self) -> None:
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        keys = LinkKeys.derive(SECRET)  # the deployment's CURVE keys, as a real prefill instance has
        self.sock.curve_server = True
        self.sock.curve_secretkey = keys.server_secret
        self.sock.curve_publickey = keys.server_public
        self.endpoint = f"tcp://127.0.0.1:{self.sock.bind_to_random_port('tcp://127.0.0.1')}"
        self.inbox: queue.Queue = queue.Queue()
        self._out: queue.Queue = queue.Queue()
        self._stop = threading.Event()
        self._enc = msgspec.msgpack.Encoder()
        self._dec = msgspec.msgpack.Decoder(ToPrefill)
        self.namespace = ""
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            while not self._out.empty():
                identity, msg = self._out.get()
                self.sock.send_multipart([identity, self._enc.encode(msg)])
            if self.sock.poll(20):
                identity, payload = self.sock.recv_multipart()
                msg = self._dec.decode(payload)
                if isinstance(msg, Ping):
                    self.sock.send_multipart([identity, self._enc.encode(Pong(msg.seq, "scripted", self.namespace, 0))])
                else:
                    self.inbox.put((identity, msg))

    def next(self, kind, timeout: float = 30.0):
        deadline = time.monotonic() + timeout
        while True:
            identity, msg = self.inbox.get(timeout=max(0.01, deadline - time.monotonic()))
            if isinstance(msg, kind):
                return identity, msg

    def send(self, identity: bytes, msg: FromPrefill) -> None:
        self._out.put((identity, msg))

    def close(self) -> None:
        self._stop.set()
        self.thread.join(5)
        self.sock.close(0)
        self.ctx.term()


@pytest.fixture(scope="module")
def peer_and_decode(tmp_path_factory, smollm2_dir):
    root = tmp_path_factory.mktemp("pd-proto")
    peer = ScriptedPrefill()
    d = start_decode(root / "d", smollm2_dir, peer.endpoint,
                     {"local_path": str(root / "pool"), "lease_s": 3.0, "transfer_grace_s": 0.5})  # fmt: skip
    wait_linked(d)
    with Client(d.endpoint, timeout=10) as c:
        peer.namespace = c.status()["pd"]["namespace"]
    yield peer, d
    d.stop()
    peer.close()


def done_for(req: PrefillRequest, keys: list[str], token: int = 42) -> PrefillDone:
    return PrefillDone(handoff_id=req.handoff_id, request_id=req.request_id, first_token=token, logprobs=None,
                       keys=keys, num_tokens=len(req.token_ids), num_cached_tokens=0, prefill_ms=1.0,
                       write_ms=1.0)  # fmt: skip


def late_messages(d) -> int:
    with Client(d.endpoint, timeout=10) as c:
        return c.status()["pd"]["late_messages"]


def generate_in_thread(d, **kw):
    box: dict = {}

    def run():
        try:
            with Client(d.endpoint, timeout=60) as c:
                box["out"] = c.generate(temperature=0.0, **kw)
        except KvdError as e:
            box["err"] = e

    t = threading.Thread(target=run)
    t.start()
    return t, box


def test_silent_prefill_ends_in_504_and_the_lease_frees_the_blocks(peer_and_decode):
    peer, d = peer_and_decode
    t0 = time.monotonic()
    t, box = generate_in_thread(d, prompt_token_ids=list(range(100, 140)), max_tokens=4)
    _, req = peer.next(PrefillRequest)
    assert req.namespace == peer.namespace and req.ttl_s <= 3.0
    t.join(30)
    assert box["err"].code == ErrorCode.DEADLINE and time.monotonic() - t0 < 10
    _, abort = peer.next(PrefillAbort)  # the prefill instance is told to drop it
    assert abort.handoff_id == req.handoff_id
    wait_clean(d)


def test_a_different_kv_layout_is_a_clear_502(peer_and_decode):
    peer, d = peer_and_decode
    t, box = generate_in_thread(d, prompt_token_ids=list(range(200, 240)), max_tokens=4)
    identity, req = peer.next(PrefillRequest)
    other = request_keys("kvd-v1-0000000000000000-tp0of1-pp0of1", req.token_ids, 32)  # another block size
    peer.send(identity, done_for(req, other))
    t.join(30)
    assert box["err"].code == ErrorCode.KV_TRANSFER_FAILED and "layout" in box["err"].message
    wait_clean(d)


def test_late_and_duplicate_completions_are_ignored(peer_and_decode):
    peer, d = peer_and_decode
    before = late_messages(d)
    # A failure, then the same failure again and a PrefillDone for the finished request.
    t, box = generate_in_thread(d, prompt_token_ids=list(range(300, 333)), max_tokens=4)
    identity, req = peer.next(PrefillRequest)
    failed = PrefillFailed(handoff_id=req.handoff_id, request_id=req.request_id, code=ErrorCode.QUEUE_FULL,
                           message="queue: full")  # fmt: skip
    peer.send(identity, failed)
    t.join(30)
    assert box["err"].code == ErrorCode.QUEUE_FULL and "queue" in box["err"].message
    peer.send(identity, failed)
    peer.send(identity, done_for(req, request_keys(peer.namespace, req.token_ids, 16)))
    # A PrefillDone after the client aborted.
    async def abort_then_late_done():
        async with AsyncClient(d.endpoint, timeout=30) as c:
            task = asyncio.ensure_future(_collect(c, list(range(400, 420)), "aborted-early"))
            identity, req2 = await asyncio.to_thread(peer.next, PrefillRequest)
            await c.abort("aborted-early")
            assert (await task) == "abort"
            peer.send(identity, done_for(req2, request_keys(peer.namespace, req2.token_ids, 16)))

    asyncio.run(abort_then_late_done())
    wait_for(lambda: late_messages(d) >= before + 3, 10, "three late messages counted")
    wait_clean(d)


async def _collect(c, prompt, rid):
    """The request's finish_reason, or its error code."""
    finish = None
    try:
        async for chunk in c.stream(prompt_token_ids=prompt, max_tokens=4, temperature=0.0, request_id=rid):
            finish = chunk.finish_reason
    except KvdError as e:
        return e.code
    return finish


def test_abort_racing_prefill_done_many_times(peer_and_decode):
    peer, d = peer_and_decode

    async def race(i: int):
        async with AsyncClient(d.endpoint, timeout=30) as c:
            rid = f"race-{i}"
            task = asyncio.ensure_future(_collect(c, list(range(500 + i, 548 + i)), rid))
            identity, req = await asyncio.to_thread(peer.next, PrefillRequest)
            # Keys never written: a read that starts fails (502); an abort that wins reads nothing.
            peer.send(identity, done_for(req, request_keys(peer.namespace, req.token_ids, 16)))
            await asyncio.sleep(0.001 * (i % 5))
            await c.abort(rid)
            return await task

    outcomes = [asyncio.run(race(i)) for i in range(20)]
    assert set(outcomes) <= {"abort", ErrorCode.KV_TRANSFER_FAILED}, outcomes
    wait_clean(d)
