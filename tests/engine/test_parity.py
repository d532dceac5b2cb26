"""Greedy parity with transformers' generate, token for token, with every scenario's integrity checked.

SmolLM2 (the embedded default) on 14 prompts run together in one batch: chat prompts, raw
text, a 1-token prompt, a prompt of exactly one block, a prompt of more than 60 blocks, and
prompts sharing a long prefix (which must hit the prefix cache); then the same prompts with
so few blocks that the scheduler must preempt. The same for tiny random Llama and Qwen3.
Divergence at a step where transformers' top-2 logits are within 0.01 is a tie (see reference.py).
"""

from __future__ import annotations

import random

import pytest
import torch

from kvd import LLM, SamplingParams
from kvd.worker.models import load_model
from reference import assert_greedy_match, hf_greedy

MAX_TOKENS = 24


@pytest.fixture(scope="module")
def smol(smollm2_dir):
    return LLM(str(smollm2_dir), dtype="float32", max_num_batched_tokens=512)


@pytest.fixture(scope="module")
def smol_ref(smollm2_dir):
    return load_model(smollm2_dir, torch.float32, "cpu")


def smol_prompts(llm: LLM) -> list[list[int]]:
    tok = llm.tokenizer
    chat = [
        llm.apply_chat_template([{"role": "user", "content": q}])
        for q in [
            "What is the capital of France?",
            "Write a haiku about the sea.",
            "Explain what a KV cache is in one sentence.",
            "List three prime numbers.",
        ]
    ]
    raw = [tok.encode(t) for t in ["The quick brown fox", "Once upon a time, in a land far away,", "def fibonacci(n):"]]
    long = tok.encode(
        " ".join(f"Paragraph {i}: the river flows past mill number {i * 7} as the town wakes." for i in range(70))
    )
    assert len(long) > 60 * 16
    manual = (
        "You are a support assistant for the Acme 3000 espresso machine. "
        + " ".join(f"Rule {i}: descale the boiler every {i + 2} weeks and wipe steam wand {i}." for i in range(20))
    )
    shared = [
        llm.apply_chat_template([{"role": "system", "content": manual}, {"role": "user", "content": q}])
        for q in ["How often do I descale?", "What is rule 7?", "Summarise the rules."]
    ]
    one_token = [[tok.encode("Hello")[0]]]
    one_block = [tok.encode("a b c d e f g h i j k l m n o p q r s t u v w x y z")[:16]]
    return chat + raw + [long] + shared + one_token + one_block


@pytest.fixture(scope="module")
def smol_outs(smol):
    """The 14 prompts through the full-size cache, once: the reference run and the
    baseline that the preemption tests compare with."""
    prompts = smol_prompts(smol)
    outs = smol.generate(prompts, SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0))
    smol.check_integrity()
    return prompts, outs


def check_against_reference(llm, ref, prompts, outs):
    eos = set(llm.engine.eos_token_ids)
    exact = 0
    for i, (p, o) in enumerate(zip(prompts, outs)):
        ref_tokens, gaps = hf_greedy(ref, p, MAX_TOKENS, eos)
        exact += assert_greedy_match(o.token_ids, ref_tokens, gaps, f"prompt {i}")
    return exact


def test_smollm2_batch_matches_transformers_with_prefix_hits(smol, smol_ref, smol_outs):
    prompts, outs = smol_outs
    assert len(prompts) >= 12
    # The later prompts sharing the manual's prefix hit the prefix cache.
    shared = outs[8:11]
    assert all(o.num_cached_tokens >= 16 * 10 for o in shared[1:]), [o.num_cached_tokens for o in shared]
    assert smol.engine.kv.prefix_hits >= 2 * 16 * 10
    exact = check_against_reference(smol, smol_ref, prompts, outs)
    assert exact >= len(prompts) - 2  # ties are rare; most prompts match exactly
    assert outs[0].finish_reason == "stop" and "Paris" in outs[0].text


def test_smollm2_preemption_gives_identical_output(smollm2_dir, smol_ref, smol_outs):
    prompts, baseline = smol_outs
    # The long prompt alone needs ~90 blocks: 110 blocks cannot hold the batch at once.
    small = LLM(str(smollm2_dir), dtype="float32", num_blocks=110, max_num_batched_tokens=512)
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0)
    outs = small.generate(prompts, params)
    small.check_integrity()
    assert small.engine.scheduler.num_preemptions > 0
    assert [o.token_ids for o in outs] == [o.token_ids for o in baseline]
    check_against_reference(small, smol_ref, prompts[:4], outs[:4])


def test_smollm2_swap_preemption_gives_identical_output(smollm2_dir, smol_outs):
    prompts, baseline = smol_outs
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0)
    swapping = LLM(str(smollm2_dir), dtype="float32", num_blocks=110, max_num_batched_tokens=512, preempt="swap", swap_space_gb=0.5)
    outs = swapping.generate(prompts, params)
    swapping.check_integrity()
    sched = swapping.engine.scheduler
    assert sched.num_preemptions > 0 and sched.num_swaps > 0
    assert [o.token_ids for o in outs] == [o.token_ids for o in baseline]


@pytest.mark.parametrize("implementation", ["kvd", "transformers"])  # kvd's decoder, transformers' forward
@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_tiny_models_match_transformers(family, implementation, tiny_llama_dir, tiny_qwen3_dir):
    path = tiny_llama_dir if family == "llama" else tiny_qwen3_dir
    ref = load_model(path, torch.float32, "cpu")
    rng = random.Random(0)
    prompts = [[rng.randrange(100, 40000) for _ in range(n)] for n in (1, 3, 4, 5, 17, 64, 150, 301)]
    prompts += [prompts[6][:120] + [7, 8, 9]]  # shares 30 blocks with prompt 6
    params = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
    # The second and third runs are short of blocks: they preempt by recompute, then by swap.
    for num_blocks, preempt in ((None, "recompute"), (100, "recompute"), (100, "swap")):
        llm = LLM(str(path), dtype="float32", implementation=implementation, block_size=4, num_blocks=num_blocks,
                  max_num_batched_tokens=128, max_num_seqs=6, preempt=preempt, swap_space_gb=0.05)  # fmt: skip
        outs = llm.generate(prompts, params)
        llm.check_integrity()
        assert (llm.engine.runner.fast is not None) == (implementation == "kvd")
        if num_blocks:
            assert llm.engine.scheduler.num_preemptions > 0
            assert (llm.engine.scheduler.num_swaps > 0) == (preempt == "swap")
        else:
            assert outs[-1].num_cached_tokens == 120
        for i, (p, o) in enumerate(zip(prompts, outs)):
            ref_tokens, gaps = hf_greedy(ref, p, 16)
            assert_greedy_match(o.token_ids, ref_tokens, gaps, f"{family} prompt {i}")
