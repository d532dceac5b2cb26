"""The kept set of sampled rows, and the draw from it, in torch.

A sampled row, divided by its temperature, becomes u = exp(x - max) in place (its top token
has u = 1, so p = u / sum(u) and min-p is u >= min_p); it keeps the tokens at or above one
threshold on u: min-p and top-k make a floor (ties kept, as transformers does), then top-p
keeps the largest tokens at or above it while the mass before them is below top_p of the
floor's mass (vLLM's order; transformers applies min-p last).

This is the sampler's path where the native op (`kvd.ops.sample_rows`, which needs no sort)
does not apply — on CUDA, or without a compiler — and that op's reference. The threshold is
found among each row's top candidates: a top-k of 64, then of 256 and 1,024 for the rows
whose kept set is larger, then a sort; a top-k is cheap, a sort over 49,152 tokens costs
~2 ms a row on a CPU core. A row whose kept set lies within its candidates draws there (one
uniform, the inverse of the candidates' running sum); any other row draws over the whole
row in one pass (the block whose sum the draw falls in, then the token within it).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kvd.sampling import SamplingParams

CANDIDATES = (64, 256, 1024)  # top-k sizes tried for a row's kept set before a sort


def select(t: torch.Tensor, rows: list[int]) -> torch.Tensor:
    """t's rows `rows` (ascending): t itself when they are all of them, else a copy."""
    if len(rows) == len(t):
        return t
    return t.index_select(0, torch.tensor(rows, device=t.device))


def scale(x: torch.Tensor, params: list[SamplingParams]) -> torch.Tensor:
    """x (S, V) divided by each row's temperature, in place."""
    temperature = torch.tensor([p.temperature for p in params], device=x.device)
    return x.div_(temperature.unsqueeze(1))


def exponentiate(x: torch.Tensor) -> torch.Tensor:
    """x (S, V) becomes u = exp(x - row max), in place; returns each row's sum (S,) float64."""
    top = x.amax(dim=-1, keepdim=True).clamp_(min=torch.finfo(x.dtype).min)  # a row of -inf: all 0
    return x.sub_(top).exp_().sum(dim=-1).double()  # (summing as float64 would copy x as float64)


@dataclass
class Candidates:
    """Rows whose kept set lies within their top C tokens: those tokens, sorted, and their
    u (0 where not kept)."""

    rows: torch.Tensor  # (n,) row positions
    ids: torch.Tensor  # (n, C)
    weights: torch.Tensor  # (n, C)


class KeptSet:
    """Thresholds and draws of sampled rows, with the draws' generator."""

    def __init__(self, generator: torch.Generator) -> None:
        self.generator = generator

    def thresholds(self, u: torch.Tensor, mass: torch.Tensor, params: list[SamplingParams]):
        """Each row's threshold on u (S,) (0: keeps every token) and the candidate sets that
        hold the rows' kept sets; `mass` (S,) is each row's sum of u."""
        vocab = u.shape[1]
        threshold = torch.zeros(len(params), device=u.device)
        todo = [i for i, p in enumerate(params) if 0 < p.top_k < vocab or p.top_p < 1 or p.min_p]
        if not todo:
            return threshold, []
        all_k = torch.tensor([p.top_k if p.top_k < vocab else 0 for p in params], device=u.device)
        all_min_p = torch.tensor([p.min_p for p in params], device=u.device)
        all_top_p = torch.tensor([p.top_p for p in params], device=u.device)
        top_k = int(all_k.max())
        sizes = sorted({max(c, top_k) for c in CANDIDATES if max(c, top_k) < vocab}) + [vocab]
        found: list[Candidates] = []
        for size in sizes:
            if not todo:
                break
            rows = torch.tensor(todo, device=u.device)
            k, min_p, top_p = all_k[rows], all_min_p[rows], all_top_p[rows]
            ur = select(u, todo)
            values, ids = ur.topk(size, dim=-1) if size < vocab else ur.sort(dim=-1, descending=True)  # (n, C)
            floor = torch.where(k > 0, values.gather(1, (k - 1).clamp(min=0).unsqueeze(1)).squeeze(1), 0.0)
            floor = torch.maximum(floor, min_p)
            inside = values >= floor.unsqueeze(1)  # (n, C)
            weights = values * inside  # (n, C)
            # closed: every token at or above the floor is a candidate
            closed = ~inside[:, -1] | (k == size) if size < vocab else torch.ones_like(inside[:, -1])
            has_p = top_p < 1
            # top-p renormalises over the floor's set: the candidates' mass where they hold it,
            # the row's where there is no floor, else a sum over the row
            total = torch.where(closed, weights.sum(dim=-1, dtype=torch.float64), mass[rows])
            wide = (~closed & has_p & (floor > 0)).nonzero().squeeze(1)
            if len(wide):
                r = select(ur, wide.tolist())
                total[wide] = r.masked_fill(r < floor[wide].unsqueeze(1), 0.0).sum(dim=-1, dtype=torch.float64)
            q = weights.double() / total.unsqueeze(1)  # float64: top-p's boundary as exact as the weights
            cum = q.cumsum(dim=-1)
            # top-p: keep the smallest prefix reaching top_p (drop a token once the mass before it does)
            keep = inside & (~has_p.unsqueeze(1) | (cum - q < top_p.unsqueeze(1)))
            held = closed | (has_p & (cum[:, -1] >= top_p))  # the kept set lies within the candidates
            last = keep.sum(dim=-1).clamp(min=1) - 1
            threshold[rows] = torch.where(has_p, values.gather(1, last.unsqueeze(1)).squeeze(1), floor)
            done = held.nonzero().squeeze(1)
            if size < vocab and len(done):
                found.append(Candidates(rows[done], ids[done], weights[done] * keep[done]))
            # without top-p the floor is the threshold, whatever the size of its set
            todo = [i for i, ok in zip(todo, (held | ~has_p).tolist()) if not ok]
        return threshold, found

    def draw(self, u: torch.Tensor, threshold: torch.Tensor, candidates: list[Candidates],
             skip: set[int]) -> torch.Tensor:  # fmt: skip
        """A token of each row not in `skip`, in proportion to u over its kept set."""
        tokens = torch.zeros(len(u), dtype=torch.long, device=u.device)
        done = set(skip)
        for c in candidates:
            pick = [j for j, row in enumerate(c.rows.tolist()) if row not in done]
            if pick:
                rows = c.rows[pick]
                picked = self._invert(c.weights[pick].double().cumsum(dim=-1))  # (n,)
                tokens[rows] = c.ids[pick].gather(1, picked.unsqueeze(1)).squeeze(1)
                done.update(rows.tolist())
        rest = [i for i in range(len(u)) if i not in done]
        if rest:
            w = select(u, rest)
            cut = threshold[rest]
            if bool((cut > 0).any()):
                w = w.masked_fill(w < cut.unsqueeze(1), 0.0)
            tokens[rest] = self._invert_rows(w)
        return tokens

    def _invert(self, cum: torch.Tensor, u: torch.Tensor | None = None) -> torch.Tensor:
        """For each row of cumulative float64 weights (n, C), the index where a uniform draw
        over [0, total) falls (a drawn u (n, 1) may be given): weight-0 indices are never hit."""
        total = cum[:, -1:]
        if u is None:
            u = torch.rand(total.shape, dtype=torch.float64, device=cum.device, generator=self.generator) * total
        u = torch.minimum(u, torch.nextafter(total, torch.zeros_like(total)))  # below the total
        return torch.searchsorted(cum, u, right=True).squeeze(1).clamp(max=cum.shape[1] - 1)

    def _invert_rows(self, w: torch.Tensor, block: int = 256) -> torch.Tensor:
        """A draw in proportion to whole rows of weights (n, V) in one pass: the block whose
        sum the draw falls in, then the token within it (no (n, V) cumulative sum)."""
        n, vocab = w.shape
        whole = vocab // block * block
        sums = w[:, :whole].reshape(n, -1, block).sum(dim=-1, dtype=torch.float64)  # (n, V / block)
        if whole < vocab:
            sums = torch.cat([sums, w[:, whole:].sum(dim=-1, keepdim=True, dtype=torch.float64)], dim=1)
        cum = sums.cumsum(dim=-1)
        total = cum[:, -1:]
        u = torch.rand(total.shape, dtype=torch.float64, device=w.device, generator=self.generator) * total
        b = self._invert(cum, u).unsqueeze(1)  # (n, 1)
        u = u - torch.where(b > 0, cum.gather(1, (b - 1).clamp(min=0)), 0.0)  # within the block
        cols = b * block + torch.arange(block, device=w.device)  # (n, block)
        inner = w.gather(1, cols.clamp(max=vocab - 1)).double().masked_fill_(cols >= vocab, 0.0).cumsum(dim=-1)
        return cols.gather(1, self._invert(inner, u).unsqueeze(1)).squeeze(1)

