"""Run a test scenario in a forked child inside a private, loopback-only network namespace.

The Mooncake client listens on all interfaces whatever MC_TCP_BIND_ADDRESS says (see
kvd.cache.storage.servers), so tests that run one do it where only loopback exists. The
child's servers carry PR_SET_PDEATHSIG, so a child killed on timeout takes them along.
"""

from __future__ import annotations

import os
import select
import signal
import traceback

import pytest

from kvd.cache.storage import servers

_SKIP = 77  # the child's exit code for "no private network namespace here"


def run_isolated(scenario, timeout_s: float = 90.0) -> None:
    """Run scenario() in a forked child in a private loopback-only network namespace."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: never returns into pytest
        os.close(r)
        code, msg = 0, ""
        try:
            servers.enter_private_netns()
        except OSError as e:
            code, msg = _SKIP, f"no private network namespace for the Mooncake client: {e}"
        else:
            try:
                scenario()
            except BaseException:
                code, msg = 1, traceback.format_exc()
        os.write(w, msg.encode()[-60000:])  # under the pipe's buffer: the parent reads after
        os._exit(code)
    os.close(w)
    try:
        ready, _, _ = select.select([r], [], [], timeout_s)
        if not ready:
            os.kill(pid, signal.SIGKILL)  # our own child; its servers die with it (PDEATHSIG)
            os.waitpid(pid, 0)
            pytest.fail(f"scenario did not finish in {timeout_s}s")
        msg = b"".join(iter(lambda: os.read(r, 65536), b"")).decode()
    finally:
        os.close(r)
    _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    if code == _SKIP:
        pytest.skip(msg)
    assert code == 0, msg or f"child exited with {code}"
