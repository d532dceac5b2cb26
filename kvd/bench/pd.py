"""PD benchmark: 1 prefill + 1 decode against a unified instance on the same requests, in one run.

    python -m kvd.bench.pd [--prompt-tokens 1000] [--requests 6] [--quick]   (or `kvd bench pd`)

Three `kvd serve` processes on the embedded SmolLM2-135M (CPU float32), started with
`kvd.launch.Deployment` and the local pool (LMDB): a unified instance, and a prefill +
decode pair. The prefill instance has `prefix_from_pool = true` and its local prefix
cache off, so a prompt whose leading blocks are in the pool is read, never recomputed
from its own cache. Only one side runs at a time. For TTFT (one request at a time, so only
one instance computes at once) every instance uses every core; for throughput, where
prefill and decode run together, the pair is restarted with half the cores each
(`model.threads`), as two instances on one host should be configured — OpenMP threads of
two processes on the same cores spin against each other.

- TTFT, one request at a time, unique prompts of `--prompt-tokens` tokens: unified vs PD,
  and the handoff's parts from the instances' logs: the prefill's pool write (before the
  first token leaves) and the decode's read (after it, overlapping the client's first
  token). Target: PD adds ≤ 15% to TTFT for 1,000-token prompts.
- Throughput: `--requests` at once, 32 output tokens each, unified vs PD.
- Cross-instance prefix reuse: a prompt whose first 15/16 are in the pool (written by an
  earlier request) vs the same length cold: TTFT gain.
The pool's own bandwidth against memcpy is `python -m kvd.bench.pool` (also in `make bench`).
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import os
import signal
import statistics
import tempfile
import time
from pathlib import Path

from kvd.client import AsyncClient


def log_records(path: Path) -> list[dict]:
    out = []
    for line in path.read_text().splitlines():
        if line.startswith("{"):
            try:
                out.append(json.loads(line))
            except ValueError:
                pass
    return out


async def ttft(endpoint: str, prompt: list[int], max_tokens: int = 4) -> tuple[float, float, str]:
    async with AsyncClient(endpoint, timeout=600) as c:
        t0 = time.perf_counter()
        first = None
        request_id = None
        async for chunk in c.stream(prompt_token_ids=prompt, max_tokens=max_tokens, temperature=0.0, ignore_eos=True):
            request_id = chunk.request_id
            if first is None and chunk.token_ids:
                first = time.perf_counter() - t0
        return first, time.perf_counter() - t0, request_id


async def throughput(endpoint: str, prompts: list[list[int]], max_tokens: int) -> float:
    async def one(p):
        async with AsyncClient(endpoint, timeout=600) as c:
            await c.generate(prompt_token_ids=p, max_tokens=max_tokens, temperature=0.0, ignore_eos=True)

    t0 = time.perf_counter()
    await asyncio.gather(*(one(p) for p in prompts))
    return len(prompts) * max_tokens / (time.perf_counter() - t0)


@functools.cache
def _source():
    from kvd.bench.offline import PromptSource
    from kvd.worker.models import load_tokenizer, resolve_model

    return PromptSource(load_tokenizer(resolve_model(None, None)), seed=0)


def prompt_set(n: int, length: int, salt: int) -> list[list[int]]:
    """Token-id slices of real English at distinct offsets (no two share a prefix)."""
    return [_source().prompt(length) for _ in range(n)]


def start_pd(dep, extra: dict[str, str], deadline: float) -> tuple[Path, Path]:
    """A prefill (prefix_from_pool on, local prefix cache off) and a decode instance."""
    p = dep.start_instance("prefill-0", "prefill", {"KVD_PD_PREFIX_FROM_POOL": "true",
                                                     "KVD_CACHE_ENABLE_PREFIX_CACHING": "false", **extra})  # fmt: skip
    dep.wait_ready(["prefill-0"], deadline)
    d = dep.start_instance("decode-0", "decode", {"KVD_PD_PREFILL_ENDPOINTS": f'["{p}"]', **extra})
    dep.wait_ready(["decode-0"], deadline)
    return p, d


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompt-tokens", type=int, default=1000)
    ap.add_argument("--requests", type=int, default=6)
    ap.add_argument("--trials", type=int, default=4)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args(argv)
    if args.quick:
        args.trials, args.requests, args.prompt_tokens = 2, 4, 400

    from kvd.launch import Deployment

    run_dir = Path(tempfile.mkdtemp(prefix="kvd-bench-pd-"))
    dep = Deployment(run_dir, "local", None)
    try:
        dep.start_pool()
        t_start = time.monotonic() + 900
        u = dep.start_instance("unified", "unified", {})
        p, d = start_pd(dep, {}, t_start)
        dep.wait_ready(["unified"], t_start)
        eu, ed = (u / "endpoint").read_text().strip(), (d / "endpoint").read_text().strip()
        time.sleep(2.0)  # the decode instance's first heartbeat round trip

        n = args.prompt_tokens
        warm = prompt_set(1, 64, salt=9)[0]
        for e in (eu, ed):
            asyncio.run(ttft(e, warm))
        # TTFT, one at a time; each side gets its own unique prompts (no cache helps either).
        tt_u = [asyncio.run(ttft(eu, q))[0] for q in prompt_set(args.trials, n, salt=1)]
        pd_runs = [asyncio.run(ttft(ed, q)) for q in prompt_set(args.trials, n, salt=2)]
        tt_pd = [r[0] for r in pd_runs]
        request_ids = {r[2] for r in pd_runs}
        drecs = [r for r in log_records(d / "kvd.log") if r.get("request_id") in request_ids]
        write_ms = [r["write_ms"] for r in drecs if r["event"] == "prefill_done"]
        read_ms = [r["duration_ms"] for r in drecs if r["event"] == "kv_read"]
        admit_ms = [r["duration_ms"] for r in drecs if r["event"] == "kv_admitted"]
        # Cross-instance prefix reuse: the pool holds the first 15/16 of the prompt (written by
        # an earlier request with another tail) vs a cold prompt of the same length.
        keep = n * 15 // 16
        cold, warm_gain = [], []
        for i, base in enumerate(prompt_set(args.trials, n, salt=5)):
            cold.append(asyncio.run(ttft(ed, base))[0])
            other_tail = base[:keep] + [(t + 1) % 49000 + 10 for t in base[keep:]]
            warm_gain.append(asyncio.run(ttft(ed, other_tail))[0])
        # Throughput, all at once; prefill and decode now run together, so they split the cores.
        tp_u = asyncio.run(throughput(eu, prompt_set(args.requests, n, salt=3), 32))
        for name in ("decode-0", "prefill-0"):
            proc = dep.procs.pop(name)
            proc.send_signal(signal.SIGTERM)
            proc.wait(60)
        half = {"KVD_MODEL_THREADS": str(max(1, (os.cpu_count() or 2) // 2))}
        p, d = start_pd(dep, half, time.monotonic() + 900)
        ed = (d / "endpoint").read_text().strip()
        time.sleep(2.0)
        asyncio.run(ttft(ed, warm))
        tp_pd = asyncio.run(throughput(ed, prompt_set(args.requests, n, salt=4), 32))
        med = statistics.median
        mu, mpd = med(tt_u), med(tt_pd)
        print(f"# PD benchmark: {n}-token prompts, {args.trials} trials, 1P1D (local pool) vs unified")
        print(f"TTFT unified   : {mu * 1e3:8.1f} ms (median)")
        print(f"TTFT PD 1P1D   : {mpd * 1e3:8.1f} ms (median)   PD / unified = {mpd / mu:.3f}"
              f"  (added {100 * (mpd - mu) / mu:+.1f}%, target <= +15%)")  # fmt: skip
        if write_ms:
            print(f"handoff: pool write {med(write_ms):.1f} ms (before the first token: "
                  f"{100 * med(write_ms) / 1e3 / mpd:.1f}% of PD TTFT); read {med(read_ms):.1f} ms and admission "
                  f"{med(admit_ms):.1f} ms after PrefillDone (overlapping the first token's delivery)")  # fmt: skip
        print(f"throughput ({args.requests} at once, 32 tokens each; PD instances on half the cores each): "
              f"unified {tp_u:.1f} tok/s, PD {tp_pd:.1f} tok/s,"
              f" PD / unified = {tp_pd / tp_u:.2f}")  # fmt: skip
        print(f"prefix from pool ({keep}/{n} tokens in the pool): TTFT {med(warm_gain) * 1e3:.1f} ms vs cold "
              f"{med(cold) * 1e3:.1f} ms: {med(cold) / med(warm_gain):.2f}x faster")  # fmt: skip
    finally:
        dep.stop()


if __name__ == "__main__":
    main()
