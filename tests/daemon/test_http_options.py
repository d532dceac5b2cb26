"""The sampling and output options vLLM users send, through the official openai SDK against
a real `kvd serve` (and the ZeroMQ client): n choices, logprobs in OpenAI's shapes. Every
answer is checked for meaning (lengths, ranges, agreement with the offline engine)."""

from __future__ import annotations

import json
import math
import urllib.error
import urllib.request

import openai
import pytest

from kvd import LLM, SamplingParams
from kvd.client import Client

MODEL = "SmolLM2-135M-Instruct"
PROMPT = "The three largest cities of Japan are"


@pytest.fixture(scope="module")
def offline(smollm2_dir):
    return LLM(str(smollm2_dir), dtype="float32")


def test_n_choices_completions_and_chat(sdk, served):
    r = sdk.completions.create(model=MODEL, prompt=PROMPT, n=3, max_tokens=12, temperature=1.0, seed=7,
                               extra_body={"ignore_eos": True})  # fmt: skip
    assert sorted(c.index for c in r.choices) == [0, 1, 2]
    assert len({c.text for c in r.choices}) > 1  # three draws, not one answer three times
    one = sdk.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=1.0)
    assert r.usage.prompt_tokens == one.usage.prompt_tokens  # the prompt counts once
    assert r.usage.completion_tokens == 3 * 12  # the choices' tokens add up
    # Choice i draws as a request seeded with seed + i.
    again = sdk.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=1.0, seed=8,
                                   extra_body={"ignore_eos": True})  # fmt: skip
    assert again.choices[0].text == next(c.text for c in r.choices if c.index == 1)
    # Two prompts with n=2: choices 0-1 are the first prompt's, 2-3 the second's.
    two = sdk.completions.create(model=MODEL, prompt=[PROMPT, "Once upon a time"], n=2, max_tokens=6,
                                 temperature=0.0)  # fmt: skip
    by = {c.index: c.text for c in two.choices}
    assert by[0] == by[1] and by[2] == by[3] and by[0] != by[2]
    chat = sdk.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Say hi."}], n=2,
                                       max_tokens=8, temperature=0.9)  # fmt: skip
    assert sorted(c.index for c in chat.choices) == [0, 1] and all(c.message.content for c in chat.choices)
    # Streamed: every choice's chunks carry its index, and each ends with a finish_reason.
    stream = sdk.completions.create(model=MODEL, prompt=PROMPT, n=2, max_tokens=8, temperature=1.0, stream=True)
    texts, finished = {0: "", 1: ""}, set()
    for chunk in stream:
        for c in chunk.choices:
            texts[c.index] += c.text
            if c.finish_reason:
                finished.add(c.index)
    assert finished == {0, 1} and all(texts.values())


def test_n_over_zeromq(served):
    with Client(served.endpoint, timeout=120) as c:
        outs = c.generate(prompt=PROMPT, n=3, max_tokens=6, temperature=0.0)
        assert [o.index for o in outs] == [0, 1, 2] and len({tuple(o.token_ids) for o in outs}) == 1
        chunks = list(c.stream(prompt=PROMPT, n=2, max_tokens=5, temperature=1.0, seed=3))
        assert sorted(ch.index for ch in chunks if ch.finish_reason) == [0, 1]


def test_completion_logprobs_match_the_offline_engine(sdk, offline):
    (ref,) = offline.generate(PROMPT, SamplingParams(max_tokens=10, temperature=0.0, logprobs=3))
    r = sdk.completions.create(model=MODEL, prompt=PROMPT, max_tokens=10, temperature=0, logprobs=3)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 10
    assert "".join(lp.tokens) == r.choices[0].text
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(10)]
    for got, want, top in zip(lp.token_logprobs, ref.logprobs, lp.top_logprobs):
        assert got <= 0 and math.isclose(got, want.logprob, abs_tol=1e-4)
        assert len(top) >= 3 and math.isclose(max(top.values()), got, abs_tol=1e-6)  # greedy: the top token
    # Streamed, each chunk carries its tokens' logprobs.
    chunks = list(sdk.completions.create(model=MODEL, prompt=PROMPT, max_tokens=10, temperature=0, logprobs=1,
                                         stream=True))  # fmt: skip
    streamed = [x for c in chunks if c.choices and c.choices[0].logprobs for x in c.choices[0].logprobs.token_logprobs]
    assert len(streamed) == 10 and all(math.isclose(a, b, abs_tol=1e-6) for a, b in zip(streamed, lp.token_logprobs))


def test_chat_logprobs(sdk):
    messages = [{"role": "user", "content": "Name a colour."}]
    r = sdk.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, temperature=0, logprobs=True,
                                    top_logprobs=2)  # fmt: skip
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    for item in content:
        assert item.logprob <= 0 and bytes(item.bytes).decode(errors="replace") == item.token
        assert len(item.top_logprobs) == 2 and item.top_logprobs[0].logprob >= item.top_logprobs[1].logprob
        assert math.isclose(item.top_logprobs[0].logprob, item.logprob, abs_tol=1e-6)
    stream = sdk.chat.completions.create(model=MODEL, messages=messages, max_tokens=8, temperature=0, logprobs=True,
                                         stream=True)  # fmt: skip
    items = [x for c in stream if c.choices and c.choices[0].logprobs for x in c.choices[0].logprobs.content]
    assert [x.token for x in items] == [x.token for x in content]
    with pytest.raises(openai.BadRequestError, match="top_logprobs"):
        sdk.chat.completions.create(model=MODEL, messages=messages, max_tokens=2, logprobs=True, top_logprobs=21)


def _ids(served, **kw) -> list[int]:
    with Client(served.endpoint, timeout=120) as c:
        return c.generate(**kw).token_ids


REPEAT = "one two three one two three one two three one two three"


def test_penalties_change_a_repetitive_output(sdk):
    base = dict(model=MODEL, prompt=REPEAT, max_tokens=40, temperature=0, extra_body={"ignore_eos": True})
    plain = sdk.completions.create(**base, logprobs=0).choices[0].logprobs.tokens
    for extra in ({"frequency_penalty": 2.0}, {"presence_penalty": 2.0},
                  {"extra_body": {"ignore_eos": True, "repetition_penalty": 1.5}}):  # fmt: skip
        kw = base | extra
        got = sdk.completions.create(**kw, logprobs=0).choices[0].logprobs.tokens
        assert got != plain and len(set(got)) > len(set(plain)), extra  # fewer repeats, more distinct tokens


def test_logit_bias_allowed_and_bad_words(sdk, served, offline):
    token = offline.tokenizer.encode(" banana", add_special_tokens=False)[0]
    r = sdk.completions.create(model=MODEL, prompt=PROMPT, max_tokens=5, temperature=0.7,
                               logit_bias={str(token): 100}, extra_body={"ignore_eos": True})  # fmt: skip
    assert r.choices[0].text == offline.tokenizer.decode([token] * 5)
    allowed = offline.tokenizer.encode(" yes no maybe", add_special_tokens=False)
    ids = _ids(served, prompt=PROMPT, max_tokens=8, temperature=1.0, seed=1, allowed_token_ids=allowed,
               ignore_eos=True)  # fmt: skip
    assert set(ids) <= set(allowed) and len(ids) == 8
    greedy = sdk.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=0).choices[0].text
    word = greedy.split()[0]
    banned = sdk.completions.create(model=MODEL, prompt=PROMPT, max_tokens=12, temperature=0,
                                    extra_body={"bad_words": [word]}).choices[0].text  # fmt: skip
    assert word not in banned.split() and banned != greedy


def test_min_tokens_min_p_and_stop_strings(sdk):
    short = sdk.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "What is 2+2? Answer with a number only."}],
                                        max_tokens=60, temperature=0)  # fmt: skip
    assert short.usage.completion_tokens < 30 and short.choices[0].finish_reason == "stop"
    longer = sdk.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "What is 2+2? Answer with a number only."}],
                                         max_tokens=60, temperature=0, extra_body={"min_tokens": 30})  # fmt: skip
    assert longer.usage.completion_tokens >= 30
    r = sdk.completions.create(model=MODEL, prompt=PROMPT, max_tokens=16, temperature=0.8, top_p=0.95,
                               extra_body={"min_p": 0.05, "top_k": 20})  # fmt: skip
    assert r.choices[0].text
    cut = sdk.completions.create(model=MODEL, prompt=REPEAT, max_tokens=20, temperature=0, stop=["three"])
    kept = sdk.completions.create(model=MODEL, prompt=REPEAT, max_tokens=20, temperature=0, stop=["three"],
                                  extra_body={"include_stop_str_in_output": True})  # fmt: skip
    assert kept.choices[0].text == cut.choices[0].text + "three"


@pytest.mark.parametrize("max_tokens", [0, 1])
def test_echo_scores_a_prompt_as_lm_evaluation_harness_asks(sdk, offline, max_tokens):
    ids = offline.tokenizer.encode(PROMPT + " Tokyo", add_special_tokens=False)
    (ref,) = offline.generate([ids], SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=1))
    r = sdk.completions.create(model=MODEL, prompt=ids, max_tokens=max_tokens, temperature=0, logprobs=1, echo=True)
    choice = r.choices[0]
    lp = choice.logprobs
    assert len(lp.tokens) == len(ids) + max_tokens and lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert choice.text.startswith(offline.tokenizer.decode(ids)) and r.usage.completion_tokens == max_tokens
    for got, want in zip(lp.token_logprobs[1 : len(ids)], ref.prompt_logprobs[1:]):
        assert got <= 0 and math.isclose(got, want.logprob, abs_tol=1e-4)
    # lm-evaluation-harness's greedy check: the token's logprob is the top one's.
    tops = lp.top_logprobs[1 : len(ids)]
    assert all(len(t) >= 1 for t in tops)
    # Streamed, the chunks add up to the same text and logprobs.
    text, tokens, token_logprobs = "", [], []
    for chunk in sdk.completions.create(model=MODEL, prompt=ids, max_tokens=max_tokens, temperature=0, logprobs=1,
                                        echo=True, stream=True):  # fmt: skip
        for c in chunk.choices:
            text += c.text
            if c.logprobs is not None:
                tokens += c.logprobs.tokens
                token_logprobs += c.logprobs.token_logprobs
    assert (text, tokens) == (choice.text, lp.tokens) and token_logprobs[0] is None
    assert all(math.isclose(a, b, abs_tol=1e-4) for a, b in zip(token_logprobs[1:], lp.token_logprobs[1:]))


def test_tokenizer_endpoints(served, offline):
    def call(path, body=None):
        req = urllib.request.Request(served.url + path, data=json.dumps(body).encode() if body is not None else None,
                                     headers={"Content-Type": "application/json"})  # fmt: skip
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    status, t = call("/tokenize", {"prompt": PROMPT, "add_special_tokens": False, "return_token_strs": True})
    ids = offline.tokenizer.encode(PROMPT, add_special_tokens=False)
    assert status == 200 and t["tokens"] == ids and t["count"] == len(ids) and len(t["token_strs"]) == len(ids)
    assert call("/detokenize", {"tokens": t["tokens"]}) == (200, {"prompt": PROMPT})
    messages = [{"role": "user", "content": "Hi"}]
    status, chat = call("/tokenize", {"messages": messages})
    assert status == 200 and chat["tokens"] == offline.apply_chat_template(messages)
    status, info = call("/tokenizer_info")
    assert status == 200 and info["eos_token"] and info["chat_template"] and info["model_max_length"] > 0
    for body, field in (({"tokens": [10**9]}, "tokens"), ({"prompt": "x", "messages": messages}, "prompt"),
                        ({"bogus": 1}, "bogus")):  # fmt: skip
        path = "/detokenize" if "tokens" in body else "/tokenize"
        status, err = call(path, body)
        assert status == 400 and err["error"]["param"] == field, err
