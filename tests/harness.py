"""A real daemon as a subprocess on 127.0.0.1 with a random port, for integration tests.

`start_daemon(tmp_path, model_dir, **sections)` writes a TOML config, starts
`python -m kvd.cli serve`, waits for `<run_dir>/endpoint`, and returns a handle; the
fixture stops whatever is still running (SIGTERM, then SIGKILL) by PID.
"""

from __future__ import annotations

import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from kvd.spawn import daemon_env, start_kvd, wait_endpoint

START_TIMEOUT_S = 180.0


@dataclass
class DaemonHandle:
    proc: subprocess.Popen
    endpoint: str
    run_dir: Path
    log_file: Path
    stdout: Path

    def stop(self, timeout: float = 30.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        return self.proc.wait(10)


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    return str(v)


def start_daemon(tmp_path: Path, model_dir: Path | None, env: dict | None = None, wrap: tuple[str, ...] = (),
                 **sections) -> DaemonHandle:
    """`wrap`: a command the daemon runs under (e.g. tests/syscall_filter.py)."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    run_dir = tmp_path / "run"
    log_file = tmp_path / "kvd.log"
    conf = {
        "model": {"dtype": "float32"} | ({"model": str(model_dir)} if model_dir else {}),
        "log": {"format": "json", "file": str(log_file)},
        "daemon": {"run_dir": str(run_dir), "port": 0},
    }
    for name, values in sections.items():
        conf.setdefault(name, {}).update(values)
    text = "\n".join(f"[{s}]\n" + "".join(f"{k} = {_toml_value(v)}\n" for k, v in kv.items()) for s, kv in conf.items())
    config = tmp_path / "kvd.toml"
    config.write_text(text)
    stdout = tmp_path / "stdout.txt"
    proc = start_kvd(["serve", "--config", str(config)], daemon_env(env), stdout, wrap)
    endpoint = wait_endpoint(proc, run_dir / "endpoint", START_TIMEOUT_S, stdout)
    return DaemonHandle(proc, endpoint, run_dir, log_file, stdout)




def wait_for(cond, timeout: float, what: str, interval: float = 0.1):
    """Poll `cond` until it returns something truthy (returned), or fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


def log_events(log_file: Path, event: str | None = None) -> list[dict]:
    """The JSON lines of a daemon's log file (optionally only one event)."""
    import json

    if not log_file.exists():
        return []
    out = []
    for line in log_file.read_text().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if event is None or rec.get("event") == event:
            out.append(rec)
    return out
