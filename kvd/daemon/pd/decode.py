"""The decode role: a client's entry point in PD mode (docs/architecture.md, "The PD event chain").

    accept ─▶ queued ─▶ blocks preallocated (lease starts) ─▶ PrefillRequest ─▶ PREFILLING
      ─▶ PrefillDone: keys checked, first token streamed at once ─▶ CacheTask(read) ─▶ READING
      ─▶ CacheTaskDone ok ─▶ kv_loaded: the request joins the running batch, never prefilled again

Every step is a named, timed log event. A failed read is never served: PrefillFailed, a
failed or short read, or a lease that expires is a 502/504 to the client (or a local
recompute with `pd.on_kv_failure = "recompute"`), and the blocks return once no transfer
holds them. Handoff ids carry the attempt (`<request_id>#<n>@<instance>`), so a reply of
an earlier attempt, a duplicate, or one for a request that already ended is logged and
dropped. Each prefill instance is pinged every heartbeat; one silent for
`pd.heartbeat_timeout_s` is dead and its handoffs fail over to a live one (or fail at
once); one that says it is draining gets nothing new.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Coroutine
from typing import Any

import msgspec
import structlog
import zmq
import zmq.asyncio

from kvd.config import KvdConfig
from kvd.daemon.pd.handoff import Handoff, PDRole, Phase
from kvd.daemon.pd.peers import PrefillLink
from kvd.daemon.serving import Serving
from kvd.messages import (
    CacheTaskDone,
    ErrorCode,
    FromPrefill,
    Pong,
    PrefillAbort,
    PrefillDone,
    PrefillFailed,
    PrefillRequest,
)
from kvd.request import Request

log = structlog.get_logger("kvd.pd.decode")


class DecodeHandoff(Handoff):
    """A client request's handoff: which attempt, to which prefill instance."""

    def __init__(self, request_id: str) -> None:
        super().__init__(request_id, request_id)
        self.attempt = 0
        self.handoff_id = ""
        self.link: PrefillLink | None = None


class DecodeRole(PDRole):
    """Client requests get their prompt's KV from a prefill instance through the pool."""

    load = "prompt"

    def __init__(self, cfg: KvdConfig, serving: Serving, ctx: zmq.asyncio.Context, run_dir) -> None:
        super().__init__(cfg, serving, ctx, run_dir)
        self.heartbeat_interval_s = cfg.daemon.heartbeat_interval_s
        self.links = [PrefillLink(ctx, spec, cfg.pd.secret) for spec in cfg.pd.prefill_endpoints]
        self._rr = itertools.count()
        self._last_tick = time.monotonic()
        for link in self.links:
            link.ping()

    def readers(self) -> list[Coroutine[Any, Any, None]]:
        return [self._read_link(link) for link in self.links]

    def close(self) -> None:
        for link in self.links:
            link.close()

    # ---- the request's side ------------------------------------------------------------
    def admitted(self, request: Request) -> None:
        if self.engine.connector.num_external_tokens(request):  # not a later choice, which loads nothing
            self.begin(request, DecodeHandoff(request.request_id))

    def scheduled(self) -> None:
        """Requests whose blocks were just preallocated are dispatched to a prefill instance."""
        for request in self.engine.connector.take_loads():
            h = request.owner.handoff if request.owner is not None else None
            if h is None:
                continue
            h.read_from = request.num_computed_tokens // self.engine.kv.block_size
            h.deadline = min(h.deadline, time.monotonic() + self.cfg.lease_s)
            log.info("kv_preallocated", request_id=h.request_id, from_block=h.read_from,
                     num_blocks=len(self.engine.kv.block_ids(h.engine_id)), **h.clock.step())  # fmt: skip
            self._dispatch(h)

    def ended(self, request: Request) -> None:
        """The client left, aborted, or the request failed: the prefill instance stops too."""
        h = request.owner.handoff if request.owner is not None else None
        if h is None:
            return
        self.end(h)
        log.info("handoff_aborted", request_id=h.request_id, phase=h.phase.name, **h.clock.step())
        self._abandon(h)

    def _abandon(self, h: DecodeHandoff) -> None:
        if h.phase == Phase.PREFILLING and h.link is not None:
            h.link.send(PrefillAbort(h.handoff_id))
            h.link.outstanding -= 1
            h.phase = Phase.QUEUED

    # ---- dispatch ----------------------------------------------------------------------
    def _pick(self, avoid: PrefillLink | None = None) -> PrefillLink | None:
        live = [link for link in self.links if link.alive and not link.draining and link is not avoid]
        if not live:
            return None
        least = min(link.outstanding for link in live)
        candidates = [link for link in live if link.outstanding == least]
        return candidates[next(self._rr) % len(candidates)]

    def _dispatch(self, h: DecodeHandoff, avoid: PrefillLink | None = None) -> None:
        request = self.engine.request(h.engine_id)
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
        h.handoff_id = f"{h.engine_id}#{h.attempt}@{self.instance}"
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

    # ---- prefill instances' messages ---------------------------------------------------
    async def _read_link(self, link: PrefillLink) -> None:
        """The reader of one prefill instance (its socket appears once its endpoint is known)."""
        while True:
            await link.connected.wait()
            sock = link.sock
            try:
                msg = await link.recv()
            except (zmq.ZMQError, asyncio.CancelledError):
                if link.sock is sock:
                    raise  # a real error, or the daemon stopping
                continue  # the link was reset (its peer died), which ends a pending recv: read anew
            except (msgspec.DecodeError, msgspec.ValidationError) as e:
                log.warning("pd_frame_rejected", instance=link.instance, error=str(e))
                continue
            await self.on_prefill_message(link, msg)

    async def on_prefill_message(self, link: PrefillLink, msg: FromPrefill) -> None:
        if isinstance(msg, Pong):
            was_draining = link.draining
            if link.on_pong(msg):
                log.info("prefill_instance_up", instance=link.instance, endpoint=link.endpoint)
                for h in [h for h in self.handoffs() if h.phase == Phase.UNDISPATCHED]:
                    self._dispatch(h)
            elif link.draining and not was_draining:
                log.info("prefill_instance_draining", instance=link.instance, endpoint=link.endpoint)
            return
        h = self.handoff(msg.handoff_id.rpartition("#")[0])  # the id may hold a '#' itself
        if h is None or h.handoff_id != msg.handoff_id or h.phase != Phase.PREFILLING:
            self.counts["late_messages"] += 1
            log.info("late_message_ignored", message=type(msg).__name__, handoff_id=msg.handoff_id,
                     request_id=msg.request_id)  # fmt: skip
            return
        link.outstanding -= 1
        h.phase = Phase.QUEUED  # answered: nothing is outstanding there any more
        if isinstance(msg, PrefillFailed):
            self._on_prefill_failed(h, link, msg)
        else:
            await self._on_prefill_done(h, msg)

    def _on_prefill_failed(self, h: DecodeHandoff, link: PrefillLink, msg: PrefillFailed) -> None:
        log.warning("prefill_failed", request_id=h.request_id, code=int(msg.code), error=msg.message,
                    **h.clock.step())  # fmt: skip
        # Refused for now (draining, worker restarting): another instance may take it.
        if msg.code == ErrorCode.UNAVAILABLE and h.attempt <= len(self.links) and self._pick(avoid=link):
            log.warning("prefill_failover", request_id=h.request_id, from_instance=link.instance, reason=msg.message)
            self._dispatch(h, avoid=link)
            return
        self._fail(h, msg.code if msg.code != ErrorCode.INTERNAL else ErrorCode.KV_TRANSFER_FAILED,
                   f"prefill instance {link.instance}: {msg.message}")  # fmt: skip

    async def _on_prefill_done(self, h: DecodeHandoff, msg: PrefillDone) -> None:
        request = self.engine.request(h.engine_id)
        if request is None:
            self.end(h)
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
        h.phase = Phase.READING  # from here the request's end is the read's, not the prefill's
        self.serving.post(self.engine.append_token(h.engine_id, msg.first_token, msg.logprobs))  # out at once
        if self.engine.request(h.engine_id) is None:  # the first token finished it: nothing to read
            self.end(h)
            return
        self.read(h, keys[h.read_from :], prefix=False)

    # ---- the read ----------------------------------------------------------------------
    def arrived(self, h: Handoff, num_blocks: int) -> None:
        """The whole prompt's KV, the partial block included, is in the request's blocks."""
        self.end(h)
        request = self.engine.request(h.engine_id)
        tokens = request.num_prompt_tokens if request is not None else 0
        if self.engine.kv_loaded(h.engine_id, tokens):
            h.phase = Phase.QUEUED
            log.info("kv_admitted", request_id=h.request_id, num_tokens=tokens, **h.clock.step())
            self.serving.wake()

    async def task_done(self, h: Handoff, done: CacheTaskDone) -> None:
        if done.ok:
            self.arrived(h, done.num_blocks)
        else:
            self.counts["kv_failures"] += 1
            self._fail(h, done.code, f"kv transfer: {done.error}")

    def transfer_expired(self, h: Handoff) -> None:
        self._fail(h, ErrorCode.DEADLINE, "deadline: the KV transfer did not finish within lease_s")

    def _fail(self, h: DecodeHandoff, code: ErrorCode, message: str) -> None:
        """A handoff failed with no transfer in flight: 502/504 to the client, or a local recompute."""
        self.end(h)
        self._abandon(h)
        if self.cfg.on_kv_failure == "recompute" and self.engine.kv_load_failed(h.engine_id):
            self.counts["recomputes"] += 1
            log.warning("kv_recompute", request_id=h.request_id, reason=message, **h.clock.step())
            self.serving.wake()
            return
        log.warning("kv_handoff_failed", request_id=h.request_id, code=int(code), error=message, **h.clock.step())
        self.serving.fail_soon(h.engine_id, code, message)

    # ---- leases and heartbeats ---------------------------------------------------------
    def tick(self) -> None:
        """Every second: lease expiry, silent transfers, heartbeats."""
        self.reap_transfers()
        now = time.monotonic()
        for h in self.handoffs():
            if now > h.deadline and h.phase != Phase.READING:  # a read ends by its own deadline
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
        for h in [h for h in self.handoffs() if h.link is link and h.phase == Phase.PREFILLING]:
            h.phase = Phase.QUEUED  # nothing is outstanding there any more
            if self._pick() is not None:
                log.warning("prefill_failover", request_id=h.request_id, from_instance=link.instance)
                self._dispatch(h)
            else:
                self._fail(h, ErrorCode.KV_TRANSFER_FAILED,
                           f"prefill instance {link.instance} stopped answering (no heartbeat for "
                           f"{self.cfg.heartbeat_timeout_s} s)")  # fmt: skip
        for h in [h for h in self.handoffs() if h.phase == Phase.UNDISPATCHED]:
            self._dispatch(h)  # held for a draining instance: another one, or fail now

    async def engine_lost(self) -> None:
        """The worker died: its requests failed and its KV is gone; forget every handoff."""
        for h in self.handoffs():
            self._abandon(h)
            self.end(h)
        self.transfers = None

    def problems(self) -> list[str]:
        if self.links and not any(link.alive for link in self.links):
            return ["pd: no prefill instance is answering"]
        return []

    def status(self) -> dict[str, Any]:
        out = super().status()
        out["prefill_instances"] = [
            {"endpoint": link.endpoint or link.spec, "instance": link.instance, "alive": link.alive,
             "outstanding": link.outstanding}
            for link in self.links
        ]  # fmt: skip
        return out
