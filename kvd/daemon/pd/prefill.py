"""The prefill role: computes prompts that decode instances hand it, and writes their KV.

    PrefillRequest ─▶ (prefix_from_pool: CacheTask(read prefix)) ─▶ prefill ─▶ first token
      ─▶ CacheTask(write every block, the partial one too) ─▶ CacheTaskDone ok ─▶ PrefillDone
      ─▶ blocks released (full ones stay as prefix cache)          (any failure: PrefillFailed)

Each handoff is the `Outbox` of the request it queues: its deltas come back to the role,
never to a client. The first token leaves only after the write succeeded, and every handoff gets
exactly one reply (PrefillDone or PrefillFailed) unless its decode instance aborted it.
On SIGTERM the role drains: Pongs say so, new PrefillRequests are refused with
UNAVAILABLE (decode fails them over), the handoffs in flight get `daemon.drain_timeout_s`
to reply, the rest a PrefillFailed at once.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

import structlog
import zmq.asyncio

from kvd.cache.hashing import is_partial_key
from kvd.config import KvdConfig
from kvd.daemon.owner import Rejected
from kvd.daemon.pd.handoff import Handoff, PDRole, Phase
from kvd.daemon.pd.peers import PrefillServer
from kvd.daemon.serving import Serving
from kvd.engine.text import Delta
from kvd.messages import (
    CacheTaskDone,
    ErrorCode,
    FromPrefill,
    Ping,
    Pong,
    PrefillAbort,
    PrefillDone,
    PrefillFailed,
    PrefillRequest,
    ToPrefill,
)

log = structlog.get_logger("kvd.pd.prefill")


class PrefillHandoff(Handoff):
    """A decode instance's request: who to answer, and what the answer carries. It is the
    request's `Outbox`: its deltas and its failure come back to the role through it."""

    def __init__(self, role: PrefillRole, msg: PrefillRequest, identity: bytes) -> None:
        super().__init__(msg.handoff_id, msg.request_id)
        self.role = role
        self.identity = identity  # the decode instance's DEALER
        self.token_ids = list(msg.token_ids)
        self.deadline = time.monotonic() + msg.ttl_s
        self.t_prefill = time.monotonic()
        self.aborted = False  # the decode instance gave up: it gets no reply
        self.prefill_ms = 0.0
        self.keys: list[str] = []  # what the write stores, for PrefillDone
        self.first_token = -1
        self.logprobs = None
        self.num_cached = 0

    async def deliver(self, delta: Delta) -> None:
        if self.live:
            await self.role.on_delta(self, delta)

    async def fail(self, request_id: str, code: ErrorCode, message: str) -> None:
        if self.live:
            await self.role.give_up(self, code, message)


class PrefillRole(PDRole):
    """Decode instances' PrefillRequests in, their KV to the pool, PrefillDone back."""

    client_refusal = "role: this is a prefill instance; send requests to a decode instance"
    save = True

    def __init__(self, cfg: KvdConfig, serving: Serving, ctx: zmq.asyncio.Context, run_dir: Path) -> None:
        super().__init__(cfg, serving, ctx, run_dir)
        self.load = "prefix" if cfg.pd.prefix_from_pool else None
        self.server = PrefillServer(ctx, cfg.pd.host, cfg.pd.port, run_dir, cfg.pd.secret)
        log.info("pd_serving", pd_endpoint=self.server.endpoint, pool=cfg.pd.pool, curve=bool(cfg.pd.secret))

    def readers(self) -> list[Coroutine[Any, Any, None]]:
        return [self.server.run(self.on_decode_message)]

    def close(self) -> None:
        self.server.close(linger_ms=500)  # the drain's last replies still go out

    # ---- decode instances' messages ----------------------------------------------------
    async def on_decode_message(self, identity: bytes, msg: ToPrefill) -> None:
        if isinstance(msg, Ping):
            queued = self.engine.num_waiting if self.engine is not None else 0
            await self.server.send(identity, Pong(msg.seq, self.instance, self.namespace, queued,
                                                  draining=self.serving.draining))  # fmt: skip
        elif isinstance(msg, PrefillAbort):
            h = self.handoff(msg.handoff_id)
            if h is None:
                return
            h.aborted = True
            log.info("prefill_aborted", request_id=h.request_id, handoff_id=h.engine_id, phase=h.phase.name)
            if h.phase != Phase.WRITING:
                self.end(h)
                self.serving.abort(h.engine_id)
        elif isinstance(msg, PrefillRequest):
            await self._on_prefill_request(identity, msg)

    async def _on_prefill_request(self, identity: bytes, msg: PrefillRequest) -> None:
        h = PrefillHandoff(self, msg, identity)
        log.info("prefill_received", request_id=msg.request_id, handoff_id=msg.handoff_id,
                 num_tokens=len(msg.token_ids))  # fmt: skip
        refusal = self._refusal(msg)
        if refusal is None:
            try:
                await self.serving.compile_grammar(msg.params)  # structured outputs: off the loop
            except Rejected as e:
                refusal = (e.code, e.message)
        if refusal is None:
            try:
                request = self.serving.add(list(msg.token_ids), msg.params, msg.handoff_id, h)
            except ValueError as e:
                refusal = (ErrorCode.BAD_REQUEST, str(e))
        if refusal is not None:
            code, text = refusal
            log.warning("prefill_refused", request_id=msg.request_id, code=int(code), error=text)
            await self.server.send(identity, PrefillFailed(handoff_id=msg.handoff_id, request_id=msg.request_id,
                                                           code=code, message=text))  # fmt: skip
            return
        self.begin(request, h)

    def _refusal(self, msg: PrefillRequest) -> tuple[ErrorCode, str] | None:
        refusal = self.serving.refusal()
        if refusal is None and msg.namespace != self.namespace:
            refusal = (ErrorCode.KV_TRANSFER_FAILED,
                       f"pd: KV layout mismatch: decode namespace {msg.namespace}, prefill {self.namespace} "
                       "(model, dtype and block_size must match)")  # fmt: skip
        if refusal is None and self.serving.record(msg.handoff_id) is not None:
            refusal = (ErrorCode.BAD_REQUEST, f"handoff_id: {msg.handoff_id!r} is already in use")
        return refusal

    # ---- what the requests' outboxes bring ---------------------------------------------
    async def on_delta(self, h: PrefillHandoff, delta: Delta) -> None:
        """A request of ours finished after its first token: write its blocks."""
        out = delta.output
        if out is None:
            return
        if out.finish_reason in ("abort", "error") or not out.token_ids:
            await self.give_up(h, ErrorCode.INTERNAL, "prefill: the request failed")
            return
        h.prefill_ms = (time.monotonic() - h.t_prefill) * 1e3
        log.info("prefill_first_token", request_id=h.request_id, handoff_id=h.engine_id, token=out.token_ids[0],
                 num_cached_tokens=out.num_cached_tokens, **h.clock.step())  # fmt: skip
        h.keys = self.keys(h.token_ids)
        h.first_token, h.num_cached = out.token_ids[0], out.num_cached_tokens
        h.logprobs = out.logprobs[0] if out.logprobs else None
        h.phase = Phase.WRITING
        request = self.serving.record(h.engine_id)  # finished, its blocks held for this save
        block_ids = self.engine.kv.block_ids(h.engine_id)[: len(h.keys)]
        h.task_id = self.transfers.save(request, h.keys, block_ids, h.deadline)

    async def give_up(self, h: PrefillHandoff, code: ErrorCode, message: str) -> None:
        """One PrefillFailed (unless decode aborted it), and the engine lets the request go."""
        self.end(h)
        if not h.aborted:
            await self._reply(h, PrefillFailed(handoff_id=h.engine_id, request_id=h.request_id, code=code,
                                               message=message))  # fmt: skip
        await self.serving.fail(h.engine_id, code, message)  # a no-op once the request finished

    async def _reply(self, h: PrefillHandoff, msg: FromPrefill) -> None:
        await self.server.send(h.identity, msg)
        log.info("prefill_replied", request_id=h.request_id, handoff_id=h.engine_id, message=type(msg).__name__)

    # ---- pool transfers ----------------------------------------------------------------
    def scheduled(self) -> None:
        """prefix_from_pool: read what the pool has of a preallocated request's leading blocks."""
        bs = self.engine.kv.block_size
        for request in self.engine.connector.take_loads():
            h = request.owner.handoff if request.owner is not None else None
            if h is None:
                continue
            h.read_from = request.num_computed_tokens // bs
            h.deadline = min(h.deadline, time.monotonic() + self.cfg.lease_s)
            keys = self.keys(request.prompt_token_ids)[h.read_from : request.transfer.load_tokens // bs]
            self.read(h, keys, prefix=True)

    def arrived(self, h: Handoff, num_blocks: int) -> None:
        tokens = (h.read_from + num_blocks) * self.engine.kv.block_size
        if self.engine.kv_loaded(h.engine_id, tokens):
            h.phase = Phase.QUEUED
            log.info("kv_prefix_read", request_id=h.request_id, num_tokens=tokens, **h.clock.step())
            self.serving.wake()

    async def task_done(self, h: PrefillHandoff, done: CacheTaskDone) -> None:
        if h.phase == Phase.WRITING:
            await self._on_write_done(h, done)
        elif done.ok:
            self.arrived(h, done.num_blocks)
        else:  # a prefix read that failed is only a lost shortcut
            log.warning("kv_prefix_read_failed", request_id=h.request_id, error=done.error)
            self.engine.kv_load_failed(h.engine_id)
            h.phase = Phase.QUEUED

    async def _on_write_done(self, h: PrefillHandoff, done: CacheTaskDone) -> None:
        try:
            if h.aborted:
                return
            if not done.ok:
                self.counts["kv_failures"] += 1
                await self._reply(h, PrefillFailed(handoff_id=h.engine_id, request_id=h.request_id, code=done.code,
                                                   message=f"kv write: {done.error}"))  # fmt: skip
                return
            log.info("kv_written", request_id=h.request_id, handoff_id=h.engine_id, num_blocks=done.num_blocks,
                     nbytes=done.nbytes, write_ms=round(done.duration_ms, 3), **h.clock.step())  # fmt: skip
            if self.serving.kv_events is not None:  # its full blocks are the pool tier's now
                full = [k.rpartition("/")[2] for k in h.keys if not is_partial_key(k)]
                self.serving.kv_events.log.pool_written([bytes.fromhex(k) for k in full])
            await self._reply(h, PrefillDone(handoff_id=h.engine_id, request_id=h.request_id, first_token=h.first_token,
                                             logprobs=h.logprobs, keys=h.keys, num_tokens=len(h.token_ids),
                                             num_cached_tokens=h.num_cached, prefill_ms=h.prefill_ms,
                                             write_ms=done.duration_ms))  # fmt: skip
        finally:
            self.end(h)  # after the reply: a drain waits for the last one

    def transfer_expired(self, h: PrefillHandoff) -> None:
        message = "deadline: the KV transfer did not finish within lease_s"
        self.serving.spawn(self.give_up(h, ErrorCode.DEADLINE, message))

    # ---- leases, worker loss, drain ----------------------------------------------------
    def tick(self) -> None:
        self.reap_transfers()
        now = time.monotonic()
        for h in self.handoffs():
            if now > h.deadline and h.phase not in (Phase.READING, Phase.WRITING):
                self.end(h)  # decode has given up: no reply
                log.warning("prefill_expired", request_id=h.request_id, handoff_id=h.engine_id)
                self.serving.abort(h.engine_id)

    async def engine_lost(self) -> None:
        """The worker died; handoffs still live (their writes) get a PrefillFailed."""
        handoffs = self.handoffs()
        self.transfers = None
        for h in handoffs:
            self.end(h)
            if not h.aborted:
                await self._reply(h, PrefillFailed(handoff_id=h.engine_id, request_id=h.request_id,
                                                   code=ErrorCode.KV_TRANSFER_FAILED,
                                                   message="the prefill instance's worker died"))  # fmt: skip

    async def drain(self, timeout_s: float) -> None:
        """New PrefillRequests are refused (serving is draining) and Pongs say so; the handoffs
        in flight get `timeout_s` to reply, and the rest a PrefillFailed(UNAVAILABLE) at once,
        so decode fails them over instead of waiting for a heartbeat to lapse."""
        log.info("prefill_draining", in_flight=len(self.handoffs()), timeout_s=timeout_s)
        end = time.monotonic() + timeout_s
        while self.handoffs() and time.monotonic() < end:
            await asyncio.sleep(0.05)
        for h in self.handoffs():
            self.end(h)
            if not h.aborted:
                await self._reply(h, PrefillFailed(handoff_id=h.engine_id, request_id=h.request_id,
                                                   code=ErrorCode.UNAVAILABLE,
                                                   message="prefill instance shut down before the handoff finished"))
            if h.phase != Phase.WRITING:  # a write in flight keeps its blocks until the process ends
                self.serving.abort(h.engine_id)

    def status(self) -> dict[str, Any]:
        return super().status() | {"pd_endpoint": self.server.endpoint}
