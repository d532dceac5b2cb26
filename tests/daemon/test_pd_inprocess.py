"""The decode role in-process: Serving with the real DecodeRole, its real ZeroMQ link to a
prefill instance played by the test (a `PrefillServer` socket and a handler that answers as
a prefill instance would), and the cache messenger played by the fake worker (each read
reports at once, or when the test lets it). It follows the PD event chain — blocks
preallocated, PrefillRequest, first token, pool read, decode — and its failures, checking
the handoff on the request's record and that no block is freed while a read may write it."""

from __future__ import annotations

import asyncio
import contextlib

import zmq.asyncio
from test_serving_inprocess import TEXT, FakeWorker, Harness, run

from kvd.cache.storage.keys import request_keys
from kvd.config import DaemonConfig, KvdConfig, PDConfig
from kvd.daemon.pd.decode import DecodeRole
from kvd.daemon.pd.handoff import Phase
from kvd.daemon.pd.peers import PrefillServer
from kvd.messages import (
    CacheTaskDone,
    ErrorCode,
    Ping,
    Pong,
    PrefillAbort,
    PrefillDone,
    PrefillFailed,
    PrefillRequest,
)

FIRST_TOKEN = 7  # what the "prefill instance" samples as every request's first token


class FakeMessenger(FakeWorker):
    """The worker as before, plus the messenger: a read reports success at once (`hold`:
    only when `report` is called). It also records what each request's first step computed."""

    def __init__(self) -> None:
        super().__init__()
        self.serving = None
        self.hold = False
        self.cache_tasks = []
        self.first_computed: dict[str, tuple[int, int]] = {}  # request id -> (computed, prompt length)

    async def run_step(self, so):
        for new in so.new_reqs:
            self.first_computed.setdefault(new.request_id, (new.num_computed_tokens, new.num_prompt_tokens))
        return await super().run_step(so)

    def send_cache_task(self, task) -> None:
        self.cache_tasks.append(task)
        if not self.hold:
            asyncio.get_running_loop().call_soon(self.report, task)

    def report(self, task) -> None:
        done = CacheTaskDone(task_id=task.task_id, request_id=task.request_id, ok=True, num_blocks=len(task.keys),
                             nbytes=0, duration_ms=0.1)  # fmt: skip
        asyncio.get_running_loop().create_task(self.serving.on_cache_done(done))


class FakePrefill:
    """A prefill instance's side of the link: Pongs, and PrefillDone (mode "ok"), PrefillFailed
    ("fail") or no answer ("silent") to each PrefillRequest."""

    def __init__(self, ctx: zmq.asyncio.Context, run_dir, mode: str = "ok") -> None:
        self.server = PrefillServer(ctx, "127.0.0.1", 0, run_dir)
        self.mode = mode
        self.requests: list[PrefillRequest] = []
        self.aborts: list[str] = []

    async def handle(self, identity: bytes, msg) -> None:
        if isinstance(msg, Ping):
            await self.server.send(identity, Pong(msg.seq, "fake-prefill", "", 0))
        elif isinstance(msg, PrefillAbort):
            self.aborts.append(msg.handoff_id)
        elif isinstance(msg, PrefillRequest):
            self.requests.append(msg)
            if self.mode == "ok":
                keys = request_keys(msg.namespace, msg.token_ids, 4)
                await self.server.send(identity, PrefillDone(
                    handoff_id=msg.handoff_id, request_id=msg.request_id, first_token=FIRST_TOKEN, logprobs=None,
                    keys=keys, num_tokens=len(msg.token_ids), num_cached_tokens=0, prefill_ms=1.0, write_ms=1.0))
            elif self.mode == "fail":
                await self.server.send(identity, PrefillFailed(handoff_id=msg.handoff_id, request_id=msg.request_id,
                                                               code=ErrorCode.KV_TRANSFER_FAILED, message="pool full"))


@contextlib.asynccontextmanager
async def decode_instance(tokenizer, tmp_path, mode: str = "ok", hold: bool = False, **pd):
    """(harness, prefill peer, messenger): a decode instance's Serving running, linked to the
    peer (`mode`, see FakePrefill); `hold`: reads report only when the test says."""
    ctx = zmq.asyncio.Context()
    (tmp_path / "prefill").mkdir()
    peer = FakePrefill(ctx, tmp_path / "prefill", mode)
    peer_task = asyncio.create_task(peer.server.run(peer.handle))
    cfg = KvdConfig(daemon=DaemonConfig(role="decode"), pd=PDConfig(prefill_endpoints=[peer.server.endpoint], **pd))
    messenger = FakeMessenger()
    messenger.hold = hold
    h = Harness(tokenizer, role=DecodeRole, cfg=cfg, worker=messenger, ctx=ctx, run_dir=tmp_path)
    messenger.serving = h.serving
    try:
        with h:
            await connected(h)
            yield h, peer, messenger
    finally:
        peer_task.cancel()
        h.serving.role.close()
        peer.server.close()


async def connected(h: Harness) -> None:
    """Until the prefill instance has answered a heartbeat (the first ping may go out before
    the link connects: a DEALER queues nothing for a peer it has not reached)."""
    role = h.serving.role
    while not role.links[0].alive:
        role.tick()
        await asyncio.sleep(0.02)


def test_a_decode_request_gets_its_first_token_and_kv_from_the_prefill_side_and_never_prefills(tokenizer, tmp_path):
    async def main():
        async with decode_instance(tokenizer, tmp_path) as (h, peer, messenger):
            prompts = {f"r{i}": TEXT[i * 3:] for i in range(3)}
            done = [h.submit(rid, prompt=p) for rid, p in prompts.items()]
            await asyncio.gather(*(d.wait() for d in done))
            await h.settle()
            assert not h.inbox.failures
            role = h.serving.role
            assert role.status()["handoffs"] == 3 and role.status()["transfers"] == 0
            assert all(n == 0 for n in role.status()["in_flight"].values()) and not role.handoffs()
            sent = {m.request_id: m for m in peer.requests}
            for rid in prompts:
                out = h.inbox.deltas[rid][-1].output
                assert out.token_ids[0] == FIRST_TOKEN and len(out.token_ids) == 24, out.token_ids
                computed, num_prompt = messenger.first_computed[rid]
                assert computed == num_prompt == len(sent[rid].token_ids)  # the prompt was never computed here
            reads = {t.request_id: t for t in messenger.cache_tasks}
            assert set(reads) == set(prompts) and not any(t.write for t in reads.values())
            for rid, task in reads.items():
                assert task.keys == request_keys(role.namespace, sent[rid].token_ids, 4)
                assert len(task.block_ids) == len(task.keys)

    run(main())


def test_a_failed_prefill_is_a_502_and_returns_the_preallocated_blocks(tokenizer, tmp_path):
    async def main():
        async with decode_instance(tokenizer, tmp_path, mode="fail") as (h, peer, messenger):
            await h.submit("f", prompt=TEXT).wait()
            await h.settle()
            code, message = h.inbox.failures["f"]
            assert code == ErrorCode.KV_TRANSFER_FAILED and "pool full" in message
            assert h.serving.role.counts["handoffs"] == 1 and not messenger.cache_tasks

    run(main())


def test_an_abort_during_the_read_keeps_the_blocks_until_the_messenger_reports(tokenizer, tmp_path):
    async def main():
        async with decode_instance(tokenizer, tmp_path, hold=True) as (h, peer, messenger):
            done = h.submit("a", prompt=TEXT)
            while not messenger.cache_tasks:
                await asyncio.sleep(0.005)
            request = h.serving.record("a")
            assert request.owner.handoff.phase == Phase.READING
            h.serving.abort("a")
            await done.wait()
            assert h.inbox.deltas["a"][-1].output.finish_reason == "abort"
            # The read may still write the blocks: the record stays, finished, and holds them.
            assert h.serving.record("a") is request and request.status.finished
            assert h.serving.engine.kv.block_ids("a") and request.owner.handoff is None
            messenger.report(messenger.cache_tasks[0])
            await h.settle()  # now nothing is held
            assert h.serving.role.counts["late_messages"] == 0

    run(main())


def test_a_prefill_instance_that_never_answers_is_a_504_at_the_lease(tokenizer, tmp_path):
    async def main():
        async with decode_instance(tokenizer, tmp_path, mode="silent", lease_s=0.3) as (h, peer, messenger):
            done = h.submit("s", prompt=TEXT)
            while not peer.requests:
                await asyncio.sleep(0.005)
            assert h.serving.record("s").owner.handoff.phase == Phase.PREFILLING
            await asyncio.sleep(0.35)
            await h.serving.tick()
            await done.wait()
            await h.settle()
            code, message = h.inbox.failures["s"]
            assert code == ErrorCode.DEADLINE and "lease_s" in message
            for _ in range(100):  # the prefill side is told to stop
                if peer.aborts:
                    break
                await asyncio.sleep(0.01)
            assert peer.aborts == [peer.requests[0].handoff_id]

    run(main())


def test_n_choices_load_the_prompt_once(tokenizer, tmp_path):
    async def main():
        async with decode_instance(tokenizer, tmp_path) as (h, peer, messenger):
            await h.submit("n", prompt=TEXT, params={"n": 3}).wait()
            await h.settle()
            # One handoff, one PrefillRequest, one pool read: the later choices reuse its KV here.
            assert len(peer.requests) == 1 and len(messenger.cache_tasks) == 1
            assert h.serving.role.counts["handoffs"] == 1
            firsts = {rid: computed for rid, (computed, _) in messenger.first_computed.items()}
            assert firsts["n"] == len(peer.requests[0].token_ids)  # loaded, never computed
            block = 4
            for rid in ("n/1", "n/2"):  # each computed only the prompt's partial block
                assert firsts[rid] == (len(peer.requests[0].token_ids) - 1) // block * block

    run(main())
