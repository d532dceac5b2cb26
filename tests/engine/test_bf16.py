"""bfloat16: which CPUs get it, and that its outputs are transformers' own in bf16 up to ties.

bf16 keeps 8 significant bits, so a logit near 20 is held to a step of 0.125: two kernel
orders that are both right (kvd's fused ops and packed matmuls, transformers' modules) round
the same logit a step or two apart. Greedy tokens must match transformers run in bf16 on the
same prompts until the first step whose top-2 logit gap is within BF16_TIE_GAP (two such
steps), where either engine's pick is as valid as the other's.
"""

import pytest
import torch

from kvd import LLM, SamplingParams
from kvd.cpu import auto_cpu_dtype, cpu_flags, no_bf16_reason
from kvd.worker import linear
from kvd.worker.decoder import Decoder
from kvd.worker.model_runner import resolve_dtype
from kvd.worker.models import load_config, load_model
from reference import BF16_TIE_GAP, assert_greedy_match, hf_greedy

MAX_TOKENS = 32
QUESTIONS = ["What is the capital of France?", "Write a haiku about the sea.",
             "Explain what a KV cache is in one sentence.", "List three prime numbers."]  # fmt: skip

AMX_XEON = "processor\t: 0\nflags\t\t: fpu sse avx2 avx512f avx512_bf16 amx_bf16 amx_tile amx_int8\n"
AVX2_EPYC = "processor\t: 0\nflags\t\t: fpu sse avx2 fma\n"
AVX512_BF16_EPYC = "processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_bf16 avx512_vnni\n"


# ---- auto dtype from the CPU's flags -------------------------------------------------------
def test_cpu_flags_parse_the_first_processor():
    assert cpu_flags(AMX_XEON) >= {"amx_bf16", "avx512_bf16", "avx2"}
    assert cpu_flags("processor\t: 0\n") == frozenset()


@pytest.mark.parametrize(("cpuinfo", "want"), [(AMX_XEON, torch.bfloat16), (AVX512_BF16_EPYC, torch.bfloat16),
                                               (AVX2_EPYC, torch.float32), ("", torch.float32)])  # fmt: skip
def test_auto_dtype_is_bf16_only_on_cpus_with_bf16_hardware(cpuinfo, want):
    flags = cpu_flags(cpuinfo)
    assert resolve_dtype("auto", torch.device("cpu"), flags) == want
    dtype, why = auto_cpu_dtype(flags)
    assert getattr(torch, dtype) == want and why  # the log line says why
    assert (no_bf16_reason(flags) is None) == (want == torch.bfloat16)


def test_explicit_dtypes_are_kept_whatever_the_cpu():
    avx2 = cpu_flags(AVX2_EPYC)
    assert resolve_dtype("float32", torch.device("cpu"), cpu_flags(AMX_XEON)) == torch.float32
    assert resolve_dtype("bfloat16", torch.device("cpu"), avx2) == torch.bfloat16  # slow, and logged as such
    assert resolve_dtype("auto", torch.device("cuda"), avx2) == torch.bfloat16


# ---- the decoder's fallback ----------------------------------------------------------------
def test_decoder_falls_back_with_the_reason_where_it_does_not_apply(tiny_llama_dir, capsys):
    config = load_config(tiny_llama_dir)
    config.hidden_act = "gelu"
    assert "hidden_act 'gelu'" in Decoder.why_not(config, torch.device("cpu"), torch.float32)
    assert Decoder.why_not(load_config(tiny_llama_dir), torch.device("cpu"), torch.float32) is None
    with pytest.raises(ValueError, match="model.implementation"):
        LLM(str(tiny_llama_dir), dtype="float16", implementation="kvd", num_blocks=16)
    assert "kvd_decoder_off" in capsys.readouterr().out


def test_without_onednn_bf16_kernels_bf16_takes_transformers_forward(tiny_llama_dir, monkeypatch, capsys):
    monkeypatch.setattr(linear, "bf16_kernels", lambda: False)  # an AVX2-only CPU: the packed bf16 linear raises
    llm = LLM(str(tiny_llama_dir), dtype="bfloat16", num_blocks=16)
    assert llm.engine.runner.fast is None and "no bf16 kernels" in capsys.readouterr().out
    assert llm.generate([[1, 2, 3]], SamplingParams(max_tokens=3, temperature=0.0))[0].finish_reason == "length"


# ---- greedy parity with transformers in bf16 -------------------------------------------------
@pytest.fixture(scope="module")
def bf16_ref(smollm2_dir):
    return load_model(smollm2_dir, torch.bfloat16, "cpu")


def _prompts(llm):
    chat = [llm.apply_chat_template([{"role": "user", "content": q}]) for q in QUESTIONS]
    long = llm.tokenizer.encode(" ".join(f"Paragraph {i}: the river flows past mill {i * 7}." for i in range(40)))
    return [*chat, llm.tokenizer.encode("Once upon a time, in a land far away,"), long]


def _check(llm, ref, outs, prompts, label):
    """Identical up to a tie; at the divergence, kvd's token is one transformers scored within
    BF16_TIE_GAP of its best (the tie was between the tokens the two engines picked)."""
    eos = set(llm.engine.eos_token_ids)
    for i, (p, o) in enumerate(zip(prompts, outs)):
        ref_tokens, gaps, logits = hf_greedy(ref, p, MAX_TOKENS, eos, with_logits=True)
        if assert_greedy_match(o.token_ids, ref_tokens, gaps, f"{label} prompt {i}", BF16_TIE_GAP):
            continue
        step = next(s for s, (a, b) in enumerate(zip(o.token_ids, ref_tokens)) if a != b)
        behind = float(logits[step].max() - logits[step][o.token_ids[step]])
        assert behind < BF16_TIE_GAP, f"{label} prompt {i}: at step {step} kvd's token was {behind:.3f} behind"


@pytest.mark.slow
@pytest.mark.parametrize("implementation", ["kvd", "transformers"])
def test_bf16_greedy_matches_transformers_bf16_within_ties(smollm2_dir, bf16_ref, implementation):
    if implementation == "kvd" and (reason := linear.available(torch.bfloat16)):
        pytest.skip(reason)
    llm = LLM(str(smollm2_dir), dtype="bfloat16", implementation=implementation, max_num_batched_tokens=256)
    assert llm.engine.runner.dtype == torch.bfloat16 and llm.engine.runner.kv_all.dtype == torch.bfloat16
    prompts = _prompts(llm)
    outs = llm.generate(prompts, SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0), use_tqdm=False)
    llm.check_integrity()
    _check(llm, bf16_ref, outs, prompts, implementation)


@pytest.mark.slow
def test_bf16_swap_preemption_within_ties_and_no_leak(smollm2_dir, bf16_ref):
    llm = LLM(str(smollm2_dir), dtype="bfloat16", num_blocks=40, max_num_batched_tokens=256, preempt="swap",
              swap_space_gb=0.25)  # fmt: skip
    prompts = _prompts(llm)
    outs = llm.generate(prompts, SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0), use_tqdm=False)
    assert llm.engine.scheduler.num_swaps > 0  # the cache was too small: requests went to host memory and back
    llm.check_integrity()
    _check(llm, bf16_ref, outs, prompts, "swap")
