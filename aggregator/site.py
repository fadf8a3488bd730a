"""The site role: an aggregator between a site's agents and the cloud aggregator.

A site broker (a factory gateway, a depot) bridges to the cloud broker with
mosquitto's own bridge (:func:`bridge_config`). On the site broker:

- the site's agents and the site aggregator use ``fl/<fed>/...`` exactly as
  in a flat federation (the agents are unchanged and cannot tell);
- the cloud federation's topics appear under ``<prefix>/fl/<fed>/...``
  (``[site] upstream_prefix``, default ``cloud``), mapped by the bridge.

To the cloud, a site is one participant (docs/PROTOCOL.md §9): an agent whose
id is ``[site] id``. Its upstream side is a normal :class:`AgentCore` (same
rules: replay protection, notices, outbox, chunked models) whose "training"
is one local round over the site's own agents, started from the cloud's
model. Its answer is an ordinary ``update``: the weighted mean of the local
deltas, with ``num_samples`` the sum of the local weights. FedAvg over sites
of these is then FedAvg over all devices (a weighted mean of weighted means),
and a server optimizer at the cloud sees the same mean delta as flat.

Durability is the flat aggregator's: the local round is journaled as usual
(acknowledged => durable), the site's answer (the "partial aggregate") is
in the checkpoint written when the local round closes, before it is sent,
and the sent update is in the upstream outbox (``state_dir/upstream``), sent
again after a restart while the cloud round is open (the cloud drops a
duplicate).
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from edge_agent import wire
from edge_agent.agent import Action as AgentAction
from edge_agent.agent import AgentCore, AgentRunner, PutOutbox, Train
from edge_agent.agent_store import AgentStore
from edge_agent.config import BrokerConfig, ConfigError, check
from edge_agent.data import LocalData
from edge_agent.mqtt import Connection, Loop, Publish
from edge_agent.spec import ModelSpec
from edge_agent.topics import ROOT, Topics

from .config import DEFAULT_UPSTREAM_PREFIX, AggregatorConfig
from .coordinator import (
    DEFAULT_RUN,
    Action,
    Coordinator,
    Evaluator,
    Finished,
    Journal,
    RoundAbandoned,
    RoundClosed,
    SaveCheckpoint,
)
from .service import AggregatorService
from .strategies import BUFFERING as ROBUST_RULES
from .strategies import FedAvg, Strategy

log = logging.getLogger(__name__)

# The upstream agent's store (trained rounds, outbox, accepted keys) inside state_dir.
UPSTREAM_DIR = "upstream"
# How often the site's status at the cloud is brought up to date with its
# local population. Agents come and go over seconds; this also bounds the
# status messages a site sends (the cloud rate-limits them per participant).
STATUS_POLL_S = 0.5
# Shortest local round worth opening: with less time left before the cloud's
# deadline (minus [site] upload_margin), the site sits the cloud round out.
MIN_LOCAL_ROUND_S = 1.0
# Journal record of the cloud's training settings for a local round (written with its opening).
SITE_TASK_RECORD = "site_task"


class UpstreamTopics(Topics):
    """The cloud federation's topics as the site broker's bridge maps them: ``<root>/fl/<fed>/...``."""

    def __init__(self, fed: str, root: str = DEFAULT_UPSTREAM_PREFIX) -> None:
        super().__init__(fed)
        if not root or not all(wire.valid_id(p) for p in root.split("/")):
            raise ValueError(f"upstream prefix {root!r} must be '/'-separated [A-Za-z0-9_-] segments")
        object.__setattr__(self, "root", root)  # a frozen dataclass field of the parent: set once, here

    @property
    def prefix(self) -> str:
        return f"{self.root}/{ROOT}/{self.fed}"


def bridge_config(
    site_id: str,
    federation: str,
    cloud_address: str,
    prefix: str = DEFAULT_UPSTREAM_PREFIX,
    connection: str = "fedmqtt-cloud",
    options: tuple[str, ...] = (),
) -> str:
    """The mosquitto bridge section of a site broker (append it to the site broker's config).

    ``options``: further bridge lines, e.g. ``remote_username``,
    ``remote_password``, ``bridge_cafile`` for a TLS link (deploy/scale.md).
    Only the site's own topics cross: its update and status go out, the
    cloud's model, task, keys and this site's notice come in.
    """
    for name, value in (("site id", site_id), ("federation", federation)):
        if not wire.valid_id(value):
            raise ValueError(f"{name} {value!r} must match [A-Za-z0-9_-]{{1,64}}")
    UpstreamTopics(federation, prefix)  # validates the prefix
    local, remote = f"{prefix}/{ROOT}/{federation}/", f"{ROOT}/{federation}/"
    out = (f"update/{site_id}", f"update/{site_id}/chunk", f"agent/{site_id}/status")
    into = ("model", "model/chunk/#", "task", "keys", f"agent/{site_id}/selected")
    lines = [
        f"connection {connection}",
        f"address {cloud_address}",
        # 3.1.1 is what FIELD-NOTES found to work with mosquitto 2.0.11; it drops
        # v5 user properties (signatures), so the site re-signs for its agents.
        "bridge_protocol_version mqttv311",
        f"remote_clientid fedmqtt-bridge-{federation}-{site_id}",
        # A persistent session at the cloud: QoS 1 messages queue on either side while the link is down.
        "cleansession false",
        "try_private true",
        "restart_timeout 1 5",
        *options,
        *(f"topic {t} out 1 {local} {remote}" for t in out),
        *(f"topic {t} in 1 {local} {remote}" for t in into),
    ]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------
# the site's answer: the weighted mean of its agents' deltas


@dataclass
class PartialAggregate:
    """A site's answer to one cloud round: sent as the site's ``update`` (docs/PROTOCOL.md §9)."""

    round: int
    base: str
    weight: int  # sum of the local agents' num_samples
    agents: int  # local updates in it (logged; not sent)
    delta: dict[str, np.ndarray]  # their weighted mean, float32
    metrics: dict[str, float] = field(default_factory=dict)


class SiteMean(FedAvg):
    """FedAvg that keeps its weighted mean delta and total weight instead of moving the model.

    The site's model stays the cloud's: :meth:`result` returns the base
    unchanged and records the :class:`PartialAggregate`. The partial is the
    strategy state, so it is in the checkpoint the coordinator writes when
    the round closes (before it is sent anywhere).
    """

    def __init__(self, clip_norm: float = 0.0) -> None:
        super().__init__(weighted=True, clip_norm=clip_norm, name="fedavg")
        self.partial: PartialAggregate | None = None
        # (round, base, metrics) of the round being closed: set by SiteCoordinator._close.
        self.closing: tuple[int, str, dict[str, float]] | None = None

    def result(self, global_params: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.count == 0:
            raise ValueError("no updates to aggregate")
        assert self.closing is not None
        rnd, base, metrics = self.closing
        delta, weight = self.share()
        if not all(np.isfinite(v).all() for v in delta.values()):
            # The coordinator refuses a non-finite result and abandons the round: say it with NaN.
            return {k: np.full(v.shape, np.nan, dtype=np.float32) for k, v in global_params.items()}
        self.partial = PartialAggregate(rnd, base, int(round(weight)), self.count, delta, metrics)
        return {k: np.array(v, dtype=np.float32) for k, v in global_params.items()}

    def state_dict(self) -> dict[str, Any]:
        p = self.partial
        if p is None:
            return {}
        return {"round": p.round, "base": p.base, "weight": p.weight, "agents": p.agents,
                "metrics": json.dumps(p.metrics), **{f"delta/{k}": v for k, v in p.delta.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "round" not in state:
            self.partial = None
            return
        delta = {k.split("/", 1)[1]: np.asarray(v, dtype=np.float32) for k, v in state.items() if k.startswith("delta/")}
        self.partial = PartialAggregate(int(state["round"]), str(state["base"]), int(state["weight"]),
                                        int(state["agents"]), delta, json.loads(state["metrics"]))


# ---------------------------------------------------------------------------
# the local rounds


@dataclass(frozen=True)
class _Want:
    """The cloud round the site was asked to answer."""

    round: int
    attempt: int
    base: str
    deadline: float  # the cloud's, 0 when it has none


class SiteCoordinator(Coordinator):
    """A coordinator whose rounds are the cloud's: one local round per cloud round, on the cloud's model.

    Differences from the flat coordinator: it publishes no model of its own
    (only the cloud's, :meth:`adopt`), it opens a round only when the cloud
    asked this site for one (:meth:`request`), with the cloud's training
    settings and a deadline inside the cloud's, and closing a round produces
    a :class:`PartialAggregate` (``strategy.partial``) instead of a new model.
    The federation ends when the cloud's does (:meth:`finish`).
    """

    strategy: SiteMean

    def __init__(
        self,
        config: AggregatorConfig,
        strategy: Strategy | None = None,
        evaluate: Evaluator | None = None,
        state: Mapping[str, Any] | None = None,
        journal: list[dict[str, Any]] | None = None,
        run: int = DEFAULT_RUN,
    ) -> None:
        """``strategy`` is ignored: a site always aggregates with :class:`SiteMean` (its config says fedavg)."""
        if config.role != "site":
            raise ValueError(f"SiteCoordinator needs role = site, got {config.role!r}")
        self.site_timeout = float(config.round.timeout)
        # A private copy of the sections the cloud's tasks rewrite.
        config = replace(config, round=replace(config.round), training=replace(config.training),
                         strategy=replace(config.strategy), compression=replace(config.compression))
        self.adopted: tuple[int, int] | None = None  # (run, round) of the cloud model in use
        self.model_round = 0
        self.want: _Want | None = None
        self.cloud_done = False
        self._late: tuple[int, int] | None = None
        super().__init__(config, SiteMean(config.strategy.clip_norm), evaluate, state, journal, run)
        site = (state or {}).get("site") or {}
        if site.get("adopted"):
            self.adopted = (int(site["adopted"][0]), int(site["adopted"][1]))
            self.model_round = int(site["model_round"])

    # -- what differs from a flat coordinator ------------------------------

    def model_publish(self) -> Publish:
        """The cloud's model, as adopted (round and run are the cloud's): never a model of the site's own."""
        msg = wire.ModelMsg(fed=self.config.federation, round=self.model_round, version=self.version, spec=self.spec,
                            params=self.params, run=self.run)
        return Publish(self.topics.model, wire.encode(msg), qos=1, retain=True)

    def snapshot(self) -> dict[str, Any]:
        state = super().snapshot()
        state["site"] = {"adopted": list(self.adopted) if self.adopted else None, "model_round": self.model_round}
        return state

    def _rounds_done(self) -> bool:
        return self.cloud_done  # the cloud decides; [rounds] of a site is not used

    def start(self, now: float) -> list[Action]:
        if self.adopted is None:
            # No cloud model yet: nothing to tell the agents (a model of our own
            # would carry a run id that the cloud's could then look older than).
            self._journal_backlog = []
            self._run_unsaved = False
            return []
        return super().start(now)

    def _maybe_open(self, now: float) -> list[Action]:
        w = self.want
        if self.open is not None or self.finished or w is None:
            return []
        if (w.round, w.base) != (self.round + 1, self.version):
            return []  # asked for a round on a model we do not hold (yet), or answered already
        p = self.strategy.partial
        if p is not None and (p.round, p.base) == (w.round, w.base):
            return []
        timeout = self.site_timeout
        if w.deadline > 0:
            timeout = min(timeout, w.deadline - now - self.config.site.upload_margin)
        if timeout < MIN_LOCAL_ROUND_S:
            if self._late != (w.round, w.attempt):
                self._late = (w.round, w.attempt)
                log.warning("cloud round %d attempt %d: %.1f s left before its deadline (less upload_margin %g s), "
                            "too little for a local round; this site sits it out", w.round, w.attempt,
                            w.deadline - now, self.config.site.upload_margin)
            return []
        self.config.round.timeout = timeout
        actions = super()._maybe_open(now)
        if self.open is not None:
            # The cloud's training settings of this round go into the journal with
            # its opening: a restart publishes the resumed round's task again, and
            # it must say what it said (an agent trains on the task it holds then).
            actions.insert(0, Journal({"type": SITE_TASK_RECORD, "round": self.open.round, **self._task_settings()}))
        return actions

    def _task_settings(self) -> dict[str, Any]:
        t, c = self.config.training, self.config.compression
        return {"epochs": t.epochs, "batch_size": t.batch_size, "lr": t.lr, "prox_mu": self.config.strategy.prox_mu,
                "compression": c.mode, "topk_fraction": c.topk_fraction}

    def _apply_task_settings(self, s: Mapping[str, Any]) -> None:
        self.config.training = replace(self.config.training, epochs=int(s["epochs"]), batch_size=int(s["batch_size"]),
                                       lr=float(s["lr"]))
        self.config.strategy.prox_mu = float(s["prox_mu"])
        self.config.compression.mode = str(s["compression"])
        self.config.compression.topk_fraction = float(s["topk_fraction"])

    def _replay(self, records: list[dict[str, Any]], now: float) -> list[Action]:
        for rec in records:
            if rec.get("type") == SITE_TASK_RECORD and rec.get("round", 0) > self.round:
                self._apply_task_settings(rec)  # (the flat replay skips records of types it does not know)
        return super()._replay(records, now)

    def _close(self, now: float) -> list[Action]:
        o = self.open
        assert o is not None
        metrics = {name: s / w for name, (s, w) in o.metric_sums.items() if w > 0}
        eval_weights = [w for name, (s, w) in o.metric_sums.items() if name.startswith("eval_") and w > 0]
        if eval_weights:
            # what the cloud weighs this site's eval_* by, as it does an agent's
            metrics["eval_samples"] = max(eval_weights)
        self.strategy.closing = (o.round, self.version, metrics)
        actions = super()._close(now)
        p = self.strategy.partial
        if p is not None and p.round == o.round:
            log.info("local round %d closed: the partial aggregate of %d updates (weight %d) goes to the cloud",
                     p.round, p.agents, p.weight)
        return actions

    # -- events from the upstream side ---------------------------------------

    def adopt(self, msg: wire.ModelMsg, now: float) -> list[Action]:
        """The cloud published a model: it becomes this site's model (checkpointed, then published locally)."""
        key = (msg.run, msg.round)
        if self.adopted is not None and key <= self.adopted:
            return []  # the model we hold, delivered again
        if msg.spec != self.spec:
            log.error("the cloud's model %s is not this site's [model] %s: not adopted", msg.spec.to_wire(),
                      self.spec.to_wire())
            return []
        actions: list[Action] = []
        if self.open is not None:
            o = self.open
            log.warning("local round %d attempt %d given up: the cloud moved on to the model of round %d",
                        o.round, o.attempt, msg.round)
            actions.append(RoundAbandoned(o.round, o.attempt, len(o.received), self.config.round.quorum))
            self.open = None
        self.want = None
        self.params = {k: np.array(v, dtype=np.float32) for k, v in msg.params.items()}
        self.round = self.model_round = msg.round
        self.version = msg.version
        self.recent_versions = {msg.version: msg.round}
        self.run = msg.run
        self._run_unsaved = False
        self.adopted = key
        self.attempt = 0
        p = self.strategy.partial
        if p is not None and p.round <= msg.round:
            self.strategy.partial = None  # its cloud round is over
        log.info("adopted the cloud's model of round %d (%s)", msg.round, msg.version[:12])
        # Durable before it is published: a restart resumes from the cloud's model (the journal starts over).
        actions += [SaveCheckpoint(self.snapshot()), self.model_publish()]
        return actions + (self._maybe_open(now) or [self._task_waiting(now)])

    def request(self, task: wire.TaskMsg, now: float) -> list[Action]:
        """The cloud selected this site for ``task``: run a local round for it (once), with its settings."""
        if self.finished:
            return []
        w = _Want(task.round, task.attempt, task.base, task.deadline)
        if w != self.want:
            log.info("the cloud asks for round %d attempt %d on %s", w.round, w.attempt, w.base[:12])
        self.want = w
        if self.open is None:
            c = task.config
            self._apply_task_settings({"epochs": c.epochs, "batch_size": c.batch_size, "lr": c.lr,
                                       "prox_mu": c.prox_mu, "compression": c.compression,
                                       "topk_fraction": c.topk_fraction if c.compression == "topk"
                                       else self.config.compression.topk_fraction})
        return self._maybe_open(now)

    def finish(self, now: float) -> list[Action]:
        """The cloud's federation is over: so is the site's."""
        if self.finished:
            return []
        self.cloud_done = True
        self.want = None
        actions: list[Action] = []
        if self.open is not None:
            o = self.open
            actions.append(RoundAbandoned(o.round, o.attempt, len(o.received), self.config.round.quorum))
            self.open = None
        self.finished = True
        return actions + [self._task_done(), Finished(self.round)]

    def local_population(self) -> tuple[int, int]:
        """(eligible online local agents, the sum of their num_samples)."""
        usable = [a for a in self.agents.values() if self._usable(a)]
        return len(usable), sum(a.num_samples for a in usable)


def cloud_warnings(config: AggregatorConfig) -> list[str]:
    """What a cloud config computes that is not the flat federation's (allowed, but said at start)."""
    name = config.strategy.name
    if name in ROBUST_RULES:
        return [f"[strategy] name = {name!r} at the cloud works on the sites' means: it is robust against whole "
                "sites, not against single devices, and its result is not the flat federation's (a robust rule "
                "cannot be computed hierarchically)"]
    if name == "fedavg_unweighted":
        return ["[strategy] name = 'fedavg_unweighted' at the cloud weighs every site once, whatever its devices"]
    return []


# ---------------------------------------------------------------------------
# the upstream side: the site as one agent of the cloud federation


def unsupported_task(t: wire.TaskMsg) -> str:
    """Why a site cannot answer the cloud task ``t`` ("" if it can)."""
    if t.mode != "sync":
        return "the cloud runs asynchronous rounds; a site answers synchronous rounds only"
    if t.secagg is not None:
        return "the cloud asks for secure aggregation, which a site (one participant carrying a mean) cannot do"
    c = t.config
    if c.dp_mode or c.noise_std or c.clip_norm or c.count_noise_std:
        return "the cloud asks for differential privacy, which is not available in a site hierarchy"
    return ""


@dataclass
class SiteUpstream(AgentCore):
    """The site as an agent of the cloud federation, on the bridged ``<prefix>/fl/<fed>/`` topics.

    Its training is a local round (``on_request``), which may take the whole
    cloud round; its update is the :class:`PartialAggregate` of that round
    (``partial_of``). It has no data of its own; ``data.samples`` is the sum
    over its eligible agents, updated by :class:`SiteAggregator`.
    """

    root: str = DEFAULT_UPSTREAM_PREFIX
    site_spec: ModelSpec | None = None
    partial_of: Callable[[], PartialAggregate | None] | None = None
    on_request: Callable[[wire.TaskMsg], None] | None = None
    on_model: Callable[[wire.ModelMsg], None] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        self.topics = UpstreamTopics(self.fed, self.root)

    def _check_data(self, model) -> None:
        """No data here: the site's agents check theirs against the model they get."""

    def _check_model(self, spec: ModelSpec):
        if self.site_spec is not None and spec != self.site_spec:
            detail = f"the cloud's model {spec.to_wire()} is not this site's [model] {self.site_spec.to_wire()}"
            self._reject("model_mismatch", detail)
            return False, self._set_problem("model_mismatch", detail)
        return super()._check_model(spec)

    def _on_model(self, msg: wire.ModelMsg) -> list[AgentAction]:
        actions = super()._on_model(msg)
        if self.model_msg is msg and self.on_model is not None:
            self.on_model(msg)
        return actions

    def _maybe_train(self) -> list[AgentAction]:
        # Unlike a device, a site may "train" an attempt again (after a restart the
        # local round resumes from the journal, or is asked for again): what it
        # must not do is send twice, which the outbox guards.
        t, m = self.task, self.model_msg
        if t is None or m is None or t.state != "open" or not self.eligible:
            return []
        why = unsupported_task(t)
        if why:
            return self._set_problem("hierarchy_unsupported", why)
        if self.problem is not None or not self._selected(t) or t.base != m.version:
            return []
        if (t.round, t.attempt) in self.outbox:
            return []
        return [Train(t.round, t.attempt)]

    def partial_ready(self) -> list[AgentAction]:
        """A local round closed: send its partial aggregate if the cloud round it answers is still open."""
        return self._maybe_train()

    def train(self, round_number: int, attempt: int = 0) -> list[AgentAction]:
        """Answer the open cloud attempt with the partial aggregate, or ask for the local round that makes it."""
        t, m = self.task, self.model_msg
        if (t is None or m is None or t.state != "open" or (t.round, t.attempt) != (round_number, attempt)
                or not self._selected(t) or t.base != m.version or self.problem is not None):
            return []
        key = (round_number, attempt)
        if key in self.outbox:
            return []
        p = self.partial_of() if self.partial_of is not None else None
        if p is None or (p.round, p.base) != (t.round, t.base):
            if self.on_request is not None:
                self.on_request(t)
            return []
        update = wire.UpdateMsg(fed=self.fed, round=round_number, agent=self.agent_id, base=m.version,
                                num_samples=p.weight, delta=p.delta, metrics=p.metrics)
        payload = wire.encode(update)
        self.outbox[key] = payload
        self.resent.add(key)
        self.updates_sent += 1
        log.info("%s: partial aggregate of round %d attempt %d sent upstream (%d updates, weight %d)",
                 self.agent_id, round_number, attempt, p.agents, p.weight)
        return [PutOutbox(key, payload), Publish(self.topics.update(self.agent_id), payload, qos=1, retain=False)]


# ---------------------------------------------------------------------------
# the adapter


class SiteService(AggregatorService):
    """The local side: a normal aggregator service running a :class:`SiteCoordinator`."""

    coordinator_class = SiteCoordinator
    coordinator: SiteCoordinator

    def on_connected(self, conn: Connection) -> None:
        if self._started and self.coordinator.adopted is None:
            return  # a reconnect before any cloud model: nothing to publish again
        super().on_connected(conn)

    def _onnx_export(self, round_number, version, params):
        c = self.coordinator
        if c.adopted is None or round_number != c.model_round:
            # Only cloud models are exported, under the cloud's round: not at a local
            # round's close (the model did not change), but when one is adopted.
            return None
        return super()._onnx_export(round_number, version, params)

    def export_adopted(self) -> None:
        """Publish the ONNX copy of the cloud model just adopted (when [onnx] says it is due)."""
        c = self.coordinator
        if self.onnx is not None and self.onnx.due(c.model_round):
            onnx = self._onnx_export(c.model_round, c.version, c.params)
            if onnx is not None:
                self.conn.publish(self._signed(onnx))


def upstream_broker(config: AggregatorConfig) -> BrokerConfig:
    """The site broker login of the site's upstream connection: ``[site] username`` if set, else ``[broker]``'s."""
    site = config.site
    if not site.username:
        return config.broker
    return replace(config.broker, username=site.username, password="", password_file=site.password_file)


class SiteAggregator:
    """A site aggregator (``fedmqtt aggregator --role site``): local rounds below a cloud, over one site broker.

    Two MQTT connections to the site broker on one loop: the local
    aggregator service (``fl/<fed>/...``, as flat) and the site's upstream
    agent (``<prefix>/fl/<fed>/...``, which the broker's bridge carries to
    and from the cloud). Same callbacks as :class:`AggregatorService`.
    """

    def __init__(
        self,
        config: AggregatorConfig,
        loop: Loop,
        evaluate: Evaluator | None = None,
        on_round: Callable[[RoundClosed], None] | None = None,
        on_finished: Callable[[Finished], None] | None = None,
        clock: Callable[[], float] = time.time,
        on_ready: Callable[[], None] | None = None,
    ) -> None:
        if config.role != "site":
            raise ConfigError(f"role: a site aggregator needs role = site, got {config.role!r}")
        check(config)  # the refusals (deploy/scale.md) also for a config built in Python
        self.config = config
        self.loop = loop
        self.clock = clock
        self._on_round = on_round
        self._on_finished = on_finished
        self.service = SiteService(config, loop, evaluate, on_round=self._round_closed, on_finished=self._finished,
                                   clock=clock, on_ready=on_ready)
        c = self.coordinator = self.service.coordinator
        no_rows = np.empty((0, c.spec.n_features), dtype=np.float32)
        self.upstream = SiteUpstream(
            agent_id=config.site.id, fed=config.federation,
            data=LocalData(None, None, no_rows, np.empty((0,), dtype=np.int64), samples=0),
            capabilities=(c.spec.kind,), root=config.site.upstream_prefix, site_spec=c.spec,
            partial_of=lambda: c.strategy.partial, on_request=self._request, on_model=self._cloud_model,
        )
        # Not selectable until the site's own agents are there (STATUS_POLL_S).
        self.upstream.eligible, self.upstream.reason = False, "waiting for the site's agents"
        self.runner = AgentRunner(loop, self.upstream, upstream_broker(config), on_done=self._cloud_done,
                                  store=AgentStore(Path(config.state_dir) / UPSTREAM_DIR),
                                  on_stop=self._upstream_refused)

    @property
    def fatal(self) -> str | None:
        return self.service.fatal

    def start(self) -> None:
        """Connect both sides (from the loop thread or before the loop runs)."""
        self.service.start()
        self.runner.start()
        self.loop.call_every(STATUS_POLL_S, self._poll_population)

    # -- glue -----------------------------------------------------------------

    def _poll_population(self) -> None:
        n, samples = self.coordinator.local_population()
        need = self.config.round.min_agents
        eligible = n >= need and not self.coordinator.finished
        reason = "" if eligible else f"waiting for the site's agents: {n} of {need} eligible online"
        up = self.upstream
        moved = samples != up.data.samples
        up.data.samples = samples
        actions = up.set_eligibility(eligible, reason)
        if moved and not actions:
            actions = [up.status("online")]
        self.runner._execute(actions)

    def _cloud_model(self, msg: wire.ModelMsg) -> None:
        before = self.coordinator.adopted
        self.service._execute(self.coordinator.adopt(msg, self.clock()))
        if self.coordinator.adopted != before:
            self.service.export_adopted()

    def _request(self, task: wire.TaskMsg) -> None:
        self.service._execute(self.coordinator.request(task, self.clock()))

    def _round_closed(self, ev: RoundClosed) -> None:
        # The checkpoint holding the partial aggregate is durable (it came first).
        if self._on_round is not None:
            self._on_round(ev)
        self.runner._execute(self.upstream.partial_ready())

    def _cloud_done(self, runner: AgentRunner) -> None:
        self.service._execute(self.coordinator.finish(self.clock()))

    def _finished(self, ev: Finished) -> None:
        if self._on_finished is not None:
            self._on_finished(ev)

    def _upstream_refused(self, runner: AgentRunner, problem: str) -> None:
        self.service._stop_for_good(f"broker: {problem}")
