"""Quantized weights: the tiled layout against GGUF's, the native kernel (every path this
build has) against pure-torch dequantize + matmul, GGUF blocks against the float weights
they were converted into, and the Q4_1-kept model's greedy tokens against transformers'
float32 ones."""

from __future__ import annotations

import pytest
import torch

from kvd import ops
from kvd.config import ModelConfig
from kvd.worker import attention, quant
from kvd.worker.quant import (Kind, QuantEmbedding, QuantLinear, QuantWeight, dequantize_ref, quant_linear_ref,
                              quantize)  # fmt: skip
from tests.reference import QUANT_TIE_GAP, assert_greedy_match, hf_greedy

needs_native = pytest.mark.skipif(ops.native() is None, reason="the native ops are not built")
# quant_linear's paths in this build (0 scalar, 1 AVX2, 2 AVX2 + VNNI, 3 AVX-512, 4 AVX-512 +
# VNNI): the tests run each, so an AVX-512 machine checks the AVX2 code too
ISAS = ops.native().quant_isas() if ops.native() is not None else []
# Odd shapes: a short last tile (N % 16 of 1, 3, 2, 5, 12), a single block, one whole tile
SHAPES = [(5, 64), (67, 96), (16, 32), (192, 576), (130, 1536), (33, 32), (1, 64), (21, 160), (300, 96)]

# The kernel sums in another order than torch's matmul: float32 rounding of sums of up to
# 1,536 products of size ~1, outputs of size ~30 (observed: at most 9e-5).
KERNEL_ATOL, KERNEL_RTOL = 3e-4, 1e-5


def _m(w):
    return w.m if w.m is not None else w.d


def _copy(w: QuantWeight) -> QuantWeight:
    return QuantWeight(w.kind, w.qs.clone(), w.d.clone(), None if w.m is None else w.m.clone())


@pytest.mark.parametrize("kind", list(Kind))
@pytest.mark.parametrize("n, k", SHAPES)
def test_tiling_reorders_the_bytes_and_keeps_every_value(kind, n, k):
    w = quantize(torch.randn(n, k, generator=torch.Generator().manual_seed(n + k)), kind)
    t = _copy(w)
    assert t.tile() is t and t.tiled and t.tile() is t  # in place, once
    assert t.shape == w.shape and t.nbytes == w.nbytes  # no byte more than GGUF's
    assert t.qs.shape == w.qs.shape and t.d.shape == w.d.shape
    if n > 1:
        assert not torch.equal(t.qs, w.qs)  # the order did change
    for a, b in zip((t.untiled().qs, t.untiled().d, t.untiled().m), (w.qs, w.d, w.m)):
        assert (a is None and b is None) or torch.equal(a, b)
    assert torch.equal(dequantize_ref(t), dequantize_ref(w))  # d * q + m bit for bit
    ids = torch.tensor([n - 1, 0, n // 2, n - 1, min(n - 1, 17)])
    got, want = t.rows(ids), w.rows(ids)
    assert torch.equal(got.qs, want.qs) and torch.equal(got.d, want.d)
    assert torch.equal(dequantize_ref(got), dequantize_ref(w)[ids])
    with pytest.raises(ValueError, match="tiled"):
        QuantWeight.cat([t, w])


def test_a_tied_embedding_and_lm_head_share_one_tiled_copy():
    w = quantize(torch.randn(40, 64, generator=torch.Generator().manual_seed(5)), Kind.Q8_0)
    want = dequantize_ref(w)
    embed = QuantEmbedding(w, torch.float32)
    head = QuantLinear(embed.weight)
    assert head.weight is embed.weight is w and w.tiled
    assert torch.equal(embed(torch.tensor([3, 39])), want[[3, 39]])
    x = torch.randn(2, 64)
    torch.testing.assert_close(head(x), quant_linear_ref(x, w, True), atol=KERNEL_ATOL, rtol=KERNEL_RTOL)


def test_one_allocation_moves_the_weights_and_keeps_every_result():
    gen = torch.Generator().manual_seed(9)
    lins = [QuantLinear(quantize(torch.randn(n, k, generator=gen), kind))
            for n, k, kind in ((40, 64, Kind.Q4_1), (24, 96, Kind.Q8_0), (33, 64, Kind.Q4_0))]  # fmt: skip
    xs = [torch.randn(3, lin.in_features, generator=gen) for lin in lins]
    want = [lin(x) for lin, x in zip(lins, xs)]
    before = [[t.clone() for t in (lin.weight.qs, lin.weight.d, lin.weight.m) if t is not None] for lin in lins]
    arena = quant.one_allocation([lin.weight for lin in lins])
    tensors = [[t for t in (lin.weight.qs, lin.weight.d, lin.weight.m) if t is not None] for lin in lins]
    flat = [t for ts in tensors for t in ts]
    assert all(t.untyped_storage().data_ptr() == arena.untyped_storage().data_ptr() for t in flat)
    assert all(t.data_ptr() % quant.ALLOCATION_ALIGN == 0 for t in flat)
    starts = [t.data_ptr() for t in flat]
    assert starts == sorted(starts)  # in the order given: a step reads them as one stream
    held = sum(t.nbytes for t in flat)
    assert held <= arena.nbytes < held + quant.ALLOCATION_ALIGN * len(flat)
    for ts, bs in zip(tensors, before):
        assert all(torch.equal(t, b) and t.dtype == b.dtype and t.shape == b.shape for t, b in zip(ts, bs))
    for lin, x, w in zip(lins, xs, want):
        assert torch.equal(lin(x), w)


@needs_native
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("kind", list(Kind))
@pytest.mark.parametrize("int_dot", [True, False])
def test_kernel_matches_dequantize_then_matmul(isa, kind, int_dot):
    """Every row count of a decode batch (1..32, and 33 and 40 past it) on every shape."""
    for n, k in SHAPES:
        g = torch.Generator().manual_seed(n * 1000 + k)
        w = quantize(torch.randn(n, k, generator=g), kind)
        t = _copy(w).tile()
        for rows in [*range(1, 33), 33, 40]:
            x = torch.randn(rows, k, generator=g)
            out = torch.full((rows, n), float("nan"))
            ops.native().quant_linear(out, x, t.qs, t.d, _m(t), int(kind), int_dot, isa)
            # with int_dot the reference rounds x per block as the kernel does
            torch.testing.assert_close(out, quant_linear_ref(x, w, int_dot), atol=KERNEL_ATOL, rtol=KERNEL_RTOL,
                                       msg=lambda m: f"{n}x{k}, {rows} rows: {m}")  # fmt: skip


@needs_native
def test_kernel_refuses_a_path_not_built():
    t = quantize(torch.randn(16, 32), Kind.Q4_1).tile()
    with pytest.raises(RuntimeError, match="not built"):
        ops.native().quant_linear(torch.empty(1, 16), torch.randn(1, 32), t.qs, t.d, t.m, 2, True, 99)


@needs_native
@pytest.mark.parametrize("kind", list(Kind))
def test_decode_rows_take_the_kernel(kind, monkeypatch):
    g = torch.Generator().manual_seed(6)
    w = quantize(torch.randn(200, 96, generator=g), kind)
    lin = QuantLinear(_copy(w))
    monkeypatch.setattr(QuantLinear, "_prefill", None)  # any row count up to the bound: no GEMM
    for rows in range(1, quant.INT_DOT_MAX_ROWS + 1):
        x = torch.randn(rows, 96, generator=g)
        torch.testing.assert_close(lin(x), quant_linear_ref(x, w, True), atol=KERNEL_ATOL, rtol=KERNEL_RTOL)


@needs_native
@pytest.mark.parametrize(("decodes", "prompt"), [(3, 7), (0, 12), (5, 40), (40, 2)])
def test_a_steps_prompt_rows_keep_float_activations(decodes, prompt):
    """In a forward, the first `num_decodes` rows (decode queries, up to the bound) round their
    activations to int8; a prefill chunk's rows never do, and take one path (the GEMM) at any
    count, so a prompt's KV does not depend on how it was chunked or on a prefix-cache hit."""
    g = torch.Generator().manual_seed(8)
    w = quantize(torch.randn(70, 96, generator=g), Kind.Q4_1)
    lin = QuantLinear(_copy(w))
    x = torch.randn(decodes + prompt, 96, generator=g)
    meta = attention.AttentionMetadata(slot_mapping=torch.zeros(len(x), dtype=torch.long), num_decodes=decodes)
    with attention.forward_context([], meta):
        got = lin(x)
    int_rows = decodes if decodes <= quant.INT_DOT_MAX_ROWS else 0
    want = torch.cat([quant_linear_ref(x[:int_rows], w, True), quant_linear_ref(x[int_rows:], w, False)])
    torch.testing.assert_close(got, want, atol=KERNEL_ATOL, rtol=KERNEL_RTOL)
    assert not torch.allclose(quant_linear_ref(x, w, True), quant_linear_ref(x, w, False), atol=KERNEL_ATOL)


@needs_native
def test_bfloat16_activations_round_once_at_the_output():
    g = torch.Generator().manual_seed(1)
    w = quantize(torch.randn(96, 576, generator=g), Kind.Q4_1)
    x = torch.randn(4, 576, generator=g).bfloat16()
    got = QuantLinear(w)(x)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), quant_linear_ref(x.float(), w, True), atol=0.25, rtol=1.6e-2)


@needs_native
@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("kind", list(Kind))
def test_bfloat16_activations_on_every_path(isa, kind):
    """Each path widens bf16 rows its own way before rounding them to int8: the float32
    result of the same values, rounded once to bf16."""
    g = torch.Generator().manual_seed(7)
    t = quantize(torch.randn(67, 160, generator=g), kind).tile()
    for rows in (1, 5, 19):
        x = torch.randn(rows, 160, generator=g).bfloat16()
        out, want = torch.empty(rows, 67, dtype=torch.bfloat16), torch.empty(rows, 67)
        ops.native().quant_linear(out, x, t.qs, t.d, _m(t), int(kind), True, isa)
        ops.native().quant_linear(want, x.float(), t.qs, t.d, _m(t), int(kind), True, isa)
        assert torch.equal(out, want.bfloat16())


@needs_native
@pytest.mark.parametrize("kind", list(Kind))
def test_prefill_rows_take_dequantized_tiles(kind, monkeypatch):
    monkeypatch.setattr(quant, "TILE_COLUMNS", 64)  # several tiles, the last one short
    g = torch.Generator().manual_seed(2)
    w = quantize(torch.randn(150, 96, generator=g), kind)
    x = torch.randn(quant.INT_DOT_MAX_ROWS + 5, 96, generator=g)
    torch.testing.assert_close(QuantLinear(w)(x), quant_linear_ref(x, w), atol=KERNEL_ATOL, rtol=KERNEL_RTOL)


@needs_native
@pytest.mark.parametrize("kind", list(Kind))
def test_dequantize_gathers_exactly_the_asked_rows(kind):
    w = quantize(torch.randn(40, 64, generator=torch.Generator().manual_seed(3)), kind)
    ids = torch.tensor([7, 0, 39, 7])
    assert torch.equal(QuantEmbedding(w, torch.float32)(ids), dequantize_ref(w)[ids])
    with pytest.raises(RuntimeError, match="outside"):
        QuantEmbedding(w, torch.float32)(torch.tensor([40]))


@pytest.mark.parametrize("kind", list(Kind))
def test_quantize_rounds_each_weight_to_its_block_step(kind):
    w = torch.randn(16, 128, generator=torch.Generator().manual_seed(4))
    q = quantize(w, kind)
    err = (dequantize_ref(q) - w).abs().view(16, 4, 32).amax(-1)  # (N, blocks)
    step = q.d.float().abs()
    # half a step, plus float16's rounding of the scale (2^-11 of it, times a quant of up to
    # 127) and of the minimum; Q4_0 maps the extreme to -8, so the other side's extreme can
    # clip at +7 by up to one whole step, as in GGUF
    half = 1.0 if kind is Kind.Q4_0 else 0.5
    assert (err <= step * (half + 127 * 2**-11) + 2e-3).all()


def test_bad_quantization_names_the_field():
    with pytest.raises(ValueError, match=r"^model\.quantization: expected auto\|none\|int8\|int4"):
        ModelConfig(quantization="q4")


# ---- the embedded GGUF -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def float_model():
    from kvd.worker.models import embedded_model_dir, load_model

    return load_model(embedded_model_dir(), torch.float32, "cpu")


def test_gguf_blocks_are_the_converted_float_weights(float_model):
    from kvd.worker.models import embedded_gguf_file
    from kvd.worker.quant_load import GGUFSource

    src = GGUFSource(embedded_gguf_file(), float_model.config)
    layer = float_model.model.layers[3]
    a, m = layer.self_attn, layer.mlp
    qkv = src.linear(3, ("q_proj", "k_proj", "v_proj"), [a.q_proj, a.k_proj, a.v_proj])
    assert qkv.weight.kind is Kind.Q4_1
    want = torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight])
    assert torch.equal(dequantize_ref(qkv.weight), want)  # q and k rows un-permuted, values exact
    down = src.linear(3, ("down_proj",), [m.down_proj])
    assert torch.equal(dequantize_ref(down.weight), m.down_proj.weight)
    embed = src.embedding(float_model.model.embed_tokens)
    assert embed.weight.kind is Kind.Q8_0
    assert torch.equal(dequantize_ref(embed.weight), float_model.model.embed_tokens.weight)
    assert src.lm_head(float_model.lm_head, embed).weight is embed.weight  # tied: one copy of the bytes


PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,",
           "The three primary colors are", "Water boils at a temperature of"]  # fmt: skip


def test_q4_1_kept_greedy_tokens_match_float32_up_to_near_ties(float_model):
    from kvd import LLM, SamplingParams

    llm = LLM(quantization="auto", dtype="float32", num_blocks=64)
    assert llm.engine.runner.fast.quantization == "auto"
    assert isinstance(llm.engine.runner.fast.lm_head, QuantLinear)
    outs = llm.generate(PROMPTS, SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True))
    exact = 0
    for prompt, out in zip(PROMPTS, outs):
        ids = llm.tokenizer.encode(prompt)
        ref, gaps = hf_greedy(float_model, ids, 24)
        exact += assert_greedy_match(out.token_ids, ref, gaps, prompt, tie_gap=QUANT_TIE_GAP)
    assert exact >= 1  # a tie on every prompt would hide a broken path


@pytest.mark.parametrize("mode, kind", [("int8", Kind.Q8_0), ("int4", Kind.Q4_1)])
def test_a_float_checkpoint_quantized_at_load(tiny_qwen3_dir, mode, kind):
    from kvd import LLM, SamplingParams

    float_llm = LLM(str(tiny_qwen3_dir), dtype="float32", num_blocks=32)
    llm = LLM(str(tiny_qwen3_dir), dtype="float32", num_blocks=32, quantization=mode)
    fast = llm.engine.runner.fast
    assert fast.quantization == mode and fast.layers[0].qkv.weight.kind is kind
    storages = {lin.weight.qs.untyped_storage().data_ptr() for lin in fast.projections()}
    assert len(storages) == 1  # the layers' matrices in one allocation (quant.one_allocation)
    assert fast.lm_head.weight is fast.embed.weight and fast.embed.weight.kind is Kind.Q8_0  # tied, one copy
    # KV written by quantized weights is not the float model's: storage keys must differ
    assert llm.engine.runner.model_info().fingerprint != float_llm.engine.runner.model_info().fingerprint
    out = llm.generate([[5, 6, 7, 8]], SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True))[0]
    assert len(out.token_ids) == 8
    # auto on a model that came from no GGUF file is none
    plain = LLM(str(tiny_qwen3_dir), dtype="float32", num_blocks=32, quantization="auto")
    assert plain.engine.runner.fast.quantization == "none"
