"""How long a refused client should wait: the Retry-After hint of 429 and 503 answers.

    rate = CompletionRate()
    rate.record()                  # a request left the daemon (finished, aborted or failed)
    rate.retry_after(ahead)        # whole seconds, MIN_S..MAX_S

The hint is the time the `ahead` requests (the waiting queue; while draining, every live
request) take to leave at the recent completion rate:

    retry_after = ceil((ahead + 1) / rate),  rate = n / max(now - t_first, 1 s)

where n completions happened in the last WINDOW_S seconds, the first of them at t_first.
Dividing by the span they cover, not the whole window, gives the rate of a burst that
began after an idle spell; a queue that stops moving sees its rate fall as the span grows.
By the hint, the backlog that refused the client has gone, so the clients a full queue
turned away do not all come back to a queue that is still full. The hint is clamped to
MIN_S..MAX_S: under a second it is noise, and past a minute the queue it was computed
from will have changed. With no completion in the window (a daemon that has served
nothing yet, or a queue that does not move) nothing says when room will come: MAX_S.
While a worker restarts there is no queue to measure; its start takes seconds, and
a retry that comes too early costs one cheap 503, so the hint is RESTART_S.
"""

from __future__ import annotations

import collections
import math
import time

from kvd.messages import ErrorCode

RETRYABLE = frozenset({ErrorCode.QUEUE_FULL, ErrorCode.UNAVAILABLE})  # the answers that carry a hint
MIN_S, MAX_S = 1, 60
RESTART_S = 5
WINDOW_S = 30.0
MAX_KEPT = 4096  # completions remembered: past it the oldest go, and the span shrinks with them


class CompletionRate:
    """The times of the daemon's recent completions, and the hint they give."""

    def __init__(self, window_s: float = WINDOW_S) -> None:
        self.window_s = window_s
        self._times: collections.deque[float] = collections.deque(maxlen=MAX_KEPT)

    def record(self, now: float | None = None) -> None:
        self._times.append(time.monotonic() if now is None else now)
        self._forget(self._times[-1])

    def retry_after(self, ahead: int, now: float | None = None) -> int:
        """Whole seconds until `ahead` requests have left at the recent rate, MIN_S..MAX_S."""
        now = time.monotonic() if now is None else now
        self._forget(now)
        if not self._times:
            return MAX_S
        rate = len(self._times) / max(now - self._times[0], 1.0)  # completions per second
        return min(MAX_S, max(MIN_S, math.ceil((max(ahead, 0) + 1) / rate)))

    def _forget(self, now: float) -> None:
        while self._times and now - self._times[0] > self.window_s:
            self._times.popleft()
