"""Wire messages, one group per channel: msgspec Structs in tagged unions, no pickle.

Channels:
- client ⇄ daemon frontend (DEALER ⇄ ROUTER): `ClientMessage` in, `ServerMessage` out.
  An accepted generate gets `Accepted`, then `Chunk`s, the last one carrying
  `finish_reason` — or one `Error` instead. Exactly one final message per request; a 429
  or 503 Error comes right after a `RetryAfter` hint.
- daemon ⇄ worker (PUSH/PULL pairs): `ToWorker` out, `FromChild` in.
- daemon ⇄ cache messenger (PUSH/PULL pairs): `ToMessenger` out, `FromChild` in.
- decode instance ⇄ prefill instance (DEALER ⇄ ROUTER): `ToPrefill` out, `FromPrefill`
  back — the PD chain's PrefillRequest / PrefillDone / PrefillFailed / PrefillAbort and
  heartbeats. KV bytes never travel here: they go through the storage pool.

Errors are typed: an `ErrorCode` IntEnum and a message naming the field or the cause.

Request ids are the client's: 1 to 128 characters, unique among the daemon's live requests
(across all clients, so `kvd trace` and `kvd status` name one request by it). A request
whose id is live already gets a 400 and the live one goes on untouched.
"""

from __future__ import annotations

import enum
from typing import Annotated, Any

import msgspec

from kvd.model_info import KVShare, ModelInfo
from kvd.sampling import SamplingParams
from kvd.scheduler.output import Logprobs, ModelOutput, SchedulerOutput

MAX_REQUEST_ID = 128  # characters


class ErrorCode(enum.IntEnum):
    """The typed error codes, HTTP-like."""

    BAD_REQUEST = 400
    QUEUE_FULL = 429
    INTERNAL = 500
    KV_TRANSFER_FAILED = 502
    UNAVAILABLE = 503  # not ready, or shutting down
    DEADLINE = 504


class _Msg(msgspec.Struct, frozen=True, forbid_unknown_fields=True, tag_field="type"):
    """The base of every wire message: frozen, tagged by `type`, unknown fields rejected."""


# ---- client ⇄ frontend -------------------------------------------------------------------
class ChatMessage(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One chat turn."""

    role: str
    content: str


RequestId = Annotated[str, msgspec.Meta(min_length=1, max_length=MAX_REQUEST_ID)]


class Generate(_Msg, tag="generate", kw_only=True):
    """A client's request: one prompt source, sampling parameters, streaming or not."""

    request_id: RequestId  # chosen by the client, so it can abort at once; unique across all live requests
    prompt: str | None = None
    prompt_token_ids: list[int] | None = None
    chat: list[ChatMessage] | None = None
    params: SamplingParams = SamplingParams()
    stream: bool = True  # False: only the final chunk, with all tokens


class Abort(_Msg, tag="abort"):
    """End a live request of this client."""

    request_id: RequestId


class Status(_Msg, tag="status"):
    """Ask for the daemon's status."""


ClientMessage = Generate | Abort | Status


class Accepted(_Msg, tag="accepted"):
    """The request is queued; chunks or one error follow."""

    request_id: str


class Chunk(_Msg, tag="chunk", kw_only=True):
    """New tokens and text of a request; the last one carries finish_reason."""

    request_id: str
    token_ids: list[int]  # new ones (all of them in the final chunk of a non-streaming request)
    text: str  # new text
    finish_reason: str | None = None  # set on the last chunk only
    logprobs: list[Logprobs] | None = None
    num_prompt_tokens: int = 0
    num_cached_tokens: int = 0
    index: int = 0  # which of the request's n choices (a request with n > 1 ends after n final chunks)
    prompt_logprobs: list[Logprobs | None] | None = None  # with params.prompt_logprobs: in the first chunk


class Error(_Msg, tag="error"):
    """A request (or a frame, with request_id None) failed: the only final message it gets."""

    request_id: str | None
    code: ErrorCode
    message: str


class RetryAfter(_Msg, tag="retry_after"):
    """Sent just before the Error of a request refused with 429 or 503: how many seconds to
    wait before trying again. A message of its own rather than a field of Error: a client
    from before it cannot decode it and drops it (as any frame it cannot read), then gets
    the Error as always; a new field would have made such a client drop the Error itself
    (Error forbids unknown fields) and wait out its timeout."""

    request_id: str
    seconds: float


class StatusReply(_Msg, tag="status_reply"):
    """The status dict, as `kvd status --json` prints it."""

    status: dict[str, Any]


ServerMessage = Accepted | Chunk | Error | StatusReply | RetryAfter


# ---- daemon ⇄ children -------------------------------------------------------------------
class Step(_Msg, tag="step"):
    """Run one scheduled step."""

    output: SchedulerOutput


class Shutdown(_Msg, tag="shutdown"):
    """Exit cleanly."""


ToWorker = Step | Shutdown


class Ready(_Msg, tag="ready", kw_only=True):
    """A child is loaded and serving; the worker's carries its model and KV facts."""

    process: str
    pid: int
    info: ModelInfo | None = None  # the worker's model and KV cache facts
    kv: KVShare | None = None  # the worker's KV cache, when it is shared (prefill and decode roles)


class StepDone(_Msg, tag="step_done"):
    """The step's sampled tokens."""

    output: ModelOutput


class Dead(_Msg, tag="dead"):
    """A child is failing and exits; the reason names the exception."""

    process: str
    reason: str
    pid: int  # which start of the process it was: a late report never ends a newer one


# ---- daemon ⇄ cache messenger -------------------------------------------------------------
class MapKV(_Msg, tag="map_kv"):
    """The messenger's first message in the prefill and decode roles, sent once the worker is
    Ready: the KV cache to map. The messenger starts beside the worker (importing torch and
    opening the pool meanwhile) and reports Ready only after it has mapped this."""

    kv: KVShare


class CacheTask(_Msg, tag="cache_task", kw_only=True):
    """Write blocks to the pool (prefill) or read keys into preallocated blocks (decode)."""

    task_id: int
    request_id: str
    write: bool
    keys: list[str]  # full storage keys, one per block
    block_ids: list[int]
    deadline: float  # time.monotonic() on this host: a read never writes a block past it
    prefix: bool = False  # read only the longest leading run of keys that is present and verifies


class CacheTaskDone(_Msg, tag="cache_task_done", kw_only=True):
    """How a CacheTask ended: blocks and bytes moved, or the first key that failed."""

    task_id: int
    request_id: str
    ok: bool
    num_blocks: int  # blocks moved (a prefix read: the leading run it read)
    nbytes: int
    duration_ms: float
    code: ErrorCode = ErrorCode.KV_TRANSFER_FAILED
    error: str = ""  # names the first key that failed and how

    @classmethod
    def failed(cls, task_id: int, request_id: str, error: str) -> CacheTaskDone:
        """A task that never reached the messenger, or whose messenger died."""
        return cls(task_id=task_id, request_id=request_id, ok=False, num_blocks=0, nbytes=0, duration_ms=0.0,
                   error=error)  # fmt: skip


FromChild = Ready | StepDone | Dead | CacheTaskDone
ToMessenger = MapKV | CacheTask | Shutdown


# ---- decode instance ⇄ prefill instance --------------------------------------------------
class PrefillRequest(_Msg, tag="prefill_request", kw_only=True):
    """Decode asks a prefill instance to compute a prompt and write its KV to the pool."""

    handoff_id: str  # unique per attempt: late replies of an earlier attempt are told apart
    request_id: str  # the client's, for the logs of both instances
    token_ids: list[int]
    params: SamplingParams
    ttl_s: float  # the lease left: past it the decode side has given up
    namespace: str  # the decode side's storage namespace: a mismatch is a clear error


class PrefillDone(_Msg, tag="prefill_done", kw_only=True):
    """Every block is in the pool: the first token and the keys to read."""

    handoff_id: str
    request_id: str
    first_token: int
    logprobs: Logprobs | None
    keys: list[str]  # every block's storage key, the partial one last
    num_tokens: int
    num_cached_tokens: int  # prompt tokens the prefill instance did not compute (prefix hits)
    prefill_ms: float
    write_ms: float


class PrefillFailed(_Msg, tag="prefill_failed", kw_only=True):
    """The handoff failed (or was refused): code and cause."""

    handoff_id: str
    request_id: str
    code: ErrorCode
    message: str


class PrefillAbort(_Msg, tag="prefill_abort"):
    """Decode gave up on a handoff: stop and free its blocks."""

    handoff_id: str


class Ping(_Msg, tag="ping"):
    """Decode's heartbeat."""

    seq: int


class Pong(_Msg, tag="pong"):
    """A prefill instance's answer: who it is, its namespace, its queue, whether it drains."""

    seq: int
    instance: str  # the prefill instance's name (host:pid)
    namespace: str
    queued: int
    draining: bool = False  # shutting down: finishing its handoffs, taking no new ones


ToPrefill = PrefillRequest | PrefillAbort | Ping
FromPrefill = PrefillDone | PrefillFailed | Pong
