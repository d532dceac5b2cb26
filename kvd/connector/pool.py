"""The PD connector's scheduler half: KV loaded from and saved to the storage pool.

A decode instance loads every prompt (`load="prompt"`): a request's blocks are
preallocated when it reaches the head of the queue, within their own budget
(`wait_blocks`, so requests waiting for KV never starve running ones), and it waits until
the role reports the load (`Engine.kv_loaded`) or gives up (`Engine.kv_load_failed`,
after which it computes its prompt here). A prefill instance saves (`save=True`): its
requests end after their first token and their blocks stay held while the messenger
writes them to the pool; with `load="prefix"` they first load the leading full blocks
the pool has. Any transfer in flight holds the request's blocks: a request that ends
meanwhile has them freed by `end_transfer`, never before.

The worker half (`kvd.connector.transfers.PoolTransfers`) starts the loads `take_loads`
hands the PD roles (kvd.daemon.pd) and the saves, on the cache messenger (kvd.messenger),
which moves the bytes.
"""

from __future__ import annotations

import msgspec

from kvd.connector.base import KVConnector, KVTransfer, finished_normally
from kvd.request import Request

LOADS = (None, "prompt", "prefix")


class PoolConnector(KVConnector):
    """KV through the storage pool: loaded before a request computes, saved after it."""

    def __init__(self, block_size: int, wait_blocks: int, load: str | None = None, save: bool = False,
                 group_min_tokens: int = 0) -> None:  # fmt: skip
        if load not in LOADS:
            raise ValueError(f"load: expected one of {LOADS}, got {load!r}")
        super().__init__(group_min_tokens, wait_blocks)
        self.block_size = block_size
        self.load = load
        self.save = save
        self._loads: list[Request] = []

    def added(self, request: Request) -> None:
        n = request.num_prompt_tokens
        # "prefix": the full blocks before the last token (whose logits are needed). A later
        # choice of an n > 1 request loads nothing: it reuses its first choice's prompt KV here.
        load = n if self.load == "prompt" else (n - 1) // self.block_size * self.block_size if self.load else 0
        if request.first_choice is not None or request.prompt_logprobs is not None:
            load = 0  # (prompt logprobs need every prompt position computed here)
        request.transfer = KVTransfer(load, self.save)
        if self.save and request.sampling_params.max_tokens != 1:
            # A prefill instance samples the first token only; the decode instance the rest.
            request.sampling_params = msgspec.structs.replace(request.sampling_params, max_tokens=1)

    def num_external_tokens(self, request: Request) -> int:
        return request.transfer.load_tokens if request.transfer is not None else 0

    def allocated(self, request: Request, num_blocks: int) -> None:
        request.transfer.wait_blocks = num_blocks
        self.num_wait_blocks += num_blocks
        self._loads.append(request)

    def load_ended(self, request: Request) -> None:
        transfer = request.transfer
        if transfer is not None:
            transfer.load_tokens = 0
            self.num_wait_blocks -= transfer.wait_blocks
            transfer.wait_blocks = 0

    def take_loads(self) -> list[Request]:
        out, self._loads = self._loads, []
        return out

    def begin_transfer(self, request: Request) -> None:
        request.transfer.in_flight = True

    def end_transfer(self, request: Request) -> None:
        request.transfer.in_flight = False

    def request_finished(self, request: Request) -> bool:
        transfer = request.transfer
        if transfer is None:
            return False
        self.num_wait_blocks -= transfer.wait_blocks  # it waits for nothing any more
        transfer.wait_blocks = 0
        if transfer.save and finished_normally(request):
            transfer.in_flight = True  # the role writes its blocks to the pool next
        return transfer.in_flight

    def holds(self, request: Request) -> bool:
        return request.transfer is not None and request.transfer.in_flight
