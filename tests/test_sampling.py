"""SamplingParams: the logits transforms' fields, their ranges, and the wire."""

import math

import msgspec
import pytest

from kvd.messages import ClientMessage, Generate
from kvd.sampling import SamplingParams
from kvd.scheduler.output import NewRequestData


def test_defaults_turn_every_transform_off():
    p = SamplingParams()
    assert (p.presence_penalty, p.frequency_penalty, p.repetition_penalty, p.min_p, p.min_tokens) == (0, 0, 1, 0, 0)
    assert p.logit_bias == {} and p.allowed_token_ids is None and p.bad_words_token_ids == []
    assert not p.penalized


@pytest.mark.parametrize(
    "options, field",
    [
        ({"presence_penalty": 2.5}, "presence_penalty"),
        ({"presence_penalty": math.nan}, "presence_penalty"),
        ({"frequency_penalty": -2.01}, "frequency_penalty"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
        ({"repetition_penalty": -1.0}, "repetition_penalty"),
        ({"repetition_penalty": math.inf}, "repetition_penalty"),
        ({"min_p": -0.1}, "min_p"),
        ({"min_p": 1.01}, "min_p"),
        ({"min_tokens": -1}, "min_tokens"),
        ({"min_tokens": 17}, "min_tokens"),  # above max_tokens (16)
        ({"min_tokens": 2.5}, "min_tokens"),
        ({"logit_bias": {-3: 1.0}}, "logit_bias"),
        ({"logit_bias": {True: 1.0}}, "logit_bias"),
        ({"logit_bias": {3: math.nan}}, "logit_bias"),
        ({"logit_bias": {3: "up"}}, "logit_bias"),
        ({"allowed_token_ids": []}, "allowed_token_ids"),
        ({"allowed_token_ids": [1, -2]}, "allowed_token_ids"),
        ({"bad_words_token_ids": [[]]}, "bad_words_token_ids"),
        ({"bad_words_token_ids": [[1, -1]]}, "bad_words_token_ids"),
        ({"bad_words_token_ids": [1, 2]}, "bad_words_token_ids"),
    ],
)
def test_out_of_range_values_name_the_field(options, field):
    with pytest.raises(ValueError, match=f"^{field}: "):
        SamplingParams(**options)


def test_edges_of_the_ranges_are_accepted():
    SamplingParams(presence_penalty=-2, frequency_penalty=2.0, repetition_penalty=1e-3, min_p=1.0, min_tokens=16,
                   max_tokens=16, allowed_token_ids=[0], bad_words_token_ids=[[0], [1, 2, 3]])  # fmt: skip


def test_logit_bias_is_clamped_to_100():
    p = SamplingParams(logit_bias={1: 250, 2: -1e9, 3: 4, 4: math.inf})
    assert p.logit_bias == {1: 100.0, 2: -100.0, 3: 4.0, 4: 100.0}


def test_check_vocab_names_the_field():
    p = SamplingParams(logit_bias={5: 1.0}, allowed_token_ids=[1], bad_words_token_ids=[[2, 9]])
    p.check_vocab(10)
    with pytest.raises(ValueError, match="^bad_words_token_ids: token id 9 is outside the vocabulary"):
        p.check_vocab(9)
    with pytest.raises(ValueError, match="^logit_bias: token id 5"):
        p.check_vocab(5)


def test_the_new_fields_cross_the_wire():
    p = SamplingParams(max_tokens=20, temperature=0.7, presence_penalty=0.5, frequency_penalty=-0.5,
                       repetition_penalty=1.2, min_p=0.05, min_tokens=3, logit_bias={7: 100.0, 49151: -2.5},
                       allowed_token_ids=[7, 8, 9], bad_words_token_ids=[[1], [2, 3]])  # fmt: skip
    msg = Generate(request_id="r", prompt="hi", params=p)
    assert msgspec.msgpack.decode(msgspec.msgpack.encode(msg), type=ClientMessage) == msg
    new = NewRequestData("r", [1, 2], 2, [0], 0, p)
    assert msgspec.msgpack.decode(msgspec.msgpack.encode(new), type=NewRequestData) == new
    assert msgspec.json.decode(msgspec.json.encode(p), type=SamplingParams) == p  # int keys as JSON strings
    assert SamplingParams.from_options({"logit_bias": {7: 300}, "min_p": 0.1}).logit_bias == {7: 100.0}
    with pytest.raises(ValueError, match="presence_penalty"):
        msgspec.msgpack.decode(msgspec.msgpack.encode({"presence_penalty": 9.0}), type=SamplingParams)
