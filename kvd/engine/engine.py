"""Engine: the in-process step — schedule, run, update — plus validation and detokenizing.

The offline LLM drives it directly; the daemon splits the same pieces across processes
(scheduler in the daemon, ModelRunner in the worker). `step()` returns the outputs of
requests that finished in that step; `add_request` validates first and raises ValueError
naming the field, so a rejected request never touches the block pool.
"""

from __future__ import annotations

import itertools
import time

import structlog

from kvd.cache.kv_manager import KVCacheManager, cdiv
from kvd.config import EngineConfig
from kvd.outputs import RequestOutput
from kvd.request import Request, RequestStatus
from kvd.sampling import SamplingParams
from kvd.scheduler.output import EngineOutput
from kvd.scheduler.scheduler import Scheduler
from kvd.worker.model_runner import ModelRunner
from kvd.worker.models import load_tokenizer, resolve_model

log = structlog.get_logger(__name__)

Prompt = str | list[int]


class Engine:
    """Scheduler + KV cache manager + model runner in one process."""

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.model_dir = resolve_model(config.model.model, config.model.cache_dir)
        self.tokenizer = load_tokenizer(self.model_dir)
        self.runner = ModelRunner(self.model_dir, config.model, config.cache)
        hf = self.runner.hf_config
        self.max_model_len = config.model.max_model_len or hf.max_position_embeddings
        self.eos_token_ids = _eos_ids(self.runner.model, self.tokenizer)
        self.kv = KVCacheManager(
            self.runner.num_blocks, config.cache.block_size, config.cache.enable_prefix_caching, config.cache.hash_algo
        )
        self.scheduler = Scheduler(config.scheduler, self.kv)
        self._ids = itertools.count()
        self._outputs: dict[str, RequestOutput] = {}
        self._requests: dict[str, Request] = {}
        self.num_generated = 0

    # ---- requests ----------------------------------------------------------------------
    def tokenize(self, prompt: Prompt) -> list[int]:
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError("prompt: must not be empty")
            return self.tokenizer.encode(prompt, add_special_tokens=False)
        if not isinstance(prompt, (list, tuple)) or any(isinstance(t, bool) or not isinstance(t, int) for t in prompt):
            raise ValueError("prompt_token_ids: must be a list of integers")
        return list(prompt)

    def validate(self, token_ids: list[int], params: SamplingParams) -> None:
        """ValueError naming the field for a request the engine cannot serve."""
        if not token_ids:
            raise ValueError("prompt: must not be empty")
        bad = next((t for t in token_ids if not 0 <= t < self.runner.vocab_size), None)
        if bad is not None:
            raise ValueError(f"prompt_token_ids: token id {bad} is outside the vocabulary [0, {self.runner.vocab_size})")
        total = len(token_ids) + params.max_tokens
        if total > self.max_model_len:
            raise ValueError(
                f"max_tokens: prompt ({len(token_ids)} tokens) + max_tokens ({params.max_tokens})"
                f" exceeds the model's context of {self.max_model_len}"
            )
        if cdiv(total, self.kv.block_size) > self.kv.num_blocks:
            raise ValueError(
                f"max_tokens: prompt + max_tokens ({total} tokens) needs more blocks than the KV cache has"
                f" ({self.kv.num_blocks} of {self.kv.block_size} tokens)"
            )

    def add_request(self, prompt: Prompt, params: SamplingParams, request_id: str | None = None) -> str:
        token_ids = self.tokenize(prompt)
        self.validate(token_ids, params)
        rid = request_id if request_id is not None else f"req-{next(self._ids)}"
        request = Request(rid, token_ids, params, eos_token_ids=self.eos_token_ids)
        self.scheduler.add_request(request)
        self._requests[rid] = request
        self._outputs[rid] = RequestOutput(request_id=rid, prompt_token_ids=token_ids, token_ids=[], text="",
                                           finish_reason=None)  # fmt: skip
        return rid

    def abort(self, request_ids: list[str]) -> list[RequestOutput]:
        self.scheduler.finish_requests(request_ids, RequestStatus.FINISHED_ABORTED)
        return [self._finish(rid, "abort") for rid in request_ids if rid in self._outputs]

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    # ---- the step ----------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """One engine step: schedule → run → update. Returns the requests finished in it."""
        so = self.scheduler.schedule()
        for new in so.new_reqs:
            if new.num_computed_tokens and new.req_id in self._outputs:
                out = self._outputs[new.req_id]
                out.num_cached_tokens = max(out.num_cached_tokens, new.num_computed_tokens)
        mo = self.runner.execute(so)
        finished = []
        for eo in self.scheduler.update(mo):
            self.num_generated += len(eo.new_token_ids)
            done = self._on_output(eo)
            if done is not None:
                finished.append(done)
        return finished

    def _on_output(self, eo: EngineOutput) -> RequestOutput | None:
        out = self._outputs[eo.req_id]
        out.token_ids += eo.new_token_ids
        if eo.new_logprobs:
            out.logprobs = (out.logprobs or []) + list(eo.new_logprobs)
        request = self._requests[eo.req_id]
        if eo.finish_reason is None and request.sampling_params.stop:
            cut = self._stop_string_cut(request.sampling_params.stop, out.token_ids)
            if cut is not None:
                self.scheduler.finish_requests([eo.req_id], RequestStatus.FINISHED_STOPPED)
                return self._finish(eo.req_id, "stop", cut)
        if eo.finish_reason is not None:
            return self._finish(eo.req_id, eo.finish_reason)
        return None

    def _stop_string_cut(self, stops: list[str], token_ids: list[int]) -> str | None:
        text = self.tokenizer.decode(token_ids, skip_special_tokens=True)
        hits = [i for i in (text.find(s) for s in stops) if i >= 0]
        return text[: min(hits)] if hits else None

    def _finish(self, rid: str, reason: str, text: str | None = None) -> RequestOutput:
        out = self._outputs.pop(rid)
        self._requests.pop(rid, None)
        out.finish_reason = reason
        out.text = text if text is not None else self.tokenizer.decode(out.token_ids, skip_special_tokens=True)
        return out

    def check_integrity(self) -> None:
        self.scheduler.check_integrity()

    def stats(self) -> dict[str, float | int]:
        pool = self.kv.pool
        return {
            "waiting": len(self.scheduler.waiting),
            "running": len(self.scheduler.running),
            "blocks_total": pool.num_blocks,
            "blocks_free": pool.num_free - pool.num_cached_only,
            "blocks_cached_only": pool.num_cached_only,
            "blocks_held": pool.num_held,
            "prefix_hit_rate": self.kv.prefix_hit_rate,
            "prefix_hit_tokens": self.kv.prefix_hits,
            "preemptions": self.scheduler.num_preemptions,
            "generated_tokens": self.num_generated,
            "time": time.time(),
        }


def _eos_ids(model, tokenizer) -> frozenset[int]:
    ids: set[int] = set()
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for src in (gen_eos, model.config.eos_token_id, tokenizer.eos_token_id):
        if isinstance(src, int):
            ids.add(src)
        elif isinstance(src, (list, tuple)):
            ids.update(src)
    return frozenset(ids)
