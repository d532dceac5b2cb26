"""The multi-turn chat workload of `python -m kvd.bench.route`: seeded users, each with a system
prompt of its own and a fixed number of turns, made the same for every policy and instance count.

    users = make_users(24, 6, seed=0, count=n_tokens)          # count(text) -> tokens, the served tokenizer's
    conversation_blocks(users, chat_count, max_tokens=32, block_size=16)   # KV blocks each user's last turn holds

A user's system prompt is ~`system_tokens` tokens of seeded English-like sentences that open
with the user's number, so no two users share even their first KV block; each turn adds a
user message of 30-60 tokens (and, when played, the assistant's previous answer). Before its
first turn a user waits a seeded start offset (0-START_S s), before each later one a seeded
think time (THINK_S): the users overlap, and a follow-up arrives while others are served.
Pure: no sockets, no clock.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass

SYSTEM_TOKENS = 1000
MESSAGE_TOKENS = (30, 60)
START_S = 10.0  # users start spread over this many seconds
THINK_S = (0.5, 3.0)  # a user's pause between an answer and its next message

_NOUNS = ("report ledger river garden engine market harbor bridge station library forest museum "
          "kitchen contract invoice budget schedule meeting project server cluster network ticket "
          "customer supplier warehouse shipment recipe lecture exam journal archive village").split()  # fmt: skip
_ADJECTIVES = ("quiet careful early late small large northern southern formal brief detailed "
               "annual weekly urgent routine local remote shared private public").split()  # fmt: skip
_VERBS = ("checks describes explains compares lists reviews summarizes tracks updates records "
          "plans measures inspects answers prepares").split()  # fmt: skip
_TOPICS = ("accounting", "gardening", "logistics", "history", "cooking", "networking", "travel", "law",
           "astronomy", "teaching", "medicine", "music")  # fmt: skip


@dataclass(frozen=True)
class User:
    """One conversation: its system prompt, its messages and the wait before each."""

    index: int
    system: str
    messages: tuple[str, ...]  # the user's message of each turn
    waits: tuple[float, ...]  # seconds before each turn is sent: the start offset, then think times


def _sentence(rng: random.Random) -> str:
    a, b = rng.sample(_NOUNS, 2)
    return (f"The {rng.choice(_ADJECTIVES)} {a} {rng.choice(_VERBS)} the {rng.choice(_ADJECTIVES)} {b} "
            f"for the {rng.choice(_NOUNS)} team.")  # fmt: skip


def _system(u: int, rng: random.Random, tokens: int, count: Callable[[str], int]) -> str:
    parts = [f"You are assistant {u} of user {u}, who works in {rng.choice(_TOPICS)}. Follow these notes."]
    total = count(parts[0])
    while total < tokens:  # counted a sentence at a time (each with its leading space): linear, within a few tokens
        parts.append(_sentence(rng))
        total += count(" " + parts[-1])
    return " ".join(parts)


def _message(rng: random.Random, count: Callable[[str], int]) -> str:
    target = rng.randint(*MESSAGE_TOKENS)
    words = ["Please", "tell", "me", "how", "the"]
    while count(" ".join(words) + "?") < target:
        words.append(rng.choice(_NOUNS + _ADJECTIVES + _VERBS))
    return " ".join(words) + "?"


def make_users(users: int, turns: int, seed: int, count: Callable[[str], int],
               system_tokens: int = SYSTEM_TOKENS) -> list[User]:  # fmt: skip
    """`users` conversations of `turns` turns; the same arguments give the same users."""
    if users < 1 or turns < 1:
        raise ValueError(f"users and turns: must be >= 1, got {users} and {turns}")
    out = []
    for u in range(users):
        rng = random.Random(f"{seed}-{u}")  # per user: user u is the same whatever --users says
        system = _system(u, rng, system_tokens, count)
        messages = tuple(_message(rng, count) for _ in range(turns))
        waits = (rng.uniform(0.0, START_S), *(rng.uniform(*THINK_S) for _ in range(turns - 1)))
        out.append(User(u, system, messages, waits))
    return out


def conversation(user: User, answers: list[str]) -> list[dict[str, str]]:
    """The chat messages of the turn after `answers` (the assistant's answers so far)."""
    messages = [{"role": "system", "content": user.system}]
    for message, answer in zip(user.messages, answers):
        messages += [{"role": "user", "content": message}, {"role": "assistant", "content": answer}]
    return messages + [{"role": "user", "content": user.messages[len(answers)]}]


def conversation_blocks(users: list[User], chat_count: Callable[[list[dict]], int], max_tokens: int,
                        block_size: int) -> list[int]:  # fmt: skip
    """Per user: the KV blocks its last turn's prompt and answer fill (answers stood in for by
    `max_tokens` words), what an instance must hold to keep the whole conversation."""
    filler = " ".join(["word"] * max_tokens)
    out = []
    for user in users:
        tokens = chat_count(conversation(user, [filler] * (len(user.messages) - 1))) + max_tokens
        out.append(math.ceil(tokens / block_size))
    return out
