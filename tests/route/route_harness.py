"""Helpers of the router's tests: instances on the embedded model (KV events and HTTP on),
`kvd route` processes in front of them, and raw HTTP posts."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from pathlib import Path

from harness import DaemonHandle, start_daemon

from kvd.spawn import daemon_env, start_kvd, wait_endpoint

BS = 16
SYSTEM = "You are a careful assistant who answers in one short sentence. " * 6  # several blocks


def instance(tmp_path: Path) -> DaemonHandle:
    d = start_daemon(tmp_path, None, cache={"block_size": BS, "num_blocks": 256}, http={"port": 0},
                     kv_events={"port": 0})  # fmt: skip
    d.url = (d.run_dir / "http_endpoint").read_text().strip()
    return d


def start_router(tmp_path: Path, instances: dict[str, DaemonHandle | Path | str], policy: str = "kv",
                 model: Path | None = None, env: dict[str, str] | None = None) -> DaemonHandle:  # fmt: skip
    """`kvd route` in front of `instances` (a daemon: its run dir; a Path: a run dir, the
    instance perhaps not started yet; a string: a bare URL), for
    `model`'s tokenizer (None: the embedded model's), with `env` added to its environment;
    `.endpoint` is its HTTP URL, `.zmq` its ZeroMQ client endpoint."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    run_dir, log_file, stdout = tmp_path / "run", tmp_path / "route.log", tmp_path / "stdout.txt"
    listed = ", ".join(f'{{name = "{name}", url = "{d}"}}' if isinstance(d, str) else
                       f'{{name = "{name}", run_dir = "{d if isinstance(d, Path) else d.run_dir}"}}'
                       for name, d in instances.items())  # fmt: skip
    config = tmp_path / "route.toml"
    config.write_text(f'[daemon]\nrun_dir = "{run_dir}"\n[log]\nformat = "json"\nfile = "{log_file}"\n'
                      f'[http]\nport = 0\n[route]\npolicy = "{policy}"\nretry_interval_s = 0.2\n'
                      f"instances = [{listed}]\n" + (f'[model]\nmodel = "{model}"\n' if model else ""))  # fmt: skip
    proc = start_kvd(["route", "--config", str(config)], daemon_env(env), stdout)
    url = wait_endpoint(proc, run_dir / "http_endpoint", 60, stdout)
    handle = DaemonHandle(proc, url, run_dir, log_file, stdout)
    handle.zmq = (run_dir / "endpoint").read_text().strip()
    return handle


def post(url: str, path: str, body: bytes | dict, timeout: float = 60) -> tuple[int, dict, dict]:
    """(status, JSON body, headers), error statuses included."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(url + path, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read()), r.headers
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read()), e.headers


def chat(messages: list[dict], **kw) -> dict:
    return {"messages": messages, "max_tokens": 4, "temperature": 0, **kw}


