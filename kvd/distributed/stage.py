"""StageModel: the part of a checkpoint one pipeline stage holds, and nothing else.

`load_stage` builds the full transformers model on the meta device (no memory), keeps the
stage's decoder layers (global indices from the LayerMap; each keeps its global
`layer_idx`), plus the token embedding on stage 0, the final norm on the last stage, and
the LM head on the head rank (global rank 0), then materialises only those modules and
reads only their tensors from the safetensors files. With tied embeddings the head shares
the embedding's tensor (rank 0 holds both), so the table is held once, not once per end of
the pipeline.

Parameter names map explicitly to checkpoint names: `layers.<local>.*` ->
`model.layers.<global>.*`, `embed.weight` -> `model.embed_tokens.weight`, `norm.weight` ->
`model.norm.weight`, `lm_head.weight` -> `lm_head.weight` (or the embedding when tied).

`quantization` is the instance runner's (`kvd.worker.quant_load`): with `int8` / `int4` /
`auto` the rank takes its projections, embedding and lm_head from the same weight source
the runner's decoder takes them from — the float checkpoint quantized at load with
`quantize` (int8: Q8_0 layers; int4: Q4_1 layers; the embedding and lm_head Q8_0), or the
GGUF file's own blocks (`auto` on a model from a GGUF file; the norms come from the float
checkpoint) — one module at a time, so a rank holds its stage's quantized weights and at
most one module's float ones while it loads. The projections run prompt rows as the
runner's prefill does (float activations through `QuantLinear`'s dequantize-tile GEMM), so
the stage's KV is the runner's own to float rounding; the lm_head, like the runner's for a
sampled row, runs on int8 activations.
"""

from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path

import torch
from torch import nn

from kvd.distributed.plan import LayerMap
from kvd.distributed.sp_attention import ATTN_IMPLEMENTATION
from kvd.worker.decoder import held_bytes, held_tensors
from kvd.worker.models import gguf_source, load_config
from kvd.worker.quant import QuantLinear
from kvd.worker.quant_load import GGUF_NAMES, MODES, FloatSource, weight_source

_EMBED, _NORM, _HEAD = "model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"


class StageModel(nn.Module):
    """One stage's decoder layers, with the embedding / final norm / LM head where it holds them."""

    def __init__(self, layers: list[nn.Module], layer_map: LayerMap, stage: int, rotary: nn.Module,
                 embed: nn.Module | None, norm: nn.Module | None, lm_head: nn.Module | None) -> None:  # fmt: skip
        super().__init__()
        self.layers = nn.ModuleList(layers)  # local index i is global layer layer_map.to_global(stage, i)
        self.layer_map = layer_map
        self.stage = stage
        self.rotary = rotary
        self.embed = embed
        self.norm = norm
        self.lm_head = lm_head

    def checkpoint_name(self, name: str) -> str:
        """Our parameter name -> the checkpoint's (the global <-> local layer map in one line)."""
        if name.startswith("layers."):
            _, local, rest = name.split(".", 2)
            return f"model.layers.{self.layer_map.to_global(self.stage, int(local))}.{rest}"
        return {"embed.weight": _EMBED, "norm.weight": _NORM, "lm_head.weight": _HEAD}[name]

    @property
    def first_layer(self) -> int:
        return self.layer_map.layers(self.stage).start

    @property
    def weight_bytes(self) -> int:
        """Bytes of weights held (parameters, and quantized blocks or packed weights kept as
        plain attributes), each storage once (tied weights share one)."""
        return held_bytes(t for module in self.modules() for t in held_tensors(module))


def _checkpoint_files(model_dir: Path) -> dict[str, Path]:
    """Tensor name -> the safetensors file holding it (single file or sharded with an index)."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {name: model_dir / file for name, file in weight_map.items()}
    from safetensors import safe_open

    files = {}
    for path in sorted(model_dir.glob("*.safetensors")):
        with safe_open(path, framework="pt") as f:
            files.update(dict.fromkeys(f.keys(), path))
    return files


def param_counts(model_dir: str | Path) -> tuple[int, int]:
    """(embedding elements, elements of the largest decoder layer), from the safetensors headers."""
    from safetensors import safe_open

    files = _checkpoint_files(Path(model_dir))
    numel: dict[str, int] = {}
    for path in sorted(set(files.values())):
        with safe_open(path, framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 - safe_open is not a dict
                numel[name] = math.prod(f.get_slice(name).get_shape())
    per_layer: dict[str, int] = {}
    for name, n in numel.items():
        if name.startswith("model.layers."):
            layer = name.split(".")[2]
            per_layer[layer] = per_layer.get(layer, 0) + n
    return numel.get(_EMBED, 0), max(per_layer.values(), default=0)


def load_stage(model_dir: str | Path, layer_map: LayerMap, stage: int, *, head: bool, dtype: torch.dtype,
               device: torch.device, quantization: str = "none") -> StageModel:  # fmt: skip
    """The stage's modules with their weights; `head`: this rank computes the first token's logits.
    `quantization`: the instance runner's effective `model.quantization` (its `Decoder.quantization`)."""
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    model_dir = Path(model_dir)
    config = load_config(model_dir)
    if layer_map.num_layers != config.num_hidden_layers:
        raise ValueError(f"layer map covers {layer_map.num_layers} layers, the model has {config.num_hidden_layers}")
    if quantization not in MODES:
        raise ValueError(f"model.quantization: expected {'|'.join(MODES)}, got {quantization!r}")
    if quantization != "none" and device.type != "cpu":
        raise ValueError(f"model.quantization = {quantization}: quantized weights run on the CPU only")
    source = weight_source(quantization, config, dtype, gguf_source(model_dir) if quantization == "auto" else None)
    with torch.device("meta"):
        full = AutoModelForCausalLM.from_config(config, attn_implementation=ATTN_IMPLEMENTATION, dtype=dtype)
    layers = list(layer_map.layers(stage))
    files = _checkpoint_files(model_dir)
    tied = _HEAD not in files
    first, last = stage == 0, stage == layer_map.num_stages - 1
    part = StageModel(
        [full.model.layers[g] for g in layers], layer_map, stage, type(full.model.rotary_emb)(config=config),
        full.model.embed_tokens if first else None,  # rank 0 (the head) is on stage 0: a tied head shares it
        full.model.norm if last else None,
        full.lm_head if head else None,
    )  # fmt: skip
    del full
    part.rotary.to(device)  # built outside the meta context: its inv_freq is real already
    wanted = {part.checkpoint_name(n) for n, _ in part.named_parameters(remove_duplicate=True)}
    if head and tied:
        wanted.discard(_HEAD)  # the embedding's tensor
    missing = sorted(wanted - set(files))
    if missing:
        raise ValueError(f"model {str(model_dir)!r}: checkpoint lacks {missing[:3]}{'...' if len(missing) > 3 else ''}")
    quantized = source.name != "none"
    # Module by module: each is materialised, read, and (quantized) converted before the next,
    # so a rank never holds more than one module's float weights beside its quantized ones.
    with contextlib.ExitStack() as files_open, torch.no_grad():
        handles: dict[Path, object] = {}

        def read(module_name: str, module: nn.Module) -> None:
            module.to_empty(device=device)
            for name, p in module.named_parameters():
                ckpt = part.checkpoint_name(f"{module_name}.{name}")
                if files[ckpt] not in handles:
                    handles[files[ckpt]] = files_open.enter_context(safe_open(files[ckpt], framework="pt"))
                p.copy_(handles[files[ckpt]].get_tensor(ckpt))

        if part.embed is not None:
            read("embed", part.embed)
            if quantized:
                part.embed = source.embedding(part.embed)
        for local, layer in enumerate(part.layers):
            read(f"layers.{local}", layer)
            if quantized:
                _quantize_projections(layer, layer_map.to_global(stage, local), source)
        if part.norm is not None:
            read("norm", part.norm)
        if head and tied and not quantized:
            part.lm_head.weight = part.embed.weight  # one tensor, as in the single-process model
        elif head:
            if not tied:
                read("lm_head", part.lm_head)
            if quantized:  # tied: the embedding's blocks, read once more (the runner's lm_head)
                part.lm_head = source.lm_head(part.lm_head, part.embed)
    part.eval().requires_grad_(False)
    return part


def _quantize_projections(layer: nn.Module, index: int, source: FloatSource) -> None:
    """The layer's projections (loaded float) as the instance runner's weight source builds them,
    one at a time (transformers' layer calls q, k and v apart; the blocks are per output row,
    so each is its rows of the runner's fused qkv / gate_up). Prompt rows: float activations
    (`int_dot` off) whatever their count, as the runner's prefill runs them, so the KV is the
    runner's own to float rounding."""
    for parent in (layer.self_attn, layer.mlp):
        for name, child in list(parent.named_children()):
            if name in GGUF_NAMES:
                lin = source.linear(index, (name,), [child])
                if isinstance(lin, QuantLinear):
                    lin.int_dot = False
                setattr(parent, name, lin)
