"""systemd/kvd.service, kvd@.service and kvd-route.service: notify + watchdog, hardening, a
stop timeout that covers the drain; `systemd-analyze security --offline=yes` at 2.5 or below for every unit,
with and without the GPU drop-in, which relaxes device access only; `systemd-analyze
verify` clean; kvd serving under the units' system call filter (tests/syscall_filter.py,
no systemd needed). Each skips, naming why, where its tool is missing or too old."""

import json
import re
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

import syscall_filter
from harness import start_daemon
from kvd.client import Client
from kvd.config import DaemonConfig

UNITS = Path(__file__).resolve().parents[1] / "systemd"
NAMES = ["kvd.service", "kvd@.service"]  # the instances' units, each with a GPU drop-in
ROUTE = "kvd-route.service"  # the router's: no model, no drop-in
# What each unit runs, and the only paths it writes besides the cache.
EXEC = {"kvd.service": ("serve", "--run-dir /run/kvd"), "kvd@.service": ("serve", "--run-dir /run/kvd"),
        ROUTE: ("route", "--config /etc/kvd/route.toml --run-dir /run/kvd-route")}  # fmt: skip
MAX_EXPOSURE = 2.5
HARDENING = {
    "NoNewPrivileges": "yes",
    "CapabilityBoundingSet": "",
    "ProtectSystem": "strict",
    "ProtectHome": "yes",
    "PrivateTmp": "yes",
    "PrivateDevices": "yes",  # gpu.conf lets the NVIDIA nodes in
    "DevicePolicy": "closed",
    "PrivateUsers": "yes",
    "ProtectProc": "invisible",
    "RestrictNamespaces": "yes",
    "RemoveIPC": "yes",
    "UMask": "0077",
    "RestrictAddressFamilies": "AF_UNIX AF_INET AF_INET6 AF_NETLINK",  # libzmq's getifaddrs
    "LockPersonality": "yes",
    "ProtectKernelTunables": "yes",
    "ProtectControlGroups": "yes",
    "RestrictRealtime": "yes",
    "SystemCallArchitectures": "native",
    "SystemCallErrorNumber": "EPERM",
    "MemoryDenyWriteExecute": "no",  # oneDNN's and CUDA's JIT
}
GPU_KEYS = {"PrivateDevices", "DevicePolicy", "DeviceAllow"}


def parse_unit(path: Path) -> dict[str, dict[str, list[str]]]:
    """A unit file as {section: {key: [values in order]}}; keys may repeat in systemd."""
    sections: dict[str, dict[str, list[str]]] = {}
    current = None
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        assert current is not None, f"{path.name}: {line!r} outside a section"
        key, sep, value = line.partition("=")
        assert sep, f"{path.name}: not key=value: {line!r}"
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def seconds(value: str) -> float:
    units = {"ms": 1e-3, "s": 1.0, "min": 60.0, "m": 60.0, "h": 3600.0}
    for suffix, scale in sorted(units.items(), key=lambda kv: -len(kv[0])):
        if value.endswith(suffix):
            return float(value[: -len(suffix)]) * scale
    return float(value)


@pytest.mark.parametrize("name", [*NAMES, ROUTE])
def test_unit_contract(name):
    unit = parse_unit(UNITS / name)
    svc = {k: v[-1] for k, v in unit["Service"].items()}
    assert svc["Type"] == "notify" and svc["NotifyAccess"] == "main"
    assert seconds(svc["WatchdogSec"]) > DaemonConfig().heartbeat_interval_s
    assert svc["Restart"] == "on-failure" and svc["KillSignal"] == "SIGTERM"
    assert seconds(svc["TimeoutStopSec"]) > DaemonConfig().drain_timeout_s
    assert svc["User"] == "kvd" and svc["Group"] == "kvd"
    for key, value in HARDENING.items():
        assert svc.get(key) == value, f"{name}: {key}"
    assert unit["Service"]["SystemCallFilter"] == ["@system-service", "~@privileged"]
    env = " ".join(unit["Service"]["Environment"])
    assert "KVD_CACHE_DIR=/var/cache/kvd" in env and "HF_HUB_OFFLINE=1" in env
    command, run_dir = EXEC[name]
    assert set(svc["ReadWritePaths"].split()) == {"/var/cache/kvd", run_dir.split()[-1]}
    assert unit["Install"]["WantedBy"] == ["multi-user.target"]
    assert f" {command} " in svc["ExecStart"] and run_dir in svc["ExecStart"]


def test_template_is_per_role():
    svc = {k: v[-1] for k, v in parse_unit(UNITS / "kvd@.service")["Service"].items()}
    assert "--config /etc/kvd/%i.toml --role %i --run-dir /run/kvd/%i" in svc["ExecStart"]
    assert svc["RuntimeDirectory"] == "kvd/%i"
    assert svc["CacheDirectory"] == "kvd"  # the cache (models, local KV pool) is shared by the roles


def test_gpu_dropin_relaxes_device_access_only():
    for name in NAMES:
        dropin = UNITS / f"{name}.d" / "gpu.conf"
        svc = parse_unit(dropin)["Service"]
        assert set(svc) == GPU_KEYS, f"{dropin}: sets more than device access"
        assert svc["PrivateDevices"] == ["no"] and svc["DevicePolicy"] == ["closed"]
        assert all(re.fullmatch(r"char-nvidia[-a-z]* rw", v) for v in svc["DeviceAllow"]), svc["DeviceAllow"]
    # one drop-in for both units, kept in two places so that each unit's directory is complete
    assert (UNITS / "kvd.service.d/gpu.conf").read_text() == (UNITS / "kvd@.service.d/gpu.conf").read_text()
    assert (UNITS / "kvd.service.d/ip.conf.example").read_text() == (
        UNITS / "kvd@.service.d/ip.conf.example").read_text()  # fmt: skip


def _analyze_reason() -> str | None:
    """Why systemd-analyze cannot check the units here, or None."""
    if shutil.which("systemd-analyze") is None:
        return "systemd-analyze is not installed"
    usage = subprocess.run(["systemd-analyze", "security", "--help"], capture_output=True, text=True).stdout
    if "--offline" not in usage or "--json" not in usage:
        return "this systemd-analyze has no security --offline/--json (systemd < 250)"
    return None


needs_analyze = pytest.mark.skipif(_analyze_reason() is not None, reason=str(_analyze_reason()))


def install(tmp_path: Path, name: str, dropins: tuple[str, ...] = ()) -> Path:
    """The unit, and the drop-ins named, in a directory of their own: systemd-analyze reads
    the drop-in directory beside a unit, and the repository's holds gpu.conf. ExecStart
    points at an executable that exists here (kvd is not installed at /opt/kvd), else
    verify reports only that; ip.conf.example is installed as ip.conf so its syntax is
    checked too."""
    d = tmp_path / "units"
    (d / f"{name}.d").mkdir(parents=True, exist_ok=True)
    binary = shutil.which("true") or "/bin/true"
    (d / name).write_text((UNITS / name).read_text().replace("/opt/kvd/.venv/bin/kvd", binary))
    for dropin in dropins:
        (d / f"{name}.d" / dropin.removesuffix(".example")).write_text((UNITS / f"{name}.d" / dropin).read_text())
    return d / name


def exposure(unit: Path) -> tuple[float, dict[str, bool]]:
    """The overall exposure figure and, per check, whether the unit passes it."""
    cmd = ["systemd-analyze", "security", "--offline=yes", "--no-pager"]
    text = subprocess.run([*cmd, str(unit)], capture_output=True, text=True, timeout=60)
    m = re.search(r"Overall exposure level for \S+: (\d+(?:\.\d+)?)", text.stdout)
    assert m, f"no overall exposure in systemd-analyze's output:\n{text.stdout}\n{text.stderr}"
    items = subprocess.run([*cmd, "--json=short", str(unit)], capture_output=True, text=True, timeout=60)
    return float(m.group(1)), {item["name"]: item["set"] for item in json.loads(items.stdout)}


@needs_analyze
@pytest.mark.parametrize("name", [*NAMES, ROUTE])
def test_security_exposure(tmp_path, name):
    figure, _ = exposure(install(tmp_path, name))
    assert figure <= MAX_EXPOSURE, f"{name}: exposure {figure} > {MAX_EXPOSURE}"


@needs_analyze
@pytest.mark.parametrize("name", NAMES)
def test_security_exposure_with_gpu_dropin(tmp_path, name):
    _, base = exposure(install(tmp_path / "base", name))
    figure, gpu = exposure(install(tmp_path / "gpu", name, ("gpu.conf",)))
    assert figure <= MAX_EXPOSURE, f"{name} + gpu.conf: exposure {figure} > {MAX_EXPOSURE}"
    # what the merged unit loses against the base is device access, nothing else
    lost = {check for check, passed in base.items() if passed and not gpu.get(check, False)}
    assert lost <= {"PrivateDevices=", "DeviceAllow="}, lost


@needs_analyze
@pytest.mark.parametrize("name", [*NAMES, ROUTE])
def test_systemd_analyze_verify(tmp_path, name):
    unit = install(tmp_path, name, () if name == ROUTE else ("gpu.conf", "ip.conf.example"))
    instance = unit.with_name("kvd@decode.service") if "@" in name else unit
    proc = subprocess.run(["systemd-analyze", "verify", str(instance)], capture_output=True, text=True, timeout=60)
    # verify exits 0 even on unknown keys; its warnings about our files are what matter
    ours = [line for line in proc.stderr.splitlines() if "kvd" in line]
    assert proc.returncode == 0 and not ours, proc.stderr


FILTER = [sys.executable, str(Path(__file__).with_name("syscall_filter.py"))]
needs_filter = pytest.mark.skipif(syscall_filter.unavailable() is not None, reason=str(syscall_filter.unavailable()))


@needs_filter
def test_the_emulated_filter_refuses_what_the_units_refuse():
    probe = """
import os, socket, zmq
try:
    socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
except OSError as e:
    print("AF_PACKET", e.errno)
try:
    os.setuid(0)
except OSError as e:
    print("setuid", e.errno)
print("tcp bind", zmq.Context().socket(zmq.ROUTER).bind_to_random_port("tcp://127.0.0.1") > 0)
"""
    out = subprocess.run([*FILTER, sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert out.stdout.split("\n")[:3] == ["AF_PACKET 97", "setuid 1", "tcp bind True"], out.stdout + out.stderr


@needs_filter
def test_kvd_serves_under_the_units_syscall_filter(tmp_path, tiny_llama_dir):
    d = start_daemon(tmp_path, tiny_llama_dir, cache={"num_blocks": 256, "block_size": 4}, http={"port": 0},
                     wrap=tuple(FILTER))  # fmt: skip
    try:
        with Client(d.endpoint, timeout=60) as c:
            out = c.generate(prompt="a b c", max_tokens=8, temperature=0, ignore_eos=True)
        assert len(out.token_ids) == 8 and out.finish_reason == "length"
        url = (d.run_dir / "http_endpoint").read_text().strip() + "/v1/completions"
        body = json.dumps({"prompt": "a b", "max_tokens": 4, "ignore_eos": True}).encode()
        with urllib.request.urlopen(urllib.request.Request(url, data=body), timeout=60) as r:
            assert r.status == 200 and json.loads(r.read())["usage"]["completion_tokens"] == 4
    finally:
        assert d.stop() == 0, d.stdout.read_text()[-3000:]
