"""vLLM's CPU engine on a request file: the peer side of `python -m kvd.bench.versus`.

    .venv-vllm/bin/python kvd/bench/vllm_peer.py REQUESTS.json RESULT.json

Runs in its own venv (`make bench-peer`), where kvd is not installed: it imports the
standard library and vllm only. The request file, written by kvd.bench.versus:

    {"model": DIR, "dtype": "float32" | "bfloat16", "threads": N, "kv_cache_gb": G,
     "sections": {NAME: {"warmup": [REQ, ...], "runs": [[REQ, ...], ...]}, ...}}
    REQ = {"prompt": [token ids], "max_tokens": n}

Each section gets its warm-up batch first (untimed, prompts not used in its runs), then
each run is one `LLM.generate` over its requests, timed with `time.perf_counter`; every
request is greedy (temperature 0) with EOS ignored, so it yields exactly max_tokens.
The result file:

    {"vllm": VERSION, "torch": VERSION, "cpus": "0,1", "load_seconds": s, "config": {...},
     "sections": {NAME: {"seconds": [per run], "outputs": [[token ids per request] per run]}}}

Threads: vLLM binds its worker's OpenMP threads to VLLM_CPU_OMP_THREADS_BIND; left at
"auto" it keeps one core for its scheduler process, one thread on a 2-core machine, so
the first `threads` CPUs of this process's affinity are named explicitly. The KV cache
is sized explicitly (`kv_cache_memory_bytes`): otherwise vLLM reserves
gpu_memory_utilization (0.9) of the host's memory. Everything else is vLLM's default
(block size 128 on CPU, chunked prefill, prefix caching, its torch.compile path). Its
compiled model does not load back from ~/.cache/vllm in this build ("'function' object
has no attribute 'finalize_loading'"), so every start compiles again (untimed).
"""

import json
import os
import sys
import time
from importlib.metadata import version


def configure_env(threads: int) -> str:
    """The environment vLLM reads at import and in its spawned processes; returns the CPU list."""
    cpus = ",".join(str(c) for c in sorted(os.sched_getaffinity(0))[:threads])
    os.environ["OMP_NUM_THREADS"] = str(threads)
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = cpus
    for key in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "VLLM_NO_USAGE_STATS", "DO_NOT_TRACK"):
        os.environ[key] = "1"  # nothing is fetched or reported: the model is a local directory
    return cpus


def engine_config(llm) -> dict:
    """The settings that shape vLLM's figures, as its CPU platform resolved them."""
    config = llm.llm_engine.vllm_config
    compilation = config.compilation_config
    return {
        "block_size": config.cache_config.block_size,
        "enable_prefix_caching": config.cache_config.enable_prefix_caching,
        "max_num_batched_tokens": config.scheduler_config.max_num_batched_tokens,
        "max_num_seqs": config.scheduler_config.max_num_seqs,
        "enable_chunked_prefill": config.scheduler_config.enable_chunked_prefill,
        "compilation": f"{compilation.mode.name} ({compilation.backend or 'no backend'})",
    }


def run_batch(llm, requests: list[dict]) -> tuple[float, list[list[int]]]:
    """(wall seconds, generated token ids per request) of one `LLM.generate` call."""
    from vllm import SamplingParams

    prompts = [{"prompt_token_ids": r["prompt"]} for r in requests]
    params = [SamplingParams(temperature=0.0, max_tokens=r["max_tokens"], ignore_eos=True) for r in requests]
    start = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    seconds = time.perf_counter() - start
    return seconds, [list(o.outputs[0].token_ids) for o in outs]


def main(argv: list[str]) -> None:
    if len(argv) != 2:
        sys.exit("usage: vllm_peer.py REQUESTS.json RESULT.json")
    with open(argv[0]) as f:
        spec = json.load(f)
    cpus = configure_env(spec["threads"])

    import vllm

    start = time.perf_counter()
    llm = vllm.LLM(model=spec["model"], tokenizer=spec["model"], dtype=spec["dtype"],
                   kv_cache_memory_bytes=int(spec["kv_cache_gb"] * 2**30), seed=0)  # fmt: skip
    result = {"vllm": vllm.__version__, "torch": version("torch"), "cpus": cpus,
              "load_seconds": time.perf_counter() - start, "config": engine_config(llm), "sections": {}}  # fmt: skip
    for name, section in spec["sections"].items():
        run_batch(llm, section["warmup"])
        timed = [run_batch(llm, requests) for requests in section["runs"]]
        result["sections"][name] = {"seconds": [t for t, _ in timed], "outputs": [o for _, o in timed]}
    with open(argv[1], "w") as f:
        json.dump(result, f)


if __name__ == "__main__":  # vLLM starts its engine and worker processes with spawn
    main(sys.argv[1:])
