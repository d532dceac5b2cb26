"""Native ops against their pure-torch references."""

import re

import pytest
import torch

from kvd import ops


def test_native_extension_builds_here():
    # `make` builds it during set-up; a machine with a C++ compiler must have it.
    assert ops.native() is not None


def test_every_included_header_is_part_of_the_build_key():
    # A header missing from the key left a stale build in the cache after that header changed.
    included = {name for path in ops.NATIVE_DIR.iterdir() if path.suffix in (".cpp", ".cu", ".h")
                for name in re.findall(r'#include "([^"]+)"', path.read_text())}  # fmt: skip
    assert included and included <= set(ops._HEADERS)


# 64 and 128 take the vector path (AVX-512 or AVX2), with 1 to 6 query heads per kv head
# (AVX2 groups them by 4); 16, 80 and 7 the scalar one
@pytest.mark.parametrize("heads, kv_heads, head_dim",
                         [(9, 3, 64), (8, 2, 128), (12, 2, 64), (4, 4, 64), (4, 4, 16), (8, 2, 80), (2, 1, 7)])
@pytest.mark.parametrize("block_size", [1, 4, 16])
def test_paged_decode_attention_matches_reference(heads, kv_heads, head_dim, block_size):
    g = torch.Generator().manual_seed(heads * 100 + block_size)
    num_blocks, batch = 64, 5
    cache = torch.randn(2, num_blocks, block_size, kv_heads, head_dim, generator=g)
    lens = torch.tensor([1, block_size, block_size + 1, 3 * block_size - 1, 7 * block_size])
    max_blocks = int((lens.max() + block_size - 1) // block_size)
    table = torch.randperm(num_blocks, generator=g)[: batch * max_blocks].view(batch, max_blocks)
    q = torch.randn(batch, heads, head_dim, generator=g)
    scale = head_dim**-0.5
    got = ops.paged_decode_attention(q, cache, table, lens, scale)
    ref = ops.paged_decode_attention_ref(q, cache, table, lens, scale)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)



@pytest.mark.parametrize("heads, kv_heads, head_dim", [(9, 3, 64), (8, 2, 128), (8, 2, 80)])
def test_paged_decode_attention_in_bfloat16_matches_the_float32_reference(heads, kv_heads, head_dim):
    # bf16 in, float32 arithmetic inside, rounded once at the output: within one bf16 step
    g = torch.Generator().manual_seed(heads)
    block_size, num_blocks = 16, 160
    cache = torch.randn(2, num_blocks, block_size, kv_heads, head_dim, generator=g).bfloat16()
    lens = torch.tensor([1, 17, 200, 513])
    table = torch.randperm(num_blocks, generator=g)[: 4 * 33].view(4, 33)
    q = torch.randn(4, heads, head_dim, generator=g).bfloat16()
    got = ops.paged_decode_attention(q, cache, table, lens, head_dim**-0.5)
    assert got.dtype == torch.bfloat16
    ref = ops.paged_decode_attention_ref(q.float(), cache.float(), table, lens, head_dim**-0.5)
    torch.testing.assert_close(got.float(), ref, rtol=1.6e-2, atol=1.6e-2)

def test_bad_inputs_raise_instead_of_reading_out_of_bounds():
    mod = ops.native()
    cache = torch.zeros(2, 4, 4, 1, 8)
    q = torch.zeros(1, 1, 8)
    out = torch.empty_like(q)
    with pytest.raises(RuntimeError, match="block id out of range"):
        mod.paged_decode_attention(out, q, cache, torch.tensor([[9]]), torch.tensor([3]), 1.0)
    with pytest.raises(RuntimeError, match="outside"):
        mod.paged_decode_attention(out, q, cache, torch.tensor([[0]]), torch.tensor([5]), 1.0)
    with pytest.raises(RuntimeError, match="float32"):
        mod.paged_decode_attention(out.double(), q.double(), cache, torch.tensor([[0]]), torch.tensor([1]), 1.0)


# ---- prefill attention ------------------------------------------------------------------------
needs_prefill_kernel = pytest.mark.skipif(
    ops.native() is None or not ops.native().prefill_attention_supported(64),
    reason="this build has no native prefill attention (it needs AVX-512 or AVX2 with FMA)",
)


def _prefill_case(heads, kv_heads, head_dim, block_size, num_computed, chunk, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    blocks = -(-(num_computed + chunk) // block_size)
    cache = torch.randn(2, blocks + 5, block_size, kv_heads, head_dim, generator=g).to(dtype)
    table = torch.randperm(blocks + 5, generator=g)[:blocks]  # scattered, as a long-running pool leaves them
    q = torch.randn(chunk, heads, head_dim, generator=g).to(dtype)
    return q, cache, table


@needs_prefill_kernel
@pytest.mark.parametrize("heads, kv_heads, head_dim", [(9, 3, 64), (8, 2, 128), (4, 4, 64)])
@pytest.mark.parametrize("block_size", [4, 16])
@pytest.mark.parametrize("num_computed, chunk", [(0, 1), (0, 37), (0, 300), (5, 3), (100, 77), (33, 1)])
def test_prefill_attention_matches_causal_sdpa(heads, kv_heads, head_dim, block_size, num_computed, chunk):
    # a first chunk (num_computed 0) and later ones (causal offset by the cached context), tails
    # of the 16-key chunks and of the 6-row tiles, GQA and plain multi-head
    q, cache, table = _prefill_case(heads, kv_heads, head_dim, block_size, num_computed, chunk, torch.float32, chunk)
    got = ops.prefill_attention(q, cache, table, num_computed, head_dim**-0.5)
    ref = ops.prefill_attention_ref(q, cache, table, num_computed, head_dim**-0.5)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


@needs_prefill_kernel
@pytest.mark.parametrize("heads, kv_heads, head_dim", [(9, 3, 64), (8, 2, 128)])
def test_prefill_attention_in_bfloat16_matches_the_float32_reference(heads, kv_heads, head_dim):
    q, cache, table = _prefill_case(heads, kv_heads, head_dim, 16, 40, 200, torch.bfloat16, heads)
    got = ops.prefill_attention(q, cache, table, 40, head_dim**-0.5)
    assert got.dtype == torch.bfloat16
    ref = ops.prefill_attention_ref(q.float(), cache.float(), table, 40, head_dim**-0.5)
    torch.testing.assert_close(got.float(), ref, rtol=1.6e-2, atol=1.6e-2)


@needs_prefill_kernel
def test_prefill_attention_reads_q_rows_of_a_wider_tensor_and_writes_into_out():
    # the decoder's q is a view of its fused qkv projection; the output goes into a slice
    g = torch.Generator().manual_seed(7)
    qkv = torch.randn(40, (9 + 2 * 3) * 64, generator=g)
    q = qkv[:, : 9 * 64].reshape(40, 9, 64)
    cache = torch.randn(2, 6, 16, 3, 64, generator=g)
    table = torch.tensor([4, 1, 3])
    out = torch.full((50, 9, 64), 7.0)
    ops.prefill_attention(q, cache, table, 0, 0.125, out=out[5:45])
    ref = ops.prefill_attention_ref(q.contiguous(), cache, table, 0, 0.125)
    torch.testing.assert_close(out[5:45], ref, rtol=1e-5, atol=1e-5)
    assert (out[:5] == 7).all() and (out[45:] == 7).all()
    head_major = q.contiguous().transpose(0, 1).contiguous().transpose(0, 1)  # transformers' layout
    torch.testing.assert_close(ops.prefill_attention(head_major, cache, table, 0, 0.125), ref, rtol=1e-5, atol=1e-5)


@needs_prefill_kernel
def test_prefill_attention_refuses_bad_inputs():
    mod = ops.native()
    cache = torch.zeros(2, 4, 4, 1, 64)
    q = torch.zeros(5, 1, 64)
    out = torch.empty_like(q)
    with pytest.raises(RuntimeError, match="block id out of range"):
        mod.prefill_attention(out, q, cache, torch.tensor([0, 9]), 0, 1.0)
    with pytest.raises(RuntimeError, match="cover fewer"):
        mod.prefill_attention(out, q, cache, torch.tensor([0]), 0, 1.0)
    with pytest.raises(RuntimeError, match="not supported"):
        mod.prefill_attention(torch.empty(5, 1, 8), torch.zeros(5, 1, 8), torch.zeros(2, 4, 4, 1, 8), torch.tensor([0, 1]), 0, 1.0)
    with pytest.raises(RuntimeError, match="float32"):
        mod.prefill_attention(out.double(), q.double(), cache, torch.tensor([0, 1]), 0, 1.0)


@pytest.mark.parametrize("scale", [0.5, 2.0, 6.0])  # very flat (thousands kept) to peaked (a few)
@pytest.mark.parametrize("top_k, min_p, top_p", [(0, 0.0, 0.9), (0, 0.0, 0.5), (0, 0.01, 0.95), (0, 0.0, 0.999),
                                                 (0, 0.05, 1.0), (40, 0.0, 1.0), (300, 0.0, 0.9), (0, 0.0, 1.0)])
def test_sample_rows_matches_the_samplers_torch_path(scale, top_k, min_p, top_p):
    """The native op against the sampler's torch path: u within float32 rounding of torch's
    exp, and on the same u the same kept set (top-k candidates and sorts in torch) but for a
    token whose mass before it is within rounding of top_p; every draw inside the set."""
    from kvd.sampling import SamplingParams
    from kvd.worker.kept_set import KeptSet, exponentiate

    g = torch.Generator().manual_seed(int(scale * 10) + top_k)
    n, vocab, temperature = 8, 49152 - 5, 0.8  # not a whole number of vectors: the masked tail
    x = torch.randn(n, vocab, generator=g) * scale
    x[0, :100] = float("-inf")  # masked tokens: never kept
    params = [SamplingParams(temperature=temperature, top_k=top_k, min_p=min_p, top_p=top_p)] * n
    u_ref = x / temperature
    exponentiate(u_ref)
    kth = torch.full((n,), -1) if not top_k else x.topk(top_k, -1).indices[:, -1]
    args = (torch.full((n,), temperature), kth, torch.full((n,), min_p), torch.full((n,), top_p, dtype=torch.float64))
    u = x.clone()
    tokens, threshold = ops.sample_rows(u, *args, torch.rand(n, dtype=torch.float64, generator=g))
    # exp((x - max) / T), 0 where masked; (x - max) * (1 / T) rounds differently from torch's x / T - max / T
    torch.testing.assert_close(u, u_ref, rtol=3e-5, atol=1e-30)
    ref, _ = KeptSet(g).thresholds(u, u.sum(-1).double(), params)  # the torch cut of the same u
    kept, kept_ref = u >= threshold[:, None], u >= ref[:, None]
    if top_k == 0 and min_p == 0 and top_p == 1:
        assert (kept == (u > 0)).all()  # no cut: every token that is not masked
    else:  # a token either side keeps and the other drops has a mass before it within 1e-6 of top_p
        floor = u >= torch.maximum(kth_u(u, kth), torch.full((n,), min_p)).unsqueeze(1)
        w = (u * floor).double()
        order = w.sort(-1, descending=True)
        before = torch.empty_like(w).scatter_(1, order.indices, order.values.cumsum(-1) - order.values)
        assert ((before / w.sum(-1, keepdim=True) - top_p).abs()[kept != kept_ref] < 1e-6).all()
    if top_k:
        assert (kept.sum(-1) <= top_k).all()
    assert not kept[0, :100].any() and kept.gather(1, tokens[:, None]).all()
    u2 = x.clone()
    _, without_draw = ops.sample_rows(u2, *args, torch.full((n,), -1.0, dtype=torch.float64))
    assert torch.equal(without_draw, threshold)


def kth_u(u: torch.Tensor, kth: torch.Tensor) -> torch.Tensor:
    """Each row's u at its top-k index (0 where there is none)."""
    return torch.where(kth >= 0, u.gather(1, kth.clamp(min=0).unsqueeze(1)).squeeze(1), 0.0)


def test_sample_rows_refuses_bad_inputs():
    x = torch.rand(2, 10)
    rest = (torch.ones(2), torch.full((2,), -1), torch.zeros(2), torch.ones(2, dtype=torch.float64),
            torch.zeros(2, dtype=torch.float64), torch.zeros(2, dtype=torch.long), torch.zeros(2))  # fmt: skip
    with pytest.raises(RuntimeError, match="float32"):
        ops.native().sample_rows(x.double(), *rest)
    with pytest.raises(RuntimeError, match="temperature, min_p and threshold"):
        ops.native().sample_rows(x, torch.ones(3), *rest[1:])
