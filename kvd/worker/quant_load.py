"""Where the CPU decoder's weights come from under `model.quantization`.

`weight_source(mode, config, dtype, gguf)` returns what `Decoder` asks for each projection,
the embedding and the lm_head, and (`source.model(...)`) the transformers model it builds on:

- `none`: `FloatSource`, the float weights as today (prepacked oneDNN linears).
- `int8` / `int4`: `QuantizeSource`, the float checkpoint quantized at load with per-group
  scales over groups of 32 inputs: int8 is Q8_0 (symmetric), int4 is Q4_1 (scale and
  minimum per group); the embedding and lm_head are Q8_0 in both (one copy when tied).
- `auto`: for a model that comes from a GGUF file (the embedded SmolLM2), `GGUFSource`,
  which reads every weight from the file and loads no float checkpoint. Its Q8_0 / Q4_0 /
  Q4_1 tensors go from the mapped file (`kvd.worker.gguf_file`) straight into
  `QuantWeight`s, no float copy in between (q and k rows are reordered as transformers'
  GGUF loader reorders them: whole rows, so blocks are kept exactly); a projection of
  another type is dequantized from the file, with a `gguf_type_dequantized` log line
  naming the type. Its `model()` is transformers' model built on the meta device, with
  only the small float tensors (norms, any biases) read from the file. For any other
  model, `none`.

With the embedded SmolLM2 (a 98.4 MB file) `auto` holds 98.2 MB of weights (the worker's
resident set grows by 114 MB, 1.16x the file) and builds its model in 0.2 s, writing and
reading no float32; `none` holds 651 MB (float32, the tied lm_head packed apart) after a
one-time 16 s conversion to 538 MB of safetensors (docs/benchmarks.md, "Start-up from the
GGUF")."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import structlog
import torch

from kvd.worker import attention
from kvd.worker.gguf_file import GGUFFile
from kvd.worker.linear import PackedLinear
from kvd.worker.models import load_model
from kvd.worker.quant import Kind, QuantEmbedding, QuantLinear, QuantWeight, quantize

log = structlog.get_logger(__name__)

MODES = ("auto", "none", "int8", "int4")
# transformers' module names of a projection -> llama.cpp's tensor names in a GGUF file
GGUF_NAMES = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
              "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}  # fmt: skip
_GGUF_KINDS = {"Q8_0": Kind.Q8_0, "Q4_0": Kind.Q4_0, "Q4_1": Kind.Q4_1}
# the parameters a source gives the decoder (packed or in blocks); GGUFSource.model() leaves them on the meta device
_FROM_SOURCE = ("_proj.weight", "embed_tokens.weight", "lm_head.weight")


def _cat_bias(linears) -> torch.Tensor | None:
    biases = [lin.bias for lin in linears]
    some = next((b for b in biases if b is not None), None)
    if some is None:
        return None
    return torch.cat([b if b is not None else some.new_zeros(lin.out_features) for b, lin in zip(biases, linears)])


class FloatSource:
    """The float weights, concatenated and prepacked (what `model.quantization = none` runs)."""

    name = "none"

    def model(self, model_dir: Path, dtype: torch.dtype, device: torch.device) -> torch.nn.Module:
        """transformers' model with its float weights (converted from a GGUF file first if need be)."""
        return load_model(model_dir, dtype, device, attn_implementation=attention.ATTN_IMPLEMENTATION)

    def linear(self, layer: int, names: tuple[str, ...], linears: list) -> torch.nn.Module:
        return PackedLinear(torch.cat([lin.weight for lin in linears]), _cat_bias(linears))

    def embedding(self, embed: torch.nn.Module) -> torch.nn.Module:
        return embed

    def lm_head(self, lm_head: torch.nn.Module, embedding: torch.nn.Module) -> torch.nn.Module:
        return PackedLinear(lm_head.weight, lm_head.bias)


class QuantizeSource(FloatSource):
    """A float checkpoint quantized at load: layers in `kind`, embedding and lm_head Q8_0."""

    def __init__(self, kind: Kind, tied: bool) -> None:
        self.name = "int8" if kind is Kind.Q8_0 else "int4"
        self.kind, self.tied = kind, tied

    def linear(self, layer, names, linears):
        return QuantLinear(quantize(torch.cat([lin.weight for lin in linears]), self.kind), _cat_bias(linears))

    def embedding(self, embed):
        return QuantEmbedding(quantize(embed.weight, Kind.Q8_0), embed.weight.dtype)

    def lm_head(self, lm_head, embedding):
        if self.tied and isinstance(embedding, QuantEmbedding):
            return QuantLinear(embedding.weight, lm_head.bias)  # the embedding's bytes, read once more
        return QuantLinear(quantize(lm_head.weight, Kind.Q8_0), lm_head.bias)


def read_gguf_tensor(tensor) -> QuantWeight | None:
    """A GGUF Q8_0 / Q4_0 / Q4_1 tensor (a `GGUFTensor`) as a QuantWeight; None for other types."""
    kind = _GGUF_KINDS.get(tensor.tensor_type.name)
    if kind is None:
        return None
    raw = np.asarray(tensor.data)  # (N, K/32 * block bytes) uint8: d, [m,] quants per block
    n = raw.shape[0]
    head = 4 if kind is Kind.Q4_1 else 2  # float16 d, and m for Q4_1, before each block's quants
    blocks = raw.reshape(n, -1, head + kind.quant_bytes)  # (N, nb, bytes)
    d = torch.from_numpy(np.ascontiguousarray(blocks[..., 0:2]).view(np.float16)[..., 0])  # (N, nb)
    m = torch.from_numpy(np.ascontiguousarray(blocks[..., 2:4]).view(np.float16)[..., 0]) if head == 4 else None
    qs = torch.from_numpy(np.ascontiguousarray(blocks[..., head:]).reshape(n, -1))  # (N, nb * bytes)
    return QuantWeight(kind, qs, d, m)


def unpermute_rows(n_rows: int, heads: int) -> torch.Tensor:
    """Row order that undoes llama.cpp's q/k permutation (interleaved rotary pairs back to
    rotate-half): transformers' `_reverse_permute_weights` as an index."""
    half = n_rows // heads // 2
    return torch.arange(n_rows).reshape(heads, half, 2).transpose(1, 2).reshape(-1)


class GGUFSource(FloatSource):
    """Every weight the decoder holds, read from a GGUF file: in the file's own blocks where
    the kernels read them, else dequantized from the file."""

    name = "auto"

    def __init__(self, path: Path, config, dtype: torch.dtype = torch.float32) -> None:
        self.path, self.config, self.dtype = path, config, dtype
        file = GGUFFile(path)
        self.tensors = file.tensors
        self.arch = file.fields["general.architecture"]
        self.heads, self.kv_heads = config.num_attention_heads, config.num_key_value_heads
        self._logged: set[str] = set()

    def model(self, model_dir: Path, dtype: torch.dtype, device: torch.device) -> torch.nn.Module:
        """transformers' model with no weight of the decoder's own: built on the meta device,
        the rotary embedding's buffers computed, the other parameters (norms, any biases;
        float32 in the file, a few hundred KB) read from the file. The decoder then takes
        the projections, the embedding and the lm_head from this source."""
        import gguf
        from transformers import AutoModelForCausalLM, GenerationConfig

        assert device.type == "cpu" and dtype == self.dtype, (device, dtype, self.dtype)  # the decoder's case only
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(self.config, dtype=dtype)
        inner = model.get_decoder()
        inner.rotary_emb = type(inner.rotary_emb)(config=self.config)  # outside the meta context: real inv_freq
        arch = {name: arch for arch, name in gguf.MODEL_ARCH_NAMES.items()}[self.arch]
        names = gguf.get_tensor_name_map(arch, self.config.num_hidden_layers)
        state = {}
        for name, _ in model.named_parameters():
            if name.endswith(_FROM_SOURCE):
                continue
            file_name = names.get_name(name, try_suffixes=(".weight", ".bias"))
            if file_name not in self.tensors:
                raise ValueError(f"{self.path.name}: no tensor for parameter {name} ({file_name})")
            state[name] = self._float(file_name)
        model.load_state_dict(state, strict=False, assign=True)  # the meta parameters replaced
        if (Path(model_dir) / "generation_config.json").is_file():
            model.generation_config = GenerationConfig.from_pretrained(model_dir)
        return model.eval().requires_grad_(False)

    def _blocks(self, name: str) -> QuantWeight | None:
        """The tensor in its own blocks, or None (logged once per type) when the kernels do not read its type."""
        tensor = self.tensors[name]
        w = read_gguf_tensor(tensor)
        if w is None:
            if tensor.tensor_type.name not in self._logged:
                self._logged.add(tensor.tensor_type.name)
                log.info("gguf_type_dequantized", type=tensor.tensor_type.name, example=name,
                         reason="kvd's kernels read Q8_0, Q4_0 and Q4_1; this type runs dequantized from the file")  # fmt: skip
            return None
        return w.rows(self._row_order(name, w.shape[0])) if self._permuted(name) else w

    def _float(self, name: str) -> torch.Tensor:
        """The tensor as a float tensor in the model's dtype (dequantized if its type is quantized)."""
        from gguf import dequantize

        tensor = self.tensors[name]
        w = np.array(dequantize(tensor.data, tensor.tensor_type), dtype=np.float32).reshape(tensor.shape)
        w = torch.from_numpy(w).to(self.dtype)
        return w[self._row_order(name, w.shape[0])] if self._permuted(name) else w

    def _permuted(self, name: str) -> bool:
        return self.arch == "llama" and (".attn_q." in name or ".attn_k." in name)

    def _row_order(self, name: str, n_rows: int) -> torch.Tensor:
        return unpermute_rows(n_rows, self.heads if ".attn_q." in name else self.kv_heads)

    def linear(self, layer, names, linears):
        file_names = [f"blk.{layer}.{GGUF_NAMES[n]}.weight" for n in names]
        parts = [self._blocks(n) for n in file_names]
        if any(p is None for p in parts) or len({p.kind for p in parts}) > 1:  # mixed kinds are not stacked
            return PackedLinear(torch.cat([self._float(n) for n in file_names]), _cat_bias(linears))
        return QuantLinear(QuantWeight.cat(parts), _cat_bias(linears))

    def embedding(self, embed):
        w = self._blocks("token_embd.weight")
        if w is None:
            return torch.nn.Embedding.from_pretrained(self._float("token_embd.weight"))
        return QuantEmbedding(w, self.dtype)

    def lm_head(self, lm_head, embedding):
        if "output.weight" in self.tensors:
            w = self._blocks("output.weight")
            w = w if w is not None else self._float("output.weight")
        else:  # tied: the embedding's blocks (or float weights)
            w = embedding.weight
        return QuantLinear(w, lm_head.bias) if isinstance(w, QuantWeight) else PackedLinear(w, lm_head.bias)


def weight_source(mode: str, config, dtype: torch.dtype, gguf: Path | None) -> FloatSource:
    """The source for `model.quantization = mode`; `gguf` is the file the model came from, if any."""
    if mode == "int8":
        return QuantizeSource(Kind.Q8_0, bool(config.tie_word_embeddings))
    if mode == "int4":
        return QuantizeSource(Kind.Q4_1, bool(config.tie_word_embeddings))
    if mode == "auto" and gguf is not None:
        return GGUFSource(gguf, config, dtype)
    return FloatSource()
