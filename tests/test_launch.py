"""kvd.launch.Readiness: instances report READY=1 over sd_notify; an exit is seen at once.
`kvd launch unified --instances 2`: the router in front serves DIR/http_endpoint and answers
from both instances; SIGTERM stops every process, the router first, exit 0, the endpoint files
gone. (`kvd launch pd` with the router: tests/pd/test_pd_backends.py.)"""

import json
import math
import os
import signal
import subprocess
import sys
import time
import urllib.request

import pytest
from harness import log_events

from kvd.client import Client
from kvd.launch import Readiness
from kvd.spawn import daemon_env, start_kvd, wait_endpoint

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


def test_launch_unified_puts_the_router_in_front(tmp_path, tiny_llama_dir):
    run_dir, out, conf = tmp_path / "run", tmp_path / "launch.txt", tmp_path / "kvd.toml"
    conf.write_text(f'[model]\nmodel = "{tiny_llama_dir}"\ndtype = "float32"\n[cache]\nnum_blocks = 256\n'
                    '[route]\npolicy = "round_robin"\n')  # fmt: skip
    proc = start_kvd(["launch", "unified", "--instances", "2", "--run-dir", str(run_dir), "--config", str(conf),
                      "--http-port", "0"], daemon_env(), out)  # fmt: skip
    names = ["unified-0", "unified-1"]
    try:
        endpoint = wait_endpoint(proc, run_dir / "endpoint", 180, out)
        # DIR/endpoint: the router's ZeroMQ client API; DIR/endpoints: both instances'.
        endpoints = [(run_dir / n / "endpoint").read_text().strip() for n in names]
        assert (run_dir / "endpoints").read_text().split() == endpoints and endpoint not in endpoints
        with Client(endpoint, timeout=60) as c:
            assert c.generate(prompt="a b c", max_tokens=2, ignore_eos=True).finish_reason == "length"
            st = c.status()
        assert st["role"] == "router" and sorted(st["instances"]) == names
        url = (run_dir / "http_endpoint").read_text().strip()  # the router's: no instance's
        assert url not in [(run_dir / n / "http_endpoint").read_text().strip() for n in names]
        with urllib.request.urlopen(url + "/health", timeout=10) as r:
            assert sorted(json.loads(r.read())["instances_up"]) == names
        seen = []
        for q in ("Hi", "Hello"):
            body = json.dumps({"messages": [{"role": "user", "content": q}], "max_tokens": 3}).encode()
            req = urllib.request.Request(url + "/v1/chat/completions", data=body)
            with urllib.request.urlopen(req, timeout=60) as r:
                assert r.status == 200 and json.loads(r.read())["choices"][0]["message"]["role"] == "assistant"
                seen.append(r.headers["X-Kvd-Instance"])
        assert sorted(seen) == names  # round_robin, from the config: one each
    finally:
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(60)
    assert code == 0, out.read_text()[-3000:]
    assert not any((run_dir / f).exists() for f in ("endpoint", "http_endpoint", "endpoints"))
    assert not any((run_dir / n / f).exists() for n in names for f in ("endpoint", "http_endpoint"))
    pids = [e["pid"] for e in log_events(out, "instance_started") + log_events(out, "router_started")]
    assert len(pids) == 3 and not any(os.path.exists(f"/proc/{pid}") for pid in pids)
    # The router stops first: it had stopped before either instance began to drain.
    (stopped,) = log_events(run_dir / "route" / "kvd.log", "route_stopped")
    drains = [e for n in names for e in log_events(run_dir / n / "kvd.log", "daemon_draining")]
    assert stopped["exit_code"] == 0 and len(drains) == 2
    assert all(stopped["ts"] <= e["ts"] for e in drains), (stopped, drains)
