"""LocalPool: the embedded KV pool for one machine, on LMDB.

LMDB is a memory-mapped B+tree with multi-process locking: every kvd instance on the
host opens the same directory, writers are serialised by LMDB, readers never block.
Three sub-databases:
- `objects`: key -> framed block (see base.frame);
- `order`: 8-byte big-endian sequence number -> key, the insertion order used for eviction;
- `meta`: `seq`, `bytes` (stored payload+header bytes) and `seqof:<key>` -> sequence number.

Bounded: a put that would take the pool past `capacity_bytes` first evicts the oldest
objects, all inside the put's write transaction, so the bound holds across processes.
A put of a key already present is a success and moves nothing (content-addressed).
Reads copy once, from the memory map into the caller's buffer, after the digest check.

Writes go through one reused framing buffer (no allocation per object) into the map. A
growing LMDB file takes a page fault per new 4 KiB page on the write path, which costs
more than the copy; a background thread keeps the file allocated `PREALLOCATE_AHEAD`
bytes past LMDB's last page (posix_fallocate, off the write path), so a put into a
growing pool costs about what a put into a full, evicting one does.
"""

from __future__ import annotations

import os
import struct
import threading
from collections.abc import Sequence
from pathlib import Path

import lmdb

from kvd.cache.storage.base import (
    HEADER_BYTES,
    Buffer,
    ReadStatus,
    StoragePool,
    StorageUnavailable,
    frame_into,
    unframe_into,
)

_U64 = struct.Struct(">Q")
PREALLOCATE_AHEAD = 256 * 2**20
_OVERHEAD = 2  # map size = capacity x this + slack: B+tree pages and free pages need room too
_SLACK = 64 * 2**20


class LocalPool(StoragePool):
    """The embedded pool: one LMDB environment per host, bounded, oldest-first eviction."""

    def __init__(self, path: str | Path, capacity_bytes: int = 2 * 2**30) -> None:
        if capacity_bytes < 1:
            raise ValueError(f"capacity_bytes: must be >= 1, got {capacity_bytes}")
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)
        self.capacity_bytes = capacity_bytes
        # sync=False: a KV pool is a cache between live processes, not a durable store; an fsync
        # per put would bound handoff bandwidth by the disk. Processes still see each
        # other's commits at once through the shared memory map.
        self.env = lmdb.open(str(self.path), map_size=capacity_bytes * _OVERHEAD + _SLACK, max_dbs=3,
                             subdir=True, lock=True, readahead=False, meminit=False, sync=False,
                             metasync=False, writemap=True)  # fmt: skip
        self._objects = self.env.open_db(b"objects")
        self._order = self.env.open_db(b"order")
        self._meta = self.env.open_db(b"meta")
        self.num_evictions = 0
        self._scratch = bytearray()  # one framing buffer, reused: no allocation per object
        self._map_size = capacity_bytes * _OVERHEAD + _SLACK
        self._grow = threading.Event()
        self._closing = False
        self._data_fd = os.open(self.path / "data.mdb", os.O_RDWR)
        self._grower = threading.Thread(target=self._preallocate, name="lmdb-preallocate", daemon=True)
        self._grower.start()
        self._grow.set()

    def _preallocate(self) -> None:
        """Keep the data file allocated ahead of LMDB's last page (see the module docstring)."""
        psize = self.env.stat()["psize"]
        allocated = 0  # the file's size says nothing: LMDB sizes it to the whole (sparse) map
        while True:
            self._grow.wait()
            self._grow.clear()
            if self._closing:
                return
            try:
                want = min(self._map_size, (self.env.info()["last_pgno"] + 1) * psize + PREALLOCATE_AHEAD)
                if want > allocated:
                    os.posix_fallocate(self._data_fd, allocated, want - allocated)
                    allocated = want
            except (OSError, lmdb.Error):
                return  # a full disk or a closed env: writes then fault pages in as LMDB grows
    def _env(self) -> lmdb.Environment:
        if self.env is None:
            raise StorageUnavailable("local pool: closed")
        return self.env

    # ---- writes ------------------------------------------------------------------------
    def put_many(self, keys: Sequence[str], payloads: Sequence[Buffer]) -> list[bool]:
        if len(keys) != len(payloads):
            raise ValueError(f"put_many: {len(keys)} keys but {len(payloads)} payloads")
        out = []
        with self._env().begin(write=True) as txn:
            used = _get_u64(txn, self._meta, b"bytes")
            seq = _get_u64(txn, self._meta, b"seq")
            for key, payload in zip(keys, payloads):
                k = key.encode()
                if txn.get(k, db=self._objects) is not None:
                    out.append(True)  # content-addressed: already there is success
                    continue
                if HEADER_BYTES + memoryview(payload).nbytes > self.capacity_bytes:
                    self.last_refusal = f"local pool: an object larger than its capacity ({self.capacity_bytes} B)"
                    out.append(False)
                    continue
                obj = frame_into(payload, self._scratch)  # header + payload, then one copy into the map
                used = self._evict_until(txn, used, self.capacity_bytes - len(obj))
                txn.put(k, obj, db=self._objects)
                txn.put(_U64.pack(seq), k, db=self._order)
                txn.put(b"seqof:" + k, _U64.pack(seq), db=self._meta)
                seq += 1
                used += len(obj)
                out.append(True)
                obj.release()
            txn.put(b"bytes", _U64.pack(used), db=self._meta)
            txn.put(b"seq", _U64.pack(seq), db=self._meta)
        self._grow.set()
        return out

    def _evict_until(self, txn: lmdb.Transaction, used: int, limit: int) -> int:
        if used <= limit:
            return used
        cursor = txn.cursor(db=self._order)
        while used > limit and cursor.first():
            k = bytes(cursor.value())
            cursor.delete()
            obj = txn.pop(k, db=self._objects)
            txn.delete(b"seqof:" + k, db=self._meta)
            if obj is not None:
                used -= len(obj)
                self.num_evictions += 1
        return used

    def remove(self, keys: Sequence[str]) -> int:
        n = 0
        with self._env().begin(write=True) as txn:
            used = _get_u64(txn, self._meta, b"bytes")
            for key in keys:
                k = key.encode()
                obj = txn.pop(k, db=self._objects)
                if obj is None:
                    continue
                seq = txn.pop(b"seqof:" + k, db=self._meta)
                if seq is not None:
                    txn.delete(seq, db=self._order)
                used -= len(obj)
                n += 1
            txn.put(b"bytes", _U64.pack(used), db=self._meta)
        return n

    # ---- reads -------------------------------------------------------------------------
    def get_many_into(self, keys: Sequence[str], buffers: Sequence[memoryview]) -> list[ReadStatus]:
        if len(keys) != len(buffers):
            raise ValueError(f"get_many_into: {len(keys)} keys but {len(buffers)} buffers")
        out = []
        with self._env().begin(buffers=True) as txn:
            for key, buf in zip(keys, buffers):
                stored = txn.get(key.encode(), db=self._objects)
                out.append(ReadStatus.MISSING if stored is None else unframe_into(stored, memoryview(buf).cast("B")))
        return out

    def exists(self, keys: Sequence[str]) -> list[bool]:
        with self._env().begin() as txn:
            return [txn.get(k.encode(), db=self._objects) is not None for k in keys]

    def stats(self) -> dict[str, int]:
        with self._env().begin() as txn:
            return {
                "objects": txn.stat(self._objects)["entries"],
                "bytes": _get_u64(txn, self._meta, b"bytes"),
                "capacity_bytes": self.capacity_bytes,
            }

    def close(self) -> None:
        if self.env is not None:
            self._closing = True
            self._grow.set()
            self._grower.join()
            os.close(self._data_fd)
            self.env.close()
            self.env = None


def _get_u64(txn: lmdb.Transaction, db, key: bytes) -> int:
    v = txn.get(key, db=db)
    return _U64.unpack(v)[0] if v is not None else 0
