"""Helpers for PD tests: a prefill + decode deployment of real daemons, reference outputs,
and checks that both instances hold no block and pass their integrity check."""

from __future__ import annotations

import asyncio
import functools
from dataclasses import dataclass
from pathlib import Path

from harness import DaemonHandle, start_daemon, wait_for
from kvd import LLM, SamplingParams
from kvd.client import AsyncClient, Client, KvdError

TIE_LOGPROB_GAP = 1e-3  # below this top-2 gap a different batch shape may flip a greedy token
FAST = {"heartbeat_interval_s": 0.5, "integrity_check_interval_s": 1.0}
# Several instances share this machine's cores: one thread each, or their OpenMP threads spin
# against each other and starve the daemons' event loops (false heartbeat deaths).
ONE_THREAD = {"threads": 1}
SECRET = "pd-tests-shared-secret"  # every PD test's link runs CURVE, as deployments should


@dataclass
class Deployment:
    prefill: DaemonHandle
    decode: DaemonHandle


def start_prefill(root: Path, model_dir: Path, pd: dict, cache: dict | None = None, **sections) -> DaemonHandle:
    model = {**ONE_THREAD, **sections.pop("model", {})}
    return start_daemon(root, model_dir, daemon={"role": "prefill", **FAST}, pd={"secret": SECRET, **pd}, model=model,
                        cache=cache or {"num_blocks": 512}, **sections)  # fmt: skip


def start_decode(root: Path, model_dir: Path, prefill: DaemonHandle | str, pd: dict,
                 cache: dict | None = None, **sections) -> DaemonHandle:  # fmt: skip
    spec = str(prefill.run_dir) if isinstance(prefill, DaemonHandle) else prefill
    daemon = {"role": "decode", **FAST, **sections.pop("daemon", {})}
    model = {**ONE_THREAD, **sections.pop("model", {})}
    return start_daemon(root, model_dir, daemon=daemon, cache=cache or {"num_blocks": 512}, model=model,
                        pd={"prefill_endpoints": [spec], "heartbeat_timeout_s": 3.0, "secret": SECRET, **pd},
                        **sections)  # fmt: skip


def wait_linked(decode: DaemonHandle, timeout: float = 30.0) -> dict:
    with Client(decode.endpoint, timeout=10) as c:
        return wait_for(lambda: (s := c.status()) and all(p["alive"] for p in s["pd"]["prefill_instances"]) and s,
                        timeout, "the decode instance to see its prefill instances")  # fmt: skip


def wait_clean(*daemons: DaemonHandle, timeout: float = 30.0) -> list[dict]:
    """Every instance idle, holding no block, no transfer in flight, integrity ok."""
    out = []
    for d in daemons:
        with Client(d.endpoint, timeout=10) as c:
            def clean():
                s = c.status()
                pd = s.get("pd", {})
                ok = (s["live_requests"] == 0 and s["blocks"]["held"] == 0 and s["integrity"] == "ok"
                      and pd.get("transfers", 0) == 0 and not any(pd.get("in_flight", {}).values()))  # fmt: skip
                return s if ok else None

            out.append(wait_for(clean, timeout, f"{d.run_dir} to be idle and clean", interval=0.25))
    return out


@functools.cache
def _offline(model_dir: Path, dtype: str, quantization: str) -> LLM:
    # loaded once per test process (a few seconds each time otherwise)
    return LLM(str(model_dir), dtype=dtype, quantization=quantization)


def reference(model_dir: Path, prompts: list, max_tokens: int, dtype: str = "float32", quantization: str = "none"):
    """The offline engine's greedy outputs, with the top-2 logprobs that tell a tie."""
    llm = _offline(model_dir, dtype, quantization)
    return llm.generate(prompts, SamplingParams(max_tokens=max_tokens, temperature=0.0, logprobs=2))


def assert_matches(got: list[int], ref, label: str, tie_gap: float = TIE_LOGPROB_GAP) -> None:
    """Token-identical, except after a step where the reference's top two were a near tie."""
    for step, (a, b) in enumerate(zip(got, ref.token_ids)):
        if a != b:
            lp = ref.logprobs[step].top_logprobs
            assert lp[0] - lp[1] < tie_gap, f"{label}: diverged at step {step} ({a} vs {b}), not a tie"
            return
    assert got == ref.token_ids, f"{label}: {got} vs {ref.token_ids}"


async def stream_one(endpoint: str, prompt, max_tokens: int, timeout: float = 120.0, **kw):
    """(token ids, finish_reason) or the KvdError the request ended with."""
    async with AsyncClient(endpoint, timeout=timeout) as c:
        ids, finish = [], None
        try:
            source = {"prompt_token_ids": prompt} if isinstance(prompt, list) else {"prompt": prompt}
            async for chunk in c.stream(**source, max_tokens=max_tokens, temperature=0.0, **kw):
                ids += chunk.token_ids
                finish = chunk.finish_reason
        except KvdError as e:
            return e
        return ids, finish


def run_all(endpoint: str, prompts: list, max_tokens: int, **kw) -> list:
    async def go():
        return await asyncio.gather(*(stream_one(endpoint, p, max_tokens, **kw) for p in prompts))

    return asyncio.run(go())
