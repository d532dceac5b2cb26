"""The control channel between a PrefillGroup and its rank processes (one pipe per rank).

msgspec Structs, msgpack-encoded as bytes on a multiprocessing Pipe (`send_bytes` /
`recv_bytes`): no pickle. The group sends `Prefill` or `Shutdown`; a rank answers `Ready`
once after start-up, one `Done` per Prefill, and `Failed` (then exits) on any error — a
collective that timed out, a peer that vanished, a bug. KV and logits never travel here:
they go through shared-memory tensors the group hands each rank at spawn.
"""

from __future__ import annotations

import msgspec


class RankSpec(msgspec.Struct, array_like=True, frozen=True):
    """Everything a rank process needs to start; built by the group, one per rank."""

    rank: int
    sp: int
    pp: int
    layer_bounds: list[int]  # LayerMap.bounds
    model_dir: str
    max_tokens: int
    dtype: str  # "float32" | "bfloat16" | "float16"
    device: str  # "cpu" | "cuda"
    threads: int  # torch intra-op threads of this rank
    store_addr: str
    store_port: int
    collective_timeout_s: float
    gloo_ifname: str  # "" = gloo's default; the loopback interface when the group is local
    quantization: str  # the instance runner's effective model.quantization: none | auto | int8 | int4


class Prefill(msgspec.Struct, array_like=True, frozen=True, tag=True):
    """Prefill these tokens (one prompt) on every rank."""

    seq: int  # the group's prefill counter: a Done for another seq is stale
    token_ids: list[int]
    sync: str  # "all_gather" | "ring"


class Shutdown(msgspec.Struct, array_like=True, frozen=True, tag=True):
    """Leave the group and exit."""


class Ready(msgspec.Struct, array_like=True, frozen=True, tag=True):
    """A rank joined the group and loaded its stage."""

    rank: int
    pid: int
    stage: int
    sp_rank: int
    first_layer: int
    end_layer: int
    weight_bytes: int  # weight bytes this rank holds, float or quantized (tied weights once)
    holds_embedding: bool
    holds_head: bool


class RankStats(msgspec.Struct, array_like=True, frozen=True):
    """Where one rank's prefill time went. Waits include peers' skew: they are not pure transfer."""

    rank: int
    wall_s: float  # the whole prefill on this rank
    compute_s: float  # wall_s minus every wait below
    sync_s: float  # inside the per-layer KV exchange (all_gather or ring), all layers
    sync_bytes: int  # KV bytes this rank received in the exchange
    p2p_s: float  # waiting on pipeline sends/receives of hidden states (bubble + transfer)
    p2p_bytes: int  # hidden-state bytes this rank received
    export_s: float  # copying its layers' KV into the group's shared output
    layer_sync_s: list[float]  # sync_s per local layer, summed over rounds


class Done(msgspec.Struct, array_like=True, frozen=True, tag=True):
    """A rank finished one prefill."""

    rank: int
    seq: int
    first_token: int  # greedy; -1 on every rank but the head (rank 0)
    stats: RankStats


class Failed(msgspec.Struct, array_like=True, frozen=True, tag=True):
    """A rank failed: the group is down."""

    rank: int
    reason: str


ToRank = Prefill | Shutdown
FromRank = Ready | Done | Failed

to_rank_encoder = msgspec.msgpack.Encoder()
to_rank_decoder = msgspec.msgpack.Decoder(ToRank)
from_rank_encoder = msgspec.msgpack.Encoder()
from_rank_decoder = msgspec.msgpack.Decoder(FromRank)
