"""The scheduler half of the KV connector, and its base: a unified instance's, where every
token's KV is computed here and nothing is saved elsewhere.

    n = connector.num_external_tokens(request)  # leading tokens whose KV comes from outside
    connector.allocated(request, num_blocks)    # its blocks are held: the load may start
    held = connector.request_finished(request)  # True: blocks stay until the transfer ends
    whole = connector.computes_whole(request, num_cached_tokens)   # the prefill group's rule

What a request's transfer needs between those calls lives on its record
(`request.transfer`, a `KVTransfer`), which only a connector reads or writes.
"""

from __future__ import annotations

from kvd.request import Request, RequestStatus


class KVTransfer:
    """One request's KV movement through the connector, kept on its record."""

    __slots__ = ("load_tokens", "save", "in_flight", "wait_blocks")

    def __init__(self, load_tokens: int = 0, save: bool = False) -> None:
        self.load_tokens = load_tokens  # leading tokens to load before the request computes
        self.wait_blocks = 0  # blocks it holds while it waits for the load
        self.save = save  # after its first token its blocks are saved elsewhere (held meanwhile)
        self.in_flight = False  # a transfer may touch its blocks: none of them is freed


def group_computes(num_cached_tokens: int, num_scheduled: int, num_tokens: int, min_tokens: int,
                   prompt_logprobs: bool = False) -> bool:  # fmt: skip
    """The prefill group's rule, one function for the scheduler and the worker: a prompt
    with no cached prefix, of at least `min_tokens` tokens (0: no group), computed whole —
    unless it asked for prompt logprobs (the group returns the last position's logits only)."""
    return (bool(min_tokens) and not prompt_logprobs and num_cached_tokens == 0
            and num_scheduled == num_tokens >= min_tokens)  # fmt: skip


class KVConnector:
    """The unified instance's connector: nothing comes from outside, nothing is saved.
    `group_min_tokens` (0: no prefill group) is the prefill group's threshold."""

    def __init__(self, group_min_tokens: int = 0, wait_blocks: int = 0) -> None:
        self.group_min_tokens = group_min_tokens
        self.wait_blocks = wait_blocks  # blocks that requests waiting for external KV may hold
        self.num_wait_blocks = 0  # blocks they hold now

    def added(self, request: Request) -> None:
        """A request was queued: the connector sets up its transfer, if it has one."""

    def num_external_tokens(self, request: Request) -> int:
        """How many leading tokens' KV is to be loaded from outside before it computes."""
        return 0

    def allocated(self, request: Request, num_blocks: int) -> None:
        """The request's `num_blocks` blocks are held for its external tokens (it waits for them)."""

    def load_ended(self, request: Request) -> None:
        """The load arrived or failed: nothing more is loaded for the request."""

    def begin_transfer(self, request: Request) -> None:
        """A transfer may touch the request's blocks: none of them is freed until it ends."""
        raise RuntimeError(f"{type(self).__name__} moves no KV: no transfer of {request.request_id!r} can begin")

    def end_transfer(self, request: Request) -> None:
        """The transfer ended (or can no longer touch the blocks); idempotent."""

    def request_finished(self, request: Request) -> bool:
        """The request finished: True keeps its blocks held until `end_transfer`."""
        return False

    def holds(self, request: Request) -> bool:
        """Whether a transfer holds the (finished) request's blocks."""
        return False

    def computes_whole(self, request: Request, num_cached_tokens: int) -> bool:
        """Whether the prompt is scheduled whole, whatever budget the step has left."""
        return group_computes(num_cached_tokens, request.num_tokens, request.num_tokens, self.group_min_tokens,
                              request.prompt_logprobs is not None)  # fmt: skip

    def take_loads(self) -> list[Request]:
        """Requests whose blocks were allocated for a load since the last call."""
        return []


def finished_normally(request: Request) -> bool:
    """Finished by a stop or its length (not aborted, not failed)."""
    return request.status in (RequestStatus.FINISHED_STOPPED, RequestStatus.FINISHED_LENGTH)
