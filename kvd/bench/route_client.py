"""Playing the multi-turn workload (kvd.bench.route_workload) against a router, and what one run measured.

    turns, wall_s = asyncio.run(play(url, users, max_tokens=32))
    stats = RunStats.of(turns, wall_s)      # prefix hit rate, TTFT p50/p99, output tok/s, requests per instance

Every user runs concurrently over one aiohttp session, its turns one after another: it waits
its seeded start offset or think time, sends the conversation so far as a streamed chat
completion (`stream_options.include_usage`, temperature 0, `ignore_eos`), and appends the
answer it got. TTFT is send → the first chunk with content; the usage chunk gives prompt,
cached and completion tokens; `X-Kvd-Instance` names the instance the router chose.
"""

from __future__ import annotations

import asyncio
import json
import statistics
from collections import Counter
from dataclasses import dataclass
from time import perf_counter

import aiohttp

from kvd.bench.route_workload import User, conversation

PATH = "/v1/chat/completions"


@dataclass(frozen=True)
class Turn:
    """One answered request."""

    user: int
    turn: int
    instance: str
    sent_s: float  # since the run's start
    ttft_s: float
    done_s: float  # since the run's start
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    answer: str


@dataclass(frozen=True)
class RunStats:
    """The figures of one run (one policy and instance count)."""

    requests: int
    hit_rate: float  # cached prompt tokens / prompt tokens, summed over the run
    ttft_p50_ms: float
    ttft_p99_ms: float
    tok_s: float  # completion tokens / (first send → last answer)
    per_instance: dict[str, int]
    moves: int  # follow-up turns sent to another instance than the user's previous turn

    @classmethod
    def of(cls, turns: list[Turn], wall_s: float) -> RunStats:
        ttft = sorted(t.ttft_s for t in turns)
        p99 = statistics.quantiles(ttft, n=100, method="inclusive")[98] if len(ttft) > 1 else ttft[0]
        last: dict[int, str] = {}
        moves = 0
        for t in sorted(turns, key=lambda t: (t.user, t.turn)):
            moves += t.user in last and last[t.user] != t.instance
            last[t.user] = t.instance
        return cls(requests=len(turns),
                   hit_rate=sum(t.cached_tokens for t in turns) / max(1, sum(t.prompt_tokens for t in turns)),
                   ttft_p50_ms=1000 * statistics.median(ttft), ttft_p99_ms=1000 * p99,
                   tok_s=sum(t.completion_tokens for t in turns) / wall_s,
                   per_instance=dict(sorted(Counter(t.instance for t in turns).items())), moves=moves)  # fmt: skip


async def _ask(session: aiohttp.ClientSession, url: str, user: User, answers: list[str], max_tokens: int,
               t0: float) -> Turn:  # fmt: skip
    body = {"messages": conversation(user, answers), "max_tokens": max_tokens, "temperature": 0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}  # fmt: skip
    sent = perf_counter()
    first = None
    text: list[str] = []
    usage = None
    async with session.post(url + PATH, json=body) as r:
        if r.status != 200:
            raise RuntimeError(f"user {user.index} turn {len(answers)}: {r.status}: {(await r.read())[:300]!r}")
        instance = r.headers.get("X-Kvd-Instance", "?")
        async for line in r.content:
            if not line.startswith(b"data: ") or line.startswith(b"data: [DONE]"):
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(f"user {user.index} turn {len(answers)}: {chunk['error']}")
            for choice in chunk.get("choices") or ():
                content = choice.get("delta", {}).get("content")
                if content:
                    first = first or perf_counter()
                    text.append(content)
            usage = chunk.get("usage") or usage
    done = perf_counter()
    if usage is None or first is None:
        raise RuntimeError(f"user {user.index} turn {len(answers)}: no content or no usage in the stream")
    return Turn(user.index, len(answers), instance, sent - t0, first - sent, done - t0, usage["prompt_tokens"],
                (usage.get("prompt_tokens_details") or {}).get("cached_tokens", 0), usage["completion_tokens"],
                "".join(text))  # fmt: skip


async def _converse(session: aiohttp.ClientSession, url: str, user: User, max_tokens: int, t0: float) -> list[Turn]:
    out: list[Turn] = []
    for wait in user.waits:
        await asyncio.sleep(wait)
        out.append(await _ask(session, url, user, [t.answer for t in out], max_tokens, t0))
    return out


async def play(url: str, users: list[User], max_tokens: int) -> tuple[list[Turn], float]:
    """Every user's turns against `url`; (the turns, seconds from the first send to the last answer)."""
    timeout = aiohttp.ClientTimeout(total=None, sock_read=600)
    async with aiohttp.ClientSession(timeout=timeout, connector=aiohttp.TCPConnector(limit=0)) as session:
        t0 = perf_counter()
        per_user = await asyncio.gather(*(_converse(session, url, u, max_tokens, t0) for u in users))
    turns = [t for ts in per_user for t in ts]
    return turns, max(t.done_s for t in turns) - min(t.sent_s for t in turns)
