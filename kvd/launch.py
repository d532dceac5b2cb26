"""`kvd launch`: a whole deployment on one host — instances and the router in front — started
and stopped as one.

    kvd launch unified --instances N --run-dir DIR [--config FILE] [--http-port PORT]
    kvd launch pd --prefill N --decode M --pool local|mooncake|redis --run-dir DIR [--config FILE]
                  [--http-port PORT]

unified: N unified instances (`DIR/unified-<i>`). pd: the pool's servers where the pool
needs them (the local pool: an LMDB directory of its own on /dev/shm, removed at exit)
(`redis-server`, or `mooncake_master` with P2P handshake metadata — every Mooncake process
with MC_TCP_BIND_ADDRESS=127.0.0.1; see kvd.cache.storage.servers), then N prefill
instances (`DIR/prefill-<i>`), once their PD endpoints are up M decode instances
(`DIR/decode-<j>`) pointed at every prefill instance.

Then `kvd route` in front of the clients' instances (the unified ones, or the decode ones),
its run dir DIR, its log and output in `DIR/route/`: each of those instances serves HTTP and
publishes KV events on random ports (written to its run dir, which the router reads), and
the router serves the OpenAI HTTP API on `--http-port` (or the config's `[http] port`; -1 or
0: a random one) and its ZeroMQ client API on a random port, and writes them to
`DIR/http_endpoint` and `DIR/endpoint`. `DIR/endpoints` lists the instances' client
endpoints. Each process is `kvd serve` or `kvd route` configured by `--config` (default: the
built-in defaults) plus `KVD_*` variables for its role, run directory, ports, pool and log
file (`DIR/<instance>/kvd.log`, which `kvd trace` reads). SIGTERM or Ctrl-C stops everything
(the router first, then the instances, which drain); so does any process exiting on its own,
with exit code 1.

Every process reports readiness to the launcher as it would to systemd: NOTIFY_SOCKET names
the launcher's socket (`Readiness`), and the launcher waits on that socket and on each
process's pidfd — one that dies is seen at once, and nothing polls.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import secrets
import selectors
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import structlog

from kvd.spawn import daemon_env

log = structlog.get_logger("kvd.launch")

START_TIMEOUT_S = 900.0  # a first start converts the embedded model
STOP_TIMEOUT_S = 40.0
ROUTER = "route"  # the router's name among the processes, and its directory (log, output) in DIR
# What the router needs of an instance behind it: HTTP and KV events, on ports the kernel picks.
ROUTED = {"KVD_HTTP_PORT": "0", "KVD_KV_EVENTS_PORT": "0", "KVD_KV_EVENTS_SNAPSHOT_PORT": "0"}
NO_HTTP = {"KVD_HTTP_PORT": "-1"}  # a prefill instance: no client reaches it


class Readiness:
    """The listening side of sd_notify, for the instances this launcher starts.

    Each instance gets NOTIFY_SOCKET naming this launcher's abstract unix datagram socket;
    its daemon sends READY=1 once it serves (its endpoint files are written by then), and
    WATCHDOG=1 every tick. The kernel attaches the sender's pid to each datagram
    (SO_PASSCRED). `wait` selects on the socket, on every instance's pidfd and on an
    optional stop descriptor.
    """

    _CREDS = struct.Struct("3i")  # struct ucred: pid, uid, gid

    def __init__(self) -> None:
        name = f"kvd-launch-{os.getpid()}-{secrets.token_hex(4)}"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.bind("\0" + name)
        self.env = {"NOTIFY_SOCKET": "@" + name}
        self.ready: set[int] = set()  # pids that said READY=1

    def _drain(self) -> None:
        while True:
            try:
                data, anc, _, _ = self.sock.recvmsg(4096, socket.CMSG_SPACE(self._CREDS.size))
            except BlockingIOError:
                return
            pid = next((self._CREDS.unpack_from(d)[0] for level, kind, d in anc
                        if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS), None)  # fmt: skip
            if pid is not None and b"READY=1" in data.split(b"\n"):
                self.ready.add(pid)

    def wait(self, procs: dict[str, subprocess.Popen], until_ready: list[str], deadline: float,
             stop_fd: int | None = None) -> str:  # fmt: skip
        """Until every instance in `until_ready` is ready ("ready"), `stop_fd` is readable
        ("stop") or the deadline passes ("timeout"); RuntimeError naming an instance that
        exited. With nothing to wait for it waits for an exit or a stop."""
        sel = selectors.DefaultSelector()
        pidfds = []
        try:
            sel.register(self.sock, selectors.EVENT_READ, "notify")
            if stop_fd is not None:
                sel.register(stop_fd, selectors.EVENT_READ, "stop")
            for name, proc in procs.items():
                try:
                    fd = os.pidfd_open(proc.pid)
                except ProcessLookupError:  # already reaped
                    fd = None
                if fd is None or proc.poll() is not None:
                    raise RuntimeError(f"{name} exited with code {proc.returncode}")
                pidfds.append(fd)
                sel.register(fd, selectors.EVENT_READ, name)
            while not until_ready or not all(procs[n].pid in self.ready for n in until_ready):
                left = None if deadline == math.inf else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return "timeout"
                for key, _ in sel.select(left):
                    if key.data == "notify":
                        self._drain()
                    elif key.data == "stop":
                        return "stop"
                    else:
                        procs[key.data].wait()
                        raise RuntimeError(f"{key.data} exited with code {procs[key.data].returncode}")
            return "ready"
        finally:
            sel.close()
            for fd in pidfds:
                os.close(fd)

    def close(self) -> None:
        self.sock.close()


class Deployment:
    """The processes of one deployment: pool servers (PD), instances, the router in front."""

    def __init__(self, run_dir: Path, pool: str | None, config: str | None, redis_url: str | None = None,
                 http_port: int | None = None) -> None:  # fmt: skip
        """`pool` None: unified instances, no pool and no PD link."""
        self.run_dir = run_dir.resolve()
        self.http_port = http_port
        self.pool = pool
        self.config = config
        self.redis_url = redis_url
        self.servers: list = []
        self.procs: dict[str, subprocess.Popen] = {}
        # One CURVE secret per PD deployment (kept if the caller gave one): its link, and its KV
        # events, admit no one else.
        self.pool_env: dict[str, str] = {} if pool is None else {
            "KVD_PD_POOL": pool, "KVD_PD_SECRET": os.environ.get("KVD_PD_SECRET") or secrets.token_hex(16)}
        self.local_pool: Path | None = None
        self.readiness = Readiness()

    # ---- start -------------------------------------------------------------------------
    def start_pool(self) -> None:
        from kvd.cache.storage import servers

        if self.pool == "local":
            # tmpfs where there is one (the pool is a handoff cache: no disk, no writeback);
            # this deployment's own directory, removed when it stops.
            from kvd.cache.storage import SHM

            base = SHM / f"kvd-{os.getuid()}" if SHM.is_dir() else self.run_dir
            self.local_pool = base / f"pool-launch-{os.getpid()}"
            self.pool_env["KVD_PD_LOCAL_PATH"] = str(self.local_pool)
        elif self.pool == "redis":
            if not self.redis_url:
                server = servers.RedisServer()
                self.servers.append(server)
                self.redis_url = server.url
                log.info("pool_server_started", server="redis-server", pid=server.pid, url=server.url)
            self.pool_env["KVD_PD_REDIS_URL"] = self.redis_url
        elif self.pool == "mooncake":
            mc = servers.MooncakeServers()
            self.servers.append(mc)
            self.pool_env |= {"KVD_PD_MOONCAKE_MASTER": mc.master_address,
                              "KVD_PD_MOONCAKE_METADATA": mc.metadata_server, **servers.mooncake_env()}  # fmt: skip
            log.info("pool_server_started", server="mooncake_master", pid=mc.pid, master=mc.master_address)
        else:
            raise ValueError(f"--pool: expected local|mooncake|redis, got {self.pool!r}")

    def start_instance(self, name: str, role: str, extra: dict[str, str]) -> Path:
        inst_dir = self.run_dir / name
        inst_dir.mkdir(parents=True, exist_ok=True)
        for stale in ("endpoint", "pd_endpoint", "http_endpoint", "kv_events_endpoint", "kv_snapshot_endpoint"):
            (inst_dir / stale).unlink(missing_ok=True)
        env = daemon_env(self.pool_env | extra | self.readiness.env)
        env |= {"KVD_DAEMON_ROLE": role, "KVD_DAEMON_RUN_DIR": str(inst_dir), "KVD_LOG_FILE": str(inst_dir / "kvd.log")}
        cmd = [sys.executable, "-m", "kvd.cli", "serve"] + (["--config", self.config] if self.config else [])
        out = (inst_dir / "stdout.txt").open("w")
        self.procs[name] = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)
        log.info("instance_started", instance=name, role=role, pid=self.procs[name].pid)
        return inst_dir

    def start_router(self, targets: list[str]) -> None:
        """`kvd route` in front of the named instances (ready by now: it reads their run dirs
        at its start); its run dir is DIR, where it writes endpoint and http_endpoint itself."""
        log_dir = self.run_dir / ROUTER
        log_dir.mkdir(parents=True, exist_ok=True)
        for stale in ("endpoint", "http_endpoint"):
            (self.run_dir / stale).unlink(missing_ok=True)
        # [route] instances as a TOML array of inline tables (a JSON string is a TOML string).
        listed = ", ".join(f"{{name = {json.dumps(n)}, run_dir = {json.dumps(str(self.run_dir / n))}}}"
                           for n in targets)  # fmt: skip
        # KVD_DAEMON_ROLE: the router has none, but a config written for decode instances must validate.
        # KVD_DAEMON_PORT: the instances' config may fix theirs; the router's ZeroMQ API takes a free one.
        extra = {"KVD_ROUTE_INSTANCES": f"[{listed}]", "KVD_LOG_FILE": str(log_dir / "kvd.log"),
                 "KVD_DAEMON_ROLE": "unified", "KVD_DAEMON_PORT": "0"}  # fmt: skip
        if "KVD_PD_SECRET" in self.pool_env:  # the instances' KV events are CURVE with it
            extra["KVD_PD_SECRET"] = self.pool_env["KVD_PD_SECRET"]
        cmd = [sys.executable, "-m", "kvd.cli", ROUTER, "--run-dir", str(self.run_dir)]
        cmd += (["--config", self.config] if self.config else []) + (
            ["--http-port", str(self.http_port)] if self.http_port is not None else [])
        out = (log_dir / "stdout.txt").open("w")
        self.procs[ROUTER] = subprocess.Popen(cmd, env=daemon_env(extra | self.readiness.env), stdout=out,
                                              stderr=subprocess.STDOUT)  # fmt: skip
        log.info("router_started", pid=self.procs[ROUTER].pid, instances=targets)

    def wait_ready(self, names: list[str], deadline: float) -> None:
        """Until the named processes said READY=1; RuntimeError if any process exits first."""
        try:
            outcome = self.readiness.wait(self.procs, names, deadline)
        except RuntimeError as e:
            raise RuntimeError(f"{e} during start-up (see {self.run_dir}/<instance>/stdout.txt)") from None
        if outcome != "ready":
            raise RuntimeError(f"{', '.join(names)} not ready within {START_TIMEOUT_S} s")

    def start_unified(self, n: int) -> str:
        """N unified instances behind the router; returns the deployment's client endpoint."""
        deadline = time.monotonic() + START_TIMEOUT_S
        self.run_dir.mkdir(parents=True, exist_ok=True)
        names = [f"unified-{i}" for i in range(n)]
        for name in names:
            self.start_instance(name, "unified", ROUTED)
        self.wait_ready(names, deadline)
        return self._front(names, deadline)

    def start_pd(self, n_prefill: int, n_decode: int) -> str:
        """The pool, N prefill and M decode instances, the router in front of the decode ones;
        returns the deployment's client endpoint."""
        deadline = time.monotonic() + START_TIMEOUT_S
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.start_pool()
        prefill_dirs = [self.start_instance(f"prefill-{i}", "prefill", NO_HTTP) for i in range(n_prefill)]
        self.wait_ready([f"prefill-{i}" for i in range(n_prefill)], deadline)
        specs = "[" + ", ".join(json.dumps(str(d)) for d in prefill_dirs) + "]"
        names = [f"decode-{j}" for j in range(n_decode)]
        for name in names:
            self.start_instance(name, "decode", ROUTED | {"KVD_PD_PREFILL_ENDPOINTS": specs})
        self.wait_ready(names, deadline)
        return self._front(names, deadline)

    def _front(self, names: list[str], deadline: float) -> str:
        """The clients' instances are ready: list them, put the router in front, publish."""
        endpoints = [(self.run_dir / name / "endpoint").read_text().strip() for name in names]
        (self.run_dir / "endpoints").write_text("\n".join(endpoints) + "\n")
        self.start_router(names)
        self.wait_ready([ROUTER], deadline)  # its endpoint and http_endpoint are written by then
        return (self.run_dir / "endpoint").read_text().strip()

    # ---- stop --------------------------------------------------------------------------
    def stop(self) -> None:
        """The router first (no new request reaches an instance), then the clients'
        instances, until they exit (they drain their clients, whose handoffs still need the
        prefill instances), then prefill (they drain their handoffs), then the pool."""
        for rank in (0, 1, 2):
            group = [(name, proc) for name, proc in self.procs.items() if _stop_rank(name) == rank]
            for _, proc in group:
                if proc.poll() is None:
                    proc.send_signal(signal.SIGTERM)
            for name, proc in group:
                try:
                    proc.wait(STOP_TIMEOUT_S)
                except subprocess.TimeoutExpired:
                    log.warning("instance_killed", instance=name, pid=proc.pid)
                    proc.kill()
                    proc.wait()
        for server in self.servers:
            server.stop()
        if self.local_pool is not None:
            shutil.rmtree(self.local_pool, ignore_errors=True)
        for name in ("endpoint", "http_endpoint", "endpoints"):
            with contextlib.suppress(OSError):
                (self.run_dir / name).unlink()


def _stop_rank(name: str) -> int:
    return 0 if name == ROUTER else 2 if name.startswith("prefill") else 1


def launch_unified(n: int, run_dir: Path, config: str | None = None, http_port: int | None = None) -> int:
    """`kvd launch unified`: N unified instances behind the router, in the foreground until
    SIGTERM/SIGINT or a process exits."""
    reason = "--instances must be >= 1" if n < 1 else _config_error(config)
    if reason is not None:
        return _refuse(reason)
    return _run(Deployment(run_dir, None, config, http_port=http_port), lambda dep: dep.start_unified(n), instances=n)


def launch_pd(n_prefill: int, n_decode: int, pool: str, run_dir: Path, config: str | None = None,
              redis_url: str | None = None, http_port: int | None = None) -> int:  # fmt: skip
    """`kvd launch pd`: a PD deployment behind the router, in the foreground until
    SIGTERM/SIGINT or a process exits."""
    reason = "--prefill and --decode must be >= 1" if n_prefill < 1 or n_decode < 1 else _config_error(config)
    if reason is not None:
        return _refuse(reason)
    return _run(Deployment(run_dir, pool, config, redis_url, http_port), lambda dep: dep.start_pd(n_prefill, n_decode),
                prefill=n_prefill, decode=n_decode)  # fmt: skip


def _refuse(reason: str) -> int:
    print(f"kvd launch: {reason}", file=sys.stderr)
    return 2


def _config_error(config: str | None) -> str | None:
    """Why every process would refuse `config` (a missing file, a bad key), or None. Read as
    the processes read it, less their role, which the launcher sets per process."""
    from kvd.config import ConfigError, load_config

    try:
        load_config(config, {"daemon.role": "unified"}, environ=daemon_env())
    except ConfigError as e:
        return f"config: {e}"
    return None


def _run(dep: Deployment, start: Callable[[Deployment], str], **shape: int) -> int:
    """Start `dep` with `start(dep)`, serve until a signal or an exit, stop it; the exit code."""
    from kvd.config import LogConfig
    from kvd.logs import configure_logging

    configure_logging(LogConfig(), process="launch", role="launch")
    wake_r, wake_w = os.pipe()  # the signal handler's byte wakes the wait below
    os.set_blocking(wake_w, False)
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: os.write(wake_w, b"\0"))
    code = 0
    try:
        endpoint = start(dep)
        http = (dep.run_dir / "http_endpoint").read_text().strip()
        log.info("deployment_ready", endpoint=endpoint, http=http, run_dir=str(dep.run_dir), **shape)
        dep.readiness.wait(dep.procs, [], math.inf, stop_fd=wake_r)  # until a signal; an exit raises
    except (RuntimeError, OSError, ValueError) as e:  # a server that would not start, a dead instance
        log.error("deployment_failed", error=str(e))
        print(f"kvd launch: {e}", file=sys.stderr)
        code = 1
    finally:
        dep.stop()
        dep.readiness.close()
        log.info("deployment_stopped", exit_code=code)
    return code
