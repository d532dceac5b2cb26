"""The reference side of parity tests: transformers' own greedy generate, one prompt at a time.

`assert_greedy_match` compares kvd's tokens with it. Where transformers' two best logits at
a step are within TIE_GAP, the two engines may legitimately pick different tokens (float
rounding of a different but equally valid kernel order decides): a divergence from such a
step on counts as a tie, not a failure.
"""

from __future__ import annotations

import torch

TIE_GAP = 0.01
# bf16 keeps 8 significant bits: SmolLM2's top logits (16-32) move in steps of 1/8, so two
# correct bf16 kernel orders land a step or two apart; below this gap either pick is right.
BF16_TIE_GAP = 0.3
# Quantized weights' decode steps round activations to int8 per block of 32 (prefill chunks of
# more than INT_DOT_MAX_ROWS rows do not): greedy tokens may differ from float32, or between
# two schedules of the same quantized model, from a step whose top-2 logit gap is below this.
# Seen on tests/worker/test_quant.py's prompts (24 tokens each): divergences at gaps 0.005,
# 0.018 and 0.21; steps with gaps down to 0.044 kept the same token.
QUANT_TIE_GAP = 0.3


@torch.inference_mode()
def hf_greedy(model, prompt_ids: list[int], max_new_tokens: int, eos_ids: set[int] | None = None,
              with_logits: bool = False):  # fmt: skip
    """(tokens, top-2 logit gap per step) from transformers' generate, no padding, in the
    model's dtype; with_logits adds each step's logits (V,) as float32."""
    out = model.generate(
        torch.tensor([prompt_ids], device=model.device),
        attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long, device=model.device),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        output_scores=True,
        return_dict_in_generate=True,
        eos_token_id=sorted(eos_ids) if eos_ids else None,
        pad_token_id=0,
    )
    tokens = out.sequences[0, len(prompt_ids) :].tolist()
    gaps = []
    for scores in out.scores:
        top2 = torch.topk(scores[0].float(), 2).values
        gaps.append(float(top2[0] - top2[1]))
    if with_logits:
        return tokens, gaps, [scores[0].float() for scores in out.scores]
    return tokens, gaps


def assert_greedy_match(
    got: list[int], ref: list[int], gaps: list[float], label: str = "", tie_gap: float = TIE_GAP
) -> bool:
    """True on an exact match; True on a divergence at a tie step; AssertionError otherwise."""
    for i, (a, b) in enumerate(zip(got, ref)):
        if a != b:
            assert gaps[i] < tie_gap, (
                f"{label}: kvd diverged from transformers at step {i} ({a} vs {b}) "
                f"where the top-2 logit gap was {gaps[i]:.4f} (not a tie)"
            )
            return False
    assert len(got) == len(ref), f"{label}: {len(got)} tokens vs transformers' {len(ref)}"
    return True
