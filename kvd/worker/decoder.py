"""Decoder: kvd's own forward pass over a transformers Llama or Qwen3 model's weights (CPU).

transformers' modules spend most of a small decode step in Python and in small tensor
ops: per layer, two RMSNorms of eight ops each, a rotary embedding of fourteen, three
projections where one would do, the activation and its product, the residual adds, and
the module machinery around them. On SmolLM2-135M at batch 1 that was three quarters
of the step. `Decoder` runs the same computation from the same weights with:
- one prepacked oneDNN projection for q, k and v, and one for gate and up
  (`kvd.worker.linear`: weights concatenated, then reordered once), or, under
  `model.quantization`, quantized linears over the same concatenation
  (`kvd.worker.quant`, the weights from `kvd.worker.quant_load`);
- the native fused ops of native/fused.cpp: RMSNorm with the residual add, the
  rotary embedding in place with each token's K and V written into its cache slot in the
  same pass, silu-and-mul; each rounds where transformers rounds, so
  float32 outputs are transformers' up to float32's own rounding;
- kvd's paged attention (`attention.attend`), as the transformers path uses it;
- a step whose tokens are all decode queries (up to `INT_DOT_MAX_ROWS`) runs every layer
  in one native call (`DecodeLayers`,
  native/decode_layers.cpp): the same ops in the same order, without the interpreter
  between them (at batch 1 that was most of the forward's time).

`Decoder.why_not(config, device, dtype)` says, before any weight is loaded, where this
path does not apply — not on the CPU, no native ops, another model family or a
configuration it does not cover (sliding windows, biases it does not know, rope that is
not plain rotate-half) — and the runner keeps transformers' forward, with the reason
logged. Where it applies, `Decoder.build(model, source)` takes every projection, the
embedding and the lm_head from the weight source, so a model whose source reads them from
a GGUF file is never loaded as float (`kvd.worker.quant_load`); `weight_bytes` is what it holds.
"""

from __future__ import annotations

from collections.abc import Iterable

import structlog
import torch

from kvd import ops
from kvd.worker import attention, quant
from kvd.worker.linear import PackedLinear, available
from kvd.worker.quant import QuantLinear, QuantWeight
from kvd.worker.quant_load import FloatSource

log = structlog.get_logger(__name__)

FAMILIES = ("llama", "qwen3")


class _Layer:
    """One decoder layer's weights, fused and packed (or quantized: `kvd.worker.quant_load`)."""

    def __init__(self, i: int, layer, head_norms: bool, src: FloatSource) -> None:
        a, m = layer.self_attn, layer.mlp
        self.qkv = src.linear(i, ("q_proj", "k_proj", "v_proj"), [a.q_proj, a.k_proj, a.v_proj])
        self.o = src.linear(i, ("o_proj",), [a.o_proj])
        self.gate_up = src.linear(i, ("gate_proj", "up_proj"), [m.gate_proj, m.up_proj])
        self.down = src.linear(i, ("down_proj",), [m.down_proj])
        self.input_norm = layer.input_layernorm.weight.detach()
        self.post_norm = layer.post_attention_layernorm.weight.detach()
        self.q_norm = a.q_norm.weight.detach() if head_norms else None
        self.k_norm = a.k_norm.weight.detach() if head_norms else None
        self.intermediate = m.gate_proj.out_features


class Decoder:
    """The layers of one CPU model, run as one packed sequence of the step's tokens."""

    def __init__(self, model, native, src: FloatSource | None = None) -> None:
        src = src or FloatSource()
        cfg = model.config
        inner = model.get_decoder()
        self.native = native
        self.embed = src.embedding(inner.embed_tokens)
        self.rotary = inner.rotary_emb
        self.final_norm = inner.norm.weight.detach()
        self.eps = float(cfg.rms_norm_eps)
        self.heads, self.kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.scale = self.head_dim**-0.5
        head_norms = cfg.model_type == "qwen3"
        self.layers = [_Layer(i, layer, head_norms, src) for i, layer in enumerate(inner.layers[: cfg.num_hidden_layers])]
        quantized = [lin.weight for lin in self.projections() if isinstance(lin, QuantLinear)]
        if quantized:  # in huge pages, and read as one stream
            quant.one_allocation(quantized)
        self.lm_head = src.lm_head(model.lm_head, self.embed)
        self.quantization = src.name
        self.fused = self._fused()

    def _fused(self):
        """The native DecodeLayers over these layers, where every projection is a QuantLinear
        on int8 activations or a PackedLinear; else None (the Python loop)."""
        lins = self.projections()
        if not all(isinstance(lin, PackedLinear) or (isinstance(lin, QuantLinear) and lin.int_dot) for lin in lins):
            return None
        fused = self.native.DecodeLayers(self.eps, self.heads, self.kv_heads, self.head_dim, self.scale, quant.BEST_ISA)
        for layer in self.layers:
            fused.add_layer(layer.input_norm, layer.post_norm, layer.q_norm, layer.k_norm, layer.qkv.matrix(),
                            layer.o.matrix(), layer.gate_up.matrix(), layer.down.matrix())  # fmt: skip
        return fused

    def projections(self) -> list[torch.nn.Module]:
        """The layers' projections in the order a step runs them."""
        return [lin for layer in self.layers for lin in (layer.qkv, layer.o, layer.gate_up, layer.down)]

    def linears(self) -> list[torch.nn.Module]:
        """Every projection of a step, lm_head last (what `kvd bench offline` times as the bound)."""
        return self.projections() + [self.lm_head]

    @property
    def weight_bytes(self) -> int:
        """Bytes of the weights held (packed, in blocks or float), each storage once: a tied
        lm_head in blocks shares the embedding's."""
        held = [self.final_norm, *held_tensors(self.embed), *held_tensors(self.lm_head)]
        held += [t for layer in self.layers for t in (layer.input_norm, layer.post_norm, layer.q_norm, layer.k_norm)]
        held += [t for lin in self.projections() for t in held_tensors(lin)]
        return held_bytes(held)

    @classmethod
    def build(cls, model, source: FloatSource | None = None) -> Decoder:
        """The decoder over `model`, its projections, embedding and lm_head from `source`
        (where `why_not` found nothing against it)."""
        decoder = cls(model, ops.native(), source)
        log.info("kvd_decoder_on", layers=len(decoder.layers), family=model.config.model_type,
                 quantization=decoder.quantization)  # fmt: skip
        return decoder

    @staticmethod
    def why_not(cfg, device: torch.device, dtype: torch.dtype) -> str | None:
        """Why the decoder does not run a model of config `cfg` in `dtype` on `device`, or None."""
        if device.type != "cpu":
            return f"the model is on {device.type}: transformers' forward serves it"
        if cfg.model_type not in FAMILIES:
            return f"model_type {cfg.model_type!r} is not one of {', '.join(FAMILIES)}"
        if ops.native() is None:
            return "the native ops are not built"
        reason = available(dtype)
        if reason is not None:
            return reason
        if getattr(cfg, "hidden_act", "silu") != "silu":
            return f"hidden_act {cfg.hidden_act!r} is not silu"
        if getattr(cfg, "mlp_bias", False):
            return "mlp_bias is not covered"
        if getattr(cfg, "sliding_window", None) and getattr(cfg, "use_sliding_window", False):
            return "sliding-window attention is not covered"
        return None

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """(N,) token ids at (N,) positions -> (N, E) final hidden states; the attention
        metadata comes from `attention.forward_context`, as for transformers' forward."""
        nat = self.native
        h = self.embed(input_ids)  # (N, E)
        cos, sin = self.rotary(h, positions.unsqueeze(0))  # (1, N, D) each, in h's dtype
        cos, sin = cos[0].contiguous(), sin[0].contiguous()
        n = h.shape[0]
        step = attention.decode_only() if self.fused is not None and n <= quant.INT_DOT_MAX_ROWS else None
        if step is not None:
            caches, meta = step
            return self.fused.forward(h, cos, sin, caches, meta.slot_mapping, meta.decode_block_table,
                                      meta.decode_lens, self.final_norm)  # fmt: skip
        H, KVH, D = self.heads, self.kv_heads, self.head_dim
        residual = h
        x = torch.empty_like(h)
        nat.rms_norm(x, h, self.layers[0].input_norm, self.eps)
        for i, layer in enumerate(self.layers):
            qkv = layer.qkv(x)  # (N, (H + 2 KVH) D)
            q = qkv[:, : H * D].reshape(n, H, D)
            k = qkv[:, H * D : (H + KVH) * D].reshape(n, KVH, D)
            v = qkv[:, (H + KVH) * D :].reshape(n, KVH, D)
            if layer.q_norm is not None:  # Qwen3 normalises each head before the rotation
                q, k = q.contiguous(), k.contiguous()
                nat.rms_norm(q.view(-1, D), q.view(-1, D), layer.q_norm, self.eps)
                nat.rms_norm(k.view(-1, D), k.view(-1, D), layer.k_norm, self.eps)
            cache, slots = attention.cache_slots(i)
            nat.rope_neox_cache(q, k, v, cos, sin, cache, slots)  # rotated, and k, v into their cache slots
            o = attention.attend(i, q, k, v, self.scale, written=True)  # (N, H, D)
            x = layer.o(o.view(n, H * D))  # (N, E)
            nat.add_rms_norm(x, residual, layer.post_norm, self.eps)  # residual += attention; x = norm
            gu = layer.gate_up(x)  # (N, 2I)
            act = gu.new_empty(n, layer.intermediate)
            nat.silu_and_mul(act, gu)
            x = layer.down(act)  # (N, E)
            nxt = self.layers[i + 1].input_norm if i + 1 < len(self.layers) else self.final_norm
            nat.add_rms_norm(x, residual, nxt, self.eps)  # residual += mlp; x = the next norm
        return x


def held_tensors(module: torch.nn.Module) -> list[torch.Tensor]:
    """The tensors a decoder module holds: its parameters, and the packed or quantized weight,
    bias and index tensors kept as plain attributes."""
    held = list(module.parameters())
    for value in vars(module).values():
        if isinstance(value, torch.Tensor):
            held.append(value)
        elif isinstance(value, QuantWeight):
            held += [t for t in (value.qs, value.d, value.m) if t is not None]
    return held


def held_bytes(tensors: Iterable[torch.Tensor | None]) -> int:
    """Bytes the tensors hold, each storage once (tied or viewed weights share one); oneDNN's
    packed weights have no storage to share and count by size."""
    sizes = {}
    for t in (t for t in tensors if t is not None):
        if t.is_mkldnn:
            sizes[id(t)] = t.numel() * t.element_size()
        else:
            sizes[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(sizes.values())
