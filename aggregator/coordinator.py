"""The round coordinator: the aggregator's protocol logic, sans I/O.

Events in, actions out, as h11 does for HTTP: :meth:`Coordinator.start`,
:meth:`Coordinator.receive` (a message arrived) and :meth:`Coordinator.tick`
(time passed) each take the current time as an argument and return a list
of actions (:class:`Publish`, :class:`SaveCheckpoint`, :class:`RoundClosed`,
:class:`RoundAbandoned`, :class:`Finished`) for the adapter to carry out in
order. There is no socket, thread or clock in here, so every rule below has
a fast deterministic unit test and runs unchanged over a real broker.

Rules (DESIGN.md §4):
- a round opens when at least ``min_agents`` eligible agents are online; the
  selection is a seeded sample (or everyone) and is published as the task;
- an update is accepted only if it is well-formed, for the open round, from a
  selected agent, on the current base version, the first from that agent,
  and came on the topic of the agent it names; everything else is dropped
  with a counted reason and changes nothing;
- a round closes when every selected agent has reported, or at the deadline
  if at least ``quorum`` updates arrived; otherwise it is abandoned and re-run
  as a new attempt with a new selection;
- closing checkpoints before it publishes the new model.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Mapping

import numpy as np

from edge_agent import wire
from edge_agent.models import Model
from edge_agent.mqtt import Publish
from edge_agent.topics import Topics

from .config import AggregatorConfig
from .strategies import Strategy

log = logging.getLogger(__name__)

Params = dict[str, np.ndarray]
Evaluator = Callable[[Mapping[str, np.ndarray]], dict[str, float]]

# Closed-round summaries kept in memory and in the checkpoint. A year of
# hourly rounds; beyond that metrics belong in the metrics store, not here.
MAX_HISTORY = 10_000


@dataclass
class AgentInfo:
    """What the aggregator knows of one agent from its retained status."""

    online: bool
    eligible: bool
    num_samples: int
    capabilities: list[str]


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
    """Action: make this state durable before anything else is published."""

    state: dict[str, Any]


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
    """Action (notification): the configured number of rounds is done."""

    round: int


Action = Publish | SaveCheckpoint | RoundClosed | RoundAbandoned | Finished


@dataclass
class _OpenRound:
    round: int
    attempt: int
    selected: list[str]
    opened_at: float
    deadline: float
    received: set[str] = field(default_factory=set)
    # weighted sums of agent-reported metrics: name -> (sum of w*value, sum of w)
    metric_sums: dict[str, list[float]] = field(default_factory=dict)


class Coordinator:
    """Round protocol state machine of one federation."""

    def __init__(
        self,
        config: AggregatorConfig,
        strategy: Strategy,
        evaluate: Evaluator | None = None,
        state: Mapping[str, Any] | None = None,
    ) -> None:
        self.config = config
        self.strategy = strategy
        self.evaluate = evaluate
        self.spec = config.model.spec()
        self.topics = Topics(config.federation)
        self.agents: dict[str, AgentInfo] = {}
        self.open: _OpenRound | None = None
        self.rejected: Counter[str] = Counter()
        self.accepted = 0
        self.finished = False
        if state is None:
            self.round = 0
            self.params: Params = Model(self.spec).init_params(config.model.seed)
            self.rng = np.random.default_rng(config.round.seed)
            self.attempt = 0
            self.history: list[RoundSummary] = []
        else:
            self._restore(state)
        self.version = wire.params_version(self.params)

    # -- events ---------------------------------------------------------------

    def start(self, now: float) -> list[Action]:
        """Announce the current model (retained) and open a round if agents are there."""
        actions: list[Action] = [self.model_publish()]
        if self._rounds_done():
            self.finished = True
            return actions + [self._task_done(), Finished(self.round)]
        return actions + self._maybe_open(now)

    def receive(self, topic: str, payload: bytes, now: float) -> list[Action]:
        """A message arrived on one of our subscriptions."""
        kind, agent = self.topics.parse(topic)
        if kind == "status":
            if not payload:
                return []  # a retained status being cleared
            return self._on_status(agent, payload, now)
        if kind == "update":
            return self._on_update(agent, payload, now)
        return []

    def tick(self, now: float) -> list[Action]:
        """Time passed: enforce the deadline, open a round if one can open."""
        o = self.open
        if o is None:
            return self._maybe_open(now)
        if now < o.deadline:
            return []
        if len(o.received) >= self.config.round.quorum:
            return self._close(now)
        log.warning(
            "round %d attempt %d abandoned at its deadline: %d of %d selected reported, quorum %d",
            o.round, o.attempt, len(o.received), len(o.selected), self.config.round.quorum,
        )
        self.open = None
        self.attempt += 1
        return [RoundAbandoned(o.round, o.attempt, len(o.received), self.config.round.quorum), *self._maybe_open(now)]

    # -- status ---------------------------------------------------------------

    def _on_status(self, agent: str | None, payload: bytes, now: float) -> list[Action]:
        try:
            msg = wire.decode(payload, expect="status", fed=self.config.federation)
        except wire.WireError as exc:
            return self._reject(exc.reason, f"status from {agent}: {exc.detail}")
        if msg.agent != agent:
            return self._reject("identity_mismatch", f"status on {agent}'s topic names {msg.agent}")
        self.agents[msg.agent] = AgentInfo(
            online=msg.state == "online",
            eligible=msg.eligible and self.spec.kind in msg.capabilities,
            num_samples=msg.num_samples,
            capabilities=msg.capabilities,
        )
        return self._maybe_open(now)

    # -- updates --------------------------------------------------------------

    def _on_update(self, agent: str | None, payload: bytes, now: float) -> list[Action]:
        try:
            msg = wire.decode(payload, expect="update", fed=self.config.federation, spec=self.spec)
        except wire.WireError as exc:
            return self._reject(exc.reason, f"update from {agent}: {exc.detail}")
        assert isinstance(msg, wire.UpdateMsg)
        o = self.open
        if msg.agent != agent:
            return self._reject("identity_mismatch", f"update on {agent}'s topic names {msg.agent}")
        if o is None:
            return self._reject("no_open_round", f"update from {agent} for round {msg.round}")
        if msg.round != o.round:
            return self._reject("wrong_round", f"update from {agent} for round {msg.round}, open is {o.round}")
        if agent not in o.selected:
            return self._reject("not_selected", f"update from {agent} who is not selected in round {o.round}")
        if msg.base != self.version:
            return self._reject("stale_base", f"update from {agent} on base {msg.base}, current {self.version}")
        if agent in o.received:
            return self._reject("duplicate", f"second update from {agent} in round {o.round}")
        if self.strategy.full():
            return self._reject("round_full", f"update from {agent}: round {o.round} holds as many as the rule keeps")
        self.strategy.add(msg.delta, float(msg.num_samples), msg.metrics)
        o.received.add(agent)
        self.accepted += 1
        self._add_metrics(o, msg)
        if len(o.received) == len(o.selected):
            return self._close(now)
        return []

    @staticmethod
    def _add_metrics(o: _OpenRound, msg: wire.UpdateMsg) -> None:
        # Training metrics weigh by training samples, evaluation metrics by
        # holdout samples, so the round figure is the population's, not the
        # mean of agents of very different sizes.
        eval_w = msg.metrics.get("eval_samples", 0.0)
        for name, value in msg.metrics.items():
            if name == "eval_samples":
                continue
            w = eval_w if name.startswith("eval_") else float(msg.num_samples)
            if w <= 0:
                continue
            acc = o.metric_sums.setdefault(name, [0.0, 0.0])
            acc[0] += w * value
            acc[1] += w

    def _reject(self, reason: str, detail: str) -> list[Action]:
        self.rejected[reason] += 1
        log.warning("dropped (%s): %s", reason, detail)
        return []

    # -- opening and closing --------------------------------------------------

    def _rounds_done(self) -> bool:
        return bool(self.config.rounds) and self.round >= self.config.rounds

    def _maybe_open(self, now: float) -> list[Action]:
        if self.open is not None or self.finished:
            return []
        candidates = sorted(a for a, info in self.agents.items() if info.online and info.eligible)
        rc = self.config.round
        if len(candidates) < rc.min_agents:
            return []
        k = rc.agents_per_round or len(candidates)
        if k < len(candidates):
            chosen = self.rng.choice(len(candidates), size=k, replace=False)
            selected = sorted(candidates[i] for i in chosen)
        else:
            selected = candidates
        self.open = _OpenRound(
            round=self.round + 1,
            attempt=self.attempt,
            selected=selected,
            opened_at=now,
            deadline=now + rc.timeout,
        )
        self.strategy.begin(self.params)
        log.info("round %d attempt %d opened: %d agents selected", self.round + 1, self.attempt, len(selected))
        t = self.config.training
        task = wire.TaskMsg(
            fed=self.config.federation,
            round=self.open.round,
            base=self.version,
            state="open",
            attempt=self.attempt,
            deadline=self.open.deadline,
            selected=selected,
            config=wire.TrainConfig(
                epochs=t.epochs, batch_size=t.batch_size, lr=t.lr, prox_mu=self.config.strategy.prox_mu
            ),
        )
        return [Publish(self.topics.task, wire.encode(task), qos=1, retain=True)]

    def _close(self, now: float) -> list[Action]:
        o = self.open
        assert o is not None
        new_params = self.strategy.result(self.params)
        if not all(np.isfinite(a).all() for a in new_params.values()):
            # Every delta was finite, yet the sum overflowed float32: publishing
            # it would make every agent reject the model and stall the fleet.
            self.rejected["non_finite_aggregate"] += 1
            log.error("round %d attempt %d: the aggregate is not finite; round re-run", o.round, o.attempt)
            self.open = None
            self.attempt += 1
            return [RoundAbandoned(o.round, o.attempt, len(o.received), self.config.round.quorum), *self._maybe_open(now)]
        self.params = new_params
        self.round = o.round
        self.version = wire.params_version(self.params)
        self.open = None
        self.attempt = 0
        metrics = {name: s / w for name, (s, w) in o.metric_sums.items() if w > 0}
        if self.evaluate is not None:
            metrics.update({f"test_{k}": v for k, v in self.evaluate(self.params).items()})
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
        log.info("round %d closed: %d/%d updates, %s", o.round, len(o.received), len(o.selected),
                 ", ".join(f"{k}={v:.4f}" for k, v in sorted(metrics.items())))
        metrics_msg = wire.MetricsMsg(
            fed=self.config.federation,
            round=o.round,
            version=self.version,
            participants=len(o.received),
            metrics={**metrics, **{f"rejected_{k}": float(v) for k, v in self.rejected.items()}},
        )
        actions: list[Action] = [
            SaveCheckpoint(self.snapshot()),
            self.model_publish(),
            Publish(self.topics.metrics, wire.encode(metrics_msg), qos=1, retain=True),
            RoundClosed(summary),
        ]
        if self._rounds_done():
            self.finished = True
            return actions + [self._task_done(), Finished(self.round)]
        return actions + self._maybe_open(now)

    def model_publish(self) -> Publish:
        msg = wire.ModelMsg(
            fed=self.config.federation, round=self.round, version=self.version, spec=self.spec, params=self.params
        )
        return Publish(self.topics.model, wire.encode(msg), qos=1, retain=True)

    def _task_done(self) -> Publish:
        task = wire.TaskMsg(
            fed=self.config.federation, round=self.round, base=self.version, state="done", selected=[]
        )
        return Publish(self.topics.task, wire.encode(task), qos=1, retain=True)

    # -- persistence ----------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        """Everything needed to resume after the last closed round."""
        return {
            "federation": self.config.federation,
            "round": self.round,
            "version": self.version,
            "spec": self.spec.to_wire(),
            "params": {k: v.copy() for k, v in self.params.items()},
            "rng": self.rng.bit_generator.state,
            "attempt": self.attempt,
            "strategy": {"name": self.strategy.name, "state": self.strategy.state_dict()},
            "history": [asdict(s) for s in self.history],
        }

    def _restore(self, state: Mapping[str, Any]) -> None:
        if state["federation"] != self.config.federation:
            raise ValueError(f"checkpoint is of federation {state['federation']!r}, config says {self.config.federation!r}")
        if state["spec"] != self.spec.to_wire():
            raise ValueError(f"checkpoint holds model {state['spec']}, config says {self.spec.to_wire()}")
        self.round = int(state["round"])
        self.params = {k: np.asarray(v, dtype=np.float32) for k, v in state["params"].items()}
        self.rng = np.random.default_rng()
        self.rng.bit_generator.state = state["rng"]
        self.attempt = int(state.get("attempt", 0))
        self.strategy.load_state_dict(state.get("strategy", {}).get("state", {}))
        self.history = [RoundSummary(**d) for d in state.get("history", [])]

