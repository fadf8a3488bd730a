"""The edge agent: a sans-I/O core and the thin adapter that connects it to MQTT.

:class:`AgentCore` takes messages (topic, payload) and returns actions: a
:class:`~edge_agent.mqtt.Publish`, or :class:`Train` to ask for the (slow)
training of one round. It has no socket, thread or clock, so every rule of
the agent's side of the round protocol is unit-testable. :class:`AgentRunner`
binds a core to a :class:`~edge_agent.mqtt.Connection`.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable

from . import __version__, wire
from .data import LocalData
from .models import Model, subtract
from .mqtt import Connection, Loop, Publish
from .spec import MODEL_KINDS
from .topics import Topics
from .training import round_seed, train_local

log = logging.getLogger(__name__)


@dataclass
class Train:
    """Action: train for ``round``/``attempt`` (the adapter runs it, then calls :meth:`AgentCore.train`)."""

    round: int
    attempt: int = 0


@dataclass
class Done:
    """Action: the federation finished (task state ``done``)."""

    round: int


Action = Publish | Train | Done


@dataclass
class AgentCore:
    """The decision logic of one agent.

    Rules: train only when selected in an open task whose base version equals
    the model we hold; train at most once per round; drop anything malformed
    with a counted reason and leave state unchanged.
    """

    agent_id: str
    fed: str
    data: LocalData
    seed: int = 0
    capabilities: tuple[str, ...] = MODEL_KINDS
    topics: Topics = field(init=False)
    model_msg: wire.ModelMsg | None = field(default=None, init=False)
    task: wire.TaskMsg | None = field(default=None, init=False)
    trained: set[tuple[int, int]] = field(default_factory=set, init=False)
    rejected: Counter = field(default_factory=Counter, init=False)
    updates_sent: int = field(default=0, init=False)
    finished: bool = field(default=False, init=False)

    def __post_init__(self) -> None:
        self.topics = Topics(self.fed)
        if not wire.valid_id(self.agent_id):
            raise ValueError(f"agent id {self.agent_id!r} must match [A-Za-z0-9_-]{{1,64}}")

    # -- what to say and hear -------------------------------------------------

    def subscriptions(self) -> list[str]:
        return [self.topics.model, self.topics.task]

    def status(self, state: str = "online") -> Publish:
        """The retained status message (``offline`` is also the last will)."""
        msg = wire.StatusMsg(
            fed=self.fed,
            round=self.model_msg.round if self.model_msg else 0,
            agent=self.agent_id,
            state=state,
            num_samples=self.data.num_samples,
            capabilities=list(self.capabilities),
            software=__version__,
            eligible=True,
        )
        return Publish(self.topics.status(self.agent_id), wire.encode(msg), qos=1, retain=True)

    # -- events ---------------------------------------------------------------

    def receive(self, topic: str, payload: bytes) -> list[Action]:
        """One message from the broker; returns what to do about it."""
        kind, _ = self.topics.parse(topic)
        if not payload:
            return []  # a cleared retained message: nothing to act on
        try:
            if kind == "model":
                return self._on_model(wire.decode(payload, expect="model", fed=self.fed))
            if kind == "task":
                return self._on_task(wire.decode(payload, expect="task", fed=self.fed))
        except wire.WireError as exc:
            return self._reject(exc.reason, f"{topic}: {exc.detail}")
        return []

    def _reject(self, reason: str, detail: str) -> list[Action]:
        self.rejected[reason] += 1
        log.warning("%s: dropped message (%s): %s", self.agent_id, reason, detail)
        return []

    def _on_model(self, msg: wire.ModelMsg) -> list[Action]:
        if wire.params_version(msg.params) != msg.version:
            return self._reject("bad_version_hash", f"model of round {msg.round} does not hash to {msg.version}")
        if msg.spec.kind not in self.capabilities:
            return self._reject("unsupported_model", f"model kind {msg.spec.kind} not in {self.capabilities}")
        if msg.spec.n_features != self.data.X_train.shape[1]:
            return self._reject(
                "incompatible_model",
                f"model expects {msg.spec.n_features} features, local data has {self.data.X_train.shape[1]}",
            )
        if self.model_msg is not None and msg.round < self.model_msg.round:
            return self._reject("old_model", f"model of round {msg.round} is older than {self.model_msg.round}")
        self.model_msg = msg
        return self._maybe_train()

    def _on_task(self, msg: wire.TaskMsg) -> list[Action]:
        self.task = msg
        if msg.state == "done":
            if not self.finished:
                self.finished = True
                return [Done(msg.round)]
            return []
        return self._maybe_train()

    def _maybe_train(self) -> list[Action]:
        t, m = self.task, self.model_msg
        if t is None or m is None or t.state != "open":
            return []
        if self.agent_id not in t.selected or (t.round, t.attempt) in self.trained:
            return []
        if t.base != m.version:
            return []  # the matching model has not arrived yet; it will trigger us
        # Claim the attempt now: never train twice for it. A re-run of an
        # abandoned round is a new attempt and may select us again.
        self.trained.add((t.round, t.attempt))
        return [Train(t.round, t.attempt)]

    def train(self, round_number: int, attempt: int = 0) -> list[Action]:
        """Evaluate the global model on the holdout, train locally, return the update to publish.

        Training is requested by :meth:`receive` but runs later; if the task
        changed in between (new attempt, round closed, federation done,
        deselected) the work is skipped rather than sent for a task that no
        longer stands.
        """
        t, m = self.task, self.model_msg
        if (
            t is None
            or m is None
            or t.state != "open"
            or (t.round, t.attempt) != (round_number, attempt)
            or self.agent_id not in t.selected
            or t.base != m.version
        ):
            log.info("%s: round %d attempt %d moved on before training started; skipped",
                     self.agent_id, round_number, attempt)
            return []
        model = Model(m.spec)
        metrics: dict[str, float] = {}
        if len(self.data.X_holdout):
            ev = model.evaluate(m.params, self.data.X_holdout, self.data.y_holdout)
            metrics.update({f"eval_{k}": v for k, v in ev.items()})
            metrics["eval_samples"] = float(len(self.data.X_holdout))
        local, train_metrics = train_local(
            model, m.params, self.data.X_train, self.data.y_train, t.config, round_seed(self.seed, round_number)
        )
        metrics.update(train_metrics)
        update = wire.UpdateMsg(
            fed=self.fed,
            round=round_number,
            agent=self.agent_id,
            base=m.version,
            num_samples=self.data.num_samples,
            delta=subtract(local, m.params),
            metrics=metrics,
        )
        self.updates_sent += 1
        return [Publish(self.topics.update(self.agent_id), wire.encode(update), qos=1, retain=False)]


class AgentRunner:
    """Adapter: runs an :class:`AgentCore` over one MQTT connection on a :class:`Loop`."""

    def __init__(
        self,
        loop: Loop,
        core: AgentCore,
        broker,
        on_done: Callable[["AgentRunner"], None] | None = None,
    ) -> None:
        self.core = core
        self.loop = loop
        self.on_done = on_done
        self.conn = Connection(
            loop,
            broker,
            client_id=f"fedmqtt-{core.fed}-{core.agent_id}",
            handler=self,
            will=core.status("offline"),
        )

    def start(self) -> None:
        self.conn.open()

    # Handler protocol
    def subscriptions(self) -> list[str]:
        return self.core.subscriptions()

    def on_connected(self, conn: Connection) -> None:
        conn.publish(self.core.status("online"))

    def on_message(self, conn: Connection, topic: str, payload: bytes) -> None:
        self._execute(self.core.receive(topic, payload))

    def _execute(self, actions: list[Action]) -> None:
        for a in actions:
            if isinstance(a, Publish):
                self.conn.publish(a)
            elif isinstance(a, Train):
                # Deferred so the loop serves other clients' sockets between trainings.
                self.loop.call_soon(lambda a=a: self._execute(self.core.train(a.round, a.attempt)))
            elif isinstance(a, Done):
                log.info("%s: federation finished after round %d", self.core.agent_id, a.round)
                if self.on_done is not None:
                    self.on_done(self)

