"""Configuration: frozen msgspec Structs, validated once at start-up and passed explicitly.

Sections mirror conf/*.toml: `[daemon]`, `[model]`, `[cache]`, `[scheduler]`, `[log]`,
`[metrics]`, `[http]`, `[kv_events]`, `[pd]`, `[prefill]`, `[route]` (read by `kvd route`
only), gathered in `KvdConfig`. `EngineConfig` (model, cache, scheduler) is what the offline
`LLM` and the engine take; `KvdConfig.engine` derives it.

`load_config` is the one place that reads a file and the environment. Layers,
later wins: the struct defaults < the TOML file < `KVD_<SECTION>_<KEY>`
environment variables < `overrides` (dotted keys from CLI flags). Components
never read the environment; only `load_config` and `default_cache_dir` do.

Environment rule: `KVD_CACHE_NUM_BLOCKS=64` sets `cache.num_blocks`. The
section is the first word after `KVD_` (or a section named with an underscore,
`KVD_KV_EVENTS_PORT`), the key the rest, both lowercased. The
value is parsed as a TOML value (`64`, `1.5`, `true`, `"x"`, `[1, 2]`) when it
parses, else taken as a plain string (`KVD_DAEMON_ON_WORKER_DEATH=exit`); a
string field keeps the raw text even when it would parse as a number. TOML
has no null, so a variable cannot reset a field to None. `KVD_CACHE_DIR` is
not a config key: it is the model cache directory read by
`kvd.worker.models.default_cache_dir` and is skipped. Any other `KVD_*`
variable that names no config key is an error, so a typo never goes unnoticed.

Every error is a `ConfigError` (a ValueError) whose message starts with the
key (`cache.num_blocks: must be >= 1, got 0`) and says where the value came
from when it was not a default (`(from KVD_CACHE_NUM_BLOCKS)`).
"""

from __future__ import annotations

import os
import re
import tomllib
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import msgspec

from kvd.cache.hashing import HASH_ALGOS

ROLES = ("unified", "prefill", "decode")
LOG_LEVELS = ("debug", "info", "warning", "error", "critical")

class _Section(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """A config table: frozen, keyword-only, unknown keys rejected."""


class ModelConfig(_Section):
    """`[model]`: which checkpoint, its dtype and device, context length, threads."""

    model: str | None = None  # None: the embedded SmolLM2-135M-Instruct; else a local HF checkpoint dir
    dtype: str = "auto"  # auto: bfloat16 on CUDA and on CPUs with AVX512-BF16 or AMX, else float32
    device: str = "auto"  # auto: cuda if available, else cpu
    max_model_len: int | None = None  # None: the model's max_position_embeddings
    cache_dir: str | None = None  # None: $KVD_CACHE_DIR or ~/.cache/kvd
    threads: int = 0  # CPU threads of the model's ops; 0: torch's default (every core)
    implementation: str = "auto"  # auto: kvd's CPU decoder where it applies, else transformers'; kvd | transformers
    quantization: str = "none"  # none | auto (a GGUF model's own Q4_0/Q4_1/Q8_0 blocks) | int8 | int4 (CPU decoder)
    huge_pages: bool = True  # weights and KV cache in transparent huge pages where the kernel allows (CPU)

    def __post_init__(self) -> None:
        if self.quantization not in ("auto", "none", "int8", "int4"):
            raise ValueError(f"model.quantization: expected auto|none|int8|int4, got {self.quantization!r}")
        if self.implementation not in ("auto", "kvd", "transformers"):
            raise ValueError(f"model.implementation: expected auto|kvd|transformers, got {self.implementation!r}")
        if self.threads < 0:
            raise ValueError(f"model.threads: must be >= 0, got {self.threads}")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ValueError(f"model.dtype: expected auto|float32|bfloat16|float16, got {self.dtype!r}")
        if self.max_model_len is not None and self.max_model_len < 1:
            raise ValueError(f"model.max_model_len: must be >= 1, got {self.max_model_len}")


class CacheConfig(_Section):
    """`[cache]`: KV block size and count, prefix caching, preemption mode, swap space."""

    block_size: int = 16
    num_blocks: int | None = None  # None: sized from memory_gb
    memory_gb: float = 1.0  # KV cache budget when num_blocks is None
    enable_prefix_caching: bool = True
    hash_algo: str = "xxh3_128"
    preempt: str = "recompute"  # recompute | swap: a preempted request's KV goes to host memory and back
    swap_space_gb: float = 1.0  # the host swap pool when preempt = "swap"

    def __post_init__(self) -> None:
        if self.preempt not in ("recompute", "swap"):
            raise ValueError(f"cache.preempt: expected recompute|swap, got {self.preempt!r}")
        if not self.swap_space_gb > 0:
            raise ValueError(f"cache.swap_space_gb: must be > 0, got {self.swap_space_gb}")
        if not 1 <= self.block_size <= 1024:
            raise ValueError(f"cache.block_size: must be in [1, 1024], got {self.block_size}")
        if self.num_blocks is not None and self.num_blocks < 1:
            raise ValueError(f"cache.num_blocks: must be >= 1, got {self.num_blocks}")
        if not self.memory_gb > 0:
            raise ValueError(f"cache.memory_gb: must be > 0, got {self.memory_gb}")
        if self.hash_algo not in HASH_ALGOS:
            raise ValueError(f"cache.hash_algo: expected one of {HASH_ALGOS}, got {self.hash_algo!r}")


class SchedulerConfig(_Section):
    """`[scheduler]`: the per-step limits (sequences, batched tokens)."""

    max_num_seqs: int = 64
    max_num_batched_tokens: int = 1024

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1:
            raise ValueError(f"scheduler.max_num_seqs: must be >= 1, got {self.max_num_seqs}")
        if self.max_num_batched_tokens < 1:
            raise ValueError(f"scheduler.max_num_batched_tokens: must be >= 1, got {self.max_num_batched_tokens}")


class EngineConfig(_Section):
    """What the engine and the offline LLM take: the model, cache and scheduler sections."""

    model: ModelConfig = ModelConfig()
    cache: CacheConfig = CacheConfig()
    scheduler: SchedulerConfig = SchedulerConfig()


def _check_seconds(key: str, value: float, *, allow_zero: bool = False) -> None:
    ok = value >= 0 if allow_zero else value > 0
    if not (ok and value < float("inf")):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{key}: must be finite and {bound}, got {value}")


class DaemonConfig(_Section):
    """The daemon process: role, endpoint, lifecycle and overload limits."""

    role: str = "unified"  # unified | prefill | decode
    host: str = "127.0.0.1"  # the client endpoint binds here; loopback only by default
    port: int = 0  # 0: a random free port, published in <run_dir>/endpoint
    run_dir: str = ""  # "": <cache_dir>/run, see resolve_run_dir
    drain_timeout_s: float = 30.0  # on SIGTERM, in-flight requests get this long to finish
    on_worker_death: str = "restart"  # restart | exit
    max_worker_restarts: int = 3  # restarts before the daemon gives up and exits
    max_queue: int = 1024  # waiting requests beyond this are refused with 429
    request_timeout_s: float = 600.0  # a request's overall deadline; past it: 504
    heartbeat_interval_s: float = 1.0  # child liveness pings and systemd watchdog cadence
    integrity_check_interval_s: float = 5.0  # block-pool check_integrity() while idle
    max_frame_bytes: int = 16 * 2**20  # larger ZeroMQ frames are refused

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"daemon.role: expected one of {'|'.join(ROLES)}, got {self.role!r}")
        if not self.host:
            raise ValueError("daemon.host: must not be empty")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"daemon.port: must be in [0, 65535], got {self.port}")
        _check_seconds("daemon.drain_timeout_s", self.drain_timeout_s, allow_zero=True)
        if self.on_worker_death not in ("restart", "exit"):
            raise ValueError(f"daemon.on_worker_death: expected restart|exit, got {self.on_worker_death!r}")
        if self.max_worker_restarts < 0:
            raise ValueError(f"daemon.max_worker_restarts: must be >= 0, got {self.max_worker_restarts}")
        if self.max_queue < 1:
            raise ValueError(f"daemon.max_queue: must be >= 1, got {self.max_queue}")
        _check_seconds("daemon.request_timeout_s", self.request_timeout_s)
        _check_seconds("daemon.heartbeat_interval_s", self.heartbeat_interval_s)
        _check_seconds("daemon.integrity_check_interval_s", self.integrity_check_interval_s)
        if self.max_frame_bytes < 1024:
            raise ValueError(f"daemon.max_frame_bytes: must be >= 1024, got {self.max_frame_bytes}")


class LogConfig(_Section):
    """structlog output: level, renderer, and an optional extra JSON-lines file."""

    level: str = "info"  # debug | info | warning | error | critical
    format: str = "auto"  # auto: console on a terminal, JSON lines otherwise | json | console
    file: str = ""  # "": none; else every line is also appended to this file as JSON

    def __post_init__(self) -> None:
        if self.level not in LOG_LEVELS:
            raise ValueError(f"log.level: expected one of {'|'.join(LOG_LEVELS)}, got {self.level!r}")
        if self.format not in ("auto", "json", "console"):
            raise ValueError(f"log.format: expected auto|json|console, got {self.format!r}")


class MetricsConfig(_Section):
    """The Prometheus exporter."""

    prometheus_port: int = -1  # -1: off; 0: a random free port
    host: str = "127.0.0.1"

    def __post_init__(self) -> None:
        if not -1 <= self.prometheus_port <= 65535:
            raise ValueError(f"metrics.prometheus_port: must be -1 (off) or in [0, 65535], got {self.prometheus_port}")
        if not self.host:
            raise ValueError("metrics.host: must not be empty")


class HttpConfig(_Section):
    """`[http]`: the OpenAI-compatible HTTP API (off unless a port is set)."""

    port: int = -1  # -1: off; 0: a random free port, published in <run_dir>/http_endpoint
    host: str = "127.0.0.1"
    api_key: str = ""  # "": no auth; else every /v1 request needs `Authorization: Bearer <api_key>`
    max_body_bytes: int = 4 * 2**20  # larger request bodies are refused with 413
    served_model_name: str = ""  # "": the model directory's name (the embedded model's: SmolLM2-135M-Instruct)
    tool_call_parser: str = "hermes"  # how tool_choice "auto" finds calls in the output: hermes | json | "" (off)

    def __post_init__(self) -> None:
        if self.tool_call_parser not in ("hermes", "json", ""):
            raise ValueError(f"http.tool_call_parser: expected hermes, json or '' (off), got {self.tool_call_parser!r}")
        if not -1 <= self.port <= 65535:
            raise ValueError(f"http.port: must be -1 (off) or in [0, 65535], got {self.port}")
        if not self.host:
            raise ValueError("http.host: must not be empty")
        if self.max_body_bytes < 1024:
            raise ValueError(f"http.max_body_bytes: must be >= 1024, got {self.max_body_bytes}")

    @property
    def enabled(self) -> bool:
        return self.port >= 0


class KVEventsConfig(_Section):
    """`[kv_events]`: the instance's KV events for a router (off unless a port is set;
    docs/architecture.md, "KV events")."""

    port: int = -1  # -1: off; 0: a random free port, published in <run_dir>/kv_events_endpoint
    host: str = "127.0.0.1"
    snapshot_port: int = 0  # the snapshot socket; 0: a random free port, in <run_dir>/kv_snapshot_endpoint
    instance_id: str = ""  # the name batches carry; "": <hostname>:<pid>
    max_batch_events: int = 1024  # more pending events go out as several batches
    flush_interval_ms: float = 0.0  # 0: a batch after every step; else at most one batch per interval
    send_hwm: int = 10000  # batches queued for one subscriber; past it that subscriber loses batches

    def __post_init__(self) -> None:
        if not -1 <= self.port <= 65535:
            raise ValueError(f"kv_events.port: must be -1 (off) or in [0, 65535], got {self.port}")
        if not 0 <= self.snapshot_port <= 65535:
            raise ValueError(f"kv_events.snapshot_port: must be in [0, 65535], got {self.snapshot_port}")
        if self.port > 0 and self.port == self.snapshot_port:
            raise ValueError(f"kv_events.snapshot_port: must differ from kv_events.port ({self.port})")
        if not self.host:
            raise ValueError("kv_events.host: must not be empty")
        if self.max_batch_events < 1:
            raise ValueError(f"kv_events.max_batch_events: must be >= 1, got {self.max_batch_events}")
        _check_seconds("kv_events.flush_interval_ms", self.flush_interval_ms, allow_zero=True)
        if self.send_hwm < 1:
            raise ValueError(f"kv_events.send_hwm: must be >= 1, got {self.send_hwm}")

    @property
    def enabled(self) -> bool:
        return self.port >= 0


SYNC_STRATEGIES = ("all_gather", "ring")


class ParallelConfig(_Section):
    """`[prefill.parallel]`: the shape of the prefill group and its rendezvous."""

    sp: int = 1  # sequence-parallel ranks per stage
    pp: int = 1  # pipeline stages
    sync: str = "all_gather"  # per-layer KV exchange: all_gather | ring
    collective_timeout_s: float = 60.0  # every collective and point-to-point wait
    master_addr: str = "127.0.0.1"  # the group's TCPStore binds here
    master_port: int = 0  # 0: a free port

    def __post_init__(self) -> None:
        for name in ("sp", "pp"):
            if getattr(self, name) < 1:
                raise ValueError(f"prefill.parallel.{name}: must be >= 1, got {getattr(self, name)}")
        if self.sync not in SYNC_STRATEGIES:
            raise ValueError(f"prefill.parallel.sync: expected {'|'.join(SYNC_STRATEGIES)}, got {self.sync!r}")
        if not 0 < self.collective_timeout_s < float("inf"):
            raise ValueError(
                f"prefill.parallel.collective_timeout_s: must be finite and > 0, got {self.collective_timeout_s}"
            )
        if not self.master_addr:
            raise ValueError("prefill.parallel.master_addr: must not be empty")
        if not 0 <= self.master_port <= 65535:
            raise ValueError(f"prefill.parallel.master_port: must be in [0, 65535], got {self.master_port}")

    @property
    def world_size(self) -> int:
        return self.sp * self.pp


class PrefillConfig(_Section):
    """`[prefill]`: how this instance prefills long prompts on a distributed group
    (docs/architecture.md, "Distributed prefill group")."""

    parallel: ParallelConfig = ParallelConfig()
    group_min_tokens: int = 256  # with sp x pp > 1: prompts this long prefill on the group, whole

    def __post_init__(self) -> None:
        if self.group_min_tokens < 1:
            raise ValueError(f"prefill.group_min_tokens: must be >= 1, got {self.group_min_tokens}")

    @property
    def group(self) -> bool:
        return self.parallel.world_size > 1


POOLS = ("local", "mooncake", "redis")


class PDConfig(_Section):
    """Prefill/decode disaggregation: the KV storage pool, the link between instances, the
    handoff's deadline and what a failed handoff does. Only read by prefill and decode roles."""

    pool: str = "local"  # local | mooncake | redis
    local_path: str = ""  # the LMDB directory of the local pool; "": /dev/shm/kvd-<uid>/pool
    local_capacity_gb: float = 4.0  # the local pool evicts its oldest objects beyond this
    redis_url: str = ""  # redis://127.0.0.1:6379/0 for pool = "redis"
    mooncake_master: str = ""  # host:port of mooncake_master for pool = "mooncake"
    mooncake_metadata: str = "P2PHANDSHAKE"  # Mooncake metadata server spec
    mooncake_segment_gb: float = 1.0  # memory this instance contributes to the Mooncake pool
    partial_ttl_s: float = 600.0  # a one-shot partial-block object leaves the pool this long after its write
    host: str = "127.0.0.1"  # prefill: where decode instances connect (written to <run_dir>/pd_endpoint)
    port: int = 0  # prefill: 0 picks a random free port
    prefill_endpoints: list[str] = []  # decode: the prefill instances' pd endpoints
    secret: str = ""  # shared by a deployment's instances: the link is CURVE-encrypted and admits only holders
    lease_s: float = 60.0  # a handoff (prefill, write, read) must end within this; past it: 504
    transfer_grace_s: float = 2.0  # after a lease expires, blocks of a silent transfer return this much later
    on_kv_failure: str = "fail"  # fail: the client gets 502/504 | recompute: decode prefills the prompt itself
    prefix_from_pool: bool = False  # prefill: read a prompt's leading full blocks from the pool when present
    heartbeat_timeout_s: float = 5.0  # decode: a prefill instance silent this long is dead
    kv_wait_fraction: float = 0.5  # share of KV blocks that requests waiting for pool KV may hold
    transfer_batch_blocks: int = 32  # blocks per pool call (and the messenger's staging size)
    fault_read_delay_s: float = 0.0  # testing only: the messenger waits this long before each read
    fault_write_delay_s: float = 0.0  # testing only: ... and before each write (a slow pool)

    def __post_init__(self) -> None:
        if self.pool not in POOLS:
            raise ValueError(f"pd.pool: expected one of {'|'.join(POOLS)}, got {self.pool!r}")
        if not self.local_capacity_gb > 0:
            raise ValueError(f"pd.local_capacity_gb: must be > 0, got {self.local_capacity_gb}")
        if not self.partial_ttl_s >= 1:
            raise ValueError(f"pd.partial_ttl_s: must be >= 1, got {self.partial_ttl_s}")
        if not self.mooncake_segment_gb > 0:
            raise ValueError(f"pd.mooncake_segment_gb: must be > 0, got {self.mooncake_segment_gb}")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"pd.port: must be in [0, 65535], got {self.port}")
        _check_seconds("pd.lease_s", self.lease_s)
        if not self.partial_ttl_s > self.lease_s:  # decode reads a handoff's partial block within its lease
            raise ValueError(f"pd.partial_ttl_s: must exceed pd.lease_s ({self.lease_s}), got {self.partial_ttl_s}")
        _check_seconds("pd.transfer_grace_s", self.transfer_grace_s, allow_zero=True)
        _check_seconds("pd.heartbeat_timeout_s", self.heartbeat_timeout_s)
        if self.on_kv_failure not in ("fail", "recompute"):
            raise ValueError(f"pd.on_kv_failure: expected fail|recompute, got {self.on_kv_failure!r}")
        if not 0 < self.kv_wait_fraction <= 1:
            raise ValueError(f"pd.kv_wait_fraction: must be in (0, 1], got {self.kv_wait_fraction}")
        _check_seconds("pd.fault_read_delay_s", self.fault_read_delay_s, allow_zero=True)
        _check_seconds("pd.fault_write_delay_s", self.fault_write_delay_s, allow_zero=True)
        if not 1 <= self.transfer_batch_blocks <= 4096:
            raise ValueError(f"pd.transfer_batch_blocks: must be in [1, 4096], got {self.transfer_batch_blocks}")


ROUTE_POLICIES = ("kv", "round_robin", "least_loaded")


class RouteInstance(_Section):
    """One instance behind `kvd route`: its run directory (where it writes `endpoint`,
    `http_endpoint`, `kv_events_endpoint` and `kv_snapshot_endpoint`) or those endpoints themselves."""

    name: str = ""  # "": "i<index>"; the X-Kvd-Instance header and the metrics' label
    run_dir: str = ""  # read for whichever endpoints below are "" (at start, and until they appear)
    url: str = ""  # its HTTP base URL, http://127.0.0.1:PORT
    endpoint: str = ""  # its ZeroMQ client endpoint, tcp://127.0.0.1:PORT ("" and no run_dir: HTTP only)
    events: str = ""  # its KV-event PUB endpoint ("" and no run_dir: no KV events, never a prefix hit)
    snapshot: str = ""  # its snapshot endpoint


class RouteConfig(_Section):
    """`[route]`: `kvd route`, the OpenAI HTTP API in front of several instances, routing each
    request where its prompt's KV blocks are (docs/architecture.md, "The router"). It serves on
    `[http]` host and port, tokenizes with `[model]`'s tokenizer, follows KV events with
    `pd.secret`; the instances' own sections are not read."""

    instances: list[RouteInstance] = []
    policy: str = "kv"  # kv | round_robin | least_loaded
    load_weight: float = 4.0  # kv: one request in flight on an instance costs as much as this many prefix blocks
    connect_timeout_s: float = 2.0  # a connection not made in this time: the instance is down, the next one tried
    request_timeout_s: float = 600.0  # a forwarded request's whole answer; past it the client gets 504
    retry_interval_s: float = 1.0  # a down instance's /health is probed after this, doubling up to 30 s

    def __post_init__(self) -> None:
        if self.policy not in ROUTE_POLICIES:
            raise ValueError(f"route.policy: expected {'|'.join(ROUTE_POLICIES)}, got {self.policy!r}")
        if not 0 <= self.load_weight < float("inf"):
            raise ValueError(f"route.load_weight: must be finite and >= 0, got {self.load_weight}")
        _check_seconds("route.connect_timeout_s", self.connect_timeout_s)
        _check_seconds("route.request_timeout_s", self.request_timeout_s)
        _check_seconds("route.retry_interval_s", self.retry_interval_s)
        for i, inst in enumerate(self.instances):
            if not inst.run_dir and not inst.url:
                raise ValueError(f"route.instances: [{i}] needs run_dir or url")
            if bool(inst.events) != bool(inst.snapshot):
                raise ValueError(f"route.instances: [{i}] needs both events and snapshot, or neither")
        names = self.names
        if len(set(names)) != len(names):
            raise ValueError(f"route.instances: names must differ, got {names}")

    @property
    def names(self) -> list[str]:
        return [inst.name or f"i{i}" for i, inst in enumerate(self.instances)]


class KvdConfig(_Section):
    """Everything a kvd instance is configured with; one per process tree."""

    daemon: DaemonConfig = DaemonConfig()
    model: ModelConfig = ModelConfig()
    cache: CacheConfig = CacheConfig()
    scheduler: SchedulerConfig = SchedulerConfig()
    log: LogConfig = LogConfig()
    metrics: MetricsConfig = MetricsConfig()
    http: HttpConfig = HttpConfig()
    kv_events: KVEventsConfig = KVEventsConfig()
    pd: PDConfig = PDConfig()
    prefill: PrefillConfig = PrefillConfig()
    route: RouteConfig = RouteConfig()

    def __post_init__(self) -> None:
        if self.daemon.role == "decode" and not self.pd.prefill_endpoints and self.pd.on_kv_failure == "fail":
            raise ValueError("pd.prefill_endpoints: a decode instance needs at least one prefill endpoint")
        if self.pd.pool == "redis" and self.daemon.role != "unified" and not self.pd.redis_url:
            raise ValueError("pd.redis_url: pool = \"redis\" needs the server's URL")
        if self.pd.pool == "mooncake" and self.daemon.role != "unified" and not self.pd.mooncake_master:
            raise ValueError("pd.mooncake_master: pool = \"mooncake\" needs the master's host:port")

    @property
    def engine(self) -> EngineConfig:
        return EngineConfig(model=self.model, cache=self.cache, scheduler=self.scheduler)


class ConfigError(ValueError):
    """A config value, key or section is invalid; the message starts with the key."""


_SECTIONS: dict[str, type[_Section]] = {
    name: typing.get_type_hints(KvdConfig)[name] for name in KvdConfig.__struct_fields__
}
_ENV_PREFIX = "KVD_"
_ENV_IGNORED = frozenset({"KVD_CACHE_DIR"})  # the model cache dir, read by kvd.worker.models


def load_config(
    path: str | os.PathLike[str] | None = None,
    overrides: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
) -> KvdConfig:
    """Build the config: defaults < TOML file at `path` < `KVD_*` in `environ`
    (default `os.environ`) < `overrides` (`{"daemon.port": 0}`; a None value
    means "flag not given" and is skipped). Raises ConfigError naming the key."""
    data: dict[str, dict[str, Any]] = {}
    origin: dict[str, str] = {}  # "section.key" -> where its value came from

    if path is not None:
        try:
            with open(path, "rb") as f:
                raw = tomllib.load(f)
        except (OSError, tomllib.TOMLDecodeError) as e:
            raise ConfigError(f"{path}: {e}") from e
        for section, table in raw.items():
            if not isinstance(table, dict):
                raise ConfigError(f"{section}: expected a [{section}] table, got {type(table).__name__} (in {path})")
            for key, value in table.items():
                _set(data, origin, section, key, value, f"in {path}", f"{section}.{key}")

    env = os.environ if environ is None else environ
    for name in sorted(env):
        if not name.startswith(_ENV_PREFIX) or name in _ENV_IGNORED:
            continue
        rest = name[len(_ENV_PREFIX) :].lower()
        # A section whose name has an underscore (kv_events) is matched whole, before the first word.
        section = next((s for s in _SECTIONS if "_" in s and rest.startswith(s + "_")), rest.partition("_")[0])
        key = rest[len(section) + 1 :]
        nested = _nested_table(section, key)
        if nested is not None:  # KVD_PREFILL_PARALLEL_SP -> [prefill.parallel] sp
            field, table_type = nested
            sub = key.removeprefix(field + "_")
            dotted = f"{section}.{field}.{sub}"
            if sub not in table_type.__struct_fields__:
                raise ConfigError(f"{name}: unknown key {dotted} "
                                  f"([{section}.{field}] keys: {', '.join(table_type.__struct_fields__)})")  # fmt: skip
            text = env[name]
            data.setdefault(section, {}).setdefault(field, {})[sub] = (
                text if _accepts_str(table_type, sub) else _env_value("", "", text))
            origin[dotted] = f"from {name}"
            continue
        value = _env_value(section, key, env[name])
        _set(data, origin, section, key, value, f"from {name}", name)

    for dotted, value in (overrides or {}).items():
        if value is None:
            continue
        section, _, key = dotted.partition(".")
        _set(data, origin, section, key, value, "from override", dotted)

    try:
        return msgspec.convert(data, KvdConfig)
    except msgspec.ValidationError as e:
        raise ConfigError(_explain(str(e), origin)) from None


def resolve_run_dir(cfg: KvdConfig) -> Path:
    """`daemon.run_dir`, or `<cache_dir>/run` when it is empty (cache_dir:
    `model.cache_dir`, else $KVD_CACHE_DIR, else ~/.cache/kvd)."""
    if cfg.daemon.run_dir:
        return Path(cfg.daemon.run_dir).expanduser()
    if cfg.model.cache_dir:
        return Path(cfg.model.cache_dir).expanduser() / "run"
    from kvd.worker.models import (
        default_cache_dir,  # lazy: config sits below the worker layer
    )

    return default_cache_dir() / "run"


def _set(
    data: dict[str, dict[str, Any]], origin: dict[str, str], section: str, key: str, value: Any, where: str, name: str
) -> None:
    """Put one value into the layered dict, after checking the key exists."""
    owner = _SECTIONS.get(section)
    if owner is None:
        sections = ", ".join(_SECTIONS)
        if name.startswith(_ENV_PREFIX):
            raise ConfigError(f"{name}: unknown section {section!r} (sections: {sections})")
        if not key:
            raise ConfigError(f"{name}: expected section.key ({where})")
        raise ConfigError(f"{section}: unknown section ({where}; sections: {sections})")
    if key not in owner.__struct_fields__:
        dotted = f"{section}.{key}"
        known = ", ".join(owner.__struct_fields__)
        if name == dotted:
            raise ConfigError(f"{dotted}: unknown key ({where}; [{section}] keys: {known})")
        raise ConfigError(f"{name}: unknown key {dotted} ([{section}] keys: {known})")
    data.setdefault(section, {})[key] = value
    origin[f"{section}.{key}"] = where


def _env_value(section: str, key: str, text: str) -> Any:
    """A TOML value when `text` parses as one, else the text; string fields keep the text."""
    owner = _SECTIONS.get(section)
    if owner is not None and key in owner.__struct_fields__ and _accepts_str(owner, key):
        return text
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def _nested_table(section: str, key: str) -> tuple[str, type] | None:
    """(field, its Struct type) when `key` names a key of a nested table of `section`."""
    owner = _SECTIONS.get(section)
    if owner is None:
        return None
    for field, hint in typing.get_type_hints(owner).items():
        if isinstance(hint, type) and issubclass(hint, msgspec.Struct) and key.startswith(field + "_"):
            return field, hint
    return None


def _accepts_str(owner: type, key: str) -> bool:
    hint = typing.get_type_hints(owner)[key]
    union = typing.get_origin(hint) in (typing.Union, types.UnionType)  # str | None, not list[str]
    return hint is str or (union and str in typing.get_args(hint))


_AT = re.compile(r"^(?P<msg>.*) - at `\$(?P<path>[^`]*)`$", re.S)


def _explain(message: str, origin: Mapping[str, str]) -> str:
    """msgspec's `<msg> - at `$.cache.num_blocks`` -> `cache.num_blocks: <msg> (from ...)`.
    (Unknown keys never get here: `_set` refuses them first.)"""
    m = _AT.match(message)
    msg, path = (m["msg"], m["path"].lstrip(".")) if m else (message, "")
    head, sep, rest = msg.partition(": ")
    if sep and re.fullmatch(r"[a-z_]+\.[a-z_]+", head):  # a __post_init__ message already names its key
        path, msg = head, rest
    else:
        msg = msg.replace("`", "")
        msg = msg[:1].lower() + msg[1:]
    where = origin.get(path)
    return f"{path or 'config'}: {msg}" + (f" ({where})" if where else "")
