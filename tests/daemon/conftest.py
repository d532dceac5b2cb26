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


@pytest.fixture(scope="module")
def served(tmp_path_factory, smollm2_dir):
    """`kvd serve` on the embedded model with the HTTP API (`.url`), one per test module."""
    from harness import start_daemon

    d = start_daemon(tmp_path_factory.mktemp("served"), None, http={"port": 0})
    d.url = (d.run_dir / "http_endpoint").read_text().strip()
    yield d
    assert d.stop() == 0


@pytest.fixture(scope="module")
def sdk(served):
    """The official openai SDK pointed at `served`."""
    import openai

    return openai.OpenAI(base_url=served.url + "/v1", api_key="none", max_retries=0, timeout=300)
