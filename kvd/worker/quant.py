"""Weight-only quantized linears and embeddings for the CPU (GGUF's Q8_0, Q4_0, Q4_1 blocks).

A `QuantWeight` holds one matrix (N out, K in) as blocks of 32 weights along K, the way GGUF
stores them, and never as float32:

    Q8_0  w = d * q        q int8,  d float16            34 bytes per 32 weights
    Q4_0  w = d * (q - 8)  q 0..15, d float16            18 bytes
    Q4_1  w = d * q + m    q 0..15, d and m float16      20 bytes

`qs` keeps each block's quant bytes in GGUF's order (for Q4, byte j has weight j in its low
nibble and weight j + 16 in its high one) in an (N, K/32 * bytes) uint8 tensor; `d` and `m`
are (N, K/32) float16 beside it: a column's quants in one run, as the loaders build them.

`tile()` repacks a matrix, in place and byte for byte, into the layout the native kernels
read (native/kvd_quant.h): columns interleaved `TILE` at a time, so that one vector load
holds a block's four quant bytes of 16 columns and one vpdpbusd serves them all, each
weight vector reused for every row of a decode batch; d and m tiled alike. The tensors keep
their shapes and sizes (only the order of bytes changes), and the values `d * q + m` are
unchanged. `QuantLinear` and `QuantEmbedding` tile the weight they are given (the object
itself: a tied embedding and lm_head share one copy).

- `QuantLinear(weight)`: out = x . W^T. Decode rows (up to `INT_DOT_MAX_ROWS`) run the
  native kernel on int8 activations, which streams the quantized bytes once per call; prompt
  rows (a step's prefill chunks, `attention.decode_rows`) keep float activations, so a
  prompt's KV is the float model's whether it was chunked, hit the prefix cache or came from
  a prefill instance: `TILE_COLUMNS` columns dequantized at a time into a float32 GEMM
  (oneDNN), as are more than `INT_DOT_MAX_ROWS` decode rows.
- `QuantEmbedding(weight)`: an embedding lookup that dequantizes only the rows it gathers
  (SmolLM2's tied Q8_0 embedding is also its lm_head's QuantLinear, one copy of the bytes).
- `quantize(w, kind)`: a float matrix into blocks at load (`model.quantization = int8 | int4`:
  Q8_0 and Q4_1, i.e. per-group scales over groups of 32 inputs).
- `dequantize_ref` / `quant_linear_ref`: the pure-torch references the tests compare with
  and that run where the native ops are not built.
"""

from __future__ import annotations

import contextlib
import ctypes
import enum
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from kvd import ops
from kvd.worker import attention

BLOCK = 32
TILE = 16  # columns interleaved in the kernels' layout (kvd_quant.h's kTile)
INT_DOT_MAX_ROWS = 32  # more rows: dequantized tiles into a float GEMM (measured: docs/benchmarks.md)
BEST_ISA = -1  # quant_linear's path: the best this build has (tests pass each of quant_isas())
TILE_COLUMNS = 4096  # columns dequantized at a time on the GEMM path (every layer's matrix whole; lm_head in 12)


class Kind(enum.IntEnum):
    """Block formats, numbered as native/quant_linear.cpp numbers them."""

    Q8_0 = 0
    Q4_0 = 1
    Q4_1 = 2

    @property
    def quant_bytes(self) -> int:  # quant bytes per block of 32 weights
        return BLOCK if self is Kind.Q8_0 else BLOCK // 2


@dataclass
class QuantWeight:
    """One quantized (N, K) matrix: quants (N, K/32 * bytes) uint8, scales d (and m) (N, K/32)
    float16; in GGUF's column-by-column order, or in the kernels' order once `tiled`."""

    kind: Kind
    qs: torch.Tensor
    d: torch.Tensor
    m: torch.Tensor | None
    tiled: bool = False

    @property
    def shape(self) -> tuple[int, int]:
        return self.qs.shape[0], self.d.shape[1] * BLOCK

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.qs, self.d, self.m) if t is not None)

    def rows(self, index: torch.Tensor) -> QuantWeight:
        """The columns (output rows) `index` of this matrix, in that order (a copy, in GGUF's order)."""
        if self.tiled:
            q_at, s_at = _tiled_offsets(self.shape, self.kind, index)
            m = None if self.m is None else self.m.view(-1)[s_at]
            return QuantWeight(self.kind, self.qs.view(-1)[q_at], self.d.view(-1)[s_at], m)
        return QuantWeight(self.kind, self.qs[index], self.d[index], None if self.m is None else self.m[index])

    @staticmethod
    def cat(parts: list[QuantWeight]) -> QuantWeight:
        """Matrices of one kind and K stacked along N (q, k and v as one projection), before tiling."""
        kinds = {p.kind for p in parts}
        if len(kinds) != 1:
            raise ValueError(f"cannot stack blocks of different kinds: {sorted(k.name for k in kinds)}")
        if any(p.tiled for p in parts):
            raise ValueError("cannot stack tiled matrices: stack them before QuantLinear tiles them")
        m = None if parts[0].m is None else torch.cat([p.m for p in parts])
        return QuantWeight(parts[0].kind, torch.cat([p.qs for p in parts]), torch.cat([p.d for p in parts]), m)

    def tile(self) -> QuantWeight:
        """Repack into the kernels' tiled layout in place (this object; nothing if already tiled)."""
        if not self.tiled:
            self.qs, self.d, self.m = (None if t is None else _retile(t, self.shape, True)
                                       for t in (self.qs, self.d, self.m))  # fmt: skip
            self.tiled = True
        return self

    def untiled(self) -> QuantWeight:
        """This matrix in GGUF's column order (itself when not tiled, else a copy)."""
        if not self.tiled:
            return self
        qs, d, m = (None if t is None else _retile(t, self.shape, False) for t in (self.qs, self.d, self.m))
        return QuantWeight(self.kind, qs, d, m)


ALLOCATION_ALIGN = 64  # bytes: each tensor in a shared allocation starts on a cache line


def one_allocation(weights: list[QuantWeight]) -> torch.Tensor:
    """Move the weights' tensors into one allocation, in this order (the order a decode step
    reads them), the QuantWeight objects repointed at views of it; returns the allocation. A
    layer matrix of the embedded model is ~1 MB, below the 2 MiB from which torch asks for
    huge pages (kvd.cpu): together they are one tensor of tens of MB that gets them, and a
    step reads its layers as one stream (measured: docs/benchmarks.md, "Weights in huge pages")."""
    tensors = [t for w in weights for t in (w.qs, w.d, w.m) if t is not None]
    sizes = [-(-t.nbytes // ALLOCATION_ALIGN) * ALLOCATION_ALIGN for t in tensors]
    arena = torch.empty(sum(sizes), dtype=torch.uint8)
    moved, offset = {}, 0
    for t, size in zip(tensors, sizes):
        moved[id(t)] = arena[offset : offset + t.nbytes].view(t.dtype).view(t.shape).copy_(t)
        offset += size
    for w in weights:
        w.qs, w.d, w.m = (None if t is None else moved[id(t)] for t in (w.qs, w.d, w.m))
    del tensors, moved
    _release_freed_memory()  # the old ~1 MB tensors were on the heap: give those pages back
    return arena


def _release_freed_memory() -> None:
    """glibc's malloc_trim(0): freed heap memory back to the system (no-op off glibc)."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass


# ---- the tiled layout ------------------------------------------------------------------------------
# Column n lies in tile n // TILE, whose width is TILE but for the last tile (N % TILE). In a
# tile, block b's quant bytes are G groups of 4 (G = bytes / 4) stored [b][group][column][4],
# its scales [b][column]: a column's block is G words `width` words apart.
def _retile(t: torch.Tensor, shape: tuple[int, int], to_tiles: bool) -> torch.Tensor:
    """One of qs, d, m reordered between GGUF's layout and the tiled one (a copy, same shape)."""
    n, k = shape
    nb, full = k // BLOCK, n - n % TILE
    per = t.shape[1] // nb  # elements a block: quant bytes, or 1 for a scale
    word = 4 if per > 1 else 1  # quants move in 4-byte groups, scales one by one
    rows = t.view(n, nb, per // word, word)  # (N, nb, G, word)
    out = torch.empty_like(t)
    flat, cut = out.view(-1), full * nb * per
    head = flat[:cut].view(full // TILE, nb, per // word, TILE, word)  # (tiles, nb, G, TILE, word)
    tail = flat[cut:].view(nb, per // word, n - full, word)  # (nb, G, width, word)
    if to_tiles:
        head.copy_(rows[:full].view(full // TILE, TILE, nb, per // word, word).permute(0, 2, 3, 1, 4))
        tail.copy_(rows[full:].permute(1, 2, 0, 3))
        return out
    src = t.view(-1)
    rows_out = out.view(n, nb, per // word, word)
    rows_out[:full].view(full // TILE, TILE, nb, per // word, word).copy_(
        src[:cut].view(full // TILE, nb, per // word, TILE, word).permute(0, 3, 1, 2, 4))
    rows_out[full:].copy_(src[cut:].view(nb, per // word, n - full, word).permute(2, 0, 1, 3))
    return out


def _tiled_offsets(shape: tuple[int, int], kind: Kind, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Where columns `index` of a tiled matrix lie: flat offsets into qs, (L, K/32 * bytes) in
    GGUF's order, and into d / m, (L, K/32)."""
    n, k = shape
    nb, qb = k // BLOCK, kind.quant_bytes
    idx = index.reshape(-1).long()
    t, c = idx // TILE, idx % TILE
    width = (n - t * TILE).clamp(max=TILE)[:, None]  # (L, 1)
    blocks = torch.arange(nb)[None]  # (1, nb)
    scales = t[:, None] * TILE * nb + blocks * width + c[:, None]  # (L, nb)
    byte = torch.arange(qb)[None, None]  # (1, 1, qb)
    quants = (t[:, None, None] * TILE * nb * qb + blocks[..., None] * width[..., None] * qb
              + (byte // 4) * width[..., None] * 4 + c[:, None, None] * 4 + byte % 4)  # fmt: skip
    return quants.reshape(len(idx), nb * qb), scales


# ---- references and float -> blocks -------------------------------------------------------------
def _unpack(w: QuantWeight) -> torch.Tensor:
    """The integer quants, (N, K/32, 32) int32."""
    w = w.untiled()
    n, k = w.shape
    qs = w.qs.view(n, k // BLOCK, w.kind.quant_bytes)
    if w.kind is Kind.Q8_0:
        return qs.view(torch.int8).int()
    return torch.cat([qs & 0x0F, qs >> 4], dim=-1).int()  # GGUF: low nibbles are weights 0..15


def dequantize_ref(w: QuantWeight) -> torch.Tensor:
    """The float32 matrix (N, K)."""
    w = w.untiled()
    n, k = w.shape
    q = _unpack(w).float()  # (N, nb, 32)
    d = w.d.float().unsqueeze(-1)  # (N, nb, 1)
    if w.kind is Kind.Q4_0:
        q = q - 8
    out = d * q
    if w.kind is Kind.Q4_1:
        out = out + w.m.float().unsqueeze(-1)
    return out.reshape(n, k)


def quantize_acts_ref(x: torch.Tensor) -> torch.Tensor:
    """x (M, K) rounded as the integer kernel rounds activations: per block of 32, to int8
    steps of max|x| / 127. Returned as float (M, K)."""
    m, k = x.shape
    xb = x.float().reshape(m, k // BLOCK, BLOCK)
    amax = xb.abs().amax(-1, keepdim=True)  # (M, nb, 1)
    # x times 127 / max, as the kernel computes it (x / step rounds differently at a few ties)
    # (a tensor divided: `127 / t` is 127 * (1 / t) in torch, rounded twice)
    inv = torch.where(amax > 0, torch.full_like(amax, 127) / torch.where(amax > 0, amax, 1), 0)
    q = (xb * inv).round()  # half to even, as std::nearbyint and cvtps2dq
    return (q * (amax / 127)).reshape(m, k)


def quant_linear_ref(x: torch.Tensor, w: QuantWeight, int_dot: bool = False) -> torch.Tensor:
    """(M, K) -> (M, N) float32: dequantize, then a float matmul (activations rounded first
    with int_dot, as the integer kernel rounds them)."""
    x = quantize_acts_ref(x) if int_dot else x.float()
    return x @ dequantize_ref(w).T


def quantize(w: torch.Tensor, kind: Kind) -> QuantWeight:
    """A float (N, K) matrix as blocks of 32 along K: Q8_0 symmetric (d = max|w| / 127), Q4_1
    asymmetric (d = (max - min) / 15, m = min), Q4_0 symmetric (d = -max|w| signed / 8)."""
    n, k = w.shape
    if k % BLOCK:
        raise ValueError(f"in_features {k} is not a multiple of {BLOCK}")
    wb = w.detach().float().reshape(n, k // BLOCK, BLOCK)
    m = None
    if kind is Kind.Q8_0:
        d = wb.abs().amax(-1) / 127
        q = (wb / _nonzero(d).unsqueeze(-1)).round().clamp(-127, 127).to(torch.int8)
        qs = q.view(torch.uint8).reshape(n, -1)
    else:
        if kind is Kind.Q4_1:
            lo, hi = wb.amin(-1), wb.amax(-1)
            d, m = (hi - lo) / 15, lo
            q = ((wb - lo.unsqueeze(-1)) / _nonzero(d).unsqueeze(-1)).round().clamp(0, 15)
        else:  # the value of largest magnitude maps to -8, as GGUF's Q4_0 does
            ext = wb.gather(-1, wb.abs().argmax(-1, keepdim=True)).squeeze(-1)
            d = ext / -8
            q = (wb / _nonzero(d).unsqueeze(-1) + 8).round().clamp(0, 15)
        q = q.to(torch.uint8)
        qs = (q[..., :16] | (q[..., 16:] << 4)).reshape(n, -1)
        m = None if m is None else m.half().contiguous()
    # the kernel multiplies by the float16 scale: quantize against what it will read
    return QuantWeight(kind, qs.contiguous(), d.half().contiguous(), m)


def _nonzero(d: torch.Tensor) -> torch.Tensor:
    return torch.where(d == 0, torch.ones_like(d), d.half().float())


_int8_prompt_rows = False


@contextlib.contextmanager
def int8_prompt_rows() -> Iterator[None]:
    """Within: prompt rows too round their activations to int8 (up to INT_DOT_MAX_ROWS in a
    step), as decode rows do, so that a text is scored the way generated tokens see it
    (kvd.bench.perplexity's "decode kernel" path); serving never enters it."""
    global _int8_prompt_rows
    prev, _int8_prompt_rows = _int8_prompt_rows, True
    try:
        yield
    finally:
        _int8_prompt_rows = prev


# ---- modules ---------------------------------------------------------------------------------------
class QuantLinear(torch.nn.Module):
    """A linear layer over a QuantWeight (inference only); bias kept in the activations' dtype."""

    def __init__(self, weight: QuantWeight, bias: torch.Tensor | None = None, int_dot: bool = True) -> None:
        super().__init__()
        self.weight = weight.tile()
        self.out_features, self.in_features = weight.shape
        self.bias = None if bias is None else bias.detach().contiguous()
        self.int_dot = int_dot
        self._all_rows = torch.arange(self.out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (..., K) -> (..., N)
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)  # (M, K)
        nat = ops.native()
        # decode rows (first in a step's packed tokens) on int8 activations; prompt rows on float
        # ones, so that a prompt's KV is the float model's whatever the chunking or prefix hit
        d = 0 if not self.int_dot else x2.shape[0] if _int8_prompt_rows else attention.decode_rows(x2.shape[0])
        if d == 0 or d > INT_DOT_MAX_ROWS:
            out = self._float(x2, nat)
        elif d == x2.shape[0]:
            out = self._rows(x2, True, nat)
        else:
            out = torch.cat([self._rows(x2[:d], True, nat), self._float(x2[d:], nat)])
        if self.bias is not None:
            out += self.bias
        return out.view(*lead, self.out_features)

    def matrix(self) -> tuple:
        """(qs, d, m, kind, bias): what native DecodeLayers calls quant_linear with."""
        w = self.weight
        return w.qs, w.d, _m(w), int(w.kind), self.bias

    def _float(self, x: torch.Tensor, nat) -> torch.Tensor:
        """Rows on float activations, on one path whatever their count: oneDNN gives a row the
        same result in any batch (the native float kernel differs from it by float rounding,
        which the next decode steps' int8 rounding can amplify into a flipped near-tie)."""
        return self._rows(x, False, nat) if nat is None else self._prefill(x, nat)

    def _rows(self, x: torch.Tensor, int_dot: bool, nat) -> torch.Tensor:
        """The native kernel: streams the quantized bytes once for all of x's rows (the
        reference where the native ops are not built)."""
        w = self.weight
        if nat is None:
            return quant_linear_ref(x, w, int_dot).to(x.dtype)
        x = x if x.stride(-1) == 1 else x.contiguous()
        out = x.new_empty(x.shape[0], self.out_features)  # (M, N)
        nat.quant_linear(out, x, w.qs, w.d, _m(w), int(w.kind), int_dot, BEST_ISA)
        return out

    def _prefill(self, x: torch.Tensor, nat) -> torch.Tensor:
        """Prefill: TILE_COLUMNS columns dequantized at a time, each into one GEMM, in bf16
        where the activations are (the runner takes them only on bf16 hardware or where the
        config says so; oneDNN's bf16 GEMM there 1.4-2.2x its float32), float32 elsewhere."""
        dtype = torch.bfloat16 if x.dtype == torch.bfloat16 else torch.float32
        xa = x.to(dtype)
        parts = []
        for n0 in range(0, self.out_features, TILE_COLUMNS):
            rows = self._all_rows[n0 : n0 + TILE_COLUMNS]
            tile = torch.empty(rows.numel(), self.in_features)  # (T, K) float32
            nat.quant_dequantize(tile, self.weight.qs, self.weight.d, _m(self.weight), int(self.weight.kind), rows)
            # oneDNN on the plain tile: MKL's sgemm (`xf @ tile.T`) took twice as long here
            parts.append(torch.ops.mkldnn._linear_pointwise(xa, tile.to(dtype), None, "none", [], ""))  # (M, T)
        out = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
        return out.to(x.dtype)


class QuantEmbedding(torch.nn.Module):
    """An embedding whose table is a QuantWeight: a lookup dequantizes only the rows it gathers."""

    def __init__(self, weight: QuantWeight, dtype: torch.dtype) -> None:
        super().__init__()
        self.weight = weight.tile()
        self.dtype = dtype

    def forward(self, ids: torch.Tensor) -> torch.Tensor:  # (N,) -> (N, E)
        ids = ids.reshape(-1).long().contiguous()
        nat = ops.native()
        if nat is None:
            return dequantize_ref(self.weight.rows(ids)).to(self.dtype)
        out = torch.empty(ids.numel(), self.weight.shape[1])  # (N, E) float32
        nat.quant_dequantize(out, self.weight.qs, self.weight.d, _m(self.weight), int(self.weight.kind), ids)
        return out.to(self.dtype)


def _m(w: QuantWeight) -> torch.Tensor:
    return w.m if w.m is not None else w.d  # the kernel reads m only for Q4_1
