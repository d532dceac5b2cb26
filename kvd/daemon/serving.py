"""Serving: the Engine in the daemon — admission, the step loop, aborts, failures, deadlines.

    serving.submit(msg, outbox)      # a client's Generate: validated and queued, or Rejected
    await serving.run()              # schedule → worker step → process → deltas to each outbox
    serving.abort(request_id)        # the request ends with finish_reason "abort"
    await serving.fail(request_id, code, message)   # the request ends with one error

Every live request has an `Outbox`, the transport its results go back through: the ZeroMQ
frontend, the HTTP frontend, or a prefill instance's PD role (for the requests decode
instances hand it). Serving logs each client request's lifecycle (`request_queued` …
`request_finished` / `request_failed`) and observes its metrics, so a transport only
formats and sends. A request ends exactly once: its last delta or its one failure.

What a role adds — PD handoffs, a decode instance's preallocation, a prefill instance's
pool writes — is a `Role`; the unified role is `Role` itself, which adds nothing. The
step loop is synchronous by design: aborts that arrive while a step is in flight change
the scheduler at once, the step's late token for an aborted request is ignored, and its
freed blocks cannot be handed out before the next `schedule()`, which comes after the
in-flight step (the only writer of those blocks) has finished.
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Callable, Coroutine
from typing import Any, Protocol

import structlog

from kvd.config import KvdConfig
from kvd.daemon.backoff import RESTART_S, CompletionRate
from kvd.daemon.role import Role
from kvd.daemon.supervisor import ChildDied, Supervisor
from kvd.engine.engine import Delta, Engine, Prompt
from kvd.logs import RequestClock
from kvd.messages import CacheTaskDone, ErrorCode, Generate, Ready
from kvd.sampling import SamplingParams

log = structlog.get_logger("kvd.serving")


class Outbox(Protocol):
    """Where a request's results go: every delta in order, or one failure."""

    async def deliver(self, delta: Delta) -> None: ...

    async def fail(self, request_id: str, code: ErrorCode, message: str) -> None: ...


class Rejected(Exception):
    """A request refused before it was queued: one error to the client, nothing held."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class _Live:
    """One live request: its outbox, its clock, and what was logged of it."""

    __slots__ = ("outbox", "client", "clock", "first_token", "scheduled")

    def __init__(self, outbox: Outbox, client: bool) -> None:
        self.outbox = outbox
        self.client = client  # a client's request (lifecycle logged, deadline, drain) or a role's own
        self.clock = RequestClock()  # duration_ms / since_arrival_ms of each logged step
        self.first_token: float | None = None
        self.scheduled = False


class Serving:
    """Owns the Engine (scheduler + block manager), the live requests and their outboxes, the
    work event and the step loop, admission, and the idle integrity check."""

    def __init__(self, cfg: KvdConfig, supervisor: Supervisor, fatal: Callable[[], None], metrics=None) -> None:
        self.cfg = cfg
        self.supervisor = supervisor
        self.role = Role()
        self.metrics = metrics
        self._fatal = fatal
        self.tokenizer = None
        self.engine: Engine | None = None
        self.live: dict[str, _Live] = {}
        self.idle = asyncio.Event()  # set while no client request is live (the drain awaits it)
        self.idle.set()
        self.draining = False
        self.integrity = "not checked"
        self._last_check = 0.0
        self._work = asyncio.Event()
        self._throughput: collections.deque[tuple[float, int]] = collections.deque(maxlen=11)
        self.completions = CompletionRate()  # for the Retry-After hint of refusals
        self._background: set[asyncio.Task] = set()

    # ---- the engine --------------------------------------------------------------------
    def on_worker_ready(self, ready: Ready) -> None:
        """A worker is Ready: a fresh engine (its KV cache starts empty)."""
        info = ready.info
        kv_wait = max(1, int(info.num_blocks * self.cfg.pd.kv_wait_fraction)) if self.role.reads_pool else None
        group_min = self.cfg.prefill.group_min_tokens if self.cfg.prefill.group else 0
        self.engine = Engine(self.cfg.engine, self.tokenizer, info, stream_text=True, kv_wait_blocks=kv_wait,
                             group_min_tokens=group_min)  # fmt: skip
        self.role.attach(self.engine)
        self._work.set()

    async def on_worker_lost(self, message: str, details: dict[str, Any]) -> None:
        """Every live request fails with 500 naming the cause; 503 until a new worker is Ready."""
        log.error("worker_dead", **details, request_ids=[r for r, lv in self.live.items() if lv.client])
        for request_id in list(self.live):
            await self.fail(request_id, ErrorCode.INTERNAL, message)
        await self.role.engine_lost()
        self.engine = None

    async def on_messenger_lost(self) -> None:
        if self.engine is not None:
            await self.role.messenger_lost()

    async def on_cache_done(self, done: CacheTaskDone) -> None:
        if self.engine is not None:
            self.spawn(self.role.on_cache_done(done))

    # ---- requests in -------------------------------------------------------------------
    def refusal(self) -> tuple[ErrorCode, str] | None:
        """Why no request can be queued now (draining, restarting, queue full), or None."""
        if self.draining:
            return ErrorCode.UNAVAILABLE, "daemon: shutting down"
        if self.engine is None:
            return ErrorCode.UNAVAILABLE, "daemon: not ready (worker restarting)"
        if self.engine.num_waiting >= self.cfg.daemon.max_queue:
            return ErrorCode.QUEUE_FULL, f"queue: {self.cfg.daemon.max_queue} requests already waiting"
        return None

    def retry_after(self) -> int:
        """Seconds a client refused now should wait (Retry-After, kvd/daemon/backoff.py): the
        waiting requests, or while draining every live one, at the recent completion rate."""
        if self.engine is None:
            return RESTART_S
        return self.completions.retry_after(len(self.live) if self.draining else self.engine.num_waiting)

    def submit(self, msg: Generate, outbox: Outbox) -> None:
        """A client's request: validated and queued, or Rejected naming the field or cause."""
        request_id = msg.request_id
        with structlog.contextvars.bound_contextvars(request_id=request_id):
            try:
                self._submit(msg, outbox)
            except Rejected as e:
                log.warning("request_rejected", code=int(e.code), error=e.message)
                raise
            log.info("request_queued", stream=msg.stream)

    def _submit(self, msg: Generate, outbox: Outbox) -> None:
        refusal = self.refusal()
        if refusal is not None:
            raise Rejected(*refusal)
        if msg.request_id in self.live:
            raise Rejected(ErrorCode.BAD_REQUEST, f"request_id: {msg.request_id!r} is already in use")
        try:
            sources = [x is not None for x in (msg.prompt, msg.prompt_token_ids, msg.chat)]
            if sum(sources) != 1:
                raise ValueError("prompt: give exactly one of prompt, prompt_token_ids, chat")
            if self.role.client_refusal is not None:
                raise ValueError(self.role.client_refusal)
            if msg.chat is not None:
                prompt = self.engine.apply_chat_template([{"role": m.role, "content": m.content} for m in msg.chat])
            else:
                prompt = msg.prompt if msg.prompt is not None else msg.prompt_token_ids
            self.add(prompt, msg.params, msg.request_id, outbox, client=True, kv_recv=self.role.client_kv)
        except ValueError as e:
            raise Rejected(ErrorCode.BAD_REQUEST, str(e)) from None
        self.role.admitted(msg.request_id)

    def add(self, prompt: Prompt, params: SamplingParams, request_id: str, outbox: Outbox, *, client: bool = False,
            kv_send: bool = False, kv_recv: str | None = None) -> None:  # fmt: skip
        """Queue a request whose results go to `outbox` (ValueError naming the field)."""
        self.engine.add_request(prompt, params, request_id=request_id, kv_send=kv_send, kv_recv=kv_recv)
        self.live[request_id] = _Live(outbox, client)
        if client:
            self.idle.clear()
        self._work.set()

    # ---- requests out ------------------------------------------------------------------
    def abort(self, request_id: str) -> None:
        """End a request with finish_reason "abort" (client abort or disconnect); idempotent."""
        if self.engine is None:
            return
        for delta in self.engine.abort([request_id]):
            self.spawn(self.deliver(delta))
        self.role.ended(request_id)
        self._work.set()

    async def fail(self, request_id: str, code: ErrorCode, message: str) -> None:
        """End a request with one error; its blocks go back to the pool (once no transfer holds them)."""
        if self.engine is not None:
            self.engine.abort([request_id], "error")
        self.role.ended(request_id)
        lv = self._end(request_id)
        if lv is None:
            return
        if lv.client:
            log.error("request_failed", request_id=request_id, code=int(code), error=message, **lv.clock.step())
            self._observe_finish("error", lv)
        self._work.set()
        await lv.outbox.fail(request_id, code, message)

    def fail_soon(self, request_id: str, code: ErrorCode, message: str) -> None:
        """`fail` from synchronous code: the engine lets go of the request now, the error follows."""
        if self.engine is not None:
            self.engine.abort([request_id], "error")
        self.spawn(self.fail(request_id, code, message))

    async def fail_all(self, code: ErrorCode, message: str) -> None:
        for request_id in list(self.live):
            await self.fail(request_id, code, message)

    async def deliver(self, delta: Delta) -> None:
        """One step's tokens to the request's outbox; the final delta ends the request."""
        lv = self.live.get(delta.request_id)
        if lv is None:
            return  # already ended (aborted or failed): late output is dropped
        now = time.monotonic()
        if lv.client and lv.first_token is None and delta.token_ids:
            lv.first_token = now
            log.info("first_token", request_id=delta.request_id, **lv.clock.step(now))
            if self.metrics is not None:
                self.metrics.observe_ttft(now - lv.clock.arrival)
        out = delta.output
        if out is not None:
            self._end(delta.request_id)
            if lv.client:
                event = "request_aborted" if out.finish_reason == "abort" else "request_finished"
                log.info(event, request_id=delta.request_id, finish_reason=out.finish_reason,
                         num_tokens=len(out.token_ids), **lv.clock.step(now))  # fmt: skip
                self._observe_finish(out.finish_reason, lv)
        await lv.outbox.deliver(delta)

    def _end(self, request_id: str) -> _Live | None:
        lv = self.live.pop(request_id, None)
        if lv is not None:
            self.completions.record()
        if not any(other.client for other in self.live.values()):
            self.idle.set()
        return lv

    def _observe_finish(self, reason: str | None, lv: _Live) -> None:
        if self.metrics is not None:
            self.metrics.observe_finish(reason or "error", time.monotonic() - lv.clock.arrival)

    @property
    def num_client_requests(self) -> int:
        return sum(lv.client for lv in self.live.values())

    # ---- the step loop -----------------------------------------------------------------
    def wake(self) -> None:
        self._work.set()

    async def run(self) -> None:
        while True:
            await self._work.wait()
            engine = self.engine
            if engine is None or not engine.has_unfinished():
                self._work.clear()
                continue
            so = engine.schedule()
            self.role.scheduled()
            for request_id in so.preempted_request_ids:
                log.info("request_preempted", request_id=request_id)
            for new in so.new_reqs:
                self._on_scheduled(new.request_id, new.num_computed_tokens)
            if so.is_empty:
                self._work.clear()
                continue
            try:
                output = await self.supervisor.run_step(so)
            except ChildDied:
                continue  # its requests were failed and the engine replaced
            for delta in engine.process(output):
                await self.deliver(delta)

    def _on_scheduled(self, request_id: str, num_cached_tokens: int) -> None:
        lv = self.live.get(request_id)
        if lv is not None and lv.client and not lv.scheduled:
            lv.scheduled = True
            log.info("request_scheduled", request_id=request_id, num_cached_tokens=num_cached_tokens,
                     **lv.clock.step())  # fmt: skip

    # ---- housekeeping ------------------------------------------------------------------
    async def tick(self) -> None:
        """Every second: client deadlines (504), the role's leases, throughput, idle integrity."""
        if self.engine is None:
            return
        now = time.monotonic()
        timeout = self.cfg.daemon.request_timeout_s
        expired = [r for r, lv in self.live.items() if lv.client and now - lv.clock.arrival > timeout]
        for request_id in expired:
            await self.fail(request_id, ErrorCode.DEADLINE,
                            f"deadline: not finished within request_timeout_s={timeout}")
        self.role.tick()
        self._throughput.append((now, self.engine.num_generated))
        if now - self._last_check >= self.cfg.daemon.integrity_check_interval_s and self.check_integrity():
            self._last_check = now

    def check_integrity(self) -> bool:
        """While idle: the block pool and request table check themselves. A broken invariant
        stops the daemon loudly (systemd restarts it). False when not idle (not checked)."""
        if self.engine is None or self.supervisor.step_started is not None or self.engine.has_unfinished():
            return False
        try:
            self.engine.check_integrity()
            self.integrity = "ok"
        except RuntimeError as e:
            self.integrity = f"FAILED: {e}"
            log.critical("integrity_check_failed", error=str(e))
            self._fatal()
        return True

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        """Run `coro` beside the loop, held until done."""
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    def stats(self) -> dict[str, Any]:
        """The engine's figures (empty while a worker restarts), for status and metrics."""
        return self.engine.stats() if self.engine is not None else {}

    def problems(self) -> list[str]:
        """Broken dependencies: a child down, the role's own (e.g. no prefill instance answering)."""
        down = [f"{name} is down" for name, p in self.supervisor.status()["processes"].items() if not p["alive"]]
        return down + self.role.problems()

    @property
    def state(self) -> str:
        """ready | draining | restarting (no worker) | degraded (a dependency is broken)."""
        if self.draining:
            return "draining"
        if self.engine is None:
            return "restarting"
        return "degraded" if self.problems() else "ready"

    def status(self) -> dict[str, Any]:
        self.check_integrity()
        stats = self.stats()
        tput = 0.0
        if len(self._throughput) >= 2:
            (t0, n0), (t1, n1) = self._throughput[0], self._throughput[-1]
            tput = (n1 - n0) / (t1 - t0) if t1 > t0 else 0.0
        return {
            "state": self.state,
            "not_ready": self.problems(),
            "queue": stats.get("waiting", 0),
            "running": stats.get("running", 0),
            "live_requests": self.num_client_requests,
            "blocks": {k.removeprefix("blocks_"): v for k, v in stats.items() if k.startswith("blocks_")},
            "prefix_hit_rate": stats.get("prefix_hit_rate", 0.0),
            "preemptions": stats.get("preemptions", 0),
            "swaps": stats.get("swaps", 0),
            "generated_tokens": stats.get("generated_tokens", 0),
            "prompt_tokens": stats.get("prompt_tokens", 0),
            "throughput_tok_s": round(tput, 2),
            "integrity": self.integrity,
        }
