"""Where the CPU decoder's weights come from under `model.quantization`.

`weight_source(mode, model, gguf)` returns what `Decoder` asks for each projection, the
embedding and the lm_head:

- `none`: `FloatSource`, the float weights as today (prepacked oneDNN linears).
- `int8` / `int4`: `QuantizeSource`, the float checkpoint quantized at load with per-group
  scales over groups of 32 inputs: int8 is Q8_0 (symmetric), int4 is Q4_1 (scale and
  minimum per group); the embedding and lm_head are Q8_0 in both (one copy when tied).
- `auto`: for a model converted from a GGUF file, `GGUFSource`, which reads the file's own
  Q8_0 / Q4_0 / Q4_1 tensors with gguf's GGUFReader straight into `QuantWeight`s, no float
  copy in between (q and k rows are reordered as transformers' GGUF loader reorders them:
  whole rows, so blocks are kept exactly); a tensor of another type keeps the float weights,
  with a `gguf_type_dequantized` log line naming the type. For any other model, `none`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import structlog
import torch

from kvd.worker.linear import PackedLinear
from kvd.worker.quant import Kind, QuantEmbedding, QuantLinear, QuantWeight, quantize

log = structlog.get_logger(__name__)

MODES = ("auto", "none", "int8", "int4")
# transformers' module names of a projection -> llama.cpp's tensor names in a GGUF file
GGUF_NAMES = {"q_proj": "attn_q", "k_proj": "attn_k", "v_proj": "attn_v", "o_proj": "attn_output",
              "gate_proj": "ffn_gate", "up_proj": "ffn_up", "down_proj": "ffn_down"}  # fmt: skip
_GGUF_KINDS = {"Q8_0": Kind.Q8_0, "Q4_0": Kind.Q4_0, "Q4_1": Kind.Q4_1}


def _cat_bias(linears) -> torch.Tensor | None:
    if all(lin.bias is None for lin in linears):
        return None
    return torch.cat([lin.bias if lin.bias is not None else lin.weight.new_zeros(lin.out_features) for lin in linears])


class FloatSource:
    """The float weights, concatenated and prepacked (what `model.quantization = none` runs)."""

    name = "none"

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
    """A GGUF Q8_0 / Q4_0 / Q4_1 tensor (a gguf ReaderTensor) as a QuantWeight; None for other types."""
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
    """The projections, embedding and lm_head read from a GGUF file in their own blocks."""

    name = "auto"

    def __init__(self, path: Path, config) -> None:
        from gguf import GGUFReader

        self.path = path
        self.reader = GGUFReader(path)
        self.tensors = {t.name: t for t in self.reader.tensors}
        self.arch = str(bytes(self.reader.fields["general.architecture"].parts[-1]), "utf-8")
        self.heads, self.kv_heads = config.num_attention_heads, config.num_key_value_heads
        self._logged: set[str] = set()

    def _weight(self, name: str) -> QuantWeight | None:
        tensor = self.tensors[name]
        w = read_gguf_tensor(tensor)
        if w is None:
            if tensor.tensor_type.name not in self._logged:
                self._logged.add(tensor.tensor_type.name)
                log.info("gguf_type_dequantized", type=tensor.tensor_type.name, example=name,
                         reason="kvd's kernels read Q8_0, Q4_0 and Q4_1; this type runs from the float weights")  # fmt: skip
            return None
        if self.arch == "llama" and (".attn_q." in name or ".attn_k." in name):
            heads = self.heads if ".attn_q." in name else self.kv_heads
            w = w.rows(unpermute_rows(w.shape[0], heads))
        return w

    def linear(self, layer, names, linears):
        parts = [self._weight(f"blk.{layer}.{GGUF_NAMES[n]}.weight") for n in names]
        if any(p is None for p in parts) or len({p.kind for p in parts}) > 1:
            return super().linear(layer, names, linears)  # mixed kinds are not stacked: float
        return QuantLinear(QuantWeight.cat(parts), _cat_bias(linears))

    def embedding(self, embed):
        w = self._weight("token_embd.weight")
        return embed if w is None else QuantEmbedding(w, embed.weight.dtype)

    def lm_head(self, lm_head, embedding):
        if "output.weight" in self.tensors:
            w = self._weight("output.weight")
        else:  # tied: the embedding's blocks
            w = embedding.weight if isinstance(embedding, QuantEmbedding) else None
        return super().lm_head(lm_head, embedding) if w is None else QuantLinear(w, lm_head.bias)


def weight_source(mode: str, model, gguf: Path | None) -> FloatSource:
    """The source for `model.quantization = mode`; `gguf` is the file the model came from, if any."""
    if mode == "int8":
        return QuantizeSource(Kind.Q8_0, bool(model.config.tie_word_embeddings))
    if mode == "int4":
        return QuantizeSource(Kind.Q4_1, bool(model.config.tie_word_embeddings))
    if mode == "auto" and gguf is not None:
        return GGUFSource(gguf, model.config)
    return FloatSource()
