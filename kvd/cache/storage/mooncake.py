"""MooncakePool: the KV pool on Mooncake Store, for a pool that spans machines.

Each pool is a Mooncake client: it mounts `segment_bytes` of its memory into the cluster
(0 contributes none) and the master places objects in the mounted segments; the pool is
bounded by their sum. A put that finds no space fails that key (NO_AVAILABLE_HANDLE), and
the master evicts old objects (past its high watermark) to make room for later puts.

Contract (see base): objects are framed (header + payload); `put_many` is one
`batch_put_from_multi_buffers` call per batch, header and payload as two buffers, "already
exists" is success; `get_many_into` is one `batch_get_into_multi_buffers` call per batch and
checks magic, length and digest of every object before its status is OK. Every per-key
return code is checked by name (`MooncakeCode`); an unknown code fails that key and is
logged with its name and number.

Copies: a payload or read buffer inside a region the caller registered once
(`register_buffer`) moves straight between that memory and the pool; any other goes through
the pool's own registered staging area (one copy, as in the other backends).

Bounded time: the constructor checks that the master answers (`timeout_s`) before Mooncake's
own setup (which retries for minutes against a dead master); a batch whose master cannot be
reached (RPC_FAIL, or the client's health check) raises StorageUnavailable, within the few
seconds of Mooncake's RPC reconnect.

One-shot objects: Mooncake objects carry no TTL, so the pool gives the partial blocks it
writes (`...:partial:<N>`) one, as RedisPool gets from its server: each later call of the
pool removes those written more than `partial_ttl_s` ago (the decode side has read them
within its lease long before). Full blocks stay for prefix reuse until the master evicts
them. Without that, every handoff would leave an object no one reads again, and only
eviction at the high watermark would ever take them out, along with blocks worth keeping.

Network: Mooncake reads MC_TCP_BIND_ADDRESS for the address it advertises, so the pool sets it
to `local_hostname`. Its client still listens on all interfaces (see servers.py).
"""

from __future__ import annotations

import collections
import ctypes
import enum
import mmap
import os
import socket
import threading
import time
from collections.abc import Sequence

import structlog
import xxhash

from kvd.cache.hashing import is_partial_key
from kvd.cache.storage.base import (
    _HEADER,  # the one frame format; the zero-copy paths build and check it around slices
    FRAME_VERSION,
    HEADER_BYTES,
    MAGIC,
    Buffer,
    ReadStatus,
    StoragePool,
    StorageUnavailable,
    unframe_into,
)

log = structlog.get_logger("kvd.pool.mooncake")

_ALIGN = 64  # staging slots start on cache lines
_MIN_SEGMENT = 16 * 2**20  # Mooncake refuses to mount less
_SETUP_RETRIES = "2"  # Mooncake retries setup ~4.5 s a try against an unreachable master (default 20)


class MooncakeCode(enum.IntEnum):
    """Mooncake Store error codes this pool tells apart (mooncake-store/include/types.h)."""

    OK = 0
    INTERNAL_ERROR = -1
    BUFFER_OVERFLOW = -10
    SEGMENT_NOT_FOUND = -101
    NO_AVAILABLE_HANDLE = -200  # no space left in the mounted segments
    INVALID_KEY = -400
    INVALID_PARAMS = -600  # on a read: the buffers are smaller than the object
    INVALID_WRITE = -700
    INVALID_READ = -701
    INVALID_REPLICA = -702
    REPLICA_IS_NOT_READY = -703  # another writer's put of this key has not ended yet
    OBJECT_NOT_FOUND = -704
    OBJECT_ALREADY_EXISTS = -705
    OBJECT_HAS_LEASE = -706  # remove: a reader was granted a lease on the object
    LEASE_EXPIRED = -707
    TRANSFER_FAIL = -800  # also on a read: the buffers are larger than the object
    RPC_FAIL = -900  # the master cannot be reached


def code_name(code: int) -> str:
    try:
        return MooncakeCode(code).name
    except ValueError:
        return "UNKNOWN"


class _Health(enum.IntEnum):  # MooncakeDistributedStore.health_check()
    OK = 0
    CLOSED = 1
    MASTER_UNREACHABLE = 2


def _address(mv: memoryview) -> int | None:
    """What MooncakeDistributedStore.health_check() returns."""

    """Address of a writable, non-empty buffer; None for read-only ones (bytes)."""
    if mv.readonly or mv.nbytes == 0:
        return None
    return ctypes.addressof(ctypes.c_char.from_buffer(mv))


def _align(n: int) -> int:
    return (n + _ALIGN - 1) // _ALIGN * _ALIGN


def _header(payload: memoryview) -> bytes:
    return _HEADER.pack(MAGIC, FRAME_VERSION, payload.nbytes, xxhash.xxh3_128_digest(payload))


def _check_in_place(header: memoryview, payload: memoryview) -> ReadStatus:
    """base.unframe_into's checks for a header and payload that arrived in separate buffers."""
    magic, version, length, digest = _HEADER.unpack_from(header)
    if magic != MAGIC or version != FRAME_VERSION or length != payload.nbytes:
        return ReadStatus.CORRUPT
    return ReadStatus.OK if xxhash.xxh3_128_digest(payload) == digest else ReadStatus.CORRUPT


class MooncakePool(StoragePool):
    """A Mooncake Store client: its mounted segment, a registered staging buffer, the partial blocks' TTL."""

    def __init__(self, master_address: str, metadata_server: str = "P2PHANDSHAKE", segment_bytes: int = 2**30,
                 staging_bytes: int = 64 * 2**20, local_hostname: str = "127.0.0.1", protocol: str = "tcp",
                 rdma_devices: str = "", timeout_s: float = 5.0, partial_ttl_s: float = 600.0) -> None:  # fmt: skip
        if segment_bytes != 0 and segment_bytes < _MIN_SEGMENT:
            raise ValueError(f"segment_bytes: 0 or >= {_MIN_SEGMENT} (Mooncake's minimum), got {segment_bytes}")
        if staging_bytes < 2 * _ALIGN:
            raise ValueError(f"staging_bytes: must be >= {2 * _ALIGN}, got {staging_bytes}")
        self.master_address = master_address
        self.segment_bytes = segment_bytes
        self.partial_ttl_s = partial_ttl_s
        self._expiring: collections.deque[tuple[float, str]] = collections.deque()  # (due, key), partial blocks written
        self._lock = threading.Lock()  # the staging area serves one batch at a time
        self._regions: list[tuple[int, int, memoryview]] = []  # registered by the caller
        _check_master(master_address, timeout_s)
        os.environ["MC_TCP_BIND_ADDRESS"] = local_hostname  # read by the transfer engine at setup
        os.environ.setdefault("MC_STORE_CLIENT_SETUP_RETRIES", _SETUP_RETRIES)
        from mooncake.store import MooncakeDistributedStore, ReplicateConfig

        self._config = ReplicateConfig()  # one replica: a KV pool is a cache, not a durable store
        self._store = MooncakeDistributedStore()
        rc = self._store.setup(local_hostname, metadata_server, segment_bytes, 0, protocol, rdma_devices,
                               master_address)  # fmt: skip
        if rc != 0:
            raise StorageUnavailable(f"mooncake pool: setup against master {master_address}: {code_name(rc)} ({rc})")
        self._staging_map = mmap.mmap(-1, staging_bytes)  # page-aligned, never moves
        self._staging = memoryview(self._staging_map)
        self._staging_ref = ctypes.c_char.from_buffer(self._staging_map)  # pins the map while registered
        self._staging_addr = ctypes.addressof(self._staging_ref)
        try:
            self._register(self._staging_addr, staging_bytes, "staging")
        except StorageUnavailable:
            self.close()
            raise

    @classmethod
    def from_config(cls, pd) -> MooncakePool:
        """From kvd.config.PDConfig: mooncake_master, mooncake_metadata, mooncake_segment_gb, host."""
        if not pd.mooncake_master:
            raise ValueError("pd.mooncake_master: required for pool = 'mooncake'")
        return cls(pd.mooncake_master, metadata_server=pd.mooncake_metadata,
                   segment_bytes=int(pd.mooncake_segment_gb * 2**30), local_hostname=pd.host,
                   partial_ttl_s=pd.partial_ttl_s)  # fmt: skip

    # ---- plumbing ----------------------------------------------------------------------
    def _client(self):
        if self._store is None:
            raise StorageUnavailable("mooncake pool: closed")
        # The client's own view of its master connection (under a microsecond): a batch
        # against a master known dead fails at once instead of waiting on an RPC reconnect.
        health = self._store.health_check()
        if health != _Health.OK:
            raise StorageUnavailable(f"mooncake pool: master {self.master_address}: {_Health(health).name}")
        return self._store

    def _raise_if_unreachable(self, op: str, codes: Sequence[int]) -> None:
        if MooncakeCode.RPC_FAIL in codes:
            raise StorageUnavailable(f"mooncake pool: {op}: master {self.master_address}: RPC_FAIL")

    def _register(self, addr: int, nbytes: int, what: str) -> None:
        rc = self._store.register_buffer(addr, nbytes)
        if rc != 0:
            raise StorageUnavailable(f"mooncake pool: register_buffer({what}, {nbytes} bytes): "
                                     f"{code_name(rc)} ({rc})")  # fmt: skip

    def register_buffer(self, buffer: memoryview) -> None:
        mv = memoryview(buffer).cast("B")
        addr = _address(mv)
        if addr is None:
            raise ValueError("register_buffer: buffer must be writable and non-empty")
        with self._lock:
            self._client()
            self._register(addr, mv.nbytes, "caller")
            self._regions.append((addr, addr + mv.nbytes, mv))

    def _registered(self, mv: memoryview) -> int | None:
        """The address of `mv` when it lies inside a caller-registered region."""
        if not self._regions:
            return None
        addr = _address(mv)
        if addr is None:
            return None
        end = addr + mv.nbytes
        return addr if any(lo <= addr and end <= hi for lo, hi, _ in self._regions) else None

    def _chunks(self, order: list[int], staged_bytes: list[int]) -> list[list[int]]:
        """Split a batch into runs whose headers and staged payloads fit the staging area."""
        chunks, cur, used = [], [], 0
        for i in order:
            need = _align(HEADER_BYTES + staged_bytes[i])
            if need > self._staging.nbytes:
                raise ValueError(f"staging_bytes: {self._staging.nbytes} cannot hold one "
                                 f"{staged_bytes[i]}-byte payload; raise it or register_buffer()")  # fmt: skip
            if used + need > self._staging.nbytes:
                chunks.append(cur)
                cur, used = [], 0
            cur.append(i)
            used += need
        return chunks + [cur] if cur else chunks

    # ---- writes ------------------------------------------------------------------------
    def put_many(self, keys: Sequence[str], payloads: Sequence[Buffer]) -> list[bool]:
        if len(keys) != len(payloads):
            raise ValueError(f"put_many: {len(keys)} keys but {len(payloads)} payloads")
        mvs = [memoryview(p).cast("B") for p in payloads]
        first: dict[str, int] = {}
        for i, key in enumerate(keys):
            first.setdefault(key, i)  # content-addressed: one write per distinct key
        ok = [False] * len(keys)
        with self._lock:
            store = self._client()
            self._expire(store)
            addrs = [self._registered(mv) for mv in mvs]
            staged = [0 if a is not None else mv.nbytes for a, mv in zip(addrs, mvs)]
            for chunk in self._chunks(list(first.values()), staged):
                ptrs, sizes = self._stage_puts(chunk, mvs, addrs)
                codes = store.batch_put_from_multi_buffers([keys[i] for i in chunk], ptrs, sizes, self._config)
                self._raise_if_unreachable("put", codes)
                for i, code in zip(chunk, codes):
                    ok[i] = code in (MooncakeCode.OK, MooncakeCode.OBJECT_ALREADY_EXISTS)
                    if not ok[i]:
                        self.last_refusal = f"mooncake: {code_name(code)} ({code})"
                    elif code == MooncakeCode.OK and is_partial_key(keys[i]):
                        self._expiring.append((time.monotonic() + self.partial_ttl_s, keys[i]))
                _log_failures("put", [keys[i] for i in chunk], codes, ok=(0, MooncakeCode.OBJECT_ALREADY_EXISTS))
        return [ok[first[key]] for key in keys]

    def _stage_puts(self, chunk, mvs, addrs) -> tuple[list[list[int]], list[list[int]]]:
        """Headers (and unregistered payloads) into staging; (pointers, sizes) per key."""
        ptrs, sizes, slots = self._slots(chunk, [mv.nbytes for mv in mvs], addrs)
        for i, off in zip(chunk, slots):
            mv = mvs[i]
            self._staging[off : off + HEADER_BYTES] = _header(mv)
            if addrs[i] is None:  # unregistered: the one copy, right behind its header
                self._staging[off + HEADER_BYTES : off + HEADER_BYTES + mv.nbytes] = mv
        return ptrs, sizes

    def _slots(self, chunk, nbytes, addrs) -> tuple[list[list[int]], list[list[int]], list[int]]:
        """The staging layout of a batch, the same for puts and gets: per key a header slot,
        with the payload right behind it where the payload is not registered memory (header
        and payload are then one contiguous object, which base.unframe_into checks).
        (pointers, sizes, slot offsets)."""
        ptrs, sizes, slots, off = [], [], [], 0
        for i in chunk:
            n, hdr = nbytes[i], self._staging_addr + off
            slots.append(off)
            if addrs[i] is None:
                ptrs.append([hdr])
                sizes.append([HEADER_BYTES + n])
                off += _align(HEADER_BYTES + n)
            else:
                ptrs.append([hdr, addrs[i]])
                sizes.append([HEADER_BYTES, n])
                off += _align(HEADER_BYTES)
        return ptrs, sizes, slots

    def remove(self, keys: Sequence[str]) -> int:
        unique = list(dict.fromkeys(keys))
        if not unique:
            return 0
        with self._lock:
            return self._remove(self._client(), unique)

    def _remove(self, store, unique: list[str]) -> int:
        codes = store.batch_remove(unique, False)
        self._raise_if_unreachable("remove", codes)
        removed = sum(c == MooncakeCode.OK for c in codes)
        # A read grants its reader a lease (the master's default_kv_lease_ttl) and remove
        # refuses leased objects. Keys removed here are one-shot handoff objects past their
        # TTL, or keys the caller has just read itself, and a reader racing a forced remove
        # gets a failed digest check, never wrong bytes: so leased keys are removed with force.
        leased = [k for k, c in zip(unique, codes) if c == MooncakeCode.OBJECT_HAS_LEASE]
        if leased:
            forced = store.batch_remove(leased, True)
            self._raise_if_unreachable("remove", forced)
            removed += sum(c == MooncakeCode.OK for c in forced)
            _log_failures("remove", leased, forced, ok=(0, MooncakeCode.OBJECT_NOT_FOUND))
        _log_failures("remove", unique, codes,
                      ok=(0, MooncakeCode.OBJECT_NOT_FOUND, MooncakeCode.OBJECT_HAS_LEASE))  # fmt: skip
        return removed

    def _expire(self, store) -> None:
        """Remove the partial blocks this pool wrote whose TTL has passed (under the lock)."""
        now, due = time.monotonic(), []
        while self._expiring and self._expiring[0][0] <= now:
            due.append(self._expiring.popleft()[1])
        if due:
            n = self._remove(store, list(dict.fromkeys(due)))
            log.debug("mooncake_partial_blocks_expired", keys=len(due), removed=n)

    # ---- reads -------------------------------------------------------------------------
    def get_many_into(self, keys: Sequence[str], buffers: Sequence[memoryview]) -> list[ReadStatus]:
        if len(keys) != len(buffers):
            raise ValueError(f"get_many_into: {len(keys)} keys but {len(buffers)} buffers")
        outs = [memoryview(b).cast("B") for b in buffers]
        status = [ReadStatus.MISSING] * len(keys)
        with self._lock:
            store = self._client()
            addrs = [self._registered(out) for out in outs]
            staged = [0 if a is not None else out.nbytes for a, out in zip(addrs, outs)]
            for chunk in self._chunks(list(range(len(keys))), staged):
                ptrs, sizes, slots = self._slots(chunk, [out.nbytes for out in outs], addrs)
                codes = store.batch_get_into_multi_buffers([keys[i] for i in chunk], ptrs, sizes, False)
                self._raise_if_unreachable("get", codes)
                retry = []
                for i, code, slot in zip(chunk, codes, slots):
                    if code == HEADER_BYTES + outs[i].nbytes:
                        status[i] = self._check_read(slot, outs[i], staged=addrs[i] is None)
                    elif code in (MooncakeCode.INVALID_PARAMS, MooncakeCode.TRANSFER_FAIL) or code >= 0:
                        retry.append(i)  # the object's size differs from the buffer's (or a transfer failed)
                    else:
                        status[i] = ReadStatus.MISSING
                _log_failures("get", [keys[i] for i in chunk], codes,
                              ok=(MooncakeCode.OBJECT_NOT_FOUND, MooncakeCode.INVALID_PARAMS,
                                  MooncakeCode.TRANSFER_FAIL), ok_nonnegative=True)  # fmt: skip
                for i in retry:  # after the chunk's staged payloads were copied out
                    status[i] = self._read_whole(store, keys[i], outs[i])
        return status

    def _check_read(self, slot: int, out: memoryview, staged: bool) -> ReadStatus:
        if staged:
            return unframe_into(self._staging[slot : slot + HEADER_BYTES + out.nbytes], out)
        return _check_in_place(self._staging[slot : slot + HEADER_BYTES], out)

    def _read_whole(self, store, key: str, out: memoryview) -> ReadStatus:
        """Slow path for an object whose size is not header + buffer: read all of it into
        staging and let base.unframe_into tell a foreign or truncated object (CORRUPT) from
        a valid one of another size (SIZE_MISMATCH)."""
        cap = self._staging.nbytes
        (code,) = store.batch_get_into([key], [self._staging_addr], [cap])
        self._raise_if_unreachable("get", [code])
        if code >= 0:
            return unframe_into(self._staging[:code], out)
        if code == MooncakeCode.INVALID_PARAMS:  # larger than the whole staging area
            return ReadStatus.SIZE_MISMATCH
        _log_failures("get", [key], [code], ok=(MooncakeCode.OBJECT_NOT_FOUND,))
        return ReadStatus.MISSING

    def exists(self, keys: Sequence[str]) -> list[bool]:
        if not keys:
            return []
        with self._lock:
            answers = self._client().batch_is_exist(list(keys))
        self._raise_if_unreachable("exists", answers)
        _log_failures("exists", keys, answers, ok=(0, 1))
        return [a == 1 for a in answers]  # 1 present, 0 absent, negative: an error code

    def close(self) -> None:
        with self._lock:
            if self._store is None:
                return
            try:
                _check_master(self.master_address, 1.0)
            except StorageUnavailable:
                # The master is gone and the segment with it: the client's unmount would only
                # retry RPCs (seen: 2-17 s). Keep the client object until the process exits
                # instead of letting its destructor retry them now.
                _ABANDONED.append(self._store)
            else:
                self._store.close()  # unmounts the segment from a live master
            self._store = None
            self._regions.clear()
            self._staging.release()
            del self._staging_ref
            self._staging_map.close()


_ABANDONED: list = []  # clients whose master died: closing them would only wait on dead RPCs


def _check_master(address: str, timeout_s: float) -> None:
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"master_address: expected host:port, got {address!r}")
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except OSError as e:
        raise StorageUnavailable(f"mooncake pool: master {address}: {e}") from e


def _log_failures(op: str, keys: Sequence[str], codes: Sequence[int], ok: tuple, ok_nonnegative=False) -> None:
    """One warning per failure code of a batch: its name, number, count and first key."""
    failed: dict[int, list[str]] = {}
    for key, code in zip(keys, codes):
        if code in ok or (ok_nonnegative and code >= 0):
            continue
        failed.setdefault(code, []).append(key)
    for code, ks in failed.items():
        log.warning("mooncake_" + op + "_failed", code=code_name(code), code_num=code, keys=len(ks), first_key=ks[0])
