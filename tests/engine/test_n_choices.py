"""n choices of one prompt (SamplingParams.n): n records that share the prompt's full
blocks through the prefix cache — the prompt is computed once, the later choices fork from
the first in its last prompt step (a copy of its partial block, a sample of its last row) —
with choice i drawing as a request seeded with seed + i."""

from __future__ import annotations

import pytest
import torch

from kvd import LLM, SamplingParams


@pytest.fixture(scope="module")
def llm(tiny_llama_dir):
    return LLM(str(tiny_llama_dir), dtype="float32", block_size=16, num_blocks=256)


PROMPT = list(range(3, 203))  # 200 tokens: 12 full blocks of 16 and a partial one of 8


def test_greedy_choices_equal_one_greedy_request(llm):
    one = llm.generate(PROMPT, SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True))[0]
    outs = llm.generate(PROMPT, SamplingParams(n=4, max_tokens=8, temperature=0.0, ignore_eos=True))
    assert [o.index for o in outs] == [0, 1, 2, 3]
    assert all(o.token_ids == one.token_ids for o in outs)
    llm.check_integrity()


def test_choice_i_draws_as_a_request_seeded_with_seed_plus_i(llm):
    params = SamplingParams(n=3, max_tokens=12, temperature=1.0, seed=41, ignore_eos=True)
    outs = llm.generate([PROMPT, PROMPT[:50]], params)
    assert [o.index for o in outs] == [0, 1, 2, 0, 1, 2]
    singles = llm.generate([PROMPT] * 3 + [PROMPT[:50]] * 3, [
        SamplingParams(max_tokens=12, temperature=1.0, seed=41 + i, ignore_eos=True) for i in (0, 1, 2, 0, 1, 2)])
    assert [o.token_ids for o in outs] == [o.token_ids for o in singles]
    assert len({tuple(o.token_ids) for o in outs[:3]}) == 3  # different seeds, different draws


def test_the_prompt_is_computed_once_and_its_full_blocks_held_once(llm):
    engine = llm.engine
    prompt = PROMPT[::-1] + [7]  # 201 tokens no earlier test cached
    n, full = 8, len(prompt) // 16
    ids = engine.add(prompt, SamplingParams(n=n, max_tokens=4, temperature=0.8, ignore_eos=True))
    assert ids == ["req-" + ids[0].split("-")[1]] + [f"{ids[0]}/{i}" for i in range(1, n)]
    computed, steps, forks = 0, 0, {}
    while any(engine.scheduler.requests[r].num_output_tokens == 0 for r in ids):
        so = engine.schedule()
        computed += sum(so.num_scheduled_tokens.values())
        forks |= so.forks
        steps += 1
        engine.text.run(engine.process(engine.runner.execute(so)))
    # The first computed the prompt (201 tokens) and nothing else was: the later choices
    # forked from it in its last prompt step and sampled from its last row.
    assert computed == len(prompt) and steps == 1
    assert forks == {r: ids[0] for r in ids[1:]}
    records = [engine.scheduler.requests[r] for r in ids]
    assert [r.num_cached_tokens for r in records] == [0] + [len(prompt)] * (n - 1)
    tables = [engine.kv.block_ids(r) for r in ids]
    assert all(t[:full] == tables[0][:full] for t in tables)  # the prompt's full blocks, shared
    assert len({b for t in tables for b in t}) == full + n  # plus one block of its own per choice
    # Each choice's own block holds a copy of the first's partial prompt block's KV.
    rest = len(prompt) - full * 16
    for layer in engine.runner.kv_caches:
        first = layer[:, tables[0][full], :rest]
        assert all(torch.equal(layer[:, t[full], :rest], first) for t in tables[1:])
    engine.abort(ids)
    llm.check_integrity()
