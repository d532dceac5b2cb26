"""Prometheus metrics of `kvd route`, on a private registry (as kvd.metrics for an instance).

    kvd_route_requests_total{instance}          requests forwarded to it (a retry elsewhere counts there)
    kvd_route_prompt_blocks_total               full prompt blocks of the requests routed with hashes
    kvd_route_prefix_hit_blocks_total{instance} of those, blocks the chosen instance held (per the index)
    kvd_route_failovers_total{instance}         requests it refused before starting (sent on elsewhere)
    kvd_route_errors_total{instance}            requests that failed on it after their answer began
    kvd_route_in_flight{instance}               requests the router has in flight on it
    kvd_route_instance_up{instance}             1 while the router sends it requests, 0 while it is down

Each figure is kept once, as a plain count on its `Backend` (and the router's own prompt
block count); a scrape reads them, and so does `Router.status`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

if TYPE_CHECKING:
    from kvd.route.backend import Backend

# (name, help, Backend attribute, family) of the per-instance series
_PER_INSTANCE = (
    ("kvd_route_requests", "Requests forwarded to an instance.", "requests", CounterMetricFamily),
    ("kvd_route_prefix_hit_blocks", "Prompt blocks the chosen instance held.", "hit_blocks", CounterMetricFamily),
    ("kvd_route_failovers", "Requests an instance refused before they started.", "failovers", CounterMetricFamily),
    ("kvd_route_errors", "Requests that failed on an instance after their answer began.", "errors",
     CounterMetricFamily),
    ("kvd_route_in_flight", "Requests in flight on an instance.", "in_flight", GaugeMetricFamily),
    ("kvd_route_instance_up", "1 while the instance takes requests.", "up", GaugeMetricFamily),
)  # fmt: skip


class RouteMetrics:
    """The router's counters and gauges, labelled by instance name, read at each scrape."""

    def __init__(self, backends: Mapping[str, Backend], prompt_blocks: Callable[[], int]) -> None:
        self.backends = backends
        self.prompt_blocks = prompt_blocks
        self.registry = CollectorRegistry()
        self.registry.register(self)

    def collect(self) -> Iterator[Metric]:
        yield CounterMetricFamily("kvd_route_prompt_blocks", "Full prompt blocks of routed requests.",
                                  value=self.prompt_blocks())  # fmt: skip
        for name, doc, attr, family in _PER_INSTANCE:
            metric = family(name, doc, labels=["instance"])
            for b in self.backends.values():
                metric.add_metric([b.name], int(getattr(b, attr)))
            yield metric

    def render(self) -> bytes:
        return generate_latest(self.registry)
