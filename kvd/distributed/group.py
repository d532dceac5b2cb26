"""PrefillGroup: sequence + pipeline parallel prefill over R = sp x pp rank processes.

    config = ParallelConfig(sp=2, pp=2, sync="ring", collective_timeout_s=30)
    with PrefillGroup(model_dir, config, max_tokens=8192) as group:   # spawns and awaits Ready
        result = group.prefill(token_ids)          # PrefillResult: first token, logits, KV, stats
        write_kv_to_blocks(result.kv, runner.kv_caches, block_ids)   # then decode as usual

Contract:
- The owner (a worker) starts R spawn-context processes, each running `rank_main`; rank r
  is pipeline stage r // sp, sequence rank r % sp (LayerMap gives each stage its layers).
  They join one torch.distributed group (gloo on CPU, NCCL on CUDA) through a TCPStore the
  owner hosts on a socket it binds itself (master_addr, port 0 = free; loopback by
  default), so the store outlives any rank and nothing binds another address. Every
  collective carries `collective_timeout_s`.
- `quantization` is the owner's effective `model.quantization` (its decoder's): each rank
  builds its stage from the same weight source (`kvd.distributed.stage.load_stage`), so a
  quantized instance's prompts are prefilled with its quantized weights. CPU only.
- `start` returns once every rank sent Ready; `prefill` sends the prompt to every rank and
  returns when every rank sent Done. KV and logits come back through shared-memory tensors
  the owner allocated; `PrefillResult.kv` is a view of them, valid until the next prefill.
- Failure: a rank that dies (its process sentinel fires), reports Failed (a collective
  timed out, a peer vanished), or misses the deadline makes the call raise GroupFailed —
  never hang. The group is then down for good: every rank is stopped and later calls raise
  GroupFailed at once; the owner builds a new group.
- `close` (or leaving the `with`) stops every rank by its process: Shutdown, then kill
  after a grace period. Ranks are daemonic and exit on EOF of their pipe if the owner dies.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import signal
import socket
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from pathlib import Path
from time import monotonic, perf_counter

import msgspec
import structlog
import torch

from kvd.config import ParallelConfig
from kvd.distributed.kv_sync import SYNC_STRATEGIES
from kvd.distributed.messages import (
    Done,
    Failed,
    Prefill,
    RankSpec,
    RankStats,
    Ready,
    Shutdown,
    from_rank_decoder,
    from_rank_encoder,
    to_rank_decoder,
    to_rank_encoder,
)  # fmt: skip
from kvd.distributed.plan import LayerMap
from kvd.distributed.rank import RankRunner
from kvd.distributed.stage import param_counts
from kvd.worker.models import ensure_float_weights, load_config
from kvd.worker.quant_load import MODES

log = structlog.get_logger(__name__)

_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


class GroupFailed(RuntimeError):
    """A rank died, reported a failure (e.g. a collective timed out) or missed the deadline.
    The group is down; `rank` is the first rank found failing (None: the deadline)."""

    def __init__(self, reason: str, rank: int | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.rank = rank


@dataclass
class PrefillResult:
    """One prompt prefilled by the group: the first token, its logits and the KV."""

    num_tokens: int
    first_token: int  # greedy argmax of `logits`; sample from `logits` for other parameters
    logits: torch.Tensor  # (V,) float32, the last prompt token's (a copy)
    kv: torch.Tensor  # (L, 2, T, KVH, D): a view of the group's shared output, valid until the next prefill
    stats: list[RankStats]  # per rank, in rank order
    wall_s: float  # the owner's view: prompt sent -> every rank done


class PrefillGroup:
    """Owns R rank processes that prefill one prompt at a time; see the module docstring.

    `prefill` blocks its caller until the group is done (or failed); one caller at a time.
    """

    def __init__(self, model_dir: str | Path, config: ParallelConfig, *, max_tokens: int | None = None,
                 dtype: torch.dtype = torch.float32, device: str = "cpu", threads_per_rank: int | None = None,
                 start_timeout_s: float = 300.0, quantization: str = "none") -> None:  # fmt: skip
        if device not in ("cpu", "cuda"):
            raise ValueError(f"device: expected cpu|cuda, got {device!r}")
        if quantization not in MODES:
            raise ValueError(f"model.quantization: expected {'|'.join(MODES)}, got {quantization!r}")
        if quantization != "none" and device != "cpu":
            raise ValueError(f"model.quantization = {quantization}: the prefill group's quantized ranks run on the CPU")
        if device == "cuda" and torch.cuda.device_count() < config.world_size:
            raise ValueError(
                f"prefill.parallel: {config.world_size} ranks need as many GPUs, found {torch.cuda.device_count()}"
            )
        self.model_dir = Path(model_dir)
        self.config = config
        self.quantization = quantization
        ensure_float_weights(self.model_dir)  # the ranks read float tensors (quantized ones from them, or the norms)
        hf = load_config(self.model_dir)
        if not config.pp <= hf.num_hidden_layers:
            raise ValueError(
                f"prefill.parallel.pp: must be <= the model's {hf.num_hidden_layers} layers, got {config.pp}"
            )
        self.layer_map = LayerMap.for_model(hf.num_hidden_layers, config.pp, *param_counts(self.model_dir))
        self.max_tokens = max_tokens or hf.max_position_embeddings
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens: must be >= 1, got {self.max_tokens}")
        self.dtype, self.device = dtype, device
        self.threads = threads_per_rank or max(1, (os.cpu_count() or 1) // config.world_size)
        self.start_timeout_s = start_timeout_s
        head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads
        # Shared with every rank at spawn; torch.empty: pages cost memory only once written.
        self._kv_out = torch.empty(hf.num_hidden_layers, 2, self.max_tokens, hf.num_key_value_heads, head_dim,
                                   dtype=dtype).share_memory_()  # fmt: skip  # (L, 2, max_tokens, KVH, D)
        self.vocab_size = hf.vocab_size
        self._logits_out = torch.empty(hf.vocab_size, dtype=torch.float32).share_memory_()  # (V,)
        self._procs: list[BaseProcess] = []
        self._conns: list[Connection] = []
        self._store = None
        self._seq = 0
        self._down: str | None = None
        self.ranks: list[Ready] = []

    # ---- lifecycle ----------------------------------------------------------------------
    def __enter__(self) -> PrefillGroup:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def start(self) -> None:
        """Host the store, spawn every rank, await their Ready (GroupFailed on death or deadline)."""
        import torch.distributed as dist
        import torch.multiprocessing as mp

        if self._procs or self._down is not None:
            raise RuntimeError("PrefillGroup.start: already started, or closed / failed (build a new group)")
        cfg = self.config
        sock = socket.socket(socket.AF_INET6 if ":" in cfg.master_addr else socket.AF_INET)
        sock.bind((cfg.master_addr, cfg.master_port))
        sock.listen()
        port = sock.getsockname()[1]
        # The store takes the bound socket: no window in which another process takes the port.
        self._store = dist.TCPStore(cfg.master_addr, port, cfg.world_size, is_master=True, wait_for_workers=False,
                                    master_listen_fd=sock.detach(), use_libuv=True,
                                    timeout=datetime.timedelta(seconds=self.start_timeout_s))  # fmt: skip
        ctx = mp.get_context("spawn")
        ifname = _interface_of(cfg.master_addr)
        try:
            for rank in range(cfg.world_size):
                spec = RankSpec(
                    rank, cfg.sp, cfg.pp, self.layer_map.bounds, str(self.model_dir), self.max_tokens,
                    _DTYPE_NAMES[self.dtype], self.device, self.threads, cfg.master_addr, port,
                    cfg.collective_timeout_s, ifname, self.quantization,
                )  # fmt: skip
                ours, theirs = ctx.Pipe(duplex=True)
                args = (msgspec.msgpack.encode(spec), theirs, self._kv_out, self._logits_out)
                proc = ctx.Process(target=rank_main, args=args, name=f"kvd-prefill-rank{rank}", daemon=True)
                proc.start()
                theirs.close()  # ours sees EOF when the rank dies
                self._procs.append(proc)
                self._conns.append(ours)
            ready = self._await(Ready, None, monotonic() + self.start_timeout_s, "start")
        except BaseException:
            self.close()
            raise
        self.ranks = [ready[r] for r in range(cfg.world_size)]
        log.info("prefill_group_ready", sp=cfg.sp, pp=cfg.pp, pids=self.pids, layers=self.layer_map.bounds,
                 quantization=self.quantization,
                 weight_mb=[round(r.weight_bytes / 2**20) for r in self.ranks])  # fmt: skip

    def close(self, grace_s: float = 5.0) -> None:
        """Stop every rank (Shutdown, then kill by process after grace_s); idempotent."""
        for proc, conn in zip(self._procs, self._conns):
            if proc.is_alive():
                try:
                    conn.send_bytes(to_rank_encoder.encode(Shutdown()))
                except OSError:
                    pass
        deadline = monotonic() + grace_s
        for proc in self._procs:
            proc.join(max(0.0, deadline - monotonic()))
        self._kill_all()
        for conn in self._conns:
            conn.close()
        self._procs, self._conns = [], []
        self._store = None
        self._down = self._down or "closed"

    def _kill_all(self) -> None:
        for proc in self._procs:
            if proc.is_alive():
                proc.kill()  # SIGKILL by pid: also ends a stopped or stuck rank
        for proc in self._procs:
            proc.join(5.0)

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self._procs]

    @property
    def alive(self) -> bool:
        return self._down is None and all(p.is_alive() for p in self._procs)

    def check(self) -> None:
        """GroupFailed if the group is down or a rank died while idle (no waiting)."""
        if self._down is not None:
            raise GroupFailed(f"prefill group is down: {self._down}")
        for rank, proc in enumerate(self._procs):
            if not proc.is_alive():
                self._fail(rank, f"rank {rank} (pid {proc.pid}) died: {_exit_reason(proc.exitcode)}")

    # ---- prefill ------------------------------------------------------------------------
    def prefill(self, token_ids: Sequence[int], *, sync: str | None = None,
                timeout_s: float = 600.0) -> PrefillResult:  # fmt: skip
        """Prefill one prompt on the group. `sync` overrides the config's strategy for this call.
        ValueError for a bad prompt; GroupFailed if the group fails or timeout_s passes."""
        token_ids = [int(t) for t in token_ids]
        if not token_ids:
            raise ValueError("token_ids: the prompt is empty")
        if len(token_ids) > self.max_tokens:
            raise ValueError(f"token_ids: {len(token_ids)} tokens exceed the group's max_tokens of {self.max_tokens}")
        if not all(0 <= t < self.vocab_size for t in token_ids):
            raise ValueError(f"token_ids: ids must lie in [0, {self.vocab_size})")  # else a rank fails: group down
        sync = sync or self.config.sync
        if sync not in SYNC_STRATEGIES:
            raise ValueError(f"sync: expected {'|'.join(SYNC_STRATEGIES)}, got {sync!r}")
        self.check()
        self._seq += 1
        t0 = perf_counter()
        msg = to_rank_encoder.encode(Prefill(self._seq, token_ids, sync))
        for rank, conn in enumerate(self._conns):
            try:
                conn.send_bytes(msg)
            except OSError as e:
                self._fail(rank, f"rank {rank}: control pipe broken ({e})")
        done = self._await(Done, self._seq, monotonic() + timeout_s, "prefill")
        wall = perf_counter() - t0
        n = len(token_ids)
        return PrefillResult(
            num_tokens=n, first_token=done[0].first_token, logits=self._logits_out.clone(),
            kv=self._kv_out[:, :, :n], stats=[done[r].stats for r in range(len(done))], wall_s=wall,
        )  # fmt: skip

    def _await(self, kind: type, seq: int | None, deadline: float, what: str) -> dict:
        """One `kind` message from every rank; any death, Failed or the deadline -> GroupFailed."""
        got: dict[int, Ready | Done] = {}
        while len(got) < len(self._procs):
            pending = [r for r in range(len(self._procs)) if r not in got]
            remaining = deadline - monotonic()
            if remaining <= 0:
                self._fail(None, f"{what}: no answer from ranks {pending} within the deadline")
            conns = {id(self._conns[r]): r for r in pending}
            sentinels = {self._procs[r].sentinel: r for r in pending}
            for obj in wait([self._conns[r] for r in pending] + list(sentinels), timeout=remaining):
                rank = sentinels[obj] if isinstance(obj, int) else conns[id(obj)]
                if rank in got:
                    continue  # its message and its sentinel both fired
                m = self._receive(rank)
                if m is None or isinstance(m, Failed):
                    self._fail(rank, self._death_reason(rank, m, what))
                if isinstance(m, kind) and (seq is None or m.seq == seq):
                    got[rank] = m
                else:
                    log.warning("prefill_group_stale_message", rank=rank, message=type(m).__name__)
        return got

    def _receive(self, rank: int) -> Ready | Done | Failed | None:
        """The rank's next message if one is waiting; None if there is none or the pipe is closed."""
        conn = self._conns[rank]
        try:
            return from_rank_decoder.decode(conn.recv_bytes()) if conn.poll() else None
        except (EOFError, OSError):
            return None

    def _death_reason(self, rank: int, failed: Failed | None, what: str) -> str:
        if failed is not None:
            return f"rank {rank} failed during {what}: {failed.reason}"
        proc = self._procs[rank]
        proc.join(1.0)  # the pipe closes as the process exits: let its exit code land
        return f"rank {rank} (pid {proc.pid}) died during {what}: {_exit_reason(proc.exitcode)}"

    def _fail(self, rank: int | None, reason: str) -> None:
        self._down = reason
        log.error("prefill_group_failed", rank=rank, reason=reason)
        self._kill_all()
        raise GroupFailed(reason, rank)


def _exit_reason(code: int | None) -> str:
    if code is None:
        return "still running"
    if code < 0:
        return f"killed by {signal.Signals(-code).name}"
    return f"exit code {code}"


def _interface_of(addr: str) -> str:
    """The network interface carrying a local address (gloo binds its pair sockets there);
    "" where none does (a remote master: gloo's default)."""
    import psutil

    try:
        ip = ipaddress.ip_address(addr)
    except ValueError:  # a host name
        ip = ipaddress.ip_address(socket.gethostbyname(addr))
    for name, addrs in psutil.net_if_addrs().items():
        for a in addrs:
            try:
                if ipaddress.ip_address(a.address.split("%")[0]) == ip:
                    return name
            except ValueError:
                continue
    return ""


# ---- the rank process -------------------------------------------------------------------
def rank_main(spec_bytes: bytes, conn: Connection, kv_out: torch.Tensor, logits_out: torch.Tensor) -> None:
    """Entry function of a rank process: join the group, load the stage, Ready, serve prefills.
    Any exception is reported as Failed, then the process exits 1 (the group is broken anyway)."""
    import torch.distributed as dist

    spec = msgspec.msgpack.decode(spec_bytes, type=RankSpec)
    try:
        if spec.gloo_ifname:
            os.environ["GLOO_SOCKET_IFNAME"] = spec.gloo_ifname  # this process's own gloo: loopback only
        torch.set_num_threads(spec.threads)
        timeout = datetime.timedelta(seconds=spec.collective_timeout_s)
        store = dist.TCPStore(spec.store_addr, spec.store_port, is_master=False, timeout=timeout)
        backend = "gloo" if spec.device == "cpu" else "nccl"
        dist.init_process_group(backend, store=store, rank=spec.rank, world_size=spec.sp * spec.pp, timeout=timeout)
        runner = RankRunner(spec, kv_out, logits_out)
        model = runner.model
        conn.send_bytes(from_rank_encoder.encode(Ready(
            spec.rank, os.getpid(), runner.stage, runner.sp_rank, model.first_layer,
            model.first_layer + len(model.layers), model.weight_bytes, model.embed is not None,
            model.lm_head is not None,
        )))  # fmt: skip
        while True:
            try:
                msg = to_rank_decoder.decode(conn.recv_bytes())
            except EOFError:
                break  # the owner is gone
            if isinstance(msg, Shutdown):
                break
            conn.send_bytes(from_rank_encoder.encode(runner.prefill(msg)))
    except BaseException as e:  # noqa: BLE001 - every failure is reported, then the process exits
        try:
            conn.send_bytes(from_rank_encoder.encode(Failed(spec.rank, f"{type(e).__name__}: {e}")))
        except OSError:
            pass
        os._exit(1)  # skip interpreter teardown: gloo threads may still block on a dead peer
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # the teardown of torch and the stage's weights would take seconds
