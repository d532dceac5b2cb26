"""kvd.trace: timelines rebuilt from real kvd.logs output of several processes."""

import io
import json
import subprocess
import sys

import pytest

from kvd.trace import format_timeline, main, trace

# Runs in a child process: configure kvd.logs as `process`/`role`, tee JSON to
# a file, and log the given (level, event, fields) triples.
EMIT = """
import json, sys, structlog
from kvd.config import LogConfig
from kvd.logs import bind_request, configure_logging
path, process, role, events = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
configure_logging(LogConfig(format="json", file=path), process, role)
log = structlog.get_logger()
for level, event, fields in events:
    rid = fields.pop("request_id", None)
    if rid is None:
        getattr(log, level)(event, **fields)
    else:
        with bind_request(rid):
            getattr(log, level)(event, **fields)
"""


def emit(path, process, role, *events):
    subprocess.run(
        [sys.executable, "-c", EMIT, str(path), process, role, json.dumps(events)],
        check=True,
        stdout=subprocess.DEVNULL,
    )


@pytest.fixture(scope="module")
def logs(tmp_path_factory):
    """A decode daemon and its worker, logging into one shared file and one file each."""
    d = tmp_path_factory.mktemp("logs")
    daemon, worker = d / "daemon.jsonl", d / "worker.jsonl"
    emit(
        daemon,
        "daemon",
        "decode",
        ("info", "request_queued", {"request_id": "r-ok", "prompt_tokens": 12}),
        ("info", "request_queued", {"request_id": "r-bad", "prompt_tokens": 40}),
        ("info", "request_queued", {"request_id": "r-slow", "prompt_tokens": 3}),
    )
    emit(
        worker,
        "worker-0",
        "decode",
        ("info", "request_scheduled", {"request_ids": ["r-ok", "r-bad"], "num_tokens": 52, "duration_ms": 1.5}),
        ("info", "first_token", {"request_id": "r-ok", "duration_ms": 8.25, "since_arrival_ms": 9.75}),
        ("error", "worker_dead", {"request_ids": ["r-bad"], "reason": "CUDA error: out of memory", "exit_code": -9}),
    )
    with open(daemon, "a") as f:
        f.write("Traceback (most recent call last):\n  not json\n\n")  # stray stderr text in the log
    emit(
        daemon,
        "daemon",
        "decode",
        ("error", "request_failed", {"request_id": "r-bad", "code": 500, "error": "worker-0 died"}),
        ("info", "request_finished", {"request_id": "r-ok", "finish_reason": "stop", "generated_tokens": 5}),
    )
    return [str(daemon), str(worker)]


def test_finished_request_across_processes(logs):
    tl = trace("r-ok", logs)
    assert [e.event for e in tl.entries] == ["request_queued", "request_scheduled", "first_token", "request_finished"]
    assert [e.where for e in tl.entries] == ["decode/daemon", "decode/worker-0", "decode/worker-0", "decode/daemon"]
    assert tl.entries[0].offset_ms == 0.0
    assert all(a.offset_ms <= b.offset_ms for a, b in zip(tl.entries, tl.entries[1:]))
    assert tl.skipped == 2  # the two non-JSON lines
    assert tl.status == "finished"
    assert tl.verdict.startswith("finished (stop) in ")
    text = format_timeline(tl)
    assert "first_token" in text and "8.2 ms" in text and "generated_tokens=5" in text and "batch=2" in text
    assert text.splitlines()[-1] == tl.verdict


def test_failed_request_shows_its_steps_and_the_cause(logs):
    tl = trace("r-bad", logs)
    assert [e.event for e in tl.entries] == ["request_queued", "request_scheduled", "worker_dead", "request_failed"]
    assert tl.status == "failed"
    assert tl.verdict.startswith("FAILED at worker_dead after ")
    assert 'reason="CUDA error: out of memory"' in tl.verdict
    text = format_timeline(tl)
    assert "code=500" in text and 'error="worker-0 died"' in text
    assert text.count("\n!") == 2  # the failing lines are marked


def test_incomplete_request(logs):
    tl = trace("r-slow", logs)
    assert tl.status == "incomplete"
    assert tl.verdict.startswith("incomplete: last event request_queued")


def test_recovered_request_is_finished():
    lines = [
        {"ts": "2026-01-01T00:00:00.000000Z", "level": "info", "event": "request_queued", "request_id": "r"},
        {"ts": "2026-01-01T00:00:00.010000Z", "level": "error", "event": "storage_read", "request_id": "r", "error": "x"},
        {"ts": "2026-01-01T00:00:00.050000Z", "level": "info", "event": "request_finished", "request_id": "r",
         "finish_reason": "length"},
    ]
    stdin = io.StringIO("\n".join(json.dumps(x) for x in lines) + "\n")
    old, sys.stdin = sys.stdin, stdin
    try:
        tl = trace("r", [])
    finally:
        sys.stdin = old
    assert tl.status == "finished"
    assert tl.verdict == "finished (length) in 50.0 ms after 1 error(s), first at storage_read"


def test_aborted_request_is_labelled_aborted(tmp_path):
    path = tmp_path / "a.jsonl"
    emit(
        path,
        "daemon",
        "unified",
        ("info", "request_queued", {"request_id": "r-abort"}),
        ("info", "request_finished", {"request_id": "r-abort", "finish_reason": "abort", "reason": "client"}),
    )
    tl = trace("r-abort", [str(path)])
    assert tl.status == "aborted" and tl.verdict.startswith("ABORTED at request_finished") and "reason=client" in tl.verdict


def test_rejected_request_is_labelled_rejected(tmp_path):
    path = tmp_path / "r.jsonl"
    emit(path, "daemon", "unified",
         ("warning", "request_rejected", {"request_id": "r-no", "code": 400, "error": "max_tokens: too many"}))
    tl = trace("r-no", [str(path)])
    assert tl.status == "rejected"
    assert tl.verdict.startswith("REJECTED at admission") and "code=400" in tl.verdict, tl.verdict


def test_main_exit_codes(logs, capsys, tmp_path):
    assert main(["r-bad", *logs]) == 0
    assert "FAILED at worker_dead" in capsys.readouterr().out
    assert main(["nope", *logs]) == 1
    assert "no log line mentions request nope" in capsys.readouterr().err
    assert main(["r-ok", str(tmp_path / "missing.jsonl")]) == 2
