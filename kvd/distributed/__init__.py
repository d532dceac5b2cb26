"""Distributed prefill: a group of sp x pp rank processes (sequence + pipeline parallel)
that prefills one prompt with per-layer KV sync and hands back the first token's logits
and the prompt's KV, token-identical to one process. See group.py for the contract."""

from kvd.distributed.group import (
           GroupFailed,
           ParallelConfig,
           PrefillGroup,
           PrefillResult,
)
from kvd.distributed.plan import ChunkPlan, LayerMap
from kvd.distributed.to_blocks import write_kv_to_blocks

__all__ = ["ChunkPlan", "GroupFailed", "LayerMap", "ParallelConfig", "PrefillGroup", "PrefillResult",
           "write_kv_to_blocks"]
