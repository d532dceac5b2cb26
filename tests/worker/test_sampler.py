"""Sampler: greedy, truncation, seeds, logprobs, the draw's distribution, per-request state."""

import math

import pytest
import torch

from kvd import ops
from kvd.bench.sampler import PerRowSampler
from kvd.sampling import SamplingParams
from kvd.worker.sampler import Sampler, SamplingState

VOCAB = 49152
PATHS = pytest.mark.parametrize("native", [True, False], ids=["native", "torch"])  # the sampler's two top-p paths


def needs(native: bool) -> None:
    if native and ops.native() is None:
        pytest.skip("the native ops are not built")


def states(sampler: Sampler, params: list[SamplingParams], outputs: list[int] | None = None) -> list[SamplingState]:
    """One state per params, after a 3-token prompt and outputs[i] output tokens."""
    outputs = outputs or [0] * len(params)
    return [sampler.state(p, [1, 2, 3] + [4] * n, 3) for p, n in zip(params, outputs)]


def draw(sampler: Sampler, logits: torch.Tensor, params: list[SamplingParams], outputs=None) -> list[int]:
    return sampler(logits.clone(), states(sampler, params, outputs))[0]  # the sampler writes into its logits


def test_greedy_and_truncation():
    s = Sampler(torch.device("cpu"), 4)
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0]] * 3)
    params = [
        SamplingParams(temperature=0.0),
        SamplingParams(temperature=5.0, top_k=1, seed=1),
        SamplingParams(temperature=5.0, top_p=0.01, seed=2),
    ]
    tokens, lps = s(logits, states(s, params))
    assert tokens == [1, 1, 1] and lps is None


def test_a_step_of_plain_greedy_rows_is_the_argmax():
    torch.manual_seed(0)
    s = Sampler(torch.device("cpu"), VOCAB)
    logits = torch.randn(32, VOCAB)
    rows = states(s, [SamplingParams(temperature=0.0)] * 32)
    assert all(r.plain_greedy for r in rows)
    tokens, _ = s(logits.clone(), rows)
    assert tokens == logits.argmax(-1).tolist()
    assert [r.token_ids[-1] for r in rows] == tokens  # appended to each request's tokens


def test_greedy_rows_beside_sampled_and_transformed_rows_are_unchanged():
    torch.manual_seed(0)
    s = Sampler(torch.device("cpu"), VOCAB)
    logits = torch.randn(6, VOCAB)
    params = [SamplingParams(temperature=0.0), SamplingParams(temperature=0.8, top_p=0.9),
              SamplingParams(temperature=0.0), SamplingParams(temperature=0.0, logit_bias={7: 100}),
              SamplingParams(temperature=1.0, seed=3), SamplingParams(temperature=0.0, logprobs=2)]  # fmt: skip
    tokens, _ = s(logits.clone(), states(s, params))
    argmax = logits.argmax(-1).tolist()
    assert [tokens[i] for i in (0, 2, 5)] == [argmax[i] for i in (0, 2, 5)]
    assert tokens[3] == 7


def test_top_k_limits_the_support():
    s = Sampler(torch.device("cpu"), 4)
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.9]])
    seen = {draw(s, logits, [SamplingParams(temperature=10.0, top_k=2, seed=i)])[0] for i in range(200)}
    assert seen == {1, 3}
    seen = set(draw(s, logits.expand(200, 4), [SamplingParams(temperature=10.0, top_k=2)] * 200))  # unseeded
    assert seen == {1, 3}


def test_top_p_keeps_the_smallest_set_reaching_p():
    s = Sampler(torch.device("cpu"), 4)
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()
    seen = {draw(s, logits, [SamplingParams(temperature=1.0, top_p=0.7, seed=i)])[0] for i in range(300)}
    assert seen == {0, 1}
    assert set(draw(s, logits.expand(300, 4), [SamplingParams(temperature=1.0, top_p=0.7)] * 300)) == {0, 1}


def test_seed_and_index_determine_the_draw():
    s = Sampler(torch.device("cpu"), 1000)
    logits = torch.randn(4, 1000)
    p = SamplingParams(temperature=1.0, seed=7)
    a = draw(s, logits, [p] * 4, [0, 1, 2, 3])
    b = draw(s, logits[2:3], [p], [2])
    assert a[2] == b[0]
    c = draw(s, logits, [p] * 4, [5, 5, 5, 5])
    assert c != a


def test_a_seeded_row_draws_the_same_whatever_the_batch():
    """A seeded request alone, beside greedy, unseeded, penalised and other seeded rows, and
    after its state is rebuilt from its tokens (preemption): the same tokens."""
    torch.manual_seed(1)
    s = Sampler(torch.device("cpu"), VOCAB)
    logits = torch.randn(5, VOCAB) * 4
    mine = SamplingParams(temperature=0.9, top_p=0.9, top_k=100, seed=42, presence_penalty=0.5)
    others = [SamplingParams(temperature=0.0), SamplingParams(temperature=1.2), SamplingParams(temperature=0.7, seed=1),
              SamplingParams(temperature=1.0, repetition_penalty=1.3, logit_bias={5: 3.0})]  # fmt: skip
    alone = s.state(mine, [9, 8, 7], 3)
    batched = s.state(mine, [9, 8, 7], 3)
    for step in range(6):
        (tok,), _ = s(logits[:1].clone(), [alone])
        toks, _ = s(logits[[4, 1, 0, 2, 3]], [states(s, others)[0], states(s, others)[1], batched,
                                              *states(s, others)[2:]])  # fmt: skip
        assert toks[2] == tok, step
    resumed = s.state(mine, list(alone.token_ids), 3)
    assert s(logits[:1].clone(), [resumed])[0] == s(logits[:1].clone(), [alone])[0]


@PATHS
def test_seeded_draws_are_those_of_the_per_row_sampler_before_batching(native):
    """The batched sampler draws the same tokens as kvd's per-row sampler did for every
    seeded request (temperature, top-k, top-p): seeded outputs did not change."""
    needs(native)
    gen = torch.Generator().manual_seed(0)
    old, new = PerRowSampler(torch.device("cpu")), Sampler(torch.device("cpu"), VOCAB, native=native)
    for trial in range(12):
        scale = (1.0, 3.0, 6.0, 10.0)[trial % 4]
        logits = torch.randn(6, VOCAB, generator=gen) * scale
        params = [SamplingParams(temperature=t, top_k=k, top_p=p, seed=trial * 10 + i)
                  for i, (t, k, p) in enumerate([(0.8, 0, 0.95), (1.0, 0, 1.0), (0.5, 40, 1.0), (1.3, 200, 0.9),
                                                 (0.0, 0, 1.0), (0.7, 0, 0.5)])]  # fmt: skip
        outputs = [trial, 0, 3, 17, 1, 5]
        expected, _ = old(logits, params, outputs)
        assert draw(new, logits, params, outputs) == expected, trial


def _chi_square(counts: torch.Tensor, probs: torch.Tensor) -> tuple[float, int]:
    """Pearson's statistic over the tokens expected at least 5 times (the rest lumped), and its degrees of freedom."""
    n = counts.sum()
    expected = probs * n
    big = expected >= 5
    obs = torch.cat([counts[big], counts[~big].sum().unsqueeze(0)])
    exp = torch.cat([expected[big], expected[~big].sum().unsqueeze(0)])
    keep = exp > 0
    assert counts[probs == 0].sum() == 0, "drew a token outside the kept set"
    return float(((obs[keep] - exp[keep]) ** 2 / exp[keep]).sum()), int(keep.sum()) - 1


@PATHS
@pytest.mark.parametrize("case", ["candidates", "sorted", "whole row", "seeded", "min_p", "top_k"])
def test_the_draw_samples_the_processed_distribution(case, native):
    """Many draws of one row (as many rows of one step) against softmax(processed logits):
    Pearson's chi-square within a wide bound (the generators are seeded: no flakes)."""
    needs(native)
    vocab, n = 100, 20000
    gen = torch.Generator().manual_seed(5)
    logits = torch.randn(1, vocab, generator=gen) * (1.5 if case != "sorted" else 0.5)
    base = dict(temperature=0.8, presence_penalty=0.4, frequency_penalty=0.2, repetition_penalty=1.2,
                logit_bias={3: 2.0, 50: -1.0})  # fmt: skip
    options = {"candidates": dict(top_p=0.9), "sorted": dict(top_p=0.95), "whole row": dict(),
               "seeded": dict(top_p=0.9, top_k=20), "min_p": dict(min_p=0.05),
               "top_k": dict(top_k=30)}[case]  # fmt: skip
    s = Sampler(torch.device("cpu"), vocab, seed=11, native=native)
    prompt, output = [3, 5, 8, 13], [5, 21, 21, 34]
    rows = []
    for i in range(n if case != "seeded" else 4000):
        seed = {"seed": i} if case == "seeded" else {}
        rows.append(s.state(SamplingParams(**base, **options, **seed), prompt + output, len(prompt)))
    probs = s.processed_logits(logits, rows[:1])[0].softmax(-1)
    if case == "sorted":
        assert int((probs > 0).sum()) > 64  # past the first candidate set
    tokens, _ = s(logits.expand(len(rows), vocab), rows)
    counts = torch.bincount(torch.tensor(tokens), minlength=vocab).double()
    stat, df = _chi_square(counts, probs.double())
    assert df >= 8, df
    assert stat < df + 6 * math.sqrt(2 * df) + 10, (stat, df)


def test_logprobs_are_of_the_raw_distribution():
    s = Sampler(torch.device("cpu"), 3)
    logits = torch.tensor([[1.0, 2.0, 3.0]])
    (tok,), (lp,) = s(logits.clone(), states(s, [SamplingParams(temperature=0.0, logprobs=2)]))
    ref = logits[0].log_softmax(-1)
    assert tok == 2 and lp.top_ids == [2, 1]
    assert abs(lp.logprob - float(ref[2])) < 1e-6
    # a transformed, sampled row: still the raw row's logprob of the token drawn
    p = SamplingParams(temperature=0.5, logit_bias={0: 100.0}, logprobs=0)
    (tok,), (lp,) = s(logits.clone(), states(s, [p]))
    assert tok == 0 and lp.top_ids == [] and abs(lp.logprob - float(ref[0])) < 1e-6


def test_counts_follow_the_output_and_come_back_the_same_after_preemption():
    s = Sampler(torch.device("cpu"), 50)
    p = SamplingParams(repetition_penalty=1.5, frequency_penalty=0.5)
    live = s.state(p, [1, 2, 2, 3], 4)
    for tok in [3, 7, 7, 7, 9] + list(range(10, 40)):  # past the table's first capacity
        live.append(tok)
    resumed = s.state(p, list(live.token_ids), 4)
    for st in (live, resumed):
        table = dict(zip(st.counts.ids[: st.counts.n].tolist(), st.counts.counts[: st.counts.n].tolist()))
        assert table[1] == 0 and table[2] == 0 and table[3] == 1 and table[7] == 3 and table[39] == 1
        assert len(table) == 3 + 1 + 30 + 1  # 1, 2, 3; 7; 10..39; 9
    logits = torch.randn(1, 50)
    assert torch.equal(s.processed_logits(logits, [live]), s.processed_logits(logits, [resumed]))
    # without the repetition penalty the prompt is not counted
    only_output = s.state(SamplingParams(presence_penalty=1.0), [1, 2, 5], 2)
    assert only_output.counts.ids[: only_output.counts.n].tolist() == [5]


def test_ids_outside_the_vocabulary_are_dropped_by_the_worker():
    s = Sampler(torch.device("cpu"), 10)
    p = SamplingParams(temperature=0.0, logit_bias={50: 100.0, 4: 100.0}, allowed_token_ids=[4, 99],
                       bad_words_token_ids=[[77]])  # fmt: skip
    with pytest.raises(ValueError, match="^logit_bias: token id 50"):
        p.check_vocab(10)
    assert s(torch.zeros(1, 10), states(s, [p]))[0] == [4]
