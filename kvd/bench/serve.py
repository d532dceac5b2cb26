"""Serving benchmark: the real daemon under load, beside the offline engine, in one run (`make bench`).

    python -m kvd.bench.serve [--quick] [--no-record]        (or `kvd bench serve ...`)

In the style of `vllm bench serve`. One fixed request set (seeded): N requests whose
prompts are token-id slices of real English (`PromptSource` of kvd.bench.offline), with
prompt lengths and max_tokens uniform in ranges; greedy with EOS ignored, so every
request yields exactly the tokens it asked for and every mode does the same work.

Offline reference, first, in this process (the daemon is not running yet, so the two
never share the cores): `LLM.generate` over the whole set at once, with max_num_seqs=64
and with max_num_seqs=32; output tok/s, and engine steps counted around `engine.step`.

Served: `python -m kvd.cli serve` as a subprocess (embedded SmolLM2-135M, CPU float32,
port 0 in a temporary run dir, JSON logs to a file), the same scheduler and cache
settings as the offline side. Prefix caching is off on both sides: every mode replays
the same prompts, and hits on an earlier mode's blocks would flatter the later ones.
Modes, each on the same request set, over one shared `AsyncClient` with streaming:
- Poisson arrivals at each rate (req/s; "inf" sends all at once);
- N at a time: a semaphore of 32 streams, the next request starts when one finishes.
Per request (client side, `time.perf_counter`): TTFT = send → first chunk with tokens;
ITL = the gaps between successive chunks (one per engine step; a chunk that carried
more than one token is counted in the notes); TPOT = (e2e − TTFT) / (tokens − 1);
e2e = send → last chunk. Per mode: output tok/s = requested tokens / wall seconds from
the first send to the last chunk; req/s = requests / the same.

The headline is daemon tok/s at 32 streams / offline tok/s at max_num_seqs=32 (target
≥ 0.95: ZeroMQ and process overhead under 5%). The notes break the gap down: client
e2e minus the daemon's own (its JSON log's `since_arrival_ms`), and the daemon's step
time (wall / bursts of chunks seen by the client) beside offline's (wall / steps).
The table goes to stdout; unless --no-record or --quick it is appended to
docs/benchmarks.md (run from the repository root, as `make bench` does).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import math
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from time import perf_counter

import numpy as np
import structlog

from kvd import LLM
from kvd.bench.offline import (
    RECORD_PATH,
    PromptSource,
    kvd_generate,
    machine_info,
    machine_summary,
    record,
)
from kvd.client import AsyncClient, KvdError
from kvd.spawn import DaemonError, daemon_env, start_kvd, wait_endpoint

log = structlog.get_logger(__name__)

START_TIMEOUT_S = 300.0
STOP_TIMEOUT_S = 30.0
ALL_AT_ONCE = "all at once (rate inf)"
ENGINE_OPTIONS = {"device": "cpu", "dtype": "float32", "enable_prefix_caching": False}  # both sides
Workload = tuple[list[list[int]], list[int]]  # prompts (token ids), max_tokens


@dataclass(frozen=True)
class BenchConfig:
    """Sizes of the run; FULL is `make bench`, QUICK a smoke run for development."""

    requests: int = 64
    prompt: tuple[int, int] = (30, 300)
    max_tokens: tuple[int, int] = (16, 128)
    rates: tuple[float, ...] = (1.0, 2.0, 4.0, math.inf)
    concurrency: int = 32
    max_num_seqs: int = 64
    warmup_requests: int = 4
    seed: int = 0


FULL = BenchConfig()
QUICK = replace(FULL, requests=12, max_tokens=(8, 32), rates=(4.0, math.inf), concurrency=4)


# ---- measurements ----------------------------------------------------------------------
@dataclass
class Sample:
    """One streamed request, as the client saw it (perf_counter seconds)."""

    request_id: str
    sent: float
    chunk_times: list[float] = field(default_factory=list)  # chunks that carried tokens
    chunk_tokens: list[int] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    text: str = ""  # over HTTP, which streams text: the tokens are counted by the server's usage
    num_tokens: int | None = None

    @property
    def ttft(self) -> float:
        return self.chunk_times[0] - self.sent

    @property
    def e2e(self) -> float:
        return self.chunk_times[-1] - self.sent

    @property
    def tpot(self) -> float | None:
        n = self.num_tokens if self.num_tokens is not None else len(self.token_ids)
        return (self.e2e - self.ttft) / (n - 1) if n > 1 else None

    @property
    def itls(self) -> list[float]:
        return [b - a for a, b in zip(self.chunk_times, self.chunk_times[1:])]


@dataclass
class ModeResult:
    """One mode's run over the request set; offline modes have no samples."""

    name: str
    wall: float
    tokens: int
    outputs: list[list[int]]
    samples: list[Sample] = field(default_factory=list)
    steps: int | None = None  # engine steps (offline: counted; served: bursts of chunks)

    @property
    def tok_s(self) -> float:
        return self.tokens / self.wall

    @property
    def req_s(self) -> float:
        return len(self.outputs) / self.wall


def percentiles_ms(values: list[float]) -> str:
    if not values:
        return "–"
    p50, p90, p99 = np.percentile(np.array(values) * 1e3, [50, 90, 99])
    return f"{p50:.0f} / {p90:.0f} / {p99:.0f}"


def count_bursts(samples: list[Sample]) -> int:
    """Engine steps seen from the client: one step's chunks arrive together, steps apart.

    A gap longer than a quarter of the median ITL (about one step) starts a new burst."""
    times = sorted(t for s in samples for t in s.chunk_times)
    itls = [x for s in samples for x in s.itls]
    gap = 0.25 * statistics.median(itls) if itls else 0.0
    return 1 + sum(b - a > gap for a, b in zip(times, times[1:]))


def check_lengths(name: str, outputs: list[list[int]], max_tokens: list[int]) -> None:
    """Every mode must produce exactly the requested tokens, or its rate means nothing."""
    bad = [i for i, (out, n) in enumerate(zip(outputs, max_tokens)) if len(out) != n]
    if bad or len(outputs) != len(max_tokens):
        raise RuntimeError(f"{name}: requests {bad[:5]} did not produce exactly max_tokens tokens")


# ---- offline reference ---------------------------------------------------------------------
def offline_mode(work: Workload, warm: Workload, max_num_seqs: int) -> ModeResult:
    """All requests submitted at once to an in-process LLM; steps counted around `engine.step`."""
    llm = LLM(max_num_seqs=max_num_seqs, **ENGINE_OPTIONS)
    kvd_generate(llm, *warm)
    engine, inner, steps = llm.engine, llm.engine.step, [0]

    def counted_step():
        steps[0] += 1
        return inner()

    engine.step = counted_step  # LLM.generate calls engine.step once per step; this LLM dies with the call
    start = perf_counter()
    outputs = kvd_generate(llm, *work)
    wall = perf_counter() - start
    llm.check_integrity()
    name = f"offline, max_num_seqs={max_num_seqs}"
    check_lengths(name, outputs, work[1])
    log.info("bench_mode_done", mode=name, seconds=round(wall, 1))
    return ModeResult(name, wall, sum(work[1]), outputs, steps=steps[0])


# ---- the daemon --------------------------------------------------------------------------
class ServedDaemon:
    """`python -m kvd.cli serve` on a random loopback port, in a run dir under `workdir`.

    `start()` returns its endpoint once `<run_dir>/endpoint` exists; `stop()` sends
    SIGTERM to its PID (SIGKILL after STOP_TIMEOUT_S) and is safe to call twice."""

    def __init__(self, workdir: Path, max_num_seqs: int, dtype: str = ENGINE_OPTIONS["dtype"],
                 http_model: str | None = None, quantization: str = "none") -> None:  # fmt: skip
        """`http_model`: also serve the OpenAI API (a random port), under this model name;
        `quantization`: the config's `model.quantization`."""
        self.run_dir = workdir / "run"
        self.log_file = workdir / "kvd.log"
        self.stdout = workdir / "stdout.txt"
        self.config = workdir / "kvd.toml"
        self.config.write_text(
            f'[daemon]\nport = 0\nrun_dir = "{self.run_dir.as_posix()}"\n'
            f'[model]\ndevice = "{ENGINE_OPTIONS["device"]}"\ndtype = "{dtype}"\nquantization = "{quantization}"\n'
            + (f'[http]\nport = 0\nserved_model_name = "{http_model}"\n' if http_model else "")
            + f"[cache]\nenable_prefix_caching = {str(ENGINE_OPTIONS['enable_prefix_caching']).lower()}\n"
            f"[scheduler]\nmax_num_seqs = {max_num_seqs}\n"
            f'[log]\nformat = "json"\nfile = "{self.log_file.as_posix()}"\n'
        )
        self.proc: subprocess.Popen | None = None

    def start(self) -> str:
        # KVD_* variables would override the config and make the daemon differ from the offline side.
        self.proc = start_kvd(["serve", "--config", str(self.config)], daemon_env(), self.stdout)
        return wait_endpoint(self.proc, self.run_dir / "endpoint", START_TIMEOUT_S)

    def stop(self) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()

    def log_tail(self, lines: int = 30) -> str:
        parts = []
        for path in (self.log_file, self.stdout):
            text = path.read_text(errors="replace").splitlines() if path.exists() else ["(none)"]
            parts.append(f"--- {path.name}, last {lines} lines ---\n" + "\n".join(text[-lines:]))
        return "\n".join(parts)

    def events(self, name: str) -> dict[str, dict]:
        """The log's `name` lines by request_id."""
        lines = self.log_file.read_text().splitlines() if self.log_file.exists() else []
        events = (json.loads(line) for line in lines if f'"{name}"' in line)
        return {e["request_id"]: e for e in events if e.get("event") == name and "request_id" in e}


# ---- served modes ------------------------------------------------------------------------
async def stream_one(client: AsyncClient, request_id: str, prompt: list[int], max_tokens: int) -> Sample:
    sample = Sample(request_id, perf_counter())
    async for chunk in client.stream(prompt_token_ids=prompt, request_id=request_id, max_tokens=max_tokens,
                                     temperature=0.0, ignore_eos=True):  # fmt: skip
        if chunk.token_ids:
            sample.chunk_times.append(perf_counter())
            sample.chunk_tokens.append(len(chunk.token_ids))
            sample.token_ids += chunk.token_ids
    return sample


async def served_mode(client: AsyncClient, name: str, tag: str, work: Workload, delays: list[float],
                      limit: int) -> ModeResult:  # fmt: skip
    """Each request starts `delays[i]` s after the mode's start, with at most `limit` streams open.

    Request ids are `<tag>-<i>` (for `kvd trace` on the daemon's log)."""
    prompts, max_tokens = work
    sem = asyncio.Semaphore(limit)

    async def one(i: int) -> Sample:
        await asyncio.sleep(delays[i])
        async with sem:
            return await stream_one(client, f"{tag}-{i}", prompts[i], max_tokens[i])

    start = perf_counter()
    tasks = [asyncio.create_task(one(i)) for i in range(len(prompts))]
    try:
        samples = await asyncio.gather(*tasks)
    finally:
        for t in tasks:  # after a failure: the others abort their requests
            t.cancel()
    wall = max(s.chunk_times[-1] for s in samples) - start
    outputs = [s.token_ids for s in samples]
    check_lengths(name, outputs, max_tokens)
    log.info("bench_mode_done", mode=name, seconds=round(wall, 1))
    return ModeResult(name, wall, sum(max_tokens), outputs, samples, count_bursts(samples))


def poisson_delays(n: int, rate: float, seed: int) -> list[float]:
    """Arrival offsets: the first at 0, then exponential gaps of mean 1/rate (all 0 for inf)."""
    rng = random.Random(seed)
    delays = [0.0]
    for _ in range(n - 1):
        delays.append(delays[-1] + (0.0 if math.isinf(rate) else rng.expovariate(rate)))
    return delays


def mode_specs(cfg: BenchConfig, n: int) -> list[tuple[str, str, list[float], int]]:
    """(name, request-id tag, arrival delays, stream limit) of every served mode, in order."""
    specs = [(ALL_AT_ONCE if math.isinf(rate) else f"poisson {rate:g} req/s", f"rate-{rate:g}",
              poisson_delays(n, rate, cfg.seed), n) for rate in cfg.rates]  # fmt: skip
    return specs + [(f"{cfg.concurrency} concurrent streams", f"streams-{cfg.concurrency}", [0.0] * n, cfg.concurrency)]


async def served_modes(endpoint: str, work: Workload, warm: Workload, cfg: BenchConfig) -> tuple[list, dict]:
    """Every served mode in turn over one client; returns the results and the daemon's status."""
    async with AsyncClient(endpoint) as client:
        await served_mode(client, "warm-up", "warmup", warm, [0.0] * len(warm[0]), len(warm[0]))
        results = []
        for name, tag, delays, limit in mode_specs(cfg, len(work[0])):
            results.append(await served_mode(client, name, tag, work, delays, limit))
        return results, await client.status()


# ---- report ----------------------------------------------------------------------------
def render_table(modes: list[ModeResult]) -> str:
    lines = ["| Mode | req/s | output tok/s | TTFT ms p50/p90/p99 | TPOT ms p50/p90/p99 | ITL ms p50/p90/p99"
             " | e2e ms p50/p90/p99 |", "|---|--:|--:|--:|--:|--:|--:|"]  # fmt: skip
    for m in modes:
        s = m.samples
        tpots = [t for t in (x.tpot for x in s) if t is not None]
        cells = [percentiles_ms(v) for v in ([x.ttft for x in s], tpots, [i for x in s for i in x.itls],
                                             [x.e2e for x in s])]  # fmt: skip
        lines.append(f"| {m.name} | {m.req_s:.2f} | {m.tok_s:.1f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def overhead_note(m: ModeResult, finished: dict[str, dict], first: dict[str, dict]) -> str:
    """Client-side minus daemon-side latency (the daemon's clock starts when it reads the request)."""
    e2e = [s.e2e * 1e3 - finished[s.request_id]["since_arrival_ms"] for s in m.samples if s.request_id in finished]
    ttft = [s.ttft * 1e3 - first[s.request_id]["since_arrival_ms"] for s in m.samples if s.request_id in first]
    if not e2e or not ttft:
        return f"{m.name}: no daemon log lines for its requests"
    return (f"{m.name}: client − daemon latency, median: TTFT {statistics.median(ttft):.1f} ms,"
            f" e2e {statistics.median(e2e):.1f} ms (transport and client)")  # fmt: skip


def step_note(m: ModeResult, ref: ModeResult) -> str:
    return (f"{m.name}: {m.steps} steps (bursts of chunks at the client), {m.wall / m.steps * 1e3:.1f} ms/step;"
            f" {ref.name}: {ref.steps} steps, {ref.wall / ref.steps * 1e3:.1f} ms/step")  # fmt: skip


def headline_pairs(offline: list[ModeResult], served: list[ModeResult]) -> list[tuple[ModeResult, ModeResult]]:
    """(served, offline) pairs that do the same work: N streams vs max_num_seqs=N, all at once vs 64."""
    off_all, off_conc = offline
    return [(served[-1], off_conc), (next(m for m in served if m.name == ALL_AT_ONCE), off_all)]


def notes(cfg: BenchConfig, work: Workload, offline: list[ModeResult], served: list[ModeResult],
          daemon: ServedDaemon, status: dict, load_start: float) -> list[str]:  # fmt: skip
    prompts, max_tokens = work
    off_conc = offline[1]
    finished, first = daemon.events("request_finished"), daemon.events("first_token")
    multi = sum(n > 1 for m in served for s in m.samples for n in s.chunk_tokens)
    same = ", ".join(f"{m.name} {sum(a == b for a, b in zip(m.outputs, off_conc.outputs))}/{len(prompts)}"
                     for m in served)  # fmt: skip
    return [
        f"requests: {len(prompts)}, prompts {cfg.prompt[0]}-{cfg.prompt[1]} tokens ({sum(map(len, prompts))} in all),"
        f" max_tokens {cfg.max_tokens[0]}-{cfg.max_tokens[1]} ({sum(max_tokens)} requested tokens), greedy,"
        f" ignore_eos; seed {cfg.seed}; the same set in every mode; prefix caching off on both sides",
        f"daemon: max_num_seqs {cfg.max_num_seqs}, one AsyncClient, streaming; {multi} chunks carried more than"
        f" one token (ITL is per chunk); preemptions {status.get('preemptions')},"
        f" prefix-cache hit rate {status.get('prefix_hit_rate', 0.0):.1%}; exit code after SIGTERM"
        f" {daemon.proc.returncode}",
        *(overhead_note(m, finished, first) for m in served),
        *(step_note(m, ref) for m, ref in headline_pairs(offline, served)),
        f"greedy outputs identical to {off_conc.name}: {same}",
        f"load average (1 min): {load_start:.2f} at the start, {os.getloadavg()[0]:.2f} at the end;"
        f" other work on the machine skews every figure",
    ]


def ratio_lines(offline: list[ModeResult], served: list[ModeResult]) -> list[str]:
    (conc, off_conc), (inf, off_all) = headline_pairs(offline, served)
    return [
        f"**{conc.name} / {off_conc.name}: {conc.tok_s / off_conc.tok_s:.3f}** output tok/s (target ≥ 0.95)",
        f"{inf.name} / {off_all.name}: {inf.tok_s / off_all.tok_s:.3f} output tok/s",
    ]


def render(info: dict[str, str], quick: bool, offline: list, served: list, notes_: list[str]) -> str:
    machine = ", ".join(f"{k} {v}" for k, v in info.items())
    parts = [f"Configuration: {'quick' if quick else 'full'}; machine: {machine}.", render_table(offline + served),
             "\n".join(f"- {line}" for line in ratio_lines(offline, served)),
             "\n".join(f"- {note}" for note in notes_)]  # fmt: skip
    return "\n\n".join(parts)


# ---- entry -------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m kvd.bench.serve", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes for development; never recorded")
    parser.add_argument("--no-record", action="store_true", help=f"do not append to {RECORD_PATH}")
    return parser.parse_args(argv)


def make_workloads(cfg: BenchConfig) -> tuple[Workload, Workload]:
    """The request set and a small warm-up set (fresh offsets) from the seeded prompt source."""
    from kvd.worker.models import load_tokenizer, resolve_model

    src = PromptSource(load_tokenizer(resolve_model(None)), seed=cfg.seed)
    work = src.workload(cfg.requests, cfg.prompt, cfg.max_tokens)
    return work, src.workload(cfg.warmup_requests, cfg.prompt, (8, 16))


def run_served(cfg: BenchConfig, work: Workload, warm: Workload, workdir: Path) -> tuple[list, ServedDaemon, dict]:
    """Start the daemon, run every mode, stop it; on failure print its log tail and exit 1."""
    daemon = ServedDaemon(workdir, cfg.max_num_seqs)
    try:
        served, status = asyncio.run(served_modes(daemon.start(), work, warm, cfg))
    except (DaemonError, KvdError, RuntimeError) as e:
        print(f"kvd bench serve: {e}\n{daemon.log_tail()}", file=sys.stderr)
        sys.exit(1)
    except BaseException:
        print(daemon.log_tail(), file=sys.stderr)
        raise
    finally:
        daemon.stop()
    return served, daemon, status


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    cfg = QUICK if args.quick else FULL
    info = machine_info()
    load_start = os.getloadavg()[0]
    date = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    work, warm = make_workloads(cfg)
    offline = [offline_mode(work, warm, n) for n in (cfg.max_num_seqs, cfg.concurrency)]
    with tempfile.TemporaryDirectory(prefix="kvd-bench-serve-") as tmp:
        served, daemon, status = run_served(cfg, work, warm, Path(tmp))
        body = render(info, args.quick, offline, served, notes(cfg, work, offline, served, daemon, status, load_start))
    print(f"\n# kvd serving benchmark — {date}\n\n{body}")
    if not (args.no_record or args.quick):
        record(RECORD_PATH, f"Serving, {date}, {machine_summary(info)}", body)
        print(f"\nrecorded in {RECORD_PATH}")


if __name__ == "__main__":
    main(sys.argv[1:])
