"""Request: the one record of a generation, from admission to its end.

A wire or API request becomes a Request once, and everything the engine-side knows of it
hangs off this record: its tokens (the prompt followed by the generated tokens;
`num_computed_tokens` counts those whose KV is in the cache), its status, its swap slots,
what the runner was told of its blocks, its KV transfer (`transfer`, the connector's),
its text and output (`text`, the text stage's) and, in the daemon, where its results go
(`owner`, the serving layer's). Tables keyed by request id hold this record and nothing
parallel to it. The scheduler's one rule is to let computed tokens catch up with tokens.
"""

from __future__ import annotations

import enum
import time

from kvd.cache.hashing import ExtraKey, hash_blocks
from kvd.sampling import SamplingParams


class RequestStatus(enum.IntEnum):
    """Ordered so that `status >= FINISHED_STOPPED` means finished."""

    WAITING = 0
    RUNNING = 1
    PREEMPTED = 2
    WAITING_FOR_KV = 3  # blocks preallocated; its KV is being handed over through the pool
    FINISHED_STOPPED = 4
    FINISHED_LENGTH = 5
    FINISHED_ABORTED = 6
    FINISHED_ERROR = 7

    @property
    def finished(self) -> bool:
        return self >= RequestStatus.FINISHED_STOPPED

    @property
    def finish_reason(self) -> str | None:
        return _FINISH_REASONS.get(self)


_FINISH_REASONS = {
    RequestStatus.FINISHED_STOPPED: "stop",
    RequestStatus.FINISHED_LENGTH: "length",
    RequestStatus.FINISHED_ABORTED: "abort",
    RequestStatus.FINISHED_ERROR: "error",
}


class Request:
    """One request's tokens, progress, blocks' hashes and status."""

    def __init__(
        self,
        request_id: str,
        prompt_token_ids: list[int],
        sampling_params: SamplingParams,
        eos_token_ids: frozenset[int] = frozenset(),
        extra_keys: tuple[ExtraKey, ...] = (),
        arrival_time: float | None = None,
    ) -> None:
        self.request_id = request_id
        self.prompt_token_ids = list(prompt_token_ids)
        self.sampling_params = sampling_params
        self.eos_token_ids = eos_token_ids
        self.extra_keys = extra_keys
        self.arrival_time = time.monotonic() if arrival_time is None else arrival_time
        self.all_token_ids = list(prompt_token_ids)
        self.num_computed_tokens = 0
        self.status = RequestStatus.WAITING
        self.num_preemptions = 0
        self.num_cached_tokens = 0  # prompt tokens it did not compute (prefix cache, pool)
        self.block_hashes: list[bytes] = []  # chained hashes of the full blocks of all_token_ids
        self.host_slots: list[int] | None = None  # swapped out: the host slots holding its computed KV
        self.num_sent_blocks: int | None = None  # block ids the runner knows (None: it knows none)
        self.transfer = None  # its KVTransfer, when the connector moves its KV (kvd.connector)
        self.text = None  # its TextState: detokenizer, stop strings, the output so far (kvd.engine.text)
        self.owner = None  # the daemon's: where its results go, its clock (kvd.daemon.serving)
        # A request with n > 1 is n records, its choices, in one shared list; `index` is this
        # one's place. Choices after the first reuse the first's prompt KV (prefix cache).
        self.choices: list[Request] | None = None
        self.index = 0
        self.grammar = None  # with structured outputs: its xgrammar matcher (kvd.engine.grammar)
        self.grammar_broken = False  # a token the grammar does not allow was appended (never sampled here)
        # With sampling_params.prompt_logprobs: each prompt token's logprobs so far (the first has none).
        self.prompt_logprobs: list | None = [None] if sampling_params.prompt_logprobs is not None else None

    @property
    def needs_prompt_logprobs(self) -> bool:
        """Its prompt logprobs are not all in: every prompt token is computed here (no prefix
        cache hit, no KV from outside), so each position's logits exist."""
        return self.prompt_logprobs is not None and len(self.prompt_logprobs) < self.num_prompt_tokens

    @property
    def first_choice(self) -> Request | None:
        """The choice whose prompt KV this one reuses (None for the first, or n = 1)."""
        return self.choices[0] if self.index else None

    def waits_for_first_choice(self, scheduled: dict[str, int]) -> bool:
        """A later choice waits until its first choice's whole prompt is computed or scheduled
        (`scheduled`: this step's tokens by request id): admitted then, it finds those blocks
        in the prefix cache and computes only the partial last block — the prompt is
        computed, or loaded, once."""
        first = self.first_choice
        if first is None or first.status.finished:
            return False
        if first.status != RequestStatus.RUNNING:
            return True
        return first.num_computed_tokens + scheduled.get(first.request_id, 0) < first.num_prompt_tokens

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.all_token_ids) - len(self.prompt_token_ids)

    def update_block_hashes(self, block_size: int, algo: str) -> list[bytes]:
        """Extend `block_hashes` to cover every full block of the tokens so far."""
        start = len(self.block_hashes) * block_size
        if self.num_tokens - start >= block_size:
            parent = self.block_hashes[-1] if self.block_hashes else None
            self.block_hashes += hash_blocks(
                self.all_token_ids, block_size, self.extra_keys, algo, parent=parent, start=start
            )
        return self.block_hashes

    def append_token(self, token_id: int) -> None:
        self.all_token_ids.append(token_id)
        if self.grammar is not None and not self.grammar.accept_token(token_id):
            self.grammar_broken = True

    def check_stop(self) -> RequestStatus | None:
        """The finished status the last token implies (stop strings are the engine's), or None."""
        params = self.sampling_params
        last = self.all_token_ids[-1]
        if self.grammar is not None:
            if self.grammar_broken:  # only a token sampled elsewhere without the grammar can do this
                return RequestStatus.FINISHED_ERROR
            if self.grammar.is_terminated():  # the output is complete
                return RequestStatus.FINISHED_STOPPED
        if not params.ignore_eos and last in self.eos_token_ids:
            return RequestStatus.FINISHED_STOPPED
        if last in params.stop_token_ids:
            return RequestStatus.FINISHED_STOPPED
        if self.num_output_tokens >= params.max_tokens:
            return RequestStatus.FINISHED_LENGTH
        return None

    def __repr__(self) -> str:
        return (
            f"Request({self.request_id!r}, status={self.status.name}, "
            f"tokens={self.num_tokens}, computed={self.num_computed_tokens})"
        )
