"""Hostile and faulty input never wedges kvd: junk on internal channels, a process of another
user, one client's bad or duplicate requests beside its good ones, validation holes, CLI
misuse, requests after SIGTERM, and what the logs and `kvd trace` say of all of it."""

from __future__ import annotations

import asyncio
import glob
import json
import os
import signal
import socket
import subprocess
import sys
import time

import msgspec
import pytest
import zmq

from harness import log_events, start_daemon, wait_for
from kvd.client import AsyncClient, Client, KvdError
from kvd.ipc import ipc_base
from kvd.messages import ErrorCode, Generate, ServerMessage
from kvd.spawn import daemon_env


@pytest.fixture(scope="module")
def smol(tmp_path_factory, smollm2_dir):
    d = start_daemon(tmp_path_factory.mktemp("hostile"), smollm2_dir, scheduler={"max_num_seqs": 32})
    yield d
    assert d.stop() == 0


def ipc_socket(d, name: str) -> str:
    with Client(d.endpoint, timeout=10) as c:
        pid = c.status()["processes"]["daemon"]["pid"]
    (path,) = glob.glob(str(ipc_base() / f"kvd-ipc-{pid}-*" / name))
    return path


def generate_ok(d) -> None:
    with Client(d.endpoint, timeout=60) as c:
        r = c.generate(prompt="Hello there", max_tokens=4, temperature=0.0, ignore_eos=True)
    assert len(r.token_ids) == 4


def test_junk_on_the_internal_report_channel_is_rejected_and_serving_goes_on(smol):
    path = ipc_socket(smol, "reports")
    assert oct(os.stat(os.path.dirname(path)).st_mode & 0o777) == "0o700"
    ctx = zmq.Context()
    sock = ctx.socket(zmq.PUSH)
    sock.setsockopt(zmq.LINGER, 1000)
    sock.connect(f"ipc://{path}")
    for junk in (b"\xde\xad\xbe\xef", b"", msgspec.msgpack.encode({"type": "step_done", "output": 1}), b"\x93" * 64):
        sock.send(junk)
    sock.close()
    ctx.term()
    with Client(smol.endpoint, timeout=10) as c:
        wait_for(lambda: c.status()["internal_frames_rejected"] >= 4, 10, "the rejections")
    for _ in range(3):
        generate_ok(smol)
    with Client(smol.endpoint, timeout=10) as c:
        st = c.status()
    assert st["state"] == "ready" and st["integrity"] in ("ok", "not checked")
    rejected = [e for e in log_events(smol.log_file, "frame_rejected") if e.get("channel") == "reports"]
    assert len(rejected) >= 4


def test_a_process_of_another_user_cannot_reach_the_internal_channels(smol):
    path = ipc_socket(smol, "reports")
    probe = (
        "import os, socket, zmq\n"
        "os.setgid(65534); os.setuid(65534)\n"
        "s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)\n"
        "try:\n"
        f"    s.connect({path!r}); print('connected')\n"
        "except PermissionError:\n"
        "    print('denied')\n"
        "c = zmq.Context(); p = c.socket(zmq.PUSH); p.setsockopt(zmq.LINGER, 500)\n"
        f"p.connect('ipc://{path}'); p.send(b'\\xde\\xad\\xbe\\xef'); p.close(); c.term()\n"
    )
    with Client(smol.endpoint, timeout=10) as c:
        before = c.status()["internal_frames_rejected"]
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "denied", out.stdout + out.stderr
    time.sleep(1.0)  # let a frame that did get through arrive (none can)
    with Client(smol.endpoint, timeout=10) as c:
        assert c.status()["internal_frames_rejected"] == before
    generate_ok(smol)


def test_one_bad_request_does_not_fail_the_clients_other_streams(smol):
    async def run():
        async with AsyncClient(smol.endpoint, timeout=120) as c:
            good = asyncio.ensure_future(_collect(c.stream(chat=[{"role": "user", "content": "Count to ten."}],
                                                           max_tokens=24, temperature=0.0, ignore_eos=True)))  # fmt: skip
            await asyncio.sleep(0.2)
            with pytest.raises(KvdError) as e:
                await c.generate(prompt=123)
            assert e.value.code == 400 and e.value.message.startswith("prompt:"), e.value.message
            with pytest.raises(KvdError):
                await c.generate(chat=[{"role": "wizard", "content": "hi"}], max_tokens=2)
            chunks = await good
            assert chunks[-1].finish_reason == "length" and sum(len(x.token_ids) for x in chunks) == 24

    asyncio.run(run())


async def _collect(stream) -> list:
    return [chunk async for chunk in stream]


def test_a_duplicate_request_id_is_refused_without_touching_the_first(smol):
    async def run():
        async with AsyncClient(smol.endpoint, timeout=120) as a, AsyncClient(smol.endpoint, timeout=120) as b:
            first = asyncio.ensure_future(_collect(a.stream(prompt="Tell me a story.", request_id="dup-1",
                                                            max_tokens=30, temperature=0.0, ignore_eos=True)))
            await asyncio.sleep(0.3)
            with pytest.raises(KvdError) as same:  # on the same client: refused before it is sent
                await a.generate(prompt="again", request_id="dup-1", max_tokens=2)
            assert same.value.code == 400 and "already in use" in same.value.message
            with pytest.raises(KvdError) as other:  # from another client: the daemon refuses it
                await b.generate(prompt="again", request_id="dup-1", max_tokens=2)
            assert other.value.code == 400 and "already in use" in other.value.message
            chunks = await asyncio.wait_for(first, 60)
            assert sum(len(x.token_ids) for x in chunks) == 30 and chunks[-1].finish_reason == "length"

    asyncio.run(run())


@pytest.mark.parametrize("kwargs, field", [
    ({"prompt": "x", "temperature": float("inf")}, "temperature"),
    ({"prompt": "x", "temperature": float("nan")}, "temperature"),
    ({"chat": [{"role": "wizard", "content": "hi"}]}, "chat[0].role"),
    ({"prompt": "x", "request_id": ""}, "request_id"),
    ({"prompt": "x", "request_id": "r" * 100_000}, "request_id"),
    ({"prompt": "x", "max_tokens": 2**64}, "max_tokens"),
    ({"prompt": "x", "seed": 2**64}, "seed"),
    ({"chat": [{"role": "user"}]}, "chat[0].content"),
    ({"prompt": 123}, "prompt"),
])  # fmt: skip
def test_validation_holes_are_400s_naming_the_field(smol, kwargs, field):
    with Client(smol.endpoint, timeout=30) as c, pytest.raises(KvdError) as e:
        c.generate(max_tokens=kwargs.pop("max_tokens", 2), **kwargs)
    assert e.value.code == 400 and e.value.message.startswith(field), e.value.message


def raw_reply(d, *parts: bytes) -> object:
    ctx = zmq.Context()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(d.endpoint)
    try:
        sock.send_multipart(list(parts))
        assert sock.poll(20_000)
        return msgspec.msgpack.Decoder(ServerMessage).decode(sock.recv())
    finally:
        sock.close()
        ctx.term()


def test_rejected_frames_are_tied_to_the_request_id_they_carry(smol):
    enc = msgspec.msgpack.encode
    valid = enc(Generate(request_id="multi-1", prompt="hi"))
    reply = raw_reply(smol, valid, b"extra")
    assert reply.code == ErrorCode.BAD_REQUEST and reply.request_id == "multi-1"
    assert reply.message == "frame: a message is one part, got 2"
    reply = raw_reply(smol, enc({"type": "generate", "request_id": "typed-1", "prompt": 123}))
    assert reply.request_id == "typed-1" and reply.message.startswith("prompt:")
    logged = {e.get("request_id") for e in log_events(smol.log_file, "frame_rejected")}
    assert {"multi-1", "typed-1"} <= logged
    out = subprocess.run([sys.executable, "-m", "kvd.cli", "trace", "typed-1", str(smol.log_file)],
                         capture_output=True, text=True, timeout=60)  # fmt: skip
    assert "REJECTED at admission" in out.stdout, out.stdout


def test_no_third_party_text_in_the_json_log(smol):
    with Client(smol.endpoint, timeout=60) as c, pytest.raises(KvdError):
        c.generate(prompt="word " * 9000, max_tokens=1)  # the tokenizer warns: longer than the model's maximum
    lines = smol.stdout.read_text().splitlines()
    wait_for(lambda: any(e.get("logger", "").startswith("transformers") for e in log_events(smol.log_file,
                                                                                             "library_log")),
             10, "transformers' warning as a kvd line")  # fmt: skip
    lines = smol.stdout.read_text().splitlines()
    not_json = [line for line in lines if line.strip() and not line.lstrip().startswith("{")]
    assert not_json == [], not_json[:5]


def test_trace_labels_a_client_abort(smol):
    async def run():
        async with AsyncClient(smol.endpoint, timeout=60) as c:
            n = 0
            async for _ in c.stream(prompt="Write a long poem.", request_id="leave-1", max_tokens=200,
                                    temperature=0.0, ignore_eos=True):  # fmt: skip
                n += 1
                if n == 2:
                    break

    asyncio.run(run())
    wait_for(lambda: log_events(smol.log_file, "request_aborted"), 10, "the abort")
    out = subprocess.run([sys.executable, "-m", "kvd.cli", "trace", "leave-1", str(smol.log_file)],
                         capture_output=True, text=True, timeout=60)  # fmt: skip
    assert "\nABORTED at " in out.stdout and "FAILED" not in out.stdout, out.stdout  # the abort or the disconnect


def cli(*args: str, env: dict | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kvd.cli", *args], capture_output=True, text=True, timeout=timeout,
                          env=daemon_env(env))  # fmt: skip


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("args, env, expect", [
    (["status", "--endpoint", "garbage"], None, "endpoint"),
    (["generate", "--endpoint", "not a url", "--prompt", "x"], None, "endpoint"),
    (["generate", "--endpoint", "tcp://127.0.0.1:PORT", "--prompt", "x", "--presence-penalty", "9"], None,
     "presence_penalty"),
    (["status", "--endpoint", "tcp://127.0.0.1:PORT"], None, "error 503"),
    (["status", "--run-dir", "/nonexistent/kvd"], None, "no endpoint"),
    (["serve", "--config", "/nonexistent/kvd.toml"], None, "config"),
    (["serve", "--port", "99999"], None, "daemon.port"),
    (["trace", "x", "/nonexistent/kvd.log"], None, "trace"),
    (["launch", "pd", "--pool", "redis", "--run-dir", "RUN"], {"PATH": "/nonexistent"}, "redis-server"),
    (["launch", "unified", "--instances", "0", "--run-dir", "RUN"], None, "--instances must be >= 1"),
    (["launch", "unified", "--config", "/nonexistent/kvd.toml", "--run-dir", "RUN"], None, "config"),
    (["status", "--run-dir", "RUN"], {"KVD_BOGUS_KEY": "1"}, "KVD_BOGUS_KEY"),
])  # fmt: skip
def test_cli_misuse_is_one_line_and_a_nonzero_exit(tmp_path, args, env, expect):
    args = [a.replace("PORT", str(free_port())).replace("RUN", str(tmp_path / "run")) for a in args]
    if env and "PATH" in env:  # no redis-server anywhere, but python itself still runs
        env = {"PATH": os.path.dirname(sys.executable)}
    out = cli(*args, env=env)
    assert out.returncode != 0, out
    assert "Traceback" not in out.stderr and "Traceback" not in out.stdout, out.stderr
    errors = [line for line in out.stderr.splitlines() if line.strip() and not line.lstrip().startswith("{")]
    assert len(errors) == 1 and expect in errors[0], out.stderr
    if args[:2] == ["launch", "pd"]:  # a deployment that began to start is stopped
        stopped = [json.loads(line) for line in out.stdout.splitlines() + out.stderr.splitlines()
                   if '"deployment_stopped"' in line]  # fmt: skip
        assert stopped and stopped[-1]["exit_code"] == 1


def test_after_sigterm_requests_get_503_never_504(tmp_path, tiny_llama_dir):
    d = start_daemon(tmp_path, tiny_llama_dir, cache={"num_blocks": 256, "block_size": 4},
                     daemon={"drain_timeout_s": 5.0})  # fmt: skip
    try:
        d.proc.send_signal(signal.SIGTERM)
        assert d.proc.wait(30) == 0
        t0 = time.monotonic()
        with pytest.raises(KvdError) as e, Client(d.endpoint, timeout=600) as c:
            c.generate(prompt="anyone there?", max_tokens=2)
        assert e.value.code == 503 and time.monotonic() - t0 < 15, e.value
    finally:
        d.stop()
