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
# A P-256 ECDSA signature in DER is at most 72 bytes.
MAX_SIGNATURE_BYTES = 80
# A provisioned device certificate in DER is about 550 bytes; a few kB leaves
# room for longer names without letting one device flood its peers' inboxes.
MAX_CERT_BYTES = 4096


@dataclass
class SAKeys:
    """Stage 1: the device's two X25519 public keys (c: share encryption, s: mask agreement).

    In a provisioned federation also ``sig``, the device's signature over
    them, and ``cert``, its certificate (DER); see :mod:`.identity`.
    """

    fed: str
    round: int
    attempt: int
    agent: str
    c_pk: bytes
    s_pk: bytes
    sig: bytes = b""
    cert: bytes = b""


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
    """To one device: its peers (neighbours that advertised keys), id -> (c_pk, s_pk[, sig, cert])."""

    fed: str
    round: int
    attempt: int
    peers: dict[str, tuple[bytes, ...]]


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
        if msg.sig or msg.cert:
            m.update(sig=msg.sig, cert=msg.cert)
    elif isinstance(msg, SAShares):
        m.update(agent=msg.agent, shares=dict(msg.shares))
    elif isinstance(msg, SAMasked):
        m.update(agent=msg.agent, masked=wire.encode_array(np.asarray(msg.masked, dtype="<u4")))
    elif isinstance(msg, SAUnmask):
        m.update(agent=msg.agent, self_shares=dict(msg.self_shares), key_shares=dict(msg.key_shares))
    elif isinstance(msg, SAPeers):
        m.update(peers={a: list(keys) for a, keys in msg.peers.items()})
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


def _proof(sig: bytes, cert: bytes, where: str) -> tuple[bytes, bytes]:
    """A signature and certificate of a key advertisement, bounded in size (both empty: unsigned)."""
    if len(sig) > MAX_SIGNATURE_BYTES or len(cert) > MAX_CERT_BYTES or bool(sig) != bool(cert):
        raise wire.WireError("bad_field", f"{where}: sig (<= {MAX_SIGNATURE_BYTES} bytes) and cert "
                                          f"(<= {MAX_CERT_BYTES} bytes) come together")
    return sig, cert


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
        sig, cert = _proof(r.optional("sig", bytes, b""), r.optional("cert", bytes, b""), r.where)
        return SAKeys(**head, agent=r.id("agent"), c_pk=_key(r, "c_pk"), s_pk=_key(r, "s_pk"), sig=sig, cert=cert)
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
        for a, keys in r.get("peers", dict).items():
            if not wire.valid_id(a) or not isinstance(keys, list) or len(keys) not in (2, 4) or not all(
                    isinstance(k, bytes) for k in keys) or any(len(k) != PUBLIC_KEY_BYTES for k in keys[:2]):
                raise wire.WireError("bad_key", "sa_peers.peers must map agent ids to [c_pk, s_pk] of 32 bytes "
                                                "each, or [c_pk, s_pk, sig, cert]")
            proof = _proof(keys[2], keys[3], f"{r.where}.peers[{a}]") if len(keys) == 4 else ()
            peers[a] = (keys[0], keys[1], *proof)
        return SAPeers(**head, peers=peers)
    if kind == "sa_route":
        return SARoute(**head, sealed=_bin_map(r, "sealed", None, MAX_SEALED_BYTES))
    return SAUnmaskReq(**head, survivors=_ids(r, "survivors"), dropped=_ids(r, "dropped"))
