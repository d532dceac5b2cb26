"""Prompt logprobs: each prompt token's logprob given the tokens before it, and the top N.

The runner computes them from the hidden states of the prompt positions a step computed
anyway (a chunk of a long prompt, or all of a short one): position p's logits give the
distribution of token p + 1. The logits are built a slice of rows at a time, so a long
prompt never holds (prompt length x vocabulary) floats at once. A request that asks for
them computes every prompt position here (the scheduler gives it no prefix-cache hit,
the PD connector loads it nothing, the prefill group does not take it).
"""

from __future__ import annotations

import torch

from kvd.scheduler.output import Logprobs, PromptLogprobs

ROWS = 256  # logits rows built at once: 256 x 49,152 float32 is 50 MB


def prompt_logprobs(head, hidden: torch.Tensor, request_id: str, start: int, targets: list[int],
                    n: int) -> PromptLogprobs:  # fmt: skip
    """`hidden` (T, E): the states of prompt positions start - 1 .. start + T - 2, whose next
    tokens are `targets` (prompt tokens start .. start + T - 1); their logprobs and top `n`."""
    out: list[Logprobs] = []
    target = torch.tensor(targets, device=hidden.device)
    for i in range(0, len(targets), ROWS):
        lp = head(hidden[i : i + ROWS]).float().log_softmax(dim=-1)  # (R, V)
        chosen = lp.gather(1, target[i : i + ROWS].unsqueeze(1)).squeeze(1).tolist()
        top = lp.topk(n, dim=-1) if n else None
        ids = top.indices.tolist() if top is not None else [[]] * len(chosen)
        values = top.values.tolist() if top is not None else [[]] * len(chosen)
        out += [Logprobs(logprob=c, top_ids=t, top_logprobs=v) for c, t, v in zip(chosen, ids, values)]
    return PromptLogprobs(request_id, start, out)
