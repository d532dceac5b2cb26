"""What a worker reports of the model it loaded and of its KV cache: `ModelInfo`, `KVShare`.

A leaf module: the worker builds both, the worker's Ready message carries them
(`kvd.messages`), the Engine sizes its block pool from ModelInfo and the cache messenger
maps the KV cache that KVShare names. Nothing here imports the rest of kvd.
"""

from __future__ import annotations

import msgspec


class ModelInfo(msgspec.Struct, frozen=True):
    """The facts of a loaded model and its KV cache that the scheduler side needs."""

    vocab_size: int
    max_model_len: int
    eos_token_ids: list[int]
    num_blocks: int
    block_size: int
    fingerprint: str = ""
    num_host_slots: int = 0  # blocks the worker's host swap pool holds (preempt = "swap")
    kv_dtype: str = "float32"  # of the KV cache (part of the storage namespace)
    compute_threads: int = 0  # CPU threads the worker's model computes on (0: on a GPU)


class KVShare(msgspec.Struct, frozen=True, array_like=True):
    """Where the worker's KV cache lives, for the messenger to map it (CPU shared memory): a
    memfd of the worker, opened through /proc. One tensor (layers, 2, blocks, block_size,
    kv_heads, head_dim); layer l is its l-th slice."""

    pid: int
    fd: int
    shape: list[int]
    dtype: str
