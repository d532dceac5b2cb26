"""The PD connector's worker half: the loads and saves the cache messenger runs for this
instance's requests.

    transfers = PoolTransfers(engine, send, grace_s)   # one per engine (a new worker, a new one)
    transfers.load(request, keys, block_ids, deadline, prefix)   # pool -> the request's blocks
    transfers.save(request, keys, block_ids, deadline)           # the request's blocks -> pool
    request = transfers.done(report)     # its transfer ended: the record, or None if late
    transfers.expired(), transfers.lost()                        # silent past the grace; messenger died

The scheduler half (`PoolConnector`) decides what a request loads and saves and holds its
blocks meanwhile; this half starts each transfer, keeps it with its deadline until the
messenger reports, and ends it on the engine (`Engine.end_transfer`), which frees the
blocks of a request that finished meanwhile. A transfer the messenger stays silent about
is ended `grace_s` after its deadline: the messenger never writes a block past a task's
deadline, which makes that reclaim safe. vLLM's worker half (`start_load_kv`,
`wait_for_save`) runs in the worker; kvd's runs in the daemon and hands the bytes to the
messenger process, which maps the worker's KV cache (docs/architecture.md, "The KV connector").
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable

from kvd.engine.engine import Engine
from kvd.messages import CacheTask, CacheTaskDone
from kvd.request import Request


class PoolTransfers:
    """The transfers in flight for one engine's requests, by messenger task id."""

    def __init__(self, engine: Engine, send: Callable[[CacheTask], None], grace_s: float) -> None:
        self.engine = engine
        self._send = send
        self.grace_s = grace_s
        self._tasks: dict[int, tuple[Request, float]] = {}  # task id -> (record, deadline)
        self._ids = itertools.count(1)

    def __len__(self) -> int:
        return len(self._tasks)

    def load(self, request: Request, keys: list[str], block_ids: list[int], deadline: float, prefix: bool) -> int:
        """Read `keys` into `block_ids` (a prefix read: the longest leading run present)."""
        self.engine.begin_transfer(request)
        return self._start(request, False, keys, block_ids, deadline, prefix)

    def save(self, request: Request, keys: list[str], block_ids: list[int], deadline: float) -> int:
        """Write `block_ids` under `keys` (the connector holds them since the request finished)."""
        self.engine.begin_transfer(request)
        return self._start(request, True, keys, block_ids, deadline, False)

    def _start(self, request: Request, write: bool, keys: list[str], block_ids: list[int], deadline: float,
               prefix: bool) -> int:  # fmt: skip
        task_id = next(self._ids)
        self._tasks[task_id] = (request, deadline)
        self._send(CacheTask(task_id=task_id, request_id=request.request_id, write=write, keys=keys,
                             block_ids=block_ids, deadline=deadline, prefix=prefix))  # fmt: skip
        return task_id

    def done(self, report: CacheTaskDone) -> Request | None:
        """The messenger reported: the transfer ended and the blocks are the engine's again
        (freed now if the request finished). None for a task no longer in flight."""
        entry = self._tasks.pop(report.task_id, None)
        if entry is None:
            return None
        self.engine.end_transfer(entry[0])
        return entry[0]

    def expired(self) -> list[tuple[int, Request]]:
        """Transfers silent past their deadline and the grace, ended now: (task id, record)."""
        now = time.monotonic()
        out = [(task_id, r) for task_id, (r, deadline) in self._tasks.items() if now > deadline + self.grace_s]
        for task_id, request in out:
            del self._tasks[task_id]
            self.engine.end_transfer(request)
        return out

    def lost(self) -> list[CacheTaskDone]:
        """The messenger died: every transfer in flight failed (and none can still write)."""
        return [CacheTaskDone.failed(task_id, r.request_id, "the cache messenger died")
                for task_id, (r, _) in self._tasks.items()]  # fmt: skip
