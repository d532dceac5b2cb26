"""Serving: the Engine in the daemon — admission, the step loop, the text stage, ends of requests.

    await serving.admit(msg, outbox) # a client's Generate: its grammar compiled off the loop, then submit:
    serving.submit(msg, outbox)      #   tokenized, validated and queued, or Rejected
    await serving.run()              # schedule → worker step → process → token outputs to the text stage
    await serving.run_text()         # token outputs → text deltas → each request's outbox
    serving.abort(request_id)        # the request ends with finish_reason "abort"
    await serving.fail(request_id, code, message)   # the request ends with one error

Every live request's record (kvd.request.Request) carries an `Owner`: its route back (a
ZeroMQ client's, an HTTP request's, or a prefill instance's handoff for the requests
decode instances hand it), its clock, and whether it has ended.
Serving logs each client request's lifecycle (`request_queued` … `request_finished` /
`request_failed`) and observes its metrics, so a transport only formats and sends. A
request ends exactly once, in `_end`: its last delta or its one failure.

Two coroutines share the engine: the step loop (`run`) sees token ids only and queues each
step's outputs for the text stage (`run_text`), which detokenizes, cuts stop strings and
delivers. What a role adds (PD handoffs, pool transfers) is a `Role`, chosen once at
start-up with its KV connector. With `[kv_events]` on, each engine records its block
changes into the publisher's log, which the step loop sends after each schedule() and a
fresh engine starts with "all cleared". The design: docs/architecture.md, "The daemon's
layers" and "KV events".
"""

from __future__ import annotations

import asyncio
import collections
import os
import time
from collections.abc import Callable, Coroutine
from typing import Any

import msgspec
import structlog

from kvd.config import KvdConfig
from kvd.daemon.backoff import CompletionRate
from kvd.daemon.kv_publisher import KVEventPublisher
from kvd.daemon.owner import Outbox, Owner, Rejected
from kvd.daemon.role import Role
from kvd.daemon.supervisor import ChildDied, Supervisor
from kvd.engine.engine import Engine
from kvd.engine.grammar import Grammars, compile_off_loop
from kvd.engine.text import Delta, TextStage, tokenizer_eos
from kvd.kv_events import Load
from kvd.messages import CacheTaskDone, ErrorCode, Generate, Ready
from kvd.request import Request, RequestStatus
from kvd.sampling import SamplingParams
from kvd.scheduler.output import EngineOutput

log = structlog.get_logger("kvd.serving")


class Serving:
    """Owns the Engine (scheduler + block manager + the request table), the text stage, the
    role, the step loop, admission, and the idle integrity check."""

    def __init__(self, cfg: KvdConfig, supervisor: Supervisor, tokenizer, role: type[Role], fatal: Callable[[], None],
                 metrics=None, kv_events: KVEventPublisher | None = None, **role_args: Any) -> None:  # fmt: skip
        self.cfg = cfg
        self.supervisor = supervisor
        self.metrics = metrics
        self.kv_events = kv_events
        self._fatal = fatal
        self.text = TextStage(tokenizer, stream_text=True)
        self.engine: Engine | None = None
        self.grammars: Grammars | None = None  # structured outputs' compiler, kept across worker restarts
        self.num_client_requests = 0
        self.idle = asyncio.Event()  # set while no client request is live (the drain awaits it)
        self.idle.set()
        self.draining = False
        self.integrity = "not checked"
        self._last_check = 0.0
        self._work = asyncio.Event()
        self._outputs: asyncio.Queue[list[EngineOutput]] = asyncio.Queue()  # the text stage's input
        self._text_idle = asyncio.Event()  # set while the text stage has nothing queued
        self._text_idle.set()
        self.overlap_text = True  # whether the text stage runs while the worker computes (on_worker_ready)
        self.throughput: collections.deque[tuple[float, int]] = collections.deque(maxlen=11)  # (time, tokens)
        self.completions = CompletionRate()  # for the Retry-After hint of refusals
        self._background: set[asyncio.Task] = set()
        self.role = role(cfg, self, **role_args)

    # ---- the engine --------------------------------------------------------------------
    def on_worker_ready(self, ready: Ready) -> None:
        """A worker is Ready: a fresh engine (its KV cache starts empty)."""
        info = ready.info
        if self.grammars is None or self.grammars.vocab_size != info.vocab_size:
            self.grammars = Grammars(self.text.tokenizer, info.vocab_size)
        events = None
        if self.kv_events is not None:  # the new engine's KV cache starts empty
            self.kv_events.clear()
            events = self.kv_events.log
        self.engine = Engine(self.cfg.engine, info, tokenizer_eos(self.text.tokenizer), self.role.connector(info),
                             self.grammars, events)  # fmt: skip
        if self.kv_events is not None:
            self.kv_events.load = self._load
        # The text stage overlaps the worker's step only where a core is left for it: on a CPU
        # whose every core the worker computes on, the daemon's text work would stall the
        # worker's threads instead (measured: 5% fewer tok/s at 32 streams on 2 cores), so
        # the step loop waits for the stage before it sends the next step.
        self.overlap_text = info.compute_threads < len(os.sched_getaffinity(0))
        self.role.attach(self.engine)
        self._work.set()

    async def on_worker_lost(self, message: str, details: dict[str, Any]) -> None:
        """Every live request fails with 500 naming the cause; 503 until a new worker is Ready."""
        records = self.records()
        log.error("worker_dead", **details,
                  request_ids=[r.request_id for r in records if r.owner is not None and r.owner.client])  # fmt: skip
        for request in records:
            await self._fail(request, ErrorCode.INTERNAL, message)
        await self.role.engine_lost()
        self.engine = None
        if self.kv_events is not None:
            self.kv_events.clear()

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

    async def admit(self, msg: Generate, outbox: Outbox, fill_max_tokens: bool = False) -> None:
        """`submit`, after compiling the request's grammar (structured outputs) off the loop."""
        try:
            await self.compile_grammar(msg.params)
        except Rejected as e:
            log.warning("request_rejected", request_id=msg.request_id, code=int(e.code), error=e.message)
            raise
        self.submit(msg, outbox, fill_max_tokens)

    async def compile_grammar(self, params: SamplingParams) -> None:
        """Compile the request's grammar in a thread, so the step loop goes on meanwhile
        (the engine then finds it in the compiler's cache); Rejected if it does not compile."""
        if params.structured_outputs is not None and self.grammars is not None:
            try:
                await compile_off_loop(self.grammars, params.structured_outputs)
            except ValueError as e:
                raise Rejected(ErrorCode.BAD_REQUEST, str(e)) from None

    def submit(self, msg: Generate, outbox: Outbox, fill_max_tokens: bool = False) -> None:
        """A client's request: tokenized, validated and queued, or Rejected naming the field or
        cause. `fill_max_tokens`: max_tokens is as much as the context leaves after the prompt."""
        request_id = msg.request_id
        with structlog.contextvars.bound_contextvars(request_id=request_id):
            try:
                self._submit(msg, outbox, fill_max_tokens)
            except Rejected as e:
                log.warning("request_rejected", code=int(e.code), error=e.message)
                raise
            log.info("request_queued", stream=msg.stream)

    def _submit(self, msg: Generate, outbox: Outbox, fill_max_tokens: bool) -> None:
        refusal = self.refusal()
        if refusal is not None:
            raise Rejected(*refusal)
        if msg.request_id in self.engine.scheduler.requests:
            raise Rejected(ErrorCode.BAD_REQUEST, f"request_id: {msg.request_id!r} is already in use")
        try:
            if self.role.client_refusal is not None:
                raise ValueError(self.role.client_refusal)
            chat = [{"role": m.role, "content": m.content} for m in msg.chat] if msg.chat is not None else None
            ids = self.text.request_ids(msg.prompt, msg.prompt_token_ids, chat)
            params = msg.params
            if fill_max_tokens:
                params = msgspec.structs.replace(params, max_tokens=max(1, self.engine.max_new_tokens(len(ids))))
            request = self.add(ids, params, msg.request_id, outbox, client=True)
        except ValueError as e:
            raise Rejected(ErrorCode.BAD_REQUEST, str(e)) from None
        for choice in request.choices or [request]:
            self.role.admitted(choice)

    def add(self, token_ids: list[int], params: SamplingParams, request_id: str, outbox: Outbox, *,
            client: bool = False) -> Request:  # fmt: skip
        """Queue a request whose results go to `outbox` (ValueError naming the field); returns
        its record (the first of its choices when n > 1: each choice is a record of its own)."""
        request = self.engine.add_request(token_ids, params, request_id)
        for choice in request.choices or [request]:
            choice.owner = Owner(outbox, client)
            self.text.start(choice)
        if client:
            self.num_client_requests += params.n
            self.idle.clear()
        self._work.set()
        return request

    # ---- requests out ------------------------------------------------------------------
    def record(self, request_id: str) -> Request | None:
        """The request's record while it is in the engine's table."""
        return self.engine.scheduler.requests.get(request_id) if self.engine is not None else None

    def records(self) -> list[Request]:
        """Every record in the engine's table."""
        return self.engine.requests() if self.engine is not None else []

    def live(self, request_id: str) -> list[Request]:
        """The records of request `request_id` that have not ended: it, or those of its n
        choices (the first of which has its id) that have not."""
        request = self.record(request_id)
        if request is None:  # a first choice that ended while others go on
            request = next((r for r in self.records() if r.choices and r.choices[0].request_id == request_id), None)
        choices = (request.choices or [request]) if request is not None else []
        return [c for c in choices if c.owner is not None and not c.owner.ended and not c.status.finished]

    def abort(self, request_id: str, outbox: Outbox | None = None) -> None:
        """End a request, all its choices, with finish_reason "abort" (client abort or
        disconnect); idempotent. Given `outbox`, only the request whose results go there (not
        another with its id)."""
        choices = [c for c in self.live(request_id) if outbox is None or c.owner.outbox is outbox]
        if not choices:
            return
        self.post(self.engine.abort([c.request_id for c in choices]))
        for choice in choices:
            self.role.ended(choice)
        self._work.set()

    async def fail(self, request_id: str, code: ErrorCode, message: str) -> None:
        """End a request with one error; its blocks go back to the pool (once no transfer holds them)."""
        request = self.record(request_id)
        if request is not None:
            await self._fail(request, code, message)

    def fail_soon(self, request_id: str, code: ErrorCode, message: str) -> None:
        """`fail` from synchronous code: the engine lets go of the request now, the error follows."""
        request = self.record(request_id)
        if request is not None:
            self.engine.abort([c.request_id for c in request.choices or [request]], RequestStatus.FINISHED_ERROR)
            self.spawn(self._fail(request, code, message))

    async def fail_all(self, code: ErrorCode, message: str) -> None:
        for request in self.records():
            await self._fail(request, code, message)

    async def _fail(self, request: Request, code: ErrorCode, message: str) -> None:
        """The one end of a failed request: each of its choices fails with it."""
        for choice in request.choices or [request]:
            await self._fail_one(choice, code, message)

    async def _fail_one(self, request: Request, code: ErrorCode, message: str) -> None:
        if self.engine is not None:
            self.engine.abort([request.request_id], RequestStatus.FINISHED_ERROR)
        self.role.ended(request)
        owner = request.owner
        if owner is None or owner.ended:
            return
        self._end(request)
        if owner.client:
            log.error("request_failed", request_id=request.request_id, code=int(code), error=message,
                      **owner.clock.step())  # fmt: skip
            self._observe_finish("error", owner)
        self._work.set()
        await owner.outbox.fail(request.request_id, code, message)

    def post(self, outs: list[EngineOutput]) -> None:
        """Token outputs (a step's, an abort's, a token sampled elsewhere) to the text stage."""
        if outs:
            self._text_idle.clear()
            self._outputs.put_nowait(outs)

    async def run_text(self) -> None:
        """The text stage: each output becomes a Delta for its request's outbox, in order."""
        while True:
            outs = await self._outputs.get()
            for eo in outs:
                owner = eo.request.owner
                if owner is None or owner.ended:
                    continue  # failed meanwhile: late output is dropped
                delta = self.text.on_output(eo)
                if delta is None:
                    continue
                if delta.stopped and self.engine is not None:
                    self.engine.stop([delta.request_id])
                    self._work.set()
                await self._deliver(eo.request, delta)
            if self._outputs.empty():
                self._text_idle.set()

    async def _deliver(self, request: Request, delta: Delta) -> None:
        """One step's tokens to the request's outbox; the final delta ends the request."""
        owner = request.owner
        now = time.monotonic()
        if owner.client and owner.first_token is None and delta.token_ids:
            owner.first_token = now
            log.info("first_token", request_id=delta.request_id, **owner.clock.step(now))
            if self.metrics is not None:
                self.metrics.observe_ttft(now - owner.clock.arrival)
        out = delta.output
        if out is not None:
            self._end(request)
            if owner.client:
                event = "request_aborted" if out.finish_reason == "abort" else "request_finished"
                log.info(event, request_id=delta.request_id, finish_reason=out.finish_reason,
                         num_tokens=len(out.token_ids), **owner.clock.step(now))  # fmt: skip
                self._observe_finish(out.finish_reason, owner)
        await owner.outbox.deliver(delta)

    def _end(self, request: Request) -> None:
        """The one place a request ends for the daemon: its last delta or its failure goes out next."""
        owner = request.owner
        owner.ended = True
        self.completions.record()
        if owner.client:
            self.num_client_requests -= 1
            if not self.num_client_requests:
                self.idle.set()

    def _observe_finish(self, reason: str | None, owner: Owner) -> None:
        if self.metrics is not None:
            self.metrics.observe_finish(reason or "error", time.monotonic() - owner.clock.arrival)

    # ---- the step loop -----------------------------------------------------------------
    def wake(self) -> None:
        self._work.set()

    async def run(self) -> None:
        while True:
            await self._work.wait()
            engine = self.engine
            if engine is None or not engine.has_unfinished():
                if self.kv_events is not None:  # idle now: its load (nothing running) goes out
                    self.kv_events.step()
                self._work.clear()
                continue
            so = engine.schedule()
            if self.kv_events is not None:
                self.kv_events.step()
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
            self.post(engine.process(output))
            if not self.overlap_text:
                await self._text_idle.wait()

    def _on_scheduled(self, request_id: str, num_cached_tokens: int) -> None:
        owner = self.engine.scheduler.requests[request_id].owner
        if owner is not None and owner.client and not owner.scheduled:
            owner.scheduled = True
            log.info("request_scheduled", request_id=request_id, num_cached_tokens=num_cached_tokens,
                     **owner.clock.step())  # fmt: skip

    # ---- housekeeping ------------------------------------------------------------------
    async def tick(self) -> None:
        """Every second: client deadlines (504), the role's leases, throughput, idle integrity."""
        if self.engine is None:
            return
        now = time.monotonic()
        timeout = self.cfg.daemon.request_timeout_s
        expired = [r for r in self.engine.requests()
                   if r.owner is not None and r.owner.client and now - r.owner.clock.arrival > timeout]  # fmt: skip
        for request in expired:
            await self._fail(request, ErrorCode.DEADLINE, f"deadline: not finished within request_timeout_s={timeout}")
        self.role.tick()
        if self.kv_events is not None:
            self.kv_events.tick()
        self.throughput.append((now, self.engine.num_generated))
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

    def _load(self) -> Load | None:
        """The load the KV events carry (the router's status feed)."""
        if self.engine is None:
            return None
        sched, pool = self.engine.scheduler, self.engine.kv.pool
        return Load(len(sched.waiting), len(sched.running), pool.num_empty, pool.num_blocks, pool.num_cached_only)

    def stats(self) -> dict[str, Any]:
        """The engine's figures (empty while a worker restarts), for status and metrics."""
        return self.engine.stats() if self.engine is not None else {}
