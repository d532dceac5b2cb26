"""What crosses between the scheduler and the model runner, each step.

SchedulerOutput is a diff: a request's full data goes once (`new_reqs`, also when it
resumes after preemption), then only its new block ids and progress (`cached_reqs`),
plus the ids that finished or were preempted since the last step. The runner keeps
the rest, including the tokens it sampled itself. ModelOutput carries the sampled
tokens back. Both are msgspec Structs so the daemon can send them over ZeroMQ as is.
"""

from __future__ import annotations

import msgspec

from kvd.sampling import SamplingParams


class NewRequestData(msgspec.Struct, array_like=True, frozen=True):
    """A request the runner has not seen (or sees again after preemption): all of it."""

    request_id: str
    token_ids: list[int]  # prompt, plus the outputs so far for a resumed request
    num_prompt_tokens: int
    block_ids: list[int]
    num_computed_tokens: int
    sampling_params: SamplingParams


class CachedRequestData(msgspec.Struct, array_like=True, frozen=True):
    """A request the runner knows: only its new blocks and progress."""

    request_id: str
    new_block_ids: list[int]
    num_computed_tokens: int


class SchedulerOutput(msgspec.Struct, array_like=True, frozen=True):
    """One step's work, as a diff against what the runner already holds."""

    step: int
    new_reqs: list[NewRequestData]
    cached_reqs: list[CachedRequestData]
    num_scheduled_tokens: dict[str, int]  # in schedule order
    finished_request_ids: list[str]  # finished or aborted since the last step: drop all state
    preempted_request_ids: list[str]  # drop the KV state; the request comes back as new
    # Host swap tier: (block id, host slot) pairs, copied before the step's forward —
    # swap_out first (preempted requests' KV to host), then swap_in (resumed ones' back).
    swap_out: list[tuple[int, int]] = []
    swap_in: list[tuple[int, int]] = []
    # Structured outputs: the allowed next tokens of each constrained request that samples
    # this step, as xgrammar's int32 bitmask row (bit t of word t // 32: token t allowed).
    bitmasks: dict[str, bytes] = {}
    # n choices: a later choice forked from its first choice in the step that ends the
    # first's prompt (child id -> first choice's id). It computes nothing: it samples from
    # the first's last prompt row, and after the forward its partial prompt block is copied
    # from the first's, (source block, its own block) in `fork_copies`.
    forks: dict[str, str] = {}
    fork_copies: list[tuple[int, int]] = []

    @property
    def is_empty(self) -> bool:
        return not self.num_scheduled_tokens


class Logprobs(msgspec.Struct, array_like=True, frozen=True):
    """The sampled token's logprob and the top alternatives."""

    logprob: float  # of the sampled token
    top_ids: list[int]
    top_logprobs: list[float]


class PromptLogprobs(msgspec.Struct, array_like=True, frozen=True):
    """A prompt chunk's logprobs: of prompt tokens `start`, `start` + 1, ... (each given the
    tokens before it; the first prompt token has none)."""

    request_id: str
    start: int
    logprobs: list[Logprobs]


class ModelOutput(msgspec.Struct, array_like=True, frozen=True):
    """One step's sampled tokens, per request."""

    step: int
    request_ids: list[str]  # requests that sampled a token this step (prefill chunks short of the end did not)
    token_ids: list[int]
    logprobs: list[Logprobs | None] | None = None  # aligned with request_ids when any request asked for them
    prompt_logprobs: list[PromptLogprobs] = []  # the step's prompt chunks of requests that asked for them


class EngineOutput:
    """What the scheduler reports for one request after a step (in-process only: it holds the
    record itself, which may already have left the request table)."""

    __slots__ = ("request", "new_token_ids", "finish_reason", "new_logprobs")

    def __init__(self, request, new_token_ids: list[int], finish_reason: str | None = None,
                 new_logprobs: list[Logprobs] | None = None) -> None:  # fmt: skip
        self.request = request  # kvd.request.Request
        self.new_token_ids = new_token_ids
        self.finish_reason = finish_reason
        self.new_logprobs = new_logprobs

    @property
    def request_id(self) -> str:
        return self.request.request_id
