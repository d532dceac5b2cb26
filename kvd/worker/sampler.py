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
4. Greedy rows among them take the argmax. A sampled row becomes u = exp((x - max) / T)
   and keeps the tokens at or above one threshold on u: min-p (u >= min_p, i.e. p >=
   min_p * p_max) and top-k make a floor, then top-p keeps the largest tokens above it
   while the mass before them is below top_p of the floor's (vLLM's order; transformers
   applies min-p last). On the CPU the native op `kvd.ops.sample_rows` finds it without a
   sort (a histogram of u, then a sort of one bucket); elsewhere torch finds it among each
   row's top candidates (kvd/worker/kept_set.py, which is also the op's reference).
5. The draw. A seeded row draws as kvd always has: the exponential race (argmax of
   p / Exp(1) noise over the vocabulary) with noise from a generator seeded by (seed,
   output index), so a seed gives the same tokens whatever the batch, across preemption
   and across this batching; that noise is drawn per seeded row (~0.8 ms a row on a CPU
   core). Unseeded rows take one uniform each from the sampler's generator and invert the
   running sum of u over their kept set.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import numpy as np
import torch

from kvd import ops
from kvd.sampling import SamplingParams
from kvd.scheduler.output import Logprobs
from kvd.worker.kept_set import KeptSet, exponentiate, scale, select

_MIX = 0x9E3779B97F4A7C15  # golden-ratio constant: spreads (seed, index) over the seed space


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
            ends = [t for prefix, t in self.banned_after if output[-len(prefix) :] == prefix]  # (never a shorter output)
            out.append(np.asarray(ends, dtype=np.int64))
        if self.num_output_tokens < self.params.min_tokens:
            out.append(self.stops)
        return np.concatenate(out)

    def append(self, token: int) -> None:
        self.token_ids.append(token)
        if self.counts is not None:
            self.counts.add(token)


class Sampler:
    """Draws each step's tokens; holds the random generators (seeded ones per request and index)."""

    def __init__(self, device: torch.device, vocab_size: int, eos_token_ids: Iterable[int] = (), seed: int = 0,
                 native: bool = True) -> None:  # fmt: skip
        """native: sampled rows' kept set and draw by the native op where it applies (CPU,
        extension built); False takes the torch path everywhere (its reference, CUDA's way)."""
        self.device = device
        self.native = native
        self.vocab_size = vocab_size
        self.eos_token_ids = sorted(eos_token_ids)
        self._generator = torch.Generator(device=device)
        self._generator.manual_seed(seed)
        self._seeded = torch.Generator(device=device)
        self._kept = KeptSet(self._generator)

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
                tokens[plain] = select(logits, plain).argmax(dim=-1)
            tokens[transformed] = self._transformed(select(logits, transformed), [states[i] for i in transformed])
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
            u = x[sampled]
            cut = self._native(u, rows, torch.full((len(rows),), -1.0, dtype=torch.float64))
            params = [r.params for r in rows]
            if cut is None:
                threshold = self._kept.thresholds(u, exponentiate(scale(u, params)), params)[0]
            else:
                threshold = cut[1]
            x[sampled] = scale(x[sampled], params).masked_fill(u < threshold.unsqueeze(1), -math.inf)
        return x

    # ---- the transforms ------------------------------------------------------------------
    def _transformed(self, x: torch.Tensor, states: list[SamplingState]) -> torch.Tensor:
        """Tokens of rows that need a transform or a draw; x (P, V) is written into."""
        self._mask_and_bias(x, states)
        self._penalize(x, states)
        tokens = torch.empty(len(states), dtype=torch.long, device=x.device)
        greedy = [i for i, s in enumerate(states) if s.params.greedy]
        if greedy:
            tokens[greedy] = select(x, greedy).argmax(dim=-1)
        if len(greedy) < len(states):
            sampled = [i for i, s in enumerate(states) if not s.params.greedy]
            tokens[sampled] = self._draw(select(x, sampled), [states[i] for i in sampled])
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

    # ---- the kept set and the draw --------------------------------------------------------
    def _draw(self, x: torch.Tensor, states: list[SamplingState]) -> torch.Tensor:
        """Sampled rows' tokens; x (S, V) is written into (it ends as u = exp((x - max) / T))."""
        seeded = [i for i, s in enumerate(states) if s.params.seed is not None]
        if seeded:  # the race's logits
            race = scale(x.index_select(0, torch.tensor(seeded, device=x.device)), [states[i].params for i in seeded])
        uniform = torch.rand(len(states), dtype=torch.float64, device=x.device, generator=self._generator)
        uniform[seeded] = -1.0  # seeded rows race instead (below)
        cut = self._native(x, states, uniform)
        if cut is not None:
            tokens, threshold = cut
        else:
            params = [s.params for s in states]
            threshold, candidates = self._kept.thresholds(x, exponentiate(scale(x, params)), params)
            tokens = self._kept.draw(x, threshold, candidates, skip=set(seeded))
        if seeded:
            out = select(x, seeded) < threshold[seeded].unsqueeze(1)
            tokens[seeded] = self._race(race.masked_fill_(out, -math.inf), [states[i] for i in seeded])
        return tokens

    def _native(self, x: torch.Tensor, states: list[SamplingState], uniform: torch.Tensor):
        """(tokens, thresholds) from the native op, x turned into u (top-k's k-th largest logit
        found here, one top-k over the rows that have one), or None where it does not apply."""
        if not self.native or x.device.type != "cpu" or ops.native() is None:
            return None
        vocab = x.shape[1]
        kth = torch.full((len(states),), -1, dtype=torch.long)
        with_k = [i for i, s in enumerate(states) if 0 < s.params.top_k < vocab]
        if with_k:
            k = torch.tensor([states[i].params.top_k for i in with_k])
            ids = select(x, with_k).topk(int(k.max()), dim=-1).indices  # (n, max k)
            kth[with_k] = ids.gather(1, (k - 1).unsqueeze(1)).squeeze(1)
        temperature = torch.tensor([s.params.temperature for s in states], dtype=torch.float32)
        min_p = torch.tensor([s.params.min_p for s in states], dtype=torch.float32)
        top_p = torch.tensor([s.params.top_p for s in states], dtype=torch.float64)
        return ops.sample_rows(x, temperature, kth, min_p, top_p, uniform)

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
        return select(logits, rows).log_softmax(dim=-1) if rows else None  # (L, V)

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
