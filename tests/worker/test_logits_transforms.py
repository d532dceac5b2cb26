"""Each logits transform against its transformers counterpart on the same float32 logits.

The sampler's `processed_logits` is what its draw samples from (the same code as the step:
masks, bias and penalties, then temperature and the kept set). transformers' processors
take (input_ids, scores); the presence and frequency penalties are OpenAI's formula,
written out here. Rows span flat to peaked distributions (scales 1 to 10 over the
49,152-token vocabulary), so top-p's kept set falls in each of the sampler's candidate
sizes (64, 256, 1,024, the sorted row). Every test runs on both of the sampler's paths:
the native top-p op and the torch reference.
"""

import pytest
import torch
from transformers.generation.logits_process import (
    MinNewTokensLengthLogitsProcessor,
    MinPLogitsWarper,
    NoBadWordsLogitsProcessor,
    RepetitionPenaltyLogitsProcessor,
    SequenceBiasLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from kvd import ops
from kvd.sampling import SamplingParams
from kvd.worker.sampler import Sampler

VOCAB = 49152
EOS = 2
SCALES = (1.0, 2.0, 3.0, 4.0, 6.0, 10.0)


@pytest.fixture(scope="module")
def logits() -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    return torch.cat([torch.randn(2, VOCAB, generator=gen) * s for s in SCALES])  # (12, V) float32


@pytest.fixture(scope="module")
def tokens() -> tuple[list[int], list[int]]:
    """A prompt and an output with repeats, drawn from the low ids and the whole vocabulary."""
    gen = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, VOCAB, (40,), generator=gen).tolist() + [5, 5, 9]
    output = torch.randint(0, 300, (60,), generator=gen).tolist() + [9, 9, 17]
    return prompt, output


@pytest.fixture(params=["native", "torch"])
def sampler(request) -> Sampler:
    if request.param == "native" and ops.native() is None:
        pytest.skip("the native ops are not built")
    return Sampler(torch.device("cpu"), VOCAB, eos_token_ids=[EOS], native=request.param == "native")


def processed(s: Sampler, logits: torch.Tensor, params: SamplingParams, prompt: list[int], output: list[int]):
    rows = [s.state(params, prompt + output, len(prompt)) for _ in range(len(logits))]
    return s.processed_logits(logits, rows)


def assert_same(ours: torch.Tensor, theirs: torch.Tensor, boundary: torch.Tensor | None = None) -> None:
    """The same tokens removed (-inf), and the same values elsewhere. Where top-p cuts, a token
    whose mass before it is within float32 rounding of top_p (`boundary`) may fall either way:
    the two sides sum in different orders."""
    differ = torch.isinf(ours) != torch.isinf(theirs)
    if boundary is not None:
        assert int(differ.sum(-1).max()) <= 1, differ.sum(-1)
        differ &= ~boundary
    assert not differ.any(), differ.sum()
    kept = ~torch.isinf(ours) & ~torch.isinf(theirs)
    torch.testing.assert_close(ours[kept], theirs[kept], rtol=1e-6, atol=1e-6)


def top_p_boundary(scores: torch.Tensor, top_p: float) -> torch.Tensor:
    """(B, V) bool: tokens whose mass before them (in float64, largest first) is within 1e-5 of top_p."""
    probs = scores.double().softmax(-1)
    sorted_probs, order = probs.sort(-1, descending=True)
    before = torch.empty_like(probs).scatter_(1, order, sorted_probs.cumsum(-1) - sorted_probs)
    return (before - top_p).abs() < 1e-5


@pytest.mark.parametrize("penalty", [0.5, 1.3, 2.0])
def test_repetition_penalty_is_transformers(sampler, logits, tokens, penalty):
    prompt, output = tokens
    ids = torch.tensor([prompt + output]).expand(len(logits), -1)
    theirs = RepetitionPenaltyLogitsProcessor(penalty)(ids, logits.clone())
    params = SamplingParams(temperature=0.0, repetition_penalty=penalty)
    assert_same(processed(sampler, logits, params, prompt, output), theirs)


@pytest.mark.parametrize(("presence", "frequency"), [(0.5, 0.0), (0.0, 0.7), (-1.0, 2.0), (2.0, -0.3)])
def test_presence_and_frequency_penalties_are_openais_formula(sampler, logits, tokens, presence, frequency):
    prompt, output = tokens
    counts = torch.bincount(torch.tensor(output), minlength=VOCAB).float()  # the output only, not the prompt
    theirs = logits - counts * frequency - (counts > 0).float() * presence
    params = SamplingParams(temperature=0.0, presence_penalty=presence, frequency_penalty=frequency)
    assert_same(processed(sampler, logits, params, prompt, output), theirs)


@pytest.mark.parametrize("min_p", [0.01, 0.1, 0.5])
def test_min_p_is_transformers(sampler, logits, tokens, min_p):
    theirs = MinPLogitsWarper(min_p)(None, logits / 0.7)
    assert_same(processed(sampler, logits, SamplingParams(temperature=0.7, min_p=min_p), *tokens), theirs)


@pytest.mark.parametrize("top_k", [1, 5, 64, 100, 2000])
def test_top_k_is_transformers(sampler, logits, tokens, top_k):
    theirs = TopKLogitsWarper(top_k)(None, logits.clone())
    assert_same(processed(sampler, logits, SamplingParams(temperature=1.0, top_k=top_k), *tokens), theirs)


@pytest.mark.parametrize("top_p", [0.1, 0.5, 0.9, 0.95, 0.99])
def test_top_p_is_transformers(sampler, logits, tokens, top_p):
    scaled = TemperatureLogitsWarper(0.8)(None, logits.clone())
    theirs = TopPLogitsWarper(top_p)(None, scaled.clone())
    ours = processed(sampler, logits, SamplingParams(temperature=0.8, top_p=top_p), *tokens)
    assert_same(ours, theirs, top_p_boundary(scaled, top_p))


def test_the_candidate_sizes_are_all_exercised(logits):
    """top-p 0.9 keeps under 64 tokens in some rows, 64 to 1,024 in others, more in others."""
    kept = (~torch.isinf(TopPLogitsWarper(0.9)(None, logits.clone()))).sum(-1)
    assert (kept <= 64).any() and ((kept > 64) & (kept <= 1024)).any() and (kept > 1024).any(), kept


def test_top_k_then_top_p_is_transformers(sampler, logits, tokens):
    top_k = TopKLogitsWarper(50)(None, logits / 1.2)
    theirs = TopPLogitsWarper(0.9)(None, top_k.clone())
    ours = processed(sampler, logits, SamplingParams(temperature=1.2, top_k=50, top_p=0.9), *tokens)
    assert_same(ours, theirs, top_p_boundary(top_k, 0.9))


def test_min_p_comes_before_top_p_as_in_vllm(sampler, logits, tokens):
    """vLLM applies min-p before top-k and top-p (transformers applies it after them)."""
    min_p = MinPLogitsWarper(0.05)(None, logits.clone())
    theirs = TopPLogitsWarper(0.8)(None, min_p.clone())
    ours = processed(sampler, logits, SamplingParams(temperature=1.0, min_p=0.05, top_p=0.8), *tokens)
    assert_same(ours, theirs, top_p_boundary(min_p, 0.8))


@pytest.mark.parametrize("num_output", [0, 3, 4, 9])
def test_min_tokens_is_transformers(sampler, logits, num_output):
    prompt, output = [7, 8, 9, 10], [11] * num_output
    ids = torch.tensor([prompt + output]).expand(len(logits), -1)
    theirs = MinNewTokensLengthLogitsProcessor(len(prompt), 4, [EOS, 300])(ids, logits.clone())
    params = SamplingParams(temperature=0.0, min_tokens=4, stop_token_ids=[300])
    assert_same(processed(sampler, logits, params, prompt, output), theirs)
    if num_output < 4:
        params = SamplingParams(temperature=0.0, min_tokens=4, ignore_eos=True)
        ignoring = processed(sampler, logits, params, prompt, output)
        assert not torch.isinf(ignoring[:, EOS]).any()  # with ignore_eos, EOS is not a stop: not masked


@pytest.mark.parametrize("output", [[], [40], [40, 41], [12, 40, 41, 42]])
def test_bad_words_are_transformers(sampler, logits, output):
    """Over the output, as vLLM checks them (transformers checks the ids it is given: the output here)."""
    words = [[33], [41, 42], [40, 41, 43], [1000, 2000]]
    theirs = NoBadWordsLogitsProcessor(words)(torch.tensor([output or [0]]).expand(len(logits), -1), logits.clone())
    if not output:  # transformers needs an id; [0] starts no banned sequence
        theirs = NoBadWordsLogitsProcessor(words)(torch.tensor([[0]]).expand(len(logits), -1), logits.clone())
    params = SamplingParams(temperature=0.0, bad_words_token_ids=words)
    assert_same(processed(sampler, logits, params, [5, 6], output), theirs)


def test_logit_bias_is_transformers_single_token_sequence_bias(sampler, logits, tokens):
    bias = {3: 5.0, 17: -7.5, 40000: 100.0, 123: -100.0}
    theirs = SequenceBiasLogitsProcessor([[[t], b] for t, b in bias.items()])(torch.tensor([[1]]), logits.clone())
    assert_same(processed(sampler, logits, SamplingParams(temperature=0.0, logit_bias=bias), [], []), theirs)
    clamped = processed(sampler, logits, SamplingParams(temperature=0.0, logit_bias={3: 1e6}), [], [])
    torch.testing.assert_close(clamped[:, 3], logits[:, 3] + 100.0)


def test_allowed_token_ids_mask_every_other_token(sampler, logits):
    allowed = [0, 5, 49151, 777]
    ours = processed(sampler, logits, SamplingParams(temperature=0.0, allowed_token_ids=allowed), [1], [])
    theirs = torch.full_like(logits, float("-inf"))
    theirs[:, allowed] = logits[:, allowed]
    assert_same(ours, theirs)


def test_transforms_compose_in_vllms_order(sampler, logits, tokens):
    """Masks and bias first, then repetition, frequency and presence, then temperature and top-p."""
    prompt, output = tokens
    params = SamplingParams(temperature=0.9, top_p=0.9, logit_bias={9: 4.0, 250: -3.0}, repetition_penalty=1.4,
                            presence_penalty=0.3, frequency_penalty=0.2, bad_words_token_ids=[[17]])  # fmt: skip
    ids = torch.tensor([prompt + output]).expand(len(logits), -1)
    x = SequenceBiasLogitsProcessor([[[9], 4.0], [[250], -3.0]])(ids, logits.clone())
    x = NoBadWordsLogitsProcessor([[17]])(ids, x)
    x = RepetitionPenaltyLogitsProcessor(1.4)(ids, x)
    counts = torch.bincount(torch.tensor(output), minlength=VOCAB).float()
    x = x - counts * 0.2 - (counts > 0).float() * 0.3
    theirs = TopPLogitsWarper(0.9)(None, x / 0.9)
    assert_same(processed(sampler, logits, params, prompt, output), theirs, top_p_boundary(x / 0.9, 0.9))
