"""The OpenAI API's request and response shapes, and their mapping onto kvd's own.

Requests decode into frozen msgspec Structs that reject unknown fields, so a typo is a 400
naming the field; what kvd cannot honour (`best_of` above 1, `suffix`) is refused with a
400 naming the field: a client never gets a silently different answer. `n` choices of a
prompt come back as choices i*n .. i*n+n-1 of the i-th prompt, usage counting each prompt
once; `logprobs` (completions: the top N; chat: `logprobs` and `top_logprobs`) come in
OpenAI's shapes, of the model's raw distribution. vLLM's extensions (`top_k`, `min_p`,
`min_tokens`, `repetition_penalty`, `ignore_eos`, `stop_token_ids`, `bad_words`,
`prompt_logprobs`, `structured_outputs`, ...) map onto kvd's SamplingParams. A
completion's prompt is a string, a list of token ids, or a list of either (each prompt one
choice); a chat's messages go through the model's chat template (text content only), with
its `tools` and tool calls as kvd.daemon.tools says.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import msgspec
from aiohttp import web

from kvd.daemon.tools import (
    NamedToolChoice,
    ToolCallIn,
    ToolDef,
    ToolPlan,
    chat_turn,
    merge_calls,
)
from kvd.engine.text import Delta
from kvd.sampling import SamplingParams, StructuredOutputs
from kvd.scheduler.output import Logprobs

JSON = msgspec.json.Encoder()
SHUTDOWN_TIMEOUT_S = 5.0  # after the drain: handlers still writing their last event get this long


async def start_site(app: web.Application, host: str, port: int) -> tuple[web.AppRunner, str]:
    """Serve `app` on host:port (0: a free one), as an instance and the router both do: its
    handlers cancelled when a client leaves, no access log, and at cleanup (after the caller's
    drain) open answers get SHUTDOWN_TIMEOUT_S, not aiohttp's 60 s. Returns the runner and the URL."""
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None, shutdown_timeout=SHUTDOWN_TIMEOUT_S)
    await runner.setup()
    await web.TCPSite(runner, host, max(port, 0)).start()
    return runner, f"http://{host}:{runner.addresses[0][1]}"


class StreamOptions(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """`stream_options`: a last chunk with the usage."""

    include_usage: bool = False
    continuous_usage_stats: bool = False  # accepted (vLLM sends it); usage comes in the last chunk


class JsonSchema(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """`response_format.json_schema`."""

    name: str | None = None
    schema: dict[str, Any] | None = None
    strict: bool | None = None
    description: str | None = None


class ResponseFormat(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """`response_format`: text, any JSON object, or JSON that fits a schema."""

    type: str
    json_schema: JsonSchema | None = None

    def spec(self) -> StructuredOutputs | None:
        if self.type == "text":
            return None
        if self.type == "json_object":
            return StructuredOutputs(json_object=True)
        if self.type == "json_schema":
            if self.json_schema is None or self.json_schema.schema is None:
                raise ValueError("response_format.json_schema.schema: required for type json_schema")
            return StructuredOutputs(json=JSON.encode(self.json_schema.schema).decode())
        raise ValueError(f"response_format.type: expected text, json_object or json_schema, got {self.type!r}")


class StructuredRequest(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """vLLM's `structured_outputs`: exactly one of these."""

    json: dict[str, Any] | str | None = None  # a JSON schema (or its text)
    json_object: bool | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None

    def spec(self) -> StructuredOutputs:
        schema = self.json if isinstance(self.json, str) or self.json is None else JSON.encode(self.json).decode()
        return StructuredOutputs(json=schema, json_object=bool(self.json_object), regex=self.regex,
                                 choice=self.choice, grammar=self.grammar)  # fmt: skip


class _Request(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """The fields completions and chat share."""

    model: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None  # None: 1.0, as OpenAI's
    top_p: float | None = None  # None: 1.0
    top_k: int | None = None  # vLLM's extension: None, 0 or -1 turn it off
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    n: int = 1
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    presence_penalty: float | None = None  # None: 0
    frequency_penalty: float | None = None  # None: 0
    logit_bias: dict[str, float] | None = None  # token id (a string, as JSON keys are) -> bias
    # vLLM's extensions
    repetition_penalty: float | None = None  # None: 1
    min_p: float | None = None
    min_tokens: int = 0
    allowed_token_ids: list[int] | None = None
    bad_words: list[str] | None = None  # each word's tokens, with and without a leading space, are banned
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredRequest | None = None

    def unsupported(self) -> tuple[str, str] | None:
        """(field, why) for an option kvd cannot honour, or None."""
        return None

    def num_logprobs(self) -> int | None:
        """How many alternatives each token's logprobs show (None: no logprobs)."""
        return None

    def sampling(self, max_tokens: int, words: Callable[[list[str]], list[list[int]]] | None = None) -> SamplingParams:
        """kvd's SamplingParams; ValueError names the field. `words`: `bad_words` to token ids."""
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        bias = {}
        for key, value in (self.logit_bias or {}).items():
            if not key.isdigit():
                raise ValueError(f"logit_bias: keys must be token ids, got {key!r}")
            bias[int(key)] = value
        bad = words(self.bad_words) if self.bad_words and words is not None else []
        return SamplingParams(
            n=self.n, max_tokens=max_tokens, temperature=_or(self.temperature, 1.0), top_p=_or(self.top_p, 1.0),
            top_k=0 if self.top_k in (None, -1) else self.top_k, min_p=_or(self.min_p, 0.0), seed=self.seed,
            stop=stop, stop_token_ids=list(self.stop_token_ids or []), ignore_eos=self.ignore_eos,
            logprobs=self.num_logprobs(), presence_penalty=_or(self.presence_penalty, 0.0),
            frequency_penalty=_or(self.frequency_penalty, 0.0), repetition_penalty=_or(self.repetition_penalty, 1.0),
            min_tokens=self.min_tokens, logit_bias=bias, allowed_token_ids=self.allowed_token_ids,
            bad_words_token_ids=bad, include_stop_str_in_output=self.include_stop_str_in_output,
            skip_special_tokens=self.skip_special_tokens, structured_outputs=self.structured())

    def structured(self) -> StructuredOutputs | None:
        """The output's grammar from `response_format` or `structured_outputs` (not both)."""
        if self.response_format is not None and self.structured_outputs is not None:
            raise ValueError("structured_outputs: give it or response_format, not both")
        if self.structured_outputs is not None:
            return self.structured_outputs.spec()
        return self.response_format.spec() if self.response_format is not None else None

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class CompletionRequest(_Request):
    """POST /v1/completions."""

    prompt: Any  # str | list[int] | list[str] | list[list[int]]: checked by `prompts()`
    echo: bool = False  # the prompt comes first in each choice's text (and its logprobs, with logprobs)
    logprobs: int | None = None
    prompt_logprobs: int | None = None  # vLLM's extension
    best_of: int | None = None
    suffix: str | None = None

    def unsupported(self) -> tuple[str, str] | None:
        if self.best_of not in (None, 1):
            return "best_of", "only 1 is supported"
        if self.suffix:
            return "suffix", "not supported"
        return super().unsupported()

    def num_logprobs(self) -> int | None:
        return self.logprobs

    def sampling(self, max_tokens: int, words=None) -> SamplingParams:
        """As for any request; `echo` with `max_tokens` 0 (how lm-evaluation-harness scores a
        prompt) samples one token that the response leaves out, and echo with logprobs asks
        for the prompt's."""
        if max_tokens == 0 and self.echo:
            max_tokens = 1
        params = super().sampling(max_tokens, words)
        prompt_logprobs = self.prompt_logprobs if self.prompt_logprobs is not None else (
            self.logprobs if self.echo else None)  # fmt: skip
        if prompt_logprobs is None:
            return params
        return msgspec.structs.replace(params, prompt_logprobs=prompt_logprobs)

    def prompts(self) -> list[str | list[int]]:
        """The prompts, one per choice; ValueError naming `prompt` for anything else."""
        p = self.prompt
        if isinstance(p, str) or (isinstance(p, list) and p and all(_is_token(t) for t in p)):
            return [p]
        if isinstance(p, list) and p and all(
            isinstance(x, str) or (isinstance(x, list) and x and all(_is_token(t) for t in x)) for x in p
        ):
            return list(p)
        raise ValueError("prompt: must be a string, a non-empty list of token ids, or a non-empty list of either")


def _is_token(t: Any) -> bool:
    return isinstance(t, int) and not isinstance(t, bool)


class ContentPart(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One part of a message's content; only text parts are supported."""

    type: str
    text: str | None = None


class ChatTurn(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One message of a chat: an assistant's may carry its `tool_calls`, a tool's answer
    names the call it answers."""

    role: str
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCallIn] | None = None
    tool_call_id: str | None = None


class ChatRequest(_Request):
    """POST /v1/chat/completions."""

    messages: list[ChatTurn]
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list[ToolDef] | None = None
    tool_choice: str | NamedToolChoice | None = None  # None: auto with tools, none without
    parallel_tool_calls: bool = True

    def tool_plan(self, parser: str) -> ToolPlan | None:
        """What the tools mean for this request (kvd.daemon.tools); ValueError naming the field."""
        plan = ToolPlan.of(self.tools, self.tool_choice, self.parallel_tool_calls, parser)
        if plan is not None and plan.constraint() is not None and self.structured() is not None:
            raise ValueError(f"tool_choice: {plan.mode!r} cannot be combined with response_format or "
                             "structured_outputs")  # fmt: skip
        return plan

    def sampling_with(self, max_tokens: int, words, plan: ToolPlan | None) -> SamplingParams:
        """`sampling`, decoding under the grammar of a named or required tool choice."""
        params = self.sampling(max_tokens, words)
        constraint = plan.constraint() if plan is not None else None
        return params if constraint is None else msgspec.structs.replace(params, structured_outputs=constraint)

    def num_logprobs(self) -> int | None:
        if self.top_logprobs is not None and not self.logprobs:
            raise ValueError("top_logprobs: needs logprobs: true")
        if self.top_logprobs is not None and not 0 <= self.top_logprobs <= 20:
            raise ValueError(f"top_logprobs: must be in [0, 20], got {self.top_logprobs}")
        return (self.top_logprobs or 0) if self.logprobs else None

    def chat(self) -> list[dict[str, Any]]:
        """The messages as the chat template takes them; ValueError naming the message."""
        return chat_messages(self.messages)


def chat_messages(turns: list[ChatTurn]) -> list[dict[str, Any]]:
    """Chat turns as the chat template takes them; ValueError naming the message."""
    out = []
    for i, turn in enumerate(turns):
        content = turn.content
        if isinstance(content, list):
            if any(part.type != "text" or part.text is None for part in content):
                raise ValueError(f"messages[{i}].content: only text parts are supported")
            content = "".join(part.text for part in content)
        out.append(chat_turn(turn.role, content, turn.tool_calls, turn.tool_call_id, f"messages[{i}]"))
    return out


# ---- responses ---------------------------------------------------------------------------
def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict[str, Any]:
    """OpenAI's usage object; `cached_tokens`: prompt tokens served from the prefix cache
    (whole blocks: the cache never holds a partial one as a prefix)."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}  # fmt: skip


LOGPROB_FLOOR = -9999.0  # JSON has no -inf: a token the distribution rules out shows this (as vLLM's)


class TokenText:
    """A token id's text as logprobs show it (its own decode, as vLLM's), cached: the same ids recur."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self._texts: dict[int, str] = {}

    def __call__(self, token_id: int) -> str:
        text = self._texts.get(token_id)
        if text is None:
            text = self._texts[token_id] = self.tokenizer.decode([token_id])
        return text


_FIRST = Logprobs(0.0, [], [])  # stands in for the first prompt token's, which has none


def _or(value, default):
    return default if value is None else value


def _lp(value: float) -> float:
    return max(value, LOGPROB_FLOOR)


class Shape:
    """How one endpoint's responses and stream chunks look, logprobs included when asked for."""

    def __init__(self, chat: bool, request_id: str, model: str, token_text: TokenText | None = None,
                 echo: list[str] | None = None, n: int = 1, drop_output: bool = False,
                 tools: ToolPlan | None = None) -> None:  # fmt: skip
        self.chat = chat
        self.request_id = request_id
        self.model = model
        self.created = int(time.time())
        self.token_text = token_text  # set: the request asked for logprobs
        self.echo = echo  # completions' echo: each prompt's text, which starts its choices' text
        self.n = n  # choices per prompt
        self.drop_output = drop_output  # echo with max_tokens 0: the one sampled token is left out
        self._started: set[int] = set()  # choices whose first chunk went out (chat: with the role)
        self._offsets: dict[int, int] = {}  # completions: each choice's text offset so far (streaming)
        self.tools = tools  # chat with tools: each choice's output is parsed into content and tool calls
        self._calls: dict[int, Any] = {}  # each choice's ToolStream (streaming)

    def logprobs(self, index: int, token_ids: list[int], logprobs: list[Logprobs] | None) -> dict[str, Any] | None:
        """The `logprobs` object of choice `index` for these tokens: chat's `content` list, or
        completions' parallel lists with each token's character offset in the choice's text."""
        if self.token_text is None or logprobs is None:
            return None
        text = self.token_text
        if self.chat:
            return {"content": [_chat_logprob(text, t, lp) for t, lp in zip(token_ids, logprobs)]}
        tokens = [text(t) for t in token_ids]
        offsets, at = [], self._offsets.get(index, 0)
        for t in tokens:
            offsets.append(at)
            at += len(t)
        self._offsets[index] = at
        tops = []
        for token, lp in zip(tokens, logprobs):
            top = {text(i): _lp(v) for i, v in zip(lp.top_ids, lp.top_logprobs)}
            top.setdefault(token, _lp(lp.logprob))  # the sampled token is always listed
            tops.append(top)
        return {"tokens": tokens, "token_logprobs": [_lp(lp.logprob) for lp in logprobs], "top_logprobs": tops,
                "text_offset": offsets}  # fmt: skip

    def _envelope(self, obj: str, **fields: Any) -> dict[str, Any]:
        return {"id": self.request_id, "object": obj, "created": self.created, "model": self.model, **fields}

    def _completion(self, index: int, text: str, token_ids: list[int], logprobs: list[Logprobs] | None,
                    prompt_ids: list[int] | None, prompt_logprobs: list | None) -> tuple[str, dict[str, Any] | None]:
        """A completion choice's text and logprobs: the prompt's first (echo; at its first
        chunk), the output's unless it is dropped."""
        if self.drop_output:
            text, token_ids, logprobs = "", [], [] if logprobs is not None else None
        if self.echo is None or index in self._started:
            return text, self.logprobs(index, token_ids, logprobs)
        self._started.add(index)
        text = self.echo[index // self.n] + text
        if self.token_text is None or prompt_logprobs is None:
            return text, self.logprobs(index, token_ids, logprobs)
        prompt = self.logprobs(index, prompt_ids, [lp or _FIRST for lp in prompt_logprobs])
        prompt["token_logprobs"][0] = prompt["top_logprobs"][0] = None  # the first prompt token has none
        rest = self.logprobs(index, token_ids, logprobs or [])
        return text, {key: prompt[key] + rest[key] for key in prompt}

    def chunk(self, index: int, delta: Delta) -> bytes:
        """One SSE event for a delta of choice `index`."""
        finish = delta.output.finish_reason if delta.output is not None else None
        if self.chat:
            body: dict[str, Any] = {"content": delta.text}
            calls = self._calls.setdefault(index, self.tools.stream()) if self.tools is not None else None
            if calls is not None:  # the text is split into content and tool calls
                content, deltas = calls.feed(delta.text)
                if finish is not None:
                    rest, more = calls.finish()
                    content, deltas = content + rest, deltas + more
                    finish = self.tools.finish_reason(finish, bool(calls.calls))
                body = {"content": content or None, "tool_calls": deltas} if deltas else {"content": content}
            if index not in self._started:
                self._started.add(index)
                body["role"] = "assistant"
            elif not (body.get("content") or body.get("tool_calls") or finish or self.token_text and delta.token_ids):
                return b""  # nothing to say yet (text held by the tool call parser)
            choice = {"index": index, "delta": body, "logprobs": self.logprobs(index, delta.token_ids, delta.logprobs),
                      "finish_reason": finish}  # fmt: skip
            return sse(self._envelope("chat.completion.chunk", choices=[choice]))
        text, logprobs = self._completion(index, delta.text, delta.token_ids, delta.logprobs, delta.prompt_token_ids,
                                          delta.prompt_logprobs)  # fmt: skip
        choice = {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish}
        return sse(self._envelope("text_completion", choices=[choice]))

    def usage_chunk(self, prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> bytes:
        obj = "chat.completion.chunk" if self.chat else "text_completion"
        return sse(self._envelope(obj, choices=[], usage=usage(prompt_tokens, completion_tokens, cached_tokens)))

    def response(self, outputs: list) -> dict[str, Any]:
        """The whole (non-streaming) response from each choice's RequestOutput."""
        if self.chat:
            choices = [{"index": i, **self._message(out), "logprobs": self.logprobs(i, out.token_ids, out.logprobs)}
                       for i, out in enumerate(outputs)]  # fmt: skip
        else:
            choices = []
            for i, out in enumerate(outputs):
                text, logprobs = self._completion(i, out.text, out.token_ids, out.logprobs, out.prompt_token_ids,
                                                  out.prompt_logprobs)  # fmt: skip
                choices.append({"index": i, "text": text, "logprobs": logprobs, "finish_reason": out.finish_reason})
        firsts = [out for out in outputs if out.index == 0]  # each prompt counts once
        n_prompt = sum(len(out.prompt_token_ids) for out in firsts)
        n_cached = sum(out.num_cached_tokens for out in firsts)
        n_out = 0 if self.drop_output else sum(len(out.token_ids) for out in outputs)
        obj = "chat.completion" if self.chat else "text_completion"
        return self._envelope(obj, choices=choices, usage=usage(n_prompt, n_out, n_cached))


    def _message(self, out) -> dict[str, Any]:
        """A chat choice's `message` and `finish_reason`: its tool calls parsed out, with tools."""
        calls = self.tools.stream() if self.tools is not None else None
        if calls is None:
            return {"message": {"role": "assistant", "content": out.text}, "finish_reason": out.finish_reason}
        content, deltas = calls.feed(out.text)
        rest, more = calls.finish()
        message: dict[str, Any] = {"role": "assistant", "content": content + rest}
        if deltas or more:
            message["content"] = message["content"] or None
            message["tool_calls"] = merge_calls(deltas + more)
        return {"message": message, "finish_reason": self.tools.finish_reason(out.finish_reason, bool(calls.calls))}


def _chat_logprob(text: TokenText, token_id: int, lp: Logprobs) -> dict[str, Any]:
    token = text(token_id)
    return {"token": token, "logprob": _lp(lp.logprob), "bytes": list(token.encode()),
            "top_logprobs": [{"token": (t := text(i)), "logprob": _lp(v), "bytes": list(t.encode())}
                             for i, v in zip(lp.top_ids, lp.top_logprobs)]}  # fmt: skip


def sse(obj: Any) -> bytes:
    return b"data: " + JSON.encode(obj) + b"\n\n"


DONE = b"data: [DONE]\n\n"

_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "invalid_request_error",
                413: "invalid_request_error", 429: "rate_limit_error", 503: "service_unavailable"}  # fmt: skip


def error_body(status: int, message: str, param: str | None = None) -> dict[str, Any]:
    """The OpenAI error object; `param` defaults to the field a kvd message starts with."""
    if param is None:
        head, sep, _ = message.partition(":")
        if sep and head and all(c.isalnum() or c in "_-.[]" for c in head):
            param = head
    kind = _ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": status}}
