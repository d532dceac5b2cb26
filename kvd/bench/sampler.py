"""The sampler, alone and inside a decode step: `python -m kvd.bench.sampler [--quick] [--dtypes float32]`.

Sampler alone (median ms of one call over 32 rows of real logits, vocabulary 49,152,
float32: the embedded SmolLM2's next-token logits along a passage of English, each
call on fresh per-request states with a 200-token prompt and 100 output tokens):
- greedy: 32 plain greedy rows (the argmax);
- options: 32 rows each with presence 0.5, frequency 0.5 and repetition 1.2 penalties,
  a logit bias on 10 tokens, temperature 0.8 and top_p 0.95 (issue 27's target row);
- top-p: 32 rows of temperature 0.8, top_p 0.95, then the same through the per-row
  sampler kvd had before (`PerRowSampler`), then seeded (per-row noise, as before);
- whole row: 32 rows of temperature 1.0 and nothing else (the draw over every token);
- options, flat rows: the options row on N(0, 2^2) logits, where top-p keeps thousands of
  tokens (the kind of row a penalised generation of the small model drifts into).
Each case runs on the native op where it is built, and on the torch path (`--torch`).
Inside a step: the median ms of `Engine.step()` with 32 requests in decode (128-token
prompts), greedy against the options above, per dtype, and of the step's sampler call
(the options' text drifts into flatter distributions than the passage's: the in-step
figure is the one to trust; whole steps drift by several percent on a shared machine).
The target (issue 27): a step of 32 rows with penalties, bias and top-p within 10% of a
step of 32 greedy rows.
Nothing is recorded; docs/benchmarks.md quotes a run.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from kvd.sampling import SamplingParams
from kvd.scheduler.output import Logprobs
from kvd.worker.sampler import Sampler

_MIX = 0x9E3779B97F4A7C15  # kvd.worker.sampler's
ROWS = 32
OPTIONS = dict(temperature=0.8, top_p=0.95, presence_penalty=0.5, frequency_penalty=0.5, repetition_penalty=1.2)
TOP_P = dict(temperature=0.8, top_p=0.95)


class PerRowSampler:
    """kvd's sampler before batching (a Python loop over sampled rows, a sort per top-p row):
    the benchmark's baseline, and the reference the tests hold seeded draws to."""

    def __init__(self, device: torch.device, seed: int = 0) -> None:
        self._generator = torch.Generator(device=device)
        self._generator.manual_seed(seed)
        self._seeded = torch.Generator(device=device)

    def __call__(
        self, logits: torch.Tensor, params: list[SamplingParams], output_index: list[int]
    ) -> tuple[list[int], list[Logprobs | None] | None]:
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


def timed(fn: Callable[..., object], repeats: int, setup: Callable[[], tuple] = tuple) -> float:
    """Median ms of one call `fn(*setup())` (setup not timed), after a warm-up."""
    fn(*setup())
    times = []
    for _ in range(repeats):
        args = setup()
        start = time.perf_counter()
        fn(*args)
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def passage_tokens(tokenizer, n: int, offset: int = 5000) -> list[int]:
    """n tokens of English: the Python language reference that CPython ships."""
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[k] for k in sorted(topics))
    return tokenizer.encode(text, add_special_tokens=False)[offset : offset + n]


@torch.inference_mode()
def real_logits(model, tokens: list[int], rows: int) -> torch.Tensor:
    """The model's next-token logits at `rows` positions spread along the passage, (rows, V) float32."""
    logits = model(torch.tensor([tokens])).logits[0].float()  # (T, V)
    return logits[torch.linspace(16, len(tokens) - 1, rows).long()].contiguous()


def option_params(rng: torch.Generator, vocab: int, **extra) -> SamplingParams:
    ids, values = torch.randint(0, vocab, (10,), generator=rng), torch.randn(10, generator=rng)
    bias = {int(t): float(b) for t, b in zip(ids, values)}
    return SamplingParams(**OPTIONS, logit_bias=bias, max_tokens=4096, **extra)


def bench_sampler(logits: torch.Tensor, history: list[int], repeats: int, native: bool) -> dict[str, float]:
    """Median ms of one call per case (fresh states each call: prompt + output of `history`)."""
    vocab = logits.shape[1]
    sampler = Sampler(torch.device("cpu"), vocab, eos_token_ids=[2], native=native)
    flat = torch.randn(logits.shape, generator=torch.Generator().manual_seed(1)) * 2
    rng = torch.Generator().manual_seed(0)
    prompt = 200

    def states(params: list[SamplingParams]) -> list:
        return [sampler.state(p, list(history), prompt) for p in params]

    def call(params: list[SamplingParams], rows: torch.Tensor = logits) -> float:  # fresh logits, as each step's
        return timed(sampler, repeats, lambda: (rows.clone(), states(params)))

    greedy = [SamplingParams(temperature=0.0)] * ROWS
    options = [option_params(rng, vocab) for _ in range(ROWS)]
    top_p = [SamplingParams(**TOP_P)] * ROWS
    seeded = [SamplingParams(**TOP_P, seed=i) for i in range(ROWS)]
    whole = [SamplingParams(temperature=1.0)] * ROWS
    old = PerRowSampler(torch.device("cpu"))
    index = [len(history) - prompt] * ROWS
    return {
        "greedy": call(greedy),
        "options": call(options),
        "top-p": call(top_p),
        "top-p, per-row sampler": timed(lambda: old(logits, top_p, index), max(3, repeats // 5)),
        "top-p, seeded": call(seeded),
        "top-p, seeded, per-row sampler": timed(lambda: old(logits, seeded, index), max(3, repeats // 5)),
        "whole row": call(whole),
        "options, flat rows": call(options, flat),
        "32 new states (options; once per request, not per step)": timed(lambda: states(options), repeats),
    }


class TimedSampler:
    """The runner's sampler, timed: the seconds of each call go to `times`."""

    def __init__(self, sampler: Sampler) -> None:
        self.sampler, self.times = sampler, []

    def __getattr__(self, name: str):
        return getattr(self.sampler, name)

    def __call__(self, *args):
        start = time.perf_counter()
        out = self.sampler(*args)
        self.times.append(time.perf_counter() - start)
        return out


def step_ms(llm, params: list[SamplingParams], steps: int, tokens: list[int]) -> tuple[float, float]:
    """Median ms of `Engine.step()` with 32 requests in decode, and of its sampler call."""
    engine = llm.engine
    sampler = engine.runner.sampler  # a TimedSampler
    prompts = [tokens[i * 128 : (i + 1) * 128] for i in range(ROWS)]
    ids = [rid for p, sp in zip(prompts, params) for rid in engine.add(p, sp)]
    running = engine.scheduler.running
    while engine.scheduler.waiting or any(r.num_output_tokens == 0 for r in running):
        engine.step()
    for _ in range(3):
        engine.step()
    times, sampler.times = [], []
    for _ in range(steps):
        start = time.perf_counter()
        engine.step()
        times.append(time.perf_counter() - start)
    if len(running) != ROWS:
        raise RuntimeError(f"step: {ROWS - len(running)} requests left decode during the timed steps")
    engine.abort(ids)
    return statistics.median(times) * 1e3, statistics.median(sampler.times) * 1e3


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="fewer repeats and steps")
    p.add_argument("--dtypes", default="float32", help="model dtypes of the step comparison ('' for none)")
    p.add_argument("--rounds", type=int, default=3, help="alternating greedy/options step runs per dtype")
    p.add_argument("--torch", action="store_true", help="the sampler's torch path, not the native op")
    args = p.parse_args(argv)
    from transformers.utils import logging as hf_logging

    from kvd import LLM
    from kvd.worker.models import load_model, load_tokenizer, resolve_model

    hf_logging.set_verbosity_error()
    path = resolve_model(None)
    tokens = passage_tokens(load_tokenizer(path), 4096 + 512)
    logits = real_logits(load_model(path, torch.float32, "cpu"), tokens[:512], ROWS)
    repeats, steps = (10, 8) if args.quick else (50, 20)
    path = "torch path" if args.torch else "native op"
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {ROWS} rows x {logits.shape[1]} "
          f"float32; {path}")  # fmt: skip
    times = bench_sampler(logits, tokens[:300], repeats, native=not args.torch)
    for name, ms in times.items():
        print(f"  sampler, {name:48s} {ms:8.3f} ms")
    g = times["greedy"]
    print(f"  options / greedy {times['options'] / g:.2f}x (+{times['options'] - g:.3f} ms); top-p: per-row sampler "
          f"/ batched {times['top-p, per-row sampler'] / times['top-p']:.1f}x, seeded "
          f"{times['top-p, seeded, per-row sampler'] / times['top-p, seeded']:.1f}x")  # fmt: skip
    rng = torch.Generator().manual_seed(0)
    greedy = [SamplingParams(temperature=0.0, max_tokens=4096, ignore_eos=True)] * ROWS
    options = [option_params(rng, 49152, ignore_eos=True) for _ in range(ROWS)]
    prompts = tokens[512:]
    for dtype in filter(None, args.dtypes.split(",")):
        llm = LLM(dtype=dtype)
        llm.engine.runner.sampler.native = not args.torch
        llm.engine.runner.sampler = TimedSampler(llm.engine.runner.sampler)
        step = {"greedy": float("inf"), "options": float("inf")}
        inside = {"greedy": float("inf"), "options": float("inf")}
        for _ in range(args.rounds):  # alternate: drift on a shared machine hits both sides alike
            for name, params in (("greedy", greedy), ("options", options)):
                s, t = step_ms(llm, params, steps, prompts)
                step[name], inside[name] = min(step[name], s), min(inside[name], t)
        extra = inside["options"] - inside["greedy"]
        print(f"  step, {dtype}: greedy {step['greedy']:.1f} ms, options {step['options']:.1f} ms "
              f"({step['options'] / step['greedy']:.3f}x); its sampler call: greedy {inside['greedy']:.2f} ms, "
              f"options {inside['options']:.2f} ms, +{extra:.2f} ms = {extra / step['greedy']:.1%} of the greedy step; "
              f"alone: +{times['options'] - g:.2f} ms = {(times['options'] - g) / step['greedy']:.1%}")  # fmt: skip


if __name__ == "__main__":
    main()
