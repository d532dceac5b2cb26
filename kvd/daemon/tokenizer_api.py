"""The tokenizer endpoints, with vLLM's shapes: `/tokenize`, `/detokenize`, `/tokenizer_info`.

    POST /tokenize     {"prompt": str, "add_special_tokens": true}   (or "messages": [...], "tools": [...])
                       -> {"count", "max_model_len", "tokens", "token_strs"}
    POST /detokenize   {"tokens": [int]} -> {"prompt": str}
    GET  /tokenizer_info -> {"tokenizer_class", "eos_token", "bos_token", "pad_token", "chat_template", ...}

lm-evaluation-harness probes `/tokenizer_info` and `/tokenize` to use the server's
tokenizer instead of a local copy; clients count tokens with them. The chat form goes
through the same chat template as `/v1/chat/completions` (the text stage's `chat_ids`).
Bad input is a 400 naming the field, as on the other endpoints; with `[http] api_key` set
they need the bearer key too (vLLM leaves them open; kvd's key guards the whole server).
"""

from __future__ import annotations

from typing import Any

import msgspec

from kvd.daemon.openai_api import ChatTurn, chat_messages
from kvd.daemon.tools import ToolDef, render


class TokenizeRequest(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """POST /tokenize: a prompt, or chat messages."""

    model: str | None = None
    prompt: str | None = None
    messages: list[ChatTurn] | None = None
    tools: list[ToolDef] | None = None  # with messages: rendered as chat completions render them
    add_special_tokens: bool | None = None  # None: true for a prompt, false for messages (vLLM's defaults)
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    return_token_strs: bool = False

    def unsupported(self) -> tuple[str, str] | None:
        return None


class DetokenizeRequest(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """POST /detokenize."""

    model: str | None = None
    tokens: list[int]

    def unsupported(self) -> tuple[str, str] | None:
        return None


def tokenize(text_stage, body: TokenizeRequest, max_model_len: int | None) -> dict[str, Any]:
    """The response of /tokenize; ValueError naming the field."""
    tokenizer = text_stage.tokenizer
    if (body.prompt is None) == (body.messages is None):
        raise ValueError("prompt: give exactly one of prompt, messages")
    if body.messages is not None:
        if body.continue_final_message and body.add_generation_prompt:
            raise ValueError("continue_final_message: cannot be used with add_generation_prompt")
        messages, tools = render(chat_messages(body.messages), body.tools or [], str(tokenizer.chat_template))
        ids = text_stage.chat_ids(messages, body.add_generation_prompt, body.continue_final_message, tools)
        if body.add_special_tokens:
            ids = tokenizer.build_inputs_with_special_tokens(ids)
    else:
        special = True if body.add_special_tokens is None else body.add_special_tokens
        ids = tokenizer.encode(body.prompt, add_special_tokens=special)
    strs = tokenizer.convert_ids_to_tokens(ids) if body.return_token_strs else None
    return {"count": len(ids), "max_model_len": max_model_len, "tokens": ids, "token_strs": strs}


def detokenize(text_stage, body: DetokenizeRequest, vocab_size: int) -> dict[str, Any]:
    """The response of /detokenize; ValueError naming the field."""
    bad = next((t for t in body.tokens if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise ValueError(f"tokens: token id {bad} is outside the vocabulary [0, {vocab_size})")
    return {"prompt": text_stage.tokenizer.decode(body.tokens)}


def tokenizer_info(text_stage, max_model_len: int | None) -> dict[str, Any]:
    """What a client needs to tokenize as this server does."""
    tok = text_stage.tokenizer
    return {"tokenizer_class": type(tok).__name__, "eos_token": tok.eos_token, "bos_token": tok.bos_token,
            "pad_token": tok.pad_token, "unk_token": tok.unk_token, "chat_template": tok.chat_template,
            "model_max_length": max_model_len, "vocab_size": len(tok)}  # fmt: skip
