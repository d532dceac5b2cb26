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
keeping its computed count. Either way it continues with identical output.

PD handoff (the daemon drives it; the scheduler only keeps the books). A request whose
KV comes from the pool (`kv_recv_tokens`) gets its blocks preallocated when it reaches
the head of the queue — within a separate budget (`kv_wait_blocks`), so requests waiting
for KV never starve running ones — and then waits, WAITING_FOR_KV, until the daemon calls
`kv_arrived` (it then computes only what follows) or `kv_failed` (it recomputes). A
prefill instance's request (`kv_send`) ends after its first token with its blocks held.
A request's blocks are never freed while `transfer_in_flight`: finishing it then defers
the free to `end_transfer`.

    out = scheduler.schedule()            # SchedulerOutput (a diff)
    finished = scheduler.update(model_out)  # list[EngineOutput]
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from kvd.cache.kv_manager import KVCacheManager, cdiv
from kvd.config import SchedulerConfig
from kvd.request import Request, RequestStatus
from kvd.scheduler.output import CachedRequestData, EngineOutput, ModelOutput, NewRequestData, SchedulerOutput


@dataclass
class _Step:
    """What one schedule() call has decided so far, and the token budget it has left."""

    budget: int
    scheduled: dict[str, int] = field(default_factory=dict)  # request id -> tokens, in schedule order
    new_reqs: list[NewRequestData] = field(default_factory=list)
    cached_reqs: list[CachedRequestData] = field(default_factory=list)
    preempted: list[str] = field(default_factory=list)
    swap_in: list[tuple[int, int]] = field(default_factory=list)


class Scheduler:
    """Waiting queue, running list and the KV cache manager; schedule() and update()."""

    def __init__(
        self,
        config: SchedulerConfig,
        kv_manager: KVCacheManager,
        preempt: str = "recompute",
        num_host_slots: int = 0,
        kv_wait_blocks: int | None = None,
        group_min_tokens: int = 0,
    ) -> None:
        self.config = config
        # A prefill group computes a long prompt in one go: such a prompt (no prefix hit, at
        # least this many tokens; 0 = no group) is scheduled whole, taking what budget is left.
        self.group_min_tokens = group_min_tokens
        self.kv = kv_manager
        self.preempt_mode = preempt
        self.num_host_slots = num_host_slots if preempt == "swap" else 0
        self.host_free: list[int] = list(range(self.num_host_slots))
        self.swapped: dict[str, list[int]] = {}  # request id -> host slots holding its computed blocks
        self._swap_out: list[tuple[int, int]] = []
        self.num_swaps = 0
        self.requests: dict[str, Request] = {}
        self.waiting: deque[Request] = deque()
        self.running: list[Request] = []
        self._step = 0
        self._finished_ids: list[str] = []  # to tell the runner at the next schedule()
        self._sent_blocks: dict[str, int] = {}  # block ids the runner knows per request
        self.num_preemptions = 0
        # PD: preallocated requests waiting for their KV, finished ones whose blocks wait for
        # a transfer to end, and the ones preallocated since the daemon last looked.
        self.kv_wait_blocks = kv_manager.num_blocks if kv_wait_blocks is None else kv_wait_blocks
        self.kv_waiting: dict[str, Request] = {}
        self.deferred: dict[str, Request] = {}
        self._preallocated: list[Request] = []

    # ---- requests in and out -----------------------------------------------------------
    def add_request(self, request: Request) -> None:
        if request.request_id in self.requests:
            raise ValueError(f"request_id: {request.request_id!r} is already in use")
        self.requests[request.request_id] = request
        self.waiting.append(request)

    def finish_requests(self, request_ids: list[str], status: RequestStatus) -> list[Request]:
        """End requests from outside (abort, stop string, error). Unknown or finished ids are ignored."""
        assert status.finished
        done = []
        for request_id in request_ids:
            request = self.requests.get(request_id)
            if request is None or request.status.finished:
                continue
            if request.status == RequestStatus.RUNNING:
                self.running.remove(request)
            elif request.status == RequestStatus.WAITING_FOR_KV:
                del self.kv_waiting[request_id]
            else:
                self.waiting.remove(request)
            self._finish(request, status)
            done.append(request)
        return done

    def has_unfinished(self) -> bool:
        """Whether a step could do work (requests waiting for pool KV cannot, until it arrives)."""
        return bool(self.waiting or self.running)

    # ---- the PD handoff ----------------------------------------------------------------
    def take_preallocated(self) -> list[Request]:
        """Requests whose blocks were preallocated since the last call: their KV may now be read."""
        out, self._preallocated = self._preallocated, []
        return out

    def kv_arrived(self, request_id: str, num_tokens: int | None = None) -> bool:
        """The pool KV of a WAITING_FOR_KV request is in its blocks: it computes only what follows.
        `num_tokens` (default `kv_recv_tokens`) is how many leading tokens now have KV."""
        request = self.kv_waiting.pop(request_id, None)
        if request is None:
            return False  # finished meanwhile, or a duplicate
        have = request.kv_recv_tokens if num_tokens is None else num_tokens
        request.num_computed_tokens = max(request.num_computed_tokens, have)
        request.kv_recv_tokens = 0
        request.status = RequestStatus.WAITING
        self.waiting.appendleft(request)  # it was admitted before anything still queued
        return True

    def kv_failed(self, request_id: str) -> bool:
        """Give up on pool KV: free the preallocated blocks and compute everything locally."""
        request = self.kv_waiting.pop(request_id, None)
        if request is None:
            return False
        assert not request.transfer_in_flight, "kv_failed while a transfer may still write the blocks"
        self.kv.free(request_id)
        request.num_computed_tokens = 0
        request.kv_recv_tokens = 0
        request.status = RequestStatus.WAITING
        self.waiting.appendleft(request)
        return True

    def append_token(self, request_id: str, token: int, logprobs=None) -> EngineOutput | None:
        """A token sampled elsewhere (a decode instance's first token, from the prefill instance)."""
        request = self.requests.get(request_id)
        if request is None or request.status.finished:
            return None
        request.append_token(token)
        status = request.check_stop()
        if status is not None:
            self.finish_requests([request_id], status)
        return EngineOutput(request_id, [token], status.finish_reason if status else None,
                            [logprobs] if logprobs else None)  # fmt: skip

    def begin_transfer(self, request_id: str) -> None:
        request = self.requests.get(request_id)
        if request is not None:
            request.transfer_in_flight = True

    def end_transfer(self, request_id: str) -> None:
        """The transfer touching the request's blocks ended (or can no longer write). Idempotent;
        a request that finished meanwhile has its blocks freed now."""
        request = self.deferred.pop(request_id, None) or self.requests.get(request_id)
        if request is None:
            return
        request.transfer_in_flight = False
        if request.status.finished:
            self.kv.free(request_id)

    @property
    def num_kv_wait_blocks(self) -> int:
        return sum(len(self.kv.req_blocks.get(request_id, ())) for request_id in self.kv_waiting)

    def _preallocate(self, request: Request) -> bool:
        """Hold blocks for the whole prompt (local prefix hits first), within the KV-wait budget."""
        computed = self.kv.get_computed_blocks(request)
        hit_tokens = len(computed) * self.kv.block_size
        need = cdiv(request.num_tokens, self.kv.block_size) - len(computed)
        if self.num_kv_wait_blocks + need > self.kv_wait_blocks:
            return False
        if self.kv.allocate_slots(request, request.num_tokens - hit_tokens, computed) is None:
            return False
        request.num_computed_tokens = hit_tokens
        if hit_tokens >= request.kv_recv_tokens:  # everything to read is already here
            request.kv_recv_tokens = 0
            return True
        request.status = RequestStatus.WAITING_FOR_KV
        self.kv_waiting[request.request_id] = request
        self._preallocated.append(request)
        return True

    # ---- the step ----------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        step = _Step(self.config.max_num_batched_tokens)
        self._schedule_running(step)
        # Waiting requests are admitted only while nothing was preempted in this step.
        while self.waiting and not step.preempted and step.budget > 0 and len(self.running) < self.config.max_num_seqs:
            if not self._admit(self.waiting[0], step):
                break  # FCFS: it waits for blocks (or KV-wait budget), and nothing behind it jumps the queue
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
        if request.kv_recv_tokens:
            if not self._preallocate(request):
                return False
            if request.status == RequestStatus.WAITING_FOR_KV:
                self.waiting.popleft()
                return True
        slots = self.swapped.get(request.request_id)
        # A request that already holds blocks (its pool KV arrived) or was swapped out
        # resumes at its computed count; anything else looks up the prefix cache.
        resumes = slots is not None or request.request_id in self.kv.req_blocks
        computed = [] if resumes else self.kv.get_computed_blocks(request)
        num_cached_tokens = request.num_computed_tokens if resumes else len(computed) * self.kv.block_size
        num_new = min(request.num_tokens - num_cached_tokens, step.budget)
        if self.group_min_tokens and num_cached_tokens == 0 and request.num_tokens >= self.group_min_tokens:
            num_new = request.num_tokens  # on the group, whole (see __init__)
        if self.kv.allocate_slots(request, num_new, computed) is None:
            return False
        self.waiting.popleft()
        if slots is not None:  # copy its KV back from the host pool before this step runs
            del self.swapped[request.request_id]
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

    def update(self, output: ModelOutput) -> list[EngineOutput]:
        """Append sampled tokens, finish requests that stop, cache completed blocks."""
        results: list[EngineOutput] = []
        logprobs = output.logprobs or [None] * len(output.request_ids)
        for request_id, token, lp in zip(output.request_ids, output.token_ids, logprobs):
            request = self.requests.get(request_id)
            if request is None or request.status != RequestStatus.RUNNING:
                continue  # finished or preempted meanwhile: the token is stale
            request.append_token(token)
            status = request.check_stop()
            if status is None and request.kv_send:
                status = RequestStatus.FINISHED_LENGTH  # a prefill instance samples only the first token
            if status is not None:
                self.running.remove(request)
                self._finish(request, status)
            results.append(
                EngineOutput(request_id, [token], status.finish_reason if status else None, [lp] if lp else None)
            )
        return results

    # ---- helpers -----------------------------------------------------------------------
    def _new_data(self, request: Request) -> NewRequestData:
        block_ids = self.kv.block_ids(request.request_id)
        self._sent_blocks[request.request_id] = len(block_ids)
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
        sent = self._sent_blocks[request.request_id]
        self._sent_blocks[request.request_id] = len(block_ids)
        return CachedRequestData(request.request_id, block_ids[sent:], request.num_computed_tokens)

    def _preempt(self, request: Request) -> None:
        # Victims come from the newest end and are not yet scheduled this step, so their
        # computed count covers exactly the KV written in earlier steps.
        blocks = self.kv.block_ids(request.request_id)[: cdiv(request.num_computed_tokens, self.kv.block_size)]
        if self.num_host_slots and blocks and len(blocks) <= len(self.host_free):
            slots = [self.host_free.pop() for _ in blocks]
            self._swap_out += zip(blocks, slots)  # copied before this step's forward reuses the blocks
            self.swapped[request.request_id] = slots
            self.num_swaps += 1
        else:
            request.num_computed_tokens = 0
        self.kv.free(request.request_id)
        self._sent_blocks.pop(request.request_id, None)
        request.num_preemptions += 1
        request.status = RequestStatus.PREEMPTED
        self.waiting.appendleft(request)
        self.num_preemptions += 1

    def _finish(self, request: Request, status: RequestStatus) -> None:
        self.host_free += self.swapped.pop(request.request_id, [])
        if request.kv_send and status in (RequestStatus.FINISHED_LENGTH, RequestStatus.FINISHED_STOPPED):
            request.transfer_in_flight = True  # the daemon writes its blocks to the pool next
        if request.transfer_in_flight:
            self.deferred[request.request_id] = request  # freed by end_transfer
        else:
            self.kv.free(request.request_id)
        if self._sent_blocks.pop(request.request_id, None) is not None:
            self._finished_ids.append(request.request_id)
        request.status = status
        del self.requests[request.request_id]

    def check_integrity(self) -> None:
        """Block accounting plus the request table: every live request is waiting xor running."""
        self.kv.check_integrity()
        live = {r.request_id for r in self.waiting} | {r.request_id for r in self.running} | set(self.kv_waiting)
        if len(live) != len(self.waiting) + len(self.running) + len(self.kv_waiting) or live != set(self.requests):
            raise RuntimeError("scheduler: request table, waiting queue, KV-wait table and running list disagree")
        for request_id in self.kv.req_blocks:
            request = self.requests.get(request_id) or self.deferred.get(request_id)
            if request is None:
                raise RuntimeError(f"scheduler: finished request {request_id} still holds blocks")
            if request.status == RequestStatus.PREEMPTED or (
                request.status == RequestStatus.WAITING and request.kv_recv_tokens
            ):
                raise RuntimeError(f"scheduler: request {request_id} holds blocks while {request.status.name}")
        for request_id, request in self.deferred.items():
            if not request.transfer_in_flight or request_id in self.requests:
                raise RuntimeError(f"scheduler: request {request_id} is deferred but no transfer holds it")
        held = [s for slots in self.swapped.values() for s in slots]
        if sorted(self.host_free + held) != list(range(self.num_host_slots)):
            raise RuntimeError("scheduler: host swap slots are lost or held twice")
        if any(request_id not in self.requests for request_id in self.swapped):
            raise RuntimeError("scheduler: a finished request still holds host swap slots")
