"""The scheduler's integrity check: its books against each other, run while idle.

Every live request is waiting xor running xor waiting for KV; a finished one is in the
table only while a transfer holds its blocks; the connector's count of KV-wait blocks is
what those requests hold; no preempted or load-waiting request holds blocks; host swap
slots are each free or held once. A broken invariant raises RuntimeError naming it.
"""

from __future__ import annotations

from kvd.request import RequestStatus


def check_integrity(scheduler) -> None:
    """`scheduler`: a kvd.scheduler.scheduler.Scheduler (not imported: it imports this)."""
    scheduler.kv.check_integrity()
    queued = [r.request_id for r in (*scheduler.waiting, *scheduler.running, *scheduler.kv_waiting())]
    live = {request_id for request_id, r in scheduler.requests.items() if not r.status.finished}
    if len(set(queued)) != len(queued) or set(queued) != live:
        raise RuntimeError("scheduler: request table, waiting queue, KV waits and running list disagree")
    if scheduler.num_kv_wait_blocks != sum(len(scheduler.kv.req_blocks[r.request_id]) for r in scheduler.kv_waiting()):
        raise RuntimeError("scheduler: the KV-wait block count differs from the blocks KV waits hold")
    for request_id in scheduler.kv.req_blocks:
        request = scheduler.requests.get(request_id)
        if request is None:
            raise RuntimeError(f"scheduler: finished request {request_id} still holds blocks")
        if request.status == RequestStatus.PREEMPTED or (
            request.status == RequestStatus.WAITING and scheduler.connector.num_external_tokens(request)
        ):
            raise RuntimeError(f"scheduler: request {request_id} holds blocks while {request.status.name}")
    for request_id, request in scheduler.requests.items():
        if request.status.finished and not scheduler.connector.holds(request):
            raise RuntimeError(f"scheduler: request {request_id} finished but no transfer holds it")
    held = [s for r in scheduler.requests.values() if r.host_slots is not None for s in r.host_slots]
    if sorted(scheduler.host_free + held) != list(range(scheduler.num_host_slots)):
        raise RuntimeError("scheduler: host swap slots are lost or held twice")
    if any(r.host_slots is not None and r.status.finished for r in scheduler.requests.values()):
        raise RuntimeError("scheduler: a finished request still holds host swap slots")
