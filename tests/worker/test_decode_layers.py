"""native DecodeLayers (native/decode_layers.cpp): a decode step's layers in one call, on
quantized or oneDNN-packed float weights, give the Python loop's results bit for bit, and
run where they should."""

from __future__ import annotations

import pytest
import torch

from kvd import LLM, SamplingParams, ops

pytestmark = pytest.mark.skipif(ops.native() is None, reason="the native ops are not built")

PROMPTS = [[5, 6, 7, 8], [9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21], [30, 31]]
GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True, logprobs=3)


class Counted:
    """The decoder's DecodeLayers, counting the steps it ran."""

    def __init__(self, fused) -> None:
        self.fused, self.calls, self.rows = fused, 0, []

    def forward(self, h, *args):
        self.calls += 1
        self.rows.append(h.shape[0])
        return self.fused.forward(h, *args)


def _run(model_dir, quantization: str, dtype: str, fused: bool):
    llm = LLM(str(model_dir), dtype=dtype, num_blocks=32, quantization=quantization)
    fast = llm.engine.runner.fast
    assert fast.fused is not None, "packed or quantized projections: the decoder builds DecodeLayers"
    counted = Counted(fast.fused)
    fast.fused = counted if fused else None
    outs = llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    llm.check_integrity()
    return outs, counted


@pytest.mark.parametrize("family", ["llama", "qwen3"])
@pytest.mark.parametrize("quantization", ["int8", "int4", "none"])
def test_the_native_layers_give_the_python_loops_tokens_and_logprobs_exactly(family, quantization, request):
    model_dir = request.getfixturevalue(f"tiny_{family}_dir")
    want, _ = _run(model_dir, quantization, "float32", fused=False)
    got, counted = _run(model_dir, quantization, "float32", fused=True)
    # every decode step (the three prompts' 11 after their first tokens) ran natively; the
    # prompts' steps (prefill chunks) did not
    assert counted.calls >= 11 and max(counted.rows) == len(PROMPTS)
    for g, w in zip(got, want):
        assert g.token_ids == w.token_ids
        assert [lp.top_logprobs for lp in g.logprobs] == [lp.top_logprobs for lp in w.logprobs]  # bit for bit


def test_bfloat16_activations_through_the_native_layers(tiny_llama_dir):
    from kvd.cpu import machine_flags, no_bf16_reason
    from kvd.worker import linear

    if reason := no_bf16_reason(machine_flags()) or linear.available(torch.bfloat16):
        pytest.skip(reason)
    want, _ = _run(tiny_llama_dir, "int4", "bfloat16", fused=False)
    got, counted = _run(tiny_llama_dir, "int4", "bfloat16", fused=True)
    assert counted.calls >= 11
    assert [g.token_ids for g in got] == [w.token_ids for w in want]
    for g, w in zip(got, want):
        assert [lp.top_logprobs for lp in g.logprobs] == [lp.top_logprobs for lp in w.logprobs]


def test_transformers_modules_keep_their_forward(tiny_llama_dir):
    llm = LLM(str(tiny_llama_dir), dtype="float32", num_blocks=32, implementation="transformers")
    assert llm.engine.runner.fast is None


def test_a_layer_of_the_wrong_shape_is_refused(tiny_llama_dir):
    llm = LLM(str(tiny_llama_dir), dtype="float32", num_blocks=32, quantization="int8")
    fast = llm.engine.runner.fast
    fused = ops.native().DecodeLayers(fast.eps, fast.heads + 1, fast.kv_heads, fast.head_dim, fast.scale, -1)
    layer = fast.layers[0]
    with pytest.raises(RuntimeError, match="qkv has"):
        fused.add_layer(layer.input_norm, layer.post_norm, None, None, layer.qkv.matrix(), layer.o.matrix(),
                        layer.gate_up.matrix(), layer.down.matrix())  # fmt: skip
