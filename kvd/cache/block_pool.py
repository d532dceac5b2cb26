"""BlockPool: the ids of the paged KV cache's blocks, their reference counts and the prefix-cache index.

Contract:
- Every block is in exactly one of three states: free (ref 0, no hash), cached-only
  (ref 0, hashed: reusable as a prefix hit until evicted) or held (ref > 0).
- Free and cached-only blocks sit in one queue in eviction order: the head is evicted
  first. Freed blocks go to the tail, so the least recently used block goes first.
- `allocate(n)` returns None when fewer than n blocks can be had; it never raises for
  that. Exceptions are for broken invariants only.
- A hash maps to at most one block. Caching a block whose hash is already indexed
  leaves the new block uncached (it is freed like any other block).
- The pool knows nothing of requests; `KVCacheManager` does.
- With a `KVEventLog`, each eviction from the index is recorded as a device-tier removal
  (kvd.cache.event_log); indexing is recorded by `KVCacheManager`, which knows the chain.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, KeysView

from kvd.cache.event_log import KVEventLog
from kvd.kv_events import DEVICE


class Block:
    """One KV block: its id, reference count and (once full and computed) its chained hash."""

    __slots__ = ("block_id", "ref_cnt", "block_hash")

    def __init__(self, block_id: int) -> None:
        self.block_id = block_id
        self.ref_cnt = 0
        self.block_hash: bytes | None = None

    def __repr__(self) -> str:
        h = self.block_hash.hex()[:8] if self.block_hash else None
        return f"Block({self.block_id}, ref={self.ref_cnt}, hash={h})"


class BlockPool:
    """Preallocated block ids with ref counts, an eviction-ordered free queue and a hash index."""

    def __init__(self, num_blocks: int, enable_caching: bool = True, events: KVEventLog | None = None) -> None:
        if num_blocks < 1:
            raise ValueError(f"num_blocks: must be >= 1, got {num_blocks}")
        self.num_blocks = num_blocks
        self.enable_caching = enable_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self._free: OrderedDict[int, Block] = OrderedDict((b.block_id, b) for b in self.blocks)
        self._cached: dict[bytes, Block] = {}
        self._num_cached_only = 0  # blocks in the free queue that carry a hash (kept as they move)
        self.num_evictions = 0
        self.events = events

    # ---- queries ---------------------------------------------------------------------
    @property
    def num_free(self) -> int:
        """Blocks that `allocate` can hand out: free plus cached-only."""
        return len(self._free)

    @property
    def num_cached_only(self) -> int:
        """Free blocks still in the prefix-cache index (evicted, oldest first, when allocated)."""
        return self._num_cached_only

    @property
    def num_empty(self) -> int:
        """Blocks neither held by a request nor cached."""
        return len(self._free) - self._num_cached_only

    @property
    def num_held(self) -> int:
        return self.num_blocks - len(self._free)

    def cached_hashes(self) -> KeysView[bytes]:
        """Every hash in the prefix-cache index (a live view: no copy, compares equal to a set)."""
        return self._cached.keys()

    def get_cached(self, block_hash: bytes) -> Block | None:
        return self._cached.get(block_hash) if self.enable_caching else None

    # ---- mutations -------------------------------------------------------------------
    def allocate(self, n: int) -> list[Block] | None:
        """n blocks with ref 1, evicting cached-only blocks from the queue head; None if too few."""
        if n > len(self._free):
            return None
        out = []
        for _ in range(n):
            _, block = self._free.popitem(last=False)
            if block.block_hash is not None:
                self._num_cached_only -= 1
                self._evict(block)
            block.ref_cnt = 1
            out.append(block)
        return out

    def touch(self, blocks: Iterable[Block]) -> None:
        """Take a reference on blocks found in the prefix cache (pulling them off the free queue)."""
        for block in blocks:
            if block.ref_cnt == 0:
                del self._free[block.block_id]
                self._num_cached_only -= block.block_hash is not None
            block.ref_cnt += 1

    def free(self, blocks: Iterable[Block]) -> None:
        """Drop one reference from each block; blocks reaching 0 join the queue tail in the given order."""
        for block in blocks:
            if block.ref_cnt <= 0:
                raise RuntimeError(f"block pool: freeing {block} whose ref count is already 0")
            block.ref_cnt -= 1
            if block.ref_cnt == 0:
                self._free[block.block_id] = block
                self._num_cached_only += block.block_hash is not None

    def cache(self, block: Block, block_hash: bytes) -> bool:
        """Index a full, computed block under its hash. False if caching is off or the hash is taken."""
        if not self.enable_caching or block.block_hash is not None:
            return False
        if block_hash in self._cached:
            return False
        block.block_hash = block_hash
        self._cached[block_hash] = block
        self._num_cached_only += block.ref_cnt == 0
        return True

    def _evict(self, block: Block) -> None:
        assert block.block_hash is not None
        del self._cached[block.block_hash]
        if self.events is not None:
            self.events.removed(DEVICE, block.block_hash)
        block.block_hash = None
        self.num_evictions += 1

    # ---- integrity -------------------------------------------------------------------
    def check_integrity(self) -> None:
        """Raise RuntimeError naming the first broken invariant: free + cached-only + held == total."""
        free_uncached = cached_only = held = 0
        for block in self.blocks:
            if block.ref_cnt < 0:
                raise RuntimeError(f"block pool: {block} has a negative ref count")
            in_queue = block.block_id in self._free
            if block.ref_cnt == 0 and not in_queue:
                raise RuntimeError(f"block pool: {block} has ref 0 but is not in the free queue")
            if block.ref_cnt > 0 and in_queue:
                raise RuntimeError(f"block pool: {block} is held but sits in the free queue")
            if block.ref_cnt > 0:
                held += 1
            elif block.block_hash is None:
                free_uncached += 1
            else:
                cached_only += 1
            if block.block_hash is not None and self._cached.get(block.block_hash) is not block:
                raise RuntimeError(f"block pool: {block} has a hash the index does not map to it")
        if len(self._cached) != sum(1 for b in self.blocks if b.block_hash is not None):
            raise RuntimeError("block pool: the hash index holds blocks that carry no hash")
        if cached_only != self._num_cached_only:
            raise RuntimeError(f"block pool: {cached_only} cached-only blocks, counted {self._num_cached_only}")
        if free_uncached + cached_only + held != self.num_blocks:
            raise RuntimeError(
                f"block pool: free {free_uncached} + cached-only {cached_only} + held {held}"
                f" != total {self.num_blocks}"
            )
