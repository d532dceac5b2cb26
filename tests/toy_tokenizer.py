"""A sentencepiece-style tokenizer trained in a second from a text: metaspace pieces ('\u2581'
marks a word's leading space, which a decode drops at its start, as Llama's and Mistral's
tokenizers do). For tests that need a tokenizer of that kind, or one that does not come
from the embedded model's package (a GPU machine that carries no model)."""

from __future__ import annotations

from tokenizers.implementations import SentencePieceBPETokenizer
from transformers import PreTrainedTokenizerFast

SAMPLE = ("Grüße aus Köln! 東京タワーは高さ333メートルです。 Emoji: 🐉🔥👍🏽 — naïve café, "
          "\"quotes\" and  double  spaces,\ttabs\nnew lines; numbers 3.14159 and x**2.") * 3  # fmt: skip


def sentencepiece_tokenizer(text: str = SAMPLE, vocab_size: int = 400) -> PreTrainedTokenizerFast:
    sp = SentencePieceBPETokenizer()
    sp.train_from_iterator([text], vocab_size=vocab_size, min_frequency=1, special_tokens=["<unk>", "<s>", "</s>"],
                           show_progress=False)  # fmt: skip
    return PreTrainedTokenizerFast(tokenizer_object=sp, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
