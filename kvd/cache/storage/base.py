"""StoragePool: one interface for every KV pool backend (local LMDB, Mooncake, Redis).

Contract:
- Objects are content-addressed by their key (which names model, dtype, block size,
  layout and the chained block hash): `put_many` treats "already exists" as success.
- Every object is stored framed — magic, version, payload length, xxh3-128 digest of the
  payload — and every read checks the frame: a short, truncated, corrupted or foreign
  object is a failed read (`ReadStatus.CORRUPT`), never bytes handed to the model.
- `get_many_into` reads into buffers the caller preallocated; a buffer whose size differs
  from the stored payload is a failed read (`ReadStatus.SIZE_MISMATCH`).
- Failures are per key (a list of statuses); exceptions are for a pool that cannot be
  reached at all (`StorageUnavailable`), which fails the calling request, not the daemon.
"""

from __future__ import annotations

import abc
import enum
import struct
from collections.abc import Sequence

import xxhash

MAGIC = b"KVDB"
FRAME_VERSION = 1
_HEADER = struct.Struct("<4sHxxQ16s")  # magic, version, pad, payload length, xxh3-128 digest
HEADER_BYTES = _HEADER.size

Buffer = bytes | bytearray | memoryview


class ReadStatus(enum.IntEnum):
    """How one key's read ended; anything but OK is a failed read, never bytes for the model."""

    OK = 0
    MISSING = 1
    CORRUPT = 2  # bad magic, version, length or digest
    SIZE_MISMATCH = 3  # the caller's buffer is not the stored payload's size


class StorageUnavailable(Exception):
    """The pool cannot be reached (server down, store closed)."""


def frame(payload: Buffer) -> bytes:
    """Header + payload, as stored."""
    mv = memoryview(payload).cast("B")
    return _HEADER.pack(MAGIC, FRAME_VERSION, mv.nbytes, xxhash.xxh3_128_digest(mv)) + mv


def frame_into(payload: Buffer, out: bytearray) -> memoryview:
    """Header + payload written into `out` (grown when too small): a view of the stored bytes.
    Reusing one buffer avoids a fresh allocation (and its page faults) per object."""
    mv = memoryview(payload).cast("B")
    n = HEADER_BYTES + mv.nbytes
    if len(out) < n:
        out.extend(bytes(n - len(out)))
    _HEADER.pack_into(out, 0, MAGIC, FRAME_VERSION, mv.nbytes, xxhash.xxh3_128_digest(mv))
    view = memoryview(out)[:n]
    view[HEADER_BYTES:] = mv
    return view


def unframe_into(stored: Buffer, out: memoryview) -> ReadStatus:
    """Check a stored object and copy its payload into `out`."""
    mv = memoryview(stored).cast("B")
    if mv.nbytes < HEADER_BYTES:
        return ReadStatus.CORRUPT
    magic, version, length, digest = _HEADER.unpack_from(mv)
    if magic != MAGIC or version != FRAME_VERSION or length != mv.nbytes - HEADER_BYTES:
        return ReadStatus.CORRUPT
    payload = mv[HEADER_BYTES:]
    if out.nbytes != length:
        return ReadStatus.SIZE_MISMATCH
    if xxhash.xxh3_128_digest(payload) != digest:
        return ReadStatus.CORRUPT
    out[:] = payload
    return ReadStatus.OK


class StoragePool(abc.ABC):
    """put many / get many into buffers / exists / remove."""

    last_refusal = ""  # why the latest put_many refused a key, in the backend's words

    @abc.abstractmethod
    def put_many(self, keys: Sequence[str], payloads: Sequence[Buffer]) -> list[bool]:
        """Store each payload under its key; True when stored or already present. Where
        one is refused, `last_refusal` says why (for the error the request gets)."""

    @abc.abstractmethod
    def get_many_into(self, keys: Sequence[str], buffers: Sequence[memoryview]) -> list[ReadStatus]:
        """Read each key's payload into its preallocated buffer, checking the frame."""

    @abc.abstractmethod
    def exists(self, keys: Sequence[str]) -> list[bool]:
        """Whether each key is present (a present key may still fail its digest check)."""

    @abc.abstractmethod
    def remove(self, keys: Sequence[str]) -> int:
        """Remove keys; returns how many were present."""

    def register_buffer(self, buffer: memoryview) -> None:  # noqa: B027 - optional hook
        """Declare a long-lived staging area, once, whose slices later payloads and read
        buffers will be. Backends that move registered memory (Mooncake) then write from and
        read into those slices without a copy; the others ignore it. A failed read into a
        registered slice may leave its bytes changed: only an OK status means the payload."""

    def close(self) -> None:  # noqa: B027 - optional for backends without resources
        """Release the backend's resources."""

    def __enter__(self) -> StoragePool:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
