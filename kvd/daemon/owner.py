"""What serving hangs on a request's record, and what a transport must be to receive it.

An `Outbox` is where a request's results go (the ZeroMQ frontend, the HTTP frontend, a
prefill instance's PD role); an `Owner` is the daemon's part of the request's record: its
outbox, its clock and whether it has ended; `Rejected` is a request refused before it was
queued.
"""

from __future__ import annotations

from typing import Protocol

from kvd.engine.text import Delta
from kvd.logs import RequestClock
from kvd.messages import ErrorCode


class Outbox(Protocol):
    """Where a request's results go: every delta in order, or one failure."""

    async def deliver(self, delta: Delta) -> None: ...

    async def fail(self, request_id: str, code: ErrorCode, message: str) -> None: ...


class Rejected(Exception):
    """A request refused before it was queued: one error to the client, nothing held."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class Owner:
    """The daemon's part of a request's record: its outbox, its clock, what was logged of it."""

    __slots__ = ("outbox", "client", "clock", "first_token", "scheduled", "ended")

    def __init__(self, outbox: Outbox, client: bool) -> None:
        self.outbox = outbox
        self.client = client  # a client's request (lifecycle logged, deadline, drain) or a role's own
        self.clock = RequestClock()  # duration_ms / since_arrival_ms of each logged step
        self.first_token: float | None = None
        self.scheduled = False
        self.ended = False  # its last delta or its failure went out
