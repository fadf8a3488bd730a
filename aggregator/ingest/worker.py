"""An ingest worker: one of ``[workers] count`` processes that read a federation's updates (docs/PROTOCOL.md §10).

The broker splits ``$share/<group>/fl/<fed>/update/+`` between the workers.
For each update a worker does what grows with the fleet, the work a flat
aggregator does in its one process: decode and check it (codec, model
shape, identity, norm bound, rate limit), journal it and acknowledge it,
then ask the coordinator whether it counts
(:class:`~aggregator.ingest.wire.Claim`). Granted, it folds it into its
weighted sum (reading the payload back from its journal) and journals the
grant. When the coordinator closes the round it answers with its partial:
the weighted mean of its updates and the sum of their weights.

Acknowledging before the answer, not after, is what keeps a worker's MQTT
window open: the broker counts unacknowledged messages against it, and a
worker holding the acks of updates waiting for grants would stop receiving
the grants themselves (a deadlock at the window's size, seen in
bench/bench_workers.py), or push the backlog into the broker's queue, which
mosquitto bounds by bytes and then drops from.

Crash recovery: the journal holds every update the worker acknowledged and
every grant; a restart folds the granted ones of the current attempt again
and claims the others again. The broker's persistent session
(``[workers] session_expiry``) delivers what it had not acknowledged and
the coordinator's grants and collects sent meanwhile.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import numpy as np

from edge_agent import __version__, chunking, wire
from edge_agent.config import BrokerConfig
from edge_agent.mqtt import Connection, Loop, Publish
from edge_agent.ratelog import RejectionLog
from edge_agent.topics import Topics

from . import wire as iw
from ..config import AggregatorConfig
from ..coordinator import norm_problem
from .coordinator import worker_status_id
from ..journal import JournalFile
from ..ratelimit import TokenBuckets
from ..strategies import FedAvg

log = logging.getLogger(__name__)

# The worker's MQTT Receive Maximum: the aggregator's (the MQTT 5 maximum). A
# worker acknowledges each update once its journal holds it, so the window
# only bounds what is on the way; a smaller one would leave the backlog of a
# burst in the broker's per-client queue, which mosquitto caps at
# max_queued_bytes and then drops from (a burst of 4 MB updates above 64
# per worker lost updates in the bench with a window of 32).
WORKER_RECEIVE_MAXIMUM = 65535
# The journal is a sequence of segment files, journal-<n>.bin: a new attempt
# starts a new segment and deletes the old ones that hold no update still
# waiting for an answer. So a burst that arrives before its round's first
# grant (grants queue behind the updates on the worker's socket) costs no
# copying, and the disk holds about the last two attempts. (Rewriting the
# journal to the waiting updates instead copied a whole burst: 1.4 GB RSS
# for 128 updates of 4 MB to one worker.)
# Decoded updates kept in memory while they wait for their grant (their arrays
# are views of the payload, so about the payload bytes). Beyond this a waiting
# update is read back from the journal and decoded again when granted: a burst
# costs disk reads, not unbounded memory; the usual wait (a claim's round
# trip, about a millisecond) costs neither.
MAX_PENDING_BYTES = 64 * 1024 * 1024
SEGMENT_PREFIX = "journal-"
SEGMENT_SUFFIX = ".bin"


def worker_state_dir(config: AggregatorConfig, index: int) -> Path:
    """Where worker ``index`` keeps its journal: ``<[workers] state_dir or state_dir>/worker-<index>``.

    Always a directory of its own: two workers writing one journal would
    corrupt each other's (spawned workers share one config).
    """
    return Path(config.workers.state_dir or config.state_dir) / f"worker-{index}"


def worker_broker(config: AggregatorConfig, index: int) -> BrokerConfig:
    """Worker ``index``'s broker login: ``<[workers] username>-<index>`` if set, else ``[broker]``'s."""
    w = config.workers
    if not w.username:
        return config.broker
    return replace(config.broker, username=f"{w.username}-{index}", password="", password_file=w.password_file)


@dataclass
class _Pending:
    """An update checked, journaled and acknowledged, claimed and not yet answered."""

    segment: int  # its "held" record: journal segment and offset in it
    offset: int
    claim: bytes
    # While within MAX_PENDING_BYTES: the payload and its decoded message (whose arrays are views of it).
    payload: bytes | None = None
    msg: wire.UpdateMsg | None = None


class IngestWorker:
    """Worker ``index`` of a federation, on a :class:`~edge_agent.mqtt.Loop`."""

    def __init__(self, config: AggregatorConfig, index: int, loop: Loop,
                 clock: Callable[[], float] = time.time, on_ready: Callable[[], None] | None = None) -> None:
        """``on_ready``: called once, when the broker first accepted the worker (systemd READY=1)."""
        if not 0 <= index < config.workers.count:
            raise ValueError(f"worker index {index} is outside 0..{config.workers.count - 1} ([workers] count)")
        self.config = config
        self.index = index
        self.loop = loop
        self.clock = clock
        self.fed = config.federation
        self.spec = config.model.spec()
        self.topics = Topics(self.fed)
        self.ingest_topics = iw.IngestTopics(self.topics)
        self._max_update_bytes = max(wire.MAX_PAYLOAD_BYTES, chunking.payload_bound(self.spec.num_params()))
        # The same weighting and clipping as the coordinator's strategy, applied per update here.
        self.sum = FedAvg(weighted=config.strategy.name != "fedavg_unweighted", clip_norm=config.strategy.clip_norm)
        self._zeros = {k: np.zeros(s, dtype=np.float32) for k, s in self.spec.param_shapes().items()}
        self.sum.begin(self._zeros)
        # (run, round, attempt) the sum and the journal are of: a reset federation (a new
        # run id) restarts round numbers, and its round 1 is not the old run's.
        self.attempt_key: tuple[int, int, int] | None = None
        # The agents summed in that attempt, in the order they were (a dict: ordered, and O(1) to ask).
        self.counted: dict[str, None] = {}
        self.pending: dict[str, _Pending] = {}
        self._pending_bytes = 0  # of the decoded ones in memory
        self.rejected: Counter[str] = Counter()
        self._rejection_log = RejectionLog(log, "dropped")
        self._rate = TokenBuckets(config.security.rate_limit, config.security.rate_burst)
        self.fatal: str | None = None
        self.on_ready = on_ready
        self.journal_dir = worker_state_dir(config, index)
        self.segments: dict[int, JournalFile] = {}
        self._replay()
        self._online = self._status("online")
        self.conn = Connection(
            loop, worker_broker(config, index), client_id=f"fedmqtt-ingest-{self.fed}-{index}", handler=self,
            will=self._status("offline"), clean_start=False, session_expiry_s=config.workers.session_expiry,
            manual_ack=True, receive_maximum=WORKER_RECEIVE_MAXIMUM,
        )

    def _status(self, state: str) -> Publish:
        msg = wire.StatusMsg(fed=self.fed, round=0, agent=worker_status_id(self.index), state=state,
                             capabilities=["ingest"], software=f"fedmqtt {__version__}", eligible=False)
        return Publish(self.ingest_topics.status(self.index), wire.encode(msg), qos=1, retain=True)

    def start(self) -> None:
        """Connect (from the loop thread or before the loop runs)."""
        self.conn.open()

    # -- Handler protocol ---------------------------------------------------------

    def subscriptions(self) -> list[str]:
        return [self.ingest_topics.shared_updates(self.config.workers.group), self.ingest_topics.control(self.index)]

    def on_connected(self, conn: Connection) -> None:
        conn.publish(self._online)
        # Claims of a connection that dropped, or of an earlier run of this process,
        # may not have reached the coordinator: ask again (it answers a repeat the same).
        for p in self.pending.values():
            conn.publish(Publish(self.ingest_topics.claim(self.index), p.claim, qos=1))
        if self.on_ready is not None:
            self.on_ready()
            self.on_ready = None
        log.info("ingest worker %d of federation %s connected (%d updates of round %s in its journal)",
                 self.index, self.fed, len(self.counted), self.attempt_key[1] if self.attempt_key else "-")

    def on_fatal(self, conn: Connection, problem: str) -> None:
        self._stop_for_good(f"broker: {problem}")

    def on_too_large(self, conn: Connection, msg: Publish, size: int) -> None:
        if msg.topic == self.ingest_topics.partial(self.index):
            self._stop_for_good(f"broker: the partial sum of {size} bytes exceeds the broker's maximum packet size "
                                f"of {conn.max_packet_size} bytes: raise max_packet_size to at least 4 bytes per "
                                "parameter plus 64 KiB, or run without workers")

    def _stop_for_good(self, problem: str) -> None:
        self.fatal = problem
        log.error("ingest worker %d stops: %s", self.index, problem)
        self.loop.stop()

    @property
    def journal(self) -> JournalFile:
        """The segment new records go to."""
        return self.segments[max(self.segments)]

    def flush(self, conn: Connection | None = None) -> None:
        """Make the journal durable (an fsync per segment written to): the Connection calls this before acks."""
        for j in self.segments.values():
            if j.unsynced_records:
                try:
                    j.sync()
                except OSError as exc:
                    self._stop_for_good(f"journal {j.path}: {exc.strerror or exc}")
                    raise

    def on_message(self, conn: Connection, topic: str, payload: bytes, props: dict[str, str]) -> None:
        if topic == self.ingest_topics.control(self.index):
            self._on_control(payload)
            return
        kind, agent = self.topics.parse(topic)
        if kind == "update" and agent is not None:
            self._on_update(conn, agent, payload)

    # -- updates --------------------------------------------------------------------

    def _reject(self, reason: str, detail: str) -> None:
        self.rejected[reason] += 1
        self._rejection_log.log(reason, detail)

    def _on_update(self, conn: Connection, agent: str, payload: bytes) -> None:
        if not self._rate.allow(agent, self.clock()):
            return self._reject("rate_limited", f"update from {agent}: more than the agent's message rate")
        try:
            msg = self._decode(payload)
        except wire.WireError as exc:
            return self._reject(exc.reason, f"update from {agent}: {exc.detail}")
        if msg.agent != agent:
            return self._reject("identity_mismatch", f"update on {agent}'s topic names {msg.agent}")
        if agent in self.pending:
            return self._reject("duplicate", f"second update from {agent} while its first waits for the coordinator")
        too_large = norm_problem(msg.delta, self.config.security.max_update_norm)
        if too_large:
            return self._reject("norm_too_large", f"update from {agent} {too_large}")
        claim = iw.encode(iw.Claim(self.fed, msg.round, self.index, agent, msg.base, msg.num_samples, msg.metrics))
        segment = max(self.segments)
        offset = self.journal.size
        # Acknowledged at the end of this read pass, after the fsync that makes this durable.
        self.journal.append({"type": "held", "agent": agent, "payload": bytes(payload), "at": self.clock()},
                            sync=False)
        p = self.pending[agent] = _Pending(segment, offset, claim)
        if self._pending_bytes + len(payload) <= MAX_PENDING_BYTES:
            p.payload, p.msg = bytes(payload), msg
            self._pending_bytes += len(p.payload)
        conn.publish(Publish(self.ingest_topics.claim(self.index), claim, qos=1))

    def _on_control(self, payload: bytes) -> None:
        try:
            try:
                m = iw.decode(payload, expect="ingest_grant", fed=self.fed)
            except wire.WireError as exc:
                if exc.reason != "wrong_kind":
                    raise
                m = iw.decode(payload, expect="ingest_collect", fed=self.fed)
        except wire.WireError as exc:
            return self._reject(exc.reason, f"control message: {exc.detail}")
        if isinstance(m, iw.Collect):
            self._on_collect(m)
        else:
            assert isinstance(m, iw.Grant)
            self._on_grant(m)

    def _begin(self, key: tuple[int, int, int]) -> None:
        """A new (run, round, attempt): the old sum is of an attempt that closed or was abandoned.

        New records go to a new journal segment; the old segments go, except
        those holding updates still waiting for an answer (they may count in
        the new attempt).
        """
        self.attempt_key = key
        self.sum.begin(self._zeros)
        self.counted = {}
        self._new_segment()

    def _new_segment(self) -> None:
        n = max(self.segments, default=-1) + 1
        self.segments[n] = self._segment(n)
        needed = {p.segment for p in self.pending.values()} | {n}
        for old in [k for k in self.segments if k not in needed]:
            j = self.segments.pop(old)
            j.close()
            j.path.unlink(missing_ok=True)

    def _segment(self, n: int) -> JournalFile:
        return JournalFile(self.journal_dir, f"{SEGMENT_PREFIX}{n}{SEGMENT_SUFFIX}")

    def _on_grant(self, g: iw.Grant) -> None:
        p = self.pending.pop(g.agent, None)
        if p is None:
            return  # a repeated answer (the claim was sent again) of an update summed already
        if p.payload is not None:
            self._pending_bytes -= len(p.payload)
        key = (g.run, g.round, g.attempt)
        if not g.ok:
            return self._reject(g.reason or "refused", f"update from {g.agent}: refused by the coordinator")
        if self.attempt_key is not None and key[0] == self.attempt_key[0] and key < self.attempt_key:
            # (control messages arrive in order: only an earlier life of this worker could see this)
            return self._reject("wrong_round", f"update from {g.agent}: granted for {key}, summing {self.attempt_key}")
        payload = p.payload if p.payload is not None else self.segments[p.segment].read(p.offset)["payload"]
        record = {"type": "granted", "run": g.run, "round": g.round, "attempt": g.attempt, "agent": g.agent}
        if key != self.attempt_key:
            self._begin(key)
            record["payload"] = payload  # its "held" record may have gone with the old attempt's segment
        if g.agent in self.counted:
            return
        self.journal.append(record, sync=False)  # durable with the read pass's fsync, before its acks
        self._fold(p.msg if p.msg is not None else self._decode(payload))

    def _decode(self, payload: bytes) -> wire.UpdateMsg:
        msg = wire.decode(payload, expect="update", fed=self.fed, spec=self.spec, max_bytes=self._max_update_bytes)
        assert isinstance(msg, wire.UpdateMsg)
        return msg

    def _fold(self, msg: wire.UpdateMsg) -> None:
        self.sum.add(msg.delta, float(msg.num_samples))
        self.counted[msg.agent] = None

    def _on_collect(self, c: iw.Collect) -> None:
        if (c.run, c.round, c.attempt) != self.attempt_key or not self.counted:
            return  # nothing of that attempt here (the coordinator asks only workers it granted updates to)
        mean, weight = self.sum.share()
        partial = iw.Partial(self.fed, c.round, c.attempt, self.index, list(self.counted), weight, self.sum.clipped,
                             mean, dict(self.rejected))
        self.conn.publish(Publish(self.ingest_topics.partial(self.index), iw.encode(partial), qos=1))
        log.info("round %d attempt %d: partial of %d updates (weight %g) sent", c.round, c.attempt,
                 len(self.counted), weight)

    def _replay(self) -> None:
        """After a restart: fold the granted updates of the journal's last attempt, claim the others again."""
        numbers = (f.name[len(SEGMENT_PREFIX):-len(SEGMENT_SUFFIX)]
                   for f in self.journal_dir.glob(f"{SEGMENT_PREFIX}*{SEGMENT_SUFFIX}"))
        found = sorted(int(n) for n in numbers if n.isdigit())
        held: dict[str, tuple[int, int, bytes]] = {}  # agent -> (segment, offset, payload)
        granted: dict[str, bytes] = {}
        for n in found:
            self.segments[n] = j = self._segment(n)
            for offset, rec in j.load_with_offsets():
                agent = rec.get("agent")
                if rec.get("type") == "held":
                    held[agent] = (n, offset, rec["payload"])
                elif rec.get("type") == "granted":
                    key = (int(rec["run"]), int(rec["round"]), int(rec["attempt"]))
                    if key != self.attempt_key:
                        self.attempt_key, granted = key, {}
                    waiting = held.pop(agent, None)
                    payload = rec.get("payload") or (waiting[2] if waiting else None)
                    if payload is not None:
                        granted.setdefault(agent, payload)
        for payload in granted.values():
            self._fold(self._decode(payload))
        for agent, (n, offset, payload) in held.items():
            msg = self._decode(payload)
            claim = iw.encode(iw.Claim(self.fed, msg.round, self.index, agent, msg.base, msg.num_samples, msg.metrics))
            self.pending[agent] = _Pending(n, offset, claim)
        if not self.segments:
            self._new_segment()
        if self.counted or self.pending:
            log.info("ingest worker %d resumed with %d journaled updates of round %s counted and %d waiting for "
                     "the coordinator", self.index, len(self.counted),
                     self.attempt_key[1] if self.attempt_key else "-", len(self.pending))
