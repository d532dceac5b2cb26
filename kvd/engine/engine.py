"""Engine: token ids in, token ids out — validation, the scheduler, the request table.

The model runs elsewhere: in-process for the offline LLM (`kvd.llm.LocalEngine.step`),
in a worker process for the daemon. Either way one step is

    so = engine.schedule()          # SchedulerOutput, a diff
    mo = runner.execute(so)         # in-process call or a ZeroMQ round trip
    outs = engine.process(mo)       # EngineOutputs: new token ids per request, finished ones flagged

and text (prompts, chat templates, detokenizing, stop strings) is the text stage's
(`kvd.engine.text`), which turns those outputs into Deltas off the step. `add_request`
validates first and raises ValueError naming the field, so a rejected request never
touches the block pool. What the engine must know of the model arrives as a `ModelInfo`
(the worker's Ready message carries the same struct); how KV moves in and out of the
instance is its KV connector's (`kvd.connector`), chosen by the instance's role. Given a
`KVEventLog`, its block manager records the blocks it indexes and evicts there (KV events).
"""

from __future__ import annotations

import itertools
import time

import msgspec
import structlog

from kvd.cache.event_log import KVEventLog
from kvd.cache.kv_manager import KVCacheManager, cdiv
from kvd.config import EngineConfig
from kvd.connector.base import KVConnector
from kvd.engine.grammar import Grammars
from kvd.model_info import ModelInfo
from kvd.request import Request, RequestStatus
from kvd.sampling import SamplingParams
from kvd.scheduler.output import EngineOutput, ModelOutput, SchedulerOutput
from kvd.scheduler.scheduler import Scheduler

log = structlog.get_logger(__name__)

Prompt = str | list[int]


class Engine:
    """Scheduler + KV cache manager + the request table, for a model described by ModelInfo."""

    def __init__(self, config: EngineConfig, info: ModelInfo, eos_token_ids: frozenset[int] = frozenset(),
                 connector: KVConnector | None = None, grammars: Grammars | None = None,
                 events: KVEventLog | None = None) -> None:  # fmt: skip
        self.config = config
        self.grammars = grammars  # structured outputs (kvd.engine.grammar); None: refused
        self.info = info
        self.max_model_len = min(config.model.max_model_len or info.max_model_len, info.max_model_len)
        self.eos_token_ids = frozenset(info.eos_token_ids) | eos_token_ids  # the tokenizer may name another
        self.kv = KVCacheManager(
            info.num_blocks, info.block_size, config.cache.enable_prefix_caching, config.cache.hash_algo, events
        )
        self.connector = connector or KVConnector()
        self.scheduler = Scheduler(config.scheduler, self.kv, config.cache.preempt, info.num_host_slots,
                                   self.connector)  # fmt: skip
        self._ids = itertools.count()
        self.num_generated = 0
        self.num_prompt_tokens = 0

    # ---- requests ----------------------------------------------------------------------
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
        params.check_vocab(self.info.vocab_size)
        if params.n > self.scheduler.config.max_num_seqs:
            raise ValueError(f"n: at most scheduler.max_num_seqs ({self.scheduler.config.max_num_seqs}) choices, "
                             f"got {params.n}")  # fmt: skip
        if cdiv(total, self.kv.block_size) > self.kv.num_blocks:
            raise ValueError(
                f"max_tokens: prompt + max_tokens ({total} tokens) needs more blocks than the KV cache has"
                f" ({self.kv.num_blocks} of {self.kv.block_size} tokens)"
            )

    def max_new_tokens(self, num_prompt_tokens: int) -> int:
        """The largest max_tokens `validate` accepts after a prompt of this length (0: none)."""
        room = min(self.max_model_len, self.kv.num_blocks * self.kv.block_size)
        return max(0, room - num_prompt_tokens)

    def add_request(self, token_ids: list[int], params: SamplingParams, request_id: str | None = None) -> Request:
        """Validate and queue a request; returns its record (ValueError naming the field)."""
        self.validate(token_ids, params)
        return self.enqueue(token_ids, params, request_id)

    def enqueue(self, token_ids: list[int], params: SamplingParams, request_id: str | None = None) -> Request:
        """`add_request` for token ids that `validate` already passed (a batch checked whole).
        A request with n > 1 is n records, its choices (`request.choices`; the first is
        returned): the first keeps `request_id`, choice i is `<request_id>/<i>` and draws
        with seed + i, and each reuses the first's prompt KV (docs/architecture.md, "n choices")."""
        if request_id is None:
            request_id = f"req-{next(self._ids)}"
        ids = [request_id] + [f"{request_id}/{i}" for i in range(1, params.n)]
        taken = next((i for i in ids if i in self.scheduler.requests), None)
        if taken is not None:
            raise ValueError(f"request_id: {taken!r} is already in use")
        one = msgspec.structs.replace(params, n=1) if params.n > 1 else params
        records = [Request(rid, token_ids, _choice_params(one, i), eos_token_ids=self.eos_token_ids)
                   for i, rid in enumerate(ids)]  # fmt: skip
        if len(records) > 1:
            for i, request in enumerate(records):
                request.choices, request.index = records, i
        if params.structured_outputs is not None:
            if self.grammars is None:
                raise ValueError("structured_outputs: this engine has no tokenizer to compile grammars with")
            compiled = self.grammars.compile(params.structured_outputs)  # cached: the daemon compiled it already
            for request in records:
                request.grammar = self.grammars.matcher(compiled)
        for request in records:
            self.scheduler.add_request(request)
        self.num_prompt_tokens += len(token_ids)
        return records[0]

    def abort(self, request_ids: list[str], status=RequestStatus.FINISHED_ABORTED) -> list[EngineOutput]:
        """End live requests (abort, or error when their step failed); unknown or finished ids
        are ignored. Returns each ended request's last output, for the text stage."""
        assert status.finished
        return [EngineOutput(r, [], status.finish_reason) for r in self.scheduler.finish_requests(request_ids, status)]

    def stop(self, request_ids: list[str]) -> None:
        """The text stage found a stop string: the requests end, their text already cut."""
        self.scheduler.finish_requests(request_ids, RequestStatus.FINISHED_STOPPED)

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    def request(self, request_id: str) -> Request | None:
        """A live request (None once it finished)."""
        return self.scheduler.get(request_id)

    def requests(self) -> list[Request]:
        """The records of the table (finished ones too, while a transfer holds their blocks)."""
        return list(self.scheduler.requests.values())

    @property
    def num_waiting(self) -> int:
        return len(self.scheduler.waiting)

    # ---- KV from outside (the connector's; the daemon's PD roles drive it) --------------
    def kv_loaded(self, request_id: str, num_tokens: int) -> bool:
        """The external KV of `num_tokens` leading tokens is in the request's blocks."""
        return self.scheduler.kv_loaded(request_id, num_tokens)

    def kv_load_failed(self, request_id: str) -> bool:
        """Give up on external KV: the request computes its prompt here."""
        return self.scheduler.kv_load_failed(request_id)

    def begin_transfer(self, request: Request) -> None:
        """A transfer may touch the request's blocks: none of them is freed until it ends."""
        self.connector.begin_transfer(request)

    def end_transfer(self, request: Request) -> None:
        """A transfer of the request's blocks ended (or can no longer touch them); idempotent.
        A request that finished meanwhile has its blocks freed now."""
        self.connector.end_transfer(request)
        self.scheduler.release(request.request_id)

    # ---- the step ----------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        so = self.scheduler.schedule()
        for new in so.new_reqs:
            request = self.scheduler.requests[new.request_id]
            request.num_cached_tokens = max(request.num_cached_tokens, new.num_computed_tokens)
        return self._with_bitmasks(so)

    def _with_bitmasks(self, so: SchedulerOutput) -> SchedulerOutput:
        """The allowed next tokens of each constrained request that samples this step."""
        requests = self.scheduler.requests
        rows = [r for r in (requests[rid] for rid in [*so.num_scheduled_tokens, *so.forks])
                if r.grammar is not None and r.num_computed_tokens == r.num_tokens]  # fmt: skip
        if not rows:
            return so
        bitmask = self.grammars.bitmask(len(rows))
        for i, request in enumerate(rows):
            request.grammar.fill_next_token_bitmask(bitmask, i)
        words = bitmask.numpy()
        return msgspec.structs.replace(so, bitmasks={r.request_id: words[i].tobytes() for i, r in enumerate(rows)})

    def process(self, mo: ModelOutput) -> list[EngineOutput]:
        """Apply a step's sampled tokens: an output per request that got a token or finished."""
        outs = self.scheduler.update(mo)
        self.num_generated += len(outs)
        return outs

    def append_token(self, request_id: str, token: int, logprobs=None) -> list[EngineOutput]:
        """A token sampled elsewhere (a decode instance's first token, sampled by the prefill instance)."""
        eo = self.scheduler.append_token(request_id, token, logprobs)
        if eo is None:
            return []
        self.num_generated += 1
        return [eo]

    def check_integrity(self) -> None:
        self.scheduler.check_integrity()

    def stats(self) -> dict[str, float | int]:
        pool = self.kv.pool
        return {
            "waiting": len(self.scheduler.waiting),
            "running": len(self.scheduler.running),
            "blocks_total": pool.num_blocks,
            "blocks_free": pool.num_empty,
            "blocks_cached_only": pool.num_cached_only,
            "blocks_held": pool.num_held,
            "prefix_hit_rate": self.kv.prefix_hit_rate,
            "prefix_hit_tokens": self.kv.prefix_hits,
            "preemptions": self.scheduler.num_preemptions,
            "swaps": self.scheduler.num_swaps,
            "generated_tokens": self.num_generated,
            "prompt_tokens": self.num_prompt_tokens,
            "time": time.time(),
        }


def _choice_params(params: SamplingParams, index: int) -> SamplingParams:
    """Choice `index`'s parameters: a seeded request's choice i draws with seed + i (wrapping in 64 bits)."""
    if not index or params.seed is None:
        return params
    return msgspec.structs.replace(params, seed=(params.seed + index + 2**63) % 2**64 - 2**63)
