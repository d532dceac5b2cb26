"""Paged attention for transformers models: reads and writes kvd's KV blocks.

Registered with transformers' AttentionInterface as "kvd_paged", so any model whose
attention layers call the interface (Llama, Qwen3, ...) runs on kvd's cache unchanged.
The model runs on one packed sequence per step — shape (1, N) for N scheduled tokens
of many requests, no padding — with position ids per token. Before a forward the
runner installs an `AttentionMetadata` with `forward_context`; each layer then:

1. writes its new K/V into the paged cache at `slot_mapping` (block_id * block_size + offset);
2. attends: decode tokens (one query per request, packed first) in one batched call of
   `ops.paged_decode_attention` (native on CPU: reads the blocks in place; else gather +
   SDPA); each prefill chunk by itself, causal, over its cached context plus its tokens
   (`ops.prefill_attention`: native on CPU, reading the blocks in place; else SDPA).

The per-layer cache tensor is (2, num_blocks, block_size, kv_heads, head_dim): K then V,
block-major so a block's tokens are contiguous and one gather by block id reads them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from transformers import AttentionInterface

from kvd import ops

ATTN_IMPLEMENTATION = "kvd_paged"


@dataclass
class PrefillChunk:
    """One request's chunk of >1 (or a lone non-decode) query tokens in the packed batch."""

    start: int  # index of its first token in the packed batch
    end: int
    num_computed: int  # tokens of the request already in the cache before this chunk
    block_table: torch.Tensor | None = None  # (num_blocks,) covering num_computed + chunk
    mask: torch.Tensor | None = None  # (T, num_computed + T) bool, True = attend; None if num_computed == 0


@dataclass
class AttentionMetadata:
    """Where one step's packed tokens go in the paged cache and which blocks each query reads."""

    slot_mapping: torch.Tensor  # (N,) int64
    num_decodes: int = 0  # the first num_decodes packed tokens are single decode queries
    decode_block_table: torch.Tensor | None = None  # (Bd, max_blocks) int64, padded with block 0
    decode_lens: torch.Tensor | None = None  # (Bd,) int64: context length of each, its query included
    prefills: list[PrefillChunk] = field(default_factory=list)


@dataclass
class _Context:
    """The KV tensors and metadata of the forward pass in progress."""

    kv_caches: list[torch.Tensor]
    meta: AttentionMetadata


_ctx: _Context | None = None


@contextlib.contextmanager
def forward_context(kv_caches: list[torch.Tensor], meta: AttentionMetadata) -> Iterator[None]:
    """Install the cache and metadata the attention layers use during one forward."""
    global _ctx
    prev, _ctx = _ctx, _Context(kv_caches, meta)
    try:
        yield
    finally:
        _ctx = prev


def _current() -> _Context:
    if _ctx is None:
        raise RuntimeError("kvd paged attention called outside forward_context()")
    return _ctx


def decode_rows(n: int) -> int:
    """How many of a linear's n rows are decode queries: the forward's `num_decodes` (they come
    first), or all n outside a forward (a sampled row, a benchmark's call)."""
    return n if _ctx is None else min(n, _ctx.meta.num_decodes)


def decode_only() -> tuple[list[torch.Tensor], AttentionMetadata] | None:
    """The forward's caches and metadata when every packed token is a decode query (no
    prefill chunk), else None: a step that `DecodeLayers` can run whole."""
    if _ctx is None or _ctx.meta.prefills or not 0 < _ctx.meta.num_decodes == len(_ctx.meta.slot_mapping):
        return None
    return _ctx.kv_caches, _ctx.meta


def cache_slots(layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The layer's cache (2, NB, BS, KVH, D) and the step's slot per packed token, for a caller
    that writes K/V itself (kvd's decoder, with the rotary embedding) before `attend(written=True)`."""
    ctx = _current()
    return ctx.kv_caches[layer], ctx.meta.slot_mapping


def attend(layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None,
           written: bool = False) -> torch.Tensor:  # fmt: skip
    """One layer's attention for the step's packed tokens: write k, v into the paged cache
    (unless the caller has: `written`), attend, return (N, H, D). q (N, H, D), k and v (N, KVH, D)."""
    ctx = _current()
    meta = ctx.meta
    cache = ctx.kv_caches[layer]  # (2, NB, BS, KVH, D)
    n, h, d = q.shape
    kvh = k.shape[1]

    # 1. Write this step's K/V into their slots.
    if not written:
        flat = cache.view(2, -1, kvh, d)  # (2, NB*BS, KVH, D)
        flat[0].index_copy_(0, meta.slot_mapping, k)
        flat[1].index_copy_(0, meta.slot_mapping, v)

    out = q.new_empty(n, h, d)  # (N, H, D)
    # 2a. Decode queries: one batched call that reads each request's blocks in place.
    bd = meta.num_decodes
    if bd:
        out[:bd] = ops.paged_decode_attention(q[:bd], cache, meta.decode_block_table, meta.decode_lens, scale)
    # 2b. Prefill chunks: causal over cached context + the chunk; natively from the cache
    # where the kernel covers it (CPU, float32/bfloat16, head size 64 or 128), else SDPA.
    native = bool(meta.prefills) and ops.prefill_attention_applies(q)
    for p in meta.prefills:
        if native and p.block_table is not None:
            ops.prefill_attention(q[p.start : p.end], cache, p.block_table, p.num_computed,
                                  d**-0.5 if scale is None else scale, out=out[p.start : p.end])  # fmt: skip
            continue
        qc = q[p.start : p.end].transpose(0, 1).unsqueeze(0)  # (1, H, T, D)
        if p.num_computed == 0:
            kc = k[p.start : p.end].transpose(0, 1).unsqueeze(0)  # (1, KVH, T, D)
            vc = v[p.start : p.end].transpose(0, 1).unsqueeze(0)
            o = F.scaled_dot_product_attention(qc, kc, vc, is_causal=True, scale=scale, enable_gqa=True)
        else:
            ctx_len = p.num_computed + (p.end - p.start)
            kc = cache[0][p.block_table].view(-1, kvh, d)[:ctx_len].transpose(0, 1).unsqueeze(0)  # (1, KVH, C, D)
            vc = cache[1][p.block_table].view(-1, kvh, d)[:ctx_len].transpose(0, 1).unsqueeze(0)
            o = F.scaled_dot_product_attention(qc, kc, vc, attn_mask=p.mask, scale=scale, enable_gqa=True)
        out[p.start : p.end] = o[0].transpose(0, 1)  # (T, H, D)
    return out


def paged_attention(
    module: torch.nn.Module,
    query: torch.Tensor,  # (1, H, N, D)
    key: torch.Tensor,  # (1, KVH, N, D)
    value: torch.Tensor,  # (1, KVH, N, D)
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature over `attend`."""
    out = attend(module.layer_idx, query[0].transpose(0, 1), key[0].transpose(0, 1), value[0].transpose(0, 1),
                 scaling)  # fmt: skip
    return out.unsqueeze(0), None  # (1, N, H, D), as transformers' attention functions return


AttentionInterface.register(ATTN_IMPLEMENTATION, paged_attention)
