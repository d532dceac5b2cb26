"""Structured logs: structlog, one JSON object per line under systemd, a readable console on a terminal.

Contract:
- `configure_logging(cfg, process, role)` runs once per process, at its entry
  function, before the first log line. Every line then carries `ts` (UTC ISO
  8601 with microseconds), `level`, `event`, `process` ("daemon", "worker-0",
  "messenger", ...), `role` and `pid`, plus whatever is bound in contextvars.
  Components log through `structlog.get_logger()` and never configure anything.
- `bind_request(request_id)` binds `request_id` for every line logged inside it
  (contextvars: per thread and per asyncio task). Code that handles many
  requests in one task, such as the scheduler loop, passes `request_id=` (or
  `request_ids=[...]` for a batch-level line) explicitly instead.
- `timed(event, **fields)` logs `event` with `duration_ms` when its block ends;
  if the block raises, the line is at error level with `error` and the
  exception propagates.
- `RequestClock` gives a request's step timings: `duration_ms` is the time
  since the request's previous logged step (or since arrival for the first),
  `since_arrival_ms` the time since arrival.
- With `cfg.file`, every line is also appended as JSON to that file, with one
  write(2) per line on an O_APPEND descriptor, so several processes can share
  one file without interleaving lines. `kvd trace` reads these files.

Event vocabulary (the names `kvd trace` and operators rely on):

| event | scope | fields |
|---|---|---|
| request_queued | request | prompt_tokens, max_tokens |
| request_scheduled | request | duration_ms (queue wait), since_arrival_ms, num_computed_tokens (prefix hit) |
| first_token | request | duration_ms, since_arrival_ms (= TTFT) |
| request_preempted | request | duration_ms, since_arrival_ms, num_computed_tokens |
| request_finished | request | finish_reason, duration_ms, since_arrival_ms (= e2e), generated_tokens |
| request_failed | request | code, error, duration_ms, since_arrival_ms |
| request_aborted | request | reason (client, deadline, drain), duration_ms, since_arrival_ms |
| request_rejected | request | code, error (refused at admission: nothing was queued) |
| frame_rejected | request or none | channel, reason, request_id when the frame's could be read |
| worker_ready | process | num_blocks, duration_ms (start-up: imports, weights, KV cache) |
| child_ready | process | child, child_pid, duration_ms (the daemon's view: launch to Ready) |
| worker_dead | process | reason, exit_code, request_ids (the requests it takes down) |
| daemon_ready | process | endpoint, num_blocks, duration_ms (start-up) |
| daemon_draining | process | in_flight, timeout_s |
| daemon_stopped | process | exit_code, duration_ms (drain and shutdown) |
| channel_broken | process | channel, error (an internal channel's reader ended: the daemon stops) |
| library_log | process | logger, message (a third-party library's line, e.g. transformers') |

Request-scoped lines carry `request_id`; batch-level lines carry `request_ids`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from collections.abc import Iterator, MutableMapping
from typing import IO, Any

import structlog

from kvd.config import LogConfig

EVENTS = (
    "request_queued",
    "request_scheduled",
    "first_token",
    "request_preempted",
    "request_finished",
    "request_failed",
    "request_aborted",
    "request_rejected",
    "frame_rejected",
    "worker_ready",
    "worker_dead",
    "child_ready",
    "daemon_ready",
    "daemon_draining",
    "daemon_stopped",
    "channel_broken",
    "library_log",
)

_FIRST_KEYS = ("ts", "level", "event", "process", "role", "pid", "request_id")
_tee: _JsonTee | None = None


def configure_logging(cfg: LogConfig, process: str, role: str = "unified", stream: IO[str] | None = None) -> None:
    """Set up structlog for this process; `stream` defaults to sys.stdout.

    Calling it again replaces the previous set-up for loggers obtained
    afterwards (loggers are cached on first use, so call it before logging)."""
    global _tee
    out = sys.stdout if stream is None else stream
    as_json = cfg.format == "json" or (cfg.format == "auto" and not _isatty(out))
    reset_logging()

    processors: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True, key="ts"),
        _StaticFields(process=process, role=role, pid=os.getpid()),
    ]
    if cfg.file:
        _tee = _JsonTee(cfg.file)
        processors.append(_tee)
    if as_json:
        processors += [structlog.processors.format_exc_info, _order_keys, structlog.processors.JSONRenderer()]
    else:
        processors.append(
            structlog.dev.ConsoleRenderer(
                colors=_isatty(out), timestamp_key="ts", exception_formatter=structlog.dev.plain_traceback
            )
        )
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(getattr(logging, cfg.level.upper())),
        context_class=dict,
        logger_factory=structlog.WriteLoggerFactory(file=out),
        cache_logger_on_first_use=True,
    )
    # Libraries that log through the standard library (transformers, once kvd.worker.models
    # has adopted it) and Python's warnings become kvd lines too: nothing else writes text.
    root = logging.getLogger()
    root.handlers[:] = [_ToStructlog()]
    root.setLevel(logging.WARNING)
    logging.captureWarnings(True)


class _ToStructlog(logging.Handler):
    """A standard-library record as one kvd log line: event `library_log`, its logger, its text."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            message = record.getMessage().strip()
            structlog.get_logger("kvd.library").log(record.levelno, "library_log", logger=record.name,
                                                     message=message)  # fmt: skip
        except Exception:  # noqa: BLE001 - logging must never raise into the caller
            self.handleError(record)


def reset_logging() -> None:
    """Close the file tee and restore structlog's defaults (tests; a process's end)."""
    global _tee
    if _tee is not None:
        _tee.close()
        _tee = None
    structlog.reset_defaults()
    structlog.contextvars.clear_contextvars()


def bind_request(request_id: str, **fields: Any) -> contextlib.AbstractContextManager[None]:
    """Bind `request_id` (and `fields`) to every line logged inside the block."""
    return structlog.contextvars.bound_contextvars(request_id=request_id, **fields)


def ms_since(t: float) -> float:
    """Milliseconds since `t` (a time.monotonic() value), rounded as every duration_ms is."""
    return round((time.monotonic() - t) * 1e3, 3)


@contextlib.contextmanager
def timed(event: str, **fields: Any) -> Iterator[dict[str, Any]]:
    """Log `event` with `duration_ms` when the block ends. The yielded dict
    takes fields learned inside the block. On an exception: an error-level line
    with `error` (a warning for cancellation), then the exception propagates."""
    extra: dict[str, Any] = {}
    log = structlog.get_logger()
    start = time.perf_counter()
    try:
        yield extra
    except BaseException as e:
        ms = round((time.perf_counter() - start) * 1e3, 3)
        # cancellation (an abort, a drain) is not a failure of the step: warning, not error
        level = log.error if isinstance(e, Exception) else log.warning
        level(event, duration_ms=ms, error=f"{type(e).__name__}: {e}".rstrip(": "), **fields, **extra)
        raise
    ms = (time.perf_counter() - start) * 1e3
    log.info(event, duration_ms=round(ms, 3), **fields, **extra)


class RequestClock:
    """A request's step timer: `step()` returns `duration_ms` since the previous
    step (since arrival for the first) and `since_arrival_ms`, ready to splat
    into a log call: `log.info("first_token", request_id=request_id, **clock.step())`."""

    __slots__ = ("arrival", "_last")

    def __init__(self, arrival: float | None = None) -> None:
        self.arrival = time.monotonic() if arrival is None else arrival  # time.monotonic() seconds
        self._last = self.arrival

    def step(self, now: float | None = None) -> dict[str, float]:
        now = time.monotonic() if now is None else now
        out = {"duration_ms": round((now - self._last) * 1e3, 3), "since_arrival_ms": round((now - self.arrival) * 1e3, 3)}
        self._last = now
        return out


class _StaticFields:
    """Adds the process-wide fields; a value given at the call site wins."""

    def __init__(self, **fields: Any) -> None:
        self.fields = fields

    def __call__(self, logger: Any, name: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
        for key, value in self.fields.items():
            event_dict.setdefault(key, value)
        return event_dict


class _JsonTee:
    """Appends each event as one JSON line to a file and passes the event on unchanged."""

    def __init__(self, path: str) -> None:
        self.fd = os.open(os.path.expanduser(path), os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
        self.render = structlog.processors.JSONRenderer()

    def __call__(self, logger: Any, name: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
        if self.fd < 0:  # closed by a reconfiguration; a logger cached before it may still call us
            return event_dict
        copy = structlog.processors.format_exc_info(logger, name, dict(event_dict))
        line = self.render(logger, name, _order_keys(logger, name, copy))
        os.write(self.fd, (str(line) + "\n").encode())  # one write per line: O_APPEND keeps lines whole
        return event_dict

    def close(self) -> None:
        fd, self.fd = self.fd, -1  # never write to a closed descriptor number the OS may reuse
        os.close(fd)


def _order_keys(logger: Any, name: str, event_dict: MutableMapping[str, Any]) -> dict[str, Any]:
    """ts, level, event, process, role, pid, request_id first: lines read left to right."""
    head = {k: event_dict[k] for k in _FIRST_KEYS if k in event_dict}
    return head | {k: v for k, v in event_dict.items() if k not in head}


def _isatty(stream: Any) -> bool:
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())
