"""`kvd route`: the OpenAI HTTP API and the ZeroMQ client API in front of several instances,
each request sent where its prompt's KV blocks already are.

    POST /v1/completions, /v1/chat/completions   tokenized and hashed once, forwarded to one instance
    GET  /v1/models                              forwarded to a live instance
    GET  /health                                 200 while an instance is up, else 503
    GET  /metrics                                the router's Prometheus registry (kvd.route.metrics)

Per request: the body's prompt is tokenized as the instances do it (kvd.route.prompt), hashed
with each instance's block size and algorithm (from its snapshot, kvd.route.index), matched
against the KV index the instances' events keep (kvd.route.subscriber), and the live
instances are ordered by the policy (kvd.route.policy). The body goes unchanged to the first,
over a keep-alive aiohttp session, and its answer comes back byte for byte (server-sent
events included) with `X-Kvd-Instance` naming it. The router does no model work. Its ZeroMQ
client API (kvd.route.zmq_api) routes a client's Generate the same way and answers Status
with `Router.status` (`kvd status` against the router's endpoint).

Failure: an instance that refuses the connection, does not accept it within
`connect_timeout_s`, or answers 503 (draining, restarting) before its answer began is marked
down (kvd.route.backend probes its /health to bring it back) and the request goes to the next
in the order; with none left the client gets 503. An instance that fails after the answer
began ends a stream with an error event and `[DONE]`, or a whole response with 502; an answer
not done within `request_timeout_s` ends the same way with 504. A body the router cannot
read is still forwarded: the instance answers its own 400.

Start-up: an instance whose run dir has no files yet (started after the router, or still
loading) is down until its files appear and its /health answers (kvd.route.backend); the
router does not wait for it. Until an instance is up, requests get 503 ("route: no instance
is up") at once.

Under systemd (Type=notify; `kvd launch` listens the same way): READY=1 once the endpoint
files are written (after at most `connect_timeout_s` for the ZeroMQ connections of the
instances up at start; never for one not started), WATCHDOG=1 every half WATCHDOG_USEC
while the event loop runs, STOPPING=1 at SIGTERM/SIGINT.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import structlog
import zmq
import zmq.asyncio
from aiohttp import web

from kvd.config import KvdConfig, resolve_run_dir
from kvd.daemon.notify import Notifier
from kvd.daemon.openai_api import DONE, JSON, error_body, sse, start_site
from kvd.ipc import publish_endpoint
from kvd.kv_events import Load
from kvd.route.backend import Backend
from kvd.route.index import KVIndex
from kvd.route.metrics import RouteMetrics
from kvd.route.policy import Policy
from kvd.route.prompt import PromptHasher
from kvd.route.subscriber import KVEventSubscriber
from kvd.route.zmq_api import ZmqFront

log = structlog.get_logger("kvd.route")

# Per-connection headers: never passed on (aiohttp frames each side's body itself).
_HOP = frozenset({"host", "connection", "keep-alive", "transfer-encoding", "content-length", "te", "trailer",
                  "upgrade", "proxy-authorization", "proxy-authenticate", "date", "server"})  # fmt: skip
_RETRY_ELSEWHERE = 503  # an instance that answers this before its answer began has not started the request
DRAINING = "route: shutting down"


def _json(status: int, obj, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(status=status, body=JSON.encode(obj), content_type="application/json", headers=headers)


def _error(status: int, message: str) -> web.Response:
    return _json(status, error_body(status, message))


class Router:
    """The HTTP server, the instances behind it, their KV index and the policy that picks one."""

    def __init__(self, cfg: KvdConfig, tokenizer, backends: list[Backend]) -> None:
        self.cfg = cfg
        self.route = cfg.route
        self.backends = {b.name: b for b in backends}
        self.policy = Policy(cfg.route.policy, cfg.route.load_weight)
        self.hasher = PromptHasher(tokenizer)
        self.index = KVIndex()
        self.subscriber = KVEventSubscriber(self.index, secret=cfg.pd.secret)
        for b in backends:
            if b.events or b.reads_run_dir:  # from its run dir: followed once its files say where
                self.subscriber.add(b.name, b.events, b.snapshot)
        self.prompt_blocks = 0  # full prompt blocks of the requests routed with hashes
        self.metrics = RouteMetrics(self.backends, lambda: self.prompt_blocks)
        self.url: str | None = None
        self.zmq: ZmqFront | None = None
        self.draining = False  # SIGTERM: new requests get 503 while those in flight finish
        self._t_start = time.monotonic()
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None
        self._timeout = aiohttp.ClientTimeout(total=cfg.route.request_timeout_s,
                                              sock_connect=cfg.route.connect_timeout_s)  # fmt: skip
        self._probe_timeout = aiohttp.ClientTimeout(total=cfg.route.connect_timeout_s + 1.0)

    # ---- lifecycle ---------------------------------------------------------------------
    def bind_zmq(self, ctx: zmq.asyncio.Context) -> str:
        """Bind the ZeroMQ client API (`[daemon]` host and port); returns its endpoint."""
        self.zmq = ZmqFront(self, ctx)
        return self.zmq.bind()

    async def start(self) -> str:
        """Open the client session, bind (port 0: a free one) and serve; returns the base URL."""
        # No cookie jar: one client's cookies must never ride on another's requests (and it costs per request).
        self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=60.0),
                                              cookie_jar=aiohttp.DummyCookieJar(), auto_decompress=False)  # fmt: skip
        app = web.Application(client_max_size=self.cfg.http.max_body_bytes, middlewares=[self._guard])
        app.router.add_post("/v1/completions", self.generate)
        app.router.add_post("/v1/chat/completions", self.generate)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/health", self.health)
        app.router.add_get("/metrics", self.metrics_page)
        self._runner, self.url = await start_site(app, self.cfg.http.host, self.cfg.http.port)
        for b in self.backends.values():  # not started yet: probed until its files and /health appear
            b.watch(self._probe, self.route.retry_interval_s)
        log.info("route_serving", url=self.url, policy=self.policy.name,
                 instances={b.name: b.url for b in self.backends.values()})  # fmt: skip
        return self.url

    async def close(self) -> None:
        if self.zmq is not None:
            self.zmq.close()
        for b in self.backends.values():
            b.close()
        if self._runner is not None:
            await self._runner.cleanup()
        if self._session is not None:
            await self._session.close()
        self.subscriber.close()

    async def drain(self, timeout_s: float) -> None:
        """Refuse new requests (503) and wait up to `timeout_s` for those in flight to end."""
        self.draining = True
        t0 = time.monotonic()
        log.info("route_draining", in_flight=self.in_flight(), timeout_s=timeout_s)
        while self.in_flight() and time.monotonic() - t0 < timeout_s:
            await asyncio.sleep(0.05)
        log.info("route_drained", left=self.in_flight(), duration_ms=round(1000 * (time.monotonic() - t0), 1))

    def in_flight(self) -> int:
        """Requests the router has in flight on any instance, over either API."""
        return sum(b.in_flight for b in self.backends.values())

    def status(self) -> dict[str, Any]:
        """What `kvd status` shows for the router."""
        blocks = self.prompt_blocks
        hits = sum(b.hit_blocks for b in self.backends.values())
        return {
            "role": "router",
            "state": "ready" if any(b.up for b in self.backends.values()) else "no instance up",
            "endpoint": self.zmq.endpoint if self.zmq is not None else None,
            "http_url": self.url,
            "uptime_s": round(time.monotonic() - self._t_start, 3),
            "policy": self.policy.name,
            "prefix_hit_rate": hits / blocks if blocks else 0.0,
            **(self.zmq.status() if self.zmq is not None else {}),
            "kv_events": {"batches": self.subscriber.num_batches, "gaps": self.subscriber.num_gaps,
                          "snapshots": self.subscriber.num_snapshots},  # fmt: skip
            "instances": {
                name: {"up": b.up, "in_flight": b.in_flight, "load": _fields(self.subscriber.loads.get(name)),
                       "requests": b.requests, "failovers": b.failovers, "errors": b.errors, "url": b.url,
                       "endpoint": b.endpoint,
                       "kv_events_seq": self.index.seq(name)}  # fmt: skip
                for name, b in self.backends.items()
            },
            "processes": {"router": {"pid": os.getpid(), "alive": True}},
        }

    # ---- endpoints ---------------------------------------------------------------------
    @web.middleware
    async def _guard(self, request: web.Request, handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except web.HTTPException as e:  # aiohttp's own: no route, wrong method, body too large
            if e.status < 400:
                raise
            return _error(e.status, f"path: {request.method} {request.path}: {e.reason}")

    async def health(self, request: web.Request) -> web.Response:
        if self.draining:
            return _error(503, DRAINING)
        up = [b.name for b in self.backends.values() if b.up]
        if not up:
            return _error(503, "health: no instance is up")
        return _json(200, {"status": "ok", "instances_up": up})

    async def metrics_page(self, request: web.Request) -> web.Response:
        from prometheus_client import CONTENT_TYPE_LATEST

        return web.Response(body=self.metrics.render(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def models(self, request: web.Request) -> web.StreamResponse:
        return await self._forward(request, b"", self.live_order(None))

    async def generate(self, request: web.Request) -> web.StreamResponse:
        if self.draining:
            return _error(503, DRAINING)
        raw = await request.read()
        matched = None
        if self.policy.uses_prefix:
            ids = self.hasher.token_ids(request.path, raw)
            matched = self.matched(ids) if ids is not None else None
        return await self._forward(request, raw, self.live_order(matched), matched)

    # ---- routing -----------------------------------------------------------------------
    def matched(self, ids: list[int]) -> dict[str, tuple[int, int]]:
        """Per instance with KV events: (leading blocks of the prompt it holds, full blocks)."""
        by_layout: dict[tuple[int, str], list[str]] = {}
        for name in self.index.instances:
            layout = self.index.layout(name)
            if layout is not None:
                by_layout.setdefault(layout, []).append(name)
        out = {}
        for (block_size, algo), names in by_layout.items():  # one layout in any sane deployment
            hashes = self.hasher.hashes(ids, block_size, algo)
            held = self.index.prefix_match(hashes)
            out.update({name: (held.get(name, 0), len(hashes)) for name in names})
        return out

    def live_order(self, matched: dict[str, tuple[int, int]] | None) -> list[Backend]:
        live = [name for name, b in self.backends.items() if b.up]
        held = short = None
        if matched:
            held = {name: h for name, (h, _) in matched.items()}
            short = {name: self.short(name, total - h) for name, (h, total) in matched.items()}
        order = self.policy.order(live, {n: self.load(n) for n in live}, held, short)
        return [self.backends[name] for name in order]

    def short(self, name: str, blocks: int) -> int:
        """Of `blocks` new blocks for a prompt, how many `name` has no room for: more than its
        free and cached-only blocks (as it last reported them; 0 when it reports none)."""
        reported = self.subscriber.loads.get(name)
        return max(0, blocks - reported.free_blocks - reported.cached_blocks) if reported is not None else 0

    def load(self, name: str) -> int:
        """`name`'s requests: the router's own in flight there, or the instance's waiting and
        running (its KV events' load) when those are more (clients of its own, n choices)."""
        own = self.backends[name].in_flight
        reported = self.subscriber.loads.get(name)
        return max(own, reported.waiting + reported.running) if reported is not None else own

    async def _forward(self, request: web.Request, raw: bytes, order: list[Backend],
                       matched: dict[str, tuple[int, int]] | None = None) -> web.StreamResponse:  # fmt: skip
        """Send the request to the first of `order` that takes it; pass its answer back."""
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _HOP}
        for i, b in enumerate(order):
            self.started(b)
            try:
                try:
                    upstream = await self._session.request(request.method, b.url + request.path_qs, data=raw or None,
                                                           headers=headers, timeout=self._timeout)  # fmt: skip
                except (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError,
                        aiohttp.ServerDisconnectedError) as e:  # fmt: skip
                    self._refused(b, f"{type(e).__name__}: {e}")
                    continue
                except (aiohttp.ClientError, TimeoutError) as e:  # it had the request: not sent twice
                    return self._failed(b, e)
                try:
                    if upstream.status == _RETRY_ELSEWHERE and i + 1 < len(order):
                        self._refused(b, "answered 503")
                        continue
                    self.counted(b, matched)
                    return await self._pass_back(request, upstream, b)
                finally:
                    upstream.release()
            finally:
                self.ended(b)
        return _error(503, "route: no instance is up" if not order else "route: every instance refused the request")

    # ---- accounting, for either API ------------------------------------------------------
    def started(self, b: Backend) -> None:
        """A request is in flight on `b` (it weighs in the policy's load until `ended`)."""
        b.in_flight += 1

    def ended(self, b: Backend) -> None:
        b.in_flight -= 1

    def counted(self, b: Backend, matched: dict[str, tuple[int, int]] | None) -> None:
        """`b` took a request: counted as routed there, with the prompt blocks it held."""
        b.requests += 1
        if matched and b.name in matched:
            held, total = matched[b.name]
            b.hit_blocks += held
            self.prompt_blocks += total

    def lost(self, b: Backend, why: str) -> None:
        """`b`'s connection broke: down until its /health says otherwise."""
        b.mark_down(why, self._probe, self.route.retry_interval_s)

    def _refused(self, b: Backend, reason: str) -> None:
        """`b` did not start the request: it is down until its /health says otherwise."""
        b.failovers += 1
        self.lost(b, reason)

    async def _probe(self, b: Backend) -> bool:
        """Whether `b` is back: its run dir read again (it may have restarted on other ports),
        then its /health."""
        if b.reread():
            if self.zmq is not None:
                self.zmq.repoint(b)
            if b.events:
                self.subscriber.repoint(b.name, b.events, b.snapshot)
        if not b.url:  # its run dir has no files yet
            return False
        try:
            async with self._session.get(b.url + "/health", timeout=self._probe_timeout) as r:
                return r.status == 200
        except (aiohttp.ClientError, TimeoutError):
            return False

    async def _pass_back(self, request: web.Request, upstream: aiohttp.ClientResponse,
                         b: Backend) -> web.StreamResponse:  # fmt: skip
        """The instance's status, headers and body, byte for byte, as they come."""
        headers = {k: v for k, v in upstream.headers.items() if k.lower() not in _HOP}
        headers["X-Kvd-Instance"] = b.name
        if upstream.content_type != "text/event-stream":  # a whole response: read it, answer with its length
            try:
                body = await upstream.read()
            except (aiohttp.ClientError, TimeoutError) as e:
                return self._failed(b, e)
            return web.Response(status=upstream.status, body=body, headers=headers)
        resp = web.StreamResponse(status=upstream.status, headers=headers)
        await resp.prepare(request)
        try:
            async for data in upstream.content.iter_any():
                await resp.write(data)
        except (aiohttp.ClientError, TimeoutError) as e:
            status, message = self._failure(b, e)
            await resp.write(sse(error_body(status, message)) + DONE)
        await resp.write_eof()
        return resp

    def _failed(self, b: Backend, e: Exception) -> web.Response:
        """The answer of an instance that failed after it had the request: 502, or 504 past the timeout."""
        return _error(*self._failure(b, e))

    def _failure(self, b: Backend, e: Exception) -> tuple[int, str]:
        status = 504 if isinstance(e, TimeoutError) else 502
        why = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
        b.errors += 1
        log.warning("instance_failed", instance=b.name, status=status, error=why)
        if status == 502:  # its connection broke: more requests would meet the same, until /health says otherwise
            self.lost(b, why)
        return status, f"route: instance {b.name!r} failed: {why}"


async def run(cfg: KvdConfig, notifier: Notifier | None = None, watchdog_s: float | None = None) -> int:
    """Serve until SIGTERM/SIGINT; returns the exit code. `notifier`: systemd's socket (READY=1,
    STOPPING=1, and WATCHDOG=1 every `watchdog_s` when that is set)."""
    from kvd.worker.models import load_tokenizer, resolve_model

    t0 = time.monotonic()
    notifier = notifier or Notifier(None)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()

    def on_signal() -> None:
        if not stop.is_set():
            notifier.stopping()
            stop.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal)
    if not cfg.route.instances:
        log.error("route_start_failed", reason="route.instances: no instance configured")
        return 2
    try:
        backends = Backend.from_config(cfg.route)
        tokenizer = await asyncio.to_thread(load_tokenizer, resolve_model(cfg.model.model, cfg.model.cache_dir))
    except (OSError, ValueError) as e:
        log.error("route_start_failed", reason=f"{type(e).__name__}: {e}")
        return 1
    router = Router(cfg, tokenizer, backends)
    run_dir = resolve_run_dir(cfg)
    ctx = zmq.asyncio.Context()
    try:
        url = await router.start()
        endpoint = router.bind_zmq(ctx)
    except (OSError, zmq.ZMQError) as e:
        log.error("route_start_failed", reason=f"{type(e).__name__}: {e}")
        await router.close()
        ctx.term()
        return 1
    waiting = await router.zmq.connected(cfg.route.connect_timeout_s)
    if waiting:  # served without them until they answer (each request tries the connected ones)
        log.warning("instances_not_connected", instances=waiting, timeout_s=cfg.route.connect_timeout_s)
    publish_endpoint(run_dir / "endpoint", endpoint)
    publish_endpoint(run_dir / "http_endpoint", url)  # last: a launcher waiting on it finds both
    if not stop.is_set():  # every endpoint file is written: READY=1 says so (a signal meanwhile: never ready)
        notifier.ready(f"routing on {url}")
    log.info("route_ready", url=url, endpoint=endpoint, duration_ms=round(1000 * (time.monotonic() - t0), 1))
    failed: list[str] = []

    def watched(what: str):
        """Following the KV events ends by cancel (or at once with no instance to follow), the
        ZeroMQ API by cancel: an error would leave the index stale or the clients unserved, so
        the router stops with it (systemd restarts it)."""

        def done(task: asyncio.Task) -> None:
            if not task.cancelled() and task.exception() is not None:
                failed.append(f"{what}: {type(task.exception()).__name__}: {task.exception()}")
                log.error("route_failed", reason=failed[-1])
                stop.set()

        return done

    tasks = {"kv events": asyncio.create_task(router.subscriber.run()),
             "zeromq api": asyncio.create_task(router.zmq.run())}  # fmt: skip
    for what, task in tasks.items():
        task.add_done_callback(watched(what))
    watchdog = asyncio.create_task(_watchdog(notifier, watchdog_s)) if watchdog_s else None
    await stop.wait()
    if not failed:  # in-flight answers finish (the ZeroMQ API still relays them); new requests get 503
        await router.drain(cfg.daemon.drain_timeout_s)
    if watchdog is not None:
        watchdog.cancel()
    for task in tasks.values():
        task.cancel()
    await asyncio.gather(*tasks.values(), return_exceptions=True)
    _unpublish(run_dir / "endpoint", endpoint)
    _unpublish(run_dir / "http_endpoint", url)
    await router.close()
    ctx.term()
    log.info("route_stopped", exit_code=1 if failed else 0)
    return 1 if failed else 0


async def _watchdog(notifier: Notifier, interval_s: float) -> None:
    """WATCHDOG=1 while the event loop turns: a blocked loop stops the pings and systemd restarts the router."""
    while True:
        await asyncio.sleep(interval_s)
        notifier.watchdog()


def _fields(load: Load | None) -> dict[str, int] | None:
    """An instance's reported load as a map (status is JSON to `kvd status --json`)."""
    return msgspec.structs.asdict(load) if load is not None else None


def _unpublish(path: Path, url: str) -> None:
    try:
        if path.read_text().strip() == url:
            path.unlink()
    except OSError:
        pass


def route(cfg: KvdConfig, notify_socket: str | None = None, watchdog_s: float | None = None) -> int:
    """`kvd route`: JSON logs, uvloop, then `run` (NOTIFY_SOCKET and the watchdog's period as
    the command line read them from the environment)."""
    import uvloop

    from kvd.logs import configure_logging

    configure_logging(cfg.log, "route", "route")
    return uvloop.run(run(cfg, Notifier(notify_socket), watchdog_s))
