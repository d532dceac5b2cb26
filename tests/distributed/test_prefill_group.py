"""The distributed prefill group: real rank processes on gloo, token-identical to one process.

Token-identical means: prefill the prompt on the group (first token + KV), write the KV into
a kvd ModelRunner's paged blocks, decode greedily from there, and get the same tokens as the
ModelRunner alone (prefill + decode in one process, the path the parity tests hold to
transformers). SmolLM2 on prompts of 1, 17, 300 and 1,500 tokens, for (sp, pp) = (2, 1),
(1, 2), (2, 2), with both sync strategies where sp > 1 (with sp = 1 there is nothing to
sync). One group per (sp, pp) serves every prompt and strategy. Then the failure paths: a
rank killed mid-prefill (the last SmolLM2 group) and a rank stuck mid-prefill (a tiny
model, a 3 s collective timeout) both end in GroupFailed within the collective timeout,
with every rank process gone. Last, the groups of a quantized instance (auto, int8, int4):
their ranks load the runner's quantized weights and give its own prefill's KV.
"""

from __future__ import annotations

import os
import re
import signal
import threading
import time

import pytest
import torch

from kvd.config import CacheConfig, ModelConfig, PrefillConfig
from kvd.distributed import ChunkPlan, GroupFailed, LayerMap, ParallelConfig, PrefillGroup, write_kv_to_blocks
from kvd.sampling import SamplingParams
from kvd.scheduler.output import CachedRequestData, NewRequestData, SchedulerOutput
from kvd.worker.model_runner import ModelRunner
from reference import BF16_TIE_GAP, QUANT_TIE_GAP, assert_greedy_match

pytestmark = pytest.mark.timeout(120)  # tests that start processes set their own, larger bound

PROMPT_LENGTHS = (1, 17, 300, 1500)
DECODE_STEPS = 8  # tokens decoded after the first one
GREEDY = SamplingParams(max_tokens=DECODE_STEPS + 1, temperature=0.0, ignore_eos=True)
GREEDY_LOGPROBS = SamplingParams(max_tokens=DECODE_STEPS + 1, temperature=0.0, ignore_eos=True, logprobs=2)
# (1, 2) last: the pipeline test below reuses its group.
CASES = [(2, 1, "all_gather"), (2, 1, "ring"), (2, 2, "all_gather"), (2, 2, "ring"), (1, 2, "all_gather")]


# ---- one process: kvd's ModelRunner, prefill and decode ------------------------------------
class Decoder:
    """Drives a ModelRunner with hand-built SchedulerOutputs: one request at a time."""

    def __init__(self, runner: ModelRunner, params: SamplingParams = GREEDY) -> None:
        self.runner = runner
        self.params = params
        self.step = 0
        self.blocks = list(range(runner.num_blocks))
        self.gaps: list[float] = []  # top-2 logprob gap of each token sampled (with params.logprobs)

    def _run(self, new=(), cached=(), scheduled=None, finished=()) -> list[int]:
        self.step += 1
        so = SchedulerOutput(self.step, list(new), list(cached), scheduled or {}, list(finished), [])
        out = self.runner.execute(so)
        self.gaps += [lp.top_logprobs[0] - lp.top_logprobs[1] for lp in out.logprobs or ()]
        return out.token_ids

    def prefill(self, rid: str, prompt: list[int]) -> tuple[int, torch.Tensor]:
        """The first token and the prompt's KV (L, 2, T, KVH, D), computed in this process."""
        new = NewRequestData(rid, prompt, len(prompt), self.blocks, 0, self.params)
        (first,) = self._run(new=[new], scheduled={rid: len(prompt)})
        kvh, d = self.runner.num_kv_heads, self.runner.head_dim
        kv = torch.stack([c.view(2, -1, kvh, d)[:, : len(prompt)] for c in self.runner.kv_caches])
        self._run(finished=[rid])
        return first, kv.clone()

    def decode(self, rid: str, prompt: list[int], first: int, kv: torch.Tensor | None = None) -> list[int]:
        """[first] + DECODE_STEPS greedy tokens from the KV already in the blocks (or `kv`, written first)."""
        if kv is not None:
            write_kv_to_blocks(kv, self.runner.kv_caches, self.blocks)
        n = len(prompt)
        new = NewRequestData(rid, prompt + [first], n, self.blocks, n, self.params)
        tokens = [first, *self._run(new=[new], scheduled={rid: 1})]
        for i in range(1, DECODE_STEPS):
            tokens += self._run(cached=[CachedRequestData(rid, [], n + i)], scheduled={rid: 1})
        self._run(finished=[rid])
        return tokens


@pytest.fixture(scope="module")
def decoder(smollm2_dir):
    # One thread: the ranks take the cores while they run, and a two-thread team in this process
    # slows down several-fold whenever another process holds a core (2-core CI machines).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    blocks = -(-(max(PROMPT_LENGTHS) + DECODE_STEPS + 1) // 16)
    yield Decoder(ModelRunner(smollm2_dir, ModelConfig(dtype="float32"), CacheConfig(num_blocks=blocks)))
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def prompts(smollm2_dir) -> dict[int, list[int]]:
    from kvd.worker.models import load_tokenizer

    text = " ".join(
        f"Chapter {i}. The ferry left pier {i % 7} at {6 + i % 12} o'clock, carrying {3 * i} crates of apples"
        f" and a letter for the keeper of lighthouse {i % 5}." for i in range(80)
    )
    ids = load_tokenizer(smollm2_dir).encode(text)
    assert len(ids) >= max(PROMPT_LENGTHS)
    return {n: ids[:n] for n in PROMPT_LENGTHS}


@pytest.fixture(scope="module")
def reference(decoder, prompts) -> dict[int, tuple[list[int], torch.Tensor]]:
    """Per prompt length: one process's tokens (first + decoded) and KV."""
    out = {}
    for n, prompt in prompts.items():
        first, kv = decoder.prefill(f"ref-prefill-{n}", prompt)
        out[n] = (decoder.decode(f"ref-{n}", prompt, first), kv)
    return out


# ---- the group: one per (sp, pp), reused across prompts and strategies ---------------------
@pytest.fixture(scope="module")
def groups(smollm2_dir):
    """get(sp, pp): the running group of that shape; the previous one is closed first."""
    current: dict[tuple[int, int], PrefillGroup] = {}

    def get(sp: int, pp: int) -> PrefillGroup:
        if (sp, pp) not in current or not current[(sp, pp)].alive:
            for g in current.values():
                g.close()
            current.clear()
            cfg = ParallelConfig(sp=sp, pp=pp, collective_timeout_s=60)
            current[(sp, pp)] = PrefillGroup(smollm2_dir, cfg, max_tokens=2048, start_timeout_s=120).__enter__()
        return current[(sp, pp)]

    yield get
    for g in current.values():
        g.close()


@pytest.mark.slow
@pytest.mark.timeout(240)
@pytest.mark.parametrize(("sp", "pp", "sync"), CASES)
def test_group_prefill_is_token_identical(sp, pp, sync, groups, prompts, reference, decoder):
    group = groups(sp, pp)
    for n, prompt in prompts.items():
        ref_tokens, ref_kv = reference[n]
        result = group.prefill(prompt, sync=sync)
        assert result.num_tokens == n and result.kv.shape == ref_kv.shape
        # The KV matches one process's to float32 rounding (different chunking, same math).
        assert torch.allclose(result.kv, ref_kv, atol=2e-3, rtol=1e-3), f"{n} tokens: KV max diff " \
            f"{(result.kv - ref_kv).abs().max():.2e}"
        assert result.first_token == int(result.logits.argmax())
        tokens = decoder.decode(f"sp{sp}-pp{pp}-{sync}-{n}", prompt, result.first_token, result.kv)
        assert tokens == ref_tokens, f"(sp={sp}, pp={pp}, {sync}) prompt of {n} tokens"
        stats = result.stats
        assert [s.rank for s in stats] == list(range(sp * pp))
        if sp > 1:  # every rank exchanged every layer's KV
            assert all(s.sync_bytes > 0 and all(t > 0 for t in s.layer_sync_s) for s in stats)
        if pp > 1:  # every later stage received its input from the one before
            assert all(s.p2p_bytes > 0 for s in stats[sp:])


def test_pipeline_stage_holds_only_its_layers(groups, decoder):
    group = groups(1, 2)
    first, last = group.ranks
    assert (first.first_layer, first.end_layer) == (0, group.layer_map.bounds[1])
    assert (last.first_layer, last.end_layer) == (group.layer_map.bounds[1], 30)
    assert first.holds_embedding and first.holds_head and not last.holds_embedding and not last.holds_head
    full = decoder.runner.weight_bytes  # one process
    assert max(r.weight_bytes for r in group.ranks) <= 0.6 * full, [r.weight_bytes / full for r in group.ranks]
    with pytest.raises(ValueError, match="max_tokens"):
        group.prefill([1] * 2049)
    with pytest.raises(ValueError, match="token_ids"):
        group.prefill([1, 49152])
    assert group.alive  # a refused prompt never reaches the ranks


# ---- failures ----------------------------------------------------------------------------
def _pids_gone(pids: list[int]) -> bool:
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        if not any(os.path.exists(f"/proc/{p}") and _state(p) != "Z" for p in pids):
            return True
        time.sleep(0.05)
    return False


def _state(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "Z"


@pytest.mark.timeout(120)
def test_rank_killed_mid_prefill_fails_fast(groups, prompts):
    # The (1, 2) group of the tests above, which this test ends: no start of its own.
    group = groups(1, 2)
    timeout = group.config.collective_timeout_s
    pids = group.pids
    # The last stage is frozen, so stage 0 runs the prefill alone and waits on its sends and on
    # the last token's hidden state; then the last stage is killed.
    os.kill(pids[1], signal.SIGSTOP)
    killer = threading.Timer(0.5, os.kill, (pids[1], signal.SIGKILL))
    killer.start()
    t0 = time.monotonic()
    with pytest.raises(GroupFailed, match="rank 1 .* died during prefill: killed by SIGKILL") as info:
        group.prefill(prompts[300])
    elapsed = time.monotonic() - t0
    killer.join()
    assert info.value.rank == 1
    assert elapsed < min(5.0, timeout / 2)  # the sentinel noticed it, not the 60 s collective timeout
    assert not group.alive and _pids_gone(pids)
    with pytest.raises(GroupFailed, match="down"):
        group.prefill([1, 2, 3])


@pytest.mark.timeout(90)
def test_rank_stuck_mid_prefill_times_out(tiny_llama_dir):
    timeout = 3.0
    with PrefillGroup(tiny_llama_dir, ParallelConfig(sp=2, sync="ring", collective_timeout_s=timeout),
                      max_tokens=512) as group:  # fmt: skip
        pids = group.pids
        os.kill(pids[1], signal.SIGSTOP)  # alive but silent: only the collective's timeout can tell
        t0 = time.monotonic()
        with pytest.raises(GroupFailed, match="rank 0 failed during prefill: .*[Tt]imed out"):
            group.prefill(list(range(100, 140)))
        elapsed = time.monotonic() - t0
        assert timeout * 0.9 < elapsed < timeout + 5
        assert _pids_gone(pids)  # the stopped rank too


# ---- a quantized instance's group: its ranks load the runner's weights ---------------------
# After the failure tests, which end the float (1, 2) group: each runner here starts its own.
@pytest.fixture(scope="module")
def quantized(smollm2_dir):
    """quantization -> a one-process Decoder with that `model.quantization` and a (1, 2) prefill
    group of its runner's own, as the daemon's worker builds it (only the latest one's group
    keeps running). Its `group_min_tokens` chooses where a prompt is prefilled."""
    blocks = -(-(300 + DECODE_STEPS + 1) // 16)
    runners: dict[str, Decoder] = {}
    prefill = PrefillConfig(parallel=ParallelConfig(sp=1, pp=2, collective_timeout_s=60))

    def get(quantization: str) -> Decoder:
        if quantization not in runners:
            for one in runners.values():
                one.runner.group.close()
            config = ModelConfig(dtype="float32", quantization=quantization, max_model_len=2048)
            runner = ModelRunner(smollm2_dir, config, CacheConfig(num_blocks=blocks), prefill=prefill)
            runners[quantization] = Decoder(runner, GREEDY_LOGPROBS)
        return runners[quantization]

    yield get
    for one in runners.values():
        one.runner.group.close()


@pytest.mark.timeout(240)
@pytest.mark.parametrize("quantization", ["auto", "int8", "int4"])
def test_group_prefill_of_a_quantized_instance_is_its_own_prefill(quantization, prompts, quantized):
    """The worker's path with `model.quantization` auto (the GGUF's own blocks), int8 or int4
    (the float checkpoint quantized at load): its runner's group prefills a prompt of at
    least `group_min_tokens` into the runner's blocks, the runner decodes. The ranks build
    their stage from the runner's weight source and run prompt rows as the runner's prefill
    does (float activations, the dequantize-tile GEMM), so the
    group's KV is the runner's own prefill's to float32 rounding — against the float model's
    it differs by the weights' rounding (int8: up to 0.36, measured) — and the tokens are the
    runner's own prefill + decode's up to QUANT_TIE_GAP (the float rounding of the last
    hidden state can flip a near-tie in the lm_head). Each rank holds its stage's weights in
    blocks, not in float: float ranks hold 513 MB, against the runner's 138 (int8) or 94
    (auto, int4). On the embedded model only int8's KV tells the float model's apart (up to
    0.36, measured): its float weights are the GGUF's blocks dequantized, which auto reads
    as they are and int4 requantizes almost exactly (both give the float model's KV to 8e-5),
    so for those two the bytes held are what shows the ranks load blocks."""
    one = quantized(quantization)
    runner, group = one.runner, one.runner.group
    assert runner.fast.quantization == quantization and group.quantization == quantization
    held = [r.weight_bytes for r in group.ranks]
    # Float32 ranks would hold 3.7x (int8) or 5.5x (auto, int4) the runner's bytes; two stages split them.
    assert sum(held) <= 1.05 * runner.weight_bytes and max(held) <= 0.7 * runner.weight_bytes, \
        (held, runner.weight_bytes)
    exact = 0
    for n in (17, 300):
        runner.group_min_tokens = n + 1  # the runner's own prefill
        one.gaps = []
        first, kv = one.prefill(f"{quantization}-ref-prefill-{n}", prompts[n])
        ref = one.decode(f"{quantization}-ref-{n}", prompts[n], first)
        gaps = one.gaps  # the prefill's first token, then each decoded one
        runner.group_min_tokens = n  # the group's, into the runner's blocks, the first token from its logits
        group_first, group_kv = one.prefill(f"{quantization}-group-prefill-{n}", prompts[n])
        assert torch.allclose(group_kv, kv, atol=2e-3, rtol=1e-3), f"{n} tokens: KV max diff " \
            f"{(group_kv - kv).abs().max():.2e}"
        got = one.decode(f"{quantization}-group-{n}", prompts[n], group_first)
        exact += assert_greedy_match(got, ref, gaps, f"{quantization} group, prompt of {n}", QUANT_TIE_GAP)
    assert exact >= 1  # a tie on both prompts would hide a broken handoff


def test_group_refuses_an_unknown_quantization(smollm2_dir):
    with pytest.raises(ValueError, match=re.escape("model.quantization: expected auto|none|int8|int4, got 'int3'")):
        PrefillGroup(smollm2_dir, ParallelConfig(sp=2), quantization="int3")


# ---- pure parts: config, layer map, chunk plan, paged handoff --------------------------------
def test_parallel_config_validation():
    assert ParallelConfig(sp=2, pp=3).world_size == 6
    for kwargs, field in [({"sp": 0}, "sp"), ({"pp": -1}, "pp"), ({"sync": "tree"}, "sync"),
                          ({"collective_timeout_s": 0}, "collective_timeout_s"), ({"master_addr": ""}, "master_addr"),
                          ({"master_port": 70000}, "master_port")]:  # fmt: skip
        with pytest.raises(ValueError, match=f"prefill.parallel.{field}"):
            ParallelConfig(**kwargs)


def test_layer_map():
    m = LayerMap.even(30, 4)
    assert m.bounds == [0, 7, 14, 22, 30]  # later stages take the remainder
    for g in range(30):
        s = m.stage_of(g)
        assert g in m.layers(s) and m.to_global(s, m.to_local(g)) == g
    with pytest.raises(IndexError):
        m.to_global(0, 7)
    with pytest.raises(ValueError, match="pp"):
        LayerMap.even(4, 5)
    # Stage 0 holds the embedding: it gives one layer away when that lowers the heaviest stage.
    assert LayerMap.for_model(30, 2, embed_params=28, layer_params=3).bounds == [0, 14, 30]
    assert LayerMap.for_model(30, 2, embed_params=0, layer_params=3).bounds == [0, 15, 30]
    assert LayerMap.for_model(30, 1, embed_params=28, layer_params=3).bounds == [0, 30]


@pytest.mark.parametrize("n", [1, 2, 3, 17, 300, 1500, 4096, 4097])
@pytest.mark.parametrize(("sp", "pp"), [(1, 1), (2, 1), (1, 2), (2, 2), (3, 2)])
def test_chunk_plan_covers_every_token_once(n, sp, pp):
    plan = ChunkPlan.build(n, sp, pp, max_chunk=1024)
    spans = [plan.span(r, i) for r in range(len(plan.rounds)) for i in range(sp)]
    assert [lo for lo, _ in spans] == [0] + [hi for _, hi in spans[:-1]]  # contiguous, in order
    assert all(hi - lo <= 1024 for lo, hi in spans)
    # Only the last round is padded, and only past the prompt's end.
    assert all(hi <= n for lo, hi in spans[:-sp]) and n <= plan.padded_tokens < n + sp
    rank, row = plan.last_token
    lo, _ = plan.span(len(plan.rounds) - 1, rank)
    assert lo + row == n - 1
    if pp > 1 and n >= 2 * pp * sp:
        assert len(plan.rounds) >= 2 * pp  # enough rounds to keep the pipeline busy


def test_write_kv_to_blocks():
    kv = torch.randn(3, 2, 10, 2, 4)  # (L, 2, T, KVH, D)
    caches = [torch.zeros(2, 6, 4, 2, 4) for _ in range(3)]  # (2, NB, BS, KVH, D)
    write_kv_to_blocks(kv, caches, [5, 1, 3])
    for layer, cache in enumerate(caches):
        got = cache[:, [5, 1, 3]].reshape(2, 12, 2, 4)[:, :10]
        assert torch.equal(got, kv[layer])
        assert cache[:, [0, 2, 4]].abs().sum() == 0
    with pytest.raises(ValueError, match="block_ids"):
        write_kv_to_blocks(kv, caches, [5, 1])


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_group_prefill_in_bf16_matches_one_bf16_process_within_ties(smollm2_dir, prompts, decoder):
    """bf16 ranks hand bf16 KV to a bf16 runner: its tokens are the runner's own prefill's until
    the first step whose top-2 gap is below BF16_TIE_GAP (bf16 rounds logits to 1/8 here).
    (`decoder` holds this process to one thread while the ranks run.)"""
    blocks = -(-(300 + DECODE_STEPS + 1) // 16)
    one = Decoder(ModelRunner(smollm2_dir, ModelConfig(dtype="bfloat16"), CacheConfig(num_blocks=blocks)),
                  GREEDY_LOGPROBS)  # fmt: skip
    parallel = ParallelConfig(sp=2, pp=1, collective_timeout_s=60)
    with PrefillGroup(smollm2_dir, parallel, max_tokens=512, dtype=torch.bfloat16, start_timeout_s=120) as group:
        for n in (17, 300):
            one.gaps = []
            first, kv = one.prefill(f"bf16-ref-prefill-{n}", prompts[n])
            ref = one.decode(f"bf16-ref-{n}", prompts[n], first)
            gaps = one.gaps  # the prefill's first token, then each decoded one
            result = group.prefill(prompts[n], sync="all_gather")
            assert result.kv.dtype == torch.bfloat16 and result.kv.shape == kv.shape
            # bf16 rounds each of 30 layers a step apart: the KV agree in norm, not elementwise.
            rel = float((result.kv.float() - kv.float()).norm() / kv.float().norm())
            assert rel < 2e-2, f"{n} tokens: KV relative difference {rel:.2e}"
            got = one.decode(f"bf16-group-{n}", prompts[n], result.first_token, result.kv)
            assert_greedy_match(got, ref, gaps, f"bf16 group, prompt of {n}", BF16_TIE_GAP)
