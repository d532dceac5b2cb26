"""The router's tests share two unified instances on the embedded model (KV events and
HTTP on) and a router per policy in front of them, for the whole package."""

from __future__ import annotations

import pytest
from route_harness import instance, start_router


@pytest.fixture(scope="package")
def pair(tmp_path_factory, smollm2_dir):
    started = []
    try:
        for name in ("a", "b"):
            started.append(instance(tmp_path_factory.mktemp(name)))
        yield dict(zip("ab", started))
    finally:
        for d in started:
            assert d.stop() == 0


@pytest.fixture(scope="package")
def routers(tmp_path_factory, pair):
    started = {}
    try:
        for policy in ("kv", "round_robin"):
            started[policy] = start_router(tmp_path_factory.mktemp(policy), pair, policy)
        yield started
    finally:
        for r in started.values():
            assert r.stop() == 0
