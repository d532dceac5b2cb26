"""KVCacheManager: which blocks each request holds, prefix-cache lookups and block accounting.

The scheduler asks it three things: which leading blocks of a request are already in
the prefix cache (`get_computed_blocks`), to make room for a request's next tokens
(`allocate_slots`, None when the pool is short), and to release a request (`free`,
idempotent). It registers a request's full blocks in the prefix cache as a step is
scheduled to compute them (`cache_blocks`). `check_integrity` cross-checks requests against the pool.
Given a `KVEventLog`, every block it indexes and every block the pool evicts is recorded
there for the instance's KV-event subscribers (docs/architecture.md, "KV events").
"""

from __future__ import annotations

from kvd.cache.block_pool import Block, BlockPool
from kvd.cache.event_log import KVEventLog
from kvd.kv_events import DEVICE
from kvd.request import Request


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


class KVCacheManager:
    """Per-request block lists on top of a BlockPool."""

    def __init__(
        self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True, hash_algo: str = "xxh3_128",
        events: KVEventLog | None = None,
    ) -> None:
        if block_size < 1:
            raise ValueError(f"block_size: must be >= 1, got {block_size}")
        self.block_size = block_size
        self.hash_algo = hash_algo
        self.enable_prefix_caching = enable_prefix_caching
        self.events = events
        self.pool = BlockPool(num_blocks, enable_caching=enable_prefix_caching, events=events)
        self.req_blocks: dict[str, list[Block]] = {}
        self._num_cached: dict[str, int] = {}  # how many of a request's blocks are in the index
        # Prefix-cache statistics, in tokens of prompts looked up and found.
        self.prefix_queries = 0
        self.prefix_hits = 0

    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    @property
    def prefix_hit_rate(self) -> float:
        return self.prefix_hits / self.prefix_queries if self.prefix_queries else 0.0

    def block_ids(self, request_id: str) -> list[int]:
        return [b.block_id for b in self.req_blocks.get(request_id, ())]

    def get_computed_blocks(self, request: Request) -> list[Block]:
        """The longest run of leading full blocks of `request` found in the prefix cache.

        The last token is always left to compute (its logits are needed), so at most
        (num_tokens - 1) // block_size blocks can hit.
        """
        if not self.enable_prefix_caching:
            return []
        hashes = request.update_block_hashes(self.block_size, self.hash_algo)
        limit = (request.num_tokens - 1) // self.block_size
        hits: list[Block] = []
        for h in hashes[:limit]:
            block = self.pool.get_cached(h)
            if block is None:
                break
            hits.append(block)
        self.prefix_queries += request.num_tokens
        self.prefix_hits += len(hits) * self.block_size
        return hits

    def allocate_slots(
        self, request: Request, num_new_tokens: int, computed_blocks: list[Block] = ()
    ) -> list[Block] | None:
        """Hold `computed_blocks` and enough new blocks for `num_new_tokens` more tokens.

        Tokens counted: the request's computed ones, the prefix hits' and the new ones.
        Returns the newly allocated blocks, or None (and changes nothing) if the pool
        cannot supply them.
        """
        held = self.req_blocks.get(request.request_id, [])
        num_tokens = request.num_computed_tokens + len(computed_blocks) * self.block_size + num_new_tokens
        num_needed = cdiv(num_tokens, self.block_size) - len(held) - len(computed_blocks)
        # Hits that sit in the free queue stop being allocatable once touched.
        evictable_hits = sum(1 for b in computed_blocks if b.ref_cnt == 0)
        if num_needed > self.pool.num_free - evictable_hits:
            return None
        self.pool.touch(computed_blocks)
        new = self.pool.allocate(max(num_needed, 0)) or []
        blocks = self.req_blocks.setdefault(request.request_id, held)
        blocks += computed_blocks
        blocks += new
        self._num_cached[request.request_id] = self._num_cached.get(request.request_id, 0) + len(computed_blocks)
        return new

    def cache_blocks(self, request: Request, num_tokens: int) -> None:
        """Index the request's full blocks among its first `num_tokens` tokens.

        The scheduler calls this for the tokens a step will compute, before the step: a
        request scheduled later in the same step may then hit them, which is safe because
        every layer writes the whole step's K/V before any of its attention reads.
        """
        if not self.enable_prefix_caching:
            return
        blocks = self.req_blocks.get(request.request_id)
        if not blocks:
            return
        num_full = min(num_tokens // self.block_size, len(blocks))
        done = self._num_cached.get(request.request_id, 0)
        if num_full <= done:
            return
        hashes = request.update_block_hashes(self.block_size, self.hash_algo)
        new = [self.pool.cache(blocks[i], hashes[i]) for i in range(done, num_full)]
        if self.events is not None:  # a hash indexed already (another block has it) is no news
            self.events.stored(DEVICE, hashes[done:num_full], new, hashes[done - 1] if done else None)
        self._num_cached[request.request_id] = num_full

    def free(self, request_id: str) -> None:
        """Release a request's blocks (tail first, so its last blocks are evicted first). Idempotent."""
        blocks = self.req_blocks.pop(request_id, None)
        self._num_cached.pop(request_id, None)
        if blocks:
            self.pool.free(reversed(blocks))

    def check_integrity(self) -> None:
        """The pool's own invariants, every held reference accounted for by exactly one request
        list, and the KV events' device tier equal to the pool's index."""
        self.pool.check_integrity()
        if self.events is not None and self.events.device != self.pool.cached_hashes():
            raise RuntimeError("kv manager: the KV events' device tier differs from the prefix-cache index")
        refs: dict[int, int] = {}
        for request_id, blocks in self.req_blocks.items():
            ids = [b.block_id for b in blocks]
            if len(set(ids)) != len(ids):
                raise RuntimeError(f"kv manager: request {request_id} holds a block twice: {ids}")
            for i in ids:
                refs[i] = refs.get(i, 0) + 1
        for block in self.pool.blocks:
            if block.ref_cnt != refs.get(block.block_id, 0):
                raise RuntimeError(
                    f"kv manager: {block} has ref {block.ref_cnt} but requests hold it"
                    f" {refs.get(block.block_id, 0)} times"
                )
