"""kvd.logs: JSON lines with the fixed fields, console on a tty, the file tee, timed steps."""

import asyncio
import io
import json
import re

import pytest
import structlog

from kvd.config import LogConfig
from kvd.logs import RequestClock, bind_request, configure_logging, reset_logging, timed

TS = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z$")


class FakeTty(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture(autouse=True)
def _restore_structlog():
    yield
    reset_logging()


def lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines()]


def test_json_lines_carry_the_fixed_fields_and_the_bound_request():
    out = io.StringIO()
    configure_logging(LogConfig(format="json"), "worker-0", role="prefill", stream=out)
    log = structlog.get_logger()
    with bind_request("req-1", attempt=2):
        log.info("request_scheduled", num_computed_tokens=16)
    log.warning("worker_dead", reason="oom", request_ids=["req-1"])
    first, second = lines(out.getvalue())
    assert list(first)[:7] == ["ts", "level", "event", "process", "role", "pid", "request_id"]
    assert TS.match(first["ts"])
    assert first["level"] == "info" and first["event"] == "request_scheduled"
    assert first["process"] == "worker-0" and first["role"] == "prefill" and isinstance(first["pid"], int)
    assert first["request_id"] == "req-1" and first["attempt"] == 2 and first["num_computed_tokens"] == 16
    assert "request_id" not in second  # unbound when the block ended
    assert second["level"] == "warning" and second["request_ids"] == ["req-1"]


def test_level_filters_lines():
    out = io.StringIO()
    configure_logging(LogConfig(format="json", level="warning"), "daemon", stream=out)
    log = structlog.get_logger()
    log.info("hidden")
    log.error("shown")
    assert [line["event"] for line in lines(out.getvalue())] == ["shown"]


def test_auto_format_is_json_off_a_terminal_and_console_on_one():
    out = io.StringIO()
    configure_logging(LogConfig(format="auto"), "daemon", stream=out)
    structlog.get_logger().info("daemon_ready", endpoint="tcp://127.0.0.1:1")
    assert json.loads(out.getvalue())["event"] == "daemon_ready"

    tty = FakeTty()
    configure_logging(LogConfig(format="auto"), "daemon", stream=tty)
    structlog.get_logger().info("daemon_ready", endpoint="tcp://127.0.0.1:1")
    text = tty.getvalue()
    assert "daemon_ready" in text and "process" in text
    with pytest.raises(json.JSONDecodeError):
        json.loads(text)


def test_file_tee_writes_json_beside_the_console(tmp_path):
    path = tmp_path / "kvd.jsonl"
    out = io.StringIO()
    configure_logging(LogConfig(format="console", file=str(path)), "messenger", stream=out)
    log = structlog.get_logger()
    log.info("request_queued", request_id="r9")
    try:
        raise KeyError("k")
    except KeyError:
        log.exception("cache_task_failed", request_id="r9")
    assert "request_queued" in out.getvalue()
    queued, failed = lines(path.read_text())
    assert queued["process"] == "messenger" and queued["request_id"] == "r9" and TS.match(queued["ts"])
    assert failed["level"] == "error" and "KeyError" in failed["exception"]

    # a second configuration appends to the same file and stops writing through the old tee
    configure_logging(LogConfig(format="json", file=str(path)), "daemon", stream=io.StringIO())
    structlog.get_logger().info("daemon_stopped")
    assert [line["event"] for line in lines(path.read_text())][-1] == "daemon_stopped"
    assert len(lines(path.read_text())) == 3


def test_timed_logs_duration_and_fields_learned_inside():
    out = io.StringIO()
    configure_logging(LogConfig(format="json"), "daemon", stream=out)
    with timed("storage_write", request_id="r1", keys=4) as extra:
        extra["bytes"] = 4096
    (line,) = lines(out.getvalue())
    assert line["event"] == "storage_write" and line["level"] == "info"
    assert line["request_id"] == "r1" and line["keys"] == 4 and line["bytes"] == 4096
    assert line["duration_ms"] >= 0


def test_timed_logs_the_error_and_reraises():
    out = io.StringIO()
    configure_logging(LogConfig(format="json"), "daemon", stream=out)
    with pytest.raises(RuntimeError, match="pool down"):
        with timed("storage_read", request_id="r2"):
            raise RuntimeError("pool down")
    (line,) = lines(out.getvalue())
    assert line["level"] == "error" and line["error"] == "RuntimeError: pool down" and line["request_id"] == "r2"


def test_timed_cancellation_is_a_warning():
    out = io.StringIO()
    configure_logging(LogConfig(format="json"), "daemon", stream=out)

    async def main():
        async def step():
            with timed("storage_read", request_id="r3"):
                await asyncio.sleep(10)

        task = asyncio.create_task(step())
        await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    (line,) = lines(out.getvalue())
    assert line["level"] == "warning" and line["error"] == "CancelledError"


def test_request_clock_steps():
    clock = RequestClock(arrival=100.0)
    assert clock.step(now=100.25) == {"duration_ms": 250.0, "since_arrival_ms": 250.0}
    assert clock.step(now=101.0) == {"duration_ms": 750.0, "since_arrival_ms": 1000.0}
