"""Chained block hashes: the identity of a KV block, the same in every process and machine.

    h_i = H(h_{i-1} ‖ token ids of block i ‖ extra keys)

H is xxh3-128 (default) or sha256 over a canonical byte encoding; Python's `hash()` is
never used (it is salted per process, see FAILURE_MODES #9). Extra keys are tagged so
that keys of different kinds never collide (FAILURE_MODES #10). The first block's parent
is a fixed root derived from the algorithm name, so two algorithms never share a value.

A full block is named by its hash (hex). The last, incomplete block of a sequence is a
one-shot handoff object keyed `<hash>:partial:<N>` by
`partial_block_key`; it is never a prefix-cache hit for a full block.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Sequence

import xxhash

HASH_ALGOS = ("xxh3_128", "sha256")
_ROOT_SEED = b"kvd/block-hash/v1"

# An extra key is (tag, value); tags name the kind of key (e.g. "lora", "mm", "salt").
ExtraKey = tuple[str, str | int | bytes]


PARTIAL = ":partial:"  # `<hash>:partial:<N>`: the last, incomplete block of a sequence


def _digest(algo: str, data: bytes) -> bytes:
    if algo == "xxh3_128":
        return xxhash.xxh3_128_digest(data)
    if algo == "sha256":
        return hashlib.sha256(data).digest()
    raise ValueError(f"hash_algo: unknown algorithm {algo!r}, expected one of {HASH_ALGOS}")


def root_hash(algo: str) -> bytes:
    """The parent hash of a sequence's first block."""
    return _digest(algo, _ROOT_SEED + b"|" + algo.encode())


def _encode_extra(extra_keys: Sequence[ExtraKey]) -> bytes:
    # Length-prefixed, tagged fields: ("a", "bc") and ("ab", "c") encode differently,
    # and so do the int 1 and the string "1".
    out = bytearray()
    for tag, value in extra_keys:
        if isinstance(value, bool) or not isinstance(value, (str, int, bytes)):
            raise ValueError(f"extra_keys: value of {tag!r} must be str, int or bytes")
        tag_b = tag.encode()
        if isinstance(value, int):
            kind, val_b = b"i", str(value).encode()
        elif isinstance(value, str):
            kind, val_b = b"s", value.encode()
        else:
            kind, val_b = b"b", value
        out += struct.pack("<I", len(tag_b)) + tag_b + kind + struct.pack("<I", len(val_b)) + val_b
    return bytes(out)


def hash_block(
    parent: bytes, token_ids: Sequence[int], extra_keys: Sequence[ExtraKey] = (), algo: str = "xxh3_128"
) -> bytes:
    """The hash of one block given its parent's hash, its tokens and its extra keys."""
    tokens = struct.pack(f"<{len(token_ids)}I", *token_ids)
    data = parent + struct.pack("<I", len(token_ids)) + tokens + _encode_extra(extra_keys)
    return _digest(algo, data)


def hash_blocks(
    token_ids: Sequence[int],
    block_size: int,
    extra_keys: Sequence[ExtraKey] = (),
    algo: str = "xxh3_128",
    parent: bytes | None = None,
    start: int = 0,
) -> list[bytes]:
    """Hashes of the full blocks of `token_ids[start:]`, chained from `parent` (root if None).

    `start` must be a multiple of `block_size`; incomplete trailing tokens are not hashed.
    """
    if start % block_size:
        raise ValueError(f"start: {start} is not a multiple of block_size {block_size}")
    h = root_hash(algo) if parent is None else parent
    hashes = []
    for i in range(start, len(token_ids) - block_size + 1, block_size):
        h = hash_block(h, token_ids[i : i + block_size], extra_keys, algo)
        hashes.append(h)
    return hashes


def partial_block_key(
    token_ids: Sequence[int],
    block_size: int,
    extra_keys: Sequence[ExtraKey] = (),
    algo: str = "xxh3_128",
    full_hashes: Sequence[bytes] | None = None,
) -> str | None:
    """Key `<hash>:partial:<N>` of the last incomplete block, or None if the sequence fills its blocks."""
    n = len(token_ids) % block_size
    if n == 0:
        return None
    if full_hashes is None:
        full_hashes = hash_blocks(token_ids, block_size, extra_keys, algo)
    parent = full_hashes[-1] if full_hashes else root_hash(algo)
    h = hash_block(parent, token_ids[len(token_ids) - n :], extra_keys, algo)
    return f"{h.hex()}{PARTIAL}{n}"


def is_partial_key(key: str) -> bool:
    """Whether a (storage) key names a one-shot partial block."""
    return PARTIAL in key


def block_keys(
    token_ids: Sequence[int], block_size: int, extra_keys: Sequence[ExtraKey] = (), algo: str = "xxh3_128"
) -> list[str]:
    """The keys of every block of a sequence: full blocks by hash, then the partial one if any."""
    full = hash_blocks(token_ids, block_size, extra_keys, algo)
    keys = [h.hex() for h in full]
    partial = partial_block_key(token_ids, block_size, extra_keys, algo, full)
    if partial is not None:
        keys.append(partial)
    return keys
