"""Prompt logprobs (SamplingParams.prompt_logprobs) against transformers' log_softmax of the
same prompt, within 1e-4 in float32: over prefill chunks, when the prompt's blocks are
already in the prefix cache, beside requests that do not ask, and with both decoders."""

from __future__ import annotations

import random

import pytest
import torch

from kvd import LLM, SamplingParams
from kvd.worker.models import load_model


@torch.inference_mode()
def hf_prompt_logprobs(model, prompt: list[int]) -> torch.Tensor:
    """(T - 1, V): the log-distribution of prompt token t + 1 given the tokens up to t."""
    logits = model(torch.tensor([prompt])).logits[0].float()
    return logits[:-1].log_softmax(dim=-1)


@pytest.mark.parametrize("implementation", ["kvd", "transformers"])
def test_prompt_logprobs_match_transformers(implementation, tiny_llama_dir):
    ref = load_model(tiny_llama_dir, torch.float32, "cpu")
    rng = random.Random(1)
    prompts = [[rng.randrange(100, 30000) for _ in range(n)] for n in (2, 37, 150)]
    # 150 tokens in chunks of at most 64: the logprobs cross chunk boundaries.
    llm = LLM(str(tiny_llama_dir), dtype="float32", implementation=implementation, block_size=16,
              max_num_batched_tokens=64)  # fmt: skip
    plain = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)
    asks = SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True, prompt_logprobs=4)
    llm.generate(prompts[2], plain)  # its blocks are now in the prefix cache
    outs = llm.generate(prompts + [prompts[0]], [asks, asks, asks, plain])
    assert outs[3].prompt_logprobs is None
    for prompt, out in zip(prompts, outs):
        want = hf_prompt_logprobs(ref, prompt)
        got = out.prompt_logprobs
        assert len(got) == len(prompt) and got[0] is None
        assert out.num_cached_tokens == 0  # computed here, although the cache had its blocks
        for t, lp in enumerate(got[1:]):
            assert abs(lp.logprob - want[t, prompt[t + 1]].item()) < 1e-4, (len(prompt), t)
            top = want[t].topk(4)
            assert lp.top_ids == top.indices.tolist() or torch.allclose(
                torch.tensor(lp.top_logprobs), top.values, atol=1e-4)  # a tie may order ids differently
            assert torch.allclose(torch.tensor(lp.top_logprobs), top.values, atol=1e-4)
    llm.check_integrity()


def test_sample_logprobs_match_transformers(tiny_llama_dir):
    """Each sampled token's logprob (and the top 3) against transformers' log_softmax of the
    whole sequence, teacher-forced: the raw distribution, whatever temperature and top-p did."""
    ref = load_model(tiny_llama_dir, torch.float32, "cpu")
    llm = LLM(str(tiny_llama_dir), dtype="float32", block_size=16)
    prompt = list(range(500, 540))
    for params in (SamplingParams(max_tokens=6, temperature=0.0, logprobs=3, ignore_eos=True),
                   SamplingParams(max_tokens=6, temperature=0.7, top_p=0.9, seed=3, logprobs=3, ignore_eos=True)):
        (out,) = llm.generate([prompt], params)
        want = hf_prompt_logprobs(ref, prompt + out.token_ids)[len(prompt) - 1 :]  # rows predicting the outputs
        for i, (token, lp) in enumerate(zip(out.token_ids, out.logprobs)):
            assert abs(lp.logprob - want[i, token].item()) < 1e-4
            assert torch.allclose(torch.tensor(lp.top_logprobs), want[i].topk(3).values, atol=1e-4)
