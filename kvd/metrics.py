"""Prometheus metrics of one kvd instance, on a private registry.

Contract:
- `Metrics()` owns a private `CollectorRegistry`, so several instances (tests,
  several daemons in one process) never clash.
- `update(stats)` takes the dict `Engine.stats()` returns, plus
  `integrity_ok: bool` and `processes: {"worker-0": True, ...}` (alive or not).
  Gauges are set from it; the cumulative counts in it (`generated_tokens`,
  `prompt_tokens`, `preemptions`, `prefix_hit_tokens`) advance their counters by the increase
  since the previous call, and a count that went down (the engine was rebuilt,
  e.g. after a worker restart) counts from zero again, so counters stay
  monotonic. Keys that are absent leave their metric unchanged.
- Per-request facts, which `Engine.stats()` does not hold: `observe_ttft(s)`
  when a request's first token goes out, `observe_finish(reason, s)` when its
  final message does (counted by finish reason, e2e latency observed).
- `start_http(host, port)` serves `/metrics` from a daemon thread and returns
  the bound port (0: a random free port); `close()` stops it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    start_http_server,
)

TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
E2E_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)

# stats key -> (gauge name, help)
_GAUGES = {
    "waiting": ("kvd_queue_length", "Requests waiting to be scheduled."),
    "running": ("kvd_running_requests", "Requests in the running batch."),
    "blocks_free": ("kvd_blocks_free", "KV blocks free and holding no cached prefix."),
    "blocks_held": ("kvd_blocks_used", "KV blocks held by requests."),
    "blocks_cached_only": ("kvd_blocks_cached_only", "KV blocks free but still holding a cached prefix."),
    "blocks_total": ("kvd_blocks_total", "KV blocks in the pool."),
    "prefix_hit_rate": ("kvd_prefix_cache_hit_rate", "Share of queried prompt tokens found in the prefix cache."),
}
# stats key holding a cumulative count -> (counter name without _total, help)
_COUNTS = {
    "generated_tokens": ("kvd_generation_tokens", "Tokens generated."),
    "prompt_tokens": ("kvd_prompt_tokens", "Prompt tokens of admitted requests."),
    "preemptions": ("kvd_preemptions", "Requests preempted (recomputed later)."),
    "prefix_hit_tokens": ("kvd_prefix_cache_hit_tokens", "Prompt tokens served from the prefix cache."),
}


class Metrics:
    """The instance's gauges, counters and histograms; see the module docstring."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self._gauges = {key: Gauge(name, doc, registry=r) for key, (name, doc) in _GAUGES.items()}
        self._counts = {key: Counter(name, doc, registry=r) for key, (name, doc) in _COUNTS.items()}
        self._last: dict[str, float] = {}
        self.integrity_ok = Gauge("kvd_integrity_ok", "1 when the last block-pool integrity check passed.", registry=r)
        self.process_up = Gauge("kvd_process_up", "1 while the process is alive.", ["process"], registry=r)
        self.finished = Counter("kvd_requests_finished", "Requests finished, by reason.", ["finish_reason"], registry=r)
        self.ttft = Histogram(
            "kvd_time_to_first_token_seconds", "Arrival to first token.", buckets=TTFT_BUCKETS, registry=r
        )
        self.e2e = Histogram(
            "kvd_e2e_request_latency_seconds", "Arrival to final message.", buckets=E2E_BUCKETS, registry=r
        )
        self._server: Any = None

    def update(self, stats: Mapping[str, Any]) -> None:
        for key, gauge in self._gauges.items():
            if key in stats:
                gauge.set(stats[key])
        for key, counter in self._counts.items():
            if key in stats:
                value = stats[key]
                last = self._last.get(key, 0)
                counter.inc(value - last if value >= last else value)  # went down: the source restarted
                self._last[key] = value
        if "integrity_ok" in stats:
            self.integrity_ok.set(1 if stats["integrity_ok"] else 0)
        for process, alive in stats.get("processes", {}).items():
            self.process_up.labels(process=process).set(1 if alive else 0)

    def observe_ttft(self, seconds: float) -> None:
        """A request's first token went out `seconds` after its arrival."""
        self.ttft.observe(seconds)

    def observe_finish(self, finish_reason: str, seconds: float) -> None:
        """A request's final message went out `seconds` after its arrival."""
        self.finished.labels(finish_reason=finish_reason).inc()
        self.e2e.observe(seconds)

    def render(self) -> bytes:
        """The exposition text, as `/metrics` serves it."""
        return generate_latest(self.registry)

    def start_http(self, host: str = "127.0.0.1", port: int = 0) -> int:
        """Serve `/metrics` on host:port (0: a random free port); returns the bound port."""
        if self._server is not None:
            raise RuntimeError("metrics: the HTTP exporter is already running")
        self._server, _thread = start_http_server(port, addr=host, registry=self.registry)
        return int(self._server.server_port)

    def close(self) -> None:
        """Stop the HTTP exporter, if running."""
        if self._server is not None:
            server, self._server = self._server, None
            server.shutdown()
            server.server_close()
