"""ContiguousKVBuffer: one request's KV, per layer, in preallocated contiguous memory.

The distributed prefill path gathers and exchanges a layer's KV with collectives,
which need contiguous tensors; the paged cache is not. Each layer has a fixed-capacity
K and V buffer `(max_tokens, kv_heads, head_dim)`; `cat` appends in place (no clone),
`get_data` returns views of the filled part, `reset` empties every layer. Appending past
the capacity raises OverflowError naming the layer and the sizes: KV is never truncated.
"""

from __future__ import annotations

import torch


class ContiguousKVBuffer:
    """Per-layer preallocated K/V of shape (max_tokens, kv_heads, head_dim)."""

    def __init__(
        self,
        num_layers: int,
        max_tokens: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
    ) -> None:
        if num_layers < 1 or max_tokens < 1:
            raise ValueError(f"num_layers and max_tokens must be >= 1, got {num_layers}, {max_tokens}")
        self.max_tokens = max_tokens
        # (L, 2, max_tokens, KVH, D): one allocation; k and v of a layer are views of it.
        self._data = torch.empty(num_layers, 2, max_tokens, num_kv_heads, head_dim, dtype=dtype, device=device)
        self._len = [0] * num_layers

    @property
    def num_layers(self) -> int:
        return len(self._len)

    def __len__(self) -> int:
        """Tokens held by layer 0 (layers fill in lockstep in normal use)."""
        return self._len[0]

    def num_tokens(self, layer: int) -> int:
        return self._len[layer]

    def cat(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        """Append k, v of shape (T, KVH, D) to `layer`."""
        if k.shape != v.shape:
            raise ValueError(f"k and v shapes differ: {tuple(k.shape)} vs {tuple(v.shape)}")
        if k.shape[1:] != self._data.shape[3:]:
            raise ValueError(f"k: expected (T, {self._data.shape[3]}, {self._data.shape[4]}), got {tuple(k.shape)}")
        start, n = self._len[layer], k.shape[0]
        if start + n > self.max_tokens:
            raise OverflowError(
                f"contiguous KV buffer: layer {layer} holds {start} tokens, appending {n} exceeds"
                f" its capacity of {self.max_tokens}"
            )
        self._data[layer, 0, start : start + n].copy_(k)
        self._data[layer, 1, start : start + n].copy_(v)
        self._len[layer] = start + n

    def get_data(self, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Views (T, KVH, D) of the layer's filled K and V; contiguous, so collectives can use them."""
        n = self._len[layer]
        return self._data[layer, 0, :n], self._data[layer, 1, :n]

    def reserve(self, layer: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Views of the next n slots of `layer`, marked filled: a collective can write into them."""
        start = self._len[layer]
        if start + n > self.max_tokens:
            raise OverflowError(
                f"contiguous KV buffer: layer {layer} holds {start} tokens, reserving {n} exceeds"
                f" its capacity of {self.max_tokens}"
            )
        self._len[layer] = start + n
        return self._data[layer, 0, start : start + n], self._data[layer, 1, start : start + n]

    def reset(self) -> None:
        self._len = [0] * len(self._len)
