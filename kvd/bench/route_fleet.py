"""Fleet: a fresh set of unified kvd instances behind one `kvd route`, for one benchmark run.

    with Fleet(workdir, count=2, blocks=1200, policy="kv", threads=1) as url:   # the router's base URL
        ...
    # every process it started is stopped (SIGTERM, then SIGKILL past 30 s), on error too

Each instance serves the embedded model in float32 with `threads` torch threads and
`[cache] num_blocks = blocks`, HTTP and KV events on random loopback ports, and logs JSON
to `<workdir>/<name>/kvd.log`; the router (`<workdir>/route.log`) reads their run dirs.
A new Fleet is new processes, so every run starts from empty KV caches.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

from kvd.spawn import daemon_env, start_kvd, wait_endpoint

START_TIMEOUT_S = 300  # a busy 2-core machine loads several instances at once


class Fleet:
    """`count` instances named a, b, c... and a router with `policy` in front of them."""

    def __init__(self, workdir: Path, count: int, blocks: int, policy: str, threads: int) -> None:
        self.workdir = workdir
        self.names = [chr(ord("a") + i) for i in range(count)]
        self.blocks = blocks
        self.policy = policy
        self.threads = threads
        self.procs: list[subprocess.Popen] = []

    def __enter__(self) -> str:
        try:
            return self._start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc) -> None:
        self.stop()

    def _start(self) -> str:
        self.workdir.mkdir(parents=True)
        started = []
        for name in self.names:  # all at once: they load side by side
            d = self.workdir / name
            d.mkdir()
            (d / "kvd.toml").write_text(
                f'[daemon]\nrun_dir = "{d / "run"}"\n[model]\ndtype = "float32"\nthreads = {self.threads}\n'
                f"[cache]\nnum_blocks = {self.blocks}\n[http]\nport = 0\n"
                f'[kv_events]\nport = 0\ninstance_id = "{name}"\n'
                f'[log]\nformat = "json"\nfile = "{d / "kvd.log"}"\n')  # fmt: skip
            started.append((self._spawn(["serve", "--config", str(d / "kvd.toml")], d / "stdout.txt"), d))
        for proc, d in started:  # "endpoint" is written once every process is Ready (HTTP and KV events first)
            wait_endpoint(proc, d / "run" / "endpoint", START_TIMEOUT_S, d / "stdout.txt")
        listed = ", ".join(f'{{name = "{name}", run_dir = "{self.workdir / name / "run"}"}}' for name in self.names)
        config = self.workdir / "route.toml"
        config.write_text(f'[daemon]\nrun_dir = "{self.workdir / "route"}"\n[http]\nport = 0\n'
                          f'[log]\nformat = "json"\nfile = "{self.workdir / "route.log"}"\n'
                          f'[route]\npolicy = "{self.policy}"\ninstances = [{listed}]\n')  # fmt: skip
        router = self._spawn(["route", "--config", str(config)], self.workdir / "route.txt")
        return wait_endpoint(router, self.workdir / "route" / "http_endpoint", 60, self.workdir / "route.txt")

    def _spawn(self, args: list[str], stdout: Path) -> subprocess.Popen:
        proc = start_kvd(args, daemon_env(), stdout)
        self.procs.append(proc)
        return proc

    def stop(self) -> None:
        """Stop every process started, router first (by its PID; SIGKILL one that outlives 30 s)."""
        for proc in reversed(self.procs):
            if proc.poll() is None:
                proc.terminate()
        for proc in reversed(self.procs):
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.procs.clear()
