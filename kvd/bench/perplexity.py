"""Perplexity under `model.quantization`: `python -m kvd.bench.perplexity [--tokens 2048]`.

The embedded SmolLM2-135M-Instruct scores a fixed English text (the first `--tokens` tokens
of the Python language reference that kvd.bench.offline's prompts are drawn from) under
`none`, `int8`, `int4` and `auto`, in float32 and, where the CPU has bf16 hardware
(kvd.cpu), in bfloat16. The logprobs are kvd's own: `LLM.generate` with `prompt_logprobs`,
through the decoder that serves. Each mode runs two paths of the quantized linears:
- prefill: chunks of up to 1,024 rows, which dequantize weight tiles into a float GEMM
  (activations unrounded): the change is the weights' alone;
- decode kernel: chunks of `INT_DOT_MAX_ROWS` rows (32) under `quant.int8_prompt_rows()`,
  so that they take the integer-dot kernel that decode steps run (activations rounded to
  int8 per block of 32; serving keeps a prompt's rows in float): weights and activations
  together, as generated tokens see them.

Columns: perplexity, its change against `none` in the same dtype and path (percent), and
the mean and largest |change| of a token's logprob. Note that the embedded checkpoint's
float weights are its GGUF's Q4_1 (layers) and Q8_0 (embedding) values dequantized, so
`int4` of it (Q4_1 again, per group of 32) and `auto` (the GGUF's blocks) hold the same
weights as `none`; `int8` (Q8_0) re-rounds them. Nothing is recorded; docs/benchmarks.md
quotes a run.
"""

from __future__ import annotations

import argparse
import contextlib
import math
from dataclasses import dataclass

import structlog

from kvd import LLM, SamplingParams
from kvd.bench.offline import english_text
from kvd.cpu import machine_flags, no_bf16_reason
from kvd.worker import quant
from kvd.worker.models import load_tokenizer, resolve_model
from kvd.worker.quant import INT_DOT_MAX_ROWS

MODES = ("none", "int8", "int4", "auto")
PATHS = {"prefill": 1024, "decode kernel": INT_DOT_MAX_ROWS}  # path -> max_num_batched_tokens


def text_ids(tokenizer, n_tokens: int) -> list[int]:
    """The first n_tokens tokens of the fixed text (a prefix of it is encoded, not all ~113k)."""
    text = english_text()
    chars = 8 * n_tokens  # English runs ~4 characters a token; 8 leaves room
    ids = tokenizer.encode(text[:chars], add_special_tokens=False)
    if len(ids) < n_tokens:
        ids = tokenizer.encode(text, add_special_tokens=False)
    return ids[:n_tokens]


def prompt_logprobs(llm: LLM, ids: list[int], as_decode: bool = False) -> list[float]:
    """kvd's logprob of each token after the first, given the tokens before it; `as_decode`:
    the prompt's rows on int8 activations, as decode rows (chunks of up to INT_DOT_MAX_ROWS)."""
    with quant.int8_prompt_rows() if as_decode else contextlib.nullcontext():
        out = llm.generate([ids], SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0),
                           use_tqdm=False)[0]  # fmt: skip
    return [lp.logprob for lp in out.prompt_logprobs[1:]]


def perplexity(logprobs: list[float]) -> float:
    return math.exp(-sum(logprobs) / len(logprobs))


@dataclass
class Row:
    dtype: str
    path: str
    mode: str
    ppl: float
    change_pct: float  # against `none` in the same dtype and path
    mean_abs: float  # mean |logprob change| per token
    max_abs: float


def measure(ids: list[int], dtypes: list[str]) -> list[Row]:
    """Every dtype x path x mode, printing each row as it is measured."""
    rows: list[Row] = []
    for dtype in dtypes:
        for path, chunk in PATHS.items():
            base: list[float] | None = None
            for mode in MODES:
                llm = LLM(quantization=mode, dtype=dtype, num_blocks=len(ids) // 16 + 4, max_num_batched_tokens=chunk)
                lps = prompt_logprobs(llm, ids, as_decode=chunk == INT_DOT_MAX_ROWS)
                base = lps if base is None else base
                diffs = [abs(a - b) for a, b in zip(lps, base)]
                ppl, ppl0 = perplexity(lps), perplexity(base)
                rows.append(Row(dtype, path, mode, ppl, 100 * (ppl / ppl0 - 1), sum(diffs) / len(diffs), max(diffs)))
                print(_line(rows[-1]), flush=True)
                del llm
    return rows


HEADER = ("| dtype | path | quantization | perplexity | change | mean abs dlogprob | max abs dlogprob |\n"
          "|---|---|---|--:|--:|--:|--:|")


def _line(r: Row) -> str:
    return (f"| {r.dtype} | {r.path} | {r.mode} | {r.ppl:.4f} | {r.change_pct:+.3f}% | {r.mean_abs:.4f} "
            f"| {r.max_abs:.4f} |")  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=2048, help="tokens of the fixed text to score")
    parser.add_argument("--dtypes", default="float32,bfloat16", help="bfloat16 is skipped without bf16 hardware")
    args = parser.parse_args(argv)
    if args.tokens < 2:
        raise SystemExit("--tokens: must be >= 2")
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(30))  # warnings and up
    dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
    reason = no_bf16_reason(machine_flags())
    if "bfloat16" in dtypes and reason is not None:
        dtypes.remove("bfloat16")
        print(f"bfloat16 skipped: {reason}")
    ids = text_ids(load_tokenizer(resolve_model(None)), args.tokens)
    print(HEADER, flush=True)
    measure(ids, dtypes)
    print(f"\n{len(ids)} tokens of the Python language reference (pydoc_data.topics), the embedded SmolLM2-135M; "
          f"change against quantization = none in the same dtype and path")  # fmt: skip


if __name__ == "__main__":
    main()
