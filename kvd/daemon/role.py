"""Role: what an instance's role adds to serving. This base is the unified role: it adds nothing.

`Serving` builds its role and calls these hooks at the points where a role may act: a
client request queued or ended, each schedule(), each messenger report, the worker or the
messenger lost, every tick, the drain. A role also picks the engine's KV connector
(`connector`) and says whether the instance needs the cache messenger (`moves_kv`). The
PD roles (`kvd.daemon.pd`) override what they need; kvd.daemon.main turns the config's
role name into a class, once, at start-up, and no role name is compared anywhere else.
"""

from __future__ import annotations

from collections.abc import Coroutine
from pathlib import Path
from typing import Any

import structlog
import zmq.asyncio

from kvd.config import KvdConfig
from kvd.connector.base import KVConnector
from kvd.engine.engine import Engine
from kvd.messages import CacheTaskDone
from kvd.model_info import ModelInfo
from kvd.request import Request

log = structlog.get_logger("kvd.role")


class Role:
    """The hooks a role implements, each a no-op here; the class attributes say how client
    requests are admitted."""

    moves_kv = False  # KV leaves or enters through the pool: the cache messenger maps the worker's KV cache
    client_refusal: str | None = None  # why this role takes no client requests (a prefill instance)

    def __init__(self, cfg: KvdConfig, serving, ctx: zmq.asyncio.Context, run_dir: Path) -> None:
        self.group_min_tokens = cfg.prefill.group_min_tokens if cfg.prefill.group else 0

    def connector(self, info: ModelInfo) -> KVConnector:
        """The KV connector of an engine built for `info` (the unified role's moves nothing)."""
        return KVConnector(self.group_min_tokens)

    def attach(self, engine: Engine) -> None:
        """The engine was (re)built."""

    def admitted(self, request: Request) -> None:
        """A client request was queued."""

    def scheduled(self) -> None:
        """After each schedule()."""

    def ended(self, request: Request) -> None:
        """A request ended by abort or failure (the engine already finished it)."""

    async def on_cache_done(self, done: CacheTaskDone) -> None:
        log.info("late_message_ignored", message="CacheTaskDone", task_id=done.task_id)

    async def messenger_lost(self) -> None:
        """The messenger died: the transfers in flight failed."""

    async def engine_lost(self) -> None:
        """The worker died; its live requests have been failed already."""

    def tick(self) -> None:
        """Every second: leases, heartbeats."""

    async def drain(self, timeout_s: float) -> None:
        """SIGTERM: finish or hand back what the role holds."""

    def readers(self) -> list[Coroutine[Any, Any, None]]:
        """Readers the role runs beside the step loop."""
        return []

    def close(self) -> None:
        """Release sockets."""

    def status(self) -> dict[str, Any] | None:
        return None

    def problems(self) -> list[str]:
        """What the role depends on that is broken now (the instance is not ready while any is)."""
        return []
