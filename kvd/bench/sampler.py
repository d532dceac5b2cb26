"""Sampler microbenchmark (placeholder while the bench is written)."""

from __future__ import annotations

import torch

from kvd.sampling import SamplingParams

_MIX = 0x9E3779B97F4A7C15


class PerRowSampler:
    """kvd's sampler before batching (a Python loop over sampled rows, a sort per top-p row):
    the benchmark's baseline, and the reference the tests hold seeded draws to."""

    def __init__(self, device: torch.device, seed: int = 0) -> None:
        self.device = device
        self._generator = torch.Generator(device=device)
        self._generator.manual_seed(seed)
        self._seeded = torch.Generator(device=device)

    def __call__(self, logits: torch.Tensor, params: list[SamplingParams], output_index: list[int]):
        tokens = logits.argmax(dim=-1)  # (B,)
        for i, p in enumerate(params):
            if not p.greedy:
                tokens[i] = self._sample_row(logits[i], p, output_index[i])
        return tokens.tolist(), None

    def _sample_row(self, row: torch.Tensor, p: SamplingParams, index: int) -> int:
        row = row / p.temperature  # (V,)
        if 0 < p.top_k < row.shape[0]:
            kth = torch.topk(row, p.top_k).values[-1]
            row = row.masked_fill(row < kth, float("-inf"))
        if p.top_p < 1.0:
            sorted_row, order = row.sort(descending=True)
            sorted_probs = sorted_row.softmax(-1)
            drop_sorted = sorted_probs.cumsum(-1) - sorted_probs >= p.top_p
            drop = torch.empty_like(drop_sorted).scatter_(0, order, drop_sorted)
            row = row.masked_fill(drop, float("-inf"))
        probs = row.softmax(-1)
        if p.seed is not None:
            gen = self._seeded
            gen.manual_seed((p.seed * _MIX + index) % (1 << 63))
        else:
            gen = self._generator
        noise = torch.empty_like(probs).exponential_(generator=gen)
        return int((probs / noise).argmax())
