"""GGUFFile: a GGUF file's tensors by name, read from its header in milliseconds.

gguf's own `GGUFReader` turns every metadata value into numpy views, the tokenizer's
98,000 strings included: 2 s for the embedded SmolLM2's file (5 s on a loaded machine), on
every start of a worker that runs it; this takes 11-16 ms (docs/benchmarks.md). The weights need none of those values. `GGUFFile` walks the header with
`struct` (GGUF v2/v3: magic, version, counts, key/values, tensor infos, aligned data),
keeps the scalar and string values (`general.architecture`, `general.alignment`, ...),
skips the arrays, and maps the file: each tensor's `data` is a (rows, row bytes) uint8 view
of it, as gguf's reader gives quantized tensors (`gguf.dequantize` takes it for any type;
`shape` is the tensor's own, outermost dimension first).
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

_MAGIC = b"GGUF"
_STRING, _ARRAY = 8, 9  # gguf's GGUFValueType
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_DEFAULT_ALIGNMENT = 32


@dataclass(frozen=True)
class GGUFTensor:
    name: str
    tensor_type: GGMLQuantizationType
    shape: tuple[int, ...]  # outermost first, e.g. (out_features, in_features)
    data: np.ndarray  # (rows, row bytes) uint8, a view of the mapped file


class GGUFFile:
    """The fields (scalars and strings; arrays skipped) and tensors of a little-endian GGUF file."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        with self.path.open("rb") as f:
            self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        buf = self._map
        if buf[:4] != _MAGIC:
            raise ValueError(f"{self.path.name}: not a GGUF file")
        version, n_tensors, n_fields = struct.unpack_from("<IQQ", buf, 4)
        if version not in (2, 3):
            raise ValueError(f"{self.path.name}: GGUF version {version}, expected 2 or 3")
        off = 24
        self.fields: dict[str, int | float | bool | str] = {}
        for _ in range(n_fields):
            key, off = _string(buf, off)
            (vtype,) = struct.unpack_from("<I", buf, off)
            if vtype in _SCALARS:
                self.fields[key] = struct.unpack_from(_SCALARS[vtype], buf, off + 4)[0]
            elif vtype == _STRING:
                self.fields[key] = _string(buf, off + 4)[0]
            off = _skip(buf, off + 4, vtype)
        infos = []
        for _ in range(n_tensors):
            name, off = _string(buf, off)
            (n_dims,) = struct.unpack_from("<I", buf, off)
            dims = struct.unpack_from(f"<{n_dims}Q", buf, off + 4)  # innermost first
            ttype, offset = struct.unpack_from("<IQ", buf, off + 4 + 8 * n_dims)
            off += 4 + 8 * n_dims + 12
            infos.append((name, GGMLQuantizationType(ttype), dims, offset))
        align = int(self.fields.get("general.alignment", _DEFAULT_ALIGNMENT))
        start = -(-off // align) * align
        self.tensors: dict[str, GGUFTensor] = {}
        for name, ttype, dims, offset in infos:
            block, block_bytes = GGML_QUANT_SIZES[ttype]
            rows = int(np.prod(dims[1:], dtype=np.int64))
            row_bytes = dims[0] // block * block_bytes
            data = np.frombuffer(buf, np.uint8, rows * row_bytes, start + offset).reshape(rows, row_bytes)
            self.tensors[name] = GGUFTensor(name, ttype, tuple(reversed(dims)), data)


def _string(buf, off: int) -> tuple[str, int]:
    (n,) = struct.unpack_from("<Q", buf, off)
    return bytes(buf[off + 8 : off + 8 + n]).decode("utf-8"), off + 8 + n


def _skip(buf, off: int, vtype: int) -> int:
    """The offset just past a value of type `vtype` at `off`."""
    if vtype == _STRING:
        return off + 8 + struct.unpack_from("<Q", buf, off)[0]
    if vtype == _ARRAY:
        itype, n = struct.unpack_from("<IQ", buf, off)
        off += 12
        if itype in _SCALARS:
            return off + n * struct.calcsize(_SCALARS[itype])
        for _ in range(n):
            off = _skip(buf, off, itype)
        return off
    if vtype not in _SCALARS:
        raise ValueError(f"unknown GGUF value type {vtype} at byte {off}")
    return off + struct.calcsize(_SCALARS[vtype])
