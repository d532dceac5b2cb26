"""Starting a daemon as a child process and waiting for its endpoint: one helper for the
demo, the benchmarks, the soak, `kvd launch` and the tests.

    env = daemon_env({"KVD_DAEMON_ROLE": "decode"})   # the caller's environment, minus KVD_* overrides
    proc = start_kvd(["serve", "--config", conf], env, run_dir / "stdout.txt")
    endpoint = wait_endpoint(proc, run_dir / "endpoint", timeout_s=300)

A daemon publishes `<run_dir>/endpoint` once every process is Ready, so the file's
appearance is the signal (a file, not a socket: there is nothing to await but its
existence); a child that exits first, or a deadline that passes, is a `DaemonError` with
the end of its output.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path


class DaemonError(RuntimeError):
    """A daemon did not start: it exited first or was not ready in time."""


def daemon_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """This process's environment without `KVD_*` overrides (they would make the daemon differ
    from its config file), except the model cache's location, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("KVD_") or k == "KVD_CACHE_DIR"}
    return env | (extra or {})


def start_kvd(args: list[str], env: dict[str, str], stdout: Path, wrap: tuple[str, ...] = ()) -> subprocess.Popen:
    """`python -m kvd.cli ARGS` with its stdout and stderr in the file `stdout`; `wrap`: a
    command it runs under (the tests' syscall filter)."""
    with stdout.open("w") as out:
        return subprocess.Popen([*wrap, sys.executable, "-m", "kvd.cli", *args], stdout=out, stderr=subprocess.STDOUT,
                                env=env)  # fmt: skip


def wait_endpoint(proc: subprocess.Popen, endpoint_file: Path, timeout_s: float, stdout: Path | None = None) -> str:
    """The endpoint the daemon publishes once Ready; DaemonError (the process killed) when it
    exits first or is not ready within `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while not endpoint_file.exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            exited = proc.poll() is not None
            why = f"exited with code {proc.returncode}" if exited else f"not ready within {timeout_s:.0f} s"
            proc.kill()
            proc.wait()
            tail = stdout.read_text()[-3000:] if stdout is not None and stdout.exists() else ""
            raise DaemonError(f"daemon did not start ({why})" + (f":\n{tail}" if tail else ""))
        time.sleep(0.1)
    return endpoint_file.read_text().strip()
