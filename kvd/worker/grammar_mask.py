"""Structured outputs on the worker: mask the logits of the tokens a request's grammar
does not allow next, from the bitmask rows the engine sends with the step
(`SchedulerOutput.bitmasks`: xgrammar's int32 words, bit t of word t // 32 for token t).
The engine keeps the grammars; the worker only masks, so it never imports xgrammar."""

from __future__ import annotations

import numpy as np
import torch

_SHIFTS = torch.arange(32, dtype=torch.int32)


def apply_bitmasks(logits: torch.Tensor, masks: list[bytes | None]) -> None:
    """Set to -inf, in place, each row's logits of the tokens its mask does not allow (a row
    whose mask is None is left as it is). `logits`: (B, V)."""
    rows = [i for i, m in enumerate(masks) if m is not None]
    if not rows:
        return
    joined = bytearray(b"".join(masks[i] for i in rows))  # writable: torch shares its memory
    words = torch.from_numpy(np.frombuffer(joined, dtype=np.int32).reshape(len(rows), -1))
    allowed = ((words.unsqueeze(-1) >> _SHIFTS) & 1).reshape(len(rows), -1)[:, : logits.shape[1]].bool()
    index = torch.tensor(rows, device=logits.device)
    logits[index] = logits[index].masked_fill(~allowed.to(logits.device), float("-inf"))
