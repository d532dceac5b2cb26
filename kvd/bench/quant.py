"""Quantized linears, op by op: `python -m kvd.bench.quant [--kinds Q4_1,Q8_0] [--rows 1,4,8,16,32,256]`.

For SmolLM2-135M's projection shapes, each at several row counts, prints the time of one
call (median of repeats, warm), the GB/s of weight bytes it reads and its GFLOP/s, for:
- kvd's QuantLinear of each block kind, with integer dots (activations rounded to int8
  per block) and with the weights widened to float in registers (`float` column);
- the float32 PackedLinear (oneDNN, prepacked) on the same shape;
and the machine's memory bandwidth (a copy of 256 MiB: bytes read + bytes written per
second) as the ceiling for the rows that stream the weights. Random weights: the timing
does not depend on their values. With `--decode`, then the whole embedded model's decode
under `model.quantization` none and auto: for each of `--streams` (default 1; e.g. 1,32),
that many requests in one `LLM.generate` (distinct 32-token prompts, 128 new tokens each,
greedy, EOS ignored, best of 3), generated tokens per second. Nothing is recorded;
docs/benchmarks.md quotes a run.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from kvd.worker import quant
from kvd.worker.linear import PackedLinear
from kvd.worker.quant import Kind, QuantLinear

# (name, out N, in K): q, k/v, o share 576 x 576 and 192 x 576; gate/up; down; the lm_head
SHAPES = [("q/o", 576, 576), ("k/v", 192, 576), ("gate/up", 1536, 576), ("down", 576, 1536),
          ("lm_head", 49152, 576)]  # fmt: skip


def timed(fn, min_seconds: float = 0.2, min_repeats: int = 5) -> float:
    """Median seconds of one call, after a warm-up, over at least min_seconds."""
    fn()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < min_repeats or time.perf_counter() - start < min_seconds:
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def memory_bandwidth(mib: int = 256) -> float:
    """GB/s of a large tensor copy (read + write), the best of five."""
    src = torch.ones(mib << 18)  # float32: mib MiB
    dst = torch.empty_like(src)
    return _best_gb_s(lambda: dst.copy_(src), 2 * src.nbytes)


def read_bandwidth(mib: int = 256) -> float:
    """GB/s of reading a large tensor once (a sum: what streaming weights can reach), the best of five."""
    src = torch.ones(mib << 18)
    return _best_gb_s(src.sum, src.nbytes)


def _best_gb_s(op, nbytes: int) -> float:
    """GB/s of `op` moving `nbytes`, its best of five runs."""
    return nbytes / min(timed(op, 0.0, 1) for _ in range(5)) / 1e9


def decode_tok_s(quantization: str, dtype: str, streams: int = 1, new_tokens: int = 128, runs: int = 3) -> float:
    """Generated tokens per second of `streams` requests at once on the embedded model (offline LLM)."""
    from kvd import LLM, SamplingParams

    # 32 + 128 tokens a stream: 10 blocks of 16, and a few spare
    llm = LLM(quantization=quantization, dtype=dtype, num_blocks=max(64, 11 * streams))
    text = llm.tokenizer.encode("The history of the printing press begins in the fifteenth century, when " * 12)
    prompts = [text[i : i + 32] for i in range(streams)]  # distinct prompts: no prefix shared
    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    llm.generate(prompts, params)  # warm-up
    best = min(timed(lambda: llm.generate(prompts, params), 0.0, 1) for _ in range(runs))
    return streams * new_tokens / best


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--kinds", default="Q4_1,Q8_0,Q4_0")
    p.add_argument("--rows", default="1,4,8,16,32,256")
    p.add_argument("--shapes", default=",".join(s[0] for s in SHAPES))
    p.add_argument("--decode", default="", help="dtypes (e.g. float32,bfloat16) to time whole-model decode in")
    p.add_argument("--streams", default="1", help="requests decoded at once under --decode (e.g. 1,32)")
    args = p.parse_args(argv)
    for dtype in filter(None, args.decode.split(",")):
        for streams in (int(s) for s in args.streams.split(",")):
            rates = {q: decode_tok_s(q, dtype, streams) for q in ("none", "auto")}
            print(f"{streams} stream(s), {dtype}: quantization none {rates['none']:.1f} tok/s, "
                  f"auto {rates['auto']:.1f} tok/s ({rates['auto'] / rates['none']:.2f}x)", flush=True)  # fmt: skip
    kinds = [Kind[k] for k in args.kinds.split(",")]
    rows = [int(r) for r in args.rows.split(",")]
    shapes = [s for s in SHAPES if s[0] in args.shapes.split(",")]
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"memory bandwidth (256 MiB copy): {memory_bandwidth():.1f} GB/s")  # fmt: skip
    print(f"{'shape':>8} {'N x K':>11} {'rows':>4} {'kind':>6} {'int us':>8} {'GB/s':>6} {'GFLOP/s':>7} "
          f"{'float us':>8} {'GB/s':>6} {'f32 us':>8} {'GB/s':>6} {'GFLOP/s':>7} {'f32/int':>7}")  # fmt: skip
    for name, n, k in shapes:
        w = torch.randn(n, k) * 0.05  # (N, K)
        packed = PackedLinear(w)
        for kind in kinds:
            qw = quant.quantize(w, kind)
            lin_int, lin_float = QuantLinear(qw, int_dot=True), QuantLinear(qw, int_dot=False)
            for m in rows:
                x = torch.randn(m, k)  # (M, K)
                t_int, t_float, t_f32 = (timed(lambda f=f: f(x)) for f in (lin_int, lin_float, packed))
                flop = 2 * m * n * k
                print(f"{name:>8} {f'{n}x{k}':>11} {m:>4} {kind.name:>6} {t_int * 1e6:8.1f} "
                      f"{qw.nbytes / t_int / 1e9:6.1f} {flop / t_int / 1e9:7.1f} {t_float * 1e6:8.1f} "
                      f"{qw.nbytes / t_float / 1e9:6.1f} {t_f32 * 1e6:8.1f} {n * k * 4 / t_f32 / 1e9:6.1f} "
                      f"{flop / t_f32 / 1e9:7.1f} {t_f32 / t_int:7.2f}", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
