"""swap_cache_layout on a GPU (gpu-marked: skipped without CUDA): the CUDA op against the
pure-torch reference over the CPU tests' grid, both directions, contiguous, merged and
scattered slots, the byte path for unaligned caches, exact round trips, ordering on the
caller's stream, bad inputs, and swap preemption in the engine on CUDA.

CI has no GPU; `.ci/gpu-check` runs this file on a machine that has one."""

import random

import pytest
import torch
from test_swap_cache_layout import make as make_cpu
from toy_tokenizer import sentencepiece_tokenizer

from kvd import LLM, SamplingParams, ops
from kvd.worker.models import tiny_model_dir

pytestmark = pytest.mark.gpu


def make(*args, **kwargs):
    """The CPU tests' caches and host pool, moved to the GPU and into pinned memory."""
    caches, host = make_cpu(*args, **kwargs)
    return [c.cuda() for c in caches], host.pin_memory()


def check_against_reference(caches, host, blocks, slots, to_host, stream=None):
    ref_caches, ref_host = [c.clone() for c in caches], host.clone()
    stream = stream or torch.cuda.current_stream()
    torch.cuda.synchronize()  # the clones are done before another stream writes what they read
    with torch.cuda.stream(stream):
        ops.swap_cache_layout(caches, host, blocks, slots, to_host)
    stream.synchronize()
    ops.swap_cache_layout_ref(ref_caches, ref_host, blocks, slots, to_host)
    assert torch.equal(host, ref_host)
    assert all(torch.equal(a, b) for a, b in zip(caches, ref_caches))


def test_the_cuda_op_is_built_and_used():
    assert ops.native_cuda() is not None


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("layers, block_size, kv_heads, head_dim", [(1, 1, 1, 8), (3, 16, 3, 64), (4, 4, 2, 80),
                                                                    (2, 16, 8, 128), (2, 3, 1, 3)])  # fmt: skip
@pytest.mark.parametrize("slots", ["contiguous", "runs", "scattered"])
def test_cuda_op_matches_reference(dtype, layers, block_size, kv_heads, head_dim, slots):
    num_blocks, num_slots, n = 64, 40, 12
    g = torch.Generator().manual_seed(1)
    blocks = torch.randperm(num_blocks, generator=g)[:n]
    slot_ids = {
        "contiguous": torch.arange(7, 7 + n),
        "runs": torch.tensor([0, 1, 2, 3, 20, 21, 22, 9, 10, 30, 31, 32]),
        "scattered": torch.randperm(num_slots, generator=g)[:n],
    }[slots]
    for to_host in (True, False):
        caches, host = make(layers, num_blocks, block_size, kv_heads, head_dim, dtype, num_slots, seed=int(to_host))
        check_against_reference(caches, host, blocks, slot_ids, to_host)


@pytest.mark.parametrize("offset_elems, head_dim", [(1, 8), (0, 3)])
def test_unaligned_caches_take_the_byte_path(offset_elems, head_dim):
    shape = (2, 16, 1, 1, head_dim)
    flat = [torch.randn(offset_elems + torch.Size(shape).numel(), device="cuda") for _ in range(3)]
    caches = [f[offset_elems:].view(shape) for f in flat]
    host = torch.randn(8, 3, 2, 1, 1, head_dim).pin_memory()
    for to_host in (True, False):
        check_against_reference(caches, host, torch.tensor([2, 9, 15]), torch.tensor([4, 5, 6]), to_host)


def test_round_trip_returns_the_exact_bytes():
    caches, host = make(5, 64, 16, 3, 64, torch.bfloat16, 48)
    original = [c.clone() for c in caches]
    blocks, slots = torch.tensor([3, 17, 4, 30, 0, 63]), torch.tensor([9, 2, 47, 0, 12, 13])
    ops.swap_cache_layout(caches, host, blocks, slots, to_host=True)
    for c in caches:
        c[:, blocks] = 0
    ops.swap_cache_layout(caches, host, blocks, slots, to_host=False)
    torch.cuda.synchronize()
    assert all(torch.equal(a.view(torch.int16), b.view(torch.int16)) for a, b in zip(caches, original))


def test_ordered_on_the_callers_stream():
    # A side stream writes the caches, then the op copies them out on that same stream:
    # the copy must see the writes (no sync in between), and the host bytes are complete
    # once that stream is synchronised.
    caches, host = make(4, 256, 16, 4, 128, torch.float16, 256)
    side = torch.cuda.Stream()
    blocks = torch.arange(256)
    with torch.cuda.stream(side):
        for layer, c in enumerate(caches):
            c.fill_(layer + 1)
        ops.swap_cache_layout(caches, host, blocks, torch.arange(256), to_host=True)
    side.synchronize()
    for layer in range(4):
        assert bool((host[:, layer] == layer + 1).all())
    check_against_reference(caches, host, torch.randperm(256)[:64], torch.randperm(256)[:64], False, side)


def test_bad_inputs_raise_before_copying():
    caches, host = make(2, 8, 4, 1, 8, torch.float32, 4)
    before = host.clone()
    with pytest.raises(ValueError, match="block_ids"):
        ops.swap_cache_layout(caches, host, torch.tensor([0, 99]), torch.tensor([0, 1]), True)
    with pytest.raises(ValueError, match="written twice"):
        ops.swap_cache_layout(caches, host, torch.tensor([0, 1]), torch.tensor([2, 2]), True)
    with pytest.raises(RuntimeError, match="outside"):  # the op's own checks, for callers that bypass the wrapper
        torch.ops.kvd.swap_cache_layout(caches, host, torch.tensor([8]), torch.tensor([0]), True)
    with pytest.raises(RuntimeError, match="pinned"):
        torch.ops.kvd.swap_cache_layout(caches, host.clone(), torch.tensor([0]), torch.tensor([0]), True)
    torch.cuda.synchronize()
    assert torch.equal(host, before)


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_swap_preemption_on_cuda_gives_the_unpreempted_output(family, tmp_path):
    # A tokenizer of its own: a GPU machine carries no embedded model (prompts are token ids).
    path = str(tiny_model_dir(family, tmp_path, tokenizer=sentencepiece_tokenizer()))
    rng = random.Random(0)
    prompts = [[rng.randrange(100, 40000) for _ in range(n)] for n in (1, 5, 17, 64, 150, 301, 90, 33)]
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    common = dict(device="cuda", dtype="float32", block_size=4, max_num_batched_tokens=128, max_num_seqs=6)
    baseline = LLM(path, **common).generate(prompts, params)
    swapping = LLM(path, num_blocks=100, preempt="swap", swap_space_gb=0.05, **common)
    outs = swapping.generate(prompts, params)
    swapping.check_integrity()
    assert swapping.engine.scheduler.num_swaps > 0
    assert [o.token_ids for o in outs] == [o.token_ids for o in baseline]
