"""The daemon process: the wiring, the TaskGroup, signals and the drain.

    kvd serve → serve(cfg) → Daemon.run()

Start-up: the role's class is picked from the config, once (`ROLES`); the supervisor
spawns the worker (and, for a role that moves KV through the pool, the cache messenger)
and awaits their Ready (the worker's carries the model's facts and its number of KV
blocks) while a thread loads the tokenizer; then Serving is built with all of it, builds
its role (a prefill instance binds `<run_dir>/pd_endpoint`, a decode instance links to
its prefill instances) and the Engine with the role's KV connector; the client ROUTER
binds and `<run_dir>/endpoint` is written; systemd hears READY=1. Each object gets what
it needs in its constructor. The daemon itself never imports torch.

With `[http] port` set, the OpenAI HTTP API (`kvd.daemon.http`) serves beside it and its
base URL goes to `<run_dir>/http_endpoint` first. With `[kv_events] port` set, the KV-event
publisher (`kvd.daemon.kv_publisher`) binds before Serving is built and answers snapshot
requests beside the step loop.

Then a TaskGroup runs the frontend's reader, the step loop, the text stage, the
supervisor's watch of the children, the role's readers and a one-second ticker (deadlines, leases, idle integrity
checks, watchdog pings, metrics). SIGTERM drains: new requests get 503, in-flight ones
get `drain_timeout_s` to finish, the rest get 503, the children get Shutdown, exit 0.
The layers import downwards only: main → frontend, http, pd → serving → supervisor.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path
from typing import Any

import structlog
import zmq
import zmq.asyncio

from kvd.config import KvdConfig, resolve_run_dir
from kvd.cpu import use_huge_pages
from kvd.daemon import health
from kvd.daemon.frontend import Frontend
from kvd.daemon.http import HttpFrontend
from kvd.daemon.kv_publisher import KVEventPublisher
from kvd.daemon.notify import Notifier
from kvd.daemon.pd.decode import DecodeRole
from kvd.daemon.pd.prefill import PrefillRole
from kvd.daemon.role import Role
from kvd.daemon.serving import Serving
from kvd.daemon.supervisor import ChildDied, Supervisor
from kvd.ipc import bind_tcp, publish_endpoint
from kvd.logs import ms_since
from kvd.messages import ErrorCode

log = structlog.get_logger("kvd.daemon")

FINAL_REPLIES_LINGER_MS = 500
ROLES: dict[str, type[Role]] = {"unified": Role, "prefill": PrefillRole, "decode": DecodeRole}


class Daemon:
    """Wires one instance together and runs it until it stops; owns its lifetime and exit code."""

    def __init__(self, cfg: KvdConfig, notifier: Notifier) -> None:
        self.cfg = cfg
        self.notifier = notifier
        self.run_dir = resolve_run_dir(cfg)
        self.ctx = zmq.asyncio.Context()
        self.exit_code = 0
        self._stop = asyncio.Event()
        self._t_start = time.monotonic()
        self._t_stop: float | None = None  # when the drain (or a stop without one) began
        self._released = False
        self.metrics = None
        self.metrics_url: str | None = None
        if cfg.metrics.prometheus_port >= 0 or cfg.http.enabled:
            from kvd.metrics import Metrics

            self.metrics = Metrics()
        self.role = ROLES[cfg.daemon.role]  # the one place a role name becomes a class
        self.supervisor = Supervisor(self.ctx, cfg, self._fatal, self.role.moves_kv)
        self.serving: Serving | None = None  # built once the worker is Ready and the tokenizer loaded
        self.frontend: Frontend | None = None
        self.endpoint: str | None = None
        self.http: HttpFrontend | None = None
        self.kv_events: KVEventPublisher | None = None

    def _fatal(self) -> None:
        """Stop with exit code 1 (systemd restarts us): a child lost for good, a broken invariant."""
        self.exit_code = 1
        self._stop.set()

    # ---- the run -----------------------------------------------------------------------
    async def run(self) -> int:
        from kvd.worker.models import load_tokenizer, resolve_model

        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.begin_drain)
        use_huge_pages(self.cfg.model.huge_pages)  # before the children start: they read it at their first tensor
        try:
            model_dir = resolve_model(self.cfg.model.model, self.cfg.model.cache_dir)
            tokenizer = asyncio.create_task(asyncio.to_thread(load_tokenizer, model_dir))
            ready = await self.supervisor.start()
            if self.cfg.kv_events.enabled:
                self.kv_events = KVEventPublisher(self.cfg, self.run_dir)
            self.serving = Serving(self.cfg, self.supervisor, await tokenizer, self.role, self._fatal, self.metrics,
                                   kv_events=self.kv_events, ctx=self.ctx, run_dir=self.run_dir)  # fmt: skip
            self.serving.on_worker_ready(ready)
            self._start_metrics()
            await self._start_http()
            self._bind_frontend()  # last: its endpoint file says the instance serves
        except (ChildDied, OSError) as e:  # a child that never became Ready, a port taken
            log.error("daemon_start_failed", reason=f"{type(e).__name__}: {e}" if isinstance(e, OSError) else str(e))
            await self._release()
            self._close()
            return 1
        self.notifier.ready(f"serving on {self.endpoint}")
        log.info("daemon_ready", endpoint=self.endpoint, num_blocks=self.serving.engine.kv.num_blocks,
                 run_dir=str(self.run_dir), duration_ms=ms_since(self._t_start))  # fmt: skip
        try:
            async with asyncio.TaskGroup() as tg:
                frontend = tg.create_task(self.frontend.run())
                work = [self.serving.run(), self.serving.run_text(), self._ticker(), self.supervisor.run(self.serving),
                        *self.serving.role.readers(), *([self.kv_events.run()] if self.kv_events else [])]  # fmt: skip
                tasks = [tg.create_task(coro) for coro in work]
                await self._stop.wait()
                for t in tasks:
                    t.cancel()
                await self._release()  # meanwhile the frontend still answers: 503, shutting down
                frontend.cancel()
        except* Exception as eg:
            for e in eg.exceptions:
                log.error("daemon_crashed", error=f"{type(e).__name__}: {e}", exc_info=e)
            self.exit_code = 1
        if self._t_stop is None:  # stopped without a drain (a crash, an exit policy)
            self._t_stop = time.monotonic()
        await self._release()
        self._close()
        log.info("daemon_stopped", exit_code=self.exit_code, duration_ms=ms_since(self._t_stop))
        return self.exit_code

    def _bind_frontend(self) -> None:
        sock = self.ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        # A hard cap well above max_frame_bytes: libzmq drops a peer sending more than this.
        sock.setsockopt(zmq.MAXMSGSIZE, 8 * self.cfg.daemon.max_frame_bytes)
        d = self.cfg.daemon
        self.endpoint = bind_tcp(sock, d.host, d.port)
        self.frontend = Frontend(sock, self.serving, self.status, d.max_frame_bytes)
        publish_endpoint(self.run_dir / "endpoint", self.endpoint)

    async def _start_http(self) -> None:
        if not self.cfg.http.enabled:
            return
        from kvd.worker.models import served_model_name

        self.http = HttpFrontend(self.cfg, self.serving, self.cfg.http.served_model_name or
                                 served_model_name(self.cfg.model.model), self.metrics)  # fmt: skip
        publish_endpoint(self.run_dir / "http_endpoint", await self.http.start())

    def _start_metrics(self) -> None:
        m = self.cfg.metrics
        if self.metrics is None or m.prometheus_port < 0:
            return
        port = self.metrics.start_http(m.host, m.prometheus_port)
        self.metrics_url = f"http://{m.host}:{port}/metrics"
        log.info("metrics_serving", url=self.metrics_url)

    async def _release(self) -> None:
        """Stop serving and stop the children (once); new requests get 503 from here on."""
        if self._released:
            return
        self._released = True
        self.supervisor.stopping = True
        if self.serving is not None:
            self.serving.draining = True
        if self.http is not None:
            await self.http.close()  # its handlers write their last events first
            _unpublish(self.run_dir / "http_endpoint", self.http.url)
        await self.supervisor.shutdown()
        _unpublish(self.run_dir / "endpoint", self.endpoint)
        if self.metrics is not None:
            self.metrics.close()
        if self.serving is not None:
            self.serving.role.close()
        if self.kv_events is not None:
            self.kv_events.close()

    def _close(self) -> None:
        if self.frontend:
            # The last replies (the errors of a daemon that gives up) may still be queued in
            # libzmq: they get a moment to leave rather than vanish with the socket.
            self.frontend.sock.close(linger=FINAL_REPLIES_LINGER_MS)
        self.ctx.term()

    # ---- drain -------------------------------------------------------------------------
    def begin_drain(self) -> None:
        if self.serving is None:  # still starting: nothing is served yet, stop once started
            self._t_stop = time.monotonic()
            self._stop.set()
            return
        if self.serving.draining:
            return
        self._t_stop = time.monotonic()
        self.serving.draining = self.supervisor.stopping = True
        self.notifier.stopping()
        log.info("daemon_draining", in_flight=self.serving.num_client_requests,
                 timeout_s=self.cfg.daemon.drain_timeout_s)  # fmt: skip
        self.serving.spawn(self._drain())

    async def _drain(self) -> None:
        timeout = self.cfg.daemon.drain_timeout_s
        await self.serving.role.drain(timeout)
        try:
            await asyncio.wait_for(self.serving.idle.wait(), timeout)
        except TimeoutError:
            pass
        await self.serving.fail_all(ErrorCode.UNAVAILABLE, "daemon: shut down before the request finished")
        self._stop.set()

    # ---- housekeeping ------------------------------------------------------------------
    async def _ticker(self) -> None:
        d = self.cfg.daemon
        while True:
            await asyncio.sleep(min(1.0, d.heartbeat_interval_s))
            await self.serving.tick()
            if not self.supervisor.stuck(max(30.0, d.request_timeout_s)):
                self.notifier.watchdog()
            if self.metrics is not None and self.serving.engine is not None:
                processes = {name: p["alive"] for name, p in self.supervisor.status()["processes"].items()}
                self.metrics.update(self.serving.stats() | {"integrity_ok": self.serving.integrity == "ok",
                                                            "processes": processes})  # fmt: skip

    def status(self) -> dict[str, Any]:
        """What `kvd status` shows, assembled from each part's own."""
        serving = health.status(self.serving)
        children = self.supervisor.status()
        role = self.serving.role.status()
        return {
            "role": self.cfg.daemon.role,
            "endpoint": self.endpoint,
            "uptime_s": round(time.monotonic() - self._t_start, 3),
            **serving,
            "malformed_frames": self.frontend.num_malformed if self.frontend else 0,
            "internal_frames_rejected": children["internal_frames_rejected"],
            "worker_restarts": children["worker_restarts"],
            **({"pd": role} if role is not None else {}),
            "metrics_url": self.metrics_url,
            "http_url": self.http.url if self.http is not None else None,
            "kv_events": self.kv_events.status() if self.kv_events is not None else None,
            "processes": {"daemon": {"pid": os.getpid(), "alive": True}, **children["processes"]},
        }


def _unpublish(path: Path, endpoint: str | None) -> None:
    """Remove an endpoint file if it still names ours (a newer instance may have replaced it)."""
    try:
        if endpoint and path.read_text().strip() == endpoint:
            path.unlink()
    except OSError:
        pass


def serve(cfg: KvdConfig, notify_socket: str | None = None) -> int:
    """Run the daemon in the foreground until SIGTERM/SIGINT; returns the exit code."""
    import uvloop

    from kvd.logs import configure_logging

    configure_logging(cfg.log, process="daemon", role=cfg.daemon.role)
    daemon = Daemon(cfg, Notifier(notify_socket))
    return uvloop.run(daemon.run())
