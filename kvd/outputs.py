"""RequestOutput: what a caller gets back for one prompt (offline API and client alike)."""

from __future__ import annotations

import msgspec

from kvd.scheduler.output import Logprobs


class RequestOutput(msgspec.Struct, kw_only=True):
    """One request's result: its generated ids and text, why it finished, prefix hits, logprobs."""

    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]  # generated ids
    text: str
    finish_reason: str | None  # "stop" | "length" | "abort" | "error"; None while running
    logprobs: list[Logprobs] | None = None
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache
    index: int = 0  # which of its request's n choices (sampling n > 1)
    prompt_logprobs: list[Logprobs | None] | None = None  # per prompt token (the first: None), when asked for

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None
