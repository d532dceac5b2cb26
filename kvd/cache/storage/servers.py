"""Pool servers as child processes: a Redis server, a Mooncake master (+ metadata server).

For tests and for `kvd launch pd`. Contract:
- Every server binds 127.0.0.1 on a free random port (`free_port`); a start that loses the
  port to another process (the server exits before it is ready) is retried on a new port.
- A server is ready when it answers on its port (bounded by `start_timeout_s`); a server
  that exits or stays silent raises `ServerStartError` with the tail of its log.
- `stop()` sends SIGTERM to the PID this object started, then SIGKILL after `stop_timeout_s`;
  `kill()` sends SIGKILL at once (fault tests). Nothing else is ever signalled. Each server
  gets PR_SET_PDEATHSIG, so it dies with the thread that started it (start servers from a
  thread that lives as long as they should), and its own temp dir (logs, working files),
  removed on stop. Every class is a context manager.
- Mooncake processes run with MC_TCP_BIND_ADDRESS=127.0.0.1 and the master's embedded HTTP
  metadata server stays disabled (it listens on all interfaces whatever host it is given);
  metadata goes through P2PHANDSHAKE or a separate `mooncake_http_metadata_server` on 127.0.0.1.
- The Mooncake *client* library (mooncake-transfer-engine 0.3.13) binds its handshake and
  TCP data listeners to all interfaces whatever MC_TCP_BIND_ADDRESS says (the variable only
  sets the address it advertises). `enter_private_netns` moves a process into a network
  namespace that holds only loopback, which is where tests and benchmarks run the client.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

LOOPBACK = "127.0.0.1"
START_ATTEMPTS = 3  # a free port can be taken between free_port() and the server's bind


class ServerStartError(RuntimeError):
    """A pool server exited or did not answer on its port in time."""


def free_port() -> int:
    """A port that was free on 127.0.0.1 a moment ago (callers retry when they lose the race)."""
    with socket.socket() as s:
        s.bind((LOOPBACK, 0))
        return s.getsockname()[1]


def mooncake_env() -> dict[str, str]:
    """Environment for every Mooncake process (and the process that runs the client)."""
    return {"MC_TCP_BIND_ADDRESS": LOOPBACK}


_prctl = ctypes.CDLL(None, use_errno=True).prctl  # resolved here: the child below must not dlopen
_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    # Runs in the child between fork and exec (one libc call, no locks taken): a server must
    # not outlive the test or the launcher that started it, even one killed with SIGKILL.
    _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def _connects(port: int) -> bool:
    try:
        with socket.create_connection((LOOPBACK, port), timeout=0.5):
            return True
    except OSError:
        return False


class ServerProcess:
    """One child process, its temp dir and its log; stopped by the PID it was started with."""

    name = "server"

    def __init__(self, start_timeout_s: float = 15.0, stop_timeout_s: float = 10.0) -> None:
        self.start_timeout_s = start_timeout_s
        self.stop_timeout_s = stop_timeout_s
        self.dir = Path(tempfile.mkdtemp(prefix=f"kvd-{self.name}-"))
        self.log_path = self.dir / f"{self.name}.log"
        self.proc: subprocess.Popen | None = None

    @property
    def pid(self) -> int:
        if self.proc is None:
            raise RuntimeError(f"{self.name}: not started")
        return self.proc.pid

    def _spawn(self, argv: list[str], ready: Callable[[], bool], env: dict[str, str] | None = None) -> None:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                         cwd=self.dir, env={**os.environ, **(env or {})},
                                         preexec_fn=_die_with_parent)  # noqa: PLW1509  # fmt: skip
        deadline = time.monotonic() + self.start_timeout_s
        delay = 0.005
        while not ready():
            if self.proc.poll() is not None:
                raise ServerStartError(f"{self.name}: exited with {self.proc.returncode}\n{self.log_tail()}")
            if time.monotonic() > deadline:
                self.kill()
                raise ServerStartError(f"{self.name}: no answer in {self.start_timeout_s}s\n{self.log_tail()}")
            time.sleep(delay)  # connect-retry back-off while the server binds: 5 ms doubling to 100 ms
            delay = min(delay * 2, 0.1)

    def _start_with_retries(self, attempt: Callable[[], None]) -> None:
        for i in range(START_ATTEMPTS):
            try:
                attempt()
                return
            except ServerStartError:
                self._reap()
                if i == START_ATTEMPTS - 1:
                    self.stop()
                    raise

    def log_tail(self, n: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def _reap(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
        if self.proc is not None:
            self.proc.wait()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL, at once (fault tests); reaps the child."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()  # Popen signals its own PID and never a reaped one
        if self.proc is not None:
            self.proc.wait()

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after stop_timeout_s; removes the temp dir."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(self.stop_timeout_s)
            except subprocess.TimeoutExpired:
                self.kill()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


class RedisServer(ServerProcess):
    """Debian's redis-server on 127.0.0.1, no persistence, optional maxmemory / eviction policy;
    on a random free port, or on `port` (a server restarted where its clients look)."""

    name = "redis"

    def __init__(self, maxmemory: str | None = None, policy: str | None = None, port: int = 0, **kw) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise ServerStartError("redis-server: not found on PATH (`make system` or `apt-get install redis-server` "
                                   "installs it; or give the URL of a running server)")
        super().__init__(**kw)
        self.port = 0
        extra = (["--maxmemory", maxmemory] if maxmemory else []) + (["--maxmemory-policy", policy] if policy else [])

        def attempt():
            self.port = port or free_port()
            argv = [binary, "--port", str(self.port), "--bind", LOOPBACK, "--save", "", "--appendonly", "no",
                    "--dir", str(self.dir), "--daemonize", "no", *extra]  # fmt: skip
            self._spawn(argv, self._pongs)

        self._start_with_retries(attempt)

    @property
    def url(self) -> str:
        return f"redis://{LOOPBACK}:{self.port}/0"

    def _pongs(self) -> bool:
        # A connection alone is not readiness: redis answers -LOADING until it can serve.
        try:
            with socket.create_connection((LOOPBACK, self.port), timeout=0.5) as s:
                s.sendall(b"PING\r\n")
                return s.recv(64).startswith(b"+PONG")
        except OSError:
            return False


def _mooncake_bin(name: str) -> str:
    import mooncake  # the binaries ship inside the wheel, beside the Python package

    path = Path(mooncake.__file__).parent / name
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not in the mooncake-transfer-engine-non-cuda wheel")
    return str(path)


class MooncakeMaster(ServerProcess):
    """`mooncake_master`: RPC and metrics on 127.0.0.1, embedded HTTP metadata server off."""

    name = "mooncake-master"

    def __init__(self, lease_ttl_ms: int | None = None, eviction_high_watermark: float | None = None, **kw) -> None:
        super().__init__(**kw)
        self.port = self.metrics_port = 0
        extra = [f"--default_kv_lease_ttl={lease_ttl_ms}"] if lease_ttl_ms is not None else []
        if eviction_high_watermark is not None:
            extra.append(f"--eviction_high_watermark_ratio={eviction_high_watermark}")

        def attempt():
            self.port, self.metrics_port = free_port(), free_port()
            argv = [_mooncake_bin("mooncake_master"), f"--rpc_address={LOOPBACK}", f"--rpc_port={self.port}",
                    f"--metrics_host={LOOPBACK}", f"--metrics_port={self.metrics_port}",
                    "--enable_http_metadata_server=false", "--rpc_thread_num=2",
                    f"--log_dir={self.dir}", "--logtostderr", *extra]  # fmt: skip
            self._spawn(argv, lambda: _connects(self.port), env=mooncake_env())

        self._start_with_retries(attempt)

    @property
    def address(self) -> str:
        return f"{LOOPBACK}:{self.port}"

    def metrics(self, timeout_s: float = 5.0) -> dict[str, float]:
        """The master's own gauges and counters (its Prometheus page): `master_key_count`,
        `master_allocated_bytes`, `master_total_capacity_bytes`, ... (unlabelled series)."""
        import urllib.request

        url = f"http://{LOOPBACK}:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=timeout_s) as r:
            text = r.read().decode()
        out = {}
        for line in text.splitlines():
            name, _, value = line.partition(" ")
            if line and not line.startswith("#") and "{" not in name:
                with contextlib.suppress(ValueError):
                    out[name] = float(value)
        return out


class MooncakeMetadataServer(ServerProcess):
    """The wheel's HTTP metadata server, on 127.0.0.1 (its default host is 0.0.0.0)."""

    name = "mooncake-metadata"

    def __init__(self, **kw) -> None:
        super().__init__(**kw)
        self.port = 0

        def attempt():
            self.port = free_port()
            argv = [sys.executable, "-m", "mooncake.http_metadata_server", "--host", LOOPBACK,
                    "--port", str(self.port), "--log-level", "WARNING"]  # fmt: skip
            self._spawn(argv, lambda: _connects(self.port), env=mooncake_env())

        self._start_with_retries(attempt)

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}/metadata"


class MooncakeServers:
    """A Mooncake master, and an HTTP metadata server when `metadata="http"` (else P2PHANDSHAKE).

    A client needs `master_address` and `metadata_server`, and `mooncake_env()` in its process.
    """

    def __init__(self, metadata: str = "p2p", **master_kw) -> None:
        if metadata not in ("p2p", "http"):
            raise ValueError(f"metadata: 'p2p' or 'http', got {metadata!r}")
        self.metadata = None
        self.master = MooncakeMaster(**master_kw)
        if metadata == "http":
            try:
                self.metadata = MooncakeMetadataServer()
            except BaseException:
                self.master.stop()
                raise

    @property
    def pid(self) -> int:
        return self.master.pid

    @property
    def pids(self) -> list[int]:
        return [s.pid for s in self._servers()]

    @property
    def master_address(self) -> str:
        return self.master.address

    @property
    def metadata_server(self) -> str:
        return self.metadata.url if self.metadata is not None else "P2PHANDSHAKE"

    def _servers(self) -> list[ServerProcess]:
        return [self.master] + ([self.metadata] if self.metadata is not None else [])

    def kill(self) -> None:
        for s in self._servers():
            s.kill()

    def stop(self) -> None:
        for s in self._servers():
            s.stop()

    def __enter__(self) -> MooncakeServers:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


# ---- a network namespace that holds only loopback ----------------------------------------
_CLONE_NEWUSER = 0x10000000
_CLONE_NEWNET = 0x40000000
_SIOCGIFFLAGS, _SIOCSIFFLAGS, _IFF_UP = 0x8913, 0x8914, 0x1
_IFREQ = struct.Struct("16sH14x")


def enter_private_netns() -> None:
    """Move this process into a new network namespace whose only interface is loopback (up).

    As root a plain CLONE_NEWNET; otherwise a user namespace too, which the kernel allows
    only in a single-threaded process (so call it first thing in a fresh child). Raises
    OSError naming the cause when the kernel refuses.
    """
    libc = ctypes.CDLL(None, use_errno=True)
    flags = _CLONE_NEWNET if os.geteuid() == 0 else _CLONE_NEWUSER | _CLONE_NEWNET
    if libc.unshare(flags) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"unshare(network namespace): {os.strerror(err)}")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:  # bring lo up: a new netns has it down
        cur = _IFREQ.unpack(fcntl.ioctl(s, _SIOCGIFFLAGS, _IFREQ.pack(b"lo", 0)))[1]
        fcntl.ioctl(s, _SIOCSIFFLAGS, _IFREQ.pack(b"lo", cur | _IFF_UP))


def listening_addresses(pid: int) -> list[tuple[str, int]]:
    """(address, port) of every TCP socket that `pid` listens on, from `ss -ltnpH`."""
    out = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True, check=True).stdout
    found = []
    for line in out.splitlines():
        if f"pid={pid}," not in line:
            continue
        local = line.split()[3]
        host, _, port = local.rpartition(":")
        found.append((host.strip("[]"), int(port)))
    return found
