"""Soak: thousands of requests against a real daemon under faults, then the books must balance.

    python -m kvd.bench.soak [--requests 10000] [--pd] [--pool local|redis] [--seed 0] [--no-record]
    (or `kvd bench soak ...`)

A real `kvd serve` (or, with --pd, a `kvd launch pd` deployment) on loopback, the
embedded model, short greedy outputs (1–8 tokens) over a fixed set of prompts, so prefix
caching is busy and every completed request has a known answer. Clients run
`concurrency` at a time; each request draws what happens to it (seeded):

- a plain request; it must finish token-identical to the offline engine (a divergence at a
  near tie of the reference's top-2 logprobs is not a mismatch);
- aborted by its client after its first chunk, or as soon as it is sent;
- its client disconnects mid-stream (the socket closes);
- sent with the request id of a request that is still live (from another client): refused;
- a malformed frame on the client port, which must get its one Error back.

Beside them, on a schedule: malformed frames on the daemon's internal report channel,
kill -9 of the worker and (PD) of the messenger at random moments (the daemon restarts them;
requests in flight fail with 500 or 502, new ones get 503 meanwhile), and in PD mode
kill -9 of the pool's server (Redis, restarted on its port) and a prefill instance frozen
(SIGSTOP) past the lease, so handoffs in flight expire.

Every request must get its final message within its deadline: a client that times out is
a hang. At the end, with every instance idle: 0 leaked blocks, integrity ok, 0 hangs, 0
mismatches, and `kvd trace` must name the right cause for a sample of the failed and
aborted requests. The counts go to stdout and, unless --no-record, to docs/reliability.md.
`soak()` is the same run for a test, with smaller numbers.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import glob
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path

import msgspec
import zmq
import zmq.asyncio

from kvd.client import AsyncClient, Client, KvdError
from kvd.ipc import ipc_base
from kvd.messages import ServerMessage
from kvd.spawn import DaemonError, daemon_env, start_kvd, wait_endpoint

RECORD_PATH = Path("docs/reliability.md")
START_TIMEOUT_S = 300.0
TIE_GAP = 1e-3  # the reference's own top-2 logprob gap below which batch shape may flip a token


@dataclass(frozen=True)
class SoakConfig:
    requests: int = 10_000
    concurrency: int = 32
    max_tokens: tuple[int, int] = (1, 8)
    prompts: int = 48  # distinct prompts (16-96 tokens); repeats exercise the prefix cache
    abort: float = 0.04
    disconnect: float = 0.03
    duplicate: float = 0.02
    malformed: float = 0.02
    internal_junk_every: int = 500  # requests between bursts of junk on the internal channel
    kill_worker_every: int = 2500
    kill_messenger_every: int = 3300
    kill_pool_every: int = 2000  # PD with a Redis pool
    freeze_prefill_every: int = 2900  # PD: SIGSTOP a prefill instance past the lease
    request_timeout_s: float = 60.0
    seed: int = 0
    pd: bool = False
    pool: str = "redis"
    dtype: str = "float32"  # daemon and references alike: float32 output is batch-invariant enough to compare


@dataclass
class Report:
    config: SoakConfig
    outcomes: Counter = field(default_factory=Counter)
    faults: Counter = field(default_factory=Counter)
    mismatches: list[str] = field(default_factory=list)
    hangs: list[str] = field(default_factory=list)
    trace_checks: list[tuple[str, str, bool]] = field(default_factory=list)  # (request id, expected, ok)
    leaked_blocks: int = -1
    integrity: str = "not checked"
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return (not self.hangs and not self.mismatches and self.leaked_blocks == 0 and self.integrity == "ok"
                and all(ok for _, _, ok in self.trace_checks))  # fmt: skip


# ---- the deployment ------------------------------------------------------------------------
class Target:
    """A unified daemon or a PD deployment under test, as subprocesses; stopped by PID."""

    def __init__(self, cfg: SoakConfig, workdir: Path) -> None:
        self.cfg = cfg
        self.workdir = workdir
        self.run_dir = workdir / "run"
        self.proc: subprocess.Popen | None = None
        conf = workdir / "kvd.toml"
        conf.write_text(
            f"[daemon]\nmax_worker_restarts = 100000\nrequest_timeout_s = {cfg.request_timeout_s}\n"
            "integrity_check_interval_s = 1.0\n[scheduler]\nmax_num_seqs = 32\n"
            f'[model]\ndtype = "{cfg.dtype}"\n' + ("threads = 1\n" if cfg.pd else "")
            + ('[log]\nformat = "json"\n' if cfg.pd else f'[log]\nformat = "json"\nfile = "{workdir / "kvd.log"}"\n')
            + ("[pd]\nlease_s = 6.0\nheartbeat_timeout_s = 3.0\n" if cfg.pd else "")
        )  # fmt: skip
        self.config = conf

    def start(self) -> str:
        if self.cfg.pd:
            args = ["launch", "pd", "--pool", self.cfg.pool, "--run-dir", str(self.run_dir), "--config", str(self.config)]
        else:
            args = ["serve", "--config", str(self.config), "--run-dir", str(self.run_dir)]
        self.proc = start_kvd(args, daemon_env(), self.workdir / "stdout.txt")
        try:
            return wait_endpoint(self.proc, self.run_dir / "endpoint", START_TIMEOUT_S)
        except DaemonError as e:
            raise RuntimeError(f"soak: the deployment did not start ({e}; see {self.workdir}/stdout.txt)") from None

    @property
    def logs(self) -> list[str]:
        return sorted(glob.glob(str(self.run_dir / "*" / "kvd.log"))) if self.cfg.pd else [str(self.workdir / "kvd.log")]

    def instances(self) -> list[str]:
        """Client endpoints of every instance (PD: decode and prefill)."""
        if not self.cfg.pd:
            return [(self.run_dir / "endpoint").read_text().strip()]
        return [Path(p).read_text().strip() for p in sorted(glob.glob(str(self.run_dir / "*" / "endpoint")))]

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(90)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


# ---- the references ------------------------------------------------------------------------
def make_prompts(cfg: SoakConfig) -> list[list[int]]:
    from kvd.bench.offline import PromptSource
    from kvd.worker.models import load_tokenizer, resolve_model

    src = PromptSource(load_tokenizer(resolve_model(None)), seed=cfg.seed)
    return src.workload(cfg.prompts, (16, 96), cfg.max_tokens)[0]


def references(prompts: list[list[int]], max_tokens: int, dtype: str):
    from kvd import LLM, SamplingParams

    llm = LLM(dtype=dtype)
    return llm.generate(prompts, SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True, logprobs=2),
                        use_tqdm=False)  # fmt: skip


def matches(got: list[int], ref, n: int) -> bool:
    """Token-identical to the reference's first n tokens, or diverging only after a near tie."""
    if len(got) != n:
        return False
    for step, (a, b) in enumerate(zip(got, ref.token_ids)):
        if a != b:
            lp = ref.logprobs[step].top_logprobs
            return lp[0] - lp[1] < TIE_GAP
    return True


# ---- load ----------------------------------------------------------------------------------
class Soak:
    """The clients, the fault schedule and the books of one run."""

    def __init__(self, cfg: SoakConfig, target: Target, endpoint: str, prompts, refs) -> None:
        self.cfg = cfg
        self.target = target
        self.endpoint = endpoint
        self.prompts = prompts
        self.refs = refs
        self.report = Report(cfg)
        self.rng = random.Random(cfg.seed)
        self.next_index = 0
        self.live: dict[str, asyncio.Task] = {}  # request ids streaming now (duplicates borrow one)
        self.failed: dict[str, tuple[int, str]] = {}  # request id -> (code, message), for the trace sample
        self.aborted: list[str] = []
        self.client_timeout = cfg.request_timeout_s + 30.0

    async def run(self) -> Report:
        t0 = time.monotonic()
        clients = [AsyncClient(self.endpoint, timeout=self.client_timeout) for _ in range(self.cfg.concurrency)]
        for c in clients:
            await c.__aenter__()
        try:
            await asyncio.gather(*(self.worker(c) for c in clients))
        finally:
            for c in clients:
                await c.close()
        self.report.seconds = time.monotonic() - t0
        return self.report

    async def worker(self, client: AsyncClient) -> None:
        while self.next_index < self.cfg.requests:
            i = self.next_index
            self.next_index += 1
            await self.faults(i)
            kind = self.draw()
            await getattr(self, f"do_{kind}")(client, i)

    def draw(self) -> str:
        x = self.rng.random()
        for kind in ("abort", "disconnect", "duplicate", "malformed"):
            p = getattr(self.cfg, kind)
            if x < p:
                return kind
            x -= p
        return "plain"

    def request(self, i: int) -> tuple[str, int, list[int], int]:
        p = self.rng.randrange(len(self.prompts))
        n = self.rng.randint(*self.cfg.max_tokens)
        return f"soak-{self.cfg.seed}-{i}", p, self.prompts[p], n

    async def _stream(self, client: AsyncClient, request_id: str, prompt: list[int], n: int,
                      cut: int | None = None) -> tuple[list[int], str | KvdError | None]:  # fmt: skip
        """(tokens, end): end is the finish_reason, "cut" when we left after `cut` chunks, or
        the KvdError it failed with."""
        tokens: list[int] = []
        try:
            chunks = 0
            async for chunk in client.stream(prompt_token_ids=prompt, request_id=request_id, max_tokens=n,
                                             temperature=0.0, ignore_eos=True):  # fmt: skip
                tokens += chunk.token_ids
                chunks += 1
                if chunk.finish_reason is not None:
                    return tokens, chunk.finish_reason
                if cut is not None and chunks >= cut:
                    return tokens, "cut"
        except KvdError as e:
            return tokens, e
        return tokens, None

    async def _retrying(self, client: AsyncClient, request_id: str, prompt: list[int], n: int, cut: int | None = None):
        """`_stream`, sent again while the daemon says 503 (a worker restarting), as a client would."""
        deadline = time.monotonic() + 300
        while True:
            tokens, end = await self._stream(client, request_id, prompt, n, cut)
            if not (isinstance(end, KvdError) and end.code == 503) or time.monotonic() > deadline:
                return tokens, end
            self.report.outcomes["refused 503 while restarting (sent again)"] += 1
            await asyncio.sleep(0.25)

    def _hung(self, request_id: str, end) -> bool:
        if isinstance(end, KvdError) and end.code == 504 and end.message.startswith("no reply from"):
            self.report.hangs.append(request_id)
            self.report.outcomes["HUNG (no final message within the deadline)"] += 1
            return True
        return False

    def settle(self, request_id: str, end, tokens: list[int], p: int, n: int) -> None:
        books = self.report.outcomes
        if self._hung(request_id, end):
            return
        if isinstance(end, KvdError):
            books[f"failed {end.code}"] += 1
            self.failed[request_id] = (end.code, end.message)
        elif matches(tokens, self.refs[p], n):
            books["completed, identical to the offline engine"] += 1
        else:
            books["completed, MISMATCH"] += 1
            self.report.mismatches.append(request_id)

    async def do_plain(self, client: AsyncClient, i: int) -> None:
        request_id, p, prompt, n = self.request(i)
        tokens, end = await self._retrying(client, request_id, prompt, n)
        self.settle(request_id, end, tokens, p, n)

    async def do_abort(self, client: AsyncClient, i: int) -> None:
        request_id, p, prompt, n = self.request(i)
        if self.rng.random() < 0.5:  # by an explicit Abort, a moment after it is sent
            task = asyncio.ensure_future(self._stream(client, request_id, prompt, max(n, 4)))
            await asyncio.sleep(self.rng.uniform(0.0, 0.05))
            await client.abort(request_id)
            _, end = await task
        else:  # after its first chunk: leaving the stream aborts it
            _, end = await self._retrying(client, request_id, prompt, max(n, 4), cut=1)
        if self._hung(request_id, end):
            return
        if end in ("abort", "cut"):
            self.report.outcomes["aborted by the client"] += 1
            self.aborted.append(request_id)
        else:  # finished before the abort arrived, or refused: not an abort
            self.report.outcomes["abort ignored (it came before the request, or after its end)"] += 1

    async def do_disconnect(self, client: AsyncClient, i: int) -> None:
        request_id, p, prompt, n = self.request(i)
        async with AsyncClient(self.endpoint, timeout=self.client_timeout) as own:
            _, end = await self._retrying(own, request_id, prompt, max(n, 4), cut=1)
        # closing `own` drops its connection: the daemon aborts what it still had
        if not self._hung(request_id, end):
            self.report.outcomes["client disconnected mid-stream"] += 1

    async def do_duplicate(self, client: AsyncClient, i: int) -> None:
        """A second request under the id of one that is streaming now, from another client."""
        request_id, p, prompt, n = self.request(i)
        async with AsyncClient(self.endpoint, timeout=self.client_timeout) as other:
            first = other.stream(prompt_token_ids=prompt, request_id=request_id, max_tokens=16, temperature=0.0,
                                 ignore_eos=True)  # fmt: skip
            try:
                chunk = await first.__anext__()  # it is live on the daemon now
            except KvdError as e:
                if not self._hung(request_id, e):  # refused or failed itself: nothing to test against
                    self.report.outcomes["duplicate test skipped (the first failed)"] += 1
                return
            if chunk.finish_reason is None:
                try:
                    await client.generate(prompt="duplicate", request_id=request_id, max_tokens=2)
                    self.report.outcomes["duplicate id ACCEPTED"] += 1
                    self.report.mismatches.append(f"{request_id} (a duplicate id was accepted)")
                except KvdError as e:
                    self.report.outcomes["duplicate id refused" if e.code == 400 else f"duplicate id: {e.code}"] += 1
            try:
                async for chunk in first:  # the first one goes on untouched
                    pass
            except KvdError as e:  # a fault of its own (a worker killed meanwhile), not the duplicate's
                self._hung(request_id, e)
            await first.aclose()

    async def do_malformed(self, client: AsyncClient, i: int) -> None:
        frame = self.rng.choice([self.rng.randbytes(self.rng.randint(1, 64)),
                                 msgspec.msgpack.encode({"type": "generate", "request_id": f"bad-{i}", "prompt": 5}),
                                 msgspec.msgpack.encode([1, 2, 3])])  # fmt: skip
        ctx = zmq.asyncio.Context()
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(self.endpoint)
        try:
            await sock.send(frame)
            if await sock.poll(int(self.client_timeout * 1000)):
                reply = msgspec.msgpack.decode(await sock.recv(), type=ServerMessage)
                self.report.outcomes[f"malformed frame answered {int(reply.code)}"] += 1
            else:
                self.report.hangs.append(f"malformed frame {i}")
        finally:
            sock.close(linger=0)
            ctx.term()

    # ---- scheduled faults ------------------------------------------------------------------
    async def faults(self, i: int) -> None:
        cfg = self.cfg
        if i and i % cfg.internal_junk_every == 0:
            self.internal_junk()
        if i and i % cfg.kill_worker_every == 0:
            self.kill_child("worker-0")
        if cfg.pd and i and i % cfg.kill_messenger_every == 0:  # only the PD roles run a messenger
            self.kill_child("messenger")
        if cfg.pd and cfg.pool == "redis" and i and i % cfg.kill_pool_every == 0:
            await self.kill_pool()
        if cfg.pd and i and i % cfg.freeze_prefill_every == 0:
            await self.freeze_prefill()

    def status(self, endpoint: str | None = None) -> dict:
        with Client(endpoint or self.endpoint, timeout=10) as c:
            return c.status()

    def internal_junk(self) -> None:
        pid = self.status()["processes"]["daemon"]["pid"]
        for path in glob.glob(str(ipc_base() / f"kvd-ipc-{pid}-*" / "reports")):
            ctx = zmq.Context()
            sock = ctx.socket(zmq.PUSH)
            sock.setsockopt(zmq.LINGER, 500)
            sock.connect(f"ipc://{path}")
            for _ in range(5):
                sock.send(self.rng.randbytes(self.rng.randint(0, 48)))
            sock.close()
            ctx.term()
            self.report.faults["junk frames on the internal report channel"] += 5

    def kill_child(self, name: str) -> None:
        endpoints = self.target.instances()
        endpoint = self.rng.choice(endpoints)
        with contextlib.suppress(KvdError):
            pid = self.status(endpoint)["processes"][name]["pid"]
            if pid:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
                    self.report.faults[f"kill -9 {name}"] += 1

    async def kill_pool(self) -> None:
        pids = [json.loads(line)["pid"] for line in (self.target.workdir / "stdout.txt").read_text().splitlines()
                if '"pool_server_started"' in line]  # fmt: skip
        for pid in pids[-1:]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGSTOP)  # a pool that stops answering, then comes back
                self.report.faults["pool server stopped for 3 s"] += 1
                await asyncio.sleep(3.0)
                os.kill(pid, signal.SIGCONT)

    async def freeze_prefill(self) -> None:
        for path in glob.glob(str(self.target.run_dir / "prefill-*" / "endpoint"))[:1]:
            with contextlib.suppress(KvdError, ProcessLookupError):
                pid = self.status(Path(path).read_text().strip())["processes"]["worker-0"]["pid"]
                os.kill(pid, signal.SIGSTOP)
                self.report.faults["prefill worker frozen past the lease"] += 1
                await asyncio.sleep(7.0)
                os.kill(pid, signal.SIGCONT)


# ---- the end -------------------------------------------------------------------------------
def settle_books(soak: Soak) -> None:
    """Wait until every instance is idle, then read the block books and trace a sample."""
    report = soak.report
    held, integrity = 0, "ok"
    for endpoint in soak.target.instances():
        with Client(endpoint, timeout=10) as c:
            deadline = time.monotonic() + 120
            while True:
                st = c.status()
                idle = st["live_requests"] == 0 and st["running"] == 0 and st["state"] in ("ready", "degraded")
                if idle and st["integrity"] != "not checked" and not any(st.get("pd", {}).get("in_flight", {}).values()):
                    break
                if time.monotonic() > deadline:
                    break
                time.sleep(0.5)
        held += st["blocks"]["held"]
        if st["integrity"] != "ok":
            integrity = st["integrity"]
    report.leaked_blocks, report.integrity = held, integrity
    check_traces(soak)


def check_traces(soak: Soak) -> None:
    from kvd import trace

    rng = random.Random(soak.cfg.seed + 1)
    sample = [(r, "ABORTED") for r in rng.sample(soak.aborted, min(10, len(soak.aborted)))]
    failed = sorted(soak.failed)
    for r in rng.sample(failed, min(20, len(failed))):
        code, message = soak.failed[r]
        sample.append((r, "REJECTED" if code in (400, 429) else "FAILED"))
    for request_id, expected in sample:
        verdict = trace.trace(request_id, soak.target.logs).verdict
        code, message = soak.failed.get(request_id, (None, ""))
        ok = verdict.startswith(expected)
        if ok and code == 500:  # a worker's death must be named as such
            ok = "died" in verdict or "worker_dead" in verdict
        if expected == "ABORTED" and verdict.startswith("FAILED at worker_dead"):
            ok = True  # the worker died with it before its abort was read: that is what happened
        soak.report.trace_checks.append((request_id, f"{expected}: {verdict[:140]}", ok))


def render(report: Report) -> str:
    cfg = report.config
    mode = f"PD ({cfg.pool} pool)" if cfg.pd else "unified"
    rows = [f"| {k} | {v} |" for k, v in sorted(report.outcomes.items())]
    rows += [f"| fault: {k} | {v} |" for k, v in sorted(report.faults.items())]
    traced = sum(ok for _, _, ok in report.trace_checks)
    lines = [
        f"{cfg.requests} requests, {mode}, {cfg.concurrency} clients at a time, max_tokens {cfg.max_tokens[0]}-"
        f"{cfg.max_tokens[1]}, seed {cfg.seed}; {report.seconds:.0f} s.",
        "",
        "| what | count |",
        "|---|--:|",
        *rows,
        f"| hangs (no final message within the deadline) | {len(report.hangs)} |",
        f"| mismatches against the offline engine | {len(report.mismatches)} |",
        f"| leaked blocks at the end | {report.leaked_blocks} |",
        f"| integrity at the end | {report.integrity} |",
        f"| `kvd trace` named the cause | {traced}/{len(report.trace_checks)} |",
        "",
        f"Verdict: {'PASS' if report.ok else 'FAIL'}.",
    ]
    bad = [f"- {r}: {v}" for r, v, ok in report.trace_checks if not ok]
    return "\n".join(lines + (["", "Traces that named the wrong cause:", *bad] if bad else []))


def soak(cfg: SoakConfig, workdir: Path) -> Report:
    """One whole run: start, load with faults, settle the books, stop."""
    prompts = make_prompts(cfg)
    refs = references(prompts, cfg.max_tokens[1], cfg.dtype)
    target = Target(cfg, workdir)
    try:
        endpoint = target.start()
        run = Soak(cfg, target, endpoint, prompts, refs)
        asyncio.run(run.run())
        settle_books(run)
        return run.report
    finally:
        target.stop()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="kvd bench soak", description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=SoakConfig.requests)
    parser.add_argument("--concurrency", type=int, default=SoakConfig.concurrency)
    parser.add_argument("--pd", action="store_true", help="a `kvd launch pd` deployment instead of one daemon")
    parser.add_argument("--pool", choices=["local", "redis"], default="redis")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-record", action="store_true", help=f"do not append to {RECORD_PATH}")
    args = parser.parse_args(argv)
    cfg = replace(SoakConfig(), requests=args.requests, concurrency=args.concurrency, pd=args.pd, pool=args.pool,
                  seed=args.seed)  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="kvd-soak-") as tmp:
        try:
            report = soak(cfg, Path(tmp))
        except RuntimeError as e:
            print(f"kvd bench soak: {e}", file=sys.stderr)
            sys.exit(1)
    date = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    body = render(report)
    print(f"\n# kvd soak — {date}\n\n{body}")
    if not args.no_record:
        with RECORD_PATH.open("a") as f:
            f.write(f"\n## Soak, {date}\n\n{body}\n")
        print(f"\nrecorded in {RECORD_PATH}")
    sys.exit(0 if report.ok else 1)


if __name__ == "__main__":
    main(sys.argv[1:])
