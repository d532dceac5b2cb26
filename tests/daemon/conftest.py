"""Fixtures for daemon integration tests (see harness.py)."""

import pytest

from harness import DaemonHandle


@pytest.fixture
def daemons():
    """Start daemons with `daemons.append(start_daemon(...))`; all are stopped at the end."""
    started: list[DaemonHandle] = []
    yield started
    for d in started:
        d.stop()


@pytest.fixture(scope="module")
def tokenizer():
    """A sentencepiece-style tokenizer trained in a second (the in-process tests' toy)."""
    from toy_tokenizer import sentencepiece_tokenizer

    return sentencepiece_tokenizer()


@pytest.fixture(scope="module")
def chat_tokenizer(tokenizer):
    """The toy tokenizer with a plain chat template."""
    return tokenizer.__class__(tokenizer_object=tokenizer._tokenizer, chat_template=(
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}assistant:"))
