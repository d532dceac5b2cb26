"""Weights in transparent huge pages (`model.huge_pages`, kvd.cpu): a process that asks holds
its large tensors in 2 MiB pages where the kernel's mode allows, one that does not ask holds
none (under madvise), and the log line says which. The daemon's workers:
tests/pd/test_pd_numerics.py reads their model_runner_ready lines."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from kvd import cpu

# A fresh process, as a worker is: the runner asks for huge pages (or not) before any tensor.
BUILD = """
import json
from kvd import cpu
from kvd.config import CacheConfig, ModelConfig
from kvd.worker.model_runner import ModelRunner
from kvd.worker.models import resolve_model
runner = ModelRunner(resolve_model(None), ModelConfig(quantization="auto", dtype="float32", huge_pages={on}),
                     CacheConfig(num_blocks=1))
print(json.dumps({{"mb": cpu.huge_pages_mb(), "env": __import__("os").environ.get(cpu.THP_ENV)}}))
"""


def _held_mb(on: bool) -> dict:
    env = {k: v for k, v in os.environ.items() if k != cpu.THP_ENV} | {"HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", BUILD.format(on=on)], capture_output=True, text=True, env=env,
                          timeout=240)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.timeout(600)
def test_a_runner_that_asks_holds_its_weights_in_huge_pages(smollm2_dir):
    mode = cpu.thp_mode()
    if mode not in ("always", "madvise"):
        pytest.skip(f"transparent huge pages are {mode} on this kernel")
    on, off = _held_mb(True), _held_mb(False)
    assert (on["env"], off["env"]) == ("1", "0")
    # the GGUF's Q8_0 embedding (also the lm_head) is 29.8 MB: at least 12 whole 2 MiB pages of it
    assert on["mb"] >= 24, on
    if mode == "madvise":  # nobody asked: no huge page (under always every process gets some)
        assert off["mb"] == 0, off


def test_thp_mode_reads_the_bracketed_word(tmp_path, monkeypatch):
    setting = tmp_path / "enabled"
    monkeypatch.setattr(cpu, "THP_SETTING", setting)
    assert cpu.thp_mode() == "unknown"  # unreadable
    setting.write_text("always [madvise] never\n")
    assert cpu.thp_mode() == "madvise"
    setting.write_text("[never]\n")
    assert cpu.thp_mode() == "never"


def test_use_huge_pages_sets_torchs_variable(monkeypatch):
    monkeypatch.delenv(cpu.THP_ENV, raising=False)
    cpu.use_huge_pages(False)
    assert os.environ[cpu.THP_ENV] == "0"
    cpu.use_huge_pages(True)
    assert os.environ[cpu.THP_ENV] == "1"
    assert cpu.huge_pages_mb() >= 0
