"""Payloads larger than the broker's packet limit, in chunks with a manifest (docs/PROTOCOL.md §8).

Sans I/O: no socket, no thread, no clock (times are arguments). A payload
(an encoded ``model`` or ``update``) is cut into chunks of ``chunk_size``
bytes; a ``manifest`` message names the payload by its SHA-256, gives its
size, the chunk size and count, and the SHA-256 of every chunk; each
``chunk`` message carries the payload's SHA-256, its index and its bytes.

A :class:`Reassembler` rebuilds one payload per sender with explicit
limits: at most ``max_total`` bytes and ``max_chunks`` chunks; one payload
in progress (a new manifest replaces the old one, the same manifest again is
a no-op); each chunk's SHA-256 is checked on arrival, before it is written,
and the whole payload's at the end. It holds one payload-sized buffer
(allocated zeroed, so untouched pages cost nothing) plus the chunk being
handled, and says which chunks are still missing, which is how a
receiver resumes. Every failure is a :class:`ChunkError` (a
:class:`~edge_agent.wire.WireError`) whose ``reason`` starts with
``chunk_``, so receivers count them like any other dropped message.

:class:`Outgoing` is the sender's side: which chunks are queued, in flight
and acknowledged, with a bounded window, so that a resend after a reconnect
sends only what the broker has not acknowledged.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from typing import Any

import msgpack
import numpy as np

from . import wire

DIGEST_BYTES = 32  # SHA-256

# Chunks per payload. The manifest lists 32 bytes per chunk, so 8192 chunks
# make a 256 KiB manifest, which still fits the smallest packet limit worth
# chunking for (1 MiB), and 8192 chunks of 64 KiB already carry 512 MiB.
# The bound also caps the per-payload bookkeeping a hostile manifest causes.
MAX_CHUNKS = 8192
# Largest chunk sent: even when the broker allows more. Larger messages are
# where brokers and clients misbehave (FIELD-NOTES: a 32 MiB message
# corrupted a NATS store, paho re-slices its send buffer above ~16 MB), and
# 8 MiB was fine everywhere it was tried.
MAX_CHUNK_BYTES = 8 * 1024 * 1024
# Smallest chunk a sender makes: below this the per-message cost (topic,
# header, PUBACK, hash call) dominates. A broker limit below it is refused.
MIN_CHUNK_BYTES = 16 * 1024
# Bytes of a chunk message besides its data, and of the PUBLISH packet around
# it: a generous bound (map header, keys, federation id of up to 64 bytes,
# the 32-byte payload id, ints, the bin header, MQTT fixed header, packet id,
# properties and a topic of up to ~100 bytes), so that a chunk of
# limit - CHUNK_HEADROOM data bytes always fits the limit.
CHUNK_HEADROOM = 4096
# Largest reassembled payload by default: a model of spec.MAX_PARAMS float32
# parameters (512 MiB) plus room for the msgpack framing. Receivers that know
# the model pass a tighter bound (payload_bound).
MAX_TOTAL_BYTES = 512 * 1024 * 1024 + 1024 * 1024
# Largest manifest message: the digest list at MAX_CHUNKS plus the header.
MAX_MANIFEST_BYTES = MAX_CHUNKS * DIGEST_BYTES + 4096
# Largest chunk message decoded.
MAX_CHUNK_MESSAGE_BYTES = MAX_CHUNK_BYTES + CHUNK_HEADROOM
# Chunks a sender keeps in flight (handed to the MQTT client, not yet
# acknowledged). Enough to keep a link busy; bounds the sender's memory to
# the payload plus this many chunk messages.
SEND_WINDOW = 8
# What a reassembled payload decodes as.
PAYLOAD_KINDS = ("model", "update")


class ChunkError(wire.WireError):
    """A manifest or chunk that must be dropped; ``reason`` starts with ``chunk_``.

    Reasons: ``chunk_bad_manifest``, ``chunk_too_large``, ``chunk_without_manifest``,
    ``chunk_out_of_range``, ``chunk_hash_mismatch``, ``chunk_total_mismatch``,
    ``chunk_incomplete`` (docs/PROTOCOL.md §8.5).
    """


@dataclass(frozen=True)
class Manifest:
    """What a chunked payload is: its size, layout and hashes (message kind ``manifest``)."""

    fed: str
    round: int
    of: str  # "model" or "update": the kind the reassembled payload must decode as
    size: int
    chunk_size: int
    sha256: bytes  # of the whole payload; also its id
    digests: bytes  # count x 32 bytes: the SHA-256 of each chunk, in order

    @property
    def count(self) -> int:
        return len(self.digests) // DIGEST_BYTES

    @property
    def id(self) -> str:
        """A short name for logs: the first 16 hex digits of the payload's SHA-256."""
        return self.sha256.hex()[:16]

    def digest(self, index: int) -> bytes:
        return self.digests[index * DIGEST_BYTES:(index + 1) * DIGEST_BYTES]

    def chunk_len(self, index: int) -> int:
        """Bytes of chunk ``index``: chunk_size, except the last one."""
        return min(self.chunk_size, self.size - index * self.chunk_size)


@dataclass(frozen=True)
class Chunk:
    """One piece of a payload (message kind ``chunk``)."""

    fed: str
    round: int
    sha256: bytes  # the payload's SHA-256 (Manifest.sha256): which payload this belongs to
    index: int
    data: bytes | memoryview


# --------------------------------------------------------------------------
# sizes


def effective_limit(announced: int, configured: int = 0) -> int:
    """The packet limit to chunk for: the smallest of the broker's announced Maximum
    Packet Size, a configured one, and what any receiver decodes unchunked (0 means unknown)."""
    limits = [n for n in (announced, configured) if n > 0]
    return min([*limits, wire.MAX_PAYLOAD_BYTES])


def chunk_size_for(limit: int) -> int:
    """The chunk size for a packet limit: safely below it, at most MAX_CHUNK_BYTES."""
    size = min(MAX_CHUNK_BYTES, limit - CHUNK_HEADROOM)
    if size < MIN_CHUNK_BYTES:
        raise ValueError(f"a packet limit of {limit} bytes is too small to send chunks of at least "
                         f"{MIN_CHUNK_BYTES} bytes")
    return size


def payload_bound(num_params: int) -> int:
    """Largest encoded model or update of ``num_params`` float32 parameters that a receiver accepts.

    The parameter bytes plus generous room for names, shapes, metrics and the
    msgpack framing (at most 256 arrays, small maps): a sender cannot make a
    receiver buffer much more than one model.
    """
    return num_params * 4 + 1024 * 1024


# --------------------------------------------------------------------------
# split and encode


def split(payload: bytes | memoryview, chunk_size: int, *, fed: str, round: int, of: str,
          max_chunks: int = MAX_CHUNKS) -> tuple[Manifest, list[memoryview]]:
    """Cut ``payload`` into chunks of ``chunk_size`` bytes: the manifest and the chunks (views, no copy)."""
    if of not in PAYLOAD_KINDS:
        raise ValueError(f"of must be one of {PAYLOAD_KINDS}, got {of!r}")
    view = memoryview(payload).cast("B")
    if not view.nbytes:
        raise ValueError("nothing to split: empty payload")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be > 0, got {chunk_size}")
    count = math.ceil(view.nbytes / chunk_size)
    if count > max_chunks:
        raise ValueError(f"{view.nbytes} bytes in chunks of {chunk_size} make {count} chunks, more than "
                         f"{max_chunks}: the packet limit is too small for this payload")
    pieces = [view[i * chunk_size:(i + 1) * chunk_size] for i in range(count)]
    digests = b"".join(hashlib.sha256(p).digest() for p in pieces)
    manifest = Manifest(fed=fed, round=round, of=of, size=view.nbytes, chunk_size=chunk_size,
                        sha256=hashlib.sha256(view).digest(), digests=digests)
    return manifest, pieces


def encode_manifest(m: Manifest) -> bytes:
    """The msgpack ``manifest`` message."""
    return msgpack.packb({
        "v": wire.WIRE_VERSION, "kind": "manifest", "fed": m.fed, "round": m.round, "of": m.of, "size": m.size,
        "chunk_size": m.chunk_size, "count": m.count, "sha256": m.sha256, "chunks": m.digests,
    }, use_bin_type=True)


def encode_chunk(c: Chunk) -> bytes:
    """The msgpack ``chunk`` message (the data as one bin, copied once into the payload)."""
    return msgpack.packb({
        "v": wire.WIRE_VERSION, "kind": "chunk", "fed": c.fed, "round": c.round, "sha256": c.sha256,
        "index": c.index, "data": c.data,
    }, use_bin_type=True)


# --------------------------------------------------------------------------
# decode (hostile input)


def _header(payload: Any, kind: str, fed: str | None, max_bytes: int) -> tuple[dict, wire.FieldReader, str, int]:
    m = wire.unpack(payload, max_bytes)
    v = m.get("v")
    if not isinstance(v, int) or isinstance(v, bool) or v != wire.WIRE_VERSION:
        raise wire.WireError("bad_version", f"wire version {m.get('v')!r}, this build speaks {wire.WIRE_VERSION}")
    if m.get("kind") != kind:
        raise wire.WireError("wrong_kind", f"expected a {kind} message, got {m.get('kind')!r}")
    r = wire.FieldReader(m, kind)
    msg_fed = r.id("fed")
    if fed is not None and msg_fed != fed:
        raise wire.WireError("wrong_federation", f"message for federation {msg_fed!r}, expected {fed!r}")
    return m, r, msg_fed, r.nonneg_int("round")


def decode_manifest(payload: Any, *, fed: str | None = None) -> Manifest:
    """Decode and check a ``manifest`` message (layout consistency; limits are the Reassembler's)."""
    _, r, msg_fed, rnd = _header(payload, "manifest", fed, MAX_MANIFEST_BYTES)
    of = r.text("of")
    size, chunk_size, count = r.pos_int("size"), r.pos_int("chunk_size"), r.pos_int("count")
    sha, digests = r.get("sha256", bytes), r.get("chunks", bytes)
    if of not in PAYLOAD_KINDS:
        raise ChunkError("chunk_bad_manifest", f"manifest.of must be one of {PAYLOAD_KINDS}, got {of!r}")
    if len(sha) != DIGEST_BYTES:
        raise ChunkError("chunk_bad_manifest", f"manifest.sha256 must be {DIGEST_BYTES} bytes, got {len(sha)}")
    if count != math.ceil(size / chunk_size):
        raise ChunkError("chunk_bad_manifest", f"manifest: {size} bytes in chunks of {chunk_size} are "
                                               f"{math.ceil(size / chunk_size)} chunks, not {count}")
    if len(digests) != count * DIGEST_BYTES:
        raise ChunkError("chunk_bad_manifest", f"manifest.chunks must hold {count} SHA-256 digests "
                                               f"({count * DIGEST_BYTES} bytes), got {len(digests)} bytes")
    return Manifest(fed=msg_fed, round=rnd, of=of, size=size, chunk_size=chunk_size, sha256=sha, digests=digests)


def decode_chunk(payload: Any, *, fed: str | None = None) -> Chunk:
    """Decode a ``chunk`` message (its hash is checked by the Reassembler, against the manifest)."""
    _, r, msg_fed, rnd = _header(payload, "chunk", fed, MAX_CHUNK_MESSAGE_BYTES)
    sha = r.get("sha256", bytes)
    if len(sha) != DIGEST_BYTES:
        raise ChunkError("chunk_bad_manifest", f"chunk.sha256 must be {DIGEST_BYTES} bytes, got {len(sha)}")
    return Chunk(fed=msg_fed, round=rnd, sha256=sha, index=r.nonneg_int("index"), data=r.get("data", bytes))


def looks_like_manifest(payload: Any) -> bool:
    """True if ``payload`` is a msgpack map of kind ``manifest`` (cheap: only small payloads are looked at).

    A ``model`` topic carries either a plain model or a manifest; a plain model
    that small costs one extra bounded decode here.
    """
    if not isinstance(payload, (bytes, bytearray, memoryview)) or not 0 < len(payload) <= MAX_MANIFEST_BYTES:
        return False
    try:
        return wire.unpack(payload, MAX_MANIFEST_BYTES).get("kind") == "manifest"
    except wire.WireError:
        return False


# --------------------------------------------------------------------------
# reassembly


class Reassembler:
    """Rebuilds one sender's chunked payload, holding at most one payload plus the chunk being handled."""

    def __init__(self, max_total: int = MAX_TOTAL_BYTES, max_chunks: int = MAX_CHUNKS,
                 timeout: float = math.inf) -> None:
        """``max_total``: largest payload accepted; ``timeout``: seconds after its manifest
        within which a payload must be complete (see :meth:`expire`)."""
        self.max_total = max_total
        self.max_chunks = max_chunks
        self.timeout = timeout
        self.manifest: Manifest | None = None
        self.deadline = math.inf
        self._buf: np.ndarray | None = None
        self._have: bytearray = bytearray()
        self._missing = 0
        self.received_bytes = 0  # chunk bytes written into the buffer for the payload in progress

    @property
    def buffered_bytes(self) -> int:
        """Bytes this reassembler holds (its one payload buffer)."""
        return 0 if self._buf is None else self._buf.nbytes

    def missing(self) -> list[int]:
        """Indexes of the chunks of the payload in progress that have not arrived ([] when none is)."""
        return [i for i, h in enumerate(self._have) if not h] if self.manifest is not None else []

    def begin(self, m: Manifest, now: float = 0.0) -> bool:
        """A manifest arrived: start its payload (replacing one in progress); False if it is the one in progress.

        Raises ChunkError (``chunk_too_large``, ``chunk_bad_manifest``) and then keeps what it had.
        """
        if m.size > self.max_total:
            raise ChunkError("chunk_too_large", f"payload of {m.size} bytes exceeds the limit {self.max_total}")
        if m.count > self.max_chunks:
            raise ChunkError("chunk_bad_manifest", f"payload of {m.count} chunks exceeds the limit {self.max_chunks}")
        if m.chunk_size > MAX_CHUNK_BYTES and m.count > 1:
            raise ChunkError("chunk_bad_manifest", f"chunks of {m.chunk_size} bytes exceed {MAX_CHUNK_BYTES}")
        if m == self.manifest:
            return False  # sent again (a reconnect, QoS 1 redelivery): keep the progress
        self.abandon()
        self.manifest = m
        # Zeroed by calloc: pages cost memory only once a chunk is written to them.
        self._buf = np.zeros(m.size, np.uint8)
        self._have = bytearray(m.count)
        self._missing = m.count
        self.received_bytes = 0
        self.deadline = now + self.timeout
        return True

    def add(self, c: Chunk) -> memoryview | None:
        """A chunk arrived: the whole payload when it completed it, else None.

        The payload is a view of the reassembler's buffer, which it then gives
        up (the caller owns it). A duplicate of a chunk already held is
        ignored. Raises ChunkError for a chunk that cannot belong.
        """
        m = self.manifest
        if m is None or c.sha256 != m.sha256:
            raise ChunkError("chunk_without_manifest", f"chunk {c.index} of payload {c.sha256.hex()[:16]}: no "
                             f"manifest for it" + (f" (payload {m.id} is in progress)" if m else ""))
        if not 0 <= c.index < m.count:
            raise ChunkError("chunk_out_of_range", f"chunk {c.index} of payload {m.id}, which has {m.count}")
        if self._have[c.index]:
            return None
        n = m.chunk_len(c.index)
        if len(c.data) != n:
            raise ChunkError("chunk_hash_mismatch", f"chunk {c.index} of payload {m.id} has {len(c.data)} bytes, "
                             f"the manifest says {n}")
        if hashlib.sha256(c.data).digest() != m.digest(c.index):
            raise ChunkError("chunk_hash_mismatch", f"chunk {c.index} of payload {m.id} does not match its SHA-256")
        start = c.index * m.chunk_size
        assert self._buf is not None
        self._buf[start:start + n] = np.frombuffer(c.data, np.uint8)
        self._have[c.index] = 1
        self._missing -= 1
        self.received_bytes += n
        if self._missing:
            return None
        buf = self._buf
        self.abandon()
        if hashlib.sha256(buf).digest() != m.sha256:
            # Every chunk matched the manifest's digests, so the manifest itself is inconsistent.
            raise ChunkError("chunk_total_mismatch", f"payload {m.id}: the chunks do not hash to the manifest's "
                                                     "SHA-256")
        return memoryview(buf).cast("B")

    def expire(self, now: float) -> ChunkError | None:
        """Drop a payload still incomplete at its deadline; the error says how much was missing."""
        m = self.manifest
        if m is None or now < self.deadline:
            return None
        missing = self._missing
        self.abandon()
        return ChunkError("chunk_incomplete", f"payload {m.id}: {missing} of {m.count} chunks missing at the deadline")

    def abandon(self) -> None:
        """Forget the payload in progress (and free its buffer)."""
        self.manifest = None
        self._buf = None
        self._have = bytearray()
        self._missing = 0
        self.received_bytes = 0
        self.deadline = math.inf


# --------------------------------------------------------------------------
# sending


@dataclass
class Outgoing:
    """The sender's state of one chunked payload: what is queued, in flight and acknowledged.

    ``messages[0]`` is the manifest message, ``messages[i + 1]`` builds chunk
    ``i``'s message on demand (so only the window is ever encoded at once).
    Acknowledged chunks are never sent again; chunks in flight are the MQTT
    client's to resend after a reconnect (paho does), so a resend request only
    sends what was never handed over.
    """

    manifest: Manifest
    pieces: list[memoryview]
    window: int = SEND_WINDOW
    acked: set[int] = field(default_factory=set)  # -1 is the manifest
    inflight: dict[int, int] = field(default_factory=dict)  # mid -> index

    @property
    def done(self) -> bool:
        return len(self.acked) == len(self.pieces) + 1

    def message(self, index: int) -> bytes:
        """The encoded message of ``index`` (-1: the manifest)."""
        if index < 0:
            return encode_manifest(self.manifest)
        m = self.manifest
        return encode_chunk(Chunk(fed=m.fed, round=m.round, sha256=m.sha256, index=index, data=self.pieces[index]))

    def due(self) -> list[int]:
        """What to hand to the MQTT client now: the manifest first, then chunks, within the window."""
        busy = set(self.inflight.values())
        room = self.window - len(self.inflight)
        out = []
        for i in range(-1, len(self.pieces)):
            if room <= 0:
                break
            if i not in self.acked and i not in busy:
                out.append(i)
                room -= 1
        return out

    def sent(self, index: int, mid: int) -> None:
        self.inflight[mid] = index

    def published(self, mid: int) -> bool:
        """The broker acknowledged ``mid``; True if it was one of ours."""
        index = self.inflight.pop(mid, None)
        if index is None:
            return False
        self.acked.add(index)
        return True


@dataclass
class Subscribe:
    """Action: subscribe to these topics (QoS 1); the broker then sends their retained messages."""

    topics: list[str]


@dataclass
class Unsubscribe:
    """Action: unsubscribe from these topics."""

    topics: list[str]
