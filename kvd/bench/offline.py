"""Offline benchmark: kvd against HF transformers on the same requests, in one run (`make bench`).

    python -m kvd.bench.offline [--quick] [--no-record] [--sections mixed,single,prefill,step]

Both sides run the embedded SmolLM2-135M-Instruct in float32 on the CPU, greedy, with
EOS ignored so that every request yields exactly the tokens it asked for. The peer is a
plain transformers copy of the same checkpoint (default SDPA attention). Prompts are
slices of real English, the Python language reference that CPython ships
(`pydoc_data.topics`), tokenized once; every timed run gets prompts drawn at fresh
offsets, so kvd's prefix cache has nothing to reuse from a warm-up.

Sections (each side gets an untimed warm-up run before it is timed; `time.perf_counter`):
- mixed: N requests, prompt lengths uniform in a range, max_tokens uniform in a range.
  kvd: one `LLM.generate` over all of them. HF padded: `model.generate` in batches
  (left padding + attention mask, max_new_tokens = min_new_tokens = the batch's largest
  max_tokens), of which only the requested tokens count. HF continuous batching: the
  manager that `generate_batch` wraps, fed with `add_request(max_new_tokens=...)` per
  request (`generate_batch` itself takes one max_new_tokens for all), timed from the
  first request in to the last result out (cache set-up excluded, as kvd's is).
  Figure: requested tokens / wall seconds, one timed run per side.
- single: one ~32-token prompt, 128 new tokens, batch 1; generated tok/s, best of 2.
- prefill: a 512-token prompt, one new token; prompt tok/s, best of 3.
- step: kvd's decode step (`Engine.step()`, all requests in decode, median of N steps)
  against a bound: every nn.Linear of the model (lm_head once) applied in sequence to a
  random (B, in_features) input, median of repeats — the step's matmul time alone.

Ratios are kvd / peer for throughput (above 1: kvd is faster) and step / bound for the
step (1.0 would mean nothing but the linear layers). The table goes to stdout; unless
--no-record or --quick it is appended to docs/benchmarks.md (run from the repository
root, as `make bench` does).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import random
import statistics
import sys
from collections.abc import Callable
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, replace
from pathlib import Path
from time import perf_counter
from typing import Any

import structlog
import torch

from kvd import LLM, SamplingParams
from kvd.worker.models import load_model, resolve_model

log = structlog.get_logger(__name__)

SECTIONS = ("mixed", "single", "prefill", "step")
RECORD_PATH = Path("docs/benchmarks.md")
RECORD_HEADER = "# kvd benchmarks\n\nFigures recorded by `make bench` (`python -m kvd.bench.offline`).\n"
CB_PAGE_SIZE = 16  # tokens per page of transformers' paged cache: kvd's block size (16 to 256 timed the same)


@dataclass(frozen=True)
class BenchConfig:
    """Sizes of every section; FULL is `make bench`, QUICK a smoke run for development."""

    mixed_requests: int = 64
    mixed_prompt: tuple[int, int] = (30, 300)
    mixed_max_tokens: tuple[int, int] = (16, 256)
    padded_batch: int = 32
    max_batch_tokens: int = 1024  # per-step token budget: kvd's scheduler default, given to HF's CB too
    single_prompt: int = 32
    single_new: int = 128
    single_runs: int = 2
    prefill_len: int = 512
    prefill_runs: int = 3
    step_batches: tuple[int, ...] = (32, 1)
    step_prompt: int = 128
    step_steps: int = 20
    bound_repeats: int = 20


FULL = BenchConfig()
QUICK = replace(
    FULL, mixed_requests=8, mixed_prompt=(30, 100), mixed_max_tokens=(8, 32), padded_batch=4, single_new=16,
    prefill_len=128, prefill_runs=2, step_batches=(8, 1), step_prompt=64, step_steps=5, bound_repeats=5,
)  # fmt: skip


@dataclass
class Row:
    """One line of the table: a kvd figure beside a peer's and their ratio."""

    section: str
    measure: str
    kvd: float
    peer: str
    peer_value: float
    ratio_name: str = "kvd/peer"
    digits: int = 1

    @property
    def ratio(self) -> float:
        return self.kvd / self.peer_value


@dataclass
class Results:
    rows: list[Row]
    notes: list[str]


# ---- prompts ---------------------------------------------------------------------------
def english_text() -> str:
    """The Python language reference that CPython ships (`pydoc_data.topics`), ~113k tokens."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


class PromptSource:
    """Slices of one long English token stream, each starting at an offset not used before."""

    def __init__(self, tokenizer, seed: int = 0) -> None:
        self.tokens: list[int] = tokenizer.encode(english_text(), add_special_tokens=False)
        self.rng = random.Random(seed)
        self._used: set[int] = set()

    def prompt(self, length: int) -> list[int]:
        start = self.rng.randrange(len(self.tokens) - length)
        while start in self._used:
            start = self.rng.randrange(len(self.tokens) - length)
        self._used.add(start)
        return self.tokens[start : start + length]

    def workload(self, n: int, prompt: tuple[int, int], max_tokens: tuple[int, int]) -> tuple[list, list[int]]:
        """n prompts and their max_tokens, both uniform in the given inclusive ranges."""
        prompts = [self.prompt(self.rng.randint(*prompt)) for _ in range(n)]
        return prompts, [self.rng.randint(*max_tokens) for _ in range(n)]


# ---- the two sides -----------------------------------------------------------------------
def measure(fn: Callable, *args) -> tuple[float, Any]:
    """(wall seconds, result) of one call."""
    start = perf_counter()
    out = fn(*args)
    return perf_counter() - start, out


def best_time(run: Callable[[list[int]], object], prompts: list[list[int]]) -> float:
    """Seconds of the fastest run, one prompt per run; the first prompt is an untimed warm-up."""
    run(prompts[0])
    return min(measure(run, p)[0] for p in prompts[1:])


def kvd_generate(llm: LLM, prompts: list[list[int]], max_tokens: list[int]) -> list[list[int]]:
    params = [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True) for n in max_tokens]
    return [out.token_ids for out in llm.generate(prompts, params, use_tqdm=False)]


@torch.inference_mode()
def hf_generate(model, prompts: list[list[int]], max_tokens: list[int]) -> list[list[int]]:
    """One padded `model.generate` call; each prompt's first max_tokens new tokens."""
    pad = model.config.pad_token_id
    width, new = max(map(len, prompts)), max(max_tokens)
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])  # (B, width), left-padded
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])  # (B, width)
    # min_new_tokens masks EOS, so every row runs to `new` like kvd's ignore_eos
    seqs = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new,
                          do_sample=False, pad_token_id=pad)  # fmt: skip
    if seqs.shape[1] != width + new:
        raise RuntimeError(f"transformers generated {seqs.shape[1] - width} tokens, expected {new}")
    return [seqs[i, width : width + n].tolist() for i, n in enumerate(max_tokens)]


def hf_generate_padded(model, prompts: list[list[int]], max_tokens: list[int], batch: int) -> list[list[int]]:
    out: list[list[int]] = []
    for i in range(0, len(prompts), batch):
        out += hf_generate(model, prompts[i : i + batch], max_tokens[i : i + batch])
    return out


def hf_continuous(model, prompts: list[list[int]], max_tokens: list[int], batch_tokens: int):
    """transformers' continuous batching: (seconds from the first request in to the last result out, tokens).

    This is the manager `generate_batch` wraps, used directly because `generate_batch`
    takes one max_new_tokens for all requests while `add_request` takes one per request.
    Its paged cache is sized to hold every request at once (no eviction). Not under
    inference_mode: the manager's thread updates in place tensors made on entry."""
    from transformers import GenerationConfig
    from transformers.generation.configuration_utils import ContinuousBatchingConfig

    gen = GenerationConfig(do_sample=False, eos_token_id=-1, max_new_tokens=max(max_tokens),
                           pad_token_id=model.config.pad_token_id)  # fmt: skip
    pages = sum(-(-(len(p) + n) // CB_PAGE_SIZE) for p, n in zip(prompts, max_tokens))
    cb = ContinuousBatchingConfig(page_size=CB_PAGE_SIZE, num_blocks=pages + 1, max_batch_tokens=batch_tokens,
                                  max_requests_per_batch=len(prompts))  # fmt: skip
    with model.continuous_batching_context_manager(generation_config=gen, continuous_batching_config=cb) as manager:
        start = perf_counter()
        ids = [manager.add_request(p, max_new_tokens=n, eos_token_id=-1) for p, n in zip(prompts, max_tokens)]
        results = {}
        while len(results) < len(ids):
            result = manager.get_result(timeout=1)
            if result is None and not manager.is_running():
                raise RuntimeError("transformers' continuous batching thread stopped before finishing")
            if result is not None and result.error is not None:
                raise RuntimeError(f"transformers' continuous batching failed a request: {result.error}")
            if result is not None and result.is_finished():
                results[result.request_id] = result
        seconds = perf_counter() - start
    return seconds, [list(results[i].generated_tokens) for i in ids]


def kvd_step_ms(llm: LLM, prompts: list[list[int]], steps: int) -> float:
    """Median ms of `Engine.step()` while every request is in decode."""
    engine = llm.engine
    params = SamplingParams(max_tokens=steps + 16, temperature=0.0, ignore_eos=True)
    request_ids = [rid for p in prompts for rid in engine.add(p, params)]
    running = engine.scheduler.running
    while engine.scheduler.waiting or any(r.num_output_tokens == 0 for r in running):
        engine.step()
    for _ in range(3):  # warm-up in decode
        engine.step()
    times = [measure(engine.step)[0] for _ in range(steps)]
    if len(running) != len(prompts):
        raise RuntimeError(f"step: {len(prompts) - len(running)} requests left decode during the timed steps")
    engine.abort(request_ids)
    return statistics.median(times) * 1e3


@torch.inference_mode()
def linear_bound_ms(model: torch.nn.Module, batch: int, repeats: int) -> float:
    """Median ms of every nn.Linear of the decoder, then lm_head, on random (batch, in_features) inputs."""
    decoder = model.get_decoder()
    linears = [m for m in decoder.modules() if isinstance(m, torch.nn.Linear)] + [model.lm_head]
    inputs = {f: torch.randn(batch, f) for f in {m.in_features for m in linears}}

    def run() -> None:
        for m in linears:
            m(inputs[m.in_features])

    run()
    return statistics.median(measure(run)[0] for _ in range(repeats)) * 1e3


# ---- sections --------------------------------------------------------------------------
def bench_mixed(llm: LLM, model, src: PromptSource, cfg: BenchConfig) -> Results:
    """Throughput of a mixed workload: kvd vs padded generate vs continuous batching."""
    warm = src.workload(4, cfg.mixed_prompt, (8, 16))
    prompts, max_tokens = src.workload(cfg.mixed_requests, cfg.mixed_prompt, cfg.mixed_max_tokens)
    n, tokens = len(prompts), sum(max_tokens)
    kvd_generate(llm, *warm)
    before = llm.engine.stats()
    t_kvd, out_kvd = measure(kvd_generate, llm, prompts, max_tokens)
    after = llm.engine.stats()
    hf_generate_padded(model, *warm, cfg.padded_batch)
    t_pad, out_pad = measure(hf_generate_padded, model, prompts, max_tokens, cfg.padded_batch)
    hf_continuous(model, *warm, cfg.max_batch_tokens)
    t_cb, out_cb = hf_continuous(model, prompts, max_tokens, cfg.max_batch_tokens)
    for side, outs in (("kvd", out_kvd), ("padded", out_pad), ("continuous batching", out_cb)):
        _check_lengths(side, outs, max_tokens)
    best_name, t_best = min([("padded", t_pad), ("continuous batching", t_cb)], key=lambda x: x[1])
    slots = sum(len(max_tokens[i : i + cfg.padded_batch]) * max(max_tokens[i : i + cfg.padded_batch])
                for i in range(0, n, cfg.padded_batch))  # fmt: skip
    rows = [
        Row("mixed", "generated tok/s", tokens / t_kvd, f"HF generate, padded batches of {cfg.padded_batch}",
            tokens / t_pad),
        Row("mixed", "generated tok/s", tokens / t_kvd, "HF continuous batching", tokens / t_cb),
        Row("mixed", "generated tok/s", tokens / t_kvd, f"HF better of the two ({best_name})", tokens / t_best),
    ]  # fmt: skip
    notes = [
        f"mixed: {n} requests, prompts {cfg.mixed_prompt[0]}-{cfg.mixed_prompt[1]} tokens"
        f" ({sum(map(len, prompts))} in all), max_tokens {cfg.mixed_max_tokens[0]}-{cfg.mixed_max_tokens[1]}"
        f" ({tokens} requested tokens, the only ones counted); one timed run per side after a warm-up;"
        f" kvd {t_kvd:.1f} s, padded {t_pad:.1f} s, continuous batching {t_cb:.1f} s",
        f"mixed: padded generate decodes {slots} token slots for the {tokens} requested",
        f"mixed: greedy outputs identical to kvd's: padded {_same(out_kvd, out_pad)}/{n},"
        f" continuous batching {_same(out_kvd, out_cb)}/{n}",
        f"mixed: kvd preemptions {after['preemptions'] - before['preemptions']},"
        f" prefix-cache hit tokens {after['prefix_hit_tokens'] - before['prefix_hit_tokens']}",
        f"mixed: HF continuous batching = the manager `generate_batch` wraps, given each request's max_new_tokens"
        f" (`generate_batch` takes one for all); page size {CB_PAGE_SIZE}, max_batch_tokens {cfg.max_batch_tokens},"
        f" max_requests_per_batch {n}, cache sized for all requests at once; timed from first request in to last"
        f" result out",
    ]
    return Results(rows, notes)


def bench_single(llm: LLM, model, src: PromptSource, cfg: BenchConfig) -> Results:
    """Single-stream decode: one short prompt, batch 1."""
    prompts = [src.prompt(cfg.single_prompt) for _ in range(cfg.single_runs + 1)]
    new = [cfg.single_new]
    t_kvd = best_time(lambda p: kvd_generate(llm, [p], new), prompts)
    t_hf = best_time(lambda p: hf_generate(model, [p], new), prompts)
    row = Row("single", "generated tok/s", new[0] / t_kvd, "HF generate, batch 1", new[0] / t_hf)
    note = f"single: {cfg.single_prompt}-token prompt, {new[0]} new tokens, best of {cfg.single_runs} after a warm-up"
    return Results([row], [note])


def bench_prefill(llm: LLM, model, src: PromptSource, cfg: BenchConfig) -> Results:
    """Prefill: one long prompt, one new token."""
    prompts = [src.prompt(cfg.prefill_len) for _ in range(cfg.prefill_runs + 1)]
    t_kvd = best_time(lambda p: kvd_generate(llm, [p], [1]), prompts)
    t_hf = best_time(lambda p: hf_generate(model, [p], [1]), prompts)
    n = cfg.prefill_len
    row = Row("prefill", "prompt tok/s", n / t_kvd, "HF generate, max_new_tokens=1", n / t_hf)
    note = f"prefill: {n}-token prompt, 1 new token, best of {cfg.prefill_runs} after a warm-up; fresh prompt per run"
    return Results([row], [note])


def bench_step(llm: LLM, model, src: PromptSource, cfg: BenchConfig) -> Results:
    """kvd's decode step against the time of the model's linear layers alone."""
    rows = []
    for batch in cfg.step_batches:
        prompts = [src.prompt(cfg.step_prompt) for _ in range(batch)]
        step = kvd_step_ms(llm, prompts, cfg.step_steps)
        bound = linear_bound_ms(llm.engine.runner.model, batch, cfg.bound_repeats)
        rows.append(Row("step", f"decode step ms, batch {batch}", step, "nn.Linear layers alone", bound,
                        "step/bound", digits=2))  # fmt: skip
    note = (
        f"step: {cfg.step_prompt}-token prompts, median of {cfg.step_steps} `Engine.step()` calls with all requests"
        f" in decode; bound: every nn.Linear (lm_head once), median of {cfg.bound_repeats} repeats"
    )
    return Results(rows, [note])


BENCHES = {"mixed": bench_mixed, "single": bench_single, "prefill": bench_prefill, "step": bench_step}


def _check_lengths(side: str, outs: list[list[int]], max_tokens: list[int]) -> None:
    """Every side must produce exactly the requested tokens, or its rate means nothing."""
    bad = [i for i, (out, n) in enumerate(zip(outs, max_tokens)) if len(out) != n]
    if bad or len(outs) != len(max_tokens):
        raise RuntimeError(f"{side}: requests {bad[:5]} did not produce exactly max_tokens tokens")


def _same(a: list[list[int]], b: list[list[int]]) -> int:
    return sum(x == y for x, y in zip(a, b))


# ---- report ----------------------------------------------------------------------------
def machine_info() -> dict[str, str]:
    import transformers

    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    fields = dict(line.split(":", 1) for line in cpuinfo.splitlines() if ":" in line)
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    flags = set(fields.get("flags", "").split())
    simd = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else "no AVX2"
    return {
        "cpu": fields.get("model name") or platform.processor() or platform.machine(),
        "cores": str(os.cpu_count()),
        "simd": simd,
        "torch": torch.__version__,
        "threads": str(torch.get_num_threads()),
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }


NOTABLE_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "avx_vnni", "amx_bf16", "amx_tile")


def flags_summary(flags: AbstractSet[str]) -> str:
    """The CPU flags among NOTABLE_FLAGS (the kernels' and the dtypes' choices), for a record."""
    return " + ".join(f for f in NOTABLE_FLAGS if f in flags) or "none of " + ", ".join(NOTABLE_FLAGS)


def machine_summary(info: dict[str, str]) -> str:
    return f"{info['cpu']}, {info['cores']} cores, {info['simd']}, torch {info['torch']}, {info['threads']} threads"


def render_table(rows: list[Row]) -> str:
    lines = ["| Section | Measure | kvd | Peer | Peer value | Ratio |", "|---|---|--:|---|--:|--:|"]
    for r in rows:
        lines.append(f"| {r.section} | {r.measure} | {r.kvd:.{r.digits}f} | {r.peer} | {r.peer_value:.{r.digits}f}"
                     f" | {r.ratio:.2f} ({r.ratio_name}) |")  # fmt: skip
    return "\n".join(lines)


def render(info: dict[str, str], results: Results, quick: bool) -> str:
    machine = ", ".join(f"{k} {v}" for k, v in info.items())
    legend = ("Ratios: kvd/peer for throughput (above 1: kvd faster);"
              " step/bound for the decode step (1.0: linear layers only).")
    parts = [f"Configuration: {'quick' if quick else 'full'}; machine: {machine}.", render_table(results.rows), legend]
    parts.append("\n".join(f"- {note}" for note in results.notes))
    return "\n\n".join(parts)


def record(path: Path, title: str, body: str) -> None:
    """Append a section; create the file with its header first if there is none."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with path.open("x") as f:
            f.write(RECORD_HEADER)
    except FileExistsError:
        pass
    with path.open("a") as f:
        f.write(f"\n## {title}\n\n{body}\n")


# ---- entry -------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m kvd.bench.offline", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes for development; never recorded")
    parser.add_argument("--no-record", action="store_true", help=f"do not append to {RECORD_PATH}")
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {SECTIONS}")
    args = parser.parse_args(argv)
    args.sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = [s for s in args.sections if s not in SECTIONS]
    if unknown or not args.sections:
        parser.error(f"--sections: unknown or empty {unknown}; choose from {','.join(SECTIONS)}")
    return args


def main(argv: list[str] | None = None) -> None:
    from transformers.utils import logging as hf_logging

    args = parse_args(argv)
    cfg = QUICK if args.quick else FULL
    hf_logging.set_verbosity_error()  # generate's per-call notices would bury the table
    info = machine_info()
    load_start = os.getloadavg()[0]
    date = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    llm = LLM()
    model = load_model(resolve_model(None), torch.float32, "cpu")
    src = PromptSource(llm.tokenizer)
    results = Results([], [])
    for name in args.sections:
        start = perf_counter()
        section = BENCHES[name](llm, model, src, cfg)
        results.rows += section.rows
        results.notes += section.notes
        log.info("bench_section_done", section=name, seconds=round(perf_counter() - start, 1))
    llm.check_integrity()
    results.notes.append(f"load average (1 min): {load_start:.2f} at the start, {os.getloadavg()[0]:.2f} at the end;"
                         f" other work on the machine skews every figure")  # fmt: skip
    title = f"Offline, {date}, {machine_summary(info)}"
    body = render(info, results, args.quick)
    print(f"\n# kvd offline benchmark — {date}\n\n{body}")
    if not (args.no_record or args.quick):
        record(RECORD_PATH, title, body)
        print(f"\nrecorded in {RECORD_PATH}")


if __name__ == "__main__":
    main(sys.argv[1:])
