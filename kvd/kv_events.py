"""KV events: the channel on which an instance tells subscribers (the router) which blocks it holds.

    instance ──PUB  EventBatch──────────▶ SUB  subscriber   (kvd.route.subscriber)
             ◀─ROUTER SnapshotRequest─── DEALER
             ──────── Snapshot─────────▶

Events (docs/architecture.md, "KV events"):
- `BlockStored(tier, hashes, parent, block_size)`: full blocks the instance now holds in
  `tier`, in chain order; `parent` is the chain hash of the block before `hashes[0]`, None
  when `hashes[0]` is a sequence's first block (whose chain parent is
  `kvd.cache.hashing.root_hash(algo)`).
- `BlockRemoved(tier, hashes)`: blocks the instance no longer holds in `tier`.
- `AllCleared(tiers)`: every block of those tiers is gone (a worker restart empties the
  device and host tiers; the pool tier outlives it).

Hashes are kvd's chained block hashes exactly as the engine computes them
(`kvd.cache.hashing.hash_blocks(token_ids, block_size, extra_keys, algo)`, the values of
`Request.block_hashes`): the raw 16-byte xxh3-128 digest (32-byte for sha256), carried as
msgpack bin. Their hex is the block key in storage keys (`<namespace>/<hex>`). A
subscriber that hashes a prompt with the same block size, algorithm and extra keys
(the `Snapshot` names the first two; daemon requests carry no extra keys) gets the same
bytes.

Tiers: "device" (the KV cache's prefix index: a hit costs nothing), "host" (blocks of a
request preempted by swap, in host memory until it resumes; not a prefix hit for another
request today), "pool" (blocks this instance wrote to the KV storage pool; the pool evicts
on its own without telling, so this tier is what the instance wrote, bounded, not what
the pool still has).

A batch carries the instance's id, its epoch (random per start: a restarted instance has
a new one), a sequence number, a timestamp and the instance's `Load` (waiting and running
requests, empty and cached-only blocks): the router's status feed, so a heartbeat also goes out on any tick
whose load differs from the last one sent. The sequence number grows by one per
batch that carries events; a batch without events is a heartbeat and repeats the last
number, so a subscriber sees that it missed the last batch within a heartbeat. A
subscriber that sees a gap (or a new epoch) asks for a `Snapshot`: every hash the
instance holds per tier, consistent with the events up to `seq`; it drops batches with a
number <= `seq` and applies the ones after.

With the deployment's secret (`pd.secret`) both sockets are CURVE servers whose keys, and
the one subscriber key they admit, derive from it (`EventKeys`).
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import msgspec

from kvd.ipc import curve_pair

Tier = Literal["device", "host", "pool"]
DEVICE: Tier = "device"
HOST: Tier = "host"
POOL: Tier = "pool"
TIERS: tuple[Tier, ...] = (DEVICE, HOST, POOL)


class _Event(msgspec.Struct, frozen=True, forbid_unknown_fields=True, array_like=True, tag_field="type"):
    """The base of the channel's messages: frozen, tagged, compact (array-like)."""


class BlockStored(_Event, tag="stored"):
    """Full blocks now held in `tier`, in chain order (see the module docstring for hashes)."""

    tier: Tier
    hashes: list[bytes]
    parent: bytes | None  # the chain hash before hashes[0]; None: hashes[0] is a sequence's first block
    block_size: int  # tokens per block (each block is full)


class BlockRemoved(_Event, tag="removed"):
    """Blocks no longer held in `tier`."""

    tier: Tier
    hashes: list[bytes]


class AllCleared(_Event, tag="cleared"):
    """Every block of these tiers is gone."""

    tiers: list[Tier]


KVEvent = BlockStored | BlockRemoved | AllCleared


class Load(msgspec.Struct, frozen=True, forbid_unknown_fields=True, array_like=True):
    """How busy the instance is as the batch leaves: its scheduler's queues and KV blocks."""

    waiting: int
    running: int
    free_blocks: int  # neither held by a request nor cached
    num_blocks: int
    cached_blocks: int = 0  # not held, still in the prefix cache (evicted first when blocks run short)


class EventBatch(_Event, tag="batch"):
    """One PUB message: an instance's events since its previous batch, in order."""

    instance: str
    epoch: int  # random per start of the instance
    seq: int  # +1 per batch with events; a heartbeat (no events) repeats the last
    ts: float  # wall clock (time.time()) when sent
    events: list[KVEvent]
    load: Load | None = None  # None while the instance has no engine (a worker restarting)


class SnapshotRequest(_Event, tag="snapshot_request"):
    """Ask an instance for every hash it holds."""


class Snapshot(_Event, tag="snapshot"):
    """Every hash the instance holds, per tier, as of batch `seq` of `epoch`."""

    instance: str
    epoch: int
    seq: int
    block_size: int
    hash_algo: str
    device: list[bytes]
    host: list[bytes]
    pool: list[bytes]


class EventKeys(NamedTuple):
    """The CURVE keys of a deployment's KV-event sockets, derived from its secret (z85): the
    instances' server pair and the one subscriber pair the instances admit."""

    server_public: bytes
    server_secret: bytes
    subscriber_public: bytes
    subscriber_secret: bytes

    @classmethod
    def derive(cls, secret: str) -> EventKeys:
        # A personalisation of their own: these keys never equal the PD link's.
        return cls(*curve_pair(secret, b"kvd-kvev-server"), *curve_pair(secret, b"kvd-kvev-sub"))


def encoder() -> msgspec.msgpack.Encoder:
    return msgspec.msgpack.Encoder()


def batch_decoder() -> msgspec.msgpack.Decoder:
    return msgspec.msgpack.Decoder(EventBatch)


def snapshot_decoder() -> msgspec.msgpack.Decoder:
    return msgspec.msgpack.Decoder(Snapshot)


def request_decoder() -> msgspec.msgpack.Decoder:
    return msgspec.msgpack.Decoder(SnapshotRequest)
