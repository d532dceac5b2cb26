"""TextStage: a request's text — prompts into token ids, token ids into text — kept off the step.

The engine sees token ids in and token ids out; everything about text is here:

    ids = text.prompt_ids(prompt)                  # a str or token ids; text.chat_ids(messages)
    text.start(request)                            # its TextState on the record
    delta = text.on_output(eo)                     # an EngineOutput → a Delta (None: nothing to send)
    delta.stopped                                  # a stop string ended it: tell the engine

The chat template is applied here and nowhere else. With `stream_text`, each step's
tokens grow the request's text incrementally (kvd.engine.detokenizer) and the text it
settles goes out with the tokens; the final text is one whole decode. A stop string that
the step's tokens complete ends the request here, with its text cut before the stop: the
caller then tells the engine (`Engine.stop`), and a token the engine computed for it
meanwhile is dropped, so the output is what it would have been had the step loop waited.
The daemon runs this stage in its own coroutine, not in the one that schedules steps
(kvd.daemon.serving); the offline LLM runs it after each step.
"""

from __future__ import annotations

import msgspec

from kvd.engine.detokenizer import IncrementalDetokenizer
from kvd.outputs import RequestOutput
from kvd.request import Request
from kvd.scheduler.output import EngineOutput, Logprobs

CHAT_ROLES = ("system", "user", "assistant", "tool")


class Delta(msgspec.Struct):
    """What one step added to one request; `output` is set once, when it finishes."""

    request_id: str
    token_ids: list[int]
    text: str
    finish_reason: str | None = None
    output: RequestOutput | None = None
    stopped: bool = False  # a stop string ended it here: the engine has not been told yet
    logprobs: list[Logprobs] | None = None  # of `token_ids`, when the request asked for them
    index: int = 0  # which of its request's n choices
    prompt_logprobs: list[Logprobs | None] | None = None  # on the request's first delta, when asked for
    prompt_token_ids: list[int] | None = None  # with prompt_logprobs: the tokens they are of


class TextState:
    """One request's text so far: its output record, detokenizer and what was streamed."""

    __slots__ = ("output", "detok", "sent", "done")

    def __init__(self, output: RequestOutput) -> None:
        self.output = output
        self.detok: IncrementalDetokenizer | None = None
        self.sent = 0  # characters of text streamed so far
        self.done = False


def tokenizer_eos(tokenizer) -> frozenset[int]:
    """The end-of-sequence id the tokenizer names (the model's config may name others)."""
    eos = getattr(tokenizer, "eos_token_id", None)
    return frozenset({eos}) if isinstance(eos, int) else frozenset()


class TextStage:
    """Tokenizing, chat templates, incremental detokenizing, stop strings, final outputs."""

    def __init__(self, tokenizer, stream_text: bool = False) -> None:
        self.tokenizer = tokenizer
        self.stream_text = stream_text  # decode text every step (the daemon streams it)

    # ---- prompts in --------------------------------------------------------------------
    def prompt_ids(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError("prompt: must not be empty")
            return self.tokenizer.encode(prompt, add_special_tokens=False)
        if not isinstance(prompt, (list, tuple)) or any(isinstance(t, bool) or not isinstance(t, int) for t in prompt):
            raise ValueError("prompt_token_ids: must be a list of integers")
        return list(prompt)

    def request_ids(self, prompt: str | None, prompt_token_ids: list[int] | None,
                    chat: list[dict[str, str]] | None) -> list[int]:  # fmt: skip
        """A request's prompt as token ids, from the one of its three forms it gives."""
        if sum(x is not None for x in (prompt, prompt_token_ids, chat)) != 1:
            raise ValueError("prompt: give exactly one of prompt, prompt_token_ids, chat")
        if chat is not None:
            return self.chat_ids(chat)
        return self.prompt_ids(prompt if prompt is not None else prompt_token_ids)

    def word_ids(self, words: list[str]) -> list[list[int]]:
        """Banned words as token sequences: each as it starts a text and after a space (a
        word mid-text is usually its own tokens with the space), as vLLM's `bad_words`."""
        out: list[list[int]] = []
        for word in words:
            if not isinstance(word, str) or not word.strip():
                raise ValueError(f"bad_words: must be non-empty strings, got {word!r}")
            for text in (word.lstrip(), " " + word.lstrip()):
                ids = self.tokenizer.encode(text, add_special_tokens=False)
                if ids and ids not in out:
                    out.append(ids)
        return out

    def chat_ids(self, messages: list[dict], add_generation_prompt: bool = True, continue_final_message: bool = False,
                 tools: list[dict] | None = None) -> list[int]:  # fmt: skip
        """The conversation through the model's chat template, with the generation prompt
        (unless told otherwise, as `/tokenize` may be); `tools`: the function definitions a
        template that renders tools is given (kvd.daemon.tools). A message may carry
        `tool_calls` and `tool_call_id` beside its role and content."""
        if not messages or any(
            not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str)
            for m in messages
        ):
            raise ValueError("chat: must be a non-empty list of {'role': str, 'content': str} messages")
        bad = next((i for i, m in enumerate(messages) if m["role"] not in CHAT_ROLES), None)
        if bad is not None:
            raise ValueError(f"chat[{bad}].role: expected one of {'|'.join(CHAT_ROLES)}, got {messages[bad]['role']!r}")
        try:
            ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                                     tokenize=True, continue_final_message=continue_final_message,
                                                     tools=tools)  # fmt: skip
        except Exception as e:  # noqa: BLE001 - a template's own refusal (jinja's raise_exception) is the client's
            raise ValueError(f"chat: the model's chat template refused the messages: {str(e)[:300]}") from None
        return list(ids["input_ids"] if hasattr(ids, "keys") else ids)

    # ---- token ids out -----------------------------------------------------------------
    def run(self, outs: list[EngineOutput]) -> tuple[list[Delta], list[str]]:
        """`on_output` for each: the deltas, and the requests a stop string ended here."""
        deltas = [d for d in map(self.on_output, outs) if d is not None]
        return deltas, [d.request_id for d in deltas if d.stopped]

    def start(self, request: Request) -> None:
        request.text = TextState(RequestOutput(request_id=request.request_id, prompt_token_ids=request.prompt_token_ids,
                                               token_ids=[], text="", finish_reason=None,
                                               index=request.index))  # fmt: skip

    def on_output(self, eo: EngineOutput) -> Delta | None:
        """A step's tokens (or the end) of one request as a Delta; None once it has ended here."""
        delta = self._delta(eo)
        if delta is not None:
            request = eo.request
            delta.index = request.index
            if eo.new_logprobs:
                delta.logprobs = list(eo.new_logprobs)
            out = request.text.output
            if request.prompt_logprobs is not None and out.prompt_logprobs is None:
                out.prompt_logprobs = delta.prompt_logprobs = list(request.prompt_logprobs)
                delta.prompt_token_ids = out.prompt_token_ids
        return delta

    def _delta(self, eo: EngineOutput) -> Delta | None:
        request = eo.request
        state: TextState = request.text
        if state.done:
            return None  # a stop string ended it before the engine knew: later tokens are dropped
        out = state.output
        out.token_ids += eo.new_token_ids
        out.num_cached_tokens = request.num_cached_tokens
        if eo.new_logprobs:
            out.logprobs = (out.logprobs or []) + list(eo.new_logprobs)
        params = request.sampling_params
        # Stop strings count once min_tokens tokens are out (vLLM's rule).
        stops = params.stop if len(out.token_ids) >= params.min_tokens else []
        detok = state.detok
        if detok is None and (self.stream_text or params.stop):
            detok = state.detok = IncrementalDetokenizer(self.tokenizer, params.skip_special_tokens)
            new_ids = out.token_ids  # all of them: out already holds this step's tokens
        else:
            new_ids = eo.new_token_ids
        if detok is not None:
            old_len = len(detok.text)
            detok.add(new_ids)
        # A stop string that the step's tokens complete cuts the text even when the step ended
        # the request for its length: the client asked for the text up to the stop.
        if stops and eo.finish_reason in (None, "length"):
            cut = _stop_cut(stops, detok.text, old_len, params.include_stop_str_in_output)
            if cut is not None:
                delta = self._finish(request, "stop", eo.new_token_ids, cut)
                delta.stopped = eo.finish_reason is None
                return delta
        if eo.finish_reason is not None:
            return self._finish(request, eo.finish_reason, eo.new_token_ids)
        if not self.stream_text:
            return Delta(out.request_id, eo.new_token_ids, "")
        # The last len(longest stop) - 1 characters may be the start of a stop string that
        # the next token completes: they wait, so the stream never shows text the cut removes.
        end = len(detok.text) - (max(map(len, params.stop)) - 1 if params.stop else 0)
        if end <= state.sent:
            return Delta(out.request_id, eo.new_token_ids, "")
        sent, state.sent = state.sent, end
        out.text = detok.text[:end]
        return Delta(out.request_id, eo.new_token_ids, detok.text[sent:end])

    def _finish(self, request: Request, reason: str, new_ids: list[int], text: str | None = None) -> Delta:
        state: TextState = request.text
        out = state.output
        state.done = True
        state.detok = None
        # The final text is one whole decode (authoritative); the stream gets what it lacks.
        skip = request.sampling_params.skip_special_tokens
        final = text if text is not None else self.tokenizer.decode(out.token_ids, skip_special_tokens=skip)
        delta_text = final[state.sent :] if self.stream_text else ""
        out.text = final
        out.finish_reason = reason
        return Delta(out.request_id, list(new_ids), delta_text, reason, out)


def _stop_cut(stops: list[str], text: str, old_len: int, include: bool = False) -> str | None:
    """`text` up to the first stop string that the characters after `old_len` complete
    (`include`: and the stop string itself)."""
    start = max(0, old_len - max(map(len, stops)) + 1)
    hits = [(i, len(s)) for i, s in ((text.find(s, start), s) for s in stops) if i >= 0]
    if not hits:
        return None
    at, length = min(hits)
    return text[: at + length] if include else text[:at]
