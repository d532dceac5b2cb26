"""The daemon process: asyncio on uvloop — frontend, scheduler, children, signals, drain.

    kvd serve → serve(cfg) → Daemon.run()

Start-up: spawn the worker and the cache messenger, await Ready from both (the worker's
carries the model's facts and its number of KV blocks), build the Engine (scheduler +
block manager), bind the client ROUTER, write `<run_dir>/endpoint`, tell systemd READY=1.
In the prefill and decode roles the messenger starts beside the worker (importing torch
and opening the pool while the worker loads) and maps the worker's KV cache once the
worker is Ready (MapKV); the daemon itself never imports torch. The PD event chain
(`kvd.daemon.events`) runs beside the step loop: a prefill instance binds its PD endpoint
(`<run_dir>/pd_endpoint`), a decode instance connects to its prefill instances.

Then a TaskGroup runs: the frontend's reader, the children's report reader, the step
loop (schedule → Step to the worker → await StepDone → process → stream deltas), and a
one-second ticker (deadlines → 504, idle integrity checks, watchdog pings, throughput).

A child that dies (kill -9 included: its sentinel fd is watched) fails every in-flight
request with 500 at once; the worker is then restarted (fresh KV cache) or the daemon
exits non-zero for systemd to restart, per `daemon.on_worker_death`. SIGTERM drains:
new requests get 503, in-flight ones get `drain_timeout_s` to finish, the rest get 503,
children are shut down, exit 0.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import signal
import time
from typing import Any

import msgspec
import structlog
import zmq
import zmq.asyncio

from kvd.config import KvdConfig, resolve_run_dir
from kvd.daemon.children import ChildProcess
from kvd.daemon.frontend import Frontend
from kvd.daemon.notify import Notifier
from kvd.engine.engine import Engine, ModelInfo
from kvd.ipc import AsyncChannel, bind_random, publish_endpoint
from kvd.logs import ms_since
from kvd.daemon.events import PDChain
from kvd.daemon.peers import PrefillLink, PrefillServer
from kvd.messages import (
    CacheTask,
    CacheTaskDone,
    Dead,
    ErrorCode,
    FromChild,
    Generate,
    MapKV,
    Ready,
    Shutdown,
    Step,
    StepDone,
)

log = structlog.get_logger("kvd.daemon")

STARTUP_TIMEOUT_S = 900.0  # a first start converts the embedded model
CHILD_STOP_TIMEOUT_S = 5.0


class ChildDied(Exception):
    pass


class Daemon:
    def __init__(self, cfg: KvdConfig, notifier: Notifier) -> None:
        self.cfg = cfg
        self.notifier = notifier
        self.run_dir = resolve_run_dir(cfg)
        self.ctx = zmq.asyncio.Context()
        self.engine: Engine | None = None
        self.tokenizer = None
        self.frontend: Frontend | None = None
        self.endpoint: str | None = None
        self.draining = False
        self.exit_code = 0
        self._stop = asyncio.Event()
        self._work = asyncio.Event()
        self._step_future: asyncio.Future | None = None
        self._step_started: float | None = None
        self._ready_waiters: dict[str, asyncio.Future[Ready]] = {}
        self._t_start = time.monotonic()
        self._t_stop: float | None = None  # when the drain (or a stop without one) began
        self._integrity = "not checked"
        self._throughput: collections.deque[tuple[float, int]] = collections.deque(maxlen=11)
        self._worker_restarts = 0
        self._background: set[asyncio.Task] = set()  # fire-and-forget tasks, held until done
        self._dead_reasons: dict[str, str] = {}  # what a child's Dead message said, until its exit is handled
        self._worker_ready: Ready | None = None  # the running worker's Ready (its KV share, for a new messenger)
        self.metrics = None
        self.metrics_url: str | None = None
        self.pd = cfg.daemon.role != "unified"
        self.chain = PDChain(self) if self.pd else None

    # ---- start-up ----------------------------------------------------------------------
    async def _start_children(self) -> None:
        cfg_json = msgspec.json.encode(self.cfg)
        self.reports: AsyncChannel[FromChild] = AsyncChannel(self.ctx.socket(zmq.PULL), FromChild)
        report_ep = bind_random(self.reports.sock)
        self.to_worker = AsyncChannel(self.ctx.socket(zmq.PUSH), None)
        self.to_messenger = AsyncChannel(self.ctx.socket(zmq.PUSH), None)
        self._report_ep = report_ep
        self._messenger_ep = bind_random(self.to_messenger.sock)
        self.worker = ChildProcess("worker-0", "kvd.worker.main:worker_main",
                                   (cfg_json, bind_random(self.to_worker.sock), report_ep))
        self.messenger = self._messenger_process()
        self.children = [self.worker, self.messenger]

    def _messenger_process(self) -> ChildProcess:
        return ChildProcess("messenger", "kvd.messenger.main:messenger_main",
                            (msgspec.json.encode(self.cfg), self._messenger_ep, self._report_ep))  # fmt: skip

    async def _launch_messenger(self) -> asyncio.Future[Ready]:
        """A new messenger (the old one, if alive, is stopped: it maps a dead worker's KV cache)."""
        if self.messenger.alive:
            with contextlib.suppress(TimeoutError, zmq.ZMQError):
                await asyncio.wait_for(self.to_messenger.send(Shutdown()), 1.0)
            await self.messenger.stop(CHILD_STOP_TIMEOUT_S)
        self.messenger = self._messenger_process()
        self.children = [self.worker, self.messenger]
        return self._launch(self.messenger)

    async def _messenger_ready(self, fut: asyncio.Future[Ready], worker: Ready) -> Ready:
        """In the PD roles the messenger maps the worker's KV cache first (MapKV), then is Ready."""
        if self.pd:  # a PUSH to a messenger that died meanwhile would wait forever
            send = asyncio.ensure_future(self.to_messenger.send(MapKV(worker.kv)))
            await asyncio.wait([send, self.messenger.exited], return_when=asyncio.FIRST_COMPLETED)
            send.cancel()  # a no-op once sent
        return await self._wait_ready(self.messenger, fut)

    def _launch(self, child: ChildProcess) -> asyncio.Future[Ready]:
        fut = asyncio.get_running_loop().create_future()
        self._ready_waiters[child.name] = fut
        child.start()
        return fut

    async def _wait_ready(self, child: ChildProcess, fut: asyncio.Future[Ready]) -> Ready:
        done, _ = await asyncio.wait([fut, child.exited], timeout=STARTUP_TIMEOUT_S,
                                     return_when=asyncio.FIRST_COMPLETED)  # fmt: skip
        if fut not in done:
            raise ChildDied(f"{child.name} did not become ready (exit code {child.proc.exitcode})")
        child.ready = True
        return fut.result()

    async def _start_worker(self) -> Ready:
        """Start the worker and, beside it, a messenger unless one runs and maps no KV cache
        (the unified role); returns once both are Ready."""
        messenger = await self._launch_messenger() if self.pd or not self.messenger.alive else None
        worker = await self._wait_ready(self.worker, self._launch(self.worker))
        self._worker_ready = worker
        if messenger is not None:
            await self._messenger_ready(messenger, worker)
        return worker

    def _build_engine(self, info: ModelInfo) -> None:
        kv_wait = max(1, int(info.num_blocks * self.cfg.pd.kv_wait_fraction)) if self.pd else None
        group_min = self.cfg.prefill.group_min_tokens if self.cfg.prefill.group else 0
        self.engine = Engine(self.cfg.engine, self.tokenizer, info, stream_text=True, kv_wait_blocks=kv_wait,
                             group_min_tokens=group_min)  # fmt: skip
        if self.chain is not None:
            self.chain.attach()

    # ---- the run -----------------------------------------------------------------------
    async def run(self) -> int:
        from kvd.worker.models import load_tokenizer, resolve_model

        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.begin_drain)
        await self._start_children()
        reader = asyncio.create_task(self._read_reports())
        try:
            model_dir = resolve_model(self.cfg.model.model, self.cfg.model.cache_dir)
            tok_task = asyncio.create_task(asyncio.to_thread(load_tokenizer, model_dir))
            worker_ready = await self._start_worker()
            self.tokenizer = await tok_task
            self._build_engine(worker_ready.info)
            self._start_pd()
            self._bind_frontend()
            self._start_metrics()
        except ChildDied as e:
            log.error("daemon_start_failed", reason=str(e))
            reader.cancel()
            await self._shutdown()
            return 1
        self.notifier.ready(f"serving on {self.endpoint}")
        log.info("daemon_ready", endpoint=self.endpoint, num_blocks=self.engine.kv.num_blocks,
                 run_dir=str(self.run_dir), duration_ms=ms_since(self._t_start))  # fmt: skip
        try:
            async with asyncio.TaskGroup() as tg:
                tasks = [
                    tg.create_task(self.frontend.run()),
                    tg.create_task(self._step_loop()),
                    tg.create_task(self._ticker()),
                    tg.create_task(self._watch_children()),
                ]
                if self.chain is not None and self.chain.server is not None:
                    tasks.append(tg.create_task(self.chain.server.run(self.chain.on_decode_message)))
                for link in self.chain.links if self.chain is not None else ():
                    tasks.append(tg.create_task(self._read_link(link)))
                await self._stop.wait()
                for t in tasks:
                    t.cancel()
        except* Exception as eg:
            for e in eg.exceptions:
                log.error("daemon_crashed", error=f"{type(e).__name__}: {e}", exc_info=e)
            self.exit_code = 1
        if self._t_stop is None:  # stopped without a drain (a crash, an exit policy)
            self._t_stop = time.monotonic()
        reader.cancel()
        await self._shutdown()
        log.info("daemon_stopped", exit_code=self.exit_code, duration_ms=ms_since(self._t_stop))
        return self.exit_code

    def _bind_frontend(self) -> None:
        sock = self.ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        # A hard cap well above max_frame_bytes: libzmq drops a peer sending more than this.
        sock.setsockopt(zmq.MAXMSGSIZE, 8 * self.cfg.daemon.max_frame_bytes)
        d = self.cfg.daemon
        if d.port == 0:
            self.endpoint = bind_random(sock, d.host)
        else:
            self.endpoint = f"tcp://{d.host}:{d.port}"
            sock.bind(self.endpoint)
        self.frontend = Frontend(self, sock, d.max_frame_bytes)
        publish_endpoint(self.run_dir / "endpoint", self.endpoint)

    def _start_pd(self) -> None:
        if self.chain is None:
            return
        if self.cfg.daemon.role == "prefill":
            self.chain.server = PrefillServer(self.ctx, self.cfg.pd.host, self.cfg.pd.port, self.run_dir)
            log.info("pd_serving", pd_endpoint=self.chain.server.endpoint, pool=self.cfg.pd.pool)
        else:
            self.chain.links = [PrefillLink(self.ctx, spec) for spec in self.cfg.pd.prefill_endpoints]
            for link in self.chain.links:
                link.ping()

    async def _read_link(self, link: PrefillLink) -> None:
        """A decode instance's reader of one prefill instance (its socket may appear later)."""
        while True:
            sock = link.sock
            if sock is None:
                await asyncio.sleep(self.cfg.daemon.heartbeat_interval_s)  # the endpoint file is not there yet
                continue
            try:
                msg = await link.recv()
            except (zmq.ZMQError, asyncio.CancelledError):
                if link.sock is sock:
                    raise  # a real error, or the daemon stopping
                continue  # the link was reset (its peer died), which ends a pending recv: read anew
            await self.chain.on_prefill_message(link, msg)

    def _start_metrics(self) -> None:
        m = self.cfg.metrics
        if m.prometheus_port < 0:
            return
        from kvd.metrics import Metrics

        self.metrics = Metrics()
        port = self.metrics.start_http(m.host, m.prometheus_port)
        self.metrics_url = f"http://{m.host}:{port}/metrics"
        log.info("metrics_serving", url=self.metrics_url)

    async def _shutdown(self) -> None:
        for child, chan in ((self.worker, self.to_worker), (self.messenger, self.to_messenger)):
            if child.alive:
                try:
                    await asyncio.wait_for(chan.send(Shutdown()), 1.0)
                except (TimeoutError, zmq.ZMQError):
                    pass
        await asyncio.gather(*(c.stop(CHILD_STOP_TIMEOUT_S) for c in self.children))
        with_endpoint = self.run_dir / "endpoint"
        if self.endpoint and with_endpoint.exists() and with_endpoint.read_text().strip() == self.endpoint:
            with_endpoint.unlink()
        if self.frontend:
            self.frontend.sock.close(linger=0)
        if self.metrics is not None:
            self.metrics.close()
        if self.chain is not None:
            if self.chain.server is not None:
                self.chain.server.close(linger_ms=500)  # the drain's last replies still go out
            for link in self.chain.links:
                link.close()
        for chan in (self.reports, self.to_worker, self.to_messenger):
            chan.close()
        self.ctx.term()

    # ---- requests ----------------------------------------------------------------------
    def refusal(self) -> tuple[ErrorCode, str] | None:
        if self.draining:
            return ErrorCode.UNAVAILABLE, "daemon: shutting down"
        if self.engine is None:
            return ErrorCode.UNAVAILABLE, "daemon: not ready (worker restarting)"
        if len(self.engine.scheduler.waiting) >= self.cfg.daemon.max_queue:
            return ErrorCode.QUEUE_FULL, f"queue: {self.cfg.daemon.max_queue} requests already waiting"
        return None

    def admit(self, msg: Generate) -> None:
        """Validate and queue; ValueError names the field."""
        sources = [x is not None for x in (msg.prompt, msg.prompt_token_ids, msg.chat)]
        if sum(sources) != 1:
            raise ValueError("prompt: give exactly one of prompt, prompt_token_ids, chat")
        if msg.chat is not None:
            prompt = self.engine.apply_chat_template([{"role": m.role, "content": m.content} for m in msg.chat])
        else:
            prompt = msg.prompt if msg.prompt is not None else msg.prompt_token_ids
        if self.cfg.daemon.role == "prefill":
            raise ValueError("role: this is a prefill instance; send requests to a decode instance")
        decode = self.cfg.daemon.role == "decode"
        self.engine.add_request(prompt, msg.params, request_id=msg.request_id, kv_recv="prompt" if decode else None)
        if decode:
            self.chain.admit(msg.request_id)
        self._work.set()

    def abort(self, rid: str, identity: bytes | None) -> None:
        if self.frontend.owner(rid) is None or (identity is not None and self.frontend.owner(rid) != identity):
            log.info("abort_ignored", request_id=rid, reason="not a live request of this client")
            return
        for delta in self.engine.abort([rid]):
            self._spawn(self.frontend.deliver(delta))
        if self.chain is not None:
            self.chain.on_abort(rid)

    # ---- what the PD chain calls -------------------------------------------------------
    def wake(self) -> None:
        self._work.set()

    def send_cache_task(self, task: CacheTask) -> None:
        async def send() -> None:
            if self.messenger.alive and self.messenger.ready:
                try:
                    await self.to_messenger.send(task)
                    return
                except zmq.ZMQError:
                    pass
            await self.chain.on_task_done(CacheTaskDone.failed(task.task_id, task.request_id,
                                                               "the cache messenger is not running"))

        self._spawn(send())

    def fail_request(self, rid: str, code: ErrorCode, message: str) -> None:
        """End a client request with one error (a failed handoff); its blocks go back to the pool."""
        if self.engine is not None:
            self.engine.abort([rid], "error")
        self._spawn(self.frontend.fail(rid, code, message))
        self._work.set()

    def engine_abort(self, rid: str) -> None:
        if self.engine is not None:
            self.engine.abort([rid])
            self._work.set()

    def begin_drain(self) -> None:
        if self.draining:
            return
        self._t_stop = time.monotonic()
        self.draining = True
        self.notifier.stopping()
        log.info("daemon_draining", in_flight=len(self.frontend.live) if self.frontend else 0,
                 timeout_s=self.cfg.daemon.drain_timeout_s)  # fmt: skip
        self._spawn(self._drain())

    def _spawn(self, coro) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _drain(self) -> None:
        if self.chain is not None and self.cfg.daemon.role == "prefill":
            await self.chain.drain(self.cfg.daemon.drain_timeout_s)
        if self.frontend:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.frontend.idle.wait(), self.cfg.daemon.drain_timeout_s)
            for rid in list(self.frontend.live):
                if self.engine is not None:
                    self.engine.abort([rid])
                await self.frontend.fail(rid, ErrorCode.UNAVAILABLE, "daemon: shut down before the request finished")
        self._stop.set()

    # ---- the step loop -----------------------------------------------------------------
    async def _step_loop(self) -> None:
        while True:
            await self._work.wait()
            engine = self.engine
            if engine is None or not engine.has_unfinished():
                self._work.clear()
                continue
            so = engine.schedule()
            if self.chain is not None:
                self.chain.on_scheduled()
            for rid in so.preempted_req_ids:
                log.info("request_preempted", request_id=rid)
            for new in so.new_reqs:
                self.frontend.on_scheduled(new.req_id, new.num_computed_tokens)
            if so.is_empty:
                self._work.clear()
                continue
            self._step_future = asyncio.get_running_loop().create_future()
            self._step_started = time.monotonic()
            await self.to_worker.send(Step(so))
            try:
                done: StepDone = await self._step_future
            except ChildDied:
                continue  # the requests were failed and the engine replaced
            finally:
                self._step_future = None
                self._step_started = None
            for delta in engine.process(done.output):
                if self.chain is not None and self.chain.owns(delta.request_id):
                    await self.chain.on_delta(delta)
                else:
                    await self.frontend.deliver(delta)

    async def _read_reports(self) -> None:
        while True:
            msg = await self.reports.recv()
            if isinstance(msg, Ready):
                fut = self._ready_waiters.pop(msg.process, None)
                if fut is not None and not fut.done():
                    child = next(c for c in self.children if c.name == msg.process)
                    log.info("child_ready", child=child.name, child_pid=msg.pid, duration_ms=ms_since(child.started_at))
                    fut.set_result(msg)
            elif isinstance(msg, StepDone):
                if self._step_future is not None and not self._step_future.done():
                    self._step_future.set_result(msg)
                else:
                    log.warning("late_step_result", step=msg.output.step)
            elif isinstance(msg, CacheTaskDone):
                if self.chain is not None and self.engine is not None:
                    self._spawn(self.chain.on_task_done(msg))
            elif isinstance(msg, Dead):
                log.error("child_reported_dead", child=msg.process, reason=msg.reason)
                self._dead_reasons[msg.process] = msg.reason

    async def _watch_children(self) -> None:
        while True:
            pending = {c.exited: c for c in self.children if c.alive}
            if not pending:  # nothing left to watch: the daemon is on its way out
                await self._stop.wait()
                return
            done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for fut in done:
                await self._on_child_exit(pending[fut], fut.result())

    async def _on_child_exit(self, child: ChildProcess, code: int) -> None:
        await asyncio.sleep(0.05)  # let a Dead report that raced the exit arrive first
        reason = self._dead_reasons.pop(child.name, None) or f"exited with code {code}"
        message = f"{child.name} died: {reason}"
        if child is self.messenger:
            # Only the transfers in flight fail (or recompute); requests in decode go on.
            log.error("child_dead", child=child.name, child_pid=child.pid, exit_code=code, reason=reason)
            if self.chain is not None and self.engine is not None:
                await self.chain.on_messenger_lost()
        else:
            in_flight = list(self.frontend.live) if self.frontend else []
            log.error("worker_dead", child=child.name, child_pid=child.pid, exit_code=code, reason=reason,
                      request_ids=in_flight)  # fmt: skip
            if self._step_future is not None and not self._step_future.done():
                self._step_future.set_exception(ChildDied(message))
            if self.chain is not None:
                await self.chain.on_engine_lost()
            if self.frontend:
                for rid in list(self.frontend.live):
                    await self.frontend.fail(rid, ErrorCode.INTERNAL, message)
        policy = self.cfg.daemon.on_worker_death
        if self.draining or policy == "exit" or self._worker_restarts >= self.cfg.daemon.max_worker_restarts:
            log.error("daemon_exiting", reason=message, policy=policy, restarts=self._worker_restarts)
            self.exit_code = 1
            self._stop.set()
            return
        self._worker_restarts += 1
        if child is self.worker:
            self.engine = None  # 503 while the new worker loads; its KV cache starts empty
        try:
            if child is self.worker:
                ready = await self._start_worker()  # the old messenger maps the dead worker's KV cache
                self._build_engine(ready.info)
            else:
                ready = await self._messenger_ready(await self._launch_messenger(), self._worker_ready)
        except ChildDied as e:
            log.error("daemon_exiting", reason=str(e))
            self.exit_code = 1
            self._stop.set()
            return
        log.info("child_restarted", child=child.name, child_pid=ready.pid, restarts=self._worker_restarts)

    # ---- housekeeping ------------------------------------------------------------------
    async def _ticker(self) -> None:
        d = self.cfg.daemon
        last_check = 0.0
        while True:
            await asyncio.sleep(min(1.0, d.heartbeat_interval_s))
            now = time.monotonic()
            if self.frontend and self.engine:
                for rid in self.frontend.expired(d.request_timeout_s):
                    self.engine.abort([rid])
                    await self.frontend.fail(rid, ErrorCode.DEADLINE,
                                             f"deadline: not finished within request_timeout_s={d.request_timeout_s}")
            if self.chain is not None and self.engine is not None:
                self.chain.tick()
            if self.engine is not None:
                self._throughput.append((now, self.engine.num_generated))
                idle = self._step_future is None and not self.engine.has_unfinished()
                if idle and now - last_check >= d.integrity_check_interval_s:
                    last_check = now
                    self._check_integrity()
            stuck = self._step_started is not None and now - self._step_started > max(30.0, d.request_timeout_s)
            if not stuck:
                self.notifier.watchdog()
            if self.metrics is not None and self.engine is not None:
                alive = {c.name: c.alive and c.ready for c in self.children}
                self.metrics.update(self.engine.stats() | {"integrity_ok": self._integrity == "ok", "processes": alive})

    def _check_integrity(self) -> None:
        try:
            self.engine.check_integrity()
            self._integrity = "ok"
        except RuntimeError as e:  # a broken invariant: stop loudly, systemd restarts us
            self._integrity = f"FAILED: {e}"
            log.critical("integrity_check_failed", error=str(e))
            self.exit_code = 1
            self._stop.set()

    def metrics_observe_ttft(self, seconds: float) -> None:
        if self.metrics is not None:
            self.metrics.observe_ttft(seconds)

    def metrics_observe_finish(self, reason: str | None, seconds: float) -> None:
        if self.metrics is not None:
            self.metrics.observe_finish(reason or "error", seconds)

    def status(self) -> dict[str, Any]:
        if self.engine is not None and self._step_future is None and not self.engine.has_unfinished():
            try:
                self.engine.check_integrity()
                self._integrity = "ok"
            except RuntimeError as e:
                self._integrity = f"FAILED: {e}"
        stats = self.engine.stats() if self.engine is not None else {}
        tput = 0.0
        if len(self._throughput) >= 2:
            (t0, n0), (t1, n1) = self._throughput[0], self._throughput[-1]
            tput = (n1 - n0) / (t1 - t0) if t1 > t0 else 0.0
        return {
            "role": self.cfg.daemon.role,
            "state": "draining" if self.draining else ("ready" if self.engine is not None else "restarting"),
            "endpoint": self.endpoint,
            "uptime_s": round(time.monotonic() - self._t_start, 3),
            "queue": stats.get("waiting", 0),
            "running": stats.get("running", 0),
            "live_requests": len(self.frontend.live) if self.frontend else 0,
            "blocks": {k.removeprefix("blocks_"): v for k, v in stats.items() if k.startswith("blocks_")},
            "prefix_hit_rate": stats.get("prefix_hit_rate", 0.0),
            "preemptions": stats.get("preemptions", 0),
            "generated_tokens": stats.get("generated_tokens", 0),
            "prompt_tokens": stats.get("prompt_tokens", 0),
            "throughput_tok_s": round(tput, 2),
            "integrity": self._integrity,
            "malformed_frames": self.frontend.num_malformed if self.frontend else 0,
            "worker_restarts": self._worker_restarts,
            **({"pd": self.chain.status()} if self.chain is not None else {}),
            "metrics_url": self.metrics_url,
            "processes": {
                "daemon": {"pid": os.getpid(), "alive": True},
                **{c.name: {"pid": c.pid, "alive": c.alive and c.ready} for c in self.children},
            },
        }


def serve(cfg: KvdConfig, notify_socket: str | None = None) -> int:
    """Run the daemon in the foreground until SIGTERM/SIGINT; returns the exit code."""
    import uvloop

    from kvd.logs import configure_logging

    configure_logging(cfg.log, process="daemon", role=cfg.daemon.role)
    daemon = Daemon(cfg, Notifier(notify_socket))
    return uvloop.run(daemon.run())

