"""Block hashes: golden vectors, cross-process determinism, domain separation, partial keys."""

import os
import subprocess
import sys

import pytest

from kvd.cache.hashing import block_keys, hash_blocks, partial_block_key, root_hash

# Golden vectors: these must never change without a layout version bump (storage keys depend on them).
GOLDEN_XXH3 = ["2a0f98de10a1b038610a92862e006026", "ac75a82ee31f10c0bec6e633ffa21dca"]
GOLDEN_SHA256 = [
    "87b24a2adf623c166e001f39a2e9fdc7cf12a5e780f30ace4ff045959eb93a11",
    "5ccaefd1c3582f5a45cc512d55e9f7b142516694d4155171aead9d5fdb4824c1",
]


def test_golden_vectors():
    assert root_hash("xxh3_128").hex() == "8a61bc8b7b7ad1d7c164cae477e02961"
    assert [h.hex() for h in hash_blocks(list(range(10)), 4)] == GOLDEN_XXH3
    assert [h.hex() for h in hash_blocks(list(range(10)), 4, algo="sha256")] == GOLDEN_SHA256
    assert block_keys(list(range(10)), 4) == GOLDEN_XXH3 + ["5baaf0f2bdbdc2790e854f4fc9a5ff5c:partial:2"]
    assert block_keys([1, 2, 3], 4, extra_keys=[("lora", "adapter-a")]) == ["aacc5d2319b746579ec2297dfe2260af:partial:3"]


def test_same_keys_in_another_process():
    code = "from kvd.cache.hashing import block_keys; print(block_keys(list(range(10)), 4))"
    env = {**os.environ, "PYTHONHASHSEED": "12345"}  # Python's hash() would differ; ours must not
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    assert eval(out.stdout) == block_keys(list(range(10)), 4)


def test_chain_depends_on_every_earlier_block():
    a = hash_blocks([1, 2, 3, 4, 5, 6, 7, 8], 4)
    b = hash_blocks([9, 2, 3, 4, 5, 6, 7, 8], 4)
    assert a[0] != b[0] and a[1] != b[1]  # same second block, different parent


def test_extra_keys_are_domain_separated():
    toks = [1, 2, 3, 4]
    variants = [
        [],
        [("lora", "1")],
        [("lora", 1)],
        [("salt", "1")],
        [("lora", b"1")],
        [("lo", "ra1")],
        [("lora", "1"), ("salt", "x")],
        [("salt", "x"), ("lora", "1")],
    ]
    hashes = [hash_blocks(toks, 4, v)[0] for v in variants]
    assert len(set(hashes)) == len(variants)


def test_partial_key_format_and_full_blocks():
    assert partial_block_key(list(range(8)), 4) is None
    key = partial_block_key(list(range(7)), 4)
    assert key.endswith(":partial:3")
    # A partial block never equals the full-block key of the same tokens.
    assert key.split(":")[0] not in [h.hex() for h in hash_blocks(list(range(8)), 4)]
    assert len(block_keys([5], 16)) == 1 and block_keys([5], 16)[0].endswith(":partial:1")


def test_incremental_hashing_equals_one_shot():
    toks = list(range(50))
    first = hash_blocks(toks[:20], 8)
    rest = hash_blocks(toks, 8, parent=first[-1], start=16)
    assert first + rest == hash_blocks(toks, 8)
    with pytest.raises(ValueError, match="start"):
        hash_blocks(toks, 8, start=3)


def test_bad_algo_and_extra_key():
    with pytest.raises(ValueError, match="hash_algo"):
        hash_blocks([1], 1, algo="md5")
    with pytest.raises(ValueError, match="extra_keys"):
        hash_blocks([1], 1, extra_keys=[("x", 1.5)])
