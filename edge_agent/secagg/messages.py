"""Wire format of the secure-aggregation messages (docs/PROTOCOL.md §7), on the one codec of :mod:`edge_agent.wire`.

Device → aggregator, on ``fl/<fed>/update/<agent>`` (the only topic a device
may write besides its status): ``sa_keys``, ``sa_shares``, ``sa_masked``,
``sa_unmask``. Aggregator → one device, on ``fl/<fed>/agent/<agent>/inbox``:
``sa_peers``, ``sa_route``, ``sa_unmask_req``. Every message is a msgpack
map with ``v``, ``kind``, ``fed``, ``round``, ``attempt`` and the kind's
fields; binary fields are msgpack bin.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import msgpack
import numpy as np

from .. import wire

DEVICE_KINDS = ("sa_keys", "sa_shares", "sa_masked", "sa_unmask")
SERVER_KINDS = ("sa_peers", "sa_route", "sa_unmask_req")
PUBLIC_KEY_BYTES = 32
# A sealed share is nonce (12) + two 66-byte shares in a small msgpack map +
# tag (16), about 180 bytes; anything much larger is not one.
MAX_SEALED_BYTES = 512
SHARE_BYTES = 66


@dataclass
class SAKeys:
    """Stage 1: the device's two X25519 public keys (c: share encryption, s: mask agreement)."""

    fed: str
    round: int
    attempt: int
    agent: str
    c_pk: bytes
    s_pk: bytes


@dataclass
class SAShares:
    """Stage 2: one sealed pair of shares (mask key, self-mask seed) per peer, by peer id."""

    fed: str
    round: int
    attempt: int
    agent: str
    shares: dict[str, bytes]


@dataclass
class SAMasked:
    """Stage 3: the quantized update plus all masks, mod 2^bits, flattened in spec order."""

    fed: str
    round: int
    attempt: int
    agent: str
    masked: np.ndarray


@dataclass
class SAUnmask:
    """Stage 4: the shares the aggregator asked for: self-mask shares of survivors, key shares of dropouts."""

    fed: str
    round: int
    attempt: int
    agent: str
    self_shares: dict[str, bytes] = field(default_factory=dict)
    key_shares: dict[str, bytes] = field(default_factory=dict)


@dataclass
class SAPeers:
    """To one device: its peers (neighbours that advertised keys), id -> (c_pk, s_pk)."""

    fed: str
    round: int
    attempt: int
    peers: dict[str, tuple[bytes, bytes]]


@dataclass
class SARoute:
    """To one device: the sealed shares its peers addressed to it, by sender."""

    fed: str
    round: int
    attempt: int
    sealed: dict[str, bytes]


@dataclass
class SAUnmaskReq:
    """To one device: which of its peers sent a masked input (survivors) and which did not (dropped)."""

    fed: str
    round: int
    attempt: int
    survivors: list[str]
    dropped: list[str]


Message = SAKeys | SAShares | SAMasked | SAUnmask | SAPeers | SARoute | SAUnmaskReq
_KIND = {SAKeys: "sa_keys", SAShares: "sa_shares", SAMasked: "sa_masked", SAUnmask: "sa_unmask",
         SAPeers: "sa_peers", SARoute: "sa_route", SAUnmaskReq: "sa_unmask_req"}


def encode(msg: Message) -> bytes:
    """The msgpack payload of a secure-aggregation message."""
    m = {"v": wire.WIRE_VERSION, "kind": _KIND[type(msg)], "fed": msg.fed, "round": msg.round,
         "attempt": msg.attempt}
    if isinstance(msg, SAKeys):
        m.update(agent=msg.agent, c_pk=msg.c_pk, s_pk=msg.s_pk)
    elif isinstance(msg, SAShares):
        m.update(agent=msg.agent, shares=dict(msg.shares))
    elif isinstance(msg, SAMasked):
        m.update(agent=msg.agent, masked=wire.encode_array(np.asarray(msg.masked, dtype="<u4")))
    elif isinstance(msg, SAUnmask):
        m.update(agent=msg.agent, self_shares=dict(msg.self_shares), key_shares=dict(msg.key_shares))
    elif isinstance(msg, SAPeers):
        m.update(peers={a: [c, s] for a, (c, s) in msg.peers.items()})
    elif isinstance(msg, SARoute):
        m.update(sealed=dict(msg.sealed))
    else:
        m.update(survivors=list(msg.survivors), dropped=list(msg.dropped))
    return msgpack.packb(m, use_bin_type=True)


def _bin_map(r: wire.FieldReader, key: str, size: int | None, max_size: int) -> dict[str, bytes]:
    m = r.get(key, dict)
    for k, v in m.items():
        if not wire.valid_id(k) or not isinstance(v, bytes):
            raise wire.WireError("bad_field", f"{r.where}.{key} must map agent ids to binary")
        if (size is not None and len(v) != size) or len(v) > max_size:
            raise wire.WireError("bad_field", f"{r.where}.{key}[{k}] has {len(v)} bytes")
    return m


def _key(r: wire.FieldReader, key: str) -> bytes:
    v = r.get(key, bytes)
    if len(v) != PUBLIC_KEY_BYTES:
        raise wire.WireError("bad_key", f"{r.where}.{key} must be {PUBLIC_KEY_BYTES} bytes, got {len(v)}")
    return v


def _ids(r: wire.FieldReader, key: str) -> list[str]:
    v = r.get(key, list)
    if not all(wire.valid_id(a) for a in v) or len(set(v)) != len(v):
        raise wire.WireError("bad_field", f"{r.where}.{key} must be a list of distinct agent ids")
    return v


def decode(payload: bytes, *, fed: str, kinds: tuple[str, ...], max_bytes: int = wire.MAX_PAYLOAD_BYTES) -> Message:
    """Decode and check one secure-aggregation message of one of ``kinds``; WireError otherwise."""
    m = wire.unpack(payload, max_bytes)
    v = m.get("v")
    if not isinstance(v, int) or isinstance(v, bool) or v != wire.WIRE_VERSION:
        raise wire.WireError("bad_version", f"wire version {v!r}, this build speaks {wire.WIRE_VERSION}")
    kind = m.get("kind")
    if kind not in kinds:
        raise wire.WireError("wrong_kind", f"expected one of {kinds}, got {kind!r}")
    r = wire.FieldReader(m, kind)
    msg_fed = r.id("fed")
    if msg_fed != fed:
        raise wire.WireError("wrong_federation", f"message for federation {msg_fed!r}, expected {fed!r}")
    head = dict(fed=msg_fed, round=r.nonneg_int("round"), attempt=r.nonneg_int("attempt"))
    if kind == "sa_keys":
        return SAKeys(**head, agent=r.id("agent"), c_pk=_key(r, "c_pk"), s_pk=_key(r, "s_pk"))
    if kind == "sa_shares":
        return SAShares(**head, agent=r.id("agent"), shares=_bin_map(r, "shares", None, MAX_SEALED_BYTES))
    if kind == "sa_masked":
        arr = wire.decode_array(r.get("masked", dict), "sa_masked.masked")
        if arr.dtype.str != "<u4" or arr.ndim != 1:
            raise wire.WireError("bad_field", "sa_masked.masked must be a 1-d <u4 array")
        return SAMasked(**head, agent=r.id("agent"), masked=arr)
    if kind == "sa_unmask":
        return SAUnmask(**head, agent=r.id("agent"), self_shares=_bin_map(r, "self_shares", SHARE_BYTES, SHARE_BYTES),
                        key_shares=_bin_map(r, "key_shares", SHARE_BYTES, SHARE_BYTES))
    if kind == "sa_peers":
        peers = {}
        for a, pair in r.get("peers", dict).items():
            if not wire.valid_id(a) or not isinstance(pair, list) or len(pair) != 2 or not all(
                    isinstance(k, bytes) and len(k) == PUBLIC_KEY_BYTES for k in pair):
                raise wire.WireError("bad_key", "sa_peers.peers must map agent ids to [c_pk, s_pk] of 32 bytes each")
            peers[a] = (pair[0], pair[1])
        return SAPeers(**head, peers=peers)
    if kind == "sa_route":
        return SARoute(**head, sealed=_bin_map(r, "sealed", None, MAX_SEALED_BYTES))
    return SAUnmaskReq(**head, survivors=_ids(r, "survivors"), dropped=_ids(r, "dropped"))
