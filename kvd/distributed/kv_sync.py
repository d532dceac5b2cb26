"""Per-layer KV exchange across a sequence-parallel group: all_gather or ring.

Contract: in round r every rank of the sequence group computes K/V `(chunk, KVH, D)` for its
own chunk of a layer; `exchange(layer, k, v)` appends the KV of all `sp` chunks, in rank
order, to that layer of the rank's ContiguousKVBuffer and returns views of the layer's
filled part `(C, KVH, D)`, C = every token exchanged so far. It is called once per layer,
inside that layer's attention, by every rank of the group in the same order — never for all
layers at once, so no rank holds a collective open while waiting on another layer.

The collectives write straight into the buffer's reserved slots (`reserve`): no clone of the
buffer per sync; the only copy is the local chunk's layout change (heads-first to
tokens-first). Chunks are equal-sized (ChunkPlan pads the last round), which gloo's
all_gather requires.

- `all_gather`: one all_gather_into_tensor for K and one for V, issued together.
- `ring`: sp - 1 steps; in step s rank i sends slot (i - s) to rank i + 1 and receives slot
  (i - s - 1) from rank i - 1, K and V in flight together. Bandwidth-optimal with no
  all-to-all connection; the latency of sp - 1 steps.
- `local` (sp == 1): an append, no communication.

Every collective runs under the process group's timeout, so a dead or stuck peer raises
RuntimeError here instead of hanging.
"""

from __future__ import annotations

from time import perf_counter

import torch
import torch.distributed as dist

from kvd.cache.contiguous import ContiguousKVBuffer
from kvd.config import SYNC_STRATEGIES

_K_TAG, _V_TAG = 0, 1


class KVSync:
    """Appends one layer's round of KV from every sequence rank; times and counts it."""

    def __init__(self, buffer: ContiguousKVBuffer, group: dist.ProcessGroup | None, ranks: list[int],
                 sp_rank: int) -> None:  # fmt: skip
        self.buffer = buffer
        self.group = group
        self.ranks = ranks  # global ranks of the sequence group, in sequence order
        self.sp_rank = sp_rank
        self.layer_s = [0.0] * buffer.num_layers
        self.bytes_received = 0

    @property
    def sp(self) -> int:
        return len(self.ranks)

    @property
    def layer_s_total(self) -> float:
        return sum(self.layer_s)

    def exchange(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """k, v: (chunk, KVH, D), this rank's chunk. Returns the layer's K, V so far: (C, KVH, D)."""
        t0 = perf_counter()
        self._exchange(layer, k, v)
        self.layer_s[layer] += perf_counter() - t0
        self.bytes_received += (self.sp - 1) * 2 * k.numel() * k.element_size()
        return self.buffer.get_data(layer)

    def _exchange(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        raise NotImplementedError


class LocalSync(KVSync):
    """No sequence group (sp = 1): the chunk's KV goes straight into the buffer."""

    def _exchange(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        self.buffer.cat(layer, k, v)


class AllGatherSync(KVSync):
    """Every rank's chunk KV gathered at once, in place into the buffer."""

    def _exchange(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        keys, values = self.buffer.reserve(layer, self.sp * k.shape[0])  # (sp*chunk, KVH, D), in place
        works = [
            dist.all_gather_single(keys, k.contiguous(), group=self.group, async_op=True),
            dist.all_gather_single(values, v.contiguous(), group=self.group, async_op=True),
        ]
        for w in works:
            w.wait()


class RingSync(KVSync):
    """Chunk KV passed around the sequence ranks in sp - 1 neighbour exchanges."""

    def _exchange(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> None:
        n, sp, i = k.shape[0], self.sp, self.sp_rank
        keys, values = self.buffer.reserve(layer, sp * n)  # (sp*chunk, KVH, D), in place
        keys[i * n : (i + 1) * n].copy_(k)
        values[i * n : (i + 1) * n].copy_(v)
        nxt, prv = self.ranks[(i + 1) % sp], self.ranks[(i - 1) % sp]
        for step in range(sp - 1):
            send, recv = (i - step) % sp, (i - step - 1) % sp
            ops = [
                dist.P2POp(dist.isend, keys[send * n : (send + 1) * n], nxt, self.group, _K_TAG),
                dist.P2POp(dist.isend, values[send * n : (send + 1) * n], nxt, self.group, _V_TAG),
                dist.P2POp(dist.irecv, keys[recv * n : (recv + 1) * n], prv, self.group, _K_TAG),
                dist.P2POp(dist.irecv, values[recv * n : (recv + 1) * n], prv, self.group, _V_TAG),
            ]
            for w in dist.batch_isend_irecv(ops):
                w.wait()


def make_sync(strategy: str, buffer: ContiguousKVBuffer, group: dist.ProcessGroup | None, ranks: list[int],
              sp_rank: int) -> KVSync:  # fmt: skip
    if len(ranks) == 1:
        return LocalSync(buffer, group, ranks, sp_rank)
    if strategy == "all_gather":
        return AllGatherSync(buffer, group, ranks, sp_rank)
    if strategy == "ring":
        return RingSync(buffer, group, ranks, sp_rank)
    raise ValueError(f"prefill.parallel.sync: expected one of {'|'.join(SYNC_STRATEGIES)}, got {strategy!r}")
