"""The cache messenger process: the instance's storage-pool client (PD mode).

In unified mode it has no pool I/O to do yet, but it is started, reports Ready, answers
Shutdown and watches its parent like every kvd child (see `kvd.child`), so the process
layout — and the daemon's handling of a dead child — is the same in every role. The PD
issue gives it CacheTasks (write a request's blocks to the pool, read keys into
preallocated blocks).
"""

from __future__ import annotations

import os

import structlog

from kvd.child import run_child
from kvd.config import KvdConfig
from kvd.messages import Ready, ToMessenger

log = structlog.get_logger("kvd.messenger")


def _start(name: str):
    def start(cfg: KvdConfig):
        log.info("messenger_ready")
        return Ready(process=name, pid=os.getpid()), lambda msg: None

    return start


def messenger_main(name: str, config_json: bytes, task_endpoint: str, report_endpoint: str) -> None:
    run_child(name, config_json, task_endpoint, report_endpoint, ToMessenger, _start(name))
