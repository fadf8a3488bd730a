"""The coordinator of a federation whose updates are read by ingest workers (docs/PROTOCOL.md §10).

With ``[workers] count = N`` the update stream is split by the broker
between N worker processes (``$share/<group>/fl/<fed>/update/+``,
:mod:`aggregator.ingest.worker`). Each decodes and checks its updates,
which is the work that grows with the fleet; this coordinator keeps every
decision that must be made in one place:

- **who counts**: a worker asks (``ingest_claim``) before it counts an
  update; the first claim of an agent in an attempt wins, so an update sent
  twice (an agent's outbox after a reconnect) and handed to two workers is
  counted once. A claim is journaled here before it is granted, so a
  restart resumes the round with the same participants;
- **when the round closes**: on the target or at the deadline with quorum,
  as in a flat federation. It then asks every worker holding grants for
  its partial (``ingest_collect``) and folds the partials into the round's
  strategy with :meth:`FedAvg.add_partial`: the same weighted sum as flat
  FedAvg, to float32 rounding of each partial mean.

A worker that crashes keeps what it acknowledged in its own journal and
answers after its restart (the broker's persistent session delivers it the
updates it had not acknowledged, and the collect). The coordinator waits for
a missing partial at most ``[workers] collect_timeout`` seconds; then the
updates it held count as dropouts, and the round closes with the rest if
they reach quorum, or is abandoned and re-run with a new selection.
Chunked updates (above the broker's packet limit) still come to this
process: the chunks of one payload must be reassembled in one place, and a
shared subscription would spread them over the workers.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Mapping

from edge_agent import wire
from edge_agent.mqtt import Publish

from . import wire as iw
from ..config import AggregatorConfig
from ..coordinator import DEFAULT_RUN, Action, Coordinator, Evaluator, Journal
from ..strategies import FedAvg, Strategy

log = logging.getLogger(__name__)

# A collect not answered yet (or answered by a partial that lacks some of the
# worker's grants) is asked again this often: the first may have reached a
# worker that died before it could answer, or overtaken a grant it asked again for.
COLLECT_RESEND_S = 1.0
# Grants and collects: QoS 1, in the worker's persistent session, so a worker
# that restarts finds the answers sent while it was down. (This is safe because
# a worker acknowledges an update as soon as its journal holds it, before it
# claims it: an update waiting for its grant does not occupy the worker's MQTT
# window, so the grant is never stuck behind a full window of such updates.)
CONTROL_QOS = 1
# The status id a worker announces itself with (wire.StatusMsg.agent).
WORKER_STATUS_PREFIX = "ingest-"


def worker_status_id(worker: int) -> str:
    """The ``agent`` field of worker ``worker``'s status message."""
    return f"{WORKER_STATUS_PREFIX}{worker}"


@dataclass
class _Grant:
    worker: int
    num_samples: int
    metrics: dict[str, float]


@dataclass
class _Collecting:
    """The open attempt is closing: partials asked for, not all in yet."""

    started: float
    until: float
    waiting: set[int]
    partials: dict[int, iw.Partial] = field(default_factory=dict)
    next_ask: float = 0.0


class IngestCoordinator(Coordinator):
    """A :class:`Coordinator` whose updates are counted by ingest workers and summed by them."""

    def __init__(
        self,
        config: AggregatorConfig,
        strategy: Strategy,
        evaluate: Evaluator | None = None,
        state: Mapping[str, Any] | None = None,
        journal: list[dict[str, Any]] | None = None,
        run: int = DEFAULT_RUN,
    ) -> None:
        if not isinstance(strategy, FedAvg):
            raise ValueError(f"ingest workers need a weighted-mean strategy, got {strategy.name!r}")
        super().__init__(config, strategy, evaluate, state, journal, run)
        self.ingest_topics = iw.IngestTopics(self.topics)
        self.n_workers = config.workers.count
        self.workers_online: set[int] = set()
        # The open attempt's worker-counted updates: agent -> who holds it (and its metrics).
        self.granted: dict[str, _Grant] = {}
        self.collecting: _Collecting | None = None
        # Each worker's own drop counters (cumulative), as last reported with a partial.
        self.worker_rejected: dict[int, dict[str, int]] = {}

    # -- events ---------------------------------------------------------------

    def start(self, now: float) -> list[Action]:
        actions = super().start(now)
        if self.open is not None and self.collecting is None and len(self.open.received) >= self.open.target:
            actions += self._close(now)  # the crash came between the last grant and its collect
        elif self.collecting is not None:
            actions += self._ask_partials(now)
        return actions

    def receive(self, topic: str, payload: bytes, now: float) -> list[Action]:
        kind, worker = self.ingest_topics.parse(topic)
        if not kind:
            return super().receive(topic, payload, now)
        self._now = now
        assert worker is not None
        if worker >= self.n_workers:
            return self._reject("unknown_worker", f"{kind} from worker {worker}; [workers] count = {self.n_workers}")
        if kind == "status":
            return self._on_worker_status(worker, payload, now)
        if kind == "claim":
            return self._on_claim(worker, payload, now)
        if kind == "partial":
            return self._on_partial(worker, payload, now)
        return []

    def tick(self, now: float) -> list[Action]:
        c = self.collecting
        if c is None:
            return super().tick(now)
        self._now = now
        o = self.open
        assert o is not None
        # Past the round's deadline a worker known to be down (its last will) is not
        # waited for: the round must not stall for a machine that may not come back.
        if not c.waiting or now >= c.until or (now >= o.deadline and c.waiting.isdisjoint(self.workers_online)):
            return self._finish(now)
        if now >= c.next_ask:
            return self._ask_partials(now)
        return []

    # -- what differs from a flat coordinator ------------------------------

    def _maybe_open(self, now: float) -> list[Action]:
        if not self.workers_online:
            return []  # nobody would read the updates (before the first worker subscribed they are not even queued)
        return super()._maybe_open(now)

    def _open_round(self, rnd: int, attempt: int, selected: list[str], target: int, now: float, deadline: float) -> None:
        super()._open_round(rnd, attempt, selected, target, now, deadline)
        self.granted = {}
        self.collecting = None

    def _abandon(self, now: float, why: str, replay: bool = False, charge: bool = False) -> list[Action]:
        self.granted = {}
        self.collecting = None
        return super()._abandon(now, why, replay, charge)

    def _on_update(self, agent: str | None, payload: bytes, now: float, replay: bool = False) -> list[Action]:
        """An update this process reads itself (a chunked one): refused once the round is closing."""
        if self.collecting is not None and not replay:
            return self._reject("round_closing", f"update from {agent}: round {self.open.round} is being summed up")
        return super()._on_update(agent, payload, now, replay)

    def _close(self, now: float) -> list[Action]:
        """Ask the workers for their partials first; the round closes when they are in (:meth:`_finish`)."""
        o = self.open
        assert o is not None
        if self.collecting is not None:
            return []
        if not self.granted:
            return super()._close(now)
        self._start_collecting(now)
        log.info("round %d attempt %d closing: asking %d worker(s) for their partial sums", o.round, o.attempt,
                 len(self.collecting.waiting))
        return [Journal({"type": "collect", "round": o.round, "attempt": o.attempt, "at": now}),
                *self._ask_partials(now)]

    def _start_collecting(self, now: float) -> None:
        """Wait for the partials of every worker holding a grant, at most ``[workers] collect_timeout``."""
        self.collecting = _Collecting(started=now, until=now + self.config.workers.collect_timeout,
                                      waiting={g.worker for g in self.granted.values()})

    def _held_by(self, worker: int) -> int:
        """How many of the open attempt's grants ``worker`` holds."""
        return sum(1 for g in self.granted.values() if g.worker == worker)

    def _metrics_msg(self, s):
        msg = super()._metrics_msg(s)
        totals = sum((Counter(counts) for counts in self.worker_rejected.values()), Counter())
        for reason, n in totals.items():
            key = f"rejected_{reason}"
            msg.metrics[key] = msg.metrics.get(key, 0.0) + float(n)
        return msg

    def _replay(self, records: list[dict[str, Any]], now: float) -> list[Action]:
        actions = super()._replay(records, now)
        o = self.open
        if o is None:
            return actions
        for rec in records:
            if (rec.get("round"), rec.get("attempt")) != (o.round, o.attempt):
                continue
            if rec.get("type") == "grant":
                agent = str(rec["agent"])
                o.received.add(agent)
                self.granted[agent] = _Grant(int(rec["worker"]), int(rec["num_samples"]), dict(rec["metrics"]))
                self.accepted += 1
            elif rec.get("type") == "collect" and self.granted:
                self._start_collecting(now)
        if self.granted:
            log.info("resumed round %d attempt %d: %d updates counted by workers%s", o.round, o.attempt,
                     len(self.granted), ", collecting their partials" if self.collecting else "")
        return actions

    # -- workers --------------------------------------------------------------

    def _on_worker_status(self, worker: int, payload: bytes, now: float) -> list[Action]:
        if not payload:
            return []
        try:
            msg = wire.decode(payload, expect="status", fed=self.config.federation)
        except wire.WireError as exc:
            return self._reject(exc.reason, f"status of worker {worker}: {exc.detail}")
        if msg.agent != worker_status_id(worker):
            return self._reject("identity_mismatch", f"status of worker {worker} names {msg.agent}")
        if msg.state == "online":
            if worker not in self.workers_online:
                log.info("ingest worker %d is online", worker)
            self.workers_online.add(worker)
            c = self.collecting
            if c is not None and worker in c.waiting:
                return self._ask_partials(now, only=worker)  # restarted while we wait for it
            return self._maybe_open(now)
        if worker in self.workers_online:
            held = self._held_by(worker)
            log.warning("ingest worker %d is offline%s", worker,
                        f" holding {held} updates of the open round" if held else "")
        self.workers_online.discard(worker)
        return []

    def _answer(self, worker: int, claim: iw.Claim, ok: bool, reason: str = "") -> Publish:
        o = self.open
        rnd, attempt = (o.round, o.attempt) if o is not None else (claim.round, self.attempt)
        grant = iw.Grant(self.config.federation, rnd, attempt, claim.agent, ok, reason, self.run)
        return Publish(self.ingest_topics.control(worker), iw.encode(grant), qos=CONTROL_QOS)

    def _deny(self, worker: int, claim: iw.Claim, reason: str, detail: str) -> list[Action]:
        self._reject(reason, f"update from {claim.agent} (via worker {worker}): {detail}")
        return [self._answer(worker, claim, False, reason)]

    def _on_claim(self, worker: int, payload: bytes, now: float) -> list[Action]:
        try:
            claim = iw.decode(payload, expect="ingest_claim", fed=self.config.federation)
        except wire.WireError as exc:
            return self._reject(exc.reason, f"claim from worker {worker}: {exc.detail}")
        assert isinstance(claim, iw.Claim)
        if claim.worker != worker:
            return self._reject("identity_mismatch", f"claim on worker {worker}'s topic names worker {claim.worker}")
        o = self.open
        if o is None:
            return self._deny(worker, claim, "no_open_round", f"for round {claim.round}")
        held = self.granted.get(claim.agent)
        if held is not None and held.worker == worker and claim.round == o.round and claim.base == self.version:
            # The same worker asks again: it reconnected or restarted and does not know whether its
            # first claim arrived. Still the one counted (also while the partials are collected:
            # its next partial will hold it).
            return [self._answer(worker, claim, True)]
        if self.collecting is not None:
            return self._deny(worker, claim, "round_closing", f"round {o.round} is being summed up")
        if claim.round != o.round:
            return self._deny(worker, claim, "wrong_round", f"for round {claim.round}, open is {o.round}")
        if claim.agent not in o.chosen:
            return self._deny(worker, claim, "not_selected", f"not selected in round {o.round}")
        if claim.base != self.version:
            return self._deny(worker, claim, "stale_base", f"on base {claim.base}, current {self.version}")
        if claim.agent in o.received:
            return self._deny(worker, claim, "duplicate", f"second update in round {o.round}")
        o.received.add(claim.agent)
        self.granted[claim.agent] = _Grant(worker, claim.num_samples, dict(claim.metrics))
        self.accepted += 1
        actions: list[Action] = [
            Journal({"type": "grant", "round": o.round, "attempt": o.attempt, "agent": claim.agent, "worker": worker,
                     "num_samples": claim.num_samples, "metrics": dict(claim.metrics), "at": now}),
            self._answer(worker, claim, True),
        ]
        if len(o.received) >= o.target:
            actions += self._close(now)
        return actions

    def _ask_partials(self, now: float, only: int | None = None) -> list[Action]:
        c, o = self.collecting, self.open
        assert c is not None and o is not None
        c.next_ask = now + COLLECT_RESEND_S
        body = iw.encode(iw.Collect(self.config.federation, o.round, o.attempt, self.run))
        return [Publish(self.ingest_topics.control(w), body, qos=CONTROL_QOS)
                for w in sorted(c.waiting) if only is None or w == only]

    def _on_partial(self, worker: int, payload: bytes, now: float) -> list[Action]:
        try:
            p = iw.decode(payload, expect="ingest_partial", fed=self.config.federation, spec=self.spec,
                          max_bytes=self._max_update_bytes)  # a partial is one model-sized delta, like an update
        except wire.WireError as exc:
            return self._reject(exc.reason, f"partial from worker {worker}: {exc.detail}")
        assert isinstance(p, iw.Partial)
        if p.worker != worker:
            return self._reject("identity_mismatch", f"partial on worker {worker}'s topic names worker {p.worker}")
        self.worker_rejected[worker] = dict(p.rejected)
        c, o = self.collecting, self.open
        if c is None or o is None or (p.round, p.attempt) != (o.round, o.attempt) or worker not in c.waiting:
            return []  # an answer to a collect already served (asked twice), or of an attempt gone: nothing to do
        if worker in c.partials and len(p.agents) <= len(c.partials[worker].agents):
            return []  # not newer than the one we have
        foreign = [a for a in p.agents if self.granted.get(a) is None or self.granted[a].worker != worker]
        if foreign:
            return self._reject("partial_mismatch", f"partial from worker {worker} sums updates it was not "
                                                    f"granted: {', '.join(sorted(foreign)[:5])}")
        c.partials[worker] = p
        if len(p.agents) < self._held_by(worker):
            # A grant it has not seen yet (lost, or still on its way): keep asking until the
            # partial holds them all or collect_timeout passes (then this one is used).
            return []
        c.waiting.discard(worker)
        if not c.waiting:
            return self._finish(now)
        return []

    def _finish(self, now: float) -> list[Action]:
        """Fold the partials that came in and close the round (or abandon it below quorum)."""
        c, o = self.collecting, self.open
        assert c is not None and o is not None
        self.collecting = None
        counted = {a for p in c.partials.values() for a in p.agents}
        lost = [a for a in self.granted if a not in counted]
        if lost:
            dead = sorted({self.granted[a].worker for a in lost})
            self.rejected["lost_with_worker"] += len(lost)
            log.warning("round %d attempt %d: %d updates held by worker(s) %s did not arrive within %.1f s; they "
                        "count as dropouts", o.round, o.attempt, len(lost), ", ".join(map(str, dead)),
                        now - c.started)
            for a in lost:
                o.received.discard(a)
        for a in counted:
            self._add_metrics(o, self.granted[a])  # type: ignore[arg-type]  (it has .metrics and .num_samples)
        self.granted = {}
        if len(o.received) < self.config.round.quorum or not o.received:
            return self._abandon(now, f"{len(lost)} updates lost with a worker, {len(o.received)} left")
        strategy = self.strategy
        assert isinstance(strategy, FedAvg)
        for p in c.partials.values():
            strategy.add_partial(p.delta, p.weight, len(p.agents), p.clipped)
        return super()._close(now)
