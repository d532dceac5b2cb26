"""Prometheus metrics of `kvd route`, on a private registry (as kvd.metrics for an instance).

    kvd_route_requests_total{instance}          requests forwarded to it (a retry elsewhere counts there)
    kvd_route_prompt_blocks_total               full prompt blocks of the requests routed with hashes
    kvd_route_prefix_hit_blocks_total{instance} of those, blocks the chosen instance held (per the index)
    kvd_route_failovers_total{instance}         requests it refused before starting (sent on elsewhere)
    kvd_route_errors_total{instance}            requests that failed on it after their answer began
    kvd_route_in_flight{instance}               requests the router has in flight on it
    kvd_route_instance_up{instance}             1 while the router sends it requests, 0 while it is down
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest

if TYPE_CHECKING:
    from kvd.route.backend import Backend


class RouteMetrics:
    """The router's counters and gauges, labelled by instance name."""

    def __init__(self, backends: Mapping[str, Backend]) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("kvd_route_requests", "Requests forwarded to an instance.", ["instance"], registry=r)
        self.prompt_blocks = Counter("kvd_route_prompt_blocks", "Full prompt blocks of routed requests.", registry=r)
        self.hit_blocks = Counter("kvd_route_prefix_hit_blocks", "Prompt blocks the chosen instance held.",
                                  ["instance"], registry=r)  # fmt: skip
        self.failovers = Counter("kvd_route_failovers", "Requests an instance refused before they started.",
                                 ["instance"], registry=r)  # fmt: skip
        self.errors = Counter("kvd_route_errors", "Requests that failed on an instance after their answer began.",
                              ["instance"], registry=r)  # fmt: skip
        self.in_flight = Gauge("kvd_route_in_flight", "Requests in flight on an instance.", ["instance"], registry=r)
        self.up = Gauge("kvd_route_instance_up", "1 while the instance takes requests.", ["instance"], registry=r)
        for name, b in backends.items():  # every series exists from the start, at 0
            for metric in (self.requests, self.hit_blocks, self.failovers, self.errors):
                metric.labels(name)
            self.in_flight.labels(name).set_function(lambda b=b: b.in_flight)  # the backend's count, read at scrape
            self.up.labels(name).set(1)

    def render(self) -> bytes:
        return generate_latest(self.registry)
