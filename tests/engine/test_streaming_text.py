"""The Engine's streamed text (what the daemon sends per step): the pieces add up to the
final text (so no piece ever held half of a character that a later token completed), and a stop string never reaches the stream —
the characters that could begin one wait until the next token settles it."""

from __future__ import annotations

import pytest

from kvd import LLM, SamplingParams


@pytest.fixture(scope="module")
def engine(tiny_llama_dir):
    llm = LLM(str(tiny_llama_dir), dtype="float32", block_size=4, num_blocks=1024, max_model_len=1024)
    llm.engine.text.stream_text = True  # as the daemon's text stage
    return llm.engine


def stream(engine, prompts: list[str], params: list[SamplingParams]):
    """Run to completion; per request: the streamed pieces and the final output."""
    rids = [engine.add(engine.text.prompt_ids(p), sp)[0] for p, sp in zip(prompts, params)]
    pieces: dict[str, list[str]] = {rid: [] for rid in rids}
    final = {}
    while engine.has_unfinished():
        for delta in engine.step_deltas():
            pieces[delta.request_id].append(delta.text)
            if delta.output is not None:
                final[delta.request_id] = delta.output
    engine.check_integrity()
    return [(pieces[rid], final[rid]) for rid in rids]


def sampled(seed: int, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=120, temperature=1.0, seed=seed, ignore_eos=True, **kw)


PROMPTS = ["Grüße aus Köln", "東京タワー", "emoji 🐉🔥", "plain text"]


def test_streamed_pieces_add_up_to_the_final_text(engine):
    for pieces, out in stream(engine, PROMPTS, [sampled(i) for i in range(len(PROMPTS))]):
        assert "".join(pieces) == out.text == engine.text.tokenizer.decode(out.token_ids, skip_special_tokens=True)
        assert len(out.token_ids) == 120


def test_a_stop_string_never_reaches_the_stream(engine):
    refs = stream(engine, PROMPTS, [sampled(i) for i in range(len(PROMPTS))])
    cases = []
    for i, (_, ref) in enumerate(refs):
        text = ref.text
        for at in (len(text) // 3, len(text) // 2, 2 * len(text) // 3):
            stop = text[at : at + 5]
            if len(stop.strip()) >= 3:  # a stop of several characters spans tokens
                cases.append((i, [stop, "\x00never"]))
        tail = text.rstrip("\ufffd")[-4:]  # completed by (about) the last token: a stop beats "length"
        if len(tail.strip()) >= 3 and "\ufffd" not in tail:
            cases.append((i, [tail]))
    assert len(cases) >= 8
    runs = stream(engine, [PROMPTS[i] for i, _ in cases], [sampled(i, stop=stop) for i, stop in cases])
    for (i, stop), (pieces, out) in zip(cases, runs):
        ref = refs[i][1].text
        assert out.finish_reason == "stop"
        assert out.text == ref[: ref.index(stop[0])]  # cut before the first match
        assert "".join(pieces) == out.text  # nothing streamed that the cut took back
        assert all(stop[0] not in "".join(pieces[: k + 1]) for k in range(len(pieces)))
