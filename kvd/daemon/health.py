"""What `kvd status` and `/health` say of serving: state, queue, blocks, throughput, integrity.

    health.state(serving)    # ready | draining | restarting | degraded
    health.problems(serving) # what it depends on that is broken now
    health.status(serving)   # the serving part of `kvd status --json` (kvd.daemon.main adds the rest)
    health.retry_after(serving)  # the seconds a refused client should wait
"""

from __future__ import annotations

from typing import Any

from kvd.daemon.backoff import RESTART_S
from kvd.daemon.serving import Serving


def retry_after(serving: Serving) -> int:
    """Seconds a client refused now should wait (Retry-After, kvd/daemon/backoff.py): the
    waiting requests, or while draining every live one, at the recent completion rate."""
    if serving.engine is None:
        return RESTART_S
    return serving.completions.retry_after(serving.num_client_requests if serving.draining
                                           else serving.engine.num_waiting)  # fmt: skip


def problems(serving: Serving) -> list[str]:
    """Broken dependencies: a child down, the role's own (e.g. no prefill instance answering)."""
    down = [f"{name} is down" for name, p in serving.supervisor.status()["processes"].items() if not p["alive"]]
    return down + serving.role.problems()


def state(serving: Serving) -> str:
    """ready | draining | restarting (no worker) | degraded (a dependency is broken)."""
    if serving.draining:
        return "draining"
    if serving.engine is None:
        return "restarting"
    return "degraded" if problems(serving) else "ready"


def status(serving: Serving) -> dict[str, Any]:
    serving.check_integrity()
    stats = serving.stats()
    tput = 0.0
    if len(serving.throughput) >= 2:
        (t0, n0), (t1, n1) = serving.throughput[0], serving.throughput[-1]
        tput = (n1 - n0) / (t1 - t0) if t1 > t0 else 0.0
    return {
        "state": state(serving),
        "not_ready": problems(serving),
        "queue": stats.get("waiting", 0),
        "running": stats.get("running", 0),
        "live_requests": serving.num_client_requests,
        "blocks": {k.removeprefix("blocks_"): v for k, v in stats.items() if k.startswith("blocks_")},
        "prefix_hit_rate": stats.get("prefix_hit_rate", 0.0),
        "preemptions": stats.get("preemptions", 0),
        "swaps": stats.get("swaps", 0),
        "generated_tokens": stats.get("generated_tokens", 0),
        "prompt_tokens": stats.get("prompt_tokens", 0),
        "throughput_tok_s": round(tput, 2),
        "integrity": serving.integrity,
    }
