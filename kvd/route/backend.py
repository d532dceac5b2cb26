"""Backend: one instance behind the router — where it answers, how busy and whether it is up.

    backends = Backend.from_config(cfg.route)    # run dirs read at start; an instance not started yet: down
    b.url, b.endpoint                            # its HTTP API, its ZeroMQ client API ("" until its files appear)
    b.reread()                                   # its run dir again: True if an endpoint moved (or first appeared)
    b.in_flight                                  # requests the router has open on it
    b.requests, b.failovers, b.errors            # what the router counted there
    b.mark_down(reason, probe)                   # no request goes to it until `probe` finds /health 200
    b.watch(probe)                               # one down from the start: probed the same way

A backend is down from a refused connection (or a 503 before its answer began) until a
/health probe answers 200; the probes wait `retry_interval_s`, doubling up to
MAX_RETRY_INTERVAL_S, so a dead instance costs a request nothing and a returning one is
used within seconds. An instance given by its run dir may come back on other ports (random
ones, as `kvd launch` and the default config give): before each probe the router reads the
run dir again (`reread`) and points its sockets at what it finds. An instance whose run dir
has no `endpoint` file yet at the router's start (it is not started, or still loading) starts
down with no endpoints and is probed the same way, so the router need not wait for it; until
its files first appear a probe only reads them, every `retry_interval_s` with no back-off.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path

import structlog

from kvd.config import RouteConfig, RouteInstance

log = structlog.get_logger("kvd.route")

MAX_RETRY_INTERVAL_S = 30.0


class Backend:
    """One instance: its endpoints, the router's requests on it, up or down."""

    def __init__(self, name: str, url: str, events: str = "", snapshot: str = "", endpoint: str = "",
                 source: RouteInstance | None = None) -> None:  # fmt: skip
        self.name = name
        self.source = source  # the config entry: its run dir and the endpoints it gives itself
        self.url = url.rstrip("/")
        self.endpoint = endpoint  # its ZeroMQ client endpoint; "": the router's ZeroMQ clients never reach it
        self.events = events  # "": it publishes no KV events; its prefix never matches
        self.snapshot = snapshot
        self.in_flight = 0
        self.up = bool(self.url)  # "": its run dir had no files at the router's start (`watch` finds them)
        # what the router counted here (kvd.route.metrics and `kvd status` read them)
        self.requests = 0  # forwarded to it
        self.hit_blocks = 0  # prompt blocks it held of those
        self.failovers = 0  # refused before they started
        self.errors = 0  # failed after their answer began
        self._probe: asyncio.Task | None = None

    @property
    def reads_run_dir(self) -> bool:
        """Whether its endpoints (those its config entry leaves "") come from a run dir."""
        return self.source is not None and bool(self.source.run_dir)

    @classmethod
    def from_config(cls, cfg: RouteConfig) -> list[Backend]:
        """The configured instances; an endpoint left "" is read from the instance's run dir. One
        whose run dir has no files yet (not started) is down, with only the endpoints the config
        gives, until `watch` finds them and its /health."""
        backends = []
        for name, inst in zip(cfg.names, cfg.instances):
            try:
                backends.append(cls(name, *_endpoints(inst), source=inst))
            except OSError as e:
                backends.append(cls(name, "", inst.events, inst.snapshot, inst.endpoint, source=inst))
                why = f"not started yet: {e.filename} is missing" if isinstance(e, FileNotFoundError) else str(e)
                log.warning("instance_down", instance=name, run_dir=inst.run_dir, reason=why)
        return backends

    def reread(self) -> bool:
        """Read the run dir again; True if an endpoint changed (then they are the new ones).
        An instance stopped or still starting has no files: its endpoints stay as they were."""
        if self.source is None or not self.source.run_dir:
            return False
        try:
            url, events, snapshot, endpoint = _endpoints(self.source)
        except OSError:
            return False
        if (url.rstrip("/"), events, snapshot, endpoint) == (self.url, self.events, self.snapshot, self.endpoint):
            return False
        log.info("instance_moved" if self.url else "instance_found", instance=self.name, url=url, endpoint=endpoint,
                 events=events, was={"url": self.url, "endpoint": self.endpoint, "events": self.events})  # fmt: skip
        self.url, self.events, self.snapshot, self.endpoint = url.rstrip("/"), events, snapshot, endpoint
        return True

    def mark_down(self, reason: str, probe: Callable[[Backend], Awaitable[bool]], interval_s: float) -> None:
        """Stop sending it requests until `probe(self)` is True (tried after a back-off)."""
        if not self.up:
            return
        self.up = False
        log.warning("instance_down", instance=self.name, url=self.url, reason=reason)
        self.watch(probe, interval_s)

    def watch(self, probe: Callable[[Backend], Awaitable[bool]], interval_s: float) -> None:
        """While it is down (from the start, or marked so): probe it after a back-off until
        `probe(self)` is True, then it is up."""
        if not self.up and (self._probe is None or self._probe.done()):
            self._probe = asyncio.get_running_loop().create_task(self._recover(probe, interval_s))

    async def _recover(self, probe: Callable[[Backend], Awaitable[bool]], interval_s: float) -> None:
        wait = interval_s
        while True:
            await asyncio.sleep(wait)
            if await probe(self):
                self.up = True
                log.info("instance_up", instance=self.name, url=self.url)
                return
            if self.url:  # never found yet: a probe only reads its run dir, cheap enough at the first interval
                wait = min(2 * wait, MAX_RETRY_INTERVAL_S)

    def close(self) -> None:
        if self._probe is not None:
            self._probe.cancel()


def _endpoints(inst: RouteInstance) -> tuple[str, str, str, str]:
    """(url, events, snapshot, endpoint) of a config entry: each one it leaves "" read from its
    run dir (OSError when a file it relies on is missing: the instance is not up). `endpoint` is
    read first: an instance writes it last, once it serves, so the files read after it are the
    ones of that start (not a start's half-written set)."""
    run_dir = Path(inst.run_dir).expanduser() if inst.run_dir else None

    def read(given: str, file: str, optional: bool = False) -> str:
        if given or run_dir is None:
            return given
        path = run_dir / file
        if optional and not path.exists():
            return ""
        return path.read_text().strip()

    endpoint = read(inst.endpoint, "endpoint")
    events = read(inst.events, "kv_events_endpoint", optional=True)
    snapshot = read(inst.snapshot, "kv_snapshot_endpoint", optional=not events)
    return read(inst.url, "http_endpoint"), events, snapshot, endpoint
