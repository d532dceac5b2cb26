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
   1,024 for the rows whose kept set is larger, then a sort), so the usual row is never
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
_CANDIDATES = (64, 1024)  # top-k sizes tried for a row's kept set before a sort


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
        self, logits: torch.Tensor, states: Sequence[SamplingState]  # logits (B, V) float32, not modified
    ) -> tuple[list[int], list[Logprobs | None] | None]:
        """One token per row, appended to its state; the rows' logprobs (None when no row asks)."""
        transformed = [i for i, s in enumerate(states) if not s.plain_greedy]
        if not transformed:
            tokens = logits.argmax(dim=-1)  # (B,)
        else:
            tokens = torch.empty(len(states), dtype=torch.long, device=logits.device)
            plain = [i for i, s in enumerate(states) if s.plain_greedy]
            if plain:
                tokens[plain] = logits[plain].argmax(dim=-1)
            tokens[transformed] = self._transformed(logits[transformed], [states[i] for i in transformed])
        logprobs = self._logprobs(logits, states, tokens)
        token_list = tokens.tolist()
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
            xs = x[sampled]
            _, threshold, _ = self._scale_and_keep(xs, [states[i] for i in sampled])
            x[sampled] = xs.masked_fill(xs < threshold.unsqueeze(1), -math.inf)
        return x

    # ---- the transforms ------------------------------------------------------------------
    def _transformed(self, x: torch.Tensor, states: list[SamplingState]) -> torch.Tensor:
        """Tokens of rows that need a transform or a draw; x (P, V) is this call's copy."""
        self._mask_and_bias(x, states)
        self._penalize(x, states)
        tokens = torch.empty(len(states), dtype=torch.long, device=x.device)
        greedy = [i for i, s in enumerate(states) if s.params.greedy]
        if greedy:
            tokens[greedy] = x[greedy].argmax(dim=-1)
        if len(greedy) < len(states):
            sampled = [i for i, s in enumerate(states) if not s.params.greedy]
            xs = x if len(sampled) == len(states) else x[sampled]
            tokens[sampled] = self._draw(xs, [states[i] for i in sampled])
        return tokens

    def _flat(self, rows: list[int], ids: list[np.ndarray], width: int) -> torch.Tensor:
        """Flat indices into a (P, width) tensor of each row's ids."""
        lengths = [len(a) for a in ids]
        flat = np.repeat(np.asarray(rows, dtype=np.int64) * width, lengths) + np.concatenate(ids)
        return torch.from_numpy(flat).to(self.device)

    def _mask_and_bias(self, x: torch.Tensor, states: list[SamplingState]) -> None:
        vocab = x.shape[1]
        allowed = [i for i, s in enumerate(states) if s.allowed is not None]
        if allowed:
            sub = x[allowed]  # (A, V)
            keep = self._flat(list(range(len(allowed))), [states[i].allowed for i in allowed], vocab)
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
    def _draw(self, x: torch.Tensor, states: list[SamplingState]) -> torch.Tensor:
        """Sampled rows' tokens; x (S, V) is this call's copy (divided in place)."""
        probs, threshold, candidates = self._scale_and_keep(x, states)
        tokens = torch.empty(len(states), dtype=torch.long, device=x.device)
        seeded = [i for i, s in enumerate(states) if s.params.seed is not None]
        if seeded:
            tokens[seeded] = self._race(x[seeded], threshold[seeded], [states[i] for i in seeded])
        done = set(seeded)
        for c in candidates:
            pick = [j for j, row in enumerate(c.rows.tolist()) if row not in done]
            if pick:
                rows = c.rows[pick]
                picked = self._invert(c.weights[pick].double())  # (n,)
                tokens[rows] = c.ids[pick].gather(1, picked.unsqueeze(1)).squeeze(1)
                done.update(rows.tolist())
        rest = [i for i in range(len(states)) if i not in done]
        if rest:
            p = probs[rest].double()
            cut = threshold[rest]
            if bool((cut > -math.inf).any()):
                p.masked_fill_(x[rest] < cut.unsqueeze(1), 0.0)
            tokens[rest] = self._invert(p)
        return tokens

    def _scale_and_keep(self, x: torch.Tensor, states: list[SamplingState]):
        """Divide x (S, V) by the temperature in place; (probabilities (S, V), each row's threshold,
        the candidate sets)."""
        temperature = torch.tensor([s.params.temperature for s in states], device=x.device)
        x.div_(temperature.unsqueeze(1))
        probs = x.softmax(dim=-1)  # (S, V)
        return probs, *self._kept(x, probs, states)

    def _kept(self, x: torch.Tensor, probs: torch.Tensor, states: list[SamplingState]):
        """Each row's threshold (S,) (-inf: keeps every token) and the candidate sets that hold
        the rows' kept sets. Rows are resolved at the smallest candidate size that holds their
        kept set: the top 64, then the top 1,024, then the sorted row."""
        vocab = x.shape[1]
        threshold = torch.full((len(states),), -math.inf, device=x.device)
        todo = [i for i, s in enumerate(states) if 0 < s.params.top_k < vocab or s.params.top_p < 1 or s.params.min_p]
        if not todo:
            return threshold, []
        top_k = max((states[i].params.top_k for i in todo if states[i].params.top_k < vocab), default=0)
        sizes = sorted({max(c, top_k) for c in _CANDIDATES if max(c, top_k) < vocab}) + [vocab]
        found: list[_Candidates] = []
        for size in sizes:
            if not todo:
                break
            rows = torch.tensor(todo, device=x.device)
            params = [states[i].params for i in todo]
            if size < vocab:
                values, ids = x[rows].topk(size, dim=-1)  # (n, C), sorted
            else:
                values, ids = x[rows].sort(dim=-1, descending=True)
            k = torch.tensor([p.top_k if p.top_k < vocab else 0 for p in params], device=x.device)
            min_p = torch.tensor([p.min_p for p in params], device=x.device)
            top_p = torch.tensor([p.top_p for p in params], device=x.device)
            # min-p and top-k: a floor on the logit (ties at the floor are kept, as transformers does)
            floor = torch.where(k > 0, values.gather(1, (k - 1).clamp(min=0).unsqueeze(1)).squeeze(1), -math.inf)
            floor = torch.maximum(floor, values[:, 0] + min_p.log())  # log(0) = -inf: no floor
            inside = values >= floor.unsqueeze(1)  # (n, C)
            weights = probs[rows.unsqueeze(1), ids] * inside  # (n, C)
            # closed: every token at or above the floor is a candidate
            closed = ~inside[:, -1] | (k == size) if size < vocab else torch.ones_like(inside[:, -1])
            has_p = top_p < 1
            # top-p renormalises over the floor's set: the candidates' mass where they hold it,
            # 1 where there is no floor, else a sum over the row
            mass = torch.where(closed, weights.sum(dim=-1), 1.0)
            wide = (~closed & has_p & (floor > -math.inf)).nonzero().squeeze(1)
            if len(wide):
                r = rows[wide]
                mass[wide] = (probs[r] * (x[r] >= floor[wide].unsqueeze(1))).sum(dim=-1)
            q = weights / mass.unsqueeze(1)
            cum = q.cumsum(dim=-1)
            # top-p: keep the smallest prefix reaching top_p (drop a token once the mass before it does)
            keep = inside & (~has_p.unsqueeze(1) | (cum - q < top_p.unsqueeze(1)))
            held = closed | (has_p & (cum[:, -1] >= top_p))  # the kept set lies within the candidates
            last = keep.sum(dim=-1).clamp(min=1) - 1
            threshold[rows] = torch.where(has_p, values.gather(1, last.unsqueeze(1)).squeeze(1), floor)
            resolved = held | ~has_p  # without top-p the floor is the threshold, whatever its set's size
            done = held.nonzero().squeeze(1)
            if size < vocab and len(done):
                found.append(_Candidates(rows[done], ids[done], weights[done] * keep[done]))
            todo = [i for i, ok in zip(todo, resolved.tolist()) if not ok]
        return threshold, found

    def _invert(self, weights: torch.Tensor) -> torch.Tensor:
        """One index per row of (n, C) float64 weights, drawn in proportion to them."""
        cum = weights.cumsum(dim=-1)  # (n, C)
        total = cum[:, -1:]
        u = torch.rand(total.shape, dtype=torch.float64, device=weights.device, generator=self._generator)
        u = torch.minimum(u * total, torch.nextafter(total, torch.zeros_like(total)))  # below the total: a kept index
        return torch.searchsorted(cum, u, right=True).squeeze(1).clamp(max=weights.shape[1] - 1)

    def _race(self, x: torch.Tensor, threshold: torch.Tensor, states: list[SamplingState]) -> torch.Tensor:
        """Seeded rows: argmax of p / Exp(1) noise, the noise from (seed, output index)."""
        probs = x.masked_fill(x < threshold.unsqueeze(1), -math.inf).softmax(dim=-1)  # (n, V)
        noise = torch.empty_like(probs)
        for row, s in enumerate(states):
            self._seeded.manual_seed((s.params.seed * _MIX + s.num_output_tokens) % (1 << 63))
            noise[row].exponential_(generator=self._seeded)
        return (probs / noise).argmax(dim=-1)

    # ---- logprobs --------------------------------------------------------------------------
    @staticmethod
    def _logprobs(logits: torch.Tensor, states: Sequence[SamplingState], tokens: torch.Tensor):
        rows = [i for i, s in enumerate(states) if s.params.logprobs is not None]
        if not rows:
            return None
        lp = logits[rows].log_softmax(dim=-1)  # (L, V), of the raw rows
        chosen = lp.gather(1, tokens[rows].unsqueeze(1)).squeeze(1).tolist()
        n = max(states[i].params.logprobs for i in rows)
        top = lp.topk(n, dim=-1) if n else None
        top_ids = top.indices.tolist() if top is not None else [[]] * len(rows)
        top_lps = top.values.tolist() if top is not None else [[]] * len(rows)
        out: list[Logprobs | None] = [None] * len(states)
        for j, i in enumerate(rows):
            k = states[i].params.logprobs
            out[i] = Logprobs(logprob=chosen[j], top_ids=top_ids[j][:k], top_logprobs=top_lps[j][:k])
        return out
