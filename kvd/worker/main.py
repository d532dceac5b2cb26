"""The worker process: owns the model and the paged KV tensors, runs steps for the daemon.

It loads the model, reports Ready with ModelInfo (vocab, context, eos ids, number of KV
blocks), then answers every Step with StepDone. Failures and orphaning are handled by
`kvd.child.run_child`: any exception sends Dead and exits non-zero.
"""

from __future__ import annotations

import os
import time

import structlog

from kvd.child import Started, run_child
from kvd.config import KvdConfig
from kvd.logs import ms_since
from kvd.messages import Ready, Step, StepDone, ToWorker

log = structlog.get_logger("kvd.worker")


def _start(name: str, share_kv: bool):
    def start(cfg: KvdConfig, recv):
        t0 = time.monotonic()
        from kvd.worker.model_runner import ModelRunner
        from kvd.worker.models import resolve_model

        model_dir = resolve_model(cfg.model.model, cfg.model.cache_dir)
        runner = ModelRunner(model_dir, cfg.model, cfg.cache, share_kv=share_kv,
                             prefill=cfg.prefill)  # fmt: skip
        info = runner.model_info()  # the daemon has the tokenizer; this process needs none
        if runner.group is not None:
            log.info("prefill_group_ready", sp=cfg.prefill.parallel.sp, pp=cfg.prefill.parallel.pp,
                     sync=cfg.prefill.parallel.sync, rank_pids=runner.group.pids)  # fmt: skip
        log.info("worker_ready", num_blocks=info.num_blocks, device=str(runner.device),
                 duration_ms=ms_since(t0))  # fmt: skip

        def handle(msg: Step) -> StepDone:
            return StepDone(runner.execute(msg.output))

        close = runner.group.close if runner.group is not None else None
        return Started(Ready(process=name, pid=os.getpid(), info=info, kv=runner.kv_share()), handle, close)

    return start


def worker_main(name: str, config_json: bytes, step_endpoint: str, report_endpoint: str, share_kv: bool) -> None:
    """`share_kv`: the KV cache lives in shared memory, for the cache messenger to map."""
    run_child(name, config_json, step_endpoint, report_endpoint, ToWorker, _start(name, share_kv))
