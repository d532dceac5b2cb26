"""Request: the mutable, internal state of one generation, owned by the scheduler.

A wire or API request becomes a Request once. Its tokens are the prompt followed by
the generated tokens; `num_computed_tokens` counts those whose KV is in the cache.
The scheduler's one rule is to let computed tokens catch up with tokens.
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
        self.block_hashes: list[bytes] = []  # chained hashes of the full blocks of all_token_ids
        # PD handoff. kv_send: a prefill instance's request — it ends after its first token and
        # its blocks stay held while the messenger writes them to the pool. kv_recv_tokens: how
        # many leading tokens' KV is to be read from the pool into preallocated blocks before
        # the request computes (a decode instance: the whole prompt). transfer_in_flight: the
        # messenger may be touching the request's blocks, so they must not be freed.
        self.kv_send = False
        self.kv_recv_tokens = 0
        self.transfer_in_flight = False

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.all_token_ids[len(self.prompt_token_ids) :]

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

    def check_stop(self) -> RequestStatus | None:
        """The finished status the last token implies (stop strings are the engine's), or None."""
        params = self.sampling_params
        last = self.all_token_ids[-1]
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
