"""write_kv_to_blocks: a prefill group's contiguous KV into a worker's paged KV blocks.

After a group prefill the owner holds the prompt's KV as one `(L, 2, T, KVH, D)` tensor;
decode runs on kvd's paged cache, one `(2, num_blocks, block_size, KVH, D)` tensor per
layer. Token t of the prompt goes to slot `block_ids[t // block_size] * block_size +
t % block_size`, the same slot mapping the ModelRunner uses, so a request whose block table
is `block_ids` and whose `num_computed_tokens` is T decodes on from there.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def write_kv_to_blocks(kv: torch.Tensor, kv_caches: Sequence[torch.Tensor], block_ids: Sequence[int]) -> None:
    """Copy kv (L, 2, T, KVH, D) into each layer's paged cache at the request's blocks."""
    num_layers, _, n, kvh, d = kv.shape
    if len(kv_caches) != num_layers:
        raise ValueError(f"kv_caches: {len(kv_caches)} layers, the KV has {num_layers}")
    if kv_caches[0].shape[3:] != (kvh, d):
        raise ValueError(f"kv_caches: (KVH, D) = {tuple(kv_caches[0].shape[3:])}, the KV has {(kvh, d)}")
    bs = kv_caches[0].shape[2]
    if len(block_ids) * bs < n:
        raise ValueError(f"block_ids: {len(block_ids)} blocks of {bs} hold fewer than the {n} tokens")
    device = kv_caches[0].device
    pos = torch.arange(n, device=device)  # (T,)
    slots = torch.as_tensor(list(block_ids), device=device)[pos // bs] * bs + pos % bs  # (T,)
    for layer, cache in enumerate(kv_caches):
        flat = cache.view(2, -1, kvh, d)  # (2, NB*BS, KVH, D)
        flat.index_copy_(1, slots, kv[layer].to(device=device, dtype=cache.dtype))
