"""The worker's bitmask masking against the format's definition: token t is allowed when
bit t % 32 of int32 word t // 32 is set (xgrammar's layout)."""

from __future__ import annotations

import numpy as np
import torch

from kvd.worker.grammar_mask import apply_bitmasks


def test_masked_logits_follow_the_bits_of_each_row():
    vocab, rng = 100, np.random.default_rng(3)  # 100 tokens: the last word is partly padding
    words = [rng.integers(-(2**31), 2**31, size=-(-vocab // 32), dtype=np.int64).astype(np.int32) for _ in range(4)]
    masks = [words[0].tobytes(), None, words[2].tobytes(), words[3].tobytes()]
    logits = torch.randn(4, vocab)
    want = logits.clone()
    for row, w in ((0, words[0]), (2, words[2]), (3, words[3])):
        for t in range(vocab):
            if not (int(w[t // 32]) >> (t % 32)) & 1:
                want[row, t] = float("-inf")
    apply_bitmasks(logits, masks)
    assert torch.equal(logits, want)
    untouched = torch.randn(2, vocab)
    copy = untouched.clone()
    apply_bitmasks(untouched, [None, None])
    assert torch.equal(untouched, copy)
