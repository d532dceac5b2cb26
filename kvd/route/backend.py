"""Backend: one instance behind the router — where it answers, how busy and whether it is up.

    backends = Backend.from_config(cfg.route)    # run dirs read once, at start
    b.url, b.endpoint                            # its HTTP API, its ZeroMQ client API
    b.in_flight                                  # requests the router has open on it
    b.mark_down(reason, probe)                   # no request goes to it until `probe` finds /health 200

A backend is down from a refused connection (or a 503 before its answer began) until a
/health probe answers 200; the probes wait `retry_interval_s`, doubling up to
MAX_RETRY_INTERVAL_S, so a dead instance costs a request nothing and a returning one is
used within seconds.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path

import structlog

from kvd.config import RouteConfig

log = structlog.get_logger("kvd.route")

MAX_RETRY_INTERVAL_S = 30.0


class Backend:
    """One instance: its endpoints, the router's requests on it, up or down."""

    def __init__(self, name: str, url: str, events: str = "", snapshot: str = "", endpoint: str = "") -> None:
        self.name = name
        self.url = url.rstrip("/")
        self.endpoint = endpoint  # its ZeroMQ client endpoint; "": the router's ZeroMQ clients never reach it
        self.events = events  # "": it publishes no KV events; its prefix never matches
        self.snapshot = snapshot
        self.in_flight = 0
        self.up = True
        self._probe: asyncio.Task | None = None

    @classmethod
    def from_config(cls, cfg: RouteConfig) -> list[Backend]:
        """The configured instances; an endpoint left "" is read from the instance's run dir
        (OSError when a file the config relies on is missing: start the instances first)."""
        out = []
        for name, inst in zip(cfg.names, cfg.instances):
            run_dir = Path(inst.run_dir).expanduser() if inst.run_dir else None

            def read(given: str, file: str, optional: bool = False) -> str:
                if given or run_dir is None:
                    return given
                path = run_dir / file
                if optional and not path.exists():
                    return ""
                return path.read_text().strip()

            events = read(inst.events, "kv_events_endpoint", optional=True)
            snapshot = read(inst.snapshot, "kv_snapshot_endpoint", optional=not events)
            out.append(cls(name, read(inst.url, "http_endpoint"), events, snapshot,
                           read(inst.endpoint, "endpoint", optional=True)))  # fmt: skip
        return out

    def mark_down(self, reason: str, probe: Callable[[Backend], Awaitable[bool]], interval_s: float) -> None:
        """Stop sending it requests until `probe(self)` is True (tried after a back-off)."""
        if not self.up:
            return
        self.up = False
        log.warning("instance_down", instance=self.name, url=self.url, reason=reason)
        self._probe = asyncio.get_running_loop().create_task(self._recover(probe, interval_s))

    async def _recover(self, probe: Callable[[Backend], Awaitable[bool]], interval_s: float) -> None:
        wait = interval_s
        while True:
            await asyncio.sleep(wait)
            if await probe(self):
                self.up = True
                log.info("instance_up", instance=self.name, url=self.url)
                return
            wait = min(2 * wait, MAX_RETRY_INTERVAL_S)

    def close(self) -> None:
        if self._probe is not None:
            self._probe.cancel()
