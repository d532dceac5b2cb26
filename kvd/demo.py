"""`make demo`: kvd's main job on the embedded default model, as its users run it.

Starts `kvd serve` (a daemon with its worker process) on a random
loopback port, streams answers to a few chat prompts through the client to the terminal,
runs a concurrent batch for a throughput figure, prints `kvd status`, and stops the
daemon with SIGTERM (it drains and exits 0).
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from kvd.client import AsyncClient, Client
from kvd.spawn import DaemonError, start_kvd, wait_endpoint

QUESTIONS = [
    "What is the capital of France?",
    "Give me three tips for a good night's sleep.",
    "Write a haiku about autumn leaves.",
    "What is 12 times 7?",
]
BATCH_TOPICS = ["the sea", "mountains", "coffee", "trains", "winter", "a library", "rain", "the moon"]


def start_daemon(run_dir: Path) -> tuple[subprocess.Popen, str]:
    config = run_dir / "kvd.toml"
    config.write_text(f'[daemon]\nport = 0\nrun_dir = "{run_dir}"\n[log]\nformat = "json"\n'
                      f'file = "{run_dir / "kvd.log"}"\n')  # fmt: skip
    out = run_dir / "daemon.out"
    proc = start_kvd(["serve", "--config", str(config)], dict(os.environ), out)
    try:
        return proc, wait_endpoint(proc, run_dir / "endpoint", 300, out)
    except DaemonError as e:
        sys.exit(f"kvd serve: {e}")


def stream_answers(endpoint: str) -> None:
    with Client(endpoint, timeout=300) as c:
        for q in QUESTIONS:
            print(f"\n>>> {q}")
            for chunk in c.stream(chat=[{"role": "user", "content": q}], max_tokens=96, temperature=0.0):
                print(chunk.text, end="", flush=True)
            print()


async def batch_throughput(endpoint: str) -> tuple[int, float]:
    async with AsyncClient(endpoint, timeout=300) as c:
        t0 = time.perf_counter()
        outs = await asyncio.gather(*(
            c.generate(chat=[{"role": "user", "content": f"Write two sentences about {t}."}],
                       max_tokens=64, temperature=0.0, ignore_eos=True)
            for t in BATCH_TOPICS * 2
        ))  # fmt: skip
        return sum(len(o.token_ids) for o in outs), time.perf_counter() - t0


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="kvd-demo-") as tmp:
        run_dir = Path(tmp)
        t0 = time.perf_counter()
        proc, endpoint = start_daemon(run_dir)
        print(f"kvd serve is ready on {endpoint} ({time.perf_counter() - t0:.1f} s)")
        try:
            stream_answers(endpoint)
            n, secs = asyncio.run(batch_throughput(endpoint))
            print(f"\n{len(BATCH_TOPICS) * 2} concurrent requests: {n} tokens in {secs:.2f} s = {n / secs:.1f} tok/s\n")
            subprocess.run([sys.executable, "-m", "kvd.cli", "status", "--endpoint", endpoint], check=True)
        finally:
            proc.send_signal(signal.SIGTERM)
            code = proc.wait(60)
        print(f"\nkvd serve drained and stopped (exit code {code})")
        if code != 0:
            sys.exit(code)


if __name__ == "__main__":
    main()
