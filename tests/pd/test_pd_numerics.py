"""PD with other numerics than the float32 default, through the embedded local pool: bf16
activations (bf16 KV blocks), and the GGUF's own quantized weights (`model.quantization =
"auto"`: Q4_1 layers, a Q8_0 embedding and lm_head). The prefill instance writes the KV
blocks, the decode instance reads them into its cache, and the tokens are those of the
offline (unified) engine with the same settings, up to ties: BF16_TIE_GAP for bf16, and
QUANT_TIE_GAP (tests/reference.py) for quantized weights, whose linears round activations
to int8 in steps of at most INT_DOT_MAX_ROWS rows and not in larger ones, so the same token
can take either path depending on what it is batched with (the 1-token prompt is prefilled
alone on the prefill instance and beside the others offline)."""

from __future__ import annotations

import pytest

from harness import log_events
from kvd import cpu
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
from reference import BF16_TIE_GAP, QUANT_TIE_GAP

pytestmark = [pytest.mark.timeout(300), pytest.mark.slow]


@pytest.mark.parametrize(("dtype", "quantization", "tie_gap"), [("bfloat16", "none", BF16_TIE_GAP),
                                                                ("float32", "auto", QUANT_TIE_GAP)])  # fmt: skip
def test_pd_matches_the_offline_engine_of_the_same_numerics_within_ties(tmp_path, smollm2_dir, dtype, quantization,
                                                                         tie_gap):  # fmt: skip
    tok = load_tokenizer(smollm2_dir)
    text = " ".join(f"Step {i}: the keeper climbs the tower and trims lamp {i * 3}." for i in range(12))
    ids = tok.encode(text, add_special_tokens=False)
    prompts = [ids[:1], ids[:16], ids[:40], ids[:130]]  # one token, one block, blocks + partials
    pool = {"local_path": str(tmp_path / "pool"), "local_capacity_gb": 1.0}
    model = {"dtype": dtype, "quantization": quantization}
    p = start_prefill(tmp_path / "p", smollm2_dir, pool, model=model)
    d = start_decode(tmp_path / "d", smollm2_dir, p, pool, model=model)
    try:
        wait_linked(d)
        for daemon in (p, d):
            ready = log_events(daemon.log_file, "model_runner_ready")
            assert [e["dtype"] for e in ready] == [dtype]
            if cpu.thp_mode() in ("always", "madvise"):  # model.huge_pages: on by default, the weights in 2 MiB pages
                assert ready[0]["huge_pages_mb"] > 0, ready
            assert [e["quantization"] for e in log_events(daemon.log_file, "kvd_decoder_on")] == [quantization]
        served = run_all(d.endpoint, prompts, 12)
        refs = reference(smollm2_dir, prompts, 12, dtype=dtype, quantization=quantization)
        exact = 0
        for i, (got, ref) in enumerate(zip(served, refs)):
            assert not isinstance(got, KvdError), f"prompt {i}: {got}"
            assert_matches(got[0], ref, f"{dtype} {quantization} prompt of {len(prompts[i])} tokens", tie_gap)
            exact += got[0] == ref.token_ids
        assert exact >= 2, exact  # ties on most prompts would hide a broken handoff
        pst, dst = wait_clean(p, d)
        assert dst["pd"]["handoffs"] == len(prompts) and dst["pd"]["kv_failures"] == 0
        # The KV crossed the pool: every prompt's blocks were written by one side and read by the other.
        assert len(log_events(p.log_file, "kv_written")) >= len(prompts)
        assert len(log_events(d.log_file, "kv_admitted")) == len(prompts)
    finally:
        assert d.stop() == 0
        assert p.stop() == 0
