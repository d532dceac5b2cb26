"""Shared fixtures: the embedded model (converted once into the kvd cache, its float32
weights included) and tiny random-weight models of each supported family (built once per
session)."""

from pathlib import Path

import pytest

from kvd.worker.models import embedded_model_dir, ensure_float_weights, tiny_model_dir


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    path = embedded_model_dir()
    ensure_float_weights(path)  # the tests that read the checkpoint's float32 weights directly
    return path


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_model_dir("llama", tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_qwen3_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_model_dir("qwen3", tmp_path_factory.mktemp("tiny-qwen3"))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked `gpu` need CUDA; without it they are skipped, never failed."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
