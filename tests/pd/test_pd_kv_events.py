"""KV events through a PD deployment: the prefill instance's pool writes are pool-tier
stores and the decode instance's loaded blocks are device-tier stores, both with kvd's own
hashes of the prompt, over CURVE with the deployment's secret. Real daemons, a tiny model."""

from __future__ import annotations

import asyncio

from pd_harness import SECRET, start_decode, start_prefill, wait_clean, wait_linked

from kvd.cache.hashing import hash_blocks
from kvd.client import AsyncClient
from kvd.route.subscriber import KVEventSubscriber

BS = 4


def test_pool_writes_and_decode_loads_are_published(tmp_path, tiny_llama_dir):
    pool = {"local_path": str(tmp_path / "pool"), "local_capacity_gb": 0.1}
    cache = {"num_blocks": 64, "block_size": BS}
    events = {"kv_events": {"port": 0}}
    p = start_prefill(tmp_path / "p", tiny_llama_dir, pool, cache, **events)
    try:
        d = start_decode(tmp_path / "d", tiny_llama_dir, p, pool, cache, **events)
        try:
            wait_linked(d)
            ids = list(range(300, 318))  # 4 full blocks and a partial one
            hashes = hash_blocks(ids, BS)

            async def main():
                sub = KVEventSubscriber(secret=SECRET)
                sub.add_run_dir("p", p.run_dir)
                sub.add_run_dir("d", d.run_dir)
                task = asyncio.create_task(sub.run())
                try:
                    for name in ("p", "d"):
                        await asyncio.wait_for(_synced(sub, name), 10)
                    async with AsyncClient(d.endpoint, timeout=60) as c:
                        await c.generate(prompt_token_ids=ids, max_tokens=3, temperature=0.0, ignore_eos=True)
                    await asyncio.wait_for(_holds(sub, "p", "pool", hashes), 10)
                    await asyncio.wait_for(_holds(sub, "d", "device", hashes), 10)
                    assert set(hashes) <= sub.index.hashes("p", "device")  # the prefill's prefix cache too
                    assert sub.index.prefix_match(hashes) == {"p": 4, "d": 4}
                    snap = await sub.snapshot("p")
                    assert set(hashes) <= set(snap.pool)
                finally:
                    task.cancel()
                    await asyncio.gather(task, return_exceptions=True)
                    sub.close()

            asyncio.run(main())
            wait_clean(p, d)
        finally:
            assert d.stop() == 0
    finally:
        assert p.stop() == 0


async def _synced(sub: KVEventSubscriber, name: str) -> None:
    while sub.index.seq(name) is None:
        await asyncio.sleep(0.05)


async def _holds(sub: KVEventSubscriber, name: str, tier: str, hashes: list[bytes]) -> None:
    while not set(hashes) <= sub.index.hashes(name, tier):
        await asyncio.sleep(0.05)
