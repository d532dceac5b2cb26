"""`model.quantization = "auto"` starts from the shipped GGUF file alone: no float32 weights
written, read or held; the weights held are about the file's bytes; the tokens are those of
auto over the converted float32 checkpoint. Where float weights are needed they are
converted then, once."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kvd import LLM, SamplingParams, ops
from kvd.worker import models, quant_load
from kvd.worker.gguf_file import GGUFFile
from kvd.worker.linear import PackedLinear
from kvd.worker.models import embedded_gguf_file, embedded_model_dir, ensure_float_weights, load_model
from kvd.worker.quant import QuantEmbedding, QuantLinear
from kvd.worker.quant_load import FloatSource, GGUFSource

needs_native = pytest.mark.skipif(ops.native() is None, reason="the native ops are not built")

PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,"]
GREEDY = SamplingParams(max_tokens=16, temperature=0.0, ignore_eos=True)
# what `auto` may hold beyond the file's bytes (the target): the file's header and
# tokenizer are not held; norms and the kernels' row indices are (a few MB)
MAX_WEIGHTS_OVER_FILE = 1.2


@pytest.fixture(scope="module")
def float_model(smollm2_dir):
    return load_model(smollm2_dir, torch.float32, "cpu")


def _no_float_conversion(monkeypatch):
    def refuse(gguf, out):
        raise AssertionError("auto must not dequantize the GGUF into float32 weights")

    monkeypatch.setattr(models, "_dequantize_gguf", refuse)


@needs_native
def test_auto_starts_from_a_fresh_cache_without_float_weights(tmp_path, monkeypatch):
    _no_float_conversion(monkeypatch)
    llm = LLM(quantization="auto", dtype="float32", num_blocks=64, cache_dir=str(tmp_path))
    runner = llm.engine.runner
    assert runner.fast.quantization == "auto" and runner.model_dir.parent == tmp_path / "models"
    assert (runner.model_dir / "config.json").is_file() and (runner.model_dir / "tokenizer.json").is_file()
    assert list(tmp_path.rglob("*.safetensors")) == []
    # the projections, embedding and lm_head were never materialised as float
    assert isinstance(runner.fast.embed, QuantEmbedding) and isinstance(runner.fast.lm_head, QuantLinear)
    assert all(isinstance(lin, QuantLinear) for lin in runner.fast.linears())
    out = llm.generate(["The capital of France is"], GREEDY)[0]
    assert "Paris" in out.text


@needs_native
def test_auto_tokens_are_those_of_auto_over_the_float_checkpoint(smollm2_dir, monkeypatch):
    """Same blocks, same norms (float32 in the file, as converted): the same tokens, exactly."""
    new = LLM(quantization="auto", dtype="float32", num_blocks=64)
    monkeypatch.setattr(GGUFSource, "model", FloatSource.model)  # as before: the float checkpoint loaded first
    old = LLM(quantization="auto", dtype="float32", num_blocks=64)
    assert old.engine.runner.fast.quantization == "auto"
    got = [o.token_ids for o in new.generate(PROMPTS, GREEDY)]
    want = [o.token_ids for o in old.generate(PROMPTS, GREEDY)]
    assert got == want
    assert new.engine.runner.model_info().fingerprint == old.engine.runner.model_info().fingerprint


@needs_native
def test_auto_holds_about_the_files_bytes():
    llm = LLM(quantization="auto", dtype="float32", num_blocks=16)
    held, file_bytes = llm.engine.runner.fast.weight_bytes, embedded_gguf_file().stat().st_size
    assert held == llm.engine.runner.weight_bytes
    # at least the weights' blocks (Q4_1 layers, Q8_0 embedding shared with the lm_head) ...
    assert held >= 0.9 * file_bytes, held / file_bytes
    # ... and not much more: no float copy of any of them
    assert held <= MAX_WEIGHTS_OVER_FILE * file_bytes, held / file_bytes


def test_the_skeleton_holds_only_the_small_float_tensors(float_model, smollm2_dir):
    src = GGUFSource(embedded_gguf_file(), float_model.config)
    skeleton = src.model(smollm2_dir, torch.float32, torch.device("cpu"))
    want = dict(float_model.named_parameters())
    for name, p in skeleton.named_parameters():
        if name.endswith(("_proj.weight", "embed_tokens.weight", "lm_head.weight")):
            assert p.is_meta, name
        else:  # norms: the file's float32, exactly the converted checkpoint's
            assert torch.equal(p, want[name]), name
    assert not skeleton.model.rotary_emb.inv_freq.is_meta
    torch.testing.assert_close(skeleton.model.rotary_emb.inv_freq, float_model.model.rotary_emb.inv_freq)
    assert skeleton.generation_config.eos_token_id == float_model.generation_config.eos_token_id


def test_a_type_the_kernels_do_not_read_is_dequantized_from_the_file(float_model, monkeypatch):
    """Without Q8_0 and Q4_1 among the kept kinds, every weight comes dequantized from the
    file (q and k rows un-permuted), logged once per type, equal to the converted floats."""
    lines = []

    class Log:
        def info(self, event, **kw):
            lines.append((event, kw))

    monkeypatch.setattr(quant_load, "log", Log())
    monkeypatch.setattr(quant_load, "_GGUF_KINDS", {})
    src = GGUFSource(embedded_gguf_file(), float_model.config)
    a = float_model.model.layers[3].self_attn
    qkv = src.linear(3, ("q_proj", "k_proj", "v_proj"), [a.q_proj, a.k_proj, a.v_proj])
    assert isinstance(qkv, PackedLinear)
    x = torch.randn(2, 576, generator=torch.Generator().manual_seed(0))
    want = torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight])
    torch.testing.assert_close(qkv(x), x @ want.T, atol=1e-4, rtol=1e-4)
    assert torch.equal(src._float("blk.3.attn_k.weight"), a.k_proj.weight)
    embed = src.embedding(float_model.model.embed_tokens)
    assert torch.equal(embed.weight, float_model.model.embed_tokens.weight)
    assert isinstance(src.lm_head(float_model.lm_head, embed), PackedLinear)
    assert sorted(kw["type"] for event, kw in lines if event == "gguf_type_dequantized") == ["Q4_1", "Q8_0"]


def test_gguf_file_reads_what_ggufs_reader_reads():
    from gguf import GGUFReader

    path = embedded_gguf_file()
    mine, theirs = GGUFFile(path), GGUFReader(path)
    assert mine.fields["general.architecture"] == "llama"
    assert list(mine.tensors) == [t.name for t in theirs.tensors]
    for t in theirs.tensors:
        got = mine.tensors[t.name]
        assert got.tensor_type == t.tensor_type and got.shape == tuple(reversed(t.shape.tolist()))
        assert np.array_equal(got.data.reshape(-1), np.asarray(t.data).view(np.uint8).reshape(-1)), t.name


def test_float_weights_are_converted_once_when_asked_for(tmp_path, monkeypatch):
    calls = []

    def fake(gguf, out):
        calls.append(out)
        (out / "model.safetensors").write_bytes(b"float32")

    monkeypatch.setattr(models, "_convert_gguf", lambda gguf, out: (out / "config.json").write_text("{}"))
    monkeypatch.setattr(models, "_dequantize_gguf", fake)
    target = embedded_model_dir(tmp_path)
    assert not (target / "model.safetensors").exists()
    ensure_float_weights(target)
    ensure_float_weights(target)
    assert len(calls) == 1 and (target / "model.safetensors").read_bytes() == b"float32"
    assert [p.name for p in (tmp_path / "models").iterdir() if p.is_dir()] == [target.name]  # no temp dir left
