"""KV events from a real daemon: stored hashes equal kvd's own, evictions are removals, the
subscriber's index equals a snapshot, a subscriber that missed batches resyncs, the host
tier follows swap, a worker restart clears the device tier, CURVE with the deployment's secret, and
nothing is bound by default.

Real processes and sockets (tests/harness.py), a tiny model, no mocks.
"""

from __future__ import annotations

import asyncio
import os
import signal

import msgspec
import psutil
import pytest
import zmq
import zmq.asyncio
from harness import start_daemon

from kvd.cache.hashing import hash_blocks
from kvd.client import AsyncClient, Client
from kvd.kv_events import BlockRemoved, BlockStored, EventBatch, EventKeys
from kvd.route.subscriber import KVEventSubscriber

BS = 4
SECRET = "kv-events-test-secret"


@pytest.fixture(scope="module")
def events_daemon(tmp_path_factory, tiny_llama_dir):
    d = start_daemon(tmp_path_factory.mktemp("kvev"), tiny_llama_dir, cache={"num_blocks": 48, "block_size": BS},
                     kv_events={"port": 0, "instance_id": "tiny"}, pd={"secret": SECRET})  # fmt: skip
    yield d
    assert d.stop() == 0


class Recorder:
    """A raw SUB socket (CURVE with the secret's subscriber key) keeping every batch."""

    def __init__(self, ctx: zmq.asyncio.Context, endpoint: str, secret: str) -> None:
        keys = EventKeys.derive(secret)
        self.sock = ctx.socket(zmq.SUB)
        self.sock.curve_serverkey = keys.server_public
        self.sock.curve_publickey, self.sock.curve_secretkey = keys.subscriber_public, keys.subscriber_secret
        self.sock.setsockopt(zmq.SUBSCRIBE, b"")
        self.sock.connect(endpoint)
        self.batches: list[EventBatch] = []
        self._dec = msgspec.msgpack.Decoder(EventBatch)

    async def run(self) -> None:
        while True:
            self.batches.append(self._dec.decode(await self.sock.recv()))

    def events(self) -> list:
        return [e for b in self.batches for e in b.events]


async def until(cond, timeout: float, what: str, interval: float = 0.05):
    deadline = asyncio.get_running_loop().time() + timeout
    while asyncio.get_running_loop().time() < deadline:
        value = cond()
        if value:
            return value
        await asyncio.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


async def generate(endpoint: str, ids: list[int], max_tokens: int = 2) -> None:
    async with AsyncClient(endpoint, timeout=60) as c:
        await c.generate(prompt_token_ids=ids, max_tokens=max_tokens, temperature=0.0, ignore_eos=True)


async def published_seq(endpoint: str) -> int:
    async with AsyncClient(endpoint, timeout=10) as c:
        return (await c.status())["kv_events"]["seq"]


async def assert_index_equals_snapshot(sub: KVEventSubscriber, endpoint: str, name: str = "tiny") -> None:
    seq = await published_seq(endpoint)
    await until(lambda: (sub.index.seq(name) or 0) >= seq, 10, "the subscriber to catch up")
    snap = await sub.snapshot(name)
    assert snap.seq == sub.index.seq(name) and snap.instance == "tiny" and snap.block_size == BS
    for tier in ("device", "host", "pool"):
        assert sub.index.hashes(name, tier) == set(getattr(snap, tier)), tier


def prompt(first: int, n: int = 17) -> list[int]:
    return list(range(first, first + n))


def test_stores_evictions_snapshot_and_a_resync_after_missed_batches(events_daemon):
    run_dir, endpoint = events_daemon.run_dir, events_daemon.endpoint

    async def main():
        ctx = zmq.asyncio.Context()
        recorder = Recorder(ctx, (run_dir / "kv_events_endpoint").read_text().strip(), SECRET)
        sub = KVEventSubscriber(secret=SECRET)
        sub.add_run_dir("tiny", run_dir)
        tasks = [asyncio.create_task(recorder.run()), asyncio.create_task(sub.run())]
        try:
            await until(lambda: sub.index.seq("tiny") is not None, 10, "the first snapshot")
            await asyncio.sleep(0.3)  # the recorder's subscription reaches the publisher
            shared = prompt(1000, 12)  # 3 full blocks
            a, b = shared + prompt(2000, 5), shared + prompt(3000, 5)
            await generate(endpoint, a)
            await generate(endpoint, b)
            ha, hb = hash_blocks(a, BS), hash_blocks(b, BS)  # kvd's own hashing of the prompts
            await until(lambda: set(ha + hb) <= sub.index.hashes("tiny", "device"), 10, "the prompts' blocks")
            stored = [e for e in recorder.events() if isinstance(e, BlockStored) and e.tier == "device"]
            first = next(e for e in stored if ha[0] in e.hashes)
            assert first.parent is None and first.hashes[:4] == ha and first.block_size == BS
            second = next(e for e in stored if hb[3] in e.hashes)
            assert second.parent == ha[2] and second.hashes[0] == hb[3]  # the shared prefix is not news
            seqs = [bt.seq for bt in recorder.batches if bt.events]
            assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))  # one number per batch, none skipped
            # Different prompts fill the 48 blocks: the first ones are evicted and removed.
            for i in range(8):
                await generate(endpoint, prompt(5000 + 100 * i, 30))
            await until(lambda: not set(ha) & sub.index.hashes("tiny", "device"), 10, "the evictions")
            removed = {h for e in recorder.events() if isinstance(e, BlockRemoved) and e.tier == "device"
                       for h in e.hashes}  # fmt: skip
            assert set(ha) <= removed
            await assert_index_equals_snapshot(sub, endpoint)
            # The subscriber goes away; batches go out meanwhile; a new subscriber keeping
            # the old index sees the gap (in a batch or the next heartbeat) and resyncs.
            for t in tasks[1:]:
                t.cancel()
            sub.close()
            for i in range(3):
                await generate(endpoint, prompt(9000 + 100 * i, 30))
            later = KVEventSubscriber(index=sub.index, secret=SECRET)
            later.add_run_dir("tiny", run_dir)
            tasks.append(asyncio.create_task(later.run()))
            await until(lambda: later.num_gaps >= 1 and later.num_snapshots >= 1, 10, "a gap and a resync")
            await assert_index_equals_snapshot(later, endpoint)
            later.close()
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            recorder.sock.close(linger=0)
            ctx.term()

    asyncio.run(main())
    with Client(events_daemon.endpoint, timeout=10) as c:
        st = c.status()
    assert st["integrity"] in ("ok", "not checked") and st["kv_events"]["snapshots"] >= 3


def test_a_subscriber_added_before_its_instance_follows_it_once_its_files_appear(tmp_path, events_daemon):
    """`add_run_dir` on a run dir without the endpoint files yet (the instance not started) is
    no error: the follower waits, finds the files when the instance writes them and syncs."""
    run_dir = tmp_path / "run"

    async def main():
        sub = KVEventSubscriber(secret=SECRET)
        sub.add_run_dir("tiny", run_dir)
        task = asyncio.create_task(sub.run())
        try:
            await asyncio.sleep(0.5)  # several looks at the empty run dir
            assert not task.done() and sub.num_snapshots == 0 and sub.index.seq("tiny") is None
            run_dir.mkdir()
            for name in ("kv_events_endpoint", "kv_snapshot_endpoint"):  # the instance's order
                (run_dir / name).write_text((events_daemon.run_dir / name).read_text())
            await until(lambda: sub.num_snapshots >= 1, 10, "the subscriber to find the files and sync")
            await generate(events_daemon.endpoint, prompt(7000, 30))
            await assert_index_equals_snapshot(sub, events_daemon.endpoint)
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            sub.close()

    asyncio.run(main())


def test_a_subscriber_without_the_secret_gets_nothing(events_daemon):
    async def main():
        sub = KVEventSubscriber(snapshot_timeout_s=1.0)  # no secret: no CURVE keys
        sub.add_run_dir("tiny", events_daemon.run_dir)
        try:
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(sub.snapshot("tiny"), 2.5)
        finally:
            sub.close()

    asyncio.run(main())


def test_swapped_requests_are_host_tier_events(tmp_path, tiny_llama_dir, daemons):
    d = start_daemon(tmp_path, tiny_llama_dir, cache={"num_blocks": 24, "block_size": BS, "preempt": "swap",
                                                     "swap_space_gb": 0.01},
                     kv_events={"port": 0, "instance_id": "tiny"})  # fmt: skip
    daemons.append(d)

    async def main():
        sub = KVEventSubscriber()  # no secret set: plain sockets
        sub.add_run_dir("tiny", d.run_dir)
        task = asyncio.create_task(sub.run())
        ctx = zmq.asyncio.Context()
        sock = ctx.socket(zmq.SUB)
        sock.setsockopt(zmq.SUBSCRIBE, b"")
        sock.connect((d.run_dir / "kv_events_endpoint").read_text().strip())
        dec = msgspec.msgpack.Decoder(EventBatch)
        batches: list[EventBatch] = []

        async def record():
            while True:
                batches.append(dec.decode(await sock.recv()))

        rec = asyncio.create_task(record())
        try:
            await until(lambda: sub.index.seq("tiny") is not None, 10, "the first snapshot")
            await asyncio.sleep(0.3)
            # Four requests of 10 blocks each on 24 blocks: some are preempted, by swap.
            await asyncio.gather(*(generate(d.endpoint, prompt(100 * (i + 1), 16), 24) for i in range(4)))
            events = [e for b in batches for e in b.events]
            host_in = [h for e in events if isinstance(e, BlockStored) and e.tier == "host" for h in e.hashes]
            host_out = [h for e in events if isinstance(e, BlockRemoved) and e.tier == "host" for h in e.hashes]
            assert host_in and sorted(host_in) == sorted(host_out)
            assert await published_seq(d.endpoint) >= 1
            await assert_index_equals_snapshot(sub, d.endpoint)
            assert sub.index.hashes("tiny", "host") == set()
        finally:
            for t in (task, rec):
                t.cancel()
            await asyncio.gather(task, rec, return_exceptions=True)
            sock.close(linger=0)
            ctx.term()
            sub.close()

    asyncio.run(main())
    with Client(d.endpoint, timeout=10) as c:
        assert c.status()["swaps"] >= 1


def test_off_by_default_nothing_is_bound(tmp_path, tiny_llama_dir, daemons):
    d = start_daemon(tmp_path, tiny_llama_dir, cache={"num_blocks": 16, "block_size": BS})
    daemons.append(d)
    with Client(d.endpoint, timeout=10) as c:
        c.generate(prompt_token_ids=prompt(1, 9), max_tokens=2)
        st = c.status()
    assert st["kv_events"] is None
    assert not (d.run_dir / "kv_events_endpoint").exists() and not (d.run_dir / "kv_snapshot_endpoint").exists()
    listening = [c.laddr for c in psutil.Process(st["processes"]["daemon"]["pid"]).net_connections("tcp")
                 if c.status == psutil.CONN_LISTEN]  # fmt: skip
    assert [f"tcp://{a.ip}:{a.port}" for a in listening] == [d.endpoint]  # the client endpoint only


def test_a_worker_restart_clears_the_device_tier(tmp_path, tiny_llama_dir, daemons):
    d = start_daemon(tmp_path, tiny_llama_dir, cache={"num_blocks": 32, "block_size": BS},
                     kv_events={"port": 0, "instance_id": "tiny"})  # fmt: skip
    daemons.append(d)

    async def main():
        sub = KVEventSubscriber()
        sub.add_run_dir("tiny", d.run_dir)
        task = asyncio.create_task(sub.run())
        try:
            await until(lambda: sub.index.seq("tiny") is not None, 10, "the first snapshot")
            ids = prompt(700)
            await generate(d.endpoint, ids)
            await until(lambda: set(hash_blocks(ids, BS)) <= sub.index.hashes("tiny", "device"), 10, "the blocks")
            async with AsyncClient(d.endpoint, timeout=10) as c:
                worker = (await c.status())["processes"]["worker-0"]["pid"]
            os.kill(worker, signal.SIGKILL)
            await until(lambda: not sub.index.hashes("tiny", "device"), 10, "all cleared")
            async with AsyncClient(d.endpoint, timeout=10) as c:
                await until_async(lambda: c.status(), lambda s: s["state"] == "ready", 60)
            await generate(d.endpoint, ids)  # the fresh engine announces them again
            await until(lambda: set(hash_blocks(ids, BS)) <= sub.index.hashes("tiny", "device"), 10, "new blocks")
            assert sub.num_gaps == 0
            await assert_index_equals_snapshot(sub, d.endpoint)
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            sub.close()

    asyncio.run(main())


async def until_async(get, ok, timeout: float):
    deadline = asyncio.get_running_loop().time() + timeout
    while asyncio.get_running_loop().time() < deadline:
        value = await get()
        if ok(value):
            return value
        await asyncio.sleep(0.2)
    raise AssertionError(f"timed out after {timeout} s")
