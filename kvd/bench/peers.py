"""kvd beside both peers, vLLM and llama.cpp, over HTTP in one run (`make bench`).

    python -m kvd.bench.peers [--quick] [--no-record] [--rounds N] [--no-vllm] [--llama-dir DIR]
    (or `kvd bench peers ...`)

Five or six OpenAI servers, side by side, get the same requests (`POST /v1/completions`,
`stream: true`, token-id prompts, EOS ignored) from one aiohttp load client
(kvd.bench.serve_http's):
- kvd float32 (`model.quantization = "none"`: the GGUF dequantized at conversion);
- kvd on the shipped GGUF (`"auto"`: its Q4_1 layers and Q8_0 embedding / lm_head as they are);
- where the CPU has bf16 hardware (kvd.cpu's flags: AVX512-BF16 or AMX), kvd on the shipped GGUF
  again with bfloat16 activations, what `model.dtype = "auto"` picks on such a CPU (its prompt
  rows then run oneDNN's bf16 GEMM on the dequantized tiles, 1.4-2.2x the float32 one);
- `vllm serve` float32 (`make bench-peer`), on kvd's converted float32 checkpoint;
- `llama-server` on the shipped GGUF, and on an F32 copy of it (`llama-quantize
  --allow-requantize <gguf> <copy> F32`, made once and kept under .peers/), both built by
  `make bench-llama`. Where the binaries are missing the llama.cpp rows are skipped, saying so.
Sections: single stream (one 32-token prompt of real English, 128 new tokens, greedy); 32
streams greedy (kvd.bench.serve's 64 mixed requests, prompts 30-300 tokens, max_tokens
16-128); the same 32 streams sampled (temperature 0.8, top_p 0.95). Output tok/s =
requested tokens / (first send → last chunk); every response must carry exactly its
max_tokens (the usage's completion_tokens).

Side by side, not one at a time: each section runs in rounds (`--rounds`, default 3; the
single stream twice as many), every server back to back in each round, the order rotated
by one each round (kvd.bench.serve_http's `streams_rounds`), so a drift of this shared VM's
speed (±10% from minute to minute) falls on every server of a round alike; the ratios
kvd / peer are taken within each round and the median of the rounds is the headline. An
idle server takes no CPU (measured and printed before the rounds); `vllm serve` compiles
its model for minutes at every start, once. A server may go on working after its last
response; the next server's run waits until it is quiet (serve_http's `settle`).

Fairness: every server gets this process's cores as threads (`llama-server -t N -tb N`),
prefix caching off (kvd's config, vLLM's flag, `llama-server --no-cache-prompt --cache-ram
0`), room for 32 streams at once (kvd: max_num_seqs 64; vLLM: a 2 GiB KV cache;
llama-server: `-np 32` slots of 512 tokens each, `-c 16384`, a KV stream per slot,
continuous batching, its default) and float32 activations, no bf16, but for the one kvd
GGUF server above (the quantized paths of kvd and llama.cpp both round a decode step's
activations to 8 bits per block for integer dots).
llama-server's samplers default to top_k 40 and min_p 0.05 on top of the request's; a
request to it sends top_k 0 and min_p 0, so that it samples the distribution the others
do. Unless --no-record or --quick, appended to docs/benchmarks.md with the machine and its
CPU flags.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path

import structlog

from kvd.bench.offline import RECORD_PATH, PromptSource, flags_summary, machine_info, machine_summary, record
from kvd.bench.serve import FULL, QUICK, DaemonError, ModeResult, ServedDaemon, Workload, make_workloads, render_table
from kvd.bench.serve_http import (
    FULL_ROUNDS,
    GREEDY,
    MODEL_NAME,
    SAMPLED,
    CpuUse,
    HttpServer,
    Target,
    VllmServer,
    http_target,
    median_run,
    peer_env,
    per_round,
    ratio_line,
    streams_rounds,
    tree_cpu,
)
from kvd.bench.versus import KV_CACHE_GB, PEER_PYTHON
from kvd.cpu import auto_cpu_dtype, machine_flags
from kvd.worker.models import embedded_gguf_file, load_tokenizer, resolve_model

log = structlog.get_logger(__name__)

LLAMA_DIR = Path(".peers/llama.cpp-11434.0.0")  # the Makefile's LLAMA_DIR (make passes --llama-dir)
LLAMA_START_TIMEOUT_S = 300.0
SLOT_ROUND = 256  # a slot's context is the longest request rounded up to this
SINGLE_ROUNDS_PER_ROUND = 2  # the single stream is short (seconds a server): more rounds of it, cheaply
IDLE_S = 5.0  # the idle window in which every server's CPU is counted before the rounds

KVD_F32, KVD_GGUF, KVD_GGUF_BF16 = "kvd float32", "kvd GGUF", "kvd GGUF bf16"
VLLM = "vllm serve float32"
LLAMA_GGUF, LLAMA_F32 = "llama-server GGUF", "llama-server F32"
SERVERS = (KVD_GGUF, KVD_GGUF_BF16, KVD_F32, VLLM, LLAMA_GGUF, LLAMA_F32)  # the tables' order
SINGLE, STREAMS, SAMPLED_STREAMS = "single stream", "streams greedy", "streams sampled"
Results = dict[str, dict[str, list[ModeResult]]]  # the runs of each section (by name), by server, round by round
# the ratios printed, kvd / peer: kvd/llama.cpp beside kvd/vLLM for each kvd server
PAIRS = ((KVD_GGUF, LLAMA_GGUF), (KVD_GGUF, VLLM), (KVD_GGUF_BF16, LLAMA_GGUF), (KVD_GGUF_BF16, VLLM),
         (KVD_F32, LLAMA_F32), (KVD_F32, VLLM))  # fmt: skip
SAME = ((KVD_F32, VLLM), (KVD_F32, LLAMA_F32), (KVD_GGUF, LLAMA_GGUF), (KVD_GGUF, KVD_F32),
        (KVD_GGUF_BF16, KVD_GGUF))  # (nearly) one function; bf16 against float32 activations: not quite


@dataclass(frozen=True)
class Goal:
    """One of issue 31's targets: the median of the rounds' kvd / peer ratios in a section."""

    section: str
    kvd: str
    peer: str
    bound: float
    note: str = ""


GOALS = (Goal(SINGLE, KVD_GGUF, LLAMA_GGUF, 1.0, "stretch 1.3"), Goal(STREAMS, KVD_GGUF, LLAMA_GGUF, 1.5),
         Goal(STREAMS, KVD_GGUF, VLLM, 1.3), Goal(SINGLE, KVD_GGUF_BF16, LLAMA_GGUF, 1.0, "stretch 1.3"),
         Goal(STREAMS, KVD_GGUF_BF16, LLAMA_GGUF, 1.5), Goal(STREAMS, KVD_GGUF_BF16, VLLM, 1.3),
         Goal(SINGLE, KVD_F32, LLAMA_F32, 1.0))  # fmt: skip


# ---- the sections ----------------------------------------------------------------------------
@dataclass(frozen=True)
class Section:
    """One table column: a request set, how many run at once, greedy or sampled, and rounds."""

    name: str
    title: str  # the column's heading
    tag: str  # request ids
    work: Workload
    limit: int
    sampling: dict
    rounds: int

    @property
    def spec(self) -> tuple[str, str, list[float], int]:
        """kvd.bench.serve_http's mode: (name, tag, arrival delays, stream limit); all sent at once."""
        return self.title, self.tag, [0.0] * len(self.work[0]), self.limit


def sections(cfg, single: Workload, work: Workload, rounds: int, single_rounds: int) -> list[Section]:
    n = cfg.concurrency
    return [Section(SINGLE, "single stream", "single", single, 1, GREEDY, single_rounds),
            Section(STREAMS, f"{n} streams", f"streams-{n}", work, n, GREEDY, rounds),
            Section(SAMPLED_STREAMS, f"{n} streams sampled (T 0.8, top_p 0.95)", f"sampled-{n}", work, n, SAMPLED,
                    rounds)]  # fmt: skip


def slot_context(*sets: Workload) -> int:
    """Tokens a llama-server slot needs: the longest prompt + max_tokens, rounded up."""
    longest = max(len(p) + m for prompts, max_tokens in sets for p, m in zip(prompts, max_tokens))
    return -(-longest // SLOT_ROUND) * SLOT_ROUND


# ---- llama.cpp -------------------------------------------------------------------------------
@dataclass(frozen=True)
class LlamaBuild:
    """The llama.cpp of `make bench-llama`: `root` holds the source, build/bin/ the binaries."""

    root: Path

    @property
    def server(self) -> Path:
        return self.root / "build" / "bin" / "llama-server"

    @property
    def quantize(self) -> Path:
        return self.root / "build" / "bin" / "llama-quantize"

    def missing(self) -> str | None:
        """Why the build cannot run, in one line; None: it can."""
        missing = [b.name for b in (self.server, self.quantize) if not os.access(b, os.X_OK)]
        if missing:
            return f"{' and '.join(missing)} not built in {self.server.parent}; run `make bench-llama`"
        return None

    def models(self, gguf: Path) -> dict[str, Path]:
        """What llama-server runs, by label: `gguf`, and its F32 copy beside the build (made once)."""
        return {LLAMA_GGUF: gguf, LLAMA_F32: f32_copy(self.quantize, gguf, self.root.parent)}


def llama_server_argv(binary: Path, model: Path, port: int, threads: int, slots: int, ctx_per_slot: int) -> list[str]:
    """`llama-server` as the bench runs it: this process's cores, `slots` streams at once with
    their own `ctx_per_slot` tokens of KV each, no prompt cache, the name the client asks for."""
    return [str(binary), "-m", str(model), "--host", "127.0.0.1", "--port", str(port), "--alias", MODEL_NAME,
            "-t", str(threads), "-tb", str(threads), "-np", str(slots), "-c", str(slots * ctx_per_slot),
            "--no-kv-unified", "--cont-batching", "--no-cache-prompt", "--cache-ram", "0", "--no-webui"]  # fmt: skip


def llama_fields(sampling: dict) -> dict:
    """A request's body fields for llama-server: the same sampling as the other servers get.
    Its own samplers (top_k 40, min_p 0.05 by default) would cut a sampled request's
    distribution further than temperature and top_p do; greedy takes the argmax either way."""
    return sampling if sampling.get("temperature", 1.0) == 0 else sampling | {"top_k": 0, "min_p": 0.0}


class LlamaServer(HttpServer):
    """`llama-server` on one GGUF file (its /health answers 200 once the model is loaded)."""

    def __init__(self, binary: Path, model: Path, label: str, workdir: Path, threads: int, slots: int,
                 ctx_per_slot: int) -> None:  # fmt: skip
        super().__init__(label, workdir / f"{label.replace(' ', '-')}.log", peer_env(threads), LLAMA_START_TIMEOUT_S)
        self.argv = llama_server_argv(binary, model, self.port, threads, slots, ctx_per_slot)


def f32_copy(quantize: Path, gguf: Path, out_dir: Path) -> Path:
    """An F32 copy of `gguf` in `out_dir` (llama-quantize --allow-requantize ... F32), made once."""
    out = out_dir / f"{gguf.stem}-F32.gguf"
    if out.exists():
        return out
    tmp = out.with_suffix(".tmp")
    done = subprocess.run([str(quantize), "--allow-requantize", str(gguf), str(tmp), "F32"], capture_output=True,
                          text=True, timeout=600)  # fmt: skip
    if done.returncode != 0:
        tmp.unlink(missing_ok=True)
        tail = "\n".join((done.stdout + done.stderr).splitlines()[-10:])
        raise DaemonError(f"llama-quantize to F32 failed ({done.returncode}):\n{tail}")
    tmp.rename(out)
    log.info("bench_f32_copy", path=str(out), mb=round(out.stat().st_size / 1e6))
    return out


def weight_bytes(gguf: Path) -> int:
    """Bytes of a GGUF file's tensors: what a decode step reads once (the tied embedding is
    the lm_head, read whole; its lookup reads a row)."""
    from gguf import GGUFReader

    return sum(int(t.n_bytes) for t in GGUFReader(gguf).tensors)


# ---- the servers, side by side ---------------------------------------------------------------
@dataclass(frozen=True)
class Served:
    """One server up: where to send, its root process, and its requests' extra body fields."""

    url: str
    pid: int
    fields: Callable[[dict], dict] = dict  # the sampling fields -> the body's fields

    def target(self, label: str, sampling: dict) -> Target:
        return http_target(self.url, label, self.pid, self.fields(sampling))


@contextlib.contextmanager
def servers(workdir: Path, threads: int, max_num_seqs: int, vllm: bool, llama_server: Path,
            llama_models: dict[str, Path], slots: int, ctx_per_slot: int,
            kvd_bf16: bool) -> Iterator[dict[str, Served]]:  # fmt: skip
    """Every server up until the block ends, by label: kvd's two (`max_num_seqs`; a third on
    the GGUF with bf16 activations with `kvd_bf16`), `vllm serve`
    with `vllm`, `llama-server` on each of `llama_models` (label -> GGUF file; `slots` of
    `ctx_per_slot` tokens). `vllm serve` starts first: it compiles its model for minutes,
    which would disturb anything running beside it."""
    with contextlib.ExitStack() as stack:
        up: dict[str, Served] = {}
        if vllm:
            server = VllmServer(resolve_model(None), "float32", workdir, threads)
            stack.callback(server.stop)
            up[VLLM] = Served(server.start(), server.proc.pid)
        for label, model in llama_models.items():
            server = LlamaServer(llama_server, model, label, workdir, threads, slots, ctx_per_slot)
            stack.callback(server.stop)
            up[label] = Served(server.start(), server.proc.pid, llama_fields)
        kvd = [(KVD_F32, "none", "float32"), (KVD_GGUF, "auto", "float32")]
        for label, quantization, dtype in kvd + ([(KVD_GGUF_BF16, "auto", "bfloat16")] if kvd_bf16 else []):
            (workdir / label.replace(" ", "-")).mkdir()
            daemon = ServedDaemon(workdir / label.replace(" ", "-"), max_num_seqs, dtype=dtype,
                                  http_model=MODEL_NAME, quantization=quantization)  # fmt: skip
            stack.callback(daemon.stop)
            try:
                daemon.start()
            except DaemonError as e:
                raise DaemonError(f"{label}: {e}\n{daemon.log_tail()}") from e
            up[label] = Served((daemon.run_dir / "http_endpoint").read_text().strip(), daemon.proc.pid)
        yield {label: up[label] for label in SERVERS if label in up}


def idle_cpu(up: dict[str, Served], seconds: float) -> dict[str, float]:
    """CPU seconds each server's process tree took over `seconds` with no requests."""
    before = {label: sum(tree_cpu(s.pid)) for label, s in up.items()}
    time.sleep(seconds)
    return {label: sum(tree_cpu(s.pid)) - before[label] for label, s in up.items()}


async def measure(up: dict[str, Served], secs: list[Section],
                  warm: Workload) -> tuple[Results, dict[str, dict[str, list[CpuUse]]]]:
    """Every server's warm-up (greedy and sampled), then each section's rounds: the results
    and the CPU each run took, by section, then server."""
    for label, s in up.items():
        for kind, sampling in (("warm-up", GREEDY), ("warm-up sampled", SAMPLED)):
            await s.target(label, sampling).run(kind, kind.replace(" ", "-"), warm, [0.0] * len(warm[0]), len(warm[0]))
    results, cpu = {}, {}
    for sec in secs:
        targets = [s.target(label, sec.sampling) for label, s in up.items()]
        results[sec.name], cpu[sec.name] = await streams_rounds(targets, sec.work, sec.spec, sec.rounds)
    return results, cpu


# ---- report ----------------------------------------------------------------------------------
def ratios(results: Results, section: str, kvd: str, peer: str) -> list[float] | None:
    runs = results[section]
    return per_round(runs, kvd, peer) if kvd in runs and peer in runs else None


def cell(r: list[float] | None) -> str:
    return "–" if r is None else f"**{statistics.median(r):.2f}** ({', '.join(f'{x:.2f}' for x in r)})"


def speed_table(results: Results, secs: list[Section]) -> str:
    """Output tok/s of each server's median round, a column per section (the issue's table)."""
    rows = ["| server | " + " | ".join(f"{s.title} tok/s" for s in secs) + " |", "|---|" + "--:|" * len(secs)]
    for label in dict.fromkeys(label for sec in secs for label in results[sec.name]):
        runs = [results[s.name].get(label) for s in secs]
        rows.append(f"| {label} | " + " | ".join("–" if r is None else f"{median_run(r).tok_s:.1f}" for r in runs)
                    + " |")  # fmt: skip
    return "\n".join(rows)


def ratio_table(results: Results, secs: list[Section]) -> str:
    """kvd / peer output tok/s, a row per pair of PAIRS (kvd/llama.cpp beside kvd/vLLM): the
    median of the rounds' ratios, then each round's."""
    rows = ["| kvd / peer (median of rounds; each round) | " + " | ".join(s.title for s in secs) + " |",
            "|---|" + "--:|" * len(secs)]  # fmt: skip
    for kvd, peer in PAIRS:
        cells = [ratios(results, s.name, kvd, peer) for s in secs]
        if any(c is not None for c in cells):
            rows.append(f"| {kvd} / {peer} | " + " | ".join(map(cell, cells)) + " |")
    return "\n".join(rows) if len(rows) > 2 else "No ratios: no peer ran."


def goal_lines(results: Results, secs: list[Section]) -> list[str]:
    titles = {s.name: s.title for s in secs}
    lines = []
    for g in GOALS:
        r = ratios(results, g.section, g.kvd, g.peer)
        if r is None:
            continue
        value = statistics.median(r)
        target = f"target ≥ {g.bound:.1f}" + (f", {g.note}" if g.note else "") + (": met" if value >= g.bound
                                                                                   else ": NOT met")  # fmt: skip
        lines.append(ratio_line(f"{titles[g.section]}: {g.kvd} / {g.peer}", r, target))
    return lines


def bandwidth_line(results: Results, files: dict[str, Path], copy_gb_s: float, read_gb_s: float) -> str:
    """The single stream's weight bytes a second (tok/s x the bytes a token reads) against the
    copy bandwidth (the target's measure) and the read bandwidth (what a reader of weights can reach)."""
    parts = []
    for label, path in files.items():
        runs = results[SINGLE].get(label)
        if runs:
            gb_s = median_run(runs).tok_s * weight_bytes(path) / 1e9
            parts.append(f"{label} {gb_s:.1f} GB/s ({gb_s / copy_gb_s:.0%}; {gb_s / read_gb_s:.0%} of read)")
    return (f"weights read a second at single stream (median round's tok/s x the model file's tensor bytes), "
            f"against this machine's copy bandwidth {copy_gb_s:.1f} GB/s (256 MiB float32, read + write; target "
            f"≥ 70% for kvd GGUF) and its read bandwidth {read_gb_s:.1f} GB/s (a sum over 256 MiB): "
            + "; ".join(parts))  # fmt: skip


def same_line(results: Results, title: str) -> str:
    """How many greedy outputs (texts) of the streams section's first round two servers share:
    the same weights should give the same tokens but at near-ties of the top two logits."""
    runs = results[STREAMS]
    parts = [f"{a} / {b} {sum(x == y for x, y in zip(runs[a][0].outputs, runs[b][0].outputs))}/"
             f"{len(runs[a][0].outputs)}" for a, b in SAME if a in runs and b in runs]  # fmt: skip
    return f"greedy outputs identical at {title}, first round: " + ("; ".join(parts) or "no pair ran")


def cpu_line(cpu: dict[str, list[CpuUse]], title: str) -> str:
    """CPU seconds per 1,000 output tokens of a section's runs (medians over the rounds): each
    server's process tree, and the load client's (it shares the cores)."""

    def per_k(uses: list[CpuUse], server: bool) -> float:
        return statistics.median(((u.root + u.rest) if server else u.client) / u.tokens * 1e3 for u in uses)

    return (f"CPU seconds per 1,000 output tokens at {title} (median round), server / load client: "
            + "; ".join(f"{label} {per_k(uses, True):.2f} / {per_k(uses, False):.2f}" for label, uses in cpu.items()))


def settle_line(cpu: dict[str, dict[str, list[CpuUse]]]) -> str:
    """How long each server went on working after its runs' last response (the next run waited)."""
    parts = [f"{label} {max(u.settle_s for by in cpu.values() for u in by.get(label, [])):.1f}"
             for label in dict.fromkeys(label for by in cpu.values() for label in by)]  # fmt: skip
    return ("seconds a server went on taking CPU after a run's last response, the longest of its runs (the next "
            "run waited till it was quiet): " + ", ".join(parts))


def detail_rows(results: Results) -> list[ModeResult]:
    """Each server's median round of each section, named to say so (kvd.bench.serve's table)."""
    return [replace(m, name=f"{m.name} (median of {len(runs)})") for runs_by in results.values()
            for runs in runs_by.values() for m in [median_run(runs)]]  # fmt: skip


# ---- entry -----------------------------------------------------------------------------------
def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m kvd.bench.peers", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes for development; never recorded")
    parser.add_argument("--no-record", action="store_true", help=f"do not append to {RECORD_PATH}")
    parser.add_argument("--rounds", type=int, default=None,
                        help=f"rounds of each streams section (default {FULL_ROUNDS}; --quick: 1); the single "
                             f"stream runs {SINGLE_ROUNDS_PER_ROUND} times as many")  # fmt: skip
    parser.add_argument("--no-vllm", action="store_true", help="without vllm serve (it compiles for minutes)")
    parser.add_argument("--llama-dir", type=Path, default=LLAMA_DIR, help="the llama.cpp build of `make bench-llama`")
    args = parser.parse_args(argv)
    if args.rounds is None:
        args.rounds = 1 if args.quick else FULL_ROUNDS
    if args.rounds < 1:
        parser.error("--rounds: must be at least 1")
    return args


def main(argv: list[str] | None = None) -> None:
    from kvd.bench.quant import memory_bandwidth, read_bandwidth

    args = parse(argv)
    cfg = QUICK if args.quick else FULL
    new_tokens = 16 if args.quick else 128
    threads = len(os.sched_getaffinity(0))
    info, flags = machine_info(), machine_flags()
    date = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    skipped = []
    vllm = not args.no_vllm
    if vllm and not PEER_PYTHON.exists():
        skipped.append(f"vllm serve: the peer venv {PEER_PYTHON.parent} is missing; run `make bench-peer`")
        vllm = False
    llama = LlamaBuild(args.llama_dir)
    if (why := llama.missing()) is not None:
        skipped.append(f"llama.cpp: {why}")
    dtype, why_dtype = auto_cpu_dtype(flags)
    kvd_bf16 = dtype == "bfloat16"
    if not kvd_bf16:
        skipped.append(f"{KVD_GGUF_BF16}: {why_dtype}")
    for line in skipped:
        print(f"kvd bench peers: skipping {line}", file=sys.stderr)

    gguf = embedded_gguf_file()
    work, warm = make_workloads(cfg)
    single = ([PromptSource(load_tokenizer(resolve_model(None)), seed=cfg.seed + 1).prompt(32)], [new_tokens])
    secs = sections(cfg, single, work, args.rounds, args.rounds * SINGLE_ROUNDS_PER_ROUND)
    ctx = slot_context(work, warm, single)
    with tempfile.TemporaryDirectory(prefix="kvd-bench-peers-") as tmp:
        try:
            models = llama.models(gguf) if why is None else {}
            with servers(Path(tmp), threads, cfg.max_num_seqs, vllm, llama.server, models, cfg.concurrency, ctx,
                         kvd_bf16) as up:  # fmt: skip
                idle = idle_cpu(up, IDLE_S)
                results, cpu = asyncio.run(measure(up, secs, warm))
                copy_gb_s, read_gb_s = memory_bandwidth(), read_bandwidth()
        except DaemonError as e:
            print(f"kvd bench peers: {e}", file=sys.stderr)
            sys.exit(1)
    # the bytes kvd's float32 weights (its conversion of the same file) take: the F32 copy's
    files = {KVD_GGUF: gguf, KVD_GGUF_BF16: gguf} | models | ({KVD_F32: models[LLAMA_F32]} if models else {})
    prompts, max_tokens = work
    notes = [
        *goal_lines(results, secs),
        bandwidth_line(results, files, copy_gb_s, read_gb_s),
        cpu_line(cpu[STREAMS], secs[1].title),
        same_line(results, secs[1].title),
        settle_line(cpu),
        f"requests: single stream, one {len(single[0][0])}-token prompt and {new_tokens} new tokens; streams, "
        f"{len(prompts)} requests (kvd.bench.serve's), prompts {sum(map(len, prompts))} tokens in all, "
        f"{sum(max_tokens)} requested output tokens, {cfg.concurrency} at a time; EOS ignored, token-id prompts, "
        f"streaming, one aiohttp client; greedy, or temperature 0.8 / top_p 0.95 (llama-server: top_k 0, min_p 0 "
        f"besides, undoing its defaults)",
        f"servers side by side, {threads} threads each, float32 activations"
        + (f" ({KVD_GGUF_BF16}: bfloat16, what model.dtype = \"auto\" picks on this CPU, {why_dtype})" if kvd_bf16
           else "")
        + f" (the GGUF runs round a decode step's activations to 8 bits per block for integer dots), prefix "
        f"caching off: kvd "
        f"max_num_seqs {cfg.max_num_seqs}; vLLM KV cache {KV_CACHE_GB} GiB; llama-server -np "
        f"{cfg.concurrency} slots of {ctx} tokens (-c {cfg.concurrency * ctx}, a KV stream per slot), "
        f"--no-cache-prompt --cache-ram 0, continuous batching; rounds: single stream "
        f"{args.rounds * SINGLE_ROUNDS_PER_ROUND}, each streams section {args.rounds}, every server back to back "
        f"in a round, the order rotated each round",
        "CPU seconds each server took idle over "
        f"{IDLE_S:.0f} s before the rounds: " + ", ".join(f"{k} {v:.2f}" for k, v in idle.items()),
        *(f"not run: {line}" for line in skipped),
    ]
    body = "\n\n".join([
        f"Configuration: {'quick' if args.quick else 'full'}; machine: {', '.join(f'{k} {v}' for k, v in info.items())}"
        f"; CPU flags: {flags_summary(flags)}.",
        speed_table(results, secs), ratio_table(results, secs), "\n".join(f"- {line}" for line in notes),
        render_table(detail_rows(results)),
    ])  # fmt: skip
    print(f"\n# kvd, vLLM and llama.cpp over HTTP — {date}\n\n{body}")
    if not (args.no_record or args.quick):
        record(RECORD_PATH, f"Three peers over HTTP (`python -m kvd.bench.peers`), {date}, {machine_summary(info)}",
               body)  # fmt: skip
        print(f"\nrecorded in {RECORD_PATH}")


if __name__ == "__main__":
    main(sys.argv[1:])
