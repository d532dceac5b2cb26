"""The Retry-After hint: its formula (CompletionRate), the RetryAfter message it travels in
on ZeroMQ (which a client from before it skips), and the client's KvdError.retry_after.
The daemon end to end is in test_http.py."""

import math

import msgspec
import pytest

from kvd.client import KvdError, _chunk
from kvd.daemon.backoff import MAX_S, MIN_S, CompletionRate
from kvd.messages import Error, ErrorCode, RetryAfter, ServerMessage


def test_no_completion_yet_is_the_ceiling():
    assert CompletionRate().retry_after(10, now=100.0) == MAX_S


def test_the_queue_ahead_at_the_recent_rate():
    rate = CompletionRate(window_s=30.0)
    for i in range(20):  # 20 completions over the last 10 s: 2 per second
        rate.record(now=90.0 + 0.5 * i)
    assert rate.retry_after(9, now=100.0) == 5  # (9 + 1) / 2
    assert rate.retry_after(0, now=100.0) == MIN_S
    assert rate.retry_after(10_000, now=100.0) == MAX_S


def test_a_burst_after_an_idle_spell_is_measured_over_its_own_span():
    rate = CompletionRate(window_s=30.0)
    for i in range(10):  # 10 per second for the last second, nothing before
        rate.record(now=99.0 + 0.1 * i)
    assert rate.retry_after(29, now=100.0) == 3  # 30 / 10, not 30 / (10 / 30 s)


def test_a_queue_that_stops_moving_waits_longer_then_the_ceiling():
    rate = CompletionRate(window_s=30.0)
    for i in range(10):
        rate.record(now=99.0 + 0.1 * i)
    assert rate.retry_after(29, now=110.0) > rate.retry_after(29, now=100.0)
    assert rate.retry_after(29, now=200.0) == MAX_S  # every completion is older than the window


def test_a_client_from_before_the_hint_still_gets_the_error():
    # That client's reply union: the same messages, without RetryAfter.
    class _Old(msgspec.Struct, frozen=True, forbid_unknown_fields=True, tag_field="type"):
        pass

    class OldError(_Old, tag="error"):
        request_id: str | None
        code: ErrorCode
        message: str

    enc = msgspec.msgpack.Encoder()
    frames = [enc.encode(RetryAfter("r", 3.0)), enc.encode(Error("r", ErrorCode.QUEUE_FULL, "queue: full"))]
    with pytest.raises(msgspec.ValidationError):  # what it cannot decode it drops (kvd/client.py)
        msgspec.msgpack.decode(frames[0], type=OldError)
    assert msgspec.msgpack.decode(frames[1], type=OldError) == OldError("r", ErrorCode.QUEUE_FULL, "queue: full")
    assert [msgspec.msgpack.decode(f, type=ServerMessage) for f in frames] == [
        RetryAfter("r", 3.0), Error("r", ErrorCode.QUEUE_FULL, "queue: full")]  # fmt: skip


@pytest.mark.parametrize(("sent", "seen"), [(3.0, 3.0), (None, None), (math.nan, None), (-1.0, None),
                                            (math.inf, None)])  # fmt: skip
def test_the_client_error_carries_the_hint(sent, seen):
    hint = None if sent is None else RetryAfter("r", sent)
    with pytest.raises(KvdError) as e:
        _chunk(Error("r", ErrorCode.QUEUE_FULL, "queue: 1 requests already waiting"), hint)
    assert e.value.code == 429 and e.value.retry_after == seen
