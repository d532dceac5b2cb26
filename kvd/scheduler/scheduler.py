"""Scheduler: a pure object that decides, each step, which tokens of which requests to compute.

No I/O, no sleeps, no clocks it depends on. One rule, in vLLM v1's spirit: every
request's computed tokens catch up with its tokens under a per-step token budget
(`max_num_batched_tokens`) and a sequence limit (`max_num_seqs`). A long prompt is
computed in chunks, a prefix-cache hit starts a request part-way, and a decode step is
just one token to catch up — no phases.

When the pool runs out of blocks for a running request, the newest running request is
preempted: its blocks go back and it waits at the head of the queue. By recompute, its
computed count returns to 0 and, resumed, it recomputes prompt plus outputs (prefix hits
help). By swap (`preempt="swap"`, while the bounded host pool has room), its computed
blocks are copied to host slots first and copied back into fresh blocks when it resumes,
keeping its computed count. Either way it continues with identical output. With KV events
on, the full blocks it holds in host slots are recorded as the host tier's (stored at the
swap-out, removed when the slots return).

KV from outside (the KV connector, `kvd.connector`). The scheduler asks its connector
how many of a request's leading tokens come from elsewhere; such a request gets its blocks
when it reaches the head of the queue, within the connector's budget (`wait_blocks`, so
requests waiting for KV never starve running ones), and then waits, WAITING_FOR_KV, until
`kv_loaded` (it then computes only what follows) or `kv_load_failed` (it recomputes). A
finished request whose blocks the connector still holds (a save or load in flight) stays
in the request table until `release`. The scheduler keeps no state of its own for any of
this: the record and its status carry it.

    out = scheduler.schedule()            # SchedulerOutput (a diff)
    finished = scheduler.update(model_out)  # list[EngineOutput]
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from kvd.cache.kv_manager import KVCacheManager, cdiv
from kvd.config import SchedulerConfig
from kvd.connector.base import KVConnector
from kvd.request import Request, RequestStatus
from kvd.scheduler.integrity import check_integrity
from kvd.scheduler.output import (
    CachedRequestData,
    EngineOutput,
    ModelOutput,
    NewRequestData,
    SchedulerOutput,
)


@dataclass
class _Step:
    """What one schedule() call has decided so far, and the token budget it has left."""

    budget: int
    scheduled: dict[str, int] = field(default_factory=dict)  # request id -> tokens, in schedule order
    new_reqs: list[NewRequestData] = field(default_factory=list)
    cached_reqs: list[CachedRequestData] = field(default_factory=list)
    preempted: list[str] = field(default_factory=list)
    swap_in: list[tuple[int, int]] = field(default_factory=list)
    forks: dict[str, str] = field(default_factory=dict)  # later choice id -> its first choice's id
    fork_copies: list[tuple[int, int]] = field(default_factory=list)


class Scheduler:
    """Waiting queue, running list and the KV cache manager; schedule() and update()."""

    def __init__(
        self,
        config: SchedulerConfig,
        kv_manager: KVCacheManager,
        preempt: str = "recompute",
        num_host_slots: int = 0,
        connector: KVConnector | None = None,
    ) -> None:
        self.config = config
        self.kv = kv_manager
        self.connector = connector or KVConnector()
        self.preempt_mode = preempt
        self.num_host_slots = num_host_slots if preempt == "swap" else 0
        self.host_free: list[int] = list(range(self.num_host_slots))
        self._swap_out: list[tuple[int, int]] = []
        self.num_swaps = 0
        # The request table: every record from add_request until it ends, or, when the
        # connector holds its blocks past its end, until `release`.
        self.requests: dict[str, Request] = {}
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self._step = 0
        self._finished_ids: list[str] = []  # to tell the runner at the next schedule()
        self.num_preemptions = 0

    # ---- requests in and out -----------------------------------------------------------
    def add_request(self, request: Request) -> None:
        if request.request_id in self.requests:
            raise ValueError(f"request_id: {request.request_id!r} is already in use")
        self.connector.added(request)
        self.requests[request.request_id] = request
        self.waiting.append(request)

    def get(self, request_id: str) -> Request | None:
        """A live request (None once it finished, even while a transfer holds its blocks)."""
        request = self.requests.get(request_id)
        return None if request is None or request.status.finished else request

    def finish_requests(self, request_ids: list[str], status: RequestStatus) -> list[Request]:
        """End requests from outside (abort, stop string, error). Unknown or finished ids are ignored."""
        assert status.finished
        done = []
        for request_id in request_ids:
            request = self.get(request_id)
            if request is None:
                continue
            if request.status == RequestStatus.RUNNING:
                self.running.remove(request)
            elif request.status != RequestStatus.WAITING_FOR_KV:
                self.waiting.remove(request)
            self._finish(request, status)
            done.append(request)
        return done

    def has_unfinished(self) -> bool:
        """Whether a step could do work (requests waiting for pool KV cannot, until it arrives)."""
        return bool(self.waiting or self.running)

    # ---- KV from outside (the connector's) ---------------------------------------------
    def kv_loaded(self, request_id: str, num_tokens: int | None = None) -> bool:
        """The external KV of a WAITING_FOR_KV request is in its blocks: it computes only what
        follows. `num_tokens` (default: all it waited for) leading tokens now have KV."""
        request = self.get(request_id)
        if request is None or request.status != RequestStatus.WAITING_FOR_KV:
            return False  # finished meanwhile, or a duplicate
        have = self.connector.num_external_tokens(request) if num_tokens is None else num_tokens
        self.connector.load_ended(request)
        request.num_computed_tokens = max(request.num_computed_tokens, have)
        request.status = RequestStatus.WAITING
        self.waiting.appendleft(request)  # it was admitted before anything still queued
        return True

    def kv_load_failed(self, request_id: str) -> bool:
        """Give up on external KV: free the preallocated blocks and compute everything here."""
        request = self.get(request_id)
        if request is None or request.status != RequestStatus.WAITING_FOR_KV:
            return False
        assert not self.connector.holds(request), "kv_load_failed while a transfer may still write the blocks"
        self.connector.load_ended(request)
        self.kv.free(request_id)
        request.num_computed_tokens = 0
        request.status = RequestStatus.WAITING
        self.waiting.appendleft(request)
        return True

    def release(self, request_id: str) -> None:
        """The connector let go of a request's blocks (its transfer ended): a request that
        finished meanwhile has them freed now. Idempotent."""
        request = self.requests.get(request_id)
        if request is not None and request.status.finished and not self.connector.holds(request):
            self.kv.free(request_id)
            del self.requests[request_id]

    def append_token(self, request_id: str, token: int, logprobs=None) -> EngineOutput | None:
        """A token sampled elsewhere (a decode instance's first token, from the prefill instance)."""
        request = self.get(request_id)
        if request is None:
            return None
        request.append_token(token)
        status = request.check_stop()
        if status is not None:
            self.finish_requests([request_id], status)
        reason = status.finish_reason if status else None
        return EngineOutput(request, [token], reason, [logprobs] if logprobs else None)

    @property
    def num_kv_wait_blocks(self) -> int:
        """Blocks held by requests waiting for external KV (the connector counts them)."""
        return self.connector.num_wait_blocks

    def kv_waiting(self) -> list[Request]:
        return [r for r in self.requests.values() if r.status == RequestStatus.WAITING_FOR_KV]

    def _preallocate(self, request: Request, external: int) -> bool:
        """Hold blocks for the whole prompt (local prefix hits first), within the wait budget."""
        computed = self.kv.get_computed_blocks(request)
        hit_tokens = len(computed) * self.kv.block_size
        need = cdiv(request.num_tokens, self.kv.block_size) - len(computed)
        if self.num_kv_wait_blocks + need > self.connector.wait_blocks:
            return False
        if self.kv.allocate_slots(request, request.num_tokens - hit_tokens, computed) is None:
            return False
        request.num_computed_tokens = hit_tokens
        if hit_tokens >= external:  # everything to load is already here
            self.connector.load_ended(request)
            return True
        request.status = RequestStatus.WAITING_FOR_KV
        self.connector.allocated(request, len(self.kv.req_blocks[request.request_id]))
        return True

    # ---- the step ----------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        step = _Step(self.config.max_num_batched_tokens)
        self._schedule_running(step)
        # Waiting requests are admitted only while nothing was preempted in this step.
        later: list[Request] = []  # choices waiting for their first choice's prompt: they keep their place
        while self.waiting and not step.preempted and len(self.running) < self.config.max_num_seqs:
            head = self.waiting[0]
            if step.budget <= 0 and head.first_choice is None:
                break
            if head.first_choice is not None and head.waits_for_first_choice(step.scheduled):
                later.append(self.waiting.popleft())
                continue
            if not self._admit(self.waiting[0], step):
                break  # FCFS: it waits for blocks (or KV-wait budget), and nothing behind it jumps the queue
        self.waiting.extendleft(reversed(later))
        for request_id, n in step.scheduled.items():
            self.requests[request_id].num_computed_tokens += n
        self._step += 1
        out = SchedulerOutput(
            step=self._step,
            new_reqs=step.new_reqs,
            cached_reqs=step.cached_reqs,
            num_scheduled_tokens=step.scheduled,
            finished_request_ids=self._finished_ids,
            preempted_request_ids=step.preempted,
            swap_out=self._swap_out,
            swap_in=step.swap_in,
            forks=step.forks,
            fork_copies=step.fork_copies,
        )
        self._finished_ids = []
        self._swap_out = []
        return out

    def _schedule_running(self, step: _Step) -> None:
        """Running requests, oldest first; preempt from the newest end when blocks run out."""
        i = 0
        while i < len(self.running) and step.budget > 0:
            request = self.running[i]
            num_new = min(request.num_tokens - request.num_computed_tokens, step.budget)
            if num_new <= 0:  # can happen only transiently; nothing to compute
                i += 1
                continue
            while self.kv.allocate_slots(request, num_new) is None:
                victim = self.running.pop()
                self._preempt(victim)
                step.preempted.append(victim.request_id)
                if victim is request:
                    return  # the request preempted itself: nothing newer is left to run
            step.scheduled[request.request_id] = num_new
            step.budget -= num_new
            step.cached_reqs.append(self._cached_data(request))
            self.kv.cache_blocks(request, request.num_computed_tokens + num_new)
            i += 1

    def _admit(self, request: Request, step: _Step) -> bool:
        """Take the head of the queue into this step; False when it must wait for blocks. A PD
        request whose blocks were just preallocated leaves the queue to wait for its KV."""
        external = self.connector.num_external_tokens(request)
        if external:
            if not self._preallocate(request, external):
                return False
            if request.status == RequestStatus.WAITING_FOR_KV:
                self.waiting.popleft()
                return True
        slots = request.host_slots
        # A request that already holds blocks (its pool KV arrived) or was swapped out
        # resumes at its computed count; anything else looks up the prefix cache.
        resumes = slots is not None or request.request_id in self.kv.req_blocks
        computed = [] if resumes or request.needs_prompt_logprobs else self.kv.get_computed_blocks(request)
        num_cached_tokens = request.num_computed_tokens if resumes else len(computed) * self.kv.block_size
        rest = request.num_tokens - num_cached_tokens
        if not resumes and self._forks(request, rest, step):
            return self._fork(request, computed, num_cached_tokens, step)
        # A later choice's partial block (< block_size tokens) joins its first choice's step
        # even past the budget: the n choices' first tokens come in one step.
        num_new = rest if request.first_choice is not None and rest < self.kv.block_size else min(rest, step.budget)
        if not num_new:
            return False
        if self.connector.computes_whole(request, num_cached_tokens):
            num_new = request.num_tokens  # the prefill group computes it in one go
        if self.kv.allocate_slots(request, num_new, computed) is None:
            return False
        self.waiting.popleft()
        if slots is not None:  # copy its KV back from the host pool before this step runs
            self._host_released(request)
            request.host_slots = None
            step.swap_in += zip(self.kv.block_ids(request.request_id), slots)
            self.host_free += slots
        request.num_computed_tokens = num_cached_tokens
        request.status = RequestStatus.RUNNING
        self.running.append(request)
        step.scheduled[request.request_id] = num_new
        step.budget = max(0, step.budget - num_new)
        step.new_reqs.append(self._new_data(request))
        self.kv.cache_blocks(request, request.num_computed_tokens + num_new)
        return True

    def _forks(self, request: Request, rest: int, step: _Step) -> bool:
        """Whether a later choice forks from its first choice in this step: the first's prompt
        ends in it (its last row is sampled here) and what the prefix cache does not give this
        choice lies in one block of the first's. A choice that needs its own prompt logprobs,
        or whose first choice's prompt came from elsewhere (PD) or goes to the prefill group,
        computes its partial block itself instead."""
        first = request.first_choice
        if first is None or first.status != RequestStatus.RUNNING or request.needs_prompt_logprobs:
            return False
        if self.connector.computes_whole(first, first.num_computed_tokens):
            return False  # the prefill group samples the first's token apart from the step's rows
        n = step.scheduled.get(first.request_id, 0)
        return (0 < rest <= self.kv.block_size and first.num_output_tokens == 0
                and n and first.num_computed_tokens + n == first.num_tokens == request.num_tokens)  # fmt: skip

    def _fork(self, request: Request, computed: list, num_cached_tokens: int, step: _Step) -> bool:
        """Admit a later choice as a fork of its first choice: its own block for the partial
        prompt block (the first's copied into it after the forward), nothing computed, its
        first token sampled from the first's last prompt row."""
        if self.kv.allocate_slots(request, request.num_tokens - num_cached_tokens, computed) is None:
            return False
        self.waiting.popleft()
        at = num_cached_tokens // self.kv.block_size
        src = self.kv.block_ids(request.first_choice.request_id)[at]
        step.fork_copies.append((src, self.kv.block_ids(request.request_id)[at]))
        step.forks[request.request_id] = request.first_choice.request_id
        request.num_computed_tokens = request.num_tokens
        request.status = RequestStatus.RUNNING
        self.running.append(request)
        step.new_reqs.append(self._new_data(request))
        self.kv.cache_blocks(request, request.num_tokens)
        return True

    def update(self, output: ModelOutput) -> list[EngineOutput]:
        """Append sampled tokens, finish requests that stop, cache completed blocks."""
        results: list[EngineOutput] = []
        for chunk in output.prompt_logprobs:
            request = self.requests.get(chunk.request_id)
            if request is not None and request.prompt_logprobs is not None and chunk.start == len(request.prompt_logprobs):
                request.prompt_logprobs += chunk.logprobs  # (a recompute after preemption adds nothing)
        logprobs = output.logprobs or [None] * len(output.request_ids)
        for request_id, token, lp in zip(output.request_ids, output.token_ids, logprobs):
            request = self.requests.get(request_id)
            if request is None or request.status != RequestStatus.RUNNING:
                continue  # finished or preempted meanwhile: the token is stale
            request.append_token(token)
            status = request.check_stop()
            if status is not None:
                self.running.remove(request)
                self._finish(request, status)
            results.append(
                EngineOutput(request, [token], status.finish_reason if status else None, [lp] if lp else None)
            )
        return results

    # ---- helpers -----------------------------------------------------------------------
    def _new_data(self, request: Request) -> NewRequestData:
        block_ids = self.kv.block_ids(request.request_id)
        request.num_sent_blocks = len(block_ids)
        return NewRequestData(
            request_id=request.request_id,
            token_ids=list(request.all_token_ids),
            num_prompt_tokens=request.num_prompt_tokens,
            block_ids=block_ids,
            num_computed_tokens=request.num_computed_tokens,
            sampling_params=request.sampling_params,
        )

    def _cached_data(self, request: Request) -> CachedRequestData:
        block_ids = self.kv.block_ids(request.request_id)
        sent = request.num_sent_blocks
        request.num_sent_blocks = len(block_ids)
        return CachedRequestData(request.request_id, block_ids[sent:], request.num_computed_tokens)

    def _preempt(self, request: Request) -> None:
        # Victims come from the newest end and are not yet scheduled this step, so their
        # computed count covers exactly the KV written in earlier steps.
        blocks = self.kv.block_ids(request.request_id)[: cdiv(request.num_computed_tokens, self.kv.block_size)]
        if self.num_host_slots and blocks and len(blocks) <= len(self.host_free):
            slots = [self.host_free.pop() for _ in blocks]
            self._swap_out += zip(blocks, slots)  # copied before this step's forward reuses the blocks
            request.host_slots = slots
            if self.kv.events is not None:
                self.kv.events.host_in(self._host_hashes(request))
            self.num_swaps += 1
        else:
            request.num_computed_tokens = 0
        self.kv.free(request.request_id)
        request.num_sent_blocks = None
        request.num_preemptions += 1
        request.status = RequestStatus.PREEMPTED
        self.waiting.appendleft(request)
        self.num_preemptions += 1

    def _host_hashes(self, request: Request) -> list[bytes]:
        """The hashes of the full blocks a swapped request keeps in host slots."""
        hashes = request.update_block_hashes(self.kv.block_size, self.kv.hash_algo)
        return hashes[: request.num_computed_tokens // self.kv.block_size]

    def _host_released(self, request: Request) -> None:
        if self.kv.events is not None:
            self.kv.events.host_out(self._host_hashes(request))

    def _finish(self, request: Request, status: RequestStatus) -> None:
        if request.host_slots is not None:
            self._host_released(request)
            self.host_free += request.host_slots
            request.host_slots = None
        request.status = status
        if not self.connector.request_finished(request):  # else `release` frees them later
            self.kv.free(request.request_id)
            del self.requests[request.request_id]
        if request.num_sent_blocks is not None:
            request.num_sent_blocks = None
            self._finished_ids.append(request.request_id)

    def check_integrity(self) -> None:
        """Block accounting plus the request table (kvd.scheduler.integrity)."""
        check_integrity(self)
