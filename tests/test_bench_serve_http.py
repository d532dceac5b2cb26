"""kvd.bench.serve_http's measurement: the order the servers run in, the ratios, and the CPU it counts."""

import asyncio
import json
import os
import subprocess
import sys
import time

import aiohttp

from kvd.bench.serve import FULL, ModeResult, Sample
from kvd.bench.serve_http import (
    Target,
    cpu_line,
    http_stream_one,
    measure,
    median_run,
    ratio_lines,
    rotated,
    settle,
    table_rows,
    tree_cpu,
)

# A child that burns `seconds` of CPU, says so, and waits to be killed (alive when counted).
BURN_IN_CHILD = """
import subprocess, sys
child = subprocess.Popen([sys.executable, "-c", '''
import sys, time
while time.process_time() < float(sys.argv[1]):
    pass
print("burnt", flush=True)
time.sleep(60)
''', sys.argv[1]], stdout=sys.stdout)
child.wait()
"""


def test_tree_cpu_counts_the_descendants_apart_from_the_root():
    proc = subprocess.Popen([sys.executable, "-c", BURN_IN_CHILD, "0.5"], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "burnt"
        root, rest = tree_cpu(proc.pid)
        assert rest >= 0.45  # the grandchild's 0.5 s (clock ticks round it down a little)
        assert root < rest  # the root only waited
    finally:
        subprocess.run(["pkill", "-KILL", "-P", str(proc.pid)], check=False)
        proc.kill()
        proc.wait()


def test_tree_cpu_of_a_process_that_is_gone():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    assert tree_cpu(proc.pid) == (0.0, 0.0)


def test_rotated():
    assert [rotated(["a", "b", "c"], r) for r in range(4)] == [["a", "b", "c"], ["b", "c", "a"], ["c", "a", "b"],
                                                               ["a", "b", "c"]]  # fmt: skip


def fake_target(label: str, calls: list, rates: dict[str, list[float]]) -> Target:
    """Runs a mode by recording it; its streams runs take the next of `rates` tok/s in turn."""
    speeds = iter(rates[label])

    async def run(name, tag, work, delays, limit):
        calls.append((label, tag))
        tokens = sum(work[1])
        tok_s = next(speeds) if "streams" in tag else 1.0
        first = 0.3 if label == "kvd HTTP" else 0.2  # every request's first chunk, seconds after its send
        return ModeResult(name, tokens / tok_s, tokens, [[0] * n for n in work[1]],
                          [Sample(f"{tag}-{i}", 0.0, [first]) for i in range(len(work[1]))])  # fmt: skip

    return Target(label, run, os.getpid())


def test_measure_runs_every_target_in_each_round_in_rotated_order():
    work = ([[1, 2, 3]] * 4, [2, 3, 4, 5])
    warm = ([[1]] * 2, [1, 1])
    calls: list = []
    rates = {"ZeroMQ": [100, 90, 95], "kvd HTTP": [99, 92, 97], "vllm serve": [100, 100, 100]}
    targets = [fake_target(label, calls, rates) for label in rates]
    results, cpu = asyncio.run(measure(targets, work, warm, FULL, rounds=3))

    assert calls[:3] == [(t, "warmup") for t in rates]  # warm-ups first, then the latency mode once each
    assert [c[1] for c in calls[3:6]] == ["rate-1"] * 3
    streams = calls[6:]
    assert [c[0] for c in streams] == ["ZeroMQ", "kvd HTTP", "vllm serve", "kvd HTTP", "vllm serve", "ZeroMQ",
                                       "vllm serve", "ZeroMQ", "kvd HTTP"]  # fmt: skip
    assert all(tag.endswith(f"-r{i // 3}") for i, (_, tag) in enumerate(streams))
    assert {label: [round(m.tok_s) for m in runs[1:]] for label, runs in results.items()} == rates
    assert all(len(uses) == 3 and all(u.tokens == 14 for u in uses) for uses in cpu.values())

    lines = ratio_lines(results)
    assert "HTTP / ZeroMQ TTFT p50 at 1 req/s: 1.500**" in lines[0]
    # round by round: 0.99, 0.92, 0.97 -> median 0.97
    assert "kvd HTTP / vllm serve output tok/s at 32 concurrent streams: 0.970**" in lines[2]
    assert "0.990, 0.920, 0.970" in lines[2]
    assert round(median_run(results["ZeroMQ"][1:]).tok_s) == 95
    rows = table_rows(results)
    assert [m.name.split(", ")[0] for m in rows] == list(rates) * 2
    assert rows[3].name.endswith("(median of 3)")
    assert cpu_line(cpu).startswith("CPU seconds per 1,000 output tokens")


def test_settle_waits_while_the_target_works_on():
    proc = subprocess.Popen([sys.executable, "-c", "import time\nt = time.process_time()\n"
                             "while time.process_time() - t < 0.6: pass\ntime.sleep(60)"])  # fmt: skip
    try:
        time.sleep(0.1)  # it is burning now
        assert 0.3 < asyncio.run(settle(proc.pid)) < 5  # till its 0.6 s of CPU are spent
        assert asyncio.run(settle(proc.pid)) < 0.35  # sleeping: quiet at the first or second look
    finally:
        proc.kill()
        proc.wait()


async def closing_then_answering_server(connections: list):
    """A server whose first connection closes without an answer (a connection the server closed
    as the client sent on it); later ones answer one streamed completion of two tokens."""
    chunks = [{"choices": [{"text": "a"}]}, {"choices": [{"text": "b"}], "usage": {"completion_tokens": 2}}]
    body = "".join(f"data: {json.dumps(c)}\n\n" for c in chunks) + "data: [DONE]\n\n"

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(1)
        head = (await reader.readuntil(b"\r\n\r\n")).lower().split(b"\r\n")
        length = int(next(line.split(b":")[1] for line in head if line.startswith(b"content-length")))
        await reader.readexactly(length)
        if len(connections) > 1:
            writer.write(f"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nContent-Length: {len(body)}\r\n\r\n"
                         f"{body}".encode())  # fmt: skip
            await writer.drain()
        writer.close()

    return await asyncio.start_server(handle, "127.0.0.1", 0)


def test_a_post_whose_connection_closes_goes_out_once_more():
    async def go():
        connections: list = []
        server = await closing_then_answering_server(connections)
        url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
        async with server, aiohttp.ClientSession() as session:
            sample = await http_stream_one(session, url, "r0", [1, 2, 3], 2)
        return sample, len(connections)

    sample, connections = asyncio.run(go())
    assert connections == 2 and sample.text == "ab" and sample.num_tokens == 2
