"""What serving hangs on a request's record, and what a transport must be to receive it.

An `Outbox` is where one request's results go (its ZeroMQ client's route, its HTTP
request's choice, a prefill instance's handoff); an `Owner` is the daemon's part of the
request's record: its outbox, its clock, whether it has ended and, on a PD instance, its
handoff; `Rejected` is a request refused before it was queued.
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

    __slots__ = ("outbox", "client", "clock", "first_token", "scheduled", "ended", "handoff")

    def __init__(self, outbox: Outbox, client: bool) -> None:
        self.outbox = outbox
        self.client = client  # a client's request (lifecycle logged, deadline, drain) or a role's own
        self.clock = RequestClock()  # duration_ms / since_arrival_ms of each logged step
        self.first_token: float | None = None
        self.scheduled = False
        self.ended = False  # its last delta or its failure went out
        self.handoff = None  # its way through the PD chain while it has one (kvd.daemon.pd.handoff)
