"""PD in bfloat16 through the embedded local pool: the prefill instance writes bf16 KV
blocks, the decode instance reads them into its bf16 cache, and the tokens are the offline
bf16 engine's up to bf16 ties (BF16_TIE_GAP of tests/reference.py)."""

from __future__ import annotations

import pytest

from harness import log_events
from kvd.client import KvdError
from kvd.worker.models import load_tokenizer
from pd_harness import (
    assert_matches,
    reference,
    run_all,
    start_decode,
    start_prefill,
    wait_clean,
    wait_linked,
)
from reference import BF16_TIE_GAP

pytestmark = [pytest.mark.timeout(300), pytest.mark.slow]

BF16 = {"dtype": "bfloat16"}


def test_pd_in_bf16_matches_the_offline_bf16_engine_within_ties(tmp_path, smollm2_dir):
    tok = load_tokenizer(smollm2_dir)
    text = " ".join(f"Step {i}: the keeper climbs the tower and trims lamp {i * 3}." for i in range(12))
    ids = tok.encode(text, add_special_tokens=False)
    prompts = [ids[:1], ids[:16], ids[:40], ids[:130]]  # one token, one block, blocks + partials
    pool = {"local_path": str(tmp_path / "pool"), "local_capacity_gb": 1.0}
    p = start_prefill(tmp_path / "p", smollm2_dir, pool, model=BF16)
    d = start_decode(tmp_path / "d", smollm2_dir, p, pool, model=BF16)
    try:
        wait_linked(d)
        for daemon in (p, d):
            assert [e["dtype"] for e in log_events(daemon.log_file, "model_runner_ready")] == ["bfloat16"]
        served = run_all(d.endpoint, prompts, 12)
        refs = reference(smollm2_dir, prompts, 12, dtype="bfloat16")
        for i, (got, ref) in enumerate(zip(served, refs)):
            assert not isinstance(got, KvdError), f"prompt {i}: {got}"
            assert_matches(got[0], ref, f"bf16 prompt of {len(prompts[i])} tokens", BF16_TIE_GAP)
        pst, dst = wait_clean(p, d)
        assert dst["pd"]["handoffs"] == len(prompts) and dst["pd"]["kv_failures"] == 0
        # The KV crossed the pool: every prompt's blocks were written by one side and read by the other.
        assert len(log_events(p.log_file, "kv_written")) >= len(prompts)
        assert len(log_events(d.log_file, "kv_admitted")) == len(prompts)
    finally:
        assert d.stop() == 0
        assert p.stop() == 0
