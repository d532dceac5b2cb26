"""The sampling options end to end through the offline LLM: against transformers' generate
with the same processors, across preemption, and each option's visible effect."""

from __future__ import annotations

import random

import pytest
import torch

from kvd import LLM, SamplingParams
from kvd.worker.models import load_model
from reference import assert_greedy_match

MAX_TOKENS = 24


@pytest.fixture(scope="module")
def smol(smollm2_dir):
    return LLM(str(smollm2_dir), dtype="float32", max_num_batched_tokens=512)


@pytest.fixture(scope="module")
def tiny(tiny_llama_dir):
    return LLM(str(tiny_llama_dir), dtype="float32", block_size=4, num_blocks=512, max_model_len=512)


@torch.inference_mode()
def hf_generate(model, prompt: list[int], **options) -> tuple[list[int], list[float]]:
    """transformers' greedy generate with its processors; (tokens, top-2 gap of the processed scores)."""
    out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                         do_sample=False, output_scores=True, return_dict_in_generate=True, pad_token_id=0,
                         **options)  # fmt: skip
    gaps = [float(s[0].topk(2).values[0] - s[0].topk(2).values[1]) for s in out.scores]
    return out.sequences[0, len(prompt) :].tolist(), gaps


def test_greedy_with_penalty_min_tokens_and_bad_words_matches_transformers(smollm2_dir, smol):
    """repetition_penalty (over prompt and output), min_tokens and single-token bad words are
    transformers' repetition_penalty, min_new_tokens and bad_words_ids, token for token."""
    ref = load_model(smollm2_dir, torch.float32, "cpu")
    tok = smol.tokenizer
    prompts = [smol.apply_chat_template([{"role": "user", "content": "Say hi."}]),
               tok.encode("one two three one two three one two three one two"),
               smol.apply_chat_template([{"role": "user", "content": "List the days of the week."}])]  # fmt: skip
    banned = [tok.encode(" one")[0], tok.encode("Hello")[0]]
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, repetition_penalty=1.3, min_tokens=12,
                            bad_words_token_ids=[[t] for t in banned])  # fmt: skip
    outs = smol.generate(prompts, params)
    for i, (p, o) in enumerate(zip(prompts, outs)):
        ref_tokens, gaps = hf_generate(ref, p, max_new_tokens=MAX_TOKENS, repetition_penalty=1.3, min_new_tokens=12,
                                       bad_words_ids=[[t] for t in banned], eos_token_id=2)  # fmt: skip
        assert_greedy_match(o.token_ids, ref_tokens, gaps, f"prompt {i}")
        assert len(o.token_ids) >= 12 and not set(o.token_ids) & set(banned)
    smol.check_integrity()


def test_penalties_bias_and_seeds_give_the_same_tokens_across_preemption(tiny_llama_dir):
    """Counts are rebuilt from a resumed request's tokens: recompute and swap preemption
    change nothing, greedy or seeded."""
    rng = random.Random(0)
    prompts = [[rng.randrange(100, 30000) for _ in range(n)] for n in (3, 17, 40, 64, 90, 150)]
    params = [
        SamplingParams(max_tokens=20, temperature=0.0, repetition_penalty=1.5, ignore_eos=True),
        SamplingParams(max_tokens=20, temperature=0.0, presence_penalty=1.0, frequency_penalty=0.5, ignore_eos=True),
        SamplingParams(max_tokens=20, temperature=0.9, top_p=0.9, seed=7, frequency_penalty=1.0, ignore_eos=True),
        SamplingParams(max_tokens=20, temperature=1.0, min_p=0.1, seed=8, repetition_penalty=1.2,
                       logit_bias={123: 3.0}, bad_words_token_ids=[[5, 6]], ignore_eos=True),
        SamplingParams(max_tokens=20, temperature=0.7, top_k=20, seed=9, presence_penalty=-0.5, ignore_eos=True),
        SamplingParams(max_tokens=20, temperature=0.0, logit_bias={77: 5.0}, min_tokens=20),
    ]  # fmt: skip
    results = []
    for num_blocks, preempt in ((None, "recompute"), (60, "recompute"), (60, "swap")):
        llm = LLM(str(tiny_llama_dir), dtype="float32", block_size=4, num_blocks=num_blocks,
                  max_num_batched_tokens=128, max_num_seqs=6, preempt=preempt, swap_space_gb=0.05)  # fmt: skip
        results.append([o.token_ids for o in llm.generate(prompts, params)])
        llm.check_integrity()
        if num_blocks:
            assert llm.engine.scheduler.num_preemptions > 0
    assert results[0] == results[1] == results[2]


def test_logit_bias_of_100_makes_every_token_that_one(tiny):
    (out,) = tiny.generate([[11, 12, 13]], SamplingParams(max_tokens=10, temperature=1.0, logit_bias={4242: 100.0},
                                                          ignore_eos=True))  # fmt: skip
    assert out.token_ids == [4242] * 10


def test_allowed_token_ids_and_min_tokens(tiny, smol):
    (out,) = tiny.generate([[11, 12, 13]], SamplingParams(max_tokens=30, temperature=1.5, allowed_token_ids=[7, 8, 9],
                                                          ignore_eos=True))  # fmt: skip
    assert set(out.token_ids) <= {7, 8, 9} and len(out.token_ids) == 30
    prompt = smol.apply_chat_template([{"role": "user", "content": "Reply with one word: yes or no?"}])
    (short,) = smol.generate([prompt], SamplingParams(max_tokens=40, temperature=0.0))
    at_least = len(short.token_ids) + 5
    (held,) = smol.generate([prompt], SamplingParams(max_tokens=40, temperature=0.0, min_tokens=at_least))
    assert short.finish_reason == "stop" and len(held.token_ids) >= at_least


def test_repetition_penalty_reduces_repetition(smol):
    prompt = smol.tokenizer.encode("the cat the cat the cat the cat the cat the cat")
    plain, penalized = smol.generate([prompt, prompt], [
        SamplingParams(max_tokens=32, temperature=0.0, ignore_eos=True),
        SamplingParams(max_tokens=32, temperature=0.0, repetition_penalty=1.5, ignore_eos=True)])  # fmt: skip
    assert len(set(penalized.token_ids)) > 2 * len(set(plain.token_ids)), (plain.text, penalized.text)
