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


def _start(name: str):
    def start(cfg: KvdConfig, recv):
        t0 = time.monotonic()
        from kvd.worker.model_runner import ModelRunner
        from kvd.worker.models import resolve_model

        model_dir = resolve_model(cfg.model.model, cfg.model.cache_dir)
        runner = ModelRunner(model_dir, cfg.model, cfg.cache, share_kv=cfg.daemon.role != "unified")
        info = runner.model_info()  # the daemon has the tokenizer; this process needs none
        if cfg.prefill.group:  # the ranks are this worker's children: they live and die with it
            from kvd.distributed.group import PrefillGroup

            runner.group = PrefillGroup(model_dir, cfg.prefill.parallel, max_tokens=runner.max_model_len,
                                        dtype=runner.dtype)  # fmt: skip
            runner.group.start()
            runner.group_min_tokens = cfg.prefill.group_min_tokens
            log.info("prefill_group_ready", sp=cfg.prefill.parallel.sp, pp=cfg.prefill.parallel.pp,
                     sync=cfg.prefill.parallel.sync, rank_pids=runner.group.pids)  # fmt: skip
        log.info("worker_ready", num_blocks=info.num_blocks, device=str(runner.device),
                 duration_ms=ms_since(t0))  # fmt: skip

        def handle(msg: Step) -> StepDone:
            return StepDone(runner.execute(msg.output))

        close = runner.group.close if runner.group is not None else None
        return Started(Ready(process=name, pid=os.getpid(), info=info, kv=runner.kv_share()), handle, close)

    return start


def worker_main(name: str, config_json: bytes, step_endpoint: str, report_endpoint: str) -> None:
    run_child(name, config_json, step_endpoint, report_endpoint, ToWorker, _start(name))
