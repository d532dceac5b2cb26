"""The offline API: prompts as text or ids, per-prompt params, bad input, stops, seeds, logprobs, chat."""

from __future__ import annotations

import pytest

from kvd import LLM, SamplingParams


@pytest.fixture(scope="module")
def llm(tiny_llama_dir):
    return LLM(str(tiny_llama_dir), dtype="float32", block_size=4, num_blocks=256, max_model_len=512)


GREEDY = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)


def test_text_and_ids_and_per_prompt_params(llm):
    ids = llm.tokenizer.encode("hello world", add_special_tokens=False)
    a, b = llm.generate(["hello world", ids], GREEDY)
    assert a.token_ids == b.token_ids and len(a.token_ids) == 8 and a.finish_reason == "length"
    assert a.text == llm.tokenizer.decode(a.token_ids, skip_special_tokens=True)
    outs = llm.generate([ids, ids], [GREEDY, SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)])
    assert [len(o.token_ids) for o in outs] == [8, 3]
    (single,) = llm.generate(ids, {"max_tokens": 2, "temperature": 0.0})
    assert len(single.token_ids) <= 2
    llm.check_integrity()


@pytest.mark.parametrize(
    "prompt, options, field",
    [
        ("", {}, "prompt"),
        ([], {}, "prompt"),
        ([1, 2, 10**7], {}, "prompt_token_ids"),
        ([1, -1], {}, "prompt_token_ids"),
        ([1] * 500, {"max_tokens": 100}, "max_tokens"),
        ("hi", {"max_tokens": 0}, "max_tokens"),
        ("hi", {"temperature": -0.5}, "temperature"),
        ("hi", {"top_p": 0.0}, "top_p"),
        ("hi", {"top_p": 1.5}, "top_p"),
        ("hi", {"frobnicate": 1}, "frobnicate"),
    ],
)
def test_bad_input_names_the_field_and_leaks_nothing(llm, prompt, options, field):
    before = llm.engine.kv.pool.num_free
    with pytest.raises(ValueError, match=field):
        llm.generate(["fine prompt", prompt], options)
    assert llm.engine.kv.pool.num_free == before and not llm.engine.has_unfinished()
    llm.check_integrity()


def test_prompt_beyond_cache_capacity(tiny_llama_dir):
    small = LLM(str(tiny_llama_dir), dtype="float32", block_size=4, num_blocks=8)
    with pytest.raises(ValueError, match="blocks"):
        small.generate([[5] * 30], SamplingParams(max_tokens=8))
    small.check_integrity()


def test_unknown_llm_option(tiny_llama_dir):
    with pytest.raises(ValueError, match="blok_size"):
        LLM(str(tiny_llama_dir), blok_size=4)


def test_stop_token_ids_and_stop_strings(llm):
    (ref,) = llm.generate("once", SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True))
    stop_at = ref.token_ids[3]
    (out,) = llm.generate("once", SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True,
                                                 stop_token_ids=[stop_at]))  # fmt: skip
    first = ref.token_ids.index(stop_at)
    assert out.token_ids == ref.token_ids[: first + 1] and out.finish_reason == "stop"
    needle = ref.text[len(ref.text) // 2 :][:3]
    if needle.strip():
        (cut,) = llm.generate("once", SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, stop=[needle]))
        assert cut.finish_reason == "stop" and needle not in cut.text and ref.text.startswith(cut.text)
    llm.check_integrity()


def test_seeded_sampling_is_batch_independent(llm):
    p = SamplingParams(max_tokens=10, temperature=1.0, top_k=50, top_p=0.9, seed=1234, ignore_eos=True)
    (alone,) = llm.generate("the sea", p)
    others = SamplingParams(max_tokens=10, temperature=0.8, ignore_eos=True)
    outs = llm.generate(["a", "the sea", "b c d e f g"], [others, p, others])
    assert outs[1].token_ids == alone.token_ids
    (other_seed,) = llm.generate("the sea", SamplingParams(max_tokens=10, temperature=1.0, seed=99, ignore_eos=True))
    assert other_seed.token_ids != alone.token_ids


def test_logprobs(llm):
    (g,) = llm.generate("abc", SamplingParams(max_tokens=4, temperature=0.0, ignore_eos=True, logprobs=3))
    assert len(g.logprobs) == 4
    for tok, lp in zip(g.token_ids, g.logprobs):
        assert lp.top_ids[0] == tok and lp.logprob == pytest.approx(lp.top_logprobs[0]) and lp.logprob <= 0
        assert lp.top_logprobs == sorted(lp.top_logprobs, reverse=True)


def test_chat_applies_template(llm):
    msgs = [{"role": "user", "content": "Hi"}]
    ids = llm.apply_chat_template(msgs)
    assert llm.tokenizer.decode(ids).rstrip().endswith("assistant")
    (a,) = llm.chat(msgs, GREEDY)
    (b,) = llm.generate(ids, GREEDY)
    assert a.token_ids == b.token_ids
    with pytest.raises(ValueError, match="chat"):
        llm.chat([{"content": "no role"}], GREEDY)
