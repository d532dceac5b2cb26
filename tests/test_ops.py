"""Native ops against their pure-torch references."""

import pytest
import torch

from kvd import ops


def test_native_extension_builds_here():
    # `make` builds it during set-up; a machine with a C++ compiler must have it.
    assert ops.native() is not None


@pytest.mark.parametrize("heads, kv_heads, head_dim", [(9, 3, 64), (4, 4, 16), (8, 2, 80), (2, 1, 7)])
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



@pytest.mark.parametrize("heads, kv_heads, head_dim", [(9, 3, 64), (8, 2, 80)])
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
