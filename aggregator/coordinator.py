"""The round coordinator: the aggregator's protocol logic, sans I/O.

Events in, actions out, as h11 does for HTTP: :meth:`Coordinator.start`,
:meth:`Coordinator.receive` (a message arrived) and :meth:`Coordinator.tick`
(time passed) each take the current time as an argument and return a list
of actions (:class:`Publish`, :class:`Journal`, :class:`SaveCheckpoint`,
:class:`RoundClosed`, :class:`RoundAbandoned`, :class:`Finished`) for the
adapter to carry out in order. There is no socket, thread or clock in here,
so every rule below has a fast deterministic unit test and runs unchanged
over a real broker.

Synchronous rounds (DESIGN.md §4, after Bonawitz et al. 2019):
- a round opens when at least ``min_agents`` eligible agents are online. The
  target is ``agents_per_round`` updates (or ``fraction`` of the eligible
  agents, or all of them); ``over_select`` times the target are selected by a
  seeded sample and recorded in the journal; each selected agent gets a
  retained ``selected`` notice on its own topic, then the task (which lists
  nobody) is published; every other agent gets a pace-steering hint of when
  to look again;
- an update is accepted only if it is well-formed, for the open round, from a
  selected agent, on the current base version, the first from that agent,
  and came on the topic of the agent it names; everything else is dropped
  with a counted reason and changes nothing;
- a round closes when the target number of updates has arrived, or at the
  deadline if at least ``quorum`` arrived; otherwise it is abandoned and
  re-run as a new attempt with a new selection;
- every opening and every accepted update is journaled (the adapter fsyncs
  it before acknowledging the message to the broker), and closing
  checkpoints before it publishes the new model, so a restart resumes the
  open round with the updates it had accepted.

Asynchronous mode (FedBuff, Nguyen et al. 2022): every eligible agent trains
on each new model; updates on any of the last ``max_staleness`` versions are
accepted with weight ``n · (1 + s)^-p`` (s = versions behind), and every
``buffer`` accepted updates make a new model. Same messages, same journal.
"""

from __future__ import annotations

import bisect
import logging
import math
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Mapping

import numpy as np

from edge_agent import chunking, dp, wire
from edge_agent.mqtt import Publish
from edge_agent.ratelog import RejectionLog
from edge_agent.topics import Topics

from .config import AggregatorConfig
from .ratelimit import TokenBuckets
from .strategies import Strategy

log = logging.getLogger(__name__)

Params = dict[str, np.ndarray]
Evaluator = Callable[[Mapping[str, np.ndarray]], dict[str, float]]

# Closed-round summaries kept in memory and in the checkpoint. A year of
# hourly rounds; beyond that metrics belong in the metrics store, not here.
MAX_HISTORY = 10_000
# Rounds whose durations feed the pace-steering estimate of the next round.
PACE_WINDOW = 5
# Agent-reported metrics averaged per round: only these name prefixes (the
# aggregator's own names cannot be spoofed) and at most this many names (the
# metrics message must stay within the codec's map limit).
AGENT_METRIC_PREFIXES = ("eval_", "train_")
MAX_AGENT_METRICS = 32
# Secure aggregation needs a threshold t >= 2 of a device's peers and t + 1 devices.
MIN_SECAGG_DEVICES = 3
# What a DP federation's metrics message publishes besides test_* (central
# evaluation): the privacy figures and the released clip norm.
PUBLIC_DP_METRICS = ("epsilon", "epsilon_budget", "delta", "noise_multiplier", "sampling_rate", "clip")
# Async mode remembers this many model versions beyond the accepted
# staleness, so that an old update is reported as too_stale rather than as
# built on an unknown base.
EXTRA_VERSIONS = 10
# The run id of a coordinator built without one (tests, in-process
# experiments: no agent there ever sees two runs). 0 would mean "a sender
# that predates run ids" on the wire.
DEFAULT_RUN = 1


def run_id(now: float) -> int:
    """The run id of a federation state created at ``now`` (Unix seconds): its milliseconds.

    Agents refuse a model or task of a lower run than one they accepted
    (replay protection), so a federation reset later gets a larger id.
    """
    return int(now * 1000)


def norm_problem(delta: Mapping[str, np.ndarray], bound: float) -> str | None:
    """Why ``delta`` breaks ``[security] max_update_norm`` = ``bound`` (0: no bound), or None."""
    if not bound:
        return None
    norm = dp.l2_norm(delta)
    return f"has norm {norm:.3g} > {bound:g}" if norm > bound else None


@dataclass
class AgentInfo:
    """What the aggregator knows of one agent from its retained status."""

    online: bool
    eligible: bool
    num_samples: int
    capabilities: list[str]
    reason: str = ""
    round: int = 0


@dataclass
class RoundSummary:
    """One closed round, as published in ``metrics`` and written to metrics.csv."""

    round: int
    attempt: int
    selected: int
    participants: int
    version: str
    opened_at: float
    closed_at: float
    metrics: dict[str, float] = field(default_factory=dict)

    @property
    def seconds(self) -> float:
        return self.closed_at - self.opened_at


@dataclass
class SaveCheckpoint:
    """Action: make this state durable (and start a new journal) before anything else is published."""

    state: dict[str, Any]


@dataclass
class Journal:
    """Action: append this record to the journal and make it durable before going on."""

    record: dict[str, Any]


@dataclass
class RoundClosed:
    """Action (notification): a round closed."""

    summary: RoundSummary


@dataclass
class RoundAbandoned:
    """Action (notification): a round reached its deadline short of quorum."""

    round: int
    attempt: int
    received: int
    quorum: int


@dataclass
class Finished:
    """Action (notification): the federation is over (rounds done, or the privacy budget spent)."""

    round: int
    reason: str = ""


Action = Publish | Journal | SaveCheckpoint | RoundClosed | RoundAbandoned | Finished


@dataclass
class _OpenRound:
    round: int
    attempt: int
    selected: list[str]
    target: int
    opened_at: float
    deadline: float  # math.inf in async mode
    received: set[str] = field(default_factory=set)
    # weighted sums of agent-reported metrics: name -> (sum of w*value, sum of w)
    metric_sums: dict[str, list[float]] = field(default_factory=dict)
    stale_sum: float = 0.0
    q: float = 1.0  # DP sampling rate of this round's selection
    # The selection as a set: every update asks "is its sender selected?", and a
    # list would make that O(N) per update, O(N^2) per round of N devices.
    chosen: set[str] = field(init=False)

    def __post_init__(self) -> None:
        self.chosen = set(self.selected)

    def admit(self, agent: str) -> None:
        """Add ``agent`` to the selection (async newcomers), keeping it sorted."""
        if agent not in self.chosen:
            bisect.insort(self.selected, agent)
            self.chosen.add(agent)


class Coordinator:
    """Round protocol state machine of one federation."""

    def __init__(
        self,
        config: AggregatorConfig,
        strategy: Strategy,
        evaluate: Evaluator | None = None,
        state: Mapping[str, Any] | None = None,
        journal: list[dict[str, Any]] | None = None,
        run: int = DEFAULT_RUN,
    ) -> None:
        """``run``: the run id a fresh state (or a checkpoint older than run ids) takes;
        the adapter passes :func:`run_id` of its clock, a checkpoint keeps it."""
        if not 0 < run <= wire.MAX_RUN:
            raise ValueError(f"run id {run} out of range 1..{wire.MAX_RUN}")
        self.config = config
        self.strategy = strategy
        self.evaluate = evaluate
        self.spec = config.model.spec()
        self.topics = Topics(config.federation)
        self.async_mode = config.round.mode == "async"
        self.agents: dict[str, AgentInfo] = {}
        # The agents that are online and eligible, kept with every status: an
        # opening needs them sorted, but counting them on each of N statuses
        # while a fleet comes online would cost O(N^2).
        self._usable_ids: set[str] = set()
        # Largest update payload decoded: one packet, or a chunked update of this model's size.
        self._max_update_bytes = max(wire.MAX_PAYLOAD_BYTES, chunking.payload_bound(self.spec.num_params()))
        self.open: _OpenRound | None = None
        # Async: agent@base keys of updates already applied in earlier
        # versions, so a redelivered copy is not counted twice.
        self.async_applied: set[str] = set()
        # Per-agent token buckets ([security] rate_limit, rate_burst).
        self._rate = TokenBuckets(config.security.rate_limit, config.security.rate_burst)
        self.rejected: Counter[str] = Counter()
        # Log lines of rejections are thinned per reason (the counter above stays
        # exact); its clock is the time of the last event, so no wall clock here.
        self._now = 0.0
        self._rejection_log = RejectionLog(log, "dropped", clock=lambda: self._now)
        self.accepted = 0
        self.finished = False
        self._journal_backlog = list(journal or [])
        self.secagg = None  # the open round's secure aggregation (aggregator/secagg.py), if on
        # In a provisioned federation the adapter sets this to a
        # PeerVerifier (edge_agent/secagg/identity.py): key advertisements
        # must then be signed by the device's certificate.
        self.secagg_verifier: object | None = None
        self._history_dicts: list[dict[str, Any]] = []  # asdict() of self.history, for snapshots
        self.privacy = None
        if config.privacy.enabled:
            from .privacy import PrivacyEngine

            self.privacy = PrivacyEngine(config, (state or {}).get("privacy"))
            if not config.secagg.enabled:
                # (with secure aggregation the devices add the noise inside
                # the masked sum: the distributed discrete Gaussian)
                self.strategy = self.privacy.wrap(strategy)
        self.run = run
        # A run id that no checkpoint holds yet: start() saves it before any
        # message carries it.
        self._run_unsaved = state is None or "run" not in state
        if state is None:
            log.info("federation %s: new run %d", config.federation, run)
            self.round = 0
            # A user's init_params is checked like their fit: float32, every name, the spec's shapes.
            model = config.model.build()
            self.params: Params = model.check_params(model.init_params(config.model.seed), f"{model.kind} init_params")
            self.rng = np.random.default_rng(config.round.seed)
            self.attempt = 0
            self.history: list[RoundSummary] = []
            self.recent_versions: dict[str, int] = {}
        else:
            self._restore(state)
        self.version = wire.params_version(self.params)
        self.recent_versions[self.version] = self.round

    # -- events ---------------------------------------------------------------

    def start(self, now: float) -> list[Action]:
        """Announce the current model, resume a journaled round, or open one if agents are there."""
        actions: list[Action] = []
        if self._run_unsaved and not self._journal_backlog:
            # Agents refuse a lower run than one they accepted: the run id must
            # survive a restart (a new one would look like a reset federation),
            # so it is checkpointed before a model or task carries it. (With a
            # journal to replay, resetting it would lose the journaled updates;
            # the next close checkpoints the run id instead.)
            self._run_unsaved = False
            actions.append(SaveCheckpoint(self.snapshot()))
        actions.append(self.model_publish())
        if self._rounds_done():
            self.finished = True
            return actions + [self._task_done(), Finished(self.round)]
        if self._journal_backlog:
            actions += self._replay(self._journal_backlog, now)
            self._journal_backlog = []
        if any(isinstance(a, Publish) and a.topic == self.topics.task for a in actions):
            return actions
        if self.open is not None and self.config.secagg.enabled:
            # The round's secrets were in this process's memory only (and the
            # devices' keys were for it): nothing of it can be finished. It is
            # abandoned cleanly and re-run; no partial sum is ever published.
            return actions + self._abandon(now, "the aggregator restarted during secure aggregation",
                                           charge=self.privacy is not None)
        if self.open is not None:
            return actions + self._notices() + [self._task_publish(now)]
        opened = self._maybe_open(now)
        # No round can open yet: replace any stale task from an earlier run
        # by one that says so (and when to look again).
        return actions + (opened or [self._task_waiting(now)])

    def receive(self, topic: str, payload: bytes, now: float) -> list[Action]:
        """A message arrived on one of our subscriptions."""
        self._now = now
        kind, agent = self.topics.parse(topic)
        if kind in ("status", "update") and not self._within_rate(agent, now):
            # Counted before decoding: a flood costs a counter, not a decode.
            return self._reject("rate_limited", f"{kind} from {agent}: more than the agent's message rate")
        if kind == "status":
            if not payload:
                return []  # a retained status being cleared
            return self._on_status(agent, payload, now)
        if kind == "update":
            if self.config.secagg.enabled:
                return self._on_secagg(agent, payload, now)
            return self._on_update(agent, payload, now)
        return []

    def tick(self, now: float) -> list[Action]:
        """Time passed: enforce the deadline, open a round if one can open."""
        self._now = now
        o = self.open
        if o is None:
            return self._maybe_open(now)
        if self.secagg is not None:
            return self._secagg_step(self.secagg.tick(now), now)
        if self.privacy is not None and (now >= o.deadline or not o.selected):
            # DP: a drawn round is always released (noise and all), never
            # redrawn: redrawing a short or empty draw would make the real
            # inclusion probability higher than the q the accountant charges.
            # An empty draw closes at the next tick rather than at once, so a
            # run of empty draws cannot release rounds in a tight loop.
            return self._close(now)
        if now < o.deadline:
            return []
        if len(o.received) >= self.config.round.quorum:
            return self._close(now)
        if self.async_mode:
            # Async updates are never thrown away: wait another period for
            # the buffer (agents may have left since it opened).
            o.deadline = now + self.config.round.timeout
            return []
        return self._abandon(now, "deadline")

    # -- status ---------------------------------------------------------------

    def _on_status(self, agent: str | None, payload: bytes, now: float) -> list[Action]:
        try:
            msg = wire.decode(payload, expect="status", fed=self.config.federation)
        except wire.WireError as exc:
            return self._reject(exc.reason, f"status from {agent}: {exc.detail}")
        if msg.agent != agent:
            return self._reject("identity_mismatch", f"status on {agent}'s topic names {msg.agent}")
        before = self.agents.get(msg.agent)
        info = AgentInfo(
            online=msg.state == "online",
            eligible=msg.eligible and self.spec.kind in msg.capabilities,
            num_samples=msg.num_samples,
            capabilities=msg.capabilities,
            reason=msg.reason,
            round=msg.round,
        )
        self.agents[msg.agent] = info
        if self._usable(info):
            self._usable_ids.add(msg.agent)
        else:
            self._usable_ids.discard(msg.agent)
        if before is None or (before.online, before.eligible) != (info.online, info.eligible):
            log.info("agent %s is %s%s", msg.agent, "online" if info.online else "offline",
                     "" if info.eligible or not info.online else f", not eligible ({info.reason or 'no reason given'})")
        if self.secagg is not None and not info.online:
            return self._secagg_step(self.secagg.agent_offline(msg.agent, now), now)
        if self.open is not None and self.async_mode and self._usable(info):
            if msg.agent not in self.open.chosen:
                # Async rounds take whoever is there: let the newcomer in. The
                # task selects every eligible agent, so nothing is published.
                self.open.admit(msg.agent)
                self.open.target = min(self.config.fedbuff.buffer, len(self.open.selected))
            return []
        return self._maybe_open(now)

    def _within_rate(self, agent: str | None, now: float) -> bool:
        return self._rate.allow(agent, now)

    def _usable(self, info: AgentInfo) -> bool:
        return info.online and info.eligible

    # -- updates --------------------------------------------------------------

    def _on_update(self, agent: str | None, payload: bytes, now: float, replay: bool = False) -> list[Action]:
        try:
            # A chunked update (docs/PROTOCOL.md §8) may exceed the one-packet limit, up to one model's size.
            msg = wire.decode(payload, expect="update", fed=self.config.federation, spec=self.spec,
                              max_bytes=self._max_update_bytes)
        except wire.WireError as exc:
            return self._reject(exc.reason, f"update from {agent}: {exc.detail}")
        assert isinstance(msg, wire.UpdateMsg)
        o = self.open
        if msg.agent != agent:
            return self._reject("identity_mismatch", f"update on {agent}'s topic names {msg.agent}")
        if o is None:
            return self._reject("no_open_round", f"update from {agent} for round {msg.round}")
        staleness = 0
        if self.async_mode:
            base_round = self.recent_versions.get(msg.base)
            if base_round is None:
                return self._reject("stale_base", f"update from {agent} on unknown base {msg.base}")
            staleness = self.round - base_round
            if staleness > self.config.fedbuff.max_staleness:
                return self._reject("too_stale", f"update from {agent} is {staleness} versions old")
            info = self.agents.get(agent)
            if info is None or not info.eligible:
                return self._reject("not_selected", f"update from {agent}, not an eligible agent")
        else:
            if msg.round != o.round:
                return self._reject("wrong_round", f"update from {agent} for round {msg.round}, open is {o.round}")
            if agent not in o.chosen:
                return self._reject("not_selected", f"update from {agent} who is not selected in round {o.round}")
            if msg.base != self.version:
                return self._reject("stale_base", f"update from {agent} on base {msg.base}, current {self.version}")
        # Sync: one update per agent per round. Async: one per agent per base
        # version, so a stale update that landed in this buffer does not
        # shut out the same agent's fresh one.
        key = f"{agent}@{msg.base}" if self.async_mode else agent
        if key in o.received or key in self.async_applied:
            return self._reject("duplicate", f"second update from {agent} in round {o.round}")
        if self.strategy.full():
            return self._reject("round_full", f"update from {agent}: round {o.round} holds as many as the rule keeps")
        too_large = norm_problem(msg.delta, self.config.security.max_update_norm)
        if too_large:
            return self._reject("norm_too_large", f"update from {agent} {too_large}")
        actions: list[Action] = []
        if not replay:
            actions.append(Journal({"type": "update", "round": o.round, "attempt": o.attempt, "agent": agent,
                                    "payload": bytes(payload), "at": now}))
        delta = msg.delta
        if staleness:
            # FedBuff scales a stale delta by (1 + s)^-p and divides the sum by
            # the plain weights. Scaling the *weight* instead would cancel out
            # in a weighted mean whenever the whole buffer is equally stale
            # and apply the same progress twice (seen: the demo diverging).
            factor = np.float32((1.0 + staleness) ** -self.config.fedbuff.staleness_exponent)
            delta = {k: v * factor for k, v in delta.items()}
        self.strategy.add(delta, float(msg.num_samples), msg.metrics)
        o.received.add(key)
        o.stale_sum += staleness
        self.accepted += 1
        self._add_metrics(o, msg)
        if len(o.received) >= o.target:
            actions += self._close(now)
        return actions

    # -- secure aggregation -----------------------------------------------------

    def _secagg_degree(self, n: int) -> int:
        sa = self.config.secagg
        if sa.mode != "secagg+":
            return 0
        return sa.degree or max(4, 2 * math.ceil(math.log2(max(2, n))))

    def _secagg_params(self, selected: list[str], degree: int) -> wire.SecAggParams:
        from edge_agent.secagg.quantize import levels

        from .secagg import round_params

        sa = self.config.secagg
        max_weight = 0
        if self.privacy is None and sa.weighting != "uniform":
            # Capped at what the selected devices say they have: a cap far
            # above every real count would shrink every scaled update towards
            # zero and make the quantization error count for more.
            reported = max((self.agents[a].num_samples for a in selected if a in self.agents), default=0)
            max_weight = min(sa.max_weight or reported, levels(sa.bits))
            if max_weight <= 1:
                max_weight = 0  # no counts reported (hidden) or all of one: every update counts once
        return round_params(sa.mode, len(selected), degree, sa.threshold, sa.bits, sa.range, sa.clip, max_weight)

    def _on_secagg(self, agent: str | None, payload: bytes, now: float) -> list[Action]:
        """A device's secure-aggregation message (on its update topic)."""
        from edge_agent.secagg import messages as sam

        from .secagg import SecAggReject

        try:
            msg = sam.decode(payload, fed=self.config.federation, kinds=sam.DEVICE_KINDS)
        except wire.WireError as exc:
            return self._reject(f"secagg_{exc.reason}", f"from {agent}: {exc.detail}")
        if msg.agent != agent:
            return self._reject("identity_mismatch", f"secagg message on {agent}'s topic names {msg.agent}")
        if self.secagg is None:
            return self._reject("no_open_round", f"secagg message from {agent} for round {msg.round}")
        try:
            out = self.secagg.receive(agent, msg, now)
        except SecAggReject as exc:
            return self._reject(f"secagg_{exc.reason}", exc.detail)
        return self._secagg_step(out, now)

    def _secagg_step(self, publishes: list[Publish], now: float) -> list[Action]:
        """Send what the protocol says; close the round with the unmasked sum, or abandon it."""
        sa, o = self.secagg, self.open
        actions: list[Action] = list(publishes)
        if sa is None or o is None:
            return actions
        if sa.stage == "aborted":
            self.rejected["secagg_aborted"] += 1
            return actions + self._abandon(now, f"secure aggregation aborted: {sa.why}",
                                           charge=self.privacy is not None)
        if sa.stage != "done":
            return actions
        contributors = sorted(sa.contributors)
        # Under DP the fixed denominator (expected devices), as in DP-FedAvg;
        # otherwise the total weight the masked sum carried.
        mean = sa.result / (self.privacy.expected if self.privacy is not None else sa.weight)
        # The strategy sees the mean as one update: the rules allowed with
        # secure aggregation need only the mean.
        self.strategy.add(self.spec.unflatten(mean), 1.0, None)
        o.received = set(contributors)
        return actions + self._close(now)

    def _add_metrics(self, o: _OpenRound, msg: wire.UpdateMsg) -> None:
        # Training metrics weigh by training samples, evaluation metrics by
        # holdout samples, so the round figure is the population's, not the
        # mean of agents of very different sizes.
        if self.privacy is not None:
            return  # un-noised averages of device metrics would leak what DP protects
        eval_w = msg.metrics.get("eval_samples", 0.0)
        for name, value in msg.metrics.items():
            if name == "eval_samples" or not name.startswith(AGENT_METRIC_PREFIXES):
                continue
            if name not in o.metric_sums and len(o.metric_sums) >= MAX_AGENT_METRICS:
                continue
            w = eval_w if name.startswith("eval_") else float(msg.num_samples)
            if w <= 0:
                continue
            acc = o.metric_sums.setdefault(name, [0.0, 0.0])
            acc[0] += w * value
            acc[1] += w

    def _reject(self, reason: str, detail: str) -> list[Action]:
        self.rejected[reason] += 1
        self._rejection_log.log(reason, detail)
        return []

    # -- opening and closing --------------------------------------------------

    def _rounds_done(self) -> bool:
        return bool(self.config.rounds) and self.round >= self.config.rounds

    def _maybe_open(self, now: float) -> list[Action]:
        if self.open is not None or self.finished:
            return []
        rc = self.config.round
        if len(self._usable_ids) < rc.min_agents:
            return []
        candidates = sorted(self._usable_ids)
        q = 1.0
        if self.async_mode:
            # Each agent trains once per version: a buffer larger than the
            # fleet would never fill.
            # The deadline only flushes a partial buffer (with at least quorum
            # updates) when agents left after it opened; it is not published.
            selected = candidates
            target, deadline = min(self.config.fedbuff.buffer, len(candidates)), now + rc.timeout
        elif self.privacy is not None:
            q = self.privacy.sampling_rate(len(self.agents))
            problem = self.privacy.budget_problem(q)
            if problem:
                log.warning("%s; the federation ends after round %d", problem, self.round)
                self.finished = True
                return [self._task_done(), Finished(self.round, problem)]
            # Poisson sampling, as the accountant assumes. An empty draw is a
            # round too: it releases noise only (see tick()).
            selected = self.privacy.select(candidates, q)
            target, deadline = len(selected), now + rc.timeout
        else:
            if rc.agents_per_round:
                target = min(rc.agents_per_round, len(candidates))
            elif rc.fraction:
                target = max(1, math.ceil(rc.fraction * len(candidates)))
            else:
                target = len(candidates)
            k = min(len(candidates), math.ceil(target * rc.over_select - 1e-9))
            if k < len(candidates):
                chosen = self.rng.choice(len(candidates), size=k, replace=False)
                selected = sorted(candidates[i] for i in chosen)
            else:
                selected = candidates
            deadline = now + rc.timeout
        sa_params = None
        if self.config.secagg.enabled:
            degree = self._secagg_degree(len(selected))
            try:
                sa_params = self._secagg_params(selected, degree)
            except ValueError as exc:  # too many devices for the 32-bit masked sum
                log.error("cannot open a secure-aggregation round: %s", exc)
                self.rejected["secagg_too_many"] += 1
                sa_params = None
            if sa_params is None or sa_params.threshold + 1 > len(selected) or len(selected) < MIN_SECAGG_DEVICES:
                if sa_params is not None:
                    log.info("secure aggregation needs %d selected devices (threshold %d + 1), %d selected",
                             max(MIN_SECAGG_DEVICES, sa_params.threshold + 1), sa_params.threshold, len(selected))
                if self.privacy is not None:
                    # The draw happened: charge it (config validation keeps its
                    # probability far below delta), journaled so a restart
                    # still counts it, then draw again next tick.
                    self.rejected["secagg_draw_too_small"] += 1
                    self.privacy.charge(q, released=False)
                    return [Journal({"type": "charge", "round": self.round + 1, "q": q, "at": now})]
                return []
            if self.privacy is not None:
                from .secagg import ddg_params

                sa_params = ddg_params(sa_params, len(selected), self.spec.num_params(), self.privacy.clip,
                                       self.privacy.noise_multiplier)
        self._open_round(self.round + 1, self.attempt, selected, target, now, deadline)
        self.open.q = q
        if sa_params is not None:
            from .secagg import make_round

            self.secagg = make_round(self.config.federation, self.round + 1, self.attempt, selected, sa_params,
                                     degree, self.spec.num_params(), deadline,
                                     self.config.secagg.stage_timeout,
                                     self.secagg_verifier if self.config.secagg.signed_keys else None)
        log.info("round %d attempt %d opened: %d selected for a target of %d (of %d eligible online)",
                 self.round + 1, self.attempt, len(selected), target, len(candidates))
        record = {"type": "open", "round": self.round + 1, "attempt": self.attempt, "selected": selected,
                  "target": target, "opened_at": now, "deadline": None if math.isinf(deadline) else deadline,
                  "rng": self.rng.bit_generator.state, "q": q}
        return [Journal(record), *self._notices(), self._task_publish(now)]

    def _open_round(self, rnd: int, attempt: int, selected: list[str], target: int, now: float, deadline: float) -> None:
        self.open = _OpenRound(round=rnd, attempt=attempt, selected=list(selected), target=target,
                               opened_at=now, deadline=deadline)
        self.secagg = None
        self.strategy.begin(self.params)

    def _abandon(self, now: float, why: str, replay: bool = False, charge: bool = False) -> list[Action]:
        """Give up the open attempt; ``charge``: under DP it was drawn, so it is charged (PrivacyEngine.charge)."""
        o = self.open
        assert o is not None
        if charge and self.privacy is not None:
            self.privacy.charge(o.q, released=False)
        log.warning(
            "round %d attempt %d abandoned (%s): %d of %d selected reported, quorum %d",
            o.round, o.attempt, why, len(o.received), len(o.selected), self.config.round.quorum,
        )
        self.open = None
        self.secagg = None
        self.attempt += 1
        actions: list[Action] = []
        if not replay:
            actions.append(Journal({"type": "abandon", "round": o.round, "attempt": o.attempt, "at": now,
                                    "charged": charge}))
        actions.append(RoundAbandoned(o.round, o.attempt, len(o.received), self.config.round.quorum))
        opened = self._maybe_open(now)
        return actions + (opened or [self._task_waiting(now)])

    def _close(self, now: float) -> list[Action]:
        o = self.open
        assert o is not None
        # Under DP the strategy adds whatever noise the devices' shares leave
        # missing (too few updates in distributed mode), so every drawn round
        # can be released.
        new_params = self.strategy.result(self.params)
        if not all(np.isfinite(a).all() for a in new_params.values()):
            # Every delta was finite, yet the sum overflowed float32: publishing
            # it would make every agent reject the model and stall the fleet.
            self.rejected["non_finite_aggregate"] += 1
            return self._abandon(now, "the aggregate is not finite", charge=self.privacy is not None)
        self.params = new_params
        self.round = o.round
        self.version = wire.params_version(self.params)
        self.recent_versions[self.version] = self.round
        horizon = self.round - self.config.fedbuff.max_staleness - EXTRA_VERSIONS
        self.recent_versions = {v: r for v, r in self.recent_versions.items() if r >= horizon}
        if self.async_mode:
            self.async_applied |= o.received
            self.async_applied = {k for k in self.async_applied if k.rsplit("@", 1)[1] in self.recent_versions}
        self.open = None
        self.secagg = None
        self.attempt = 0
        metrics = {name: s / w for name, (s, w) in o.metric_sums.items() if w > 0}
        if self.evaluate is not None:
            metrics.update({f"test_{k}": v for k, v in self.evaluate(self.params).items()})
        metrics["seconds"] = now - o.opened_at
        metrics["dropouts"] = float(max(0, len(o.selected) - len(o.received))) if not self.async_mode else 0.0
        if self.async_mode:
            metrics["mean_staleness"] = o.stale_sum / max(1, len(o.received))
        if self.privacy is not None:
            metrics.update(self.privacy.charge(o.q))
            metrics["clip"] = self.privacy.clip
        summary = RoundSummary(
            round=o.round,
            attempt=o.attempt,
            selected=len(o.selected),
            participants=len(o.received),
            version=self.version,
            opened_at=o.opened_at,
            closed_at=now,
            metrics=metrics,
        )
        self.history.append(summary)
        del self.history[:-MAX_HISTORY]
        self._history_dicts.append(asdict(summary))
        del self._history_dicts[:-MAX_HISTORY]
        log.info("round %d closed: %d/%d updates (target %d), %s", o.round, len(o.received), len(o.selected),
                 o.target, ", ".join(f"{k}={v:.4f}" for k, v in sorted(metrics.items())))
        actions: list[Action] = [
            SaveCheckpoint(self.snapshot()),
            self.model_publish(),
            Publish(self.topics.metrics, wire.encode(self._metrics_msg(summary)), qos=1, retain=True),
            RoundClosed(summary),
        ]
        if self._rounds_done():
            self.finished = True
            return actions + [self._task_done(), Finished(self.round)]
        opened = self._maybe_open(now)
        return actions + (opened or [self._task_waiting(now)])

    def _metrics_msg(self, s: RoundSummary) -> wire.MetricsMsg:
        if self.privacy is not None:
            return self._private_metrics_msg(s)
        recent = [
            {"round": float(h.round), "participants": float(h.participants), "selected": float(h.selected),
             "seconds": h.seconds, **{k: v for k, v in h.metrics.items() if k.endswith("accuracy") or k.endswith("loss")}}
            for h in self.history[-wire.MAX_METRICS_HISTORY:]
        ]
        return wire.MetricsMsg(
            fed=self.config.federation,
            round=s.round,
            version=s.version,
            participants=s.participants,
            metrics={**s.metrics, "selected": float(s.selected), "attempt": float(s.attempt),
                     **{f"rejected_{k}": float(v) for k, v in self.rejected.items()}},
            history=recent,
        )

    def _private_metrics_msg(self, s: RoundSummary) -> wire.MetricsMsg:
        """Under DP the metrics carry only what the accounting covers or no device's data shaped.

        That is the privacy figures, the (released) clip norm and the central
        test set's evaluation. Counts of participants, dropouts, attempts
        and rejections, and round durations depend on what individual devices
        did and are not noised, so they stay in the aggregator's log.
        """
        def public(metrics: Mapping[str, float]) -> dict[str, float]:
            return {k: v for k, v in metrics.items() if k.startswith("test_") or k in PUBLIC_DP_METRICS}

        recent = [{"round": float(h.round), **public(h.metrics)} for h in self.history[-wire.MAX_METRICS_HISTORY:]]
        return wire.MetricsMsg(fed=self.config.federation, round=s.round, version=s.version, participants=0,
                               metrics=public(s.metrics), history=recent)

    # -- messages -------------------------------------------------------------

    def model_publish(self) -> Publish:
        """The retained ``model`` message of the current global model."""
        msg = wire.ModelMsg(
            fed=self.config.federation, round=self.round, version=self.version, spec=self.spec, params=self.params,
            run=self.run,
        )
        return Publish(self.topics.model, wire.encode(msg), qos=1, retain=True)

    def _pace(self) -> float:
        """Seconds until the next round is expected: recent round length, at most the timeout."""
        recent = [h.seconds for h in self.history[-PACE_WINDOW:]]
        expected = sum(recent) / len(recent) if recent else self.config.round.timeout
        return float(min(max(expected, 0.0), self.config.round.timeout))

    def _compression_fields(self) -> dict[str, Any]:
        """task.config's update compression (docs/PROTOCOL.md §3.3.1); none in secure-aggregation rounds."""
        c = self.config.compression
        if not c.enabled or self.secagg is not None:
            return {}
        return {"compression": c.mode, "topk_fraction": c.topk_fraction if c.mode == "topk" else 0.0}

    def _task_publish(self, now: float) -> Publish:
        o = self.open
        assert o is not None
        t = self.config.training
        clip_norm, noise_std, count_std = self.privacy.task_noise() if self.privacy is not None else (0.0, 0.0, 0.0)
        if self.secagg is not None:
            noise_std = 0.0  # the noise is added inside secure aggregation (task.secagg.dp_sigma)
        task = wire.TaskMsg(
            fed=self.config.federation,
            round=o.round,
            base=self.version,
            state="open",
            attempt=o.attempt,
            deadline=0.0 if self.async_mode else o.deadline,
            config=wire.TrainConfig(
                epochs=t.epochs, batch_size=t.batch_size, lr=t.lr, prox_mu=self.config.strategy.prox_mu,
                clip_norm=clip_norm, noise_std=noise_std, count_noise_std=count_std,
                dp_mode=self.config.privacy.mode if self.privacy is not None else "",
                **self._compression_fields(),
            ),
            # Agents not selected look again when this round should be over.
            retry_after=0.0 if self.async_mode else max(0.0, min(o.deadline - now, self._pace())),
            mode=self.config.round.mode,
            run=self.run,
            secagg=self.secagg.params if self.secagg is not None else None,
        )
        return Publish(self.topics.task, wire.encode(task), qos=1, retain=True)

    def _notices(self) -> list[Publish]:
        """The retained ``selected`` message of every agent selected in the open sync attempt.

        Published before the task, so an agent usually holds its notice when
        the task arrives (it handles either order). One small message per
        selected agent instead of the whole selection in every agent's task:
        O(1) bytes per device, and the ACL keeps each agent from reading the
        others' (who was sampled stays as private as the accountant assumes).
        Async tasks select every eligible agent and need none.
        """
        o = self.open
        if o is None or self.async_mode:
            return []
        # Secure aggregation needs every device to know the whole selection (share points).
        everyone = list(o.selected) if self.secagg is not None else []
        return [
            Publish(self.topics.selected(a), wire.encode(wire.SelectedMsg(
                fed=self.config.federation, round=o.round, agent=a, attempt=o.attempt, base=self.version,
                run=self.run, selected=everyone)), qos=1, retain=True)
            for a in o.selected
        ]

    def _task_waiting(self, now: float) -> Publish:
        task = wire.TaskMsg(
            fed=self.config.federation, round=self.round + 1, base=self.version, state="waiting",
            attempt=self.attempt, retry_after=self._pace(), mode=self.config.round.mode, run=self.run,
        )
        return Publish(self.topics.task, wire.encode(task), qos=1, retain=True)

    def _task_done(self) -> Publish:
        # The attempt is the one that would open next: agents order a done
        # task where the next waiting task would stand, so a federation
        # continued after it (more rounds, a larger privacy budget) is followed.
        task = wire.TaskMsg(
            fed=self.config.federation, round=self.round, base=self.version, state="done",
            attempt=self.attempt, mode=self.config.round.mode, run=self.run,
        )
        return Publish(self.topics.task, wire.encode(task), qos=1, retain=True)

    # -- persistence ----------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        """Everything needed to resume after the last closed round."""
        return {
            "federation": self.config.federation,
            "run": self.run,
            "round": self.round,
            "version": self.version,
            "spec": self.spec.to_wire(),
            "params": {k: v.copy() for k, v in self.params.items()},
            "rng": self.rng.bit_generator.state,
            "attempt": self.attempt,
            "recent_versions": dict(self.recent_versions),
            "async_applied": sorted(self.async_applied),
            "strategy": {"name": self.strategy.name, "state": self.strategy.state_dict()},
            # converted once per round, not once per checkpoint: with a long
            # history that made every checkpoint O(rounds)
            "history": list(self._history_dicts),
            **({"privacy": self.privacy.state()} if self.privacy is not None else {}),
        }

    def _restore(self, state: Mapping[str, Any]) -> None:
        if state["federation"] != self.config.federation:
            raise ValueError(f"checkpoint is of federation {state['federation']!r}, config says {self.config.federation!r}")
        if state["spec"] != self.spec.to_wire():
            raise ValueError(f"checkpoint holds model {state['spec']}, config says {self.spec.to_wire()}")
        if "run" in state:
            self.run = int(state["run"])
        else:
            log.info("checkpoint predates run ids: federation %s continues as run %d", self.config.federation, self.run)
        self.round = int(state["round"])
        self.params = {k: np.asarray(v, dtype=np.float32) for k, v in state["params"].items()}
        self.rng = np.random.default_rng()
        self.rng.bit_generator.state = state["rng"]
        self.attempt = int(state.get("attempt", 0))
        self.recent_versions = {str(k): int(v) for k, v in state.get("recent_versions", {}).items()}
        self.async_applied = set(state.get("async_applied", []))
        self.strategy.load_state_dict(state.get("strategy", {}).get("state", {}))
        self.history = [RoundSummary(**d) for d in state.get("history", [])]
        self._history_dicts = [asdict(h) for h in self.history]

    def _replay(self, records: list[dict[str, Any]], now: float) -> list[Action]:
        """Re-apply the journal of the round that was open when the process stopped.

        Records of rounds the checkpoint already covers are skipped (a crash
        between checkpoint and journal reset leaves them behind). Updates go
        through the same checks as when they first arrived, so a replay
        accepts exactly what was accepted before.
        """
        actions: list[Action] = []
        for rec in records:
            if rec.get("round", 0) <= self.round:
                continue
            kind = rec.get("type")
            if kind == "open":
                self.rng.bit_generator.state = rec["rng"]
                self.attempt = int(rec["attempt"])
                deadline = math.inf if rec["deadline"] is None else float(rec["deadline"])
                self._open_round(int(rec["round"]), self.attempt, list(rec["selected"]), int(rec["target"]),
                                 float(rec["opened_at"]), deadline)
                self.open.q = float(rec.get("q", 1.0))
            elif kind == "update" and self.open is not None and \
                    (rec["round"], rec["attempt"]) == (self.open.round, self.open.attempt):
                actions += self._on_update(rec["agent"], rec["payload"], now, replay=True)
            elif kind == "charge" and self.privacy is not None:
                self.privacy.charge(float(rec["q"]), released=False)
            elif kind == "abandon" and self.open is not None:
                if rec.get("charged") and self.privacy is not None:
                    self.privacy.charge(self.open.q, released=False)  # as it was before the restart
                self.open = None
                self.attempt = int(rec["attempt"]) + 1
        if self.open is not None:
            log.info("resumed round %d attempt %d with %d accepted updates", self.open.round, self.open.attempt,
                     len(self.open.received))
        # Replayed updates were not journaled again (replay=True); a close
        # during replay returns the normal close actions, including the
        # checkpoint and the journaled opening of the next round.
        return actions
