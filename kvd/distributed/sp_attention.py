"""Sequence-parallel attention for transformers models: exchange this layer's KV, then attend.

Registered with transformers' AttentionInterface as "kvd_sp". A rank runs its chunk of a
round (positions [lo, hi)) through its stage's decoder layers; in each layer this function

1. hands the chunk's K/V (after RoPE) to the KVSync, which appends every sequence rank's
   chunk of the round to the layer's contiguous buffer (the per-layer sync), then
2. attends the chunk's queries over the buffer's first `hi` tokens — every earlier round,
   every earlier rank's chunk of this round, and its own — with a causal mask offset by lo:
   query at position p sees keys 0..p, exactly as in one process.

The per-round state (buffer, sync, mask) is installed with `round_context`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import AttentionInterface

from kvd.distributed.kv_sync import KVSync

ATTN_IMPLEMENTATION = "kvd_sp"


@dataclass
class RoundContext:
    """What the attention of one round needs: the KV sync, the layer map, the visible context."""

    sync: KVSync
    to_local: Callable[[int], int]  # global layer index -> index in the stage's buffer
    context_len: int  # hi: keys [0, hi) are visible to this chunk
    mask: torch.Tensor | None  # (T, hi) bool, True = attend; None when causal from 0 (lo == 0)


_ctx: RoundContext | None = None


def causal_mask(lo: int, hi: int, device: torch.device | str = "cpu") -> torch.Tensor | None:
    """(hi - lo, hi) bool: query at position lo + t sees keys 0..lo + t. None when lo == 0:
    then the square causal mask applies and SDPA's is_causal path is used."""
    if lo == 0:
        return None
    q_pos = torch.arange(lo, hi, device=device).unsqueeze(1)  # (T, 1)
    return torch.arange(hi, device=device).unsqueeze(0) <= q_pos  # (T, hi)


@contextlib.contextmanager
def round_context(ctx: RoundContext) -> Iterator[None]:
    global _ctx
    prev, _ctx = _ctx, ctx
    try:
        yield
    finally:
        _ctx = prev


def sp_attention(
    module: torch.nn.Module,
    query: torch.Tensor,  # (1, H, T, D)
    key: torch.Tensor,  # (1, KVH, T, D)
    value: torch.Tensor,  # (1, KVH, T, D)
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    if _ctx is None:
        raise RuntimeError("kvd_sp attention called outside round_context()")
    layer = _ctx.to_local(module.layer_idx)
    k_all, v_all = _ctx.sync.exchange(layer, key[0].transpose(0, 1), value[0].transpose(0, 1))  # (C, KVH, D)
    n = _ctx.context_len
    k = k_all[:n].permute(1, 0, 2).unsqueeze(0)  # (1, KVH, hi, D)
    v = v_all[:n].permute(1, 0, 2).unsqueeze(0)
    causal = _ctx.mask is None
    o = F.scaled_dot_product_attention(query, k, v, attn_mask=_ctx.mask, is_causal=causal, scale=scaling,
                                       enable_gqa=True)  # fmt: skip  # (1, H, T, D)
    return o.transpose(1, 2), None  # (1, T, H, D), as transformers' attention functions return


AttentionInterface.register(ATTN_IMPLEMENTATION, sp_attention)
