"""Structured outputs' cost (issue 28): `python -m kvd.bench.structured [--quick] [--no-record]`.

Three measurements against issue 28's targets, in one run, with one typical JSON schema
(SCHEMA: ten fields — strings, an enum, numbers, a boolean, a nested object, an array):
- Compiling: `Grammars.compile` of SCHEMA on a fresh compiler (its tokenizer tables built
  first, timed apart), then again from its cache. Targets: ≤ 100 ms, and ≤ 1 ms cached.
- The bitmask in a decode step: the median ms of `Engine.step()` with 32 requests in
  decode (kvd.bench.sampler's `step_ms`: greedy, 128-token prompts), with no grammar, with
  16 of the 32 rows under SCHEMA and with all 32; in the constrained steps, the engine's
  fill of the rows' bitmasks (`Engine._with_bitmasks`) and the worker's masking of the
  logits (`apply_bitmasks`) are timed inside the step. Target: fill + apply for 16 rows
  ≤ 5% of the step without a grammar. The rows' share of the Step message to the worker
  (msgpack, encoded and decoded) is shown beside it.
- Serving: kvd.bench.serve's 64 requests (token-id prompts of real English), 32 streams at
  a time, every other one under SCHEMA with an instruction after its prompt (EOS
  allowed: the grammar's end ends it), to kvd's HTTP server and `vllm serve` side by side
  (kvd.bench.serve_http's servers, and its rounds: every target back to back, the order
  rotated each round, ratios taken within a round). The same 64 requests also run
  unconstrained (EOS ignored), each constrained one asking for as many tokens as kvd's
  offline engine produced for it under the schema (greedy), so both runs do about the
  same work (greedy: the same tokens; sampled runs' outputs differ in length).
  Output tok/s = the output tokens produced (the usage of each response) / the seconds
  from the first send to the last chunk, the same for both servers. Targets: kvd's
  half-constrained run ≥ 0.9x its unconstrained run, and ≥ 1.0x vllm serve's
  half-constrained run. Every constrained output is checked against SCHEMA (jsonschema),
  on both servers. Greedy, then sampled (temperature 0.8, top_p 0.95) unless --greedy-only.
Unless --no-record or --quick, appended to docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import gc
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import astuple, dataclass, replace
from pathlib import Path

import msgspec
import structlog
from jsonschema import Draft202012Validator

import kvd.worker.model_runner as model_runner
from kvd.bench.offline import RECORD_PATH, flags_summary, machine_info, machine_summary, record
from kvd.bench.sampler import ROWS, TimedSampler, passage_tokens, step_ms, timed
from kvd.bench.serve import (
    FULL,
    QUICK,
    DaemonError,
    ModeResult,
    Workload,
    check_lengths,
    make_workloads,
    render_table,
)
from kvd.bench.serve_http import (
    FULL_ROUNDS,
    GREEDY,
    SAMPLED,
    CpuUse,
    Target,
    cpu_line,
    http_samples,
    median_run,
    per_round,
    ratio_line,
    servers,
    streams_rounds,
)
from kvd.bench.versus import PEER_PYTHON
from kvd.cpu import machine_flags
from kvd.engine.grammar import Grammars
from kvd.messages import Step, ToWorker
from kvd.sampling import SamplingParams, StructuredOutputs
from kvd.scheduler.output import SchedulerOutput

log = structlog.get_logger(__name__)

SCHEMA = {
    "type": "object",
    "properties": {
        "title": {"type": "string", "maxLength": 40},
        "topic": {"type": "string", "enum": ["syntax", "data model", "execution", "library", "tooling", "other"]},
        "summary": {"type": "string", "maxLength": 100},
        "difficulty": {"type": "integer", "minimum": 1, "maximum": 5},
        "relevance": {"type": "number", "minimum": 0, "maximum": 1},
        "word_count": {"type": "integer", "minimum": 0, "maximum": 100000},
        "has_code": {"type": "boolean"},
        "source": {
            "type": "object",
            "properties": {
                "document": {"type": "string", "maxLength": 24},
                "section": {"type": "string", "maxLength": 24},
                "version": {"type": "integer", "minimum": 2, "maximum": 4},
            },
            "required": ["document", "section", "version"],
            "additionalProperties": False,
        },
        "keywords": {"type": "array", "items": {"type": "string", "maxLength": 16}, "minItems": 1, "maxItems": 3},
        "audience": {"type": "string", "enum": ["beginner", "intermediate", "expert"]},
    },
    "required": ["title", "topic", "summary", "difficulty", "relevance", "word_count", "has_code", "source",
                 "keywords", "audience"],  # fmt: skip
    "additionalProperties": False,
}
SPEC = StructuredOutputs(json=json.dumps(SCHEMA))
INSTRUCTION = "\n\nThe passage above, described as JSON:\n"  # after each constrained request's prompt
CONSTRAINED_MAX_TOKENS = 256  # SCHEMA's complete outputs took 173-229 tokens here; a run of whitespace reaches it


# ---- compiling ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class CompileTimes:
    build_ms: float  # a fresh compiler's tokenizer tables (once per tokenizer)
    first_ms: float  # SCHEMA's first compile on that compiler
    cold_ms: float  # median compile after the cache is cleared
    cached_ms: float  # median compile from the cache


def compile_times(tokenizer, vocab_size: int, repeats: int) -> CompileTimes:
    grammars = Grammars(tokenizer, vocab_size)
    start = time.perf_counter()
    compiler = grammars.compiler
    build = time.perf_counter() - start
    start = time.perf_counter()
    grammars.compile(SPEC)
    first = time.perf_counter() - start
    cold = []
    for _ in range(repeats):
        compiler.clear_cache()
        start = time.perf_counter()
        grammars.compile(SPEC)
        cold.append(time.perf_counter() - start)
    cached = timed(lambda: grammars.compile(SPEC), 50)
    return CompileTimes(build * 1e3, first * 1e3, statistics.median(cold) * 1e3, cached)


# ---- the bitmask in a decode step ----------------------------------------------------------
@dataclass(frozen=True)
class StepTimes:
    """Medians over a case's timed steps (the best round's), ms."""

    step: float
    fill: float  # Engine._with_bitmasks
    apply: float  # apply_bitmasks, in the worker
    sampler: float


def bitmask_steps(llm, tokens: list[int], steps: int, rounds: int) -> dict[str, StepTimes]:
    """32 rows in decode: none, 16 and 32 under SCHEMA; the cases alternate each round, and
    each figure is the best round's (drift on a shared machine only ever adds time)."""
    engine = llm.engine
    # kvd.bench.sampler's step_ms aborts what `add` returned as if each were one id, but `add` returns
    # a list (its n choices' ids): flattened here, which still holds once step_ms flattens them itself
    abort = engine.abort
    engine.abort = lambda ids: abort([i for one in ids for i in ([one] if isinstance(one, str) else one)])
    engine.runner.sampler = TimedSampler(engine.runner.sampler)
    fill = engine._with_bitmasks = TimedSampler(engine._with_bitmasks)  # the timing wrapper serves any callable
    apply = model_runner.apply_bitmasks = TimedSampler(model_runner.apply_bitmasks)
    plain = SamplingParams(temperature=0.0, max_tokens=4096, ignore_eos=True)
    schema = SamplingParams(temperature=0.0, max_tokens=4096, structured_outputs=SPEC)
    cases = {"no grammar": [plain] * ROWS, f"{ROWS // 2} of {ROWS} rows under the schema":
             [schema if i % 2 else plain for i in range(ROWS)], f"all {ROWS} rows": [schema] * ROWS}  # fmt: skip
    best: dict[str, StepTimes] = {}
    try:
        for _ in range(rounds):
            for name, params in cases.items():
                fill.times, apply.times = [], []
                step, sampler = step_ms(llm, params, steps, tokens)
                # the last `steps` calls are the timed steps' (one schedule and one sampling each)
                t = StepTimes(step, *(statistics.median(w.times[-steps:]) * 1e3 for w in (fill, apply)), sampler)
                best[name] = StepTimes(*map(min, zip(astuple(best[name]), astuple(t)))) if name in best else t
    finally:
        model_runner.apply_bitmasks = apply.sampler
        del engine._with_bitmasks, engine.abort
    return best


def codec_ms(vocab_size: int, rows: int) -> float:
    """The ms that `rows` bitmask rows add to one Step message to the worker, encoded and decoded."""
    row = bytes(4 * ((vocab_size + 31) // 32))  # xgrammar's int32 words; their values cost nothing here
    base = SchedulerOutput(step=1, new_reqs=[], cached_reqs=[], num_scheduled_tokens={f"r{i}": 1 for i in range(ROWS)},
                           finished_request_ids=[], preempted_request_ids=[])  # fmt: skip
    masked = msgspec.structs.replace(base, bitmasks={f"r{i}": row for i in range(rows)})
    enc, dec = msgspec.msgpack.Encoder(), msgspec.msgpack.Decoder(ToWorker)
    return timed(lambda: dec.decode(enc.encode(Step(output=masked))), 200) - timed(
        lambda: dec.decode(enc.encode(Step(output=base))), 200)  # fmt: skip


# ---- serving ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class RequestSet:
    """The served requests: every other one under SCHEMA; `twin_max_tokens` are the same
    requests' max_tokens unconstrained (a constrained one's: the tokens kvd produced for it)."""

    prompts: list[list[int]]
    max_tokens: list[int]
    constrained: list[bool]
    twin_max_tokens: list[int]

    def bodies(self, sampling: dict, schema: bool) -> list[dict]:
        """The request bodies' fields besides the prompt and max_tokens (`schema`: under SCHEMA)."""
        under = {"ignore_eos": False, "structured_outputs": {"json": SCHEMA}}
        return [sampling | (under if schema and c else {}) for c in self.constrained]


def request_set(llm, work: Workload, max_tokens: int) -> tuple[RequestSet, list]:
    """The set, and kvd's offline greedy outputs of its constrained requests (their lengths
    are the unconstrained twins' max_tokens)."""
    prompts, plain_max = work
    suffix = llm.tokenizer.encode(INSTRUCTION, add_special_tokens=False)
    constrained = [i % 2 == 1 for i in range(len(prompts))]
    prompts = [p + suffix if c else p for p, c in zip(prompts, constrained)]
    wanted = [max_tokens if c else n for n, c in zip(plain_max, constrained)]
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, structured_outputs=SPEC)
    outs = llm.generate([p for p, c in zip(prompts, constrained) if c], params, use_tqdm=False)
    lengths = iter(len(o.token_ids) for o in outs)
    twin = [next(lengths) if c else n for n, c in zip(wanted, constrained)]
    return RequestSet(prompts, wanted, constrained, twin), outs


@dataclass(frozen=True)
class Checked:
    """The constrained outputs of a target's runs."""

    valid: int
    total: int
    cut: int  # ended at max_tokens


def check(texts_and_counts: list[tuple[str, int]], max_tokens: int) -> Checked:
    validator = Draft202012Validator(SCHEMA)
    valid = 0
    for text, _ in texts_and_counts:
        try:
            valid += validator.is_valid(json.loads(text))
        except ValueError:
            pass
    return Checked(valid, len(texts_and_counts), sum(n >= max_tokens for _, n in texts_and_counts))


def served_target(url: str, label: str, pid: int, reqs: RequestSet, sampling: dict, schema: bool) -> Target:
    """One server, one kind of run: the set half under SCHEMA (`schema`), or its twins unconstrained."""
    work = (reqs.prompts, reqs.max_tokens if schema else reqs.twin_max_tokens)
    bodies = reqs.bodies(sampling, schema)

    async def run(name, tag, _work, delays, limit):
        samples, wall = await http_samples(url, f"{label}-{tag}".replace(" ", "-"), work, delays, limit, bodies)
        if not schema:
            check_lengths(name, [[0] * (s.num_tokens or 0) for s in samples], work[1])
        return ModeResult(name, wall, sum(s.num_tokens for s in samples), [list(s.text) for s in samples], samples)

    return Target(label, run, pid)


async def measure_served(http: dict[str, tuple[str, int]], reqs: RequestSet, warm: Workload, cfg, rounds: int,
                         sampled: bool) -> tuple[dict[str, list[ModeResult]], dict[str, list[CpuUse]]]:  # fmt: skip
    """Every target's warm-up once (a few requests, half under SCHEMA: each server compiles it
    then), then `rounds` rounds of the streams mode."""
    kinds = [("", GREEDY)] + ([(" sampled", SAMPLED)] if sampled else [])
    targets = [served_target(url, f"{server}, {'JSON half' if schema else 'unconstrained'}{suffix}", pid, reqs,
                             sampling, schema)
               for suffix, sampling in kinds
               for server, (url, pid) in http.items()
               for schema in (True, False)]  # fmt: skip
    warm_set = RequestSet(warm[0], warm[1], [i % 2 == 1 for i in range(len(warm[0]))], warm[1])
    for server, (url, pid) in http.items():
        await served_target(url, f"{server} warm-up", pid, warm_set, GREEDY, True).run(
            "warm-up", "warmup", warm, [0.0] * len(warm[0]), len(warm[0]))  # fmt: skip
    n = len(reqs.prompts)
    streams = (f"{cfg.concurrency} concurrent streams", f"streams-{cfg.concurrency}", [0.0] * n, cfg.concurrency)
    return await streams_rounds(targets, (reqs.prompts, reqs.max_tokens), streams, rounds)


# ---- report ----------------------------------------------------------------------------------
def served_lines(results: dict[str, list[ModeResult]], reqs: RequestSet, sampled: bool) -> list[str]:
    lines = []
    for suffix in [""] + ([" sampled"] if sampled else []):
        kind = "sampled (T 0.8, top_p 0.95)" if suffix else "greedy"
        lines.append(ratio_line(f"{kind}, kvd HTTP: JSON half / unconstrained output tok/s",
                                per_round(results, f"kvd HTTP, JSON half{suffix}", f"kvd HTTP, unconstrained{suffix}"),
                                "target ≥ 0.9"))  # fmt: skip
        if f"vllm serve, JSON half{suffix}" in results:
            lines += [
                ratio_line(f"{kind}, JSON half: kvd HTTP / vllm serve output tok/s",
                           per_round(results, f"kvd HTTP, JSON half{suffix}", f"vllm serve, JSON half{suffix}"),
                           "target ≥ 1.0"),
                ratio_line(f"{kind}, vllm serve: JSON half / unconstrained",
                           per_round(results, f"vllm serve, JSON half{suffix}", f"vllm serve, unconstrained{suffix}"),
                           "for reference"),
                ratio_line(f"{kind}, unconstrained: kvd HTTP / vllm serve",
                           per_round(results, f"kvd HTTP, unconstrained{suffix}", f"vllm serve, unconstrained{suffix}"),
                           "for reference")]  # fmt: skip
    for label, runs in results.items():
        if "JSON half" not in label:
            continue
        outs = [(s.text, s.num_tokens) for m in runs for s, c in zip(m.samples, reqs.constrained) if c]
        checked = check(outs, CONSTRAINED_MAX_TOKENS)
        lines.append(f"{label}: {checked.valid}/{checked.total} constrained outputs valid against the schema, "
                     f"{checked.cut} cut at max_tokens; {statistics.mean(n for _, n in outs):.0f} output tokens "
                     f"a constrained request ({runs[0].tokens} in a run)")  # fmt: skip
    return lines


def compile_lines(c: CompileTimes) -> list[str]:
    return [f"**a fresh compiler's first compile of the schema: {c.first_ms:.1f} ms** (target ≤ 100 ms); "
            f"after its cache is cleared: {c.cold_ms:.1f} ms (median); building the compiler (the tokenizer's "
            f"tables, once per tokenizer) {c.build_ms:.0f} ms before that",
            f"**from the cache: {c.cached_ms:.3f} ms** (target ≤ 1 ms; median of 50)"]  # fmt: skip


def step_table(times: dict[str, StepTimes], codec: float, steps: int, rounds: int) -> str:
    base = times["no grammar"].step
    rows = [f"| {ROWS} rows in decode | step | step / no grammar | fill (engine) | apply (worker) | fill + apply, "
            f"of the step without a grammar | sampler call |", "|---|--:|--:|--:|--:|--:|--:|"]  # fmt: skip
    for name, t in times.items():
        rows.append(f"| {name} | {t.step:.1f} ms | {t.step / base:.3f} | {t.fill:.3f} ms | {t.apply:.3f} ms | "
                    f"{(t.fill + t.apply) / base:.1%} | {t.sampler:.2f} ms |")  # fmt: skip
    half = times[f"{ROWS // 2} of {ROWS} rows under the schema"]
    rows.append(f"\n- **the bitmask for {ROWS // 2} of {ROWS} rows: fill + apply {half.fill + half.apply:.2f} ms = "
                f"{(half.fill + half.apply) / base:.1%} of a {base:.1f} ms step** (target ≤ 5%); its rows add "
                f"{codec:.3f} ms to the Step message to the worker (msgpack encode + decode)")  # fmt: skip
    rows.append(f"- medians of {steps} steps, the best of {rounds} alternating rounds; float32; 128-token prompts "
                f"of the Python reference's text, greedy")  # fmt: skip
    return "\n".join(rows)


def where_line(steps: dict[str, StepTimes], cpu: dict[str, list[CpuUse]]) -> str:
    half = steps[f"{ROWS // 2} of {ROWS} rows under the schema"]

    def per_k(label: str, part: str) -> float:
        return statistics.median(getattr(u, part) / u.tokens * 1e3 for u in cpu[label])

    plain, json_half = "kvd HTTP, unconstrained", "kvd HTTP, JSON half"
    return (f"Where the time goes: in a 32-row step with 16 rows under the schema, the engine fills their "
            f"bitmasks in {half.fill:.2f} ms and the worker masks the logits in {half.apply:.2f} ms, against "
            f"{steps['no grammar'].step:.1f} ms of model; served, kvd's daemon took {per_k(json_half, 'root'):.2f} "
            f"CPU s per 1,000 tokens with the schema against {per_k(plain, 'root'):.2f} without (the fills, "
            f"compiles and text), its worker {per_k(json_half, 'rest'):.2f} against {per_k(plain, 'rest'):.2f}.")


# ---- entry -------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m kvd.bench.structured", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes for development; never recorded")
    parser.add_argument("--no-record", action="store_true", help=f"do not append to {RECORD_PATH}")
    parser.add_argument("--no-peer", action="store_true", help="kvd alone, without vllm serve")
    parser.add_argument("--greedy-only", action="store_true", help="without the sampled runs (T 0.8, top_p 0.95)")
    parser.add_argument("--rounds", type=int, default=None,
                        help=f"rounds of the served runs (default {FULL_ROUNDS}; --quick: 1)")  # fmt: skip
    args = parser.parse_args(argv)
    rounds = args.rounds if args.rounds is not None else (1 if args.quick else FULL_ROUNDS)
    if rounds < 1:
        parser.error("--rounds: must be at least 1")
    peer = not args.no_peer
    if peer and not PEER_PYTHON.exists():
        print(f"kvd bench structured: the vLLM peer venv {PEER_PYTHON.parent} is missing; create it with "
              "`make bench-peer` (or pass --no-peer)", file=sys.stderr)  # fmt: skip
        sys.exit(1)
    from transformers.utils import logging as hf_logging

    from kvd import LLM

    hf_logging.set_verbosity_error()
    cfg = QUICK if args.quick else FULL
    steps, step_rounds, compile_repeats = (8, 1, 2) if args.quick else (20, 3, 5)
    threads = len(os.sched_getaffinity(0))
    info, flags = machine_info(), machine_flags()
    date = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    work, warm = make_workloads(cfg)

    llm = LLM(dtype="float32", max_num_seqs=cfg.max_num_seqs, enable_prefix_caching=False)
    vocab = llm.engine.grammars.vocab_size
    compiled = compile_times(llm.tokenizer, vocab, compile_repeats)
    print("\n".join(compile_lines(compiled)), flush=True)
    reqs, offline = request_set(llm, work, CONSTRAINED_MAX_TOKENS)
    offline_check = check([(o.text, len(o.token_ids)) for o in offline], CONSTRAINED_MAX_TOKENS)
    print(f"offline, greedy: {offline_check.valid}/{offline_check.total} constrained outputs valid, "
          f"{offline_check.cut} cut; their tokens: {[len(o.token_ids) for o in offline]}", flush=True)
    step_times = bitmask_steps(llm, passage_tokens(llm.tokenizer, 4096 + 512)[512:], steps, step_rounds)
    codec = codec_ms(vocab, ROWS // 2)
    print(step_table(step_times, codec, steps, step_rounds), flush=True)
    del llm, offline
    gc.collect()

    with tempfile.TemporaryDirectory(prefix="kvd-bench-structured-") as tmp:
        try:
            with servers("float32", cfg.max_num_seqs, Path(tmp), threads, peer) as (_, http):
                results, cpu = asyncio.run(measure_served(http, reqs, warm, cfg, rounds, not args.greedy_only))
        except DaemonError as e:
            print(f"kvd bench structured: {e}", file=sys.stderr)
            sys.exit(1)
    medians = [replace(median_run(runs), name=f"{median_run(runs).name} (median of {len(runs)})")
               for runs in results.values()]  # fmt: skip
    n, half = len(reqs.prompts), sum(reqs.constrained)
    plain = [m for m, c in zip(reqs.max_tokens, reqs.constrained) if not c]
    parts = [
        f"Configuration: {'quick' if args.quick else 'full'}; machine: {', '.join(f'{k} {v}' for k, v in info.items())}"
        f"; CPU flags: {flags_summary(flags)}.",
        f"The schema: {len(SCHEMA['properties'])} fields (strings with maxLength, two enums, integers and a number "
        f"with ranges, a boolean, a nested object of 3, an array of 1-3 strings), all required.",
        "### Compiling (`Grammars.compile`)",
        "\n".join(f"- {line}" for line in compile_lines(compiled)),
        f"### The bitmask in a decode step of {ROWS} rows (`Engine.step()`, in process)",
        step_table(step_times, codec, steps, step_rounds),
        f"### Served over HTTP: {cfg.concurrency} streams, every other request under the schema",
        render_table(medians),
        "\n".join(f"- {line}" for line in [*served_lines(results, reqs, not args.greedy_only), cpu_line(cpu)]),
        f"- requests: {n}, {half} under the schema (an instruction after the prompt, max_tokens "
        f"{CONSTRAINED_MAX_TOKENS}, EOS allowed), the others kvd.bench.serve's (max_tokens {min(plain)}-{max(plain)}, "
        f"EOS ignored); the unconstrained run "
        f"is the same requests without the schema and with EOS ignored, each constrained one's max_tokens the "
        f"tokens kvd's offline engine produced for it ({sum(reqs.twin_max_tokens)} in all; offline, "
        f"{offline_check.valid}/{offline_check.total} valid, {offline_check.cut} cut); output tok/s from the tokens "
        f"produced; float32, prefix caching off, {threads} threads each; both servers up for the whole run, "
        f"{rounds} rounds of every target back to back, the order rotated each round",
        where_line(step_times, cpu),
    ]
    body = "\n\n".join(parts)
    print(f"\n# kvd structured outputs benchmark — {date}\n\n{body}")
    if not (args.no_record or args.quick):
        record(RECORD_PATH, f"Structured outputs (`python -m kvd.bench.structured`), {date}, "
                            f"{machine_summary(info)}", body)  # fmt: skip
        print(f"\nrecorded in {RECORD_PATH}")


if __name__ == "__main__":
    main(sys.argv[1:])
