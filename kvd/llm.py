"""LLM: the offline, in-process API (docs/architecture.md, "Interfaces users see").

    from kvd import LLM, SamplingParams
    llm = LLM()                                   # the embedded SmolLM2-135M-Instruct
    outs = llm.generate(["text", [1, 2, 3]], SamplingParams(max_tokens=64, temperature=0.0))
    outs[0].token_ids, outs[0].text, outs[0].finish_reason

Every prompt is validated before any is queued, so a bad one raises ValueError
naming the field and nothing is left behind in the block pool.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

from kvd.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from kvd.engine.engine import Engine, Prompt
from kvd.engine.grammar import Grammars
from kvd.engine.text import Delta, TextStage, tokenizer_eos
from kvd.outputs import RequestOutput
from kvd.sampling import SamplingParams
from kvd.worker.model_runner import ModelRunner
from kvd.worker.models import load_tokenizer, resolve_model

Message = dict[str, str]


class LocalEngine(Engine):
    """An Engine with its ModelRunner and its text stage in the same process (the offline LLM)."""

    def __init__(self, config: EngineConfig) -> None:
        model_dir = resolve_model(config.model.model, config.model.cache_dir)
        tokenizer = load_tokenizer(model_dir)
        self.runner = ModelRunner(model_dir, config.model, config.cache)
        self.text = TextStage(tokenizer)
        info = self.runner.model_info()
        super().__init__(config, info, tokenizer_eos(tokenizer), grammars=Grammars(tokenizer, info.vocab_size))

    def add(self, token_ids: list[int], params: SamplingParams, request_id: str | None = None) -> list[str]:
        """Queue token ids that `validate` passed; returns the ids of its n choices (one for n = 1)."""
        request = self.enqueue(token_ids, params, request_id)
        choices = request.choices or [request]
        for choice in choices:
            self.text.start(choice)
        return [choice.request_id for choice in choices]

    def step(self) -> list[RequestOutput]:
        """One step: schedule → run → process → text. Returns the requests finished in it."""
        return [d.output for d in self.step_deltas() if d.output is not None]

    def step_deltas(self) -> list[Delta]:
        """One step's deltas; a stop string the text stage finds ends its request at once."""
        deltas, stopped = self.text.run(self.process(self.runner.execute(self.schedule())))
        self.stop(stopped)
        return deltas


class LLM:
    """Generate from a batch of prompts with continuous batching over a paged KV cache."""

    def __init__(self, model: str | None = None, *, config: EngineConfig | None = None, **options: Any) -> None:
        """`options` are fields of the config sections: dtype, device, block_size, num_blocks, ..."""
        self.engine = LocalEngine(config or _config_from_options(model, options))

    @property
    def tokenizer(self):
        return self.engine.text.tokenizer

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        params: SamplingParams | dict | Sequence[SamplingParams] | None = None,
        *,
        use_tqdm: bool | None = None,
    ) -> list[RequestOutput]:
        """Outputs in the order of `prompts`; one SamplingParams for all, or one per prompt. A
        prompt sampled with n > 1 has n outputs in a row (`index` 0 to n - 1)."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        prompts = list(prompts)
        param_list = _params_list(params, len(prompts))
        tokenized = [self.engine.text.prompt_ids(p) for p in prompts]
        for ids, p in zip(tokenized, param_list):
            self.engine.validate(ids, p)
        request_ids = [rid for ids, p in zip(tokenized, param_list) for rid in self.engine.add(ids, p)]
        return self._run(request_ids, use_tqdm)

    def chat(
        self,
        messages: list[Message] | list[list[Message]],
        params: SamplingParams | dict | Sequence[SamplingParams] | None = None,
        *,
        use_tqdm: bool | None = None,
    ) -> list[RequestOutput]:
        """Apply the tokenizer's chat template to one conversation or a list of them, then generate."""
        convs = [messages] if messages and isinstance(messages[0], dict) else messages
        return self.generate([self.apply_chat_template(c) for c in convs], params, use_tqdm=use_tqdm)

    def apply_chat_template(self, messages: list[Message]) -> list[int]:
        return self.engine.text.chat_ids(messages)

    def check_integrity(self) -> None:
        self.engine.check_integrity()

    def _run(self, request_ids: list[str], use_tqdm: bool | None) -> list[RequestOutput]:
        if use_tqdm is None:
            use_tqdm = len(request_ids) >= 8 and sys.stderr.isatty()
        bar = None
        if use_tqdm:
            from tqdm import tqdm

            bar = tqdm(total=len(request_ids), desc="generate", unit="req", dynamic_ncols=True)
        done: dict[str, RequestOutput] = {}
        try:
            while self.engine.has_unfinished():
                for out in self.engine.step():
                    done[out.request_id] = out
                    if bar is not None:
                        bar.update(1)
        except BaseException:
            self.engine.abort([r for r in request_ids if r not in done])
            raise
        finally:
            if bar is not None:
                bar.close()
        return [done[r] for r in request_ids]


def _params_list(params, n: int) -> list[SamplingParams]:
    if params is None:
        return [SamplingParams()] * n
    if isinstance(params, dict):
        return [SamplingParams.from_options(params)] * n
    if isinstance(params, SamplingParams):
        return [params] * n
    params = [SamplingParams.from_options(p) if isinstance(p, dict) else p for p in params]
    if len(params) != n:
        raise ValueError(f"params: {len(params)} SamplingParams for {n} prompts")
    return params


def _config_from_options(model: str | None, options: dict[str, Any]) -> EngineConfig:
    sections: dict[str, dict[str, Any]] = {"model": {"model": model}, "cache": {}, "scheduler": {}}
    owners = {"model": ModelConfig, "cache": CacheConfig, "scheduler": SchedulerConfig}
    for key, value in options.items():
        owner = next((name for name, cls in owners.items() if key in cls.__struct_fields__), None)
        if owner is None:
            raise ValueError(f"{key}: unknown LLM option")
        sections[owner][key] = value
    return EngineConfig(**{name: owners[name](**kw) for name, kw in sections.items()})
