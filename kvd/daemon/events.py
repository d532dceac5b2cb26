"""The PD event chain (DESIGN.md §4): every step a named, timed log event with a deadline.

Decode instance (the client's entry point):

    accept ─▶ queued ─▶ blocks preallocated (lease starts) ─▶ PrefillRequest ─▶ PREFILLING
      ─▶ PrefillDone: keys checked, first token streamed at once ─▶ CacheTask(read) ─▶ READING
      ─▶ CacheTaskDone ok ─▶ kv_arrived: the request joins the running batch, never prefilled again

Prefill instance:

    PrefillRequest ─▶ (prefix_from_pool: CacheTask(read prefix)) ─▶ prefill ─▶ first token
      ─▶ CacheTask(write every block, the partial one too) ─▶ CacheTaskDone ok ─▶ PrefillDone
      ─▶ blocks released (full ones stay as prefix cache)          (any failure: PrefillFailed)

Rules kept here: a block is never freed while a transfer may write it (the scheduler
defers the free to `end_transfer`, called when the messenger reports or, for a silent
one, `transfer_grace_s` after the lease — the messenger never writes past a deadline);
late or duplicate messages are logged and ignored; the first token leaves the prefill
instance only after its write succeeded; a failed read is never served (502/504, or a
local recompute with `on_kv_failure = "recompute"`); a prefill instance that stops
answering heartbeats fails or fails over its handoffs at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import itertools
import os
import socket
import time
from typing import TYPE_CHECKING

import structlog

from kvd.cache.storage.keys import request_keys, storage_namespace
from kvd.daemon.peers import PrefillLink, PrefillServer
from kvd.logs import RequestClock
from kvd.messages import (
    CacheTask,
    CacheTaskDone,
    ErrorCode,
    Ping,
    Pong,
    PrefillAbort,
    PrefillDone,
    PrefillFailed,
    PrefillRequest,
)

if TYPE_CHECKING:
    from kvd.daemon.main import Daemon
    from kvd.engine.engine import Delta

log = structlog.get_logger("kvd.events")


class Phase(enum.IntEnum):
    QUEUED = 0  # waiting for blocks to preallocate
    UNDISPATCHED = 1  # blocks held; no prefill instance has answered yet
    PREFILLING = 2  # PrefillRequest sent
    READING = 3  # CacheTask(read) sent
    WRITING = 4  # prefill side: CacheTask(write) sent


class _Handoff:
    """One request's way through the chain (either role)."""

    __slots__ = ("rid", "request_id", "phase", "deadline", "attempt", "handoff_id", "link", "identity",
                 "read_from", "task_id", "clock", "aborted", "prefill_ms", "token_ids", "t_prefill", "keys",
                 "first_token", "logprobs", "num_cached")  # fmt: skip

    def __init__(self, rid: str, request_id: str) -> None:
        self.rid = rid  # the engine's id (decode: the client's; prefill: the handoff id)
        self.request_id = request_id  # the client's, on every log line of both instances
        self.phase = Phase.QUEUED
        self.deadline = float("inf")  # time.monotonic()
        self.attempt = 0
        self.handoff_id = ""
        self.link: PrefillLink | None = None
        self.identity = b""
        self.read_from = 0  # first block index the pool read fills
        self.task_id = -1
        self.clock = RequestClock()
        self.aborted = False
        self.prefill_ms = 0.0
        self.token_ids: list[int] = []  # prefill side: the prompt
        self.t_prefill = 0.0
        self.keys: list[str] = []  # prefill side: what the write stores, for PrefillDone
        self.first_token = -1
        self.logprobs = None
        self.num_cached = 0


class _Handoffs(dict):
    """The chain's handoffs by engine request id; `empty` is set while there are none (a
    draining prefill instance awaits it)."""

    def __init__(self) -> None:
        super().__init__()
        self.empty = asyncio.Event()
        self.empty.set()

    def __setitem__(self, rid: str, h: _Handoff) -> None:
        super().__setitem__(rid, h)
        self.empty.clear()

    def pop(self, *args):
        h = super().pop(*args)
        if not self:
            self.empty.set()
        return h

    def clear(self) -> None:
        super().clear()
        self.empty.set()


class PDChain:
    """The event chain of one instance; the daemon calls in, the chain answers through it."""

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        self.cfg = daemon.cfg.pd
        self.role = daemon.cfg.daemon.role
        self.handoffs = _Handoffs()
        self.tasks: dict[int, tuple[str, float]] = {}  # messenger task id -> (engine rid, deadline)
        self._task_ids = itertools.count(1)
        self.namespace = ""
        self.instance = f"{socket.gethostname()}:{os.getpid()}"
        self.server: PrefillServer | None = None
        self.links: list[PrefillLink] = []
        self._rr = itertools.count()
        self._last_tick = time.monotonic()
        self.counts = {"handoffs": 0, "kv_failures": 0, "recomputes": 0, "late_messages": 0, "reaped": 0}

    # ---- set-up ------------------------------------------------------------------------
    def attach(self) -> None:
        """The engine is (re)built: derive the storage namespace from the model it serves."""
        info = self.daemon.engine.info
        self.namespace = storage_namespace(info.fingerprint, info.kv_dtype, info.block_size)

    def keys(self, token_ids: list[int]) -> list[str]:
        kv = self.daemon.engine.kv
        return request_keys(self.namespace, token_ids, kv.block_size, kv.hash_algo)

    # ---- the engine's side -------------------------------------------------------------
    def on_scheduled(self) -> None:
        """After each schedule(): requests whose blocks were just preallocated move on."""
        engine = self.daemon.engine
        for request in engine.scheduler.take_preallocated():
            h = self.handoffs.get(request.request_id)
            if h is None:
                continue
            h.read_from = request.num_computed_tokens // engine.kv.block_size
            h.deadline = min(h.deadline, time.monotonic() + self.cfg.lease_s)
            if self.role == "decode":
                log.info("kv_preallocated", request_id=h.request_id, from_block=h.read_from,
                         num_blocks=len(engine.kv.block_ids(h.rid)), **h.clock.step())  # fmt: skip
                self._dispatch(h)
            else:  # prefill with prefix_from_pool: read what the pool has of the prompt's leading blocks
                keys = self.keys(request.prompt_token_ids)[h.read_from : request.kv_recv_tokens // engine.kv.block_size]
                self._read(h, keys, prefix=True)

    def owns(self, rid: str) -> bool:
        return rid in self.handoffs and self.role == "prefill"

    async def on_delta(self, delta: Delta) -> None:
        """Prefill side: a request of ours finished after its first token — write its blocks."""
        h = self.handoffs.get(delta.request_id)
        out = delta.output
        if h is None or out is None:
            return
        if out.finish_reason in ("abort", "error") or not out.token_ids:
            if not h.aborted:
                await self._reply(h, PrefillFailed(handoff_id=h.rid, request_id=h.request_id,
                                                   code=ErrorCode.INTERNAL, message="prefill: the request failed"))
            self.handoffs.pop(h.rid, None)  # after the reply: a drain waits for the last one
            return
        h.prefill_ms = (time.monotonic() - h.t_prefill) * 1e3
        log.info("prefill_first_token", request_id=h.request_id, handoff_id=h.rid, token=out.token_ids[0],
                 num_cached_tokens=out.num_cached_tokens, **h.clock.step())  # fmt: skip
        h.keys = self.keys(h.token_ids)
        block_ids = self.daemon.engine.kv.block_ids(h.rid)[: len(h.keys)]
        h.first_token, h.num_cached = out.token_ids[0], out.num_cached_tokens
        h.logprobs = out.logprobs[0] if out.logprobs else None
        h.phase = Phase.WRITING
        h.task_id = next(self._task_ids)
        self.tasks[h.task_id] = (h.rid, h.deadline)
        self.daemon.send_cache_task(CacheTask(task_id=h.task_id, request_id=h.rid, write=True, keys=h.keys,
                                              block_ids=block_ids, deadline=h.deadline))  # fmt: skip

    def on_abort(self, rid: str) -> None:
        """Decode side: the client left or aborted (the engine already finished the request)."""
        h = self.handoffs.pop(rid, None)
        if h is None:
            return
        if h.phase == Phase.PREFILLING and h.link is not None:
            h.link.send(PrefillAbort(h.handoff_id))
            h.link.outstanding -= 1
        log.info("handoff_aborted", request_id=h.request_id, phase=h.phase.name, **h.clock.step())

    # ---- decode side -------------------------------------------------------------------
    def admit(self, rid: str) -> None:
        self.handoffs[rid] = _Handoff(rid, rid)
        self.counts["handoffs"] += 1

    def _pick(self, avoid: PrefillLink | None = None) -> PrefillLink | None:
        live = [link for link in self.links if link.alive and not link.draining and link is not avoid]
        if not live:
            return None
        least = min(link.outstanding for link in live)
        candidates = [link for link in live if link.outstanding == least]
        return candidates[next(self._rr) % len(candidates)]

    def _dispatch(self, h: _Handoff, avoid: PrefillLink | None = None) -> None:
        engine = self.daemon.engine
        request = engine.scheduler.requests.get(h.rid)
        if request is None:
            return
        link = self._pick(avoid)
        if link is None:
            # Dispatched when a prefill instance first answers or comes back from a drain (a
            # restart); failed at once when every instance that answered before is gone.
            waiting = any(link.alive and link.draining for link in self.links)
            if not waiting and (any(link.seen for link in self.links) or not self.links):
                self._fail(h, ErrorCode.UNAVAILABLE, "pd: no prefill instance is answering")
            else:
                h.phase = Phase.UNDISPATCHED
            return
        h.attempt += 1
        h.handoff_id = f"{h.rid}#{h.attempt}@{self.instance}"
        h.link = link
        msg = PrefillRequest(handoff_id=h.handoff_id, request_id=h.request_id, token_ids=request.prompt_token_ids,
                             params=request.sampling_params, ttl_s=max(0.0, h.deadline - time.monotonic()),
                             namespace=self.namespace)  # fmt: skip
        if not link.send(msg):
            link.alive = False
            log.warning("prefill_unreachable", instance=link.instance, request_id=h.request_id)
            self._dispatch(h)
            return
        link.outstanding += 1
        h.phase = Phase.PREFILLING
        log.info("prefill_dispatched", request_id=h.request_id, instance=link.instance, attempt=h.attempt,
                 **h.clock.step())  # fmt: skip

    async def on_prefill_message(self, link: PrefillLink, msg) -> None:
        if isinstance(msg, Pong):
            was_draining = link.draining
            if link.on_pong(msg):
                log.info("prefill_instance_up", instance=link.instance, endpoint=link.endpoint)
                for h in [h for h in self.handoffs.values() if h.phase == Phase.UNDISPATCHED]:
                    self._dispatch(h)
            elif link.draining and not was_draining:
                log.info("prefill_instance_draining", instance=link.instance, endpoint=link.endpoint)
            return
        rid = msg.handoff_id.split("#", 1)[0]
        h = self.handoffs.get(rid)
        if h is None or h.handoff_id != msg.handoff_id or h.phase != Phase.PREFILLING:
            self.counts["late_messages"] += 1
            log.info("late_message_ignored", message=type(msg).__name__, handoff_id=msg.handoff_id,
                     request_id=msg.request_id)  # fmt: skip
            return
        link.outstanding -= 1
        if isinstance(msg, PrefillFailed):
            log.warning("prefill_failed", request_id=h.request_id, code=int(msg.code), error=msg.message,
                        **h.clock.step())  # fmt: skip
            # Refused for now (draining, worker restarting): another instance may take it.
            if msg.code == ErrorCode.UNAVAILABLE and h.attempt <= len(self.links) and self._pick(avoid=link):
                log.warning("prefill_failover", request_id=h.request_id, from_instance=link.instance,
                            reason=msg.message)  # fmt: skip
                self._dispatch(h, avoid=link)
                return
            self._fail(h, msg.code if msg.code != ErrorCode.INTERNAL else ErrorCode.KV_TRANSFER_FAILED,
                       f"prefill instance {link.instance}: {msg.message}")  # fmt: skip
            return
        await self._on_prefill_done(h, msg)

    async def _on_prefill_done(self, h: _Handoff, msg: PrefillDone) -> None:
        engine = self.daemon.engine
        request = engine.scheduler.requests.get(h.rid)
        if request is None:
            self.handoffs.pop(h.rid, None)
            return
        log.info("prefill_done", request_id=h.request_id, prefill_ms=round(msg.prefill_ms, 3),
                 write_ms=round(msg.write_ms, 3), num_cached_tokens=msg.num_cached_tokens,
                 **h.clock.step())  # fmt: skip
        keys = self.keys(request.prompt_token_ids)
        if msg.keys != keys or msg.num_tokens != request.num_prompt_tokens:
            self._fail(h, ErrorCode.KV_TRANSFER_FAILED,
                       "pd: the prefill instance's KV layout differs from this instance's (storage keys "
                       f"{msg.keys[:1]} vs {keys[:1]}): check model, dtype and block_size")  # fmt: skip
            return
        for delta in engine.append_token(h.rid, msg.first_token, msg.logprobs):
            await self.daemon.frontend.deliver(delta)  # the first token goes out at once
        if h.rid not in engine.scheduler.requests:  # the first token finished it: nothing to read
            self.handoffs.pop(h.rid, None)
            return
        self._read(h, keys[h.read_from :], prefix=False)

    def _read(self, h: _Handoff, keys: list[str], prefix: bool) -> None:
        """Read `keys` into the request's blocks from `h.read_from` on."""
        engine = self.daemon.engine
        block_ids = engine.kv.block_ids(h.rid)[h.read_from : h.read_from + len(keys)]
        if not keys:
            self._arrived(h, 0)
            return
        h.phase = Phase.READING
        h.task_id = next(self._task_ids)
        self.tasks[h.task_id] = (h.rid, h.deadline)
        engine.scheduler.begin_transfer(h.rid)
        self.daemon.send_cache_task(CacheTask(task_id=h.task_id, request_id=h.rid, write=False, keys=keys,
                                              block_ids=block_ids, deadline=h.deadline, prefix=prefix))  # fmt: skip
        log.info("kv_read_started", request_id=h.request_id, num_blocks=len(keys), prefix=prefix, **h.clock.step())

    def _arrived(self, h: _Handoff, num_blocks: int) -> None:
        engine = self.daemon.engine
        tokens = (h.read_from + num_blocks) * engine.kv.block_size
        if self.role == "decode":  # the whole prompt, the partial block included
            self.handoffs.pop(h.rid, None)
            request = engine.scheduler.requests.get(h.rid)
            tokens = request.num_prompt_tokens if request is not None else 0
        if engine.scheduler.kv_arrived(h.rid, tokens):
            h.phase = Phase.QUEUED
            log.info("kv_admitted" if self.role == "decode" else "kv_prefix_read", request_id=h.request_id,
                     num_tokens=tokens, **h.clock.step())  # fmt: skip
            self.daemon.wake()

    # ---- messenger reports (both roles) --------------------------------------------------
    async def on_task_done(self, done: CacheTaskDone) -> None:
        entry = self.tasks.pop(done.task_id, None)
        if entry is None:
            self.counts["late_messages"] += 1
            log.info("late_message_ignored", message="CacheTaskDone", task_id=done.task_id)
            return
        rid, _ = entry
        engine = self.daemon.engine
        engine.scheduler.end_transfer(rid)  # the blocks are ours again (freed now if the request ended)
        self.daemon.wake()
        h = self.handoffs.get(rid)
        if h is None or h.task_id != done.task_id:
            return  # aborted or failed meanwhile
        if h.phase == Phase.WRITING:
            await self._on_write_done(h, done)
        elif done.ok:
            self._arrived(h, done.num_blocks)
        elif self.role == "prefill":  # a prefix read that failed is only a lost shortcut
            log.warning("kv_prefix_read_failed", request_id=h.request_id, error=done.error)
            engine.scheduler.kv_failed(h.rid)
            h.phase = Phase.QUEUED
        else:
            self.counts["kv_failures"] += 1
            self._fail(h, done.code, f"kv transfer: {done.error}")

    # ---- prefill side ------------------------------------------------------------------
    async def on_decode_message(self, identity: bytes, msg) -> None:
        if isinstance(msg, Ping):
            engine = self.daemon.engine
            queued = len(engine.scheduler.waiting) if engine is not None else 0
            await self.server.send(identity, Pong(msg.seq, self.instance, self.namespace, queued,
                                                  draining=self.daemon.draining))  # fmt: skip
        elif isinstance(msg, PrefillAbort):
            rid = msg.handoff_id
            h = self.handoffs.get(rid)
            if h is None:
                return
            h.aborted = True
            log.info("prefill_aborted", request_id=h.request_id, handoff_id=rid, phase=h.phase.name)
            if h.phase != Phase.WRITING:
                self.handoffs.pop(rid, None)
                self.daemon.engine_abort(rid)
        elif isinstance(msg, PrefillRequest):
            await self._on_prefill_request(identity, msg)

    async def _on_prefill_request(self, identity: bytes, msg: PrefillRequest) -> None:
        h = _Handoff(msg.handoff_id, msg.request_id)
        h.identity = identity
        h.deadline = time.monotonic() + msg.ttl_s
        h.t_prefill = time.monotonic()
        h.token_ids = list(msg.token_ids)
        log.info("prefill_received", request_id=msg.request_id, handoff_id=msg.handoff_id,
                 num_tokens=len(msg.token_ids))  # fmt: skip
        refusal = self.daemon.refusal() if self.daemon.engine is not None else (ErrorCode.UNAVAILABLE, "not ready")
        if refusal is None and msg.namespace != self.namespace:
            refusal = (ErrorCode.KV_TRANSFER_FAILED,
                       f"pd: KV layout mismatch: decode namespace {msg.namespace}, prefill {self.namespace} "
                       "(model, dtype and block_size must match)")  # fmt: skip
        if refusal is None and msg.handoff_id in self.handoffs:
            refusal = (ErrorCode.BAD_REQUEST, f"handoff_id: {msg.handoff_id!r} is already in use")
        if refusal is None:
            try:
                self.daemon.engine.add_request(msg.token_ids, msg.params, request_id=msg.handoff_id, kv_send=True,
                                               kv_recv="prefix" if self.cfg.prefix_from_pool else None)  # fmt: skip
            except ValueError as e:
                refusal = (ErrorCode.BAD_REQUEST, str(e))
        if refusal is not None:
            code, text = refusal
            log.warning("prefill_refused", request_id=msg.request_id, code=int(code), error=text)
            await self.server.send(identity, PrefillFailed(handoff_id=msg.handoff_id, request_id=msg.request_id,
                                                           code=code, message=text))  # fmt: skip
            return
        self.handoffs[h.rid] = h
        self.counts["handoffs"] += 1
        self.daemon.wake()

    async def _on_write_done(self, h: _Handoff, done: CacheTaskDone) -> None:
        try:
            if h.aborted:
                return
            if not done.ok:
                self.counts["kv_failures"] += 1
                await self._reply(h, PrefillFailed(handoff_id=h.rid, request_id=h.request_id, code=done.code,
                                                   message=f"kv write: {done.error}"))  # fmt: skip
                return
            log.info("kv_written", request_id=h.request_id, handoff_id=h.rid, num_blocks=done.num_blocks,
                     nbytes=done.nbytes, write_ms=round(done.duration_ms, 3), **h.clock.step())  # fmt: skip
            await self._reply(h, PrefillDone(handoff_id=h.rid, request_id=h.request_id, first_token=h.first_token,
                                             logprobs=h.logprobs, keys=h.keys, num_tokens=len(h.token_ids),
                                             num_cached_tokens=h.num_cached, prefill_ms=h.prefill_ms,
                                             write_ms=done.duration_ms))  # fmt: skip
        finally:
            self.handoffs.pop(h.rid, None)  # after the reply: a drain waits for the last one

    async def drain(self, timeout_s: float) -> None:
        """Prefill side, on shutdown: new PrefillRequests are refused (the daemon is draining)
        and Pongs say so; the handoffs in flight get `timeout_s` to reply, and the rest a
        PrefillFailed(UNAVAILABLE) at once, so decode fails them over instead of waiting for
        a heartbeat to lapse."""
        log.info("prefill_draining", in_flight=len(self.handoffs), timeout_s=timeout_s)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.handoffs.empty.wait(), timeout_s)
        for h in list(self.handoffs.values()):
            self.handoffs.pop(h.rid, None)
            if not h.aborted:
                await self._reply(h, PrefillFailed(handoff_id=h.rid, request_id=h.request_id,
                                                   code=ErrorCode.UNAVAILABLE,
                                                   message="prefill instance shut down before the handoff finished"))
            if h.phase != Phase.WRITING:  # a write in flight keeps its blocks until the process ends
                self.daemon.engine_abort(h.rid)

    async def _reply(self, h: _Handoff, msg) -> None:
        await self.server.send(h.identity, msg)
        log.info("prefill_replied", request_id=h.request_id, handoff_id=h.rid, message=type(msg).__name__)

    # ---- failures, deadlines, heartbeats -----------------------------------------------
    def _fail(self, h: _Handoff, code: ErrorCode, message: str) -> None:
        """A decode-side handoff failed with no transfer in flight: 502/504 or a local recompute."""
        self.handoffs.pop(h.rid, None)
        if h.link is not None and h.phase == Phase.PREFILLING:
            h.link.send(PrefillAbort(h.handoff_id))
        engine = self.daemon.engine
        if self.cfg.on_kv_failure == "recompute" and engine.scheduler.kv_failed(h.rid):
            self.counts["recomputes"] += 1
            log.warning("kv_recompute", request_id=h.request_id, reason=message, **h.clock.step())
            self.daemon.wake()
            return
        log.warning("kv_handoff_failed", request_id=h.request_id, code=int(code), error=message, **h.clock.step())
        self.daemon.fail_request(h.rid, code, message)

    def tick(self) -> None:
        """Every second: lease expiry, silent transfers, heartbeats."""
        now = time.monotonic()
        for task_id, (rid, deadline) in list(self.tasks.items()):
            if now > deadline + self.cfg.transfer_grace_s:  # the messenger no longer writes: reclaim
                del self.tasks[task_id]
                self.counts["reaped"] += 1
                log.warning("transfer_reaped", request_id=rid, task_id=task_id)
                self.daemon.engine.scheduler.end_transfer(rid)
                h = self.handoffs.get(rid)
                if h is not None and h.task_id == task_id:
                    self._fail(h, ErrorCode.DEADLINE, "deadline: the KV transfer did not finish within lease_s")
                self.daemon.wake()
        for h in list(self.handoffs.values()):
            if now <= h.deadline or h.phase in (Phase.READING, Phase.WRITING):
                continue  # a transfer in flight ends by its own deadline (above, or the messenger's report)
            if self.role == "prefill":
                self.handoffs.pop(h.rid, None)
                log.warning("prefill_expired", request_id=h.request_id, handoff_id=h.rid)
                self.daemon.engine_abort(h.rid)
            else:
                if h.phase == Phase.PREFILLING and h.link is not None:
                    h.link.outstanding -= 1
                self._fail(h, ErrorCode.DEADLINE, f"deadline: no KV within lease_s={self.cfg.lease_s}")
        # A tick that comes late means this process was starved: replies may be waiting unread,
        # so no peer is declared dead on this round.
        starved = now - self._last_tick > max(2.0, self.cfg.heartbeat_timeout_s / 2)
        self._last_tick = now
        for link in self.links:
            if not starved and link.expired(self.cfg.heartbeat_timeout_s):
                self._on_link_dead(link)
            link.ping()

    def _on_link_dead(self, link: PrefillLink) -> None:
        log.error("prefill_instance_down", instance=link.instance, endpoint=link.endpoint,
                  silent_s=round(time.monotonic() - link.last_pong, 3))  # fmt: skip
        link.outstanding = 0
        link.reset()
        for h in [h for h in self.handoffs.values() if h.link is link and h.phase == Phase.PREFILLING]:
            if self._pick() is not None:
                log.warning("prefill_failover", request_id=h.request_id, from_instance=link.instance)
                self._dispatch(h)
            else:
                self._fail(h, ErrorCode.KV_TRANSFER_FAILED,
                           f"prefill instance {link.instance} stopped answering (no heartbeat for "
                           f"{self.cfg.heartbeat_timeout_s} s)")  # fmt: skip
        for h in [h for h in self.handoffs.values() if h.phase == Phase.UNDISPATCHED]:
            self._dispatch(h)  # held for a draining instance: another one, or fail now

    async def on_engine_lost(self) -> None:
        """The worker died: its requests fail and its KV is gone; forget every handoff."""
        handoffs = list(self.handoffs.values())
        self.handoffs.clear()
        self.tasks.clear()
        for h in handoffs:
            if self.role == "decode" and h.phase == Phase.PREFILLING and h.link is not None:
                h.link.send(PrefillAbort(h.handoff_id))
                h.link.outstanding -= 1
            elif self.role == "prefill" and not h.aborted:
                await self._reply(h, PrefillFailed(handoff_id=h.rid, request_id=h.request_id,
                                                   code=ErrorCode.KV_TRANSFER_FAILED,
                                                   message="the prefill instance's worker died"))  # fmt: skip

    async def on_messenger_lost(self) -> None:
        """The messenger died: no transfer can still write; every task in flight failed."""
        for task_id, (rid, _) in list(self.tasks.items()):
            await self.on_task_done(CacheTaskDone.failed(task_id, rid, "the cache messenger died"))

    def status(self) -> dict:
        phases = {p.name.lower(): 0 for p in Phase}
        for h in self.handoffs.values():
            phases[h.phase.name.lower()] += 1
        out = {"pool": self.cfg.pool, "namespace": self.namespace, "in_flight": phases,
               "transfers": len(self.tasks), **self.counts}  # fmt: skip
        if self.server is not None:
            out["pd_endpoint"] = self.server.endpoint
        if self.links:
            out["prefill_instances"] = [
                {"endpoint": link.endpoint or link.spec, "instance": link.instance, "alive": link.alive,
                 "outstanding": link.outstanding}
                for link in self.links
            ]  # fmt: skip
        return out
