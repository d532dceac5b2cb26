"""The latency `kvd route` adds: the same short requests straight to an instance and through a router.

    python -m kvd.bench.route --overhead [--requests 50] [--max-tokens 1] [--chat] [--streams 1] [--zmq] [--pin]
                                         [--think-ms 0]

One unified instance (the embedded model, HTTP and KV events on, random loopback ports,
`--threads` torch threads: 0 every core) and one router in front of it. `--streams`
concurrent streams each send the same short completion (or chat) `--requests` times straight
to the instance and as many through the router, alternating the two paths request by request
(stream k starting with path k mod 2), each next request as soon as the last is answered,
over one keep-alive aiohttp session per path (as a client would hold; `--zmq`: one
kvd.client.AsyncClient per path, the ZeroMQ client API): both paths see the same load from
the other streams and share the machine's drift. Each stream's first requests warm both
paths and are not counted. Prints each path's p50 and p90
and the p50 difference (the issue's target: ≤ 1 ms), and the router process's CPU time
per request (user + system: what the hop costs, apart from waiting for a core). Not recorded; about 30 s, most of it the
instance's start.

`--pin` gives the router a core of its own, as it is deployed: the instance (every process it
starts) runs on the first CPU of this process's affinity with one torch thread, the router and
this load client on the second. Without it all three share every CPU, and on a machine with
as few cores as the instance computes on, what the router adds is mostly its wait for a core.

`--think-ms T`: each stream waits a random 0-T ms (seeded per stream, one distribution for both paths)
before each request. Without it a stream's next request follows its answer at once, and
answers leave the instance at the end of a step: a direct request then reaches the
scheduler before it builds the next step, a routed one (four more hops) more often after,
and waits a whole step. That phase is the closed loop's, not a cost of the hop; a spread of
arrivals of a few steps takes it out (measured: +7.3 ms without, +1.4 ms with 40 ms).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import statistics
import tempfile
import time
from pathlib import Path

import aiohttp
import psutil

from kvd.spawn import daemon_env, start_kvd, wait_endpoint

WARMUP = 5


def _start(args: list[str], config: Path, text: str, endpoint: Path, workdir: Path):
    config.write_text(text)
    proc = start_kvd([*args, "--config", str(config)], daemon_env(), workdir / f"{config.stem}.out")
    return proc, wait_endpoint(proc, endpoint, 180, workdir / f"{config.stem}.out")


async def measure(direct: str, routed: str, body: dict, path: str, n: int, streams: int, zmq: bool,
                  think_s: float = 0.0) -> tuple[list[float], list[float]]:  # fmt: skip
    """Per-request seconds of each path, `streams` streams alternating the paths."""
    from kvd.client import AsyncClient

    times: dict[str, list[float]] = {direct: [], routed: []}
    async with contextlib.AsyncExitStack() as stack:
        if zmq:
            clients = {url: await stack.enter_async_context(AsyncClient(url, timeout=120)) for url in times}
        else:
            clients = {url: await stack.enter_async_context(aiohttp.ClientSession()) for url in times}

        async def one(url: str) -> float:
            t0 = time.perf_counter()
            if zmq:
                await clients[url].generate(**body)
                return time.perf_counter() - t0
            async with clients[url].post(url + path, json=body) as r:
                answer = await r.read()
            if r.status != 200:
                raise SystemExit(f"route bench: {url}{path} answered {r.status}: {answer[:300]!r}")
            return time.perf_counter() - t0

        async def worker(k: int) -> None:
            # Each stream alternates the paths, so both see the same load from the others.
            rng = random.Random(k)
            for i in range(2 * (WARMUP + n)):
                url = (direct, routed)[(i + k) % 2]
                if think_s:
                    await asyncio.sleep(rng.uniform(0, think_s))
                took = await one(url)
                if i >= 2 * WARMUP:
                    times[url].append(took)

        await asyncio.gather(*(worker(k) for k in range(streams)))
    return times[direct], times[routed]


def _p(values: list[float], q: int) -> float:
    return 1000 * statistics.quantiles(values, n=100)[q - 1]


def _added_interval(direct: list[float], routed: list[float], rounds: int = 400) -> tuple[float, float]:
    """A 95% bootstrap interval of the p50 difference (ms): the noise of the figure."""
    rng = random.Random(0)
    diffs = sorted(_p(rng.choices(routed, k=len(routed)), 50) - _p(rng.choices(direct, k=len(direct)), 50)
                   for _ in range(rounds))  # fmt: skip
    return diffs[rounds * 25 // 1000], diffs[rounds * 975 // 1000]


@contextlib.contextmanager
def _on(cpus: set[int] | None):
    """This process (and what it starts meanwhile: children inherit it) on `cpus`; None: as it is."""
    before = os.sched_getaffinity(0)
    if cpus is not None:
        os.sched_setaffinity(0, cpus)
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


def run(requests: int, max_tokens: int, chat: bool, streams: int = 1, zmq: bool = False, threads: int = 0,
        pin: bool = False, think_ms: float = 0.0) -> None:  # fmt: skip
    """Measure and print (kvd.bench.route --overhead)."""
    cpus = sorted(os.sched_getaffinity(0))
    if pin and len(cpus) < 2:
        raise SystemExit(f"route bench: --pin needs two CPUs, this process may run on {len(cpus)}")
    instance_cpus, router_cpus = ({cpus[0]}, {cpus[1]}) if pin else (None, None)
    threads = 1 if pin else threads
    with tempfile.TemporaryDirectory(prefix="kvd-bench-route-") as tmp, _on(router_cpus):
        workdir = Path(tmp)
        inst_run, route_run = workdir / "instance", workdir / "route"
        with _on(instance_cpus):
            inst, url = _start(["serve"], workdir / "instance.toml",
                               f'[daemon]\nrun_dir = "{inst_run}"\n[model]\ndtype = "float32"\nthreads = {threads}\n'
                               f'[http]\nport = 0\n[kv_events]\nport = 0\n'
                               f'[log]\nformat = "json"\nfile = "{workdir}/instance.log"\n',
                               inst_run / "http_endpoint", workdir)  # fmt: skip
        router = None
        try:
            router, routed = _start(["route"], workdir / "route.toml",
                                    f'[daemon]\nrun_dir = "{route_run}"\n[http]\nport = 0\n[log]\nformat = "json"\n'
                                    f'file = "{workdir}/route.log"\n[route]\n'
                                    f'instances = [{{name = "a", run_dir = "{inst_run}"}}]\n',
                                    route_run / "http_endpoint", workdir)  # fmt: skip
            text = "Say hello in one word."
            if zmq:  # the instance's and the router's client endpoints instead
                url, routed = ((d / "endpoint").read_text().strip() for d in (inst_run, route_run))
                path, body = "zeromq", {"chat": [{"role": "user", "content": text}]} if chat else {"prompt": text}
            elif chat:
                path, body = "/v1/chat/completions", {"messages": [{"role": "user", "content": text}]}
            else:
                path, body = "/v1/completions", {"prompt": text}
            body |= {"max_tokens": max_tokens, "temperature": 0}
            cpu = psutil.Process(router.pid).cpu_times
            before = sum(cpu()[:2])
            direct_s, routed_s = asyncio.run(measure(url, routed, body, path, requests, streams, zmq, think_ms / 1000))
            router_cpu_ms = 1000 * (sum(cpu()[:2]) - before) / (2 * (WARMUP + requests) * streams)
        finally:
            for proc in (router, inst):
                if proc is not None:
                    proc.terminate()
                    proc.wait(30)
    d50, r50 = _p(direct_s, 50), _p(routed_s, 50)
    print(f"{path}{', chat' if chat and zmq else ''}, {streams} stream(s) x {requests} requests per path, "
          f"alternating, max_tokens {max_tokens}" + (f", think 0-{think_ms:g} ms" if think_ms else "")
          + (f"; instance on CPU {cpus[0]} (1 thread), router and client on CPU {cpus[1]}:" if pin else ":"))
    print(f"  direct   p50 {d50:.2f} ms  p90 {_p(direct_s, 90):.2f} ms")
    print(f"  routed   p50 {r50:.2f} ms  p90 {_p(routed_s, 90):.2f} ms")
    lo, hi = _added_interval(direct_s, routed_s)
    print(f"  added    p50 {r50 - d50:+.2f} ms (95% interval {lo:+.2f} to {hi:+.2f}; target <= 1 ms); "
          f"the router's CPU: {router_cpu_ms:.2f} ms per request")
