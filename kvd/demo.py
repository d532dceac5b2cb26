"""`make demo`: kvd's main job on the embedded default model — answer a few chat prompts in one batch."""

from __future__ import annotations

import time

from kvd import LLM, SamplingParams

QUESTIONS = [
    "What is the capital of France?",
    "Give me three tips for a good night's sleep.",
    "Explain in two sentences what a KV cache does in a language model.",
    "Write a haiku about autumn leaves.",
    "What is 12 times 7?",
    "Name the planets of the solar system.",
]


def main() -> None:
    t0 = time.perf_counter()
    llm = LLM()
    load_s = time.perf_counter() - t0
    convs = [[{"role": "user", "content": q}] for q in QUESTIONS]
    t1 = time.perf_counter()
    outs = llm.chat(convs, SamplingParams(max_tokens=128, temperature=0.0))
    gen_s = time.perf_counter() - t1
    for q, o in zip(QUESTIONS, outs):
        print(f"\n>>> {q}\n{o.text.strip()}")
    llm.check_integrity()
    n_out = sum(len(o.token_ids) for o in outs)
    n_in = sum(len(o.prompt_token_ids) for o in outs)
    print(
        f"\n{len(outs)} requests, {n_in} prompt + {n_out} generated tokens in {gen_s:.2f} s: "
        f"{n_out / gen_s:.1f} generated tok/s (model loaded in {load_s:.1f} s; block pool intact)"
    )


if __name__ == "__main__":
    main()
