"""Engine: requests in, deltas out — validation, the scheduler, stop strings and detokenizing.

The model runs elsewhere: in-process for the offline LLM (`kvd.llm.LocalEngine.step`),
in a worker process for the daemon. Either way one step is

    so = engine.schedule()          # SchedulerOutput, a diff
    mo = runner.execute(so)         # in-process call or a ZeroMQ round trip
    deltas = engine.process(mo)     # new tokens / text per request, finished ones flagged

`add_request` validates first and raises ValueError naming the field, so a rejected
request never touches the block pool. What the engine must know of the model arrives
as a `ModelInfo` (the worker's Ready message carries the same struct).
"""

from __future__ import annotations

import itertools
import time

import msgspec
import structlog

from kvd.cache.kv_manager import KVCacheManager, cdiv
from kvd.config import EngineConfig
from kvd.engine.detokenizer import IncrementalDetokenizer
from kvd.model_info import ModelInfo
from kvd.outputs import RequestOutput
from kvd.request import Request, RequestStatus
from kvd.sampling import SamplingParams
from kvd.scheduler.output import EngineOutput, ModelOutput, SchedulerOutput
from kvd.scheduler.scheduler import Scheduler

log = structlog.get_logger(__name__)

Prompt = str | list[int]
CHAT_ROLES = ("system", "user", "assistant")


class Delta(msgspec.Struct):
    """What one step added to one request; `output` is set once, when it finishes."""

    request_id: str
    token_ids: list[int]
    text: str
    finish_reason: str | None = None
    output: RequestOutput | None = None


class Engine:
    """Scheduler + KV cache manager + output processing, for a model described by ModelInfo."""

    def __init__(
        self,
        config: EngineConfig,
        tokenizer,
        info: ModelInfo,
        stream_text: bool = False,
        kv_wait_blocks: int | None = None,
        group_min_tokens: int = 0,
    ) -> None:
        self.config = config
        self.tokenizer = tokenizer
        self.info = info
        self.stream_text = stream_text  # decode text every step (the daemon streams it)
        self.max_model_len = min(config.model.max_model_len or info.max_model_len, info.max_model_len)
        tok_eos = getattr(tokenizer, "eos_token_id", None)  # the tokenizer may name another
        self.eos_token_ids = frozenset(info.eos_token_ids) | ({tok_eos} if isinstance(tok_eos, int) else set())
        self.kv = KVCacheManager(
            info.num_blocks, info.block_size, config.cache.enable_prefix_caching, config.cache.hash_algo
        )
        self.scheduler = Scheduler(config.scheduler, self.kv, config.cache.preempt, info.num_host_slots, kv_wait_blocks,
                                   group_min_tokens)  # fmt: skip
        self._ids = itertools.count()
        self._outputs: dict[str, RequestOutput] = {}
        self._requests: dict[str, Request] = {}
        self._detok: dict[str, IncrementalDetokenizer] = {}  # requests whose text grows per step
        self._sent_text: dict[str, int] = {}  # characters of text streamed so far
        self.num_generated = 0
        self.num_prompt_tokens = 0

    # ---- requests ----------------------------------------------------------------------
    def tokenize(self, prompt: Prompt) -> list[int]:
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError("prompt: must not be empty")
            return self.tokenizer.encode(prompt, add_special_tokens=False)
        if not isinstance(prompt, (list, tuple)) or any(isinstance(t, bool) or not isinstance(t, int) for t in prompt):
            raise ValueError("prompt_token_ids: must be a list of integers")
        return list(prompt)

    def apply_chat_template(self, messages: list[dict[str, str]]) -> list[int]:
        if not messages or any(
            not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str)
            for m in messages
        ):
            raise ValueError("chat: must be a non-empty list of {'role': str, 'content': str} messages")
        bad = next((i for i, m in enumerate(messages) if m["role"] not in CHAT_ROLES), None)
        if bad is not None:
            raise ValueError(f"chat[{bad}].role: expected one of {'|'.join(CHAT_ROLES)}, got {messages[bad]['role']!r}")
        ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        return list(ids["input_ids"] if hasattr(ids, "keys") else ids)

    def validate(self, token_ids: list[int], params: SamplingParams) -> None:
        """ValueError naming the field for a request the engine cannot serve."""
        if not token_ids:
            raise ValueError("prompt: must not be empty")
        bad = next((t for t in token_ids if not 0 <= t < self.info.vocab_size), None)
        if bad is not None:
            raise ValueError(f"prompt_token_ids: token id {bad} is outside the vocabulary [0, {self.info.vocab_size})")
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

    def max_new_tokens(self, num_prompt_tokens: int) -> int:
        """The largest max_tokens `validate` accepts after a prompt of this length (0: none)."""
        room = min(self.max_model_len, self.kv.num_blocks * self.kv.block_size)
        return max(0, room - num_prompt_tokens)

    def add_request(
        self,
        prompt: Prompt,
        params: SamplingParams,
        request_id: str | None = None,
        kv_send: bool = False,
        kv_recv: str | None = None,
    ) -> str:
        """Queue a request. PD: `kv_send` (a prefill instance's request: ends after its first
        token, blocks held for the pool write); `kv_recv` — "prompt" (a decode instance: the
        whole prompt's KV is read from the pool) or "prefix" (its leading full blocks, those
        the pool has) into preallocated blocks before the request computes."""
        token_ids = self.tokenize(prompt)
        self.validate(token_ids, params)
        return self.enqueue(token_ids, params, request_id, kv_send, kv_recv)

    def enqueue(
        self,
        token_ids: list[int],
        params: SamplingParams,
        request_id: str | None = None,
        kv_send: bool = False,
        kv_recv: str | None = None,
    ) -> str:
        """`add_request` for token ids that `validate` already passed (a batch checked whole)."""
        if request_id is None:
            request_id = f"req-{next(self._ids)}"
        if request_id in self._outputs:
            raise ValueError(f"request_id: {request_id!r} is already in use")
        request = Request(request_id, token_ids, params, eos_token_ids=self.eos_token_ids)
        request.kv_send = kv_send
        if kv_recv == "prompt":
            request.kv_recv_tokens = len(token_ids)
        elif kv_recv == "prefix":
            request.kv_recv_tokens = (len(token_ids) - 1) // self.kv.block_size * self.kv.block_size
        self.scheduler.add_request(request)
        self._requests[request_id] = request
        self._outputs[request_id] = RequestOutput(request_id=request_id, prompt_token_ids=token_ids, token_ids=[],
                                                  text="", finish_reason=None)  # fmt: skip
        self.num_prompt_tokens += len(token_ids)
        return request_id

    def abort(self, request_ids: list[str], reason: str = "abort") -> list[Delta]:
        """End requests (abort, or error when their step failed). Unknown ids are ignored."""
        status = RequestStatus.FINISHED_ERROR if reason == "error" else RequestStatus.FINISHED_ABORTED
        self.scheduler.finish_requests(request_ids, status)
        return [self._finish(request_id, reason, [], "") for request_id in request_ids if request_id in self._outputs]

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    def request(self, request_id: str) -> Request | None:
        """A live request (None once it finished)."""
        return self.scheduler.requests.get(request_id)

    @property
    def num_waiting(self) -> int:
        return len(self.scheduler.waiting)

    # ---- the PD handoff (the daemon's PD roles drive it; see Scheduler) ------------------
    def take_preallocated(self) -> list[Request]:
        """Requests whose blocks were preallocated since the last call: their KV may now be read."""
        return self.scheduler.take_preallocated()

    def kv_arrived(self, request_id: str, num_tokens: int) -> bool:
        """The pool KV of `num_tokens` leading tokens is in the request's blocks."""
        return self.scheduler.kv_arrived(request_id, num_tokens)

    def kv_failed(self, request_id: str) -> bool:
        """Give up on pool KV: the request computes its prompt here."""
        return self.scheduler.kv_failed(request_id)

    def begin_transfer(self, request_id: str) -> None:
        """A transfer may write the request's blocks: none of them is freed until it ends."""
        self.scheduler.begin_transfer(request_id)

    def end_transfer(self, request_id: str) -> None:
        """The transfer ended (or can no longer write); idempotent."""
        self.scheduler.end_transfer(request_id)

    # ---- the step ----------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        so = self.scheduler.schedule()
        for new in so.new_reqs:
            out = self._outputs.get(new.request_id)
            if out is not None and new.num_computed_tokens:
                out.num_cached_tokens = max(out.num_cached_tokens, new.num_computed_tokens)
        return so

    def process(self, mo: ModelOutput) -> list[Delta]:
        """Apply a step's sampled tokens; returns a delta per request that got tokens or finished."""
        deltas = []
        for eo in self.scheduler.update(mo):
            self.num_generated += len(eo.new_token_ids)
            delta = self._on_output(eo)
            if delta is not None:
                deltas.append(delta)
        return deltas

    def append_token(self, request_id: str, token: int, logprobs=None) -> list[Delta]:
        """A token sampled elsewhere (a decode instance's first token, sampled by the prefill instance)."""
        eo = self.scheduler.append_token(request_id, token, logprobs)
        if eo is None:
            return []
        self.num_generated += 1
        delta = self._on_output(eo)
        return [delta] if delta is not None else []

    def _on_output(self, eo: EngineOutput) -> Delta | None:
        out = self._outputs.get(eo.request_id)
        if out is None:
            return None
        out.token_ids += eo.new_token_ids
        if eo.new_logprobs:
            out.logprobs = (out.logprobs or []) + list(eo.new_logprobs)
        stops = self._requests[eo.request_id].sampling_params.stop
        detok = self._detok.get(eo.request_id)
        if detok is None and (self.stream_text or stops):
            detok = self._detok[eo.request_id] = IncrementalDetokenizer(self.tokenizer)
            new_ids = out.token_ids  # all of them: out already holds this step's tokens
        else:
            new_ids = eo.new_token_ids
        if detok is not None:
            old_len = len(detok.text)
            detok.add(new_ids)
        # A stop string that the step's tokens complete cuts the text even when the step ended
        # the request for its length: the client asked for the text up to the stop.
        if stops and eo.finish_reason in (None, "length"):
            cut = _stop_cut(stops, detok.text, old_len)
            if cut is not None:
                self.scheduler.finish_requests([eo.request_id], RequestStatus.FINISHED_STOPPED)
                return self._finish(eo.request_id, "stop", eo.new_token_ids, cut)
        if eo.finish_reason is not None:
            return self._finish(eo.request_id, eo.finish_reason, eo.new_token_ids)
        if not self.stream_text:
            return Delta(eo.request_id, eo.new_token_ids, "")
        # The last len(longest stop) - 1 characters may be the start of a stop string that
        # the next token completes: they wait, so the stream never shows text the cut removes.
        end = len(detok.text) - (max(map(len, stops)) - 1 if stops else 0)
        sent = self._sent_text.get(eo.request_id, 0)
        if end <= sent:
            return Delta(eo.request_id, eo.new_token_ids, "")
        self._sent_text[eo.request_id] = end
        out.text = detok.text[:end]
        return Delta(eo.request_id, eo.new_token_ids, detok.text[sent:end])

    def _finish(self, request_id: str, reason: str, new_ids: list[int], text: str | None = None) -> Delta:
        out = self._outputs[request_id]
        # The final text is one whole decode (authoritative); the stream gets what it lacks.
        final = text if text is not None else self.tokenizer.decode(out.token_ids, skip_special_tokens=True)
        delta_text = final[self._sent_text.pop(request_id, 0) :] if self.stream_text else ""
        out.text = final
        out.finish_reason = reason
        del self._outputs[request_id]
        self._requests.pop(request_id, None)
        self._detok.pop(request_id, None)
        return Delta(request_id, list(new_ids), delta_text, reason, out)

    def check_integrity(self) -> None:
        self.scheduler.check_integrity()

    def stats(self) -> dict[str, float | int]:
        pool = self.kv.pool
        cached_only = pool.num_cached_only
        return {
            "waiting": len(self.scheduler.waiting),
            "running": len(self.scheduler.running),
            "blocks_total": pool.num_blocks,
            "blocks_free": pool.num_free - cached_only,
            "blocks_cached_only": cached_only,
            "blocks_held": pool.num_held,
            "prefix_hit_rate": self.kv.prefix_hit_rate,
            "prefix_hit_tokens": self.kv.prefix_hits,
            "preemptions": self.scheduler.num_preemptions,
            "swaps": self.scheduler.num_swaps,
            "generated_tokens": self.num_generated,
            "prompt_tokens": self.num_prompt_tokens,
            "time": time.time(),
        }


def _stop_cut(stops: list[str], text: str, old_len: int) -> str | None:
    """`text` up to the first stop string that the characters after `old_len` complete."""
    start = max(0, old_len - max(map(len, stops)) + 1)
    hits = [i for i in (text.find(s, start) for s in stops) if i >= 0]
    return text[: min(hits)] if hits else None
