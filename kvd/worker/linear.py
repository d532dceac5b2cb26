"""Prepacked linear layers for the CPU: every nn.Linear's weight reordered once for oneDNN.

torch's CPU `F.linear` hands each call's weight to the BLAS in its plain row-major form,
which the library re-blocks internally for every call; at a decode step's small batches
(a few to a few dozen rows against SmolLM2's 576-wide matrices) that overhead is most of
the work. oneDNN can take the weight in its own blocked layout once, at load
(`torch.ops.mkldnn._reorder_linear_weight`), and then run each call on it directly
(`torch.ops.mkldnn._linear_pointwise`) — what vLLM's CPU backend and inductor's CPU
freezing pass do too. bfloat16 runs on the CPU's AVX512-BF16 / AMX units there.

`prepack(model)` swaps each nn.Linear for a `PackedLinear` in place; where oneDNN is not
available, or a layer does not pack, it logs why and leaves the layers as they are.
"""

from __future__ import annotations

import structlog
import torch

log = structlog.get_logger(__name__)

BATCH_HINT = 32  # oneDNN picks the blocked format for about this many rows; any count runs
ONEDNN_KIND = -1  # a matrix's kind for native DecodeLayers: a oneDNN-packed weight (0-2: quant.Kind's blocks)


class PackedLinear(torch.nn.Module):
    """A linear layer whose weight is held in oneDNN's blocked layout (inference only)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), BATCH_HINT)
        self.bias = None if bias is None else bias.detach().contiguous()

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., in) -> (..., out)
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")

    def matrix(self) -> tuple:
        """(packed, -, -, ONEDNN_KIND, bias): what native DecodeLayers calls the same oneDNN op with."""
        empty = torch.empty(0)
        return self.packed, empty, empty, ONEDNN_KIND, self.bias


def available(dtype: torch.dtype) -> str | None:
    """Why prepacking cannot run for `dtype` here, or None."""
    if not torch.backends.mkldnn.is_available():
        return "torch was built without oneDNN"
    if not hasattr(torch.ops.mkldnn, "_reorder_linear_weight"):
        return "this torch has no oneDNN weight prepacking op"
    if dtype not in (torch.float32, torch.bfloat16):
        return f"{dtype} is not packed"
    if dtype == torch.bfloat16 and not bf16_kernels():
        return "oneDNN has no bf16 kernels for this CPU (they need AVX512BW/VL/DQ or AVX-NE-CONVERT)"
    return None


def bf16_kernels() -> bool:
    """Whether oneDNN runs bf16 linears on this CPU (torch's own check; without it they raise)."""
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def prepack(model: torch.nn.Module) -> int:
    """Replace every nn.Linear of a CPU model with a PackedLinear; returns how many."""
    first = next(model.parameters())
    reason = "the model is not on the CPU" if first.device.type != "cpu" else available(first.dtype)
    if reason is not None:
        log.info("linear_prepack_off", reason=reason)
        return 0
    names = [name for name, m in model.named_modules() if type(m) is torch.nn.Linear]
    packed = 0
    for name in names:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        try:
            linear = getattr(parent, attr)
            setattr(parent, attr, PackedLinear(linear.weight, linear.bias))
            packed += 1
        except RuntimeError as e:  # an unsupported shape or dtype: that layer stays as it was
            log.warning("linear_prepack_failed", layer=name, error=str(e).splitlines()[0])
    log.info("linear_prepacked", layers=packed, of=len(names), dtype=str(first.dtype).removeprefix("torch."))
    return packed
