"""Fixtures for daemon integration tests (see harness.py)."""

import pytest

from harness import DaemonHandle


@pytest.fixture
def daemons():
    """Start daemons with `daemons.append(start_daemon(...))`; all are stopped at the end."""
    started: list[DaemonHandle] = []
    yield started
    for d in started:
        d.stop()
