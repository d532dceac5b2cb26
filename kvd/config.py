"""Configuration: frozen msgspec Structs, validated once at start-up and passed explicitly.

Sections mirror conf/*.toml. Components never read the environment; only
`load_config` (the daemon's, later) and `default_cache_dir` do.
"""

from __future__ import annotations

import msgspec

from kvd.cache.hashing import HASH_ALGOS


class _Section(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    pass


class ModelConfig(_Section):
    model: str | None = None  # None: the embedded SmolLM2-135M-Instruct; else a local HF checkpoint dir
    dtype: str = "auto"  # auto: float32 on CPU, bfloat16 on CUDA
    device: str = "auto"  # auto: cuda if available, else cpu
    max_model_len: int | None = None  # None: the model's max_position_embeddings
    cache_dir: str | None = None  # None: $KVD_CACHE_DIR or ~/.cache/kvd

    def __post_init__(self) -> None:
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ValueError(f"model.dtype: expected auto|float32|bfloat16|float16, got {self.dtype!r}")
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ValueError(f"model.max_model_len: must be >= 1, got {self.max_model_len}")


class CacheConfig(_Section):
    block_size: int = 16
    num_blocks: int | None = None  # None: sized from memory_gb
    memory_gb: float = 1.0  # KV cache budget when num_blocks is None
    enable_prefix_caching: bool = True
    hash_algo: str = "xxh3_128"

    def __post_init__(self) -> None:
        if not 1 <= self.block_size <= 1024:
            raise ValueError(f"cache.block_size: must be in [1, 1024], got {self.block_size}")
        if self.num_blocks is not None and self.num_blocks < 1:
            raise ValueError(f"cache.num_blocks: must be >= 1, got {self.num_blocks}")
        if not self.memory_gb > 0:
            raise ValueError(f"cache.memory_gb: must be > 0, got {self.memory_gb}")
        if self.hash_algo not in HASH_ALGOS:
            raise ValueError(f"cache.hash_algo: expected one of {HASH_ALGOS}, got {self.hash_algo!r}")


class SchedulerConfig(_Section):
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 1024

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1:
            raise ValueError(f"scheduler.max_num_seqs: must be >= 1, got {self.max_num_seqs}")
        if self.max_num_batched_tokens < 1:
            raise ValueError(f"scheduler.max_num_batched_tokens: must be >= 1, got {self.max_num_batched_tokens}")


class EngineConfig(_Section):
    model: ModelConfig = ModelConfig()
    cache: CacheConfig = CacheConfig()
    scheduler: SchedulerConfig = SchedulerConfig()
