"""RankRunner: one rank's share of a prefill — its stage's layers over its chunks.

Rank r is stage `r // sp`, sequence rank `r % sp`. For each round of the ChunkPlan it
takes its chunk's input (stage 0: the embedding of its token ids; later stages: the hidden
states that the same sequence rank of the previous stage sends), runs the stage's layers —
each layer exchanging its KV across the stage's sequence group (kv_sync) — and sends the
output on to the next stage with a non-blocking send, so a stage starts round r + 1 while
the next one runs round r. The rank that holds the prompt's last token on the last stage
norms its hidden state and sends it to rank 0, which holds the LM head (tied to the
embedding) and writes the first token's logits into the shared `logits_out`. Sequence rank
0 of each stage then copies its layers' KV into the shared `kv_out`.

Every wait is bounded by the process group's timeout: a dead or stuck peer raises
RuntimeError, which the rank's entry function reports as Failed.
"""

from __future__ import annotations

import datetime
from time import perf_counter

import torch
import torch.distributed as dist

from kvd.cache.contiguous import ContiguousKVBuffer
from kvd.distributed import sp_attention
from kvd.distributed.kv_sync import make_sync
from kvd.distributed.messages import Done, Prefill, RankSpec, RankStats
from kvd.distributed.plan import ChunkPlan, LayerMap
from kvd.distributed.stage import load_stage

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_HEAD_TAG = 1 << 20  # above every round's tag


class RankRunner:
    """The model part, KV buffer and process groups of one rank; `prefill` runs one prompt."""

    def __init__(self, spec: RankSpec, kv_out: torch.Tensor, logits_out: torch.Tensor) -> None:
        self.spec = spec
        self.rank, self.sp, self.pp = spec.rank, spec.sp, spec.pp
        self.stage, self.sp_rank = divmod(spec.rank, spec.sp)
        # One GPU per rank (the group checks there are enough); ranks are local processes.
        self.device = torch.device("cpu") if spec.device == "cpu" else torch.device("cuda", spec.rank)
        self.dtype = _DTYPES[spec.dtype]
        self.layer_map = LayerMap(spec.layer_bounds)
        self.kv_out = kv_out  # (L, 2, max_tokens, KVH, D), shared with the group
        self.logits_out = logits_out  # (V,) float32, shared with the group
        self.model = load_stage(spec.model_dir, self.layer_map, self.stage, head=self.rank == 0,
                                dtype=self.dtype, device=self.device, quantization=spec.quantization)  # fmt: skip
        kvh, d = kv_out.shape[3], kv_out.shape[4]
        # Capacity: the padded last round can pass max_tokens by at most sp - 1 tokens.
        self.buffer = ContiguousKVBuffer(len(self.model.layers), spec.max_tokens + spec.sp - 1, kvh, d,
                                         self.dtype, self.device)  # fmt: skip
        self.seq_ranks = [self.stage * self.sp + i for i in range(self.sp)]
        self.seq_group = self._new_groups()
        self.hidden_size = self.model.layers[0].hidden_size

    def _new_groups(self) -> dist.ProcessGroup | None:
        """One sequence group per stage; every rank creates all of them, in the same order."""
        if self.sp == 1:
            return None
        timeout = datetime.timedelta(seconds=self.spec.collective_timeout_s)
        mine = None
        for stage in range(self.pp):
            group = dist.new_group([stage * self.sp + i for i in range(self.sp)], timeout=timeout)
            if stage == self.stage:
                mine = group
        return mine

    @property
    def is_first(self) -> bool:
        return self.stage == 0

    @property
    def is_last(self) -> bool:
        return self.stage == self.pp - 1

    @torch.inference_mode()
    def prefill(self, msg: Prefill) -> Done:
        t_start = perf_counter()
        ids = msg.token_ids
        plan = ChunkPlan.build(len(ids), self.sp, self.pp)
        self.buffer.reset()
        sync = make_sync(msg.sync, self.buffer, self.seq_group, self.seq_ranks, self.sp_rank)
        p2p = _P2P()
        final = None  # (E,): the normed hidden state of the prompt's last token, on its holder
        last_rank, last_row = plan.last_token
        for r in range(len(plan.rounds)):
            lo, hi = plan.span(r, self.sp_rank)
            hidden = self._input(ids, lo, hi, r, p2p)  # (1, T, E)
            hidden = self._layers(hidden, lo, hi, sync)
            if not self.is_last:
                p2p.send(hidden, self.rank + self.sp, r)
            elif r == len(plan.rounds) - 1 and self.sp_rank == last_rank:
                final = self.model.norm(hidden[0, last_row])  # (E,)
        p2p.wait_sends()
        first_token = self._head(final, (self.pp - 1) * self.sp + last_rank, p2p)
        t_export = perf_counter()
        if self.sp_rank == 0:
            self._export(len(ids))
        t_end = perf_counter()
        wall, export = t_end - t_start, t_end - t_export
        stats = RankStats(
            rank=self.rank, wall_s=wall, compute_s=wall - sync.layer_s_total - p2p.seconds - export,
            sync_s=sync.layer_s_total, sync_bytes=sync.bytes_received, p2p_s=p2p.seconds, p2p_bytes=p2p.nbytes,
            export_s=export, layer_sync_s=list(sync.layer_s),
        )  # fmt: skip
        return Done(self.rank, msg.seq, first_token, stats)

    def _input(self, ids: list[int], lo: int, hi: int, r: int, p2p: _P2P) -> torch.Tensor:
        if self.is_first:
            n = len(ids)
            chunk = ids[lo:hi] + [0] * max(0, hi - max(lo, n))  # pad positions (>= n) get token 0
            # (T, E) from a QuantEmbedding, (1, T, E) from torch's
            return self.model.embed(torch.tensor([chunk], device=self.device)).view(1, len(chunk), -1)  # (1, T, E)
        hidden = torch.empty(1, hi - lo, self.hidden_size, dtype=self.dtype, device=self.device)  # (1, T, E)
        p2p.recv(hidden, self.rank - self.sp, r)
        return hidden

    def _layers(self, hidden: torch.Tensor, lo: int, hi: int, sync) -> torch.Tensor:
        positions = torch.arange(lo, hi, device=self.device).unsqueeze(0)  # (1, T)
        cos_sin = self.model.rotary(hidden, positions)
        mask = sp_attention.causal_mask(lo, hi, self.device)  # (T, hi) or None
        ctx = sp_attention.RoundContext(sync, self.layer_map.to_local, hi, mask)
        with sp_attention.round_context(ctx):
            for layer in self.model.layers:
                hidden = layer(hidden, position_embeddings=cos_sin, position_ids=positions)  # (1, T, E)
        return hidden

    def _head(self, final: torch.Tensor | None, holder: int, p2p: _P2P) -> int:
        """Bring the last token's hidden state to rank 0; rank 0 writes the logits, returns the greedy token."""
        if self.rank == holder and holder != 0:
            p2p.send(final.contiguous(), 0, _HEAD_TAG)
            p2p.wait_sends()
        if self.rank != 0:
            return -1
        if holder != 0:
            final = torch.empty(self.hidden_size, dtype=self.dtype, device=self.device)  # (E,)
            p2p.recv(final, holder, _HEAD_TAG)
        logits = self.model.lm_head(final).float()  # (V,)
        self.logits_out.copy_(logits)
        return int(logits.argmax())

    def _export(self, n: int) -> None:
        """This stage's layers' KV, first n tokens (pad dropped), into the group's shared output."""
        for local in range(len(self.model.layers)):
            k, v = self.buffer.get_data(local)  # (C, KVH, D)
            g = self.layer_map.to_global(self.stage, local)
            self.kv_out[g, 0, :n].copy_(k[:n])
            self.kv_out[g, 1, :n].copy_(v[:n])


class _P2P:
    """Pipeline point-to-point on the default group, timed; sends stay in flight until wait_sends.
    Counts the bytes received, so summing over ranks counts every byte moved once."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.nbytes = 0
        self._sends: list[dist.Work] = []

    def send(self, t: torch.Tensor, dst: int, tag: int) -> None:
        self._sends.append(dist.isend(t, dst, tag=tag))

    def recv(self, t: torch.Tensor, src: int, tag: int) -> None:
        t0 = perf_counter()
        dist.irecv(t, src, tag=tag).wait()
        self.seconds += perf_counter() - t0
        self.nbytes += t.numel() * t.element_size()

    def wait_sends(self) -> None:
        t0 = perf_counter()
        for w in self._sends:
            w.wait()
        self._sends.clear()
        self.seconds += perf_counter() - t0
