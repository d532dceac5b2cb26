"""swap_cache_layout: the native op against the pure-torch reference, both directions, every bad input."""

import shutil

import pytest
import torch

from kvd import ops


def make(layers, num_blocks, block_size, kv_heads, head_dim, dtype, slots, seed=0):
    g = torch.Generator().manual_seed(seed)
    caches = [torch.randn(2, num_blocks, block_size, kv_heads, head_dim, generator=g).to(dtype) for _ in range(layers)]
    host = torch.randn(slots, layers, 2, block_size, kv_heads, head_dim, generator=g).to(dtype)
    return caches, host


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("layers, block_size, kv_heads, head_dim", [(1, 1, 1, 8), (3, 16, 3, 64), (4, 4, 2, 80)])
@pytest.mark.parametrize("contiguous", [True, False])
def test_native_matches_reference_both_directions(dtype, layers, block_size, kv_heads, head_dim, contiguous):
    num_blocks, slots, n = 40, 24, 9
    g = torch.Generator().manual_seed(1)
    block_ids = torch.randperm(num_blocks, generator=g)[:n]
    slot_ids = torch.arange(5, 5 + n) if contiguous else torch.randperm(slots, generator=g)[:n]
    for to_host in (True, False):
        caches, host = make(layers, num_blocks, block_size, kv_heads, head_dim, dtype, slots)
        ref_caches, ref_host = [c.clone() for c in caches], host.clone()
        ops.swap_cache_layout(caches, host, block_ids, slot_ids, to_host)
        ops.swap_cache_layout_ref(ref_caches, ref_host, block_ids, slot_ids, to_host)
        assert torch.equal(host, ref_host) and all(torch.equal(a, b) for a, b in zip(caches, ref_caches))
        if to_host:  # the moved bytes are exactly the blocks', layer by layer, K then V
            for i, (b, s) in enumerate(zip(block_ids.tolist(), slot_ids.tolist())):
                for layer in range(layers):
                    assert torch.equal(host[s, layer], caches[layer][:, b])


def test_round_trip_returns_the_exact_bytes():
    caches, host = make(5, 32, 16, 3, 64, torch.bfloat16, 32)
    original = [c.clone() for c in caches]
    blocks = torch.tensor([3, 17, 4, 30, 0])
    slots = torch.tensor([9, 2, 31, 0, 12])
    ops.swap_cache_layout(caches, host, blocks, slots, to_host=True)
    for c in caches:
        c[:, blocks] = 0
    ops.swap_cache_layout(caches, host, blocks, slots, to_host=False)
    for a, b in zip(caches, original):
        assert torch.equal(a.view(torch.int16), b.view(torch.int16))


def test_registered_as_a_torch_op():
    caches, host = make(2, 8, 4, 1, 8, torch.float32, 4)
    torch.ops.kvd.swap_cache_layout(caches, host, torch.tensor([1]), torch.tensor([2]), True)
    assert torch.equal(host[2, 1], caches[1][:, 1])


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda c, h, b, s: (c, h, torch.tensor([0, 99]), s), "block_ids"),
        (lambda c, h, b, s: (c, h, b, torch.tensor([0, -1])), "slot_ids"),
        (lambda c, h, b, s: (c, h, b, torch.tensor([0])), "block_ids, slot_ids"),
        (lambda c, h, b, s: (c, h.double(), b, s), "dtype"),
        (lambda c, h, b, s: (c, h[:, :1].contiguous(), b, s), "host"),
        (lambda c, h, b, s: (c[:1] + [c[1][:, :4].contiguous()], h, b, s), r"caches\[1\]"),
        (lambda c, h, b, s: (c, h, b, torch.tensor([3, 3])), "written twice"),
        (lambda c, h, b, s: ([], h, b, s), "caches"),
    ],
)
def test_bad_inputs_raise_before_copying(mutate, match):
    caches, host = make(2, 8, 4, 1, 8, torch.float32, 4)
    args = mutate(caches, host, torch.tensor([0, 1]), torch.tensor([0, 1]))
    before = host.clone()
    with pytest.raises(ValueError, match=match):
        ops.swap_cache_layout(*args, to_host=True)
    assert torch.equal(host, before)


def test_native_op_checks_its_own_inputs():
    # Callers that bypass the Python wrapper still get an error, never a crash.
    ops.native()
    caches, host = make(2, 8, 4, 1, 8, torch.float32, 4)
    with pytest.raises(RuntimeError, match="outside"):
        torch.ops.kvd.swap_cache_layout(caches, host, torch.tensor([8]), torch.tensor([0]), True)
    with pytest.raises(RuntimeError, match="written twice"):
        torch.ops.kvd.swap_cache_layout(caches, host, torch.tensor([0, 0]), torch.tensor([1, 2]), False)


# The CUDA op's plan, run on the CPU by the CPU build (`_swap_cache_layout_cuda_plan`):
# the same checks, staging buffer, kernel body over the whole grid and host copy runs as
# native/swap_cache_layout.cu, so its addressing is tested where no GPU is.
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("layers, block_size, kv_heads, head_dim", [(1, 1, 1, 8), (3, 16, 2, 64), (2, 4, 3, 20)])
@pytest.mark.parametrize(
    "slots, runs",
    [
        ([5, 6, 7, 8, 9, 10], 1),  # contiguous: one copy
        ([11, 2, 20, 0, 7, 15], 6),  # scattered: one per slot
        ([3, 4, 5, 12, 13, 0], 3),  # runs of consecutive slots merge
    ],
)
@pytest.mark.parametrize("allow_vectors", [True, False])
def test_cuda_plan_matches_reference(dtype, layers, block_size, kv_heads, head_dim, slots, runs, allow_vectors):
    ops.native()
    block_ids = torch.tensor([30, 1, 17, 8, 22, 4])
    slot_ids = torch.tensor(slots)
    for to_host in (True, False):
        caches, host = make(layers, 32, block_size, kv_heads, head_dim, dtype, 24, seed=int(to_host))
        ref_caches, ref_host = [c.clone() for c in caches], host.clone()
        copies = torch.ops.kvd._swap_cache_layout_cuda_plan(caches, host, block_ids, slot_ids, to_host, allow_vectors)
        ops.swap_cache_layout_ref(ref_caches, ref_host, block_ids, slot_ids, to_host)
        assert copies == runs
        assert torch.equal(host, ref_host) and all(torch.equal(a, b) for a, b in zip(caches, ref_caches))


@pytest.mark.parametrize("offset_elems, head_dim", [(1, 8), (0, 3)])
def test_cuda_plan_moves_bytes_when_not_16_byte_aligned(offset_elems, head_dim):
    # A cache base 4 bytes off alignment, or a 12-byte piece: 16-byte vectors would fault
    # or drop the tail, so the plan must take the byte path and still move every byte.
    ops.native()
    shape = (2, 16, 1, 1, head_dim)
    flat = [torch.randn(offset_elems + torch.Size(shape).numel()) for _ in range(3)]
    caches = [f[offset_elems:].view(shape) for f in flat]
    host = torch.randn(8, 3, 2, 1, 1, head_dim)
    blocks, slots = torch.tensor([2, 9, 15]), torch.tensor([4, 5, 6])
    for to_host in (True, False):
        ref_caches, ref_host = [c.clone() for c in caches], host.clone()
        torch.ops.kvd._swap_cache_layout_cuda_plan(caches, host, blocks, slots, to_host, True)
        ops.swap_cache_layout_ref(ref_caches, ref_host, blocks, slots, to_host)
        assert torch.equal(host, ref_host) and all(torch.equal(a, b) for a, b in zip(caches, ref_caches))


def test_cuda_plan_checks_inputs_like_the_op():
    ops.native()
    caches, host = make(2, 8, 4, 1, 8, torch.float32, 4)
    with pytest.raises(RuntimeError, match="outside"):
        torch.ops.kvd._swap_cache_layout_cuda_plan(caches, host, torch.tensor([8]), torch.tensor([0]), True, True)
    with pytest.raises(RuntimeError, match="written twice"):
        torch.ops.kvd._swap_cache_layout_cuda_plan(caches, host, torch.tensor([0, 1]), torch.tensor([2, 2]), True, True)


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="no nvcc")
def test_cuda_source_compiles_with_nvcc():
    # Where torch has no CUDA (CI), compile the CUDA op for sm_90 against torch's headers,
    # so a type or syntax error in native/swap_cache_layout.cu shows without a GPU.
    obj = ops.compile_cuda_object()
    assert obj.stat().st_size > 0
