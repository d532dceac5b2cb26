"""IncrementalDetokenizer: the streamed pieces add up to the whole decode, for a byte-level BPE
tokenizer (SmolLM2's) and a sentencepiece-style one (metaspace: a word's leading space is
dropped at the start of a decode, as Llama's and Mistral's tokenizers do), multi-byte
characters included; and the work per token stays bounded (no re-decode of the output)."""

import random

import pytest
from toy_tokenizer import SAMPLE as TEXT
from toy_tokenizer import sentencepiece_tokenizer

from kvd.engine.detokenizer import IncrementalDetokenizer
from kvd.worker.models import load_tokenizer


@pytest.fixture(scope="module", params=["byte_level", "sentencepiece"])
def tokenizer(request, smollm2_dir):
    return load_tokenizer(smollm2_dir) if request.param == "byte_level" else sentencepiece_tokenizer()


def test_sentencepiece_fixture_drops_the_leading_space_of_a_decode():
    tok = sentencepiece_tokenizer()
    ids = tok.encode("aus Köln", add_special_tokens=False)
    assert tok.decode(ids) == "aus Köln"
    k = next(i for i in range(1, len(ids)) if tok.convert_ids_to_tokens(ids[i]).startswith("\u2581"))
    assert tok.decode(ids[k:]) == tok.decode(ids)[len(tok.decode(ids[:k])) + 1 :]  # the space is gone


def test_pieces_add_up_to_the_whole_decode(tokenizer):
    ids = tokenizer.encode(TEXT, add_special_tokens=False)
    rng = random.Random(0)
    for trial in range(20):
        d, pieces, i = IncrementalDetokenizer(tokenizer), [], 0
        while i < len(ids):
            n = rng.choice([1, 1, 1, 2, 3])  # mostly one token a step, as in decode
            pieces.append(d.add(ids[i : i + n]))
            i += n
        pieces.append(d.finish())
        whole = tokenizer.decode(ids, skip_special_tokens=True)
        assert "".join(pieces) == whole == d.text, f"trial {trial}"
        assert all("\ufffd" not in p for p in pieces[:-1])  # no half character is ever streamed


def test_random_token_ids_never_stream_a_half_character(tokenizer):
    rng = random.Random(1)
    ids = [rng.randrange(tokenizer.vocab_size) for _ in range(300)]
    d = IncrementalDetokenizer(tokenizer)
    pieces = [d.add([t]) for t in ids] + [d.finish()]
    assert "".join(pieces) == d.text
    assert d.text.rstrip("\ufffd") == tokenizer.decode(ids, skip_special_tokens=True).rstrip("\ufffd")


def test_work_per_token_is_bounded(tokenizer):
    """Decoding cost grows with the tokens added, not with the output so far."""
    ids = tokenizer.encode(TEXT * 8, add_special_tokens=False)
    decoded = []
    d = IncrementalDetokenizer(tokenizer)
    real = d._decode
    d._decode = lambda window: decoded.append(len(window)) or real(window)
    for t in ids:
        d.add([t])
    assert d.text + d.finish() == tokenizer.decode(ids, skip_special_tokens=True)
    assert max(decoded) <= 8 and sum(decoded) <= 6 * len(ids)  # a window of a few tokens, never the output
