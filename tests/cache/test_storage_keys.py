"""Storage keys: golden vectors, and every component of the namespace changes it."""

import os
import subprocess
import sys

import pytest

from kvd.cache.storage.keys import ParallelLayout, storage_key, storage_namespace



def test_golden_namespace():
    # Must never change without a LAYOUT_VERSION bump: pools outlive processes.
    ns = storage_namespace("abc123", "float32", 16)
    assert ns == "kvd-v1-ed4430931664daec-tp0of1-pp0of1"
    assert storage_namespace("abc123", "float32", 16, ParallelLayout(1, 2, 0, 1)) == (
        "kvd-v1-ed4430931664daec-tp1of2-pp0of1"
    )
    assert storage_key(ns, "ff:partial:3") == ns + "/ff:partial:3"


def test_same_namespace_in_another_process():
    code = "from kvd.cache.storage.keys import storage_namespace as s; print(s('abc123', 'float32', 16))"
    env = {**os.environ, "PYTHONHASHSEED": "99"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    assert out.stdout.strip() == storage_namespace("abc123", "float32", 16)


def test_every_component_separates():
    base = storage_namespace("abc123", "float32", 16)
    others = [
        storage_namespace("abc124", "float32", 16),
        storage_namespace("abc123", "bfloat16", 16),
        storage_namespace("abc123", "float32", 32),
        storage_namespace("abc123", "float32", 16, ParallelLayout(tp_rank=1, tp_size=2)),
        storage_namespace("abc123", "float32", 16, ParallelLayout(pp_rank=0, pp_size=2)),
    ]
    assert len({base, *others}) == 6


def test_bad_layout():
    with pytest.raises(ValueError, match="ranks"):
        ParallelLayout(tp_rank=2, tp_size=2)
