"""The native fused decoder ops (native/fused.cpp) against transformers' own formulas.

Each op must give what the Llama/Qwen3 modules of transformers compute, rounded where they
round: in float32 to float32's rounding, in bfloat16 to within one bf16 step (a sum taken in
another order may round the other way)."""

import pytest
import torch
import torch.nn.functional as F

from kvd import ops

native = ops.native()
pytestmark = pytest.mark.skipif(native is None, reason="the native ops are not built")

DTYPES = [torch.float32, torch.bfloat16]


def _tol(dtype):
    return {"rtol": 1e-5, "atol": 1e-5} if dtype == torch.float32 else {"rtol": 1.6e-2, "atol": 1.6e-2}


def hf_rms_norm(x, w, eps):  # transformers' LlamaRMSNorm.forward
    h = x.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
    return w * h.to(x.dtype)


def hf_rope(x, cos, sin):  # transformers' apply_rotary_pos_emb for one of q, k; (N, H, D), cos (N, D)
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos[:, None] + rotated * sin[:, None]


def _rand(*shape, dtype, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(dtype)


@pytest.mark.parametrize("dtype", DTYPES)
# 40: vector rows on AVX2 (8 lanes), scalar on AVX-512 (16); 36: scalar rows on both
@pytest.mark.parametrize("rows, width", [(1, 576), (33, 576), (7, 64), (3, 40), (3, 36)])
def test_rms_norm_matches_transformers(dtype, rows, width):
    x, w = _rand(rows, width, dtype=dtype, seed=1) * 3, _rand(width, dtype=dtype, seed=2)
    out = torch.empty_like(x)
    native.rms_norm(out, x, w, 1e-5)
    torch.testing.assert_close(out, hf_rms_norm(x, w, 1e-5), **_tol(dtype))
    native.rms_norm(x, x, w, 1e-5)  # in place, as the decoder normalises q and k heads
    torch.testing.assert_close(x, out, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_add_rms_norm_updates_the_residual_and_normalises_it(dtype):
    x, res, w = _rand(9, 576, dtype=dtype, seed=3), _rand(9, 576, dtype=dtype, seed=4), _rand(576, dtype=dtype, seed=5)
    want_res = res + x
    want = hf_rms_norm(want_res, w, 1e-6)
    native.add_rms_norm(x, res, w, 1e-6)
    torch.testing.assert_close(res, want_res, rtol=0, atol=0)  # one rounded add: the same bits
    torch.testing.assert_close(x, want, **_tol(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads, kv_heads, head_dim", [(9, 3, 64), (4, 4, 16), (2, 2, 12)])  # 12: scalar rows
def test_rope_neox_rotates_q_and_k_in_place(dtype, heads, kv_heads, head_dim):
    n = 5
    q, k = _rand(n, heads, head_dim, dtype=dtype, seed=6), _rand(n, kv_heads, head_dim, dtype=dtype, seed=7)
    angles = torch.arange(n)[:, None] * torch.rand(head_dim // 2, generator=torch.Generator().manual_seed(8))
    emb = torch.cat([angles, angles], dim=-1)
    cos, sin = emb.cos().to(dtype), emb.sin().to(dtype)
    want_q, want_k = hf_rope(q, cos, sin), hf_rope(k, cos, sin)
    native.rope_neox(q, k, cos, sin)
    torch.testing.assert_close(q, want_q, **_tol(dtype))
    torch.testing.assert_close(k, want_k, **_tol(dtype))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("heads, kv_heads, head_dim", [(9, 3, 64), (4, 2, 16)])
def test_rope_neox_cache_is_rope_then_the_cache_write(dtype, heads, kv_heads, head_dim):
    """q, k, v as the decoder has them (views into one qkv row per token); the cache gets
    the rotated k and the v at each token's slot, and nothing else changes."""
    n, blocks, block_size = 7, 5, 4
    qkv = _rand(n, (heads + 2 * kv_heads) * head_dim, dtype=dtype, seed=10)
    split = [heads * head_dim, (heads + kv_heads) * head_dim]

    def views(t):
        return (t[:, : split[0]].view(n, heads, head_dim), t[:, split[0] : split[1]].view(n, kv_heads, head_dim),
                t[:, split[1] :].view(n, kv_heads, head_dim))  # fmt: skip

    angles = torch.arange(n)[:, None] * torch.rand(head_dim // 2, generator=torch.Generator().manual_seed(11))
    cos, sin = torch.cat([angles, angles], -1).cos().to(dtype), torch.cat([angles, angles], -1).sin().to(dtype)
    cache = _rand(2, blocks, block_size, kv_heads, head_dim, dtype=dtype, seed=12)
    slots = torch.tensor([17, 0, 3, 19, 8, 9, 12])  # scattered over the blocks, last slot included

    want_qkv, want_cache = qkv.clone(), cache.clone()
    q, k, v = views(want_qkv)
    native.rope_neox(q, k, cos, sin)
    flat = want_cache.view(2, -1, kv_heads, head_dim)
    flat[0].index_copy_(0, slots, k)
    flat[1].index_copy_(0, slots, v)

    q, k, v = views(qkv)
    native.rope_neox_cache(q, k, v, cos, sin, cache, slots)
    assert torch.equal(qkv, want_qkv)  # q and k rotated in place, the same bits
    assert torch.equal(cache, want_cache)

    for bad, match in ((torch.tensor([0, 1, 2, 3, 4, 5, 20]), "slot 20 of token 6 is outside the cache's 20 slots"),
                       (torch.tensor([0, -1, 2, 3, 4, 5, 6]), "slot -1 of token 1"),
                       (slots[:3], r"\(N,\) int64"), (slots.int(), "int64")):  # fmt: skip
        before = cache.clone()
        with pytest.raises(RuntimeError, match=match):
            native.rope_neox_cache(q, k, v, cos, sin, cache, bad)
        assert torch.equal(cache, before)  # refused before any write
    with pytest.raises(RuntimeError, match="cache must be"):
        native.rope_neox_cache(q, k, v, cos, sin, cache[:, :, :2], slots)


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_and_mul_matches_transformers(dtype):
    x = _rand(6, 2 * 1536, dtype=dtype, seed=9) * 4
    out = x.new_empty(6, 1536)
    native.silu_and_mul(out, x)
    torch.testing.assert_close(out, F.silu(x[:, :1536]) * x[:, 1536:], **_tol(dtype))


def test_fused_ops_refuse_bad_shapes_and_dtypes():
    x = torch.zeros(2, 8)
    with pytest.raises(RuntimeError, match="float32 or bfloat16"):
        native.rms_norm(x.double(), x.double(), torch.zeros(8).double(), 1e-5)
    with pytest.raises(RuntimeError, match="weight"):
        native.rms_norm(x, x, torch.zeros(7), 1e-5)
    with pytest.raises(RuntimeError, match="differ in shape"):
        native.add_rms_norm(x, torch.zeros(3, 8), torch.zeros(8), 1e-5)
    with pytest.raises(RuntimeError, match="cos and sin"):
        native.rope_neox(torch.zeros(2, 1, 8), torch.zeros(2, 1, 8), torch.zeros(2, 4), torch.zeros(2, 4))
    with pytest.raises(RuntimeError, match=r"\(R, 2I\)"):
        native.silu_and_mul(torch.zeros(2, 4), torch.zeros(2, 6))
