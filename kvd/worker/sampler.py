"""Sampler: every request's next token, for all rows of a step at once (STYLE.md, 16).

The worker keeps a SamplingState per request (its parameters, its tokens, and what its
logits transforms need, built once). A step, `Sampler.__call__(logits (B, V), states)`:

1. Logprobs, for the rows that ask, are of the raw rows (before any transform), as vLLM
   reports them by default.
2. Plain greedy rows (temperature 0 and nothing that can move the argmax) take the argmax
   of their raw logits: a step of them costs one argmax, as before the transforms existed.
3. The other rows go through the transforms as one (P, V) tensor, in vLLM's order: the
   allowed tokens, banned words, min-tokens (end-of-sequence and stop ids masked until the
   output has that many tokens), the logit bias, then the repetition penalty (over prompt
   and output) and the frequency and presence penalties (over the output). Each writes
   only the entries it changes, as flat indices into the batch: a row with 500 distinct
   tokens costs 500 entries, not 49,152.
4. Greedy rows among them take the argmax. Sampled rows divide by their temperature and
   keep the tokens at or above one threshold per row: min-p (p >= min_p * p_max) and top-k,
   then top-p over what those kept, renormalised (vLLM's order; transformers applies min-p
   last). The threshold is found among each row's top candidates (a top-k of 64, then of
   256 and 1,024 for the rows whose kept set is larger, then a sort), so the usual row is never
   sorted over the vocabulary.
5. The draw. A seeded row draws as kvd always has: the exponential race (argmax of
   p / Exp(1) noise over the vocabulary) with noise from a generator seeded by (seed,
   output index), so a seed gives the same tokens whatever the batch, across preemption
   and across this batching; that noise is drawn per seeded row (~0.8 ms a row on a CPU
   core). Unseeded rows share one uniform draw per row and invert the CDF of their kept
   set: over the candidates where the set lies within them, else over the row in float64.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from kvd.sampling import SamplingParams
from kvd.scheduler.output import Logprobs

_MIX = 0x9E3779B97F4A7C15  # golden-ratio constant: spreads (seed, index) over the seed space
_CANDIDATES = (64, 256, 1024)  # top-k sizes tried for a row's kept set before a sort


def _select(t: torch.Tensor, rows: list[int]) -> torch.Tensor:
    """t's rows `rows` (ascending): t itself when they are all of them, else a copy."""
    if len(rows) == len(t):
        return t
    return t.index_select(0, torch.tensor(rows, device=t.device))


class TokenCounts:
    """A request's distinct tokens and how often each occurs in its output, for the penalties.

    `ids[:n]` and `counts[:n]` are NumPy buffers that grow by doubling: `add` is a dict
    lookup and one write (a tensor element write costs microseconds of dispatch), so the
    table follows the output token by token and a step only copies it out. The prompt's
    tokens are in it, with count 0, when the repetition penalty needs them.
    """

    def __init__(self, prompt: Sequence[int], output: Sequence[int]) -> None:
        ids = np.unique(np.asarray([*prompt, *output], dtype=np.int64))
        self.n = len(ids)
        self.ids = np.empty(max(16, 2 * self.n), dtype=np.int64)
        self.ids[: self.n] = ids
        self.counts = np.zeros(len(self.ids), dtype=np.float32)
        np.add.at(self.counts, np.searchsorted(ids, np.asarray(output, dtype=np.int64)), 1)
        self.index = dict(zip(ids.tolist(), range(self.n)))

    def add(self, token: int) -> None:
        i = self.index.get(token)
        if i is None:
            i = self.index[token] = self.n
            if i == len(self.ids):
                self.ids = np.resize(self.ids, 2 * i)
                self.counts = np.concatenate([self.counts, np.zeros(i, dtype=np.float32)])
            self.ids[i] = token
            self.n += 1
        self.counts[i] += 1


class SamplingState:
    """What the sampler keeps of one request on the worker.

    `token_ids` is the runner's list of the request's tokens (prompt, then output): the
    sampler appends each token it draws to it (`append`), which also counts the token for
    the penalties. A request resumed after preemption gets a new state from its tokens so
    far, so its counts come back the same. Token ids outside the vocabulary (which the
    engine rejects, `SamplingParams.check_vocab`) are dropped here rather than indexed.
    """

    def __init__(self, params: SamplingParams, token_ids: list[int], num_prompt_tokens: int, vocab_size: int,
                 eos_token_ids: Iterable[int] = ()) -> None:  # fmt: skip
        self.params = params
        self.token_ids = token_ids
        self.num_prompt_tokens = num_prompt_tokens

        def ids(tokens: Iterable[int]) -> np.ndarray:
            return np.asarray([t for t in tokens if t < vocab_size], dtype=np.int64)

        bias = {t: b for t, b in params.logit_bias.items() if t < vocab_size}
        self.bias_ids, self.bias = ids(bias), np.asarray(list(bias.values()), dtype=np.float32)
        self.allowed = ids(params.allowed_token_ids) if params.allowed_token_ids is not None else None
        words = [w for w in params.bad_words_token_ids if w[-1] < vocab_size]
        self.banned = ids(w[0] for w in words if len(w) == 1)
        self.banned_after = [(w[:-1], w[-1]) for w in words if len(w) > 1]  # (prefix, token)
        stops = set(params.stop_token_ids) | (set() if params.ignore_eos else set(eos_token_ids))
        self.stops = ids(sorted(stops))  # masked while the output is shorter than min_tokens
        self.counts = None
        if params.penalized:
            prompt = token_ids[:num_prompt_tokens] if params.repetition_penalty != 1 else ()
            self.counts = TokenCounts(prompt, token_ids[num_prompt_tokens:])
        self._transforms = bool(len(self.bias_ids) or self.allowed is not None or len(self.banned)
                                or self.banned_after or self.counts is not None)  # fmt: skip

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def transforms(self) -> bool:
        """Whether a logits transform applies to this step's row."""
        return self._transforms or self.num_output_tokens < self.params.min_tokens

    @property
    def plain_greedy(self) -> bool:
        return self.params.greedy and not self.transforms

    def masked(self) -> np.ndarray:
        """The token ids masked this step: banned words and, before min_tokens, the stop ids."""
        out = [self.banned]
        if self.banned_after:
            output = self.token_ids[self.num_prompt_tokens :]
            out.append(np.asarray([t for prefix, t in self.banned_after
                                   if len(output) >= len(prefix) and output[-len(prefix) :] == prefix], dtype=np.int64))  # fmt: skip
        if self.num_output_tokens < self.params.min_tokens:
            out.append(self.stops)
        return np.concatenate(out)

    def append(self, token: int) -> None:
        self.token_ids.append(token)
        if self.counts is not None:
            self.counts.add(token)


@dataclass
class _Candidates:
    """Sampled rows whose kept set lies within their top C tokens: those tokens, sorted, and
    their probabilities (0 where not kept)."""

    rows: torch.Tensor  # (n,) row positions among the sampled rows
    ids: torch.Tensor  # (n, C)
    weights: torch.Tensor  # (n, C)


class Sampler:
    """Draws each step's tokens; holds the random generators (seeded ones per request and index)."""

    def __init__(self, device: torch.device, vocab_size: int, eos_token_ids: Iterable[int] = (), seed: int = 0) -> None:
        self.device = device
        self.vocab_size = vocab_size
        self.eos_token_ids = sorted(eos_token_ids)
        self._generator = torch.Generator(device=device)
        self._generator.manual_seed(seed)
        self._seeded = torch.Generator(device=device)

    def state(self, params: SamplingParams, token_ids: list[int], num_prompt_tokens: int) -> SamplingState:
        """A request's SamplingState over the runner's token list (appended to by the sampler)."""
        return SamplingState(params, token_ids, num_prompt_tokens, self.vocab_size, self.eos_token_ids)

    def __call__(
        self, logits: torch.Tensor, states: Sequence[SamplingState]
    ) -> tuple[list[int], list[Logprobs | None] | None]:
        """One token per row, appended to its state; the rows' logprobs (None when no row asks).
        `logits` (B, V) float32 is the step's scratch: the transforms write into it (a view such
        as an expanded row is copied first)."""
        if not logits.is_contiguous():
            logits = logits.contiguous()
        raw = self._raw_logprobs(logits, states)  # before any transform
        transformed = [i for i, s in enumerate(states) if not s.plain_greedy]
        if not transformed:
            tokens = logits.argmax(dim=-1)  # (B,)
        else:
            tokens = torch.empty(len(states), dtype=torch.long, device=logits.device)
            plain = [i for i, s in enumerate(states) if s.plain_greedy]
            if plain:
                tokens[plain] = _select(logits, plain).argmax(dim=-1)
            tokens[transformed] = self._transformed(_select(logits, transformed), [states[i] for i in transformed])
        token_list = tokens.tolist()
        logprobs = self._logprobs(raw, states, token_list)
        for state, token in zip(states, token_list):
            state.append(token)
        return token_list, logprobs

    def processed_logits(self, logits: torch.Tensor, states: Sequence[SamplingState]) -> torch.Tensor:
        """The logits each row's token is drawn from (vLLM's "processed logits"): after the
        transforms and, for sampled rows, divided by the temperature with -inf outside the kept
        set. The step never writes these rows out; this is for tests and inspection."""
        x = logits.clone()  # (B, V)
        self._mask_and_bias(x, list(states))
        self._penalize(x, list(states))
        sampled = [i for i, s in enumerate(states) if not s.params.greedy]
        if sampled:
            rows = [states[i] for i in sampled]
            scaled = self._scale(x[sampled], rows)
            u = scaled.clone()
            threshold, _ = self._kept(u, self._exp(u), rows)
            x[sampled] = scaled.masked_fill(u < threshold.unsqueeze(1), -math.inf)
        return x

    # ---- the transforms ------------------------------------------------------------------
    def _transformed(self, x: torch.Tensor, states: list[SamplingState]) -> torch.Tensor:
        """Tokens of rows that need a transform or a draw; x (P, V) is written into."""
        self._mask_and_bias(x, states)
        self._penalize(x, states)
        tokens = torch.empty(len(states), dtype=torch.long, device=x.device)
        greedy = [i for i, s in enumerate(states) if s.params.greedy]
        if greedy:
            tokens[greedy] = _select(x, greedy).argmax(dim=-1)
        if len(greedy) < len(states):
            sampled = [i for i, s in enumerate(states) if not s.params.greedy]
            tokens[sampled] = self._draw(_select(x, sampled), [states[i] for i in sampled])
        return tokens

    def _flat(self, rows: Sequence[int], ids: Sequence[np.ndarray], width: int) -> torch.Tensor:
        """Flat indices into a (P, width) tensor of each row's ids."""
        lengths = [len(a) for a in ids]
        flat = np.repeat(np.asarray(rows, dtype=np.int64) * width, lengths) + np.concatenate(ids)
        return torch.from_numpy(flat).to(self.device)

    def _mask_and_bias(self, x: torch.Tensor, states: list[SamplingState]) -> None:
        vocab = x.shape[1]
        allowed = [i for i, s in enumerate(states) if s.allowed is not None]
        if allowed:
            sub = x[allowed]  # (A, V)
            keep = self._flat(range(len(allowed)), [states[i].allowed for i in allowed], vocab)
            only = torch.full_like(sub, -math.inf)
            only.view(-1)[keep] = sub.view(-1)[keep]
            x[allowed] = only
        masked = [(i, m) for i, s in enumerate(states) if len(m := s.masked())]
        if masked:
            x.view(-1)[self._flat(*zip(*masked), vocab)] = -math.inf
        biased = [i for i, s in enumerate(states) if len(s.bias_ids)]
        if biased:
            flat = self._flat(biased, [states[i].bias_ids for i in biased], vocab)
            bias = torch.from_numpy(np.concatenate([states[i].bias for i in biased])).to(self.device)
            x.view(-1).index_add_(0, flat, bias)

    def _penalize(self, x: torch.Tensor, states: list[SamplingState]) -> None:
        """Repetition (transformers': divide a positive logit, multiply a negative one), then
        frequency and presence (OpenAI's: minus count * frequency + (count > 0) * presence),
        on each row's distinct tokens only."""
        rows = [i for i, s in enumerate(states) if s.counts is not None]
        if not rows:
            return
        tables = [states[i].counts for i in rows]
        lengths = [t.n for t in tables]
        flat = self._flat(rows, [t.ids[: t.n] for t in tables], x.shape[1])

        def per_entry(values: list[float]) -> torch.Tensor:
            return torch.from_numpy(np.repeat(np.asarray(values, dtype=np.float32), lengths)).to(self.device)

        params = [states[i].params for i in rows]
        counts = torch.from_numpy(np.concatenate([t.counts[: t.n] for t in tables])).to(self.device)
        rep = per_entry([p.repetition_penalty for p in params])
        v = x.view(-1)[flat]
        v = torch.where(v > 0, v / rep, v * rep)
        v -= counts * per_entry([p.frequency_penalty for p in params])
        v -= counts.clamp(max=1) * per_entry([p.presence_penalty for p in params])
        x.view(-1)[flat] = v

    # ---- truncation and the draw ---------------------------------------------------------
    # A sampled row is divided by its temperature, then turned in place into
    # u = exp(x - max) (S, V): the max token has u = 1, so p = u / sum(u), min-p is u >= min_p,
    # and every threshold is one on u. No (S, V) tensor is allocated on the way.
    @staticmethod
    def _scale(x: torch.Tensor, states: list[SamplingState]) -> torch.Tensor:
        temperature = torch.tensor([s.params.temperature for s in states], device=x.device)
        return x.div_(temperature.unsqueeze(1))

    @staticmethod
    def _exp(x: torch.Tensor) -> torch.Tensor:
        """x (S, V) becomes u = exp(x - row max), in place; returns each row's sum (S,)."""
        top = x.amax(dim=-1, keepdim=True).clamp_(min=torch.finfo(x.dtype).min)  # a row of -inf: all 0
        return x.sub_(top).exp_().sum(dim=-1).double()  # (summing as float64 would copy x as float64)

    def _draw(self, x: torch.Tensor, states: list[SamplingState]) -> torch.Tensor:
        """Sampled rows' tokens; x (S, V) is written into."""
        self._scale(x, states)
        seeded = [i for i, s in enumerate(states) if s.params.seed is not None]
        scaled = x.index_select(0, torch.tensor(seeded, device=x.device)) if seeded else None  # the race's logits
        mass = self._exp(x)
        threshold, candidates = self._kept(x, mass, states)
        tokens = torch.empty(len(states), dtype=torch.long, device=x.device)
        if seeded:
            cut = _select(x, seeded) < threshold[seeded].unsqueeze(1)
            tokens[seeded] = self._race(scaled.masked_fill_(cut, -math.inf), [states[i] for i in seeded])
        done = set(seeded)
        for c in candidates:
            pick = [j for j, row in enumerate(c.rows.tolist()) if row not in done]
            if pick:
                rows = c.rows[pick]
                picked = self._invert(c.weights[pick].double().cumsum(dim=-1))  # (n,)
                tokens[rows] = c.ids[pick].gather(1, picked.unsqueeze(1)).squeeze(1)
                done.update(rows.tolist())
        rest = [i for i in range(len(states)) if i not in done]
        if rest:
            u = _select(x, rest)
            cut = threshold[rest]
            if bool((cut > 0).any()):
                u = u.masked_fill(u < cut.unsqueeze(1), 0.0)
            tokens[rest] = self._invert_rows(u)
        return tokens

    def _kept(self, u: torch.Tensor, mass: torch.Tensor, states: list[SamplingState]):
        """Each row's threshold on u (S,) (0: keeps every token) and the candidate sets that
        hold the rows' kept sets. A row is resolved at the smallest candidate size that holds
        its kept set: the top 64, 256, then 1,024, then the sorted row."""
        vocab = u.shape[1]
        threshold = torch.zeros(len(states), device=u.device)
        todo = [i for i, s in enumerate(states) if 0 < s.params.top_k < vocab or s.params.top_p < 1 or s.params.min_p]
        if not todo:
            return threshold, []
        params = [s.params for s in states]
        all_k = torch.tensor([p.top_k if p.top_k < vocab else 0 for p in params], device=u.device)
        all_min_p = torch.tensor([p.min_p for p in params], device=u.device)
        all_top_p = torch.tensor([p.top_p for p in params], device=u.device)
        top_k = int(all_k.max())
        sizes = sorted({max(c, top_k) for c in _CANDIDATES if max(c, top_k) < vocab}) + [vocab]
        found: list[_Candidates] = []
        for size in sizes:
            if not todo:
                break
            rows = torch.tensor(todo, device=u.device)
            k, min_p, top_p = all_k[rows], all_min_p[rows], all_top_p[rows]
            ur = _select(u, todo)
            values, ids = ur.topk(size, dim=-1) if size < vocab else ur.sort(dim=-1, descending=True)  # (n, C)
            # min-p and top-k: a floor (ties at the floor are kept, as transformers does)
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
                r = _select(ur, wide.tolist())
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
                found.append(_Candidates(rows[done], ids[done], weights[done] * keep[done]))
            # without top-p the floor is the threshold, whatever the size of its set
            todo = [i for i, ok in zip(todo, (held | ~has_p).tolist()) if not ok]
        return threshold, found

    def _invert(self, cum: torch.Tensor, u: torch.Tensor | None = None) -> torch.Tensor:
        """For each row of cumulative float64 weights (n, C), the index where a uniform draw
        over [0, total) falls (a drawn u (n, 1) may be given): weight-0 indices are never hit."""
        total = cum[:, -1:]
        if u is None:
            u = torch.rand(total.shape, dtype=torch.float64, device=cum.device, generator=self._generator) * total
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
        u = torch.rand(total.shape, dtype=torch.float64, device=w.device, generator=self._generator) * total
        b = self._invert(cum, u).unsqueeze(1)  # (n, 1)
        u = u - torch.where(b > 0, cum.gather(1, (b - 1).clamp(min=0)), 0.0)  # within the block
        cols = b * block + torch.arange(block, device=w.device)  # (n, block)
        inner = w.gather(1, cols.clamp(max=vocab - 1)).double().masked_fill_(cols >= vocab, 0.0).cumsum(dim=-1)
        return cols.gather(1, self._invert(inner, u).unsqueeze(1)).squeeze(1)

    def _race(self, x: torch.Tensor, states: list[SamplingState]) -> torch.Tensor:
        """Seeded rows (their logits, -inf outside the kept set): argmax of p / Exp(1) noise,
        the noise from (seed, output index), as kvd has always drawn them."""
        probs = x.softmax(dim=-1)  # (n, V)
        noise = torch.empty_like(probs)
        for row, s in enumerate(states):
            self._seeded.manual_seed((s.params.seed * _MIX + s.num_output_tokens) % (1 << 63))
            noise[row].exponential_(generator=self._seeded)
        return (probs / noise).argmax(dim=-1)

    # ---- logprobs --------------------------------------------------------------------------
    @staticmethod
    def _raw_logprobs(logits: torch.Tensor, states: Sequence[SamplingState]) -> torch.Tensor | None:
        rows = [i for i, s in enumerate(states) if s.params.logprobs is not None]
        return _select(logits, rows).log_softmax(dim=-1) if rows else None  # (L, V)

    @staticmethod
    def _logprobs(lp: torch.Tensor | None, states: Sequence[SamplingState], tokens: list[int]):
        if lp is None:
            return None
        rows = [i for i, s in enumerate(states) if s.params.logprobs is not None]
        chosen = lp.gather(1, torch.tensor([tokens[i] for i in rows], device=lp.device).unsqueeze(1)).squeeze(1)
        n = max(states[i].params.logprobs for i in rows)
        top = lp.topk(n, dim=-1) if n else None
        top_ids = top.indices.tolist() if top is not None else [[]] * len(rows)
        top_lps = top.values.tolist() if top is not None else [[]] * len(rows)
        out: list[Logprobs | None] = [None] * len(states)
        for j, (i, value) in enumerate(zip(rows, chosen.tolist())):
            k = states[i].params.logprobs
            out[i] = Logprobs(logprob=value, top_ids=top_ids[j][:k], top_logprobs=top_lps[j][:k])
        return out
