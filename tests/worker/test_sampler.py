"""Sampler: greedy, truncation, seeds, logprobs on hand-made logits."""

import torch

from kvd.sampling import SamplingParams
from kvd.worker.sampler import Sampler


def test_greedy_and_truncation():
    s = Sampler(torch.device("cpu"))
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0]] * 3)
    params = [
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=5.0, top_k=1, seed=1),
        SamplingParams(temperature=5.0, top_p=0.01, seed=2),
    ]
    tokens, lps = s(logits, params, [0, 0, 0])
    assert tokens == [1, 1, 1] and lps is None


def test_top_k_limits_the_support():
    s = Sampler(torch.device("cpu"))
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.9]])
    seen = {s(logits, [SamplingParams(temperature=10.0, top_k=2, seed=i)], [0])[0][0] for i in range(200)}
    assert seen == {1, 3}


def test_top_p_keeps_the_smallest_set_reaching_p():
    s = Sampler(torch.device("cpu"))
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    seen = {s(probs.log(), [SamplingParams(temperature=1.0, top_p=0.7, seed=i)], [0])[0][0] for i in range(300)}
    assert seen == {0, 1}


def test_seed_and_index_determine_the_draw():
    s = Sampler(torch.device("cpu"))
    logits = torch.randn(4, 1000)
    p = SamplingParams(temperature=1.0, seed=7)
    a, _ = s(logits, [p] * 4, [0, 1, 2, 3])
    b, _ = s(logits[2:3], [p], [2])
    assert a[2] == b[0]
    c, _ = s(logits, [p] * 4, [5, 5, 5, 5])
    assert c != a


def test_logprobs_are_of_the_raw_distribution():
    s = Sampler(torch.device("cpu"))
    logits = torch.tensor([[1.0, 2.0, 3.0]])
    (tok,), (lp,) = s(logits, [SamplingParams(temperature=0.0, logprobs=2)], [0])
    ref = logits[0].log_softmax(-1)
    assert tok == 2 and lp.top_ids == [2, 1]
    assert abs(lp.logprob - float(ref[2])) < 1e-6
