"""kvd.launch.Readiness: instances report READY=1 over sd_notify; an exit is seen at once."""

import math
import os
import subprocess
import sys
import time

import pytest

from kvd.launch import Readiness

READY_THEN_SLEEP = (
    "import os, time\n"
    "from kvd.daemon.notify import Notifier\n"
    "n = Notifier(os.environ['NOTIFY_SOCKET'])\n"
    "n.watchdog(); n.ready('serving'); n.watchdog()\n"
    "time.sleep(60)\n"
)


@pytest.fixture
def readiness():
    r = Readiness()
    yield r
    r.close()


def spawn(readiness, code):
    return subprocess.Popen(
        [sys.executable, "-c", code], env={**os.environ, **readiness.env}
    )


def test_ready_comes_from_the_instance_that_sent_it(readiness):
    procs = {"a": spawn(readiness, READY_THEN_SLEEP), "b": spawn(readiness, "import time; time.sleep(60)")}
    try:
        assert readiness.wait(procs, ["a"], time.monotonic() + 60) == "ready"
        assert (
            procs["a"].pid in readiness.ready and procs["b"].pid not in readiness.ready
        )
        assert (
            readiness.wait(procs, ["b"], time.monotonic() + 0.5) == "timeout"
        )  # b never says it
    finally:
        for p in procs.values():
            p.kill()
            p.wait()


def test_an_instance_exiting_is_an_error_at_once(readiness):
    procs = {
        "ok": spawn(readiness, READY_THEN_SLEEP),
        "dies": spawn(readiness, "import time; time.sleep(1); raise SystemExit(3)"),
    }
    try:
        t0 = time.monotonic()
        with pytest.raises(RuntimeError, match="dies exited with code 3"):
            readiness.wait(procs, [], math.inf)
        assert time.monotonic() - t0 < 10
    finally:
        for p in procs.values():
            p.kill()
            p.wait()


def test_a_stop_byte_ends_the_wait(readiness):
    r, w = os.pipe()
    proc = spawn(readiness, "import time; time.sleep(60)")
    try:
        os.write(w, b"\0")
        assert readiness.wait({"x": proc}, [], math.inf, stop_fd=r) == "stop"
    finally:
        proc.kill()
        proc.wait()
        os.close(r)
        os.close(w)
