"""SamplingParams: how one request's tokens are chosen and when it stops.

Validated on construction: a bad value raises ValueError naming the field. The
constructor rejects unknown keywords with TypeError (as any Python callable);
`SamplingParams.from_options(dict)`, used for options that arrive as data (the
wire, the CLI, `LLM.generate` given a dict), turns those into ValueError too.
"""

from __future__ import annotations

import math
from typing import Any

import msgspec

INT32 = 2**31 - 1
MAX_N = 128  # choices per request (the engine also keeps n within its max_num_seqs)
MAX_LOGIT_BIAS = 100.0  # OpenAI's and vLLM's bound; a larger bias is clamped to it


class StructuredOutputs(msgspec.Struct, kw_only=True, frozen=True, forbid_unknown_fields=True):
    """What the output must match — exactly one of: a JSON schema (as JSON text), any JSON
    object, a regular expression, one of some strings, or an EBNF (GBNF) grammar. vLLM's
    `structured_outputs`; compiled by xgrammar (kvd/engine/grammar.py)."""

    json: str | None = None  # a JSON schema, serialized
    json_object: bool = False
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None

    def __post_init__(self) -> None:
        given = [name for name in ("json", "regex", "choice", "grammar") if getattr(self, name) is not None]
        given += ["json_object"] if self.json_object else []
        if len(given) != 1:
            raise ValueError(f"structured_outputs: give exactly one of json, json_object, regex, choice, grammar; "
                             f"got {given or 'none'}")  # fmt: skip
        if self.choice is not None and (not self.choice or not all(isinstance(c, str) and c for c in self.choice)):
            raise ValueError("structured_outputs.choice: must be a non-empty list of non-empty strings")
        for name in ("json", "regex", "grammar"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise ValueError(f"structured_outputs.{name}: must be a non-empty string")


class SamplingParams(msgspec.Struct, kw_only=True, frozen=True, forbid_unknown_fields=True):
    """Greedy when temperature == 0; otherwise temperature, min-p, top-k and top-p sampling.

    Names and ranges are vLLM's. The defaults change nothing: the logits transforms
    (penalties, bias, allowed and banned tokens, min-tokens) are off, and a greedy
    request with none of them is the argmax (kvd/worker/sampler.py applies them).
    Token ids are checked against the vocabulary by `check_vocab`, where it is known.
    """

    n: int = 1  # sequences sampled from the prompt (its choices), which share the prompt's KV
    max_tokens: int = 16
    temperature: float = 1.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0
    seed: int | None = None  # same seed, same tokens, whatever the batch
    stop_token_ids: list[int] = []
    stop: list[str] = []  # stop strings; the text is cut before the match
    include_stop_str_in_output: bool = False  # ... or after it
    skip_special_tokens: bool = True  # the text leaves out special tokens (their ids stay in token_ids)
    structured_outputs: StructuredOutputs | None = None  # the output must match this (a grammar)
    ignore_eos: bool = False
    logprobs: int | None = None  # None: off; N: the sampled token's logprob and the top N
    prompt_logprobs: int | None = None  # None: off; N: each prompt token's logprob and the top N
    presence_penalty: float = 0.0  # OpenAI's: subtracted once a token is in the output
    frequency_penalty: float = 0.0  # OpenAI's: subtracted per occurrence in the output
    repetition_penalty: float = 1.0  # transformers': a prompt or output token's logit is divided (> 0) or multiplied
    min_p: float = 0.0  # keep the tokens with p >= min_p * p_max (0: off)
    min_tokens: int = 0  # end-of-sequence and stop_token_ids are masked until this many output tokens
    logit_bias: dict[int, float] = {}  # token id -> added to its logit, clamped to [-100, 100]
    allowed_token_ids: list[int] | None = None  # None: all; else every other token is masked
    # Each sequence banned, as transformers' NoBadWordsLogitsProcessor: its last token is
    # masked while the output ends with the rest (vLLM's `bad_words` are strings; turning them
    # into ids is the text stage's).
    bad_words_token_ids: list[list[int]] = []

    def __post_init__(self) -> None:
        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) or not 1 <= self.max_tokens <= INT32:
            raise ValueError(f"max_tokens: must be an integer in [1, {INT32}], got {self.max_tokens!r}")
        if isinstance(self.n, bool) or not isinstance(self.n, int) or not 1 <= self.n <= MAX_N:
            raise ValueError(f"n: must be an integer in [1, {MAX_N}], got {self.n!r}")
        if not 0 <= self.temperature < float("inf"):
            raise ValueError(f"temperature: must be finite and >= 0, got {self.temperature!r}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p: must be in (0, 1], got {self.top_p!r}")
        if not 0 <= self.top_k <= INT32:
            raise ValueError(f"top_k: must be in [0, {INT32}] (0 turns it off), got {self.top_k!r}")
        if self.seed is not None and not -(2**63) <= self.seed < 2**63:
            raise ValueError(f"seed: must fit in 64 bits, got {self.seed!r}")
        if self.logprobs is not None and not 0 <= self.logprobs <= 20:
            raise ValueError(f"logprobs: must be in [0, 20], got {self.logprobs!r}")
        if self.prompt_logprobs is not None and not 0 <= self.prompt_logprobs <= 20:
            raise ValueError(f"prompt_logprobs: must be in [0, 20], got {self.prompt_logprobs!r}")
        if any(not isinstance(t, int) or not 0 <= t <= INT32 for t in self.stop_token_ids):
            raise ValueError(f"stop_token_ids: must be non-negative integers, got {self.stop_token_ids!r}")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ValueError(f"stop: must be non-empty strings, got {self.stop!r}")
        self._check_transforms()

    def _check_transforms(self) -> None:
        """The logits transforms' fields (vLLM's ranges); the logit bias is clamped here, once."""
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if not _is_number(value) or not -2 <= value <= 2:
                raise ValueError(f"{name}: must be in [-2, 2], got {value!r}")
        if not _is_number(self.repetition_penalty) or not 0 < self.repetition_penalty < math.inf:
            raise ValueError(f"repetition_penalty: must be finite and > 0, got {self.repetition_penalty!r}")
        if not _is_number(self.min_p) or not 0 <= self.min_p <= 1:
            raise ValueError(f"min_p: must be in [0, 1], got {self.min_p!r}")
        if not _is_int(self.min_tokens) or not 0 <= self.min_tokens <= self.max_tokens:
            raise ValueError(f"min_tokens: must be an integer in [0, max_tokens = {self.max_tokens}], "
                             f"got {self.min_tokens!r}")  # fmt: skip
        if not isinstance(self.logit_bias, dict):
            raise ValueError(f"logit_bias: must be a dict of token id to bias, got {self.logit_bias!r}")
        for token, bias in self.logit_bias.items():
            if not _is_token(token):
                raise ValueError(f"logit_bias: token ids must be integers in [0, {INT32}], got {token!r}")
            if not _is_number(bias) or math.isnan(bias):
                raise ValueError(f"logit_bias: the bias of token {token} must be a number, got {bias!r}")
        clamped = {t: float(min(MAX_LOGIT_BIAS, max(-MAX_LOGIT_BIAS, b))) for t, b in self.logit_bias.items()}
        msgspec.structs.force_setattr(self, "logit_bias", clamped)
        allowed = self.allowed_token_ids
        if allowed is not None and (not isinstance(allowed, list) or not allowed or not all(map(_is_token, allowed))):
            raise ValueError(f"allowed_token_ids: must be a non-empty list of token ids, got {allowed!r}")
        words = self.bad_words_token_ids
        if not isinstance(words, list) or not all(isinstance(w, list) and w and all(map(_is_token, w)) for w in words):
            raise ValueError(f"bad_words_token_ids: must be non-empty lists of token ids, got {words!r}")

    def check_vocab(self, vocab_size: int) -> None:
        """ValueError naming the field for a token id the model's vocabulary does not have
        (SamplingParams cannot know the vocabulary; the engine calls this when it validates)."""
        fields = [("logit_bias", list(self.logit_bias)), ("allowed_token_ids", self.allowed_token_ids or []),
                  ("bad_words_token_ids", [t for w in self.bad_words_token_ids for t in w])]  # fmt: skip
        for name, ids in fields:
            bad = next((t for t in ids if t >= vocab_size), None)
            if bad is not None:
                raise ValueError(f"{name}: token id {bad} is outside the vocabulary [0, {vocab_size})")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def penalized(self) -> bool:
        return self.presence_penalty != 0 or self.frequency_penalty != 0 or self.repetition_penalty != 1

    @classmethod
    def from_options(cls, options: dict[str, Any]) -> SamplingParams:
        """Build from a dict of options; unknown or ill-typed options raise ValueError naming them."""
        unknown = sorted(set(options) - set(cls.__struct_fields__))
        if unknown:
            raise ValueError(f"{unknown[0]}: unknown sampling option")
        try:
            return msgspec.convert(options, cls)
        except msgspec.ValidationError as e:
            raise ValueError(str(e)) from None


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_token(value: object) -> bool:
    return _is_int(value) and 0 <= value <= INT32
