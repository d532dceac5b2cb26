"""LayerMap and ChunkPlan: who runs which layers, and which rank runs which tokens.

LayerMap is the one place where global layer indices (the checkpoint's, `module.layer_idx`)
meet local ones (a stage's contiguous KV buffer and its list of layers): stage s runs the
contiguous range `bounds[s] : bounds[s + 1]`.

ChunkPlan splits a prompt of T tokens into rounds that flow through the pipeline one after
another; within a round every rank of the sequence group takes an equal chunk of `chunk`
tokens (rank i: positions `start + i * chunk ...`). Every round but the last holds a multiple
of `sp` tokens exactly; the last is padded up to `sp * chunk`, so its pad positions (>= T)
come after every real token: no real query ever attends to them, and nothing exports them.
Equal chunks are what lets gloo's all_gather (which refuses uneven sizes) write every
rank's KV straight into the contiguous buffer.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

from kvd.cache.kv_manager import cdiv

MAX_CHUNK_TOKENS = 1024  # tokens one rank runs through a layer at once: bounds attention memory
ROUNDS_PER_STAGE = 4  # pipeline rounds per stage when pp > 1: the bubble is (pp-1)/(rounds+pp-1)


class LayerMap:
    """Contiguous layer ranges per pipeline stage; converts global <-> local layer indices."""

    def __init__(self, bounds: Sequence[int]) -> None:
        bounds = list(bounds)
        if len(bounds) < 2 or bounds[0] != 0 or any(a >= b for a, b in itertools.pairwise(bounds)):
            raise ValueError(f"layer bounds must start at 0 and strictly increase, got {bounds}")
        self.bounds = bounds

    @classmethod
    def even(cls, num_layers: int, pp: int) -> LayerMap:
        """As even as possible; when pp does not divide the layers, later stages get one more,
        because stage 0 also embeds and computes the first token's logits."""
        if not 1 <= pp <= num_layers:
            raise ValueError(f"prefill.parallel.pp: must be in [1, {num_layers}] (the model's layers), got {pp}")
        base, extra = divmod(num_layers, pp)
        sizes = [base + (1 if s >= pp - extra else 0) for s in range(pp)]
        return cls([sum(sizes[:s]) for s in range(pp + 1)])

    @classmethod
    def for_model(cls, num_layers: int, pp: int, embed_params: int, layer_params: int) -> LayerMap:
        """The even split, then one layer moved off stage 0 (to the later stage with the fewest) if
        that lowers the largest stage's weight: stage 0 alone holds the embedding (and a tied LM head), so one
        layer of compute imbalance buys back most of the table's memory."""
        even = cls.even(num_layers, pp)
        sizes = [len(even.layers(s)) for s in range(pp)]
        if pp == 1 or sizes[0] == 1:
            return even

        def heaviest(sizes: list[int]) -> int:
            return max(n * layer_params + (embed_params if s == 0 else 0) for s, n in enumerate(sizes))

        moved = list(sizes)
        moved[0] -= 1
        lightest = min(range(pp - 1, 0, -1), key=lambda s: sizes[s])  # among later stages; ties: the last
        moved[lightest] += 1
        if heaviest(moved) >= heaviest(sizes):
            return even
        return cls([sum(moved[:s]) for s in range(pp + 1)])

    @property
    def num_stages(self) -> int:
        return len(self.bounds) - 1

    @property
    def num_layers(self) -> int:
        return self.bounds[-1]

    def layers(self, stage: int) -> range:
        """The global layer indices stage `stage` runs."""
        return range(self.bounds[stage], self.bounds[stage + 1])

    def stage_of(self, layer: int) -> int:
        if not 0 <= layer < self.num_layers:
            raise IndexError(f"layer {layer} outside [0, {self.num_layers})")
        return next(s for s in range(self.num_stages) if layer < self.bounds[s + 1])

    def to_local(self, layer: int) -> int:
        """Global layer index -> its index within its stage."""
        return layer - self.bounds[self.stage_of(layer)]

    def to_global(self, stage: int, local: int) -> int:
        if not 0 <= local < len(self.layers(stage)):
            raise IndexError(f"stage {stage} has {len(self.layers(stage))} layers, no local layer {local}")
        return self.bounds[stage] + local


@dataclass(frozen=True)
class Round:
    """One round of the chunk plan: where it starts and how many tokens each sequence rank takes."""

    start: int  # position of the round's first token
    chunk: int  # tokens per sequence rank (the last round may be padded)


@dataclass(frozen=True)
class ChunkPlan:
    """How a prompt is split into rounds that flow through the pipeline."""

    num_tokens: int
    sp: int
    rounds: tuple[Round, ...]

    @classmethod
    def build(cls, num_tokens: int, sp: int, pp: int, max_chunk: int = MAX_CHUNK_TOKENS) -> ChunkPlan:
        if num_tokens < 1:
            raise ValueError("token_ids: the prompt is empty")
        want = max(ROUNDS_PER_STAGE * pp if pp > 1 else 1, cdiv(num_tokens, sp * max_chunk))
        units, rem = divmod(num_tokens, sp)  # whole groups of sp tokens; rem goes to the last round
        k = max(1, min(want, units))
        while True:
            base, extra = divmod(units, k)
            sizes = [(base + (r < extra)) * sp for r in range(k)]  # as even as possible
            sizes[-1] += rem
            if cdiv(sizes[-1], sp) <= max_chunk or k >= units:
                break
            k += 1
        rounds, start = [], 0
        for size in sizes:
            rounds.append(Round(start, cdiv(size, sp)))
            start += size
        return cls(num_tokens, sp, tuple(rounds))

    def span(self, r: int, sp_rank: int) -> tuple[int, int]:
        """Positions [lo, hi) that rank `sp_rank` runs in round r; hi may pass num_tokens (pad)."""
        rnd = self.rounds[r]
        lo = rnd.start + sp_rank * rnd.chunk
        return lo, lo + rnd.chunk

    @property
    def padded_tokens(self) -> int:
        last = self.rounds[-1]
        return last.start + self.sp * last.chunk

    @property
    def last_token(self) -> tuple[int, int]:
        """(sp rank, row in its last-round chunk) holding the prompt's last token."""
        last = self.rounds[-1]
        return divmod(self.num_tokens - 1 - last.start, last.chunk)
