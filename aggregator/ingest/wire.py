"""Wire format between the coordinator and its ingest workers (docs/PROTOCOL.md §10).

Internal to the server side (devices never see these): a worker, one of
``[workers] count`` processes sharing ``$share/<group>/fl/<fed>/update/+``,
asks the coordinator whether it may count an update (``ingest_claim``), is
told yes or no (``ingest_grant``), and, when the coordinator closes the
round, answers ``ingest_collect`` with the weighted mean of what it counted
(``ingest_partial``). Same codec rules as every fedmqtt message: a msgpack
map with ``v``, ``kind``, ``fed``, ``round``; arrays as in §3.1.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import msgpack

from edge_agent import wire
from edge_agent.spec import ModelSpec
from edge_agent.topics import Topics

from ..broker_tier import SHARE_PREFIX

Params = wire.Params

KINDS = ("ingest_claim", "ingest_grant", "ingest_collect", "ingest_partial")
# Workers are numbered 0..MAX_WORKERS-1. Far more than one machine's cores:
# beyond that the broker tier, not ingest, is what needs scaling.
MAX_WORKERS = 64
# A grant's or claim's reason / a partial's agents: the wire limits.
MAX_REASON_LEN = 200


@dataclass
class Claim:
    """Worker → coordinator: may I count ``agent``'s update (checked and held by me) in round ``round``?"""

    fed: str
    round: int  # the update's round
    worker: int
    agent: str
    base: str
    num_samples: int
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class Grant:
    """Coordinator → worker: ``ok``: count the update in (round, attempt); else drop it, ``reason``."""

    fed: str
    round: int
    attempt: int
    agent: str
    ok: bool
    reason: str = ""
    run: int = 0  # the coordinator's run id (a reset federation starts a new sum even at the same round)


@dataclass
class Collect:
    """Coordinator → worker: the round closes; send your partial of (round, attempt)."""

    fed: str
    round: int
    attempt: int
    run: int = 0


@dataclass
class Partial:
    """Worker → coordinator: the weighted mean of the updates it counted in (round, attempt).

    ``weight`` is the sum of their FedAvg weights (sample counts, or one each
    for fedavg_unweighted), so the coordinator adds ``weight × delta``: the
    same sum flat FedAvg forms, to float32 rounding of the mean.
    """

    fed: str
    round: int
    attempt: int
    worker: int
    agents: list[str]
    weight: float
    clipped: int
    delta: Params
    # The worker's drop counters since it started, by reason (published by the
    # coordinator as rejected_<reason>, summed with its own).
    rejected: dict[str, int] = field(default_factory=dict)


Message = Claim | Grant | Collect | Partial
_KIND = {Claim: "ingest_claim", Grant: "ingest_grant", Collect: "ingest_collect", Partial: "ingest_partial"}


def encode(msg: Message) -> bytes:
    """The msgpack payload of an ingest message."""
    m: dict = {"v": wire.WIRE_VERSION, "kind": _KIND[type(msg)], "fed": msg.fed, "round": msg.round}
    if isinstance(msg, Claim):
        m.update(worker=msg.worker, agent=msg.agent, base=msg.base, num_samples=msg.num_samples,
                 metrics={k: float(v) for k, v in msg.metrics.items()})
    elif isinstance(msg, Grant):
        m.update(attempt=msg.attempt, agent=msg.agent, ok=bool(msg.ok), reason=msg.reason, run=msg.run)
    elif isinstance(msg, Collect):
        m.update(attempt=msg.attempt, run=msg.run)
    else:
        m.update(attempt=msg.attempt, worker=msg.worker, agents=list(msg.agents), weight=float(msg.weight),
                 clipped=msg.clipped, delta=wire.encode_params(msg.delta), rejected=dict(msg.rejected))
    return msgpack.packb(m, use_bin_type=True)


def decode(payload: bytes, *, expect: str, fed: str, spec: ModelSpec | None = None,
           max_bytes: int = wire.MAX_PAYLOAD_BYTES) -> Message:
    """Decode and check one ingest message of kind ``expect``; :class:`wire.WireError` for anything else."""
    m = wire.unpack(payload, max_bytes)
    if m.get("v") != wire.WIRE_VERSION or isinstance(m.get("v"), bool):
        raise wire.WireError("bad_version", f"wire version {m.get('v')!r}, this build speaks {wire.WIRE_VERSION}")
    kind = m.get("kind")
    if kind not in KINDS:
        raise wire.WireError("unknown_kind", f"kind {kind!r}")
    if kind != expect:
        raise wire.WireError("wrong_kind", f"expected {expect}, got {kind!r}")
    r = wire.FieldReader(m, kind)
    if r.id("fed") != fed:
        raise wire.WireError("wrong_federation", f"{kind} for federation {m['fed']!r}, expected {fed!r}")
    rnd = r.nonneg_int("round")
    if kind == "ingest_claim":
        return Claim(fed, rnd, _worker(r), r.id("agent"), r.text("base"), r.pos_int("num_samples"),
                     r.float_map("metrics"))
    attempt = r.nonneg_int("attempt")
    if kind == "ingest_grant":
        reason = r.text("reason", allow_empty=True)
        if len(reason) > MAX_REASON_LEN:
            raise wire.WireError("bad_field", f"{kind}.reason is longer than {MAX_REASON_LEN}")
        return Grant(fed, rnd, attempt, r.id("agent"), r.get("ok", bool), reason, _run(r))
    if kind == "ingest_collect":
        return Collect(fed, rnd, attempt, _run(r))
    worker = _worker(r)
    agents = r.get("agents", list)
    if not agents or not all(wire.valid_id(a) for a in agents) or len(set(agents)) != len(agents):
        raise wire.WireError("bad_field", f"{kind}.agents must be a non-empty list of distinct agent ids")
    clipped = r.nonneg_int("clipped")
    if clipped > len(agents):
        raise wire.WireError("bad_field", f"{kind}.clipped {clipped} exceeds its {len(agents)} updates")
    rejected = r.get("rejected", dict)
    if not all(isinstance(k, str) and 0 < len(k) <= MAX_REASON_LEN and isinstance(v, int) and not isinstance(v, bool)
               and v >= 0 for k, v in rejected.items()):
        raise wire.WireError("bad_field", f"{kind}.rejected must map reasons to counts >= 0")
    return Partial(fed, rnd, attempt, worker, agents, r.pos_float("weight"), clipped,
                   wire.decode_params(r.get("delta", dict), spec, f"{kind}.delta"), rejected)


def _run(r: wire.FieldReader) -> int:
    value = r.nonneg_int("run")
    if value > wire.MAX_RUN:
        raise wire.WireError("bad_field", f"{r.where}.run must be <= {wire.MAX_RUN}")
    return value


def _worker(r: wire.FieldReader) -> int:
    w = r.nonneg_int("worker")
    if w >= MAX_WORKERS:
        raise wire.WireError("bad_field", f"{r.where}.worker must be < {MAX_WORKERS}, got {w}")
    return w


@dataclass(frozen=True)
class IngestTopics:
    """Topics of the ingest workers of one federation: ``fl/<fed>/ingest/<worker>/...``."""

    topics: Topics

    @property
    def base(self) -> str:
        return f"{self.topics.prefix}/ingest"

    def shared_updates(self, group: str) -> str:
        """The shared subscription every worker takes: the broker hands each update to one of them."""
        return f"{SHARE_PREFIX}{group}/{self.topics.updates}"

    def claim(self, worker: int) -> str:
        return f"{self.base}/{worker}/claim"

    def partial(self, worker: int) -> str:
        return f"{self.base}/{worker}/partial"

    def status(self, worker: int) -> str:
        """The worker's retained online/offline status (its last will says offline)."""
        return f"{self.base}/{worker}/status"

    def control(self, worker: int) -> str:
        """Coordinator → one worker: grants and collects, on one topic so they arrive in order."""
        return f"{self.base}/{worker}/control"

    @property
    def from_workers(self) -> list[str]:
        """The coordinator's subscriptions: every worker's claims, partials and status."""
        return [f"{self.base}/+/claim", f"{self.base}/+/partial", f"{self.base}/+/status"]

    def parse(self, topic: str) -> tuple[str, int | None]:
        """("claim" | "partial" | "status" | "control", worker) or ("", None) for a topic not of this form."""
        head = self.base + "/"
        if not topic.startswith(head):
            return "", None
        parts = topic[len(head):].split("/")
        if (len(parts) == 2 and parts[1] in ("claim", "partial", "status", "control") and parts[0].isascii()
                and parts[0].isdigit() and (parts[0] == "0" or not parts[0].startswith("0"))
                and int(parts[0]) < MAX_WORKERS):
            return parts[1], int(parts[0])
        return "", None
