"""Supervisor: the daemon's child processes, their channels, the Ready handshake and restarts.

    supervisor.start()               # worker (+ messenger) spawned; returns the worker's Ready
    await supervisor.run_step(so)    # Step to the worker, its ModelOutput back (ChildDied if it dies)
    supervisor.send_cache_task(task) # to the messenger; its CacheTaskDone comes to the events
    await supervisor.run()           # reads reports, awaits exits, applies the restart policy

Children are spawned with multiprocessing's spawn context (a fresh interpreter: no forked
torch or ZeroMQ state) and named by the dotted path of their entry function, imported in
the child: the daemon itself never imports torch. Their exit is awaited on the process
sentinel, never polled, so a kill -9 is seen at once; a child that fails says Dead with
its reason first, and that report ends the wait (an exit without one is named by its
exit code). In the prefill and decode roles the messenger starts beside the worker and
maps the worker's KV cache from its first message, MapKV, once the worker is Ready.

A lost child is reported to `ChildEvents` (the serving layer): a lost worker fails every
live request, and a new worker brings a new engine; a lost messenger fails only the
transfers in flight. Then the child is restarted, or, per `daemon.on_worker_death` and
`daemon.max_worker_restarts`, the supervisor gives up and the daemon exits 1 for systemd.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import time
from collections.abc import Callable
from typing import Any, Protocol

import msgspec
import structlog
import zmq
import zmq.asyncio

from kvd.config import KvdConfig
from kvd.daemon.children import ChildDied, ChildProcess
from kvd.ipc import AsyncChannel, BadFrame, bind_ipc, private_dir
from kvd.logs import ms_since
from kvd.messages import (
    CacheTask,
    CacheTaskDone,
    Dead,
    FromChild,
    MapKV,
    Ready,
    Shutdown,
    Step,
    StepDone,
)
from kvd.scheduler.output import ModelOutput, SchedulerOutput

log = structlog.get_logger("kvd.supervisor")

STARTUP_TIMEOUT_S = 900.0  # a first start converts the embedded model
CHILD_STOP_TIMEOUT_S = 5.0


class ChildEvents(Protocol):
    """What the supervisor tells the serving layer."""

    def on_worker_ready(self, ready: Ready) -> None: ...

    async def on_worker_lost(self, message: str, details: dict[str, Any]) -> None: ...

    async def on_messenger_lost(self) -> None: ...

    async def on_cache_done(self, done: CacheTaskDone) -> None: ...


class Supervisor:
    """Owns the worker and the cache messenger: their processes, channels, Ready handshakes,
    the step round trip, and the restart policy."""

    def __init__(self, ctx: zmq.asyncio.Context, cfg: KvdConfig, give_up: Callable[[], None],
                 with_messenger: bool) -> None:  # fmt: skip
        self.cfg = cfg
        # A role that moves KV through the pool has a messenger, which maps the worker's KV cache.
        self.with_messenger = with_messenger
        self.events: ChildEvents | None = None  # given to run(); nothing reports before it
        self.stopping = False  # set by the drain: a child lost now is not restarted
        self.restarts = 0
        self._give_up = give_up
        cfg_json = msgspec.json.encode(cfg)
        # ipc:// in a directory only this user can enter: no other local user reaches these.
        self.ipc_dir = private_dir()
        self.reports: AsyncChannel[FromChild] = AsyncChannel(ctx.socket(zmq.PULL), FromChild)
        report_ep = bind_ipc(self.reports.sock, self.ipc_dir, "reports")
        self.to_worker = AsyncChannel(ctx.socket(zmq.PUSH), None)
        self.to_messenger = AsyncChannel(ctx.socket(zmq.PUSH), None)
        self.worker = ChildProcess("worker-0", "kvd.worker.main:worker_main",
                                   (cfg_json, bind_ipc(self.to_worker.sock, self.ipc_dir, "worker-0"), report_ep,
                                    with_messenger))  # fmt: skip
        self.messenger = ChildProcess("messenger", "kvd.messenger.main:messenger_main",
                                      (cfg_json, bind_ipc(self.to_messenger.sock, self.ipc_dir, "messenger"),
                                       report_ep))  # fmt: skip
        self.rejected_frames = 0  # report frames that did not decode (logged, dropped)
        self.children = (self.worker, self.messenger) if with_messenger else (self.worker,)
        self._channels = {self.worker.name: self.to_worker, self.messenger.name: self.to_messenger}
        self._ready: dict[str, asyncio.Future[Ready]] = {}
        self._worker_ready: Ready | None = None  # the running worker's (its KV share, for a new messenger)
        self._step: asyncio.Future[StepDone] | None = None
        self.step_started: float | None = None  # time.monotonic() of the step in flight
        self._reader: asyncio.Task | None = None
        self._sends: set[asyncio.Task] = set()

    # ---- start-up ----------------------------------------------------------------------
    async def start(self) -> Ready:
        """Start the children; the worker's Ready once both are Ready (ChildDied otherwise)."""
        self._reader = asyncio.create_task(self._read_reports())
        self._reader.add_done_callback(self._reader_ended)
        return await self._start_worker()

    def _reader_ended(self, task: asyncio.Task) -> None:
        """The report channel is what every step and handoff depends on: its reader never
        ends while the daemon runs; if it does, the daemon stops loudly (systemd restarts it)."""
        if not task.cancelled():
            log.critical("channel_broken", channel="reports", error=repr(task.exception()))
            self._give_up()

    async def _start_worker(self) -> Ready:
        """The worker and, beside it, a new messenger (the old one maps a dead worker's KV cache)."""
        messenger = await self._launch_messenger() if self.with_messenger else None
        worker = await self._wait_ready(self.worker, self._launch(self.worker))
        self._worker_ready = worker
        if messenger is not None:
            await self._messenger_ready(messenger, worker)
        return worker

    async def _launch_messenger(self) -> asyncio.Future[Ready]:
        """A new messenger (the old one, if alive, is stopped: it maps a dead worker's KV cache)."""
        if self.messenger.alive:
            await self._stop_child(self.messenger)
        return self._launch(self.messenger)

    async def _messenger_ready(self, fut: asyncio.Future[Ready], worker: Ready) -> Ready:
        """The messenger maps the worker's KV cache first (MapKV), then is Ready."""
        # A PUSH to a messenger that died meanwhile would wait forever.
        send = asyncio.ensure_future(self.to_messenger.send(MapKV(worker.kv)))
        await asyncio.wait([send, self.messenger.exited], return_when=asyncio.FIRST_COMPLETED)
        send.cancel()  # a no-op once sent
        return await self._wait_ready(self.messenger, fut)

    def _launch(self, child: ChildProcess) -> asyncio.Future[Ready]:
        fut = asyncio.get_running_loop().create_future()
        self._ready[child.name] = fut
        child.start()
        return fut

    async def _wait_ready(self, child: ChildProcess, fut: asyncio.Future[Ready]) -> Ready:
        done, _ = await asyncio.wait([fut, child.exited], timeout=STARTUP_TIMEOUT_S,
                                     return_when=asyncio.FIRST_COMPLETED)  # fmt: skip
        if fut not in done:
            if child.alive:  # still loading after STARTUP_TIMEOUT_S: it goes before anything new starts
                await child.stop(0)
            raise ChildDied(f"{child.name} did not become ready (exit code {child.proc.exitcode})")
        child.ready = True
        return fut.result()

    # ---- what the serving layer calls ----------------------------------------------------
    async def run_step(self, so: SchedulerOutput) -> ModelOutput:
        """One step on the worker; ChildDied if the worker dies before it answers."""
        self._step = asyncio.get_running_loop().create_future()
        self.step_started = time.monotonic()
        try:
            await self.to_worker.send(Step(so))
            return (await self._step).output
        finally:
            self._step = None
            self.step_started = None

    def send_cache_task(self, task: CacheTask) -> None:
        """Hand a task to the messenger; one that cannot reach it fails at once."""

        async def send() -> None:
            if self.messenger.alive and self.messenger.ready:
                try:
                    await self.to_messenger.send(task)
                    return
                except zmq.ZMQError:
                    pass
            await self.events.on_cache_done(CacheTaskDone.failed(task.task_id, task.request_id,
                                                                 "the cache messenger is not running"))  # fmt: skip

        t = asyncio.get_running_loop().create_task(send())
        self._sends.add(t)
        t.add_done_callback(self._sends.discard)

    def stuck(self, limit_s: float) -> bool:
        """Whether the step in flight has run longer than `limit_s` (the watchdog stops)."""
        return self.step_started is not None and time.monotonic() - self.step_started > limit_s

    # ---- reports and exits ---------------------------------------------------------------
    async def _read_reports(self) -> None:
        by_name = {c.name: c for c in self.children}
        while True:
            try:
                msg = await self.reports.recv()
            except BadFrame as e:
                self.rejected_frames += 1
                log.warning("frame_rejected", channel="reports", reason=str(e))
                continue
            if isinstance(msg, Ready):
                fut = self._ready.pop(msg.process, None)
                if fut is not None and not fut.done():
                    child = by_name[msg.process]
                    log.info("child_ready", child=child.name, child_pid=msg.pid, duration_ms=ms_since(child.started_at))
                    fut.set_result(msg)
            elif isinstance(msg, StepDone):
                if self._step is not None and not self._step.done():
                    self._step.set_result(msg)
                else:
                    log.warning("late_step_result", step=msg.output.step)
            elif isinstance(msg, CacheTaskDone):
                await self.events.on_cache_done(msg)
            elif isinstance(msg, Dead):
                log.error("child_reported_dead", child=msg.process, reason=msg.reason)
                child = by_name.get(msg.process)
                if child is not None and child.pid == msg.pid:
                    child.said_dead(msg.reason)

    async def run(self, events: ChildEvents) -> None:
        """Watch the children until the daemon stops; a lost child is handled, then restarted,
        and `events` (the serving layer) hears of each loss, restart and messenger report."""
        self.events = events
        while True:
            pending = {}
            for c in self.children:  # a child lost before this loop looked is handled too
                if not c.handled:
                    pending[c.exited] = pending[c.dead] = c
            if not pending:  # nothing left to watch: the daemon is on its way out
                await asyncio.Event().wait()
            done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for child in {pending[f] for f in done}:
                if not await self._on_lost(child):
                    return

    async def _on_lost(self, child: ChildProcess) -> bool:
        """Handle one lost child and restart it; False when the supervisor gave up."""
        child.handled = True
        if child.dead.done():
            reason = child.dead.result()
        else:
            reason = f"exited with code {child.exited.result()}"
        message = f"{child.name} died: {reason}"
        details = {"child": child.name, "child_pid": child.pid, "reason": reason,
                   "exit_code": child.exited.result() if child.exited.done() else None}  # fmt: skip
        if child is self.messenger:
            # Only the transfers in flight fail (or recompute); requests in decode go on.
            log.error("child_dead", **details)
            await self.events.on_messenger_lost()
        else:
            if self._step is not None and not self._step.done():
                self._step.set_exception(ChildDied(message))
            await self.events.on_worker_lost(message, details)
        await child.stop(CHILD_STOP_TIMEOUT_S)  # it said Dead: it is on its way out
        policy = self.cfg.daemon.on_worker_death
        while True:  # a restart that dies before it is Ready (killed again, say) is tried again
            if self.stopping or policy == "exit" or self.restarts >= self.cfg.daemon.max_worker_restarts:
                log.error("daemon_exiting", reason=message, policy=policy, restarts=self.restarts)
                self._give_up()
                return False
            self.restarts += 1
            try:
                if child is self.worker:
                    ready = await self._start_worker()  # the old messenger maps the dead worker's KV cache
                    self.events.on_worker_ready(ready)
                else:
                    ready = await self._messenger_ready(await self._launch_messenger(), self._worker_ready)
                break
            except ChildDied as e:
                message = str(e)
                log.error("child_restart_failed", child=child.name, reason=message, restarts=self.restarts)
                for c in self.children:  # whatever died in the attempt is started again with it
                    if not c.alive:
                        c.handled = True
        log.info("child_restarted", child=child.name, child_pid=ready.pid, restarts=self.restarts)
        return True

    # ---- shutdown and status -------------------------------------------------------------
    async def _stop_child(self, child: ChildProcess) -> None:
        with contextlib.suppress(TimeoutError, zmq.ZMQError):
            await asyncio.wait_for(self._channels[child.name].send(Shutdown()), 1.0)
        await child.stop(CHILD_STOP_TIMEOUT_S)

    async def shutdown(self) -> None:
        """Shutdown to every child (SIGKILL for one that lingers), then close the channels."""
        if self._reader is not None:
            self._reader.cancel()
        await asyncio.gather(*(self._stop_child(c) for c in self.children if c.alive))
        for chan in (self.reports, self.to_worker, self.to_messenger):
            chan.close()
        shutil.rmtree(self.ipc_dir, ignore_errors=True)

    def status(self) -> dict[str, Any]:
        return {
            "worker_restarts": self.restarts,
            "internal_frames_rejected": self.rejected_frames,
            "processes": {c.name: {"pid": c.pid, "alive": c.alive and c.ready} for c in self.children},
        }
