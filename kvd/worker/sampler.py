"""Sampler: picks each request's next token from its logits row.

Greedy rows take the argmax. Other rows apply temperature, then top-k, then top-p, and
draw with the exponential-race trick (argmax of p / Exp(1) noise), which samples from p.
A seeded request draws its noise from a generator seeded by (seed, output index), so the
same seed gives the same tokens whatever the batch and across preemption. Logprobs are
of the model's raw distribution (before temperature and truncation), as vLLM reports them.
"""

from __future__ import annotations

import torch

from kvd.sampling import SamplingParams
from kvd.scheduler.output import Logprobs

_MIX = 0x9E3779B97F4A7C15  # golden-ratio constant: spreads (seed, index) over the seed space


class Sampler:
    """The random generators of greedy and sampled rows (seeded ones per request and output index)."""

    def __init__(self, device: torch.device, seed: int = 0) -> None:
        self.device = device
        self._generator = torch.Generator(device=device)
        self._generator.manual_seed(seed)
        self._seeded = torch.Generator(device=device)

    def __call__(
        self,
        logits: torch.Tensor,  # (B, V) float32
        params: list[SamplingParams],
        output_index: list[int],  # per row: how many tokens the request has generated so far
    ) -> tuple[list[int], list[Logprobs | None] | None]:
        tokens = logits.argmax(dim=-1)  # (B,)
        for i, p in enumerate(params):
            if not p.greedy:
                tokens[i] = self._sample_row(logits[i], p, output_index[i])
        token_list = tokens.tolist()
        if all(p.logprobs is None for p in params):
            return token_list, None
        return token_list, [
            self._logprobs(logits[i], token_list[i], p.logprobs) if p.logprobs is not None else None
            for i, p in enumerate(params)
        ]

    def _sample_row(self, row: torch.Tensor, p: SamplingParams, index: int) -> int:
        row = row / p.temperature  # (V,)
        if 0 < p.top_k < row.shape[0]:
            kth = torch.topk(row, p.top_k).values[-1]
            row = row.masked_fill(row < kth, float("-inf"))
        if p.top_p < 1.0:
            sorted_row, order = row.sort(descending=True)
            sorted_probs = sorted_row.softmax(-1)
            # Keep the smallest prefix whose mass reaches top_p: drop a token once the mass before it does.
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

    @staticmethod
    def _logprobs(row: torch.Tensor, token: int, n: int) -> Logprobs:
        lp = row.log_softmax(-1)
        top = torch.topk(lp, n) if n else None
        return Logprobs(
            logprob=float(lp[token]),
            top_ids=top.indices.tolist() if top is not None else [],
            top_logprobs=top.values.tolist() if top is not None else [],
        )
