"""ModelRunner: the model, its paged KV tensors and the sampler; runs one scheduled step.

It keeps each request's tokens and block ids, applies the SchedulerOutput diff, packs
every scheduled token into one sequence (decode tokens first, then prefill chunks),
runs the model with kvd's paged attention, computes logits only at the last token of
each request that reached the end of its known tokens, samples, and returns ModelOutput.
The same class serves the offline LLM in-process and the daemon's worker process.
"""

from __future__ import annotations

import os
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from pathlib import Path

import structlog
import torch

from kvd import cpu, ops, shm
from kvd.cache.kv_manager import cdiv
from kvd.config import CacheConfig, ModelConfig, PrefillConfig
from kvd.connector.base import group_computes
from kvd.model_info import KVShare, ModelInfo
from kvd.scheduler.output import Logprobs, ModelOutput, PromptLogprobs, SchedulerOutput
from kvd.worker import attention
from kvd.worker.attention import AttentionMetadata, PrefillChunk
from kvd.worker.decoder import Decoder
from kvd.worker.grammar_mask import apply_bitmasks
from kvd.worker.linear import prepack
from kvd.worker.models import gguf_source, load_config, model_fingerprint
from kvd.worker.prompt_logprobs import prompt_logprobs
from kvd.worker.quant_load import weight_source
from kvd.worker.sampler import Sampler, SamplingState

log = structlog.get_logger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device, flags: AbstractSet[str] | None = None) -> torch.dtype:
    """auto: bfloat16 on CUDA and on CPUs with bf16 hardware (AVX512-BF16 or AMX), float32 on
    other CPUs, where bf16 matmuls are emulated and several times slower (`kvd.cpu`)."""
    flags = cpu.machine_flags() if flags is None else flags
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16
        chosen, why = cpu.auto_cpu_dtype(flags)
        log.info("dtype_chosen", dtype=chosen, device="cpu", reason=why)
        return _DTYPES[chosen]
    dtype = _DTYPES[name]
    if device.type == "cpu" and dtype == torch.bfloat16 and cpu.no_bf16_reason(flags):
        log.warning("slow_cpu_dtype", dtype=name, reason=f"{cpu.no_bf16_reason(flags)}: float32 is faster here")
    if device.type == "cpu" and dtype == torch.float16:
        log.warning("slow_cpu_dtype", dtype=name, reason="float16 runs transformers' forward on the CPU; "
                                                         "bfloat16 or float32 take kvd's")  # fmt: skip
    return dtype


@dataclass
class _RequestState:
    """The runner's copy of one request: its tokens, blocks, progress and sampling state (which
    holds the same token list and appends each sampled token to it)."""

    token_ids: list[int]
    block_ids: list[int]
    num_computed_tokens: int
    sampling: SamplingState


@dataclass
class _Batch:
    """One step's scheduled tokens packed into one sequence, for one forward pass."""

    input_ids: torch.Tensor  # (1, N)
    positions: torch.Tensor  # (1, N)
    meta: AttentionMetadata
    sample_ids: list[str]  # requests that sample a token this step
    sample_rows: torch.Tensor  # (B,) their last token's index in the packed batch
    prompt_rows: list[tuple[str, int, int, int]] = field(default_factory=list)  # prompt logprobs: (request
    # id, first packed row, first prompt position of those rows, rows); row r predicts token position + 1


@dataclass
class _Sampled:
    """The step's sampled tokens, in the order they were sampled (group prefills first)."""

    request_ids: list[str] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    logprobs: list[Logprobs | None] = field(default_factory=list)
    prompt_logprobs: list[PromptLogprobs] = field(default_factory=list)

    def add(self, request_ids: list[str], tokens: list[int], logprobs: list[Logprobs | None]) -> None:
        self.request_ids += request_ids
        self.tokens += tokens
        self.logprobs += logprobs

    def output(self, step: int) -> ModelOutput:
        logprobs = self.logprobs if any(lp is not None for lp in self.logprobs) else None
        return ModelOutput(step, self.request_ids, self.tokens, logprobs, self.prompt_logprobs)


class ModelRunner:
    """Owns the model and the KV cache tensors of one worker."""

    def __init__(
        self, model_dir: Path, model_config: ModelConfig, cache_config: CacheConfig, share_kv: bool = False,
        prefill: PrefillConfig | None = None,
    ) -> None:
        self.model_dir = model_dir
        cpu.use_huge_pages(model_config.huge_pages)  # a worker has it from the daemon; LLM: if no tensor came first
        if model_config.threads:  # several instances on one host: don't oversubscribe the cores
            torch.set_num_threads(model_config.threads)
        self.device = resolve_device(model_config.device)
        self.dtype = resolve_dtype(model_config.dtype, self.device)
        self.hf_config = load_config(model_dir)
        if getattr(self.hf_config, "use_sliding_window", False):
            raise ValueError("model: sliding-window attention is not supported by kvd's paged attention")
        self.model, self.fast = self._load(model_config.implementation, model_config.quantization)
        cfg = self.hf_config
        self.num_layers = cfg.num_hidden_layers
        self.num_kv_heads = cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.vocab_size = cfg.vocab_size
        self.max_model_len = min(model_config.max_model_len or cfg.max_position_embeddings, cfg.max_position_embeddings)
        self.block_size = cache_config.block_size
        self.num_blocks = cache_config.num_blocks or self._blocks_for_budget(cache_config.memory_gb)
        self.kv_all, self.kv_fd = self._allocate_kv(share_kv)  # (L, 2, NB, BS, KVH, D)
        self.kv_caches = list(self.kv_all.unbind(0))
        self.num_host_slots = 0
        self.host_pool: torch.Tensor | None = None
        if cache_config.preempt == "swap":
            self.num_host_slots = max(1, int(cache_config.swap_space_gb * 2**30) // self.bytes_per_block)
            self.host_pool = self._host_pool(self.num_host_slots)
        self.sampler = Sampler(self.device, self.vocab_size, self._eos_token_ids())
        self.requests: dict[str, _RequestState] = {}
        self._bitmasks: dict[str, bytes] = {}  # the step's (SchedulerOutput.bitmasks)
        # The prefill group (`[prefill.parallel]`): its ranks are this runner's children, so
        # they live and die with it; long prompts prefill there, whole (kvd.connector.base).
        self.group = None
        self.group_min_tokens = 0
        if prefill is not None and prefill.group:
            from kvd.distributed.group import PrefillGroup

            # The ranks build their stage as this runner's decoder is built (none where it is off).
            quantization = self.fast.quantization if self.fast is not None else "none"
            self.group = PrefillGroup(model_dir, prefill.parallel, max_tokens=self.max_model_len, dtype=self.dtype,
                                      quantization=quantization)  # fmt: skip
            self.group.start()
            self.group_min_tokens = prefill.group_min_tokens
        # Load (or build, once per machine: a minute) the native ops now, not in the first
        # request's step, where a PD lease or a client's deadline would be running.
        ops.native()
        if self.device.type == "cuda":
            ops.native_cuda()
        log.info(
            "model_runner_ready", device=str(self.device), dtype=str(self.dtype).removeprefix("torch."),
            num_blocks=self.num_blocks, block_size=self.block_size, kv_cache_mb=round(self.kv_cache_bytes / 2**20),
            huge_pages_mb=cpu.huge_pages_mb(), thp=cpu.thp_mode(),
        )  # fmt: skip

    def _load(self, implementation: str, quantization: str) -> tuple[torch.nn.Module, Decoder | None]:
        """transformers' model, and kvd's own decoder over it where that applies (then
        transformers' copies of the layer weights are dropped: the decoder holds them packed or
        quantized); else transformers' forward, its linear layers prepacked on the CPU. Either
        way a log line says which and why. Under `auto` with a model from a GGUF file the
        weight source builds the model: no float weight of what the decoder holds is loaded."""
        if implementation == "transformers":
            off = "model.implementation = transformers"
        else:
            off = Decoder.why_not(self.hf_config, self.device, self.dtype)
        if off is not None:
            log.info("kvd_decoder_off", reason=off)
            if quantization != "none":
                log.warning("quantization_off", quantization=quantization, reason="kvd's CPU decoder does not run "
                            "this model here (kvd_decoder_off says why); its weights stay float")  # fmt: skip
            if implementation == "kvd":
                raise ValueError("model.implementation: kvd's decoder does not apply here (the log line "
                                 "kvd_decoder_off says why); use auto or transformers")  # fmt: skip
        gguf = gguf_source(self.model_dir) if off is None and quantization == "auto" else None
        source = weight_source(quantization, self.hf_config, self.dtype, gguf)
        model = source.model(self.model_dir, self.dtype, self.device)
        if off is not None:
            self.weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
            if self.device.type == "cpu":
                prepack(model)
            return model, None
        fast = Decoder.build(model, source)
        self.weight_bytes = fast.weight_bytes
        del model.get_decoder().layers  # transformers' forward is not called again
        if fast.quantization != "none":  # the float embedding and lm_head: the decoder holds them quantized
            model.get_decoder().embed_tokens = None
            model.lm_head = None
        return model, fast

    def _allocate_kv(self, share_kv: bool) -> tuple[torch.Tensor, int | None]:
        """One tensor per layer, (2, num_blocks, block_size, kv_heads, head_dim), as slices of one
        allocation — in a memfd when the cache messenger must map it too (PD roles)."""
        shape = (self.num_layers, 2, self.num_blocks, self.block_size, self.num_kv_heads, self.head_dim)
        if not share_kv:
            return torch.zeros(shape, dtype=self.dtype, device=self.device), None
        if self.device.type != "cpu":
            raise ValueError("daemon.role: prefill/decode roles share the KV cache with the messenger "
                             "through CPU shared memory; CUDA IPC sharing is not built yet")  # fmt: skip
        return shm.create(shape, self.dtype)

    def _host_pool(self, num_slots: int) -> torch.Tensor:
        """The host swap pool, block-major: (slots, layers, 2, block_size, kv_heads, head_dim)."""
        return torch.zeros(
            num_slots, self.num_layers, 2, self.block_size, self.num_kv_heads, self.head_dim,
            dtype=self.dtype, pin_memory=self.device.type == "cuda",
        )  # fmt: skip

    def kv_share(self) -> KVShare | None:
        """The KVShare the worker's Ready message carries (None when the cache is private)."""
        if self.kv_fd is None:
            return None
        return KVShare(os.getpid(), self.kv_fd, list(self.kv_all.shape), str(self.dtype).removeprefix("torch."))

    def model_info(self) -> ModelInfo:
        """What the scheduler side needs to know (the worker's Ready message carries it). The
        end-of-sequence ids are the model's; the Engine adds its tokenizer's."""
        return ModelInfo(
            vocab_size=self.vocab_size,
            max_model_len=self.max_model_len,
            eos_token_ids=self._eos_token_ids(),
            num_blocks=self.num_blocks,
            block_size=self.block_size,
            fingerprint=self._fingerprint(),
            num_host_slots=self.num_host_slots,
            kv_dtype=str(self.dtype).removeprefix("torch."),
            compute_threads=torch.get_num_threads() if self.device.type == "cpu" else 0,
        )

    def _eos_token_ids(self) -> list[int]:
        eos: set[int] = set()
        gen_eos = getattr(getattr(self.model, "generation_config", None), "eos_token_id", None)
        for src in (gen_eos, self.hf_config.eos_token_id):
            if isinstance(src, int):
                eos.add(src)
            elif isinstance(src, (list, tuple)):
                eos.update(src)
        return sorted(eos)

    def _fingerprint(self) -> str:
        """The checkpoint's fingerprint; with quantized weights, one of the checkpoint and the
        mode (their KV differs from the float model's, so KV storage keys must too)."""
        fp = model_fingerprint(self.model_dir)
        if self.fast is None or self.fast.quantization == "none":
            return fp
        import xxhash

        return xxhash.xxh3_128_hexdigest(f"{fp}:quantization={self.fast.quantization}".encode())

    @property
    def bytes_per_block(self) -> int:
        elem = torch.empty((), dtype=self.dtype).element_size()
        return 2 * self.num_layers * self.block_size * self.num_kv_heads * self.head_dim * elem

    @property
    def kv_cache_bytes(self) -> int:
        return self.num_blocks * self.bytes_per_block

    def _blocks_for_budget(self, memory_gb: float) -> int:
        n = int(memory_gb * 2**30) // self.bytes_per_block
        if n < 1:
            raise ValueError(f"cache.memory_gb: {memory_gb} GB holds no block of {self.bytes_per_block} bytes")
        return n

    # ---- the step ----------------------------------------------------------------------
    def _apply(self, so: SchedulerOutput) -> None:
        for request_id in so.finished_request_ids:
            self.requests.pop(request_id, None)
        for request_id in so.preempted_request_ids:
            self.requests.pop(request_id, None)
        for r in so.new_reqs:  # a resumed request's state (penalty counts too) is rebuilt from its tokens
            tokens = list(r.token_ids)
            sampling = self.sampler.state(r.sampling_params, tokens, r.num_prompt_tokens)
            self.requests[r.request_id] = _RequestState(tokens, list(r.block_ids), r.num_computed_tokens, sampling)
        for r in so.cached_reqs:
            state = self.requests[r.request_id]
            state.block_ids += r.new_block_ids
            state.num_computed_tokens = r.num_computed_tokens

    def _swap(self, pairs: list[tuple[int, int]], to_host: bool) -> None:
        if pairs:
            blocks, slots = zip(*pairs)
            ops.swap_cache_layout(self.kv_caches, self.host_pool, list(blocks), list(slots), to_host)

    @torch.inference_mode()
    def execute(self, so: SchedulerOutput) -> ModelOutput:
        self._apply(so)
        self._bitmasks = so.bitmasks  # structured outputs: this step's allowed tokens, by request
        # Preempted requests' KV leaves before resumed requests' KV (or anything else) lands.
        self._swap(so.swap_out, to_host=True)
        self._swap(so.swap_in, to_host=False)
        sampled = self._group_prefills(so)
        rest = {r: n for r, n in so.num_scheduled_tokens.items() if r not in sampled.request_ids}
        if rest:
            batch = self._pack(rest)
            with attention.forward_context(self.kv_caches, batch.meta):
                hidden = self._forward(batch)  # (N, E)
            if batch.sample_ids:
                ids, rows = self._with_forks(batch.sample_ids, batch.sample_rows, so.forks)
                self._sample(hidden[rows], ids, sampled)
            head = self.fast.lm_head if self.fast is not None else self.model.lm_head
            for request_id, row, pos, count in batch.prompt_rows:
                state = self.requests[request_id]
                sampled.prompt_logprobs.append(prompt_logprobs(head, hidden[row : row + count], request_id, pos + 1,
                                                               state.token_ids[pos + 1 : pos + 1 + count],
                                                               state.sampling.params.prompt_logprobs))  # fmt: skip
        self._copy_blocks(so.fork_copies)  # after the forward wrote the first choices' prompt KV
        return sampled.output(so.step)

    @staticmethod
    def _with_forks(ids: list[str], rows: torch.Tensor, forks: dict[str, str]) -> tuple[list[str], torch.Tensor]:
        """The sampled requests and their rows, each forked choice sampling its first choice's row."""
        if not forks:
            return ids, rows
        at = {request_id: i for i, request_id in enumerate(ids)}
        children = [(child, at[first]) for child, first in forks.items() if first in at]
        extra = torch.tensor([i for _, i in children], dtype=torch.long, device=rows.device)
        return ids + [child for child, _ in children], torch.cat([rows, rows[extra]])

    def _copy_blocks(self, pairs: list[tuple[int, int]]) -> None:
        if pairs:
            src, dst = (torch.tensor(side, device=self.device) for side in zip(*pairs))
            for layer in self.kv_caches:  # (2, num_blocks, block_size, kv_heads, head_dim)
                layer[:, dst] = layer[:, src]

    def _forward(self, batch: _Batch) -> torch.Tensor:
        """The final hidden state of every packed token, (N, E)."""
        if self.fast is not None:
            return self.fast.forward(batch.input_ids[0], batch.positions[0])
        out = self.model.get_decoder()(input_ids=batch.input_ids, position_ids=batch.positions, use_cache=False)
        return out.last_hidden_state[0]

    def _pack(self, scheduled: dict[str, int]) -> _Batch:
        """Every scheduled token in one sequence, decode tokens first (one batched attention
        call), then prefill chunks; logits rows only where a request caught up with its tokens."""
        bs = self.block_size
        token_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        decode_tables: list[list[int]] = []
        decode_lens: list[int] = []
        prefills: list[PrefillChunk] = []
        sample_ids: list[str] = []
        sample_rows: list[int] = []
        prompt_rows: list[tuple[str, int, int, int]] = []
        for request_id, n in sorted(scheduled.items(), key=lambda kv: kv[1] != 1):
            state = self.requests[request_id]
            nc = state.num_computed_tokens
            start = len(token_ids)
            token_ids += state.token_ids[nc : nc + n]
            pos = range(nc, nc + n)
            positions += pos
            table = state.block_ids
            slots += [table[p // bs] * bs + p % bs for p in pos]
            num_used = cdiv(nc + n, bs)
            if n == 1:
                decode_tables.append(table[:num_used])
                decode_lens.append(nc + 1)
            elif nc == 0:
                prefills.append(PrefillChunk(start, start + n, 0, torch.tensor(table[:num_used], device=self.device)))
            else:
                q_pos = torch.arange(nc, nc + n).unsqueeze(1)  # (T, 1)
                mask = torch.arange(nc + n).unsqueeze(0) <= q_pos  # (T, C)
                prefills.append(PrefillChunk(
                    start, start + n, nc,
                    torch.tensor(table[:num_used], device=self.device), mask.to(self.device),
                ))  # fmt: skip
            state.num_computed_tokens = nc + n
            num_prompt = state.sampling.num_prompt_tokens
            if state.sampling.params.prompt_logprobs is not None and nc < num_prompt - 1:
                prompt_rows.append((request_id, start, nc, min(nc + n, num_prompt - 1) - nc))
            if nc + n == len(state.token_ids):  # caught up: this token's logits give the next token
                sample_ids.append(request_id)
                sample_rows.append(start + n - 1)
        meta = AttentionMetadata(
            slot_mapping=torch.tensor(slots, device=self.device), prefills=prefills, num_decodes=len(decode_tables)
        )
        if decode_tables:
            max_blocks = max(len(t) for t in decode_tables)
            table = [t + [0] * (max_blocks - len(t)) for t in decode_tables]
            meta.decode_block_table = torch.tensor(table, device=self.device)  # (Bd, MB)
            meta.decode_lens = torch.tensor(decode_lens, device=self.device)  # (Bd,)
        return _Batch(
            input_ids=torch.tensor(token_ids, device=self.device).unsqueeze(0),  # (1, N)
            positions=torch.tensor(positions, device=self.device).unsqueeze(0),  # (1, N)
            meta=meta,
            sample_ids=sample_ids,
            sample_rows=torch.tensor(sample_rows, device=self.device),
            prompt_rows=prompt_rows,
        )

    def _sample(self, hidden: torch.Tensor, request_ids: list[str], into: _Sampled) -> None:
        """Sample one token per row of `hidden` (B, E); the sampler appends it to its request."""
        head = self.fast.lm_head if self.fast is not None else self.model.lm_head
        logits = head(hidden).float()  # (B, V)
        apply_bitmasks(logits, [self._bitmasks.get(r) for r in request_ids])
        tokens, logprobs = self.sampler(logits, [self.requests[r].sampling for r in request_ids])
        into.add(request_ids, tokens, logprobs or [None] * len(tokens))

    def _group_prefills(self, so: SchedulerOutput) -> _Sampled:
        """Whole prompts scheduled for the prefill group: prefill there, copy the KV into the
        request's blocks, sample the first token here. A GroupFailed propagates: the worker
        dies, its requests fail, and the daemon restarts it with a new group."""
        sampled = _Sampled()
        if self.group is None:
            return sampled
        from kvd.distributed.to_blocks import write_kv_to_blocks

        for r in so.new_reqs:
            state = self.requests[r.request_id]
            n = so.num_scheduled_tokens.get(r.request_id, 0)
            if not group_computes(r.num_computed_tokens, n, len(state.token_ids), self.group_min_tokens,
                                  state.sampling.params.prompt_logprobs is not None):  # fmt: skip
                continue
            result = self.group.prefill(state.token_ids)
            write_kv_to_blocks(result.kv, self.kv_caches, state.block_ids)
            state.num_computed_tokens = n
            # the group's logits are float32 and a copy: the mask and the sampler may write into them
            logits = result.logits[None].to(self.device)
            apply_bitmasks(logits, [self._bitmasks.get(r.request_id)])
            tok, lp = self.sampler(logits, [state.sampling])
            sampled.add([r.request_id], tok, [lp[0] if lp else None])
        return sampled
