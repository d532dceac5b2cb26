"""SamplingParams: how one request's tokens are chosen and when it stops.

Validated on construction: a bad value raises ValueError naming the field. The
constructor rejects unknown keywords with TypeError (as any Python callable);
`SamplingParams.from_options(dict)`, used for options that arrive as data (the
wire, the CLI, `LLM.generate` given a dict), turns those into ValueError too.
"""

from __future__ import annotations

from typing import Any

import msgspec

INT32 = 2**31 - 1
MAX_N = 128  # choices per request (the engine also keeps n within its max_num_seqs)


class SamplingParams(msgspec.Struct, kw_only=True, frozen=True, forbid_unknown_fields=True):
    """Greedy when temperature == 0; otherwise temperature, top-k and top-p sampling."""

    n: int = 1  # sequences sampled from the prompt (its choices), which share the prompt's KV
    max_tokens: int = 16
    temperature: float = 1.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0
    seed: int | None = None  # same seed, same tokens, whatever the batch
    stop_token_ids: list[int] = []
    stop: list[str] = []  # stop strings; the text is cut before the match
    ignore_eos: bool = False
    logprobs: int | None = None  # None: off; N: the sampled token's logprob and the top N
    prompt_logprobs: int | None = None  # None: off; N: each prompt token's logprob and the top N

    def __post_init__(self) -> None:
        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) or not 1 <= self.max_tokens <= INT32:
            raise ValueError(f"max_tokens: must be an integer in [1, {INT32}], got {self.max_tokens!r}")
        if isinstance(self.n, bool) or not isinstance(self.n, int) or not 1 <= self.n <= MAX_N:
            raise ValueError(f"n: must be an integer in [1, {MAX_N}], got {self.n!r}")
        if not 0 <= self.temperature < float("inf"):
            raise ValueError(f"temperature: must be finite and >= 0, got {self.temperature!r}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p: must be in (0, 1], got {self.top_p!r}")
        if not 0 <= self.top_k <= INT32:
            raise ValueError(f"top_k: must be in [0, {INT32}] (0 turns it off), got {self.top_k!r}")
        if self.seed is not None and not -(2**63) <= self.seed < 2**63:
            raise ValueError(f"seed: must fit in 64 bits, got {self.seed!r}")
        if self.logprobs is not None and not 0 <= self.logprobs <= 20:
            raise ValueError(f"logprobs: must be in [0, 20], got {self.logprobs!r}")
        if self.prompt_logprobs is not None and not 0 <= self.prompt_logprobs <= 20:
            raise ValueError(f"prompt_logprobs: must be in [0, 20], got {self.prompt_logprobs!r}")
        if any(not isinstance(t, int) or not 0 <= t <= INT32 for t in self.stop_token_ids):
            raise ValueError(f"stop_token_ids: must be non-negative integers, got {self.stop_token_ids!r}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError(f"stop: must be non-empty strings, got {self.stop!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @classmethod
    def from_options(cls, options: dict[str, Any]) -> SamplingParams:
        """Build from a dict of options; unknown or ill-typed options raise ValueError naming them."""
        unknown = sorted(set(options) - set(cls.__struct_fields__))
        if unknown:
            raise ValueError(f"{unknown[0]}: unknown sampling option")
        try:
            return msgspec.convert(options, cls)
        except msgspec.ValidationError as e:
            raise ValueError(str(e)) from None
