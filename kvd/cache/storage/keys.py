"""Storage keys: a namespace that two incompatible producers can never share, then the block key.

    <namespace>/<block key>      block key: `<hash>` or `<hash>:partial:<N>` (kvd.cache.hashing)

The namespace digests the model fingerprint, the KV dtype, the block size, the layout
version and the parallel layout (tp and pp rank of size), so a decode instance configured
differently from its prefill instance (another block size, another model) finds no key
instead of reading KV it would misinterpret (FAILURE_MODES #19). It is a function of
configuration only: the same in every process and on every machine (golden vectors in
tests/cache/test_storage_keys.py).
"""

from __future__ import annotations

from collections.abc import Sequence

import msgspec
import xxhash

from kvd.cache.hashing import ExtraKey, block_keys

LAYOUT_VERSION = 1  # bump when the stored block layout changes


class ParallelLayout(msgspec.Struct, frozen=True):
    """The tensor/pipeline rank of the KV a key names (part of the storage namespace)."""

    tp_rank: int = 0
    tp_size: int = 1
    pp_rank: int = 0
    pp_size: int = 1

    def __post_init__(self) -> None:
        if not (0 <= self.tp_rank < self.tp_size and 0 <= self.pp_rank < self.pp_size):
            raise ValueError(f"parallel layout: ranks must lie below their sizes, got {self}")


def storage_namespace(
    model_fingerprint: str, kv_dtype: str, block_size: int, layout: ParallelLayout = ParallelLayout()
) -> str:
    """A short, readable prefix: `kvd-v<layout>-<digest>-tp<r>of<n>-pp<r>of<n>`."""
    desc = f"model={model_fingerprint}|dtype={kv_dtype}|block={block_size}|layout={LAYOUT_VERSION}"
    digest = xxhash.xxh3_64_hexdigest(desc.encode())
    return f"kvd-v{LAYOUT_VERSION}-{digest}-tp{layout.tp_rank}of{layout.tp_size}-pp{layout.pp_rank}of{layout.pp_size}"


def storage_key(namespace: str, block_key: str) -> str:
    return f"{namespace}/{block_key}"


def request_keys(namespace: str, token_ids: Sequence[int], block_size: int, algo: str = "xxh3_128",
                 extra_keys: Sequence[ExtraKey] = ()) -> list[str]:  # fmt: skip
    """The storage key of every block of a prompt, the partial last block included — the one
    function both roles use (a prefill instance to write, a decode instance to check and read)."""
    return [storage_key(namespace, k) for k in block_keys(token_ids, block_size, extra_keys, algo)]
