"""Wire messages, one group per channel: msgspec Structs in tagged unions, no pickle.

Channels:
- client ⇄ daemon frontend (DEALER ⇄ ROUTER): `ClientMessage` in, `ServerMessage` out.
  An accepted generate gets `Accepted`, then `Chunk`s, the last one carrying
  `finish_reason` — or one `Error` instead. Exactly one final message per request.
- daemon ⇄ worker (PUSH/PULL pairs): `ToWorker` out, `FromChild` in.
- daemon ⇄ cache messenger (PUSH/PULL pairs): `ToMessenger` out, `FromChild` in.

Errors are typed: an `ErrorCode` IntEnum and a message naming the field or the cause.
"""

from __future__ import annotations

import enum
from typing import Any

import msgspec

from kvd.engine.engine import ModelInfo
from kvd.sampling import SamplingParams
from kvd.scheduler.output import Logprobs, ModelOutput, SchedulerOutput


class ErrorCode(enum.IntEnum):
    BAD_REQUEST = 400
    QUEUE_FULL = 429
    INTERNAL = 500
    KV_TRANSFER_FAILED = 502
    UNAVAILABLE = 503  # not ready, or shutting down
    DEADLINE = 504


class _Msg(msgspec.Struct, frozen=True, forbid_unknown_fields=True, tag_field="type"):
    pass


# ---- client ⇄ frontend -------------------------------------------------------------------
class ChatMessage(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    role: str
    content: str


class Generate(_Msg, tag="generate", kw_only=True):
    request_id: str  # chosen by the client (unique per client), so it can abort at once
    prompt: str | None = None
    prompt_token_ids: list[int] | None = None
    chat: list[ChatMessage] | None = None
    params: SamplingParams = SamplingParams()
    stream: bool = True  # False: only the final chunk, with all tokens


class Abort(_Msg, tag="abort"):
    request_id: str


class Status(_Msg, tag="status"):
    pass


ClientMessage = Generate | Abort | Status


class Accepted(_Msg, tag="accepted"):
    request_id: str


class Chunk(_Msg, tag="chunk", kw_only=True):
    request_id: str
    token_ids: list[int]  # new ones (all of them in the final chunk of a non-streaming request)
    text: str  # new text
    finish_reason: str | None = None  # set on the last chunk only
    logprobs: list[Logprobs] | None = None
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0


class Error(_Msg, tag="error"):
    request_id: str | None
    code: ErrorCode
    message: str


class StatusReply(_Msg, tag="status_reply"):
    status: dict[str, Any]


ServerMessage = Accepted | Chunk | Error | StatusReply


# ---- daemon ⇄ children -------------------------------------------------------------------
class Step(_Msg, tag="step"):
    output: SchedulerOutput


class Shutdown(_Msg, tag="shutdown"):
    pass


ToWorker = Step | Shutdown


class Ready(_Msg, tag="ready", kw_only=True):
    process: str
    pid: int
    info: ModelInfo | None = None  # the worker's model and KV cache facts


class StepDone(_Msg, tag="step_done"):
    output: ModelOutput


class StepFailed(_Msg, tag="step_failed"):
    step: int
    error: str  # the step's requests fail; the worker stays up


class Dead(_Msg, tag="dead"):
    process: str
    reason: str


FromChild = Ready | StepDone | StepFailed | Dead
ToMessenger = Shutdown
