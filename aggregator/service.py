"""The aggregator service: the round coordinator over a real MQTT connection.

Thin by design: paho messages become :meth:`Coordinator.receive` calls, a
periodic timer becomes :meth:`Coordinator.tick`, and the returned actions are
carried out in order (checkpoint first, then publishes). All of it runs on
one :class:`~edge_agent.mqtt.Loop` thread.

Group commit: journal records are written without fsync and made durable
together, by one fsync, before anything leaves the process that depends on
them: before any publish or notification, at the end of a timer's or a
connect's actions, and, for the messages of one read pass, in
:meth:`AggregatorService.flush`, which the connection calls before it sends
their acks. So "acknowledged => durable" holds with one fsync per read pass
instead of one per update.
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable

from edge_agent import wire
from edge_agent.config import ConfigError
from edge_agent.data import load as load_data
from edge_agent.mqtt import Connection, Loop, Publish
from edge_agent.signing import Signer

from . import checkpoint
from .broker_probe import BrokerProbe
from .config import AggregatorConfig
from .journal import JournalFile
from .metrics_log import CSV_NAME, MetricsCsv, metrics_json
from .onnx_publish import OnnxPublisher
from .coordinator import (
    Action,
    Coordinator,
    Evaluator,
    Finished,
    Journal,
    RoundAbandoned,
    RoundClosed,
    SaveCheckpoint,
    run_id,
)
from .strategies import make_strategy

log = logging.getLogger(__name__)

# How often deadlines are checked. Deadlines are seconds to minutes long;
# a quarter second keeps the overshoot small without busy work.
TICK_INTERVAL_S = 0.25


class AggregatorService:
    """Runs one federation's coordinator on a Loop."""

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
        self.config = config
        self.loop = loop
        self.clock = clock
        self.on_round = on_round
        self.on_finished = on_finished
        # Called (instead of stopping the loop) when the broker refused us for good.
        self.fatal_callback: Callable[[str], None] | None = None
        self.fatal: str | None = None
        # Called once, after the first connection's start actions ran (systemd READY=1).
        self.on_ready = on_ready
        if evaluate is None and config.test_data:
            evaluate = central_evaluator(config)
        state = checkpoint.load(config.state_dir)
        if state is not None:
            log.info("resuming from %s at round %d", Path(config.state_dir) / checkpoint.CHECKPOINT_NAME, state["round"])
        self.journal = JournalFile(config.state_dir)
        records = self.journal.load()
        # A fresh state takes a run id from the wall clock: a federation reset
        # later gets a larger one, which is how agents tell it from a replay.
        self.coordinator = Coordinator(config, make_strategy(config.strategy), evaluate, state, records,
                                       run=run_id(clock()))
        b = config.broker
        if config.secagg.enabled and config.secagg.signed_keys and b.cert_file and b.ca_file:
            # A provisioned federation: devices sign their round keys with
            # their certificates, so unsigned ones are dropped here already.
            from edge_agent.secagg.identity import PeerVerifier

            self.coordinator.secagg_verifier = PeerVerifier(b.ca_file, config.federation)
        self.onnx = OnnxPublisher(config) if config.onnx.every and self._exportable(config) else None
        self.onnx_failures = 0
        # Readable metrics: every closed round appended to state_dir/metrics.csv,
        # and a JSON copy of every metrics message (fl/<fed>/metrics/json).
        self.metrics_csv = MetricsCsv(Path(config.state_dir) / CSV_NAME, current_round=self.coordinator.round)
        # The Prometheus endpoint ([metrics] listen): served from start() until the loop stops.
        self.exporter = None
        if config.metrics.listen:
            try:
                from .prometheus import PrometheusExporter
            except ModuleNotFoundError as exc:
                if exc.name != "prometheus_client":
                    raise
                raise ConfigError("metrics.listen: serving metrics needs prometheus-client "
                                  "(pip install 'fedmqtt[aggregator]')") from None
            self.exporter = PrometheusExporter(config.federation, config.metrics.listen, self.coordinator.spec.kind)
        # Everything agents act on is signed when a key is configured.
        self.signer = Signer(config.security.signing_key) if config.security.signing_key else None
        self._signed_topics = {self.coordinator.topics.model, self.coordinator.topics.model_onnx,
                               self.coordinator.topics.task, self.coordinator.topics.keys}
        # A persistent session (clean start off, session expiry set): the
        # broker keeps our subscriptions and queues the updates agents send
        # while we are down; manual acks mean a message counts as delivered
        # only once the journal holds it.
        self.conn = Connection(
            loop,
            config.broker,
            client_id=f"fedmqtt-aggregator-{config.federation}",
            handler=self,
            clean_start=False,
            session_expiry_s=config.session_expiry,
            manual_ack=True,
        )
        self._started = False
        # The check that the broker refuses anonymous updates ([security] probe_open_broker).
        self.broker_probe: BrokerProbe | None = None

    @staticmethod
    def _exportable(config: AggregatorConfig) -> bool:
        if config.model.build().has_onnx:
            return True
        log.warning("model %s defines no to_onnx: no ONNX export (set [onnx] every = 0 to silence this)",
                    config.model.kind)
        return False

    def start(self) -> None:
        """Connect (from the loop thread or before the loop runs)."""
        if self.exporter is not None:
            self.exporter.start()  # first: a port in use stops us before we connect
            self.loop.at_shutdown(self.close)
            self.exporter.sync(self)
        # Rounds the checkpoint has and metrics.csv lacks (a crash between the two, an older state_dir).
        self.metrics_csv.append(self.coordinator.history)
        self.conn.open()
        self.loop.call_every(TICK_INTERVAL_S, lambda: self._execute(self.coordinator.tick(self.clock())))

    def close(self) -> None:
        """Stop serving metrics (run when the loop stops; idempotent)."""
        if self.exporter is not None:
            self.exporter.stop()

    @property
    def metrics_address(self) -> tuple[str, int] | None:
        """(host, port) the Prometheus endpoint listens on, once started (None when off)."""
        return self.exporter.address if self.exporter is not None else None

    # Handler protocol
    def subscriptions(self) -> list[str]:
        t = self.coordinator.topics
        return [t.statuses, t.updates]

    def on_too_large(self, conn: Connection, msg: Publish, size: int) -> None:
        """A model or task the broker would refuse: agents would wait for it round after round, so stop."""
        if msg.topic in (self.coordinator.topics.model, self.coordinator.topics.task):
            self._stop_for_good(f"broker: the {msg.topic.rsplit('/', 1)[-1]} message of {size} bytes exceeds the "
                                f"broker's maximum packet size of {conn.max_packet_size} bytes: raise the broker's "
                                "max_packet_size or use a smaller model")

    def on_fatal(self, conn: Connection, problem: str) -> None:
        """The broker refused us for good (login, a second aggregator on our client id): stop."""
        self._stop_for_good(f"broker: {problem}")

    def _stop_for_good(self, problem: str) -> None:
        """Stop serving; ``fatal`` says why ("broker: ..." for a refusal, "journal ..." for a disk error)."""
        self.fatal = problem
        if self.fatal_callback is not None:
            self.fatal_callback(problem)
        else:
            self.loop.stop()

    def on_connected(self, conn: Connection) -> None:
        c = self.coordinator
        if not self._started:
            self._started = True
            actions = c.start(self.clock())
            # The retained ONNX model always matches the retained model.
            onnx = self._onnx_export(c.round, c.version, c.params)
            if onnx is not None:
                actions.insert(1, onnx)
            if self.signer is not None:
                # Key rollover: our key and the next ones, signed by us, retained.
                keys = [self.signer.public_key, *self.config.security.announce_keys]
                msg = wire.KeysMsg(fed=self.config.federation, round=c.round, keys=keys)
                actions.insert(0, Publish(c.topics.keys, wire.encode(msg), qos=1, retain=True))
            self._execute(actions)
            if self.config.security.probe_open_broker:
                # Off the loop: start-up is not delayed, a WARNING follows if the broker is open.
                self.broker_probe = BrokerProbe(self.config.broker, self.config.federation).start()
            if self.on_ready is not None:
                self.on_ready()
        else:
            # After a reconnect, make sure the retained models are current (a
            # broker restart without persistence forgets retained messages).
            self._execute([c.model_publish(), *([self.onnx.last] if self.onnx and self.onnx.last else [])])

    def on_message(self, conn: Connection, topic: str, payload: bytes, props: dict[str, str]) -> None:
        # Records are made durable by flush(), once for the read pass, before the acks.
        self._execute(self.coordinator.receive(topic, payload, self.clock()), defer_sync=True)
        if self.exporter is not None:
            kind, agent = self.coordinator.topics.parse(topic)
            if kind == "status" and agent is not None:
                self.exporter.agent_changed(agent, self.coordinator.agents.get(agent))

    def _onnx_export(self, round_number: int, version: str, params) -> Publish | None:
        """The ONNX publish of this model, or None when the export fails.

        A user's ``to_onnx`` may raise or return a graph that breaks the
        contract: that costs the ONNX copy of this round, never the round
        itself (the model and the next task are still published).
        """
        if self.onnx is None:
            return None
        try:
            return self.onnx.export(round_number, version, params)
        except Exception as exc:  # the user's graph code, or onnx.checker on its output
            self.onnx_failures += 1
            log.error("round %d: ONNX export failed, model published without it: %s: %s",
                      round_number, type(exc).__name__, exc)
            return None

    def _signed(self, p: Publish) -> Publish:
        if self.signer is None or (p.topic not in self._signed_topics
                                   and self.coordinator.topics.parse(p.topic)[0] != "selected"):
            return p
        return replace(p, user_properties=p.user_properties + self.signer.properties(p.topic, p.payload))

    def _metrics_mirror(self, p: Publish) -> Publish | None:
        """The retained JSON copy of a metrics publish (unsigned, like metrics: agents act on neither)."""
        try:
            body = metrics_json(p.payload)
        except (wire.WireError, ValueError) as exc:  # our own payload: not expected
            log.error("no JSON copy of the metrics message: %s", exc)
            return None
        return Publish(self.coordinator.topics.metrics_json, body, qos=1, retain=True, content_type="application/json")

    def flush(self, conn: Connection | None = None) -> None:
        """Make every journal record written so far durable (one fsync): the Connection calls this before acks."""
        if self.journal.unsynced_records == 0 and self.journal.failed is None:
            return
        t0 = time.perf_counter()
        try:
            self.journal.sync()
        except OSError as exc:
            self._journal_failed(exc)
            raise
        if self.exporter is not None:
            self.exporter.observe_journal_sync(time.perf_counter() - t0)

    def _journal_failed(self, exc: OSError) -> None:
        """A journal write or fsync failed: nothing more can be made durable, so stop (unacknowledged)."""
        if self.fatal is not None:
            return
        self._stop_for_good(f"journal {self.journal.path}: {exc.strerror or exc}: stopped; the messages "
                                 "it could not make durable were not acknowledged (the broker delivers them again)")

    def _execute(self, actions: list[Action], defer_sync: bool = False) -> None:
        """Carry out the coordinator's actions in order.

        A Journal record is written at once and made durable (with the
        records before it) before the next action that is not another record
        or a checkpoint, and at the end unless ``defer_sync`` (a message's
        actions: :meth:`flush` then runs before its ack).
        """
        ex = self.exporter
        for a in actions:
            if not isinstance(a, (Journal, SaveCheckpoint)):
                self.flush()  # nothing leaves the process before the records it follows are durable
            if isinstance(a, Journal):
                t0 = time.perf_counter()
                try:
                    self.journal.append(a.record, sync=False)
                except OSError as exc:
                    self._journal_failed(exc)
                    raise
                if ex is not None:
                    ex.observe_journal(time.perf_counter() - t0)
            elif isinstance(a, SaveCheckpoint):
                t0 = time.perf_counter()
                checkpoint.save(self.config.state_dir, a.state)
                if ex is not None:
                    ex.observe_checkpoint(time.perf_counter() - t0)
                self.journal.reset()
            elif isinstance(a, Publish):
                self.conn.publish(self._signed(a))
                if self.fatal is not None:
                    return  # the publish was refused for good (on_too_large): nothing after it may go out
                if a.topic == self.coordinator.topics.metrics:
                    mirror = self._metrics_mirror(a)
                    if mirror is not None:
                        self.conn.publish(mirror)
            elif isinstance(a, RoundClosed):
                s = a.summary
                if self.onnx is not None and self.onnx.due(s.round):
                    onnx = self._onnx_export(s.round, s.version, self.coordinator.params)
                    if onnx is not None:
                        self.conn.publish(self._signed(onnx))
                self.metrics_csv.append(self.coordinator.history)
                if ex is not None:
                    ex.round_closed(s)
                    ex.sync(self)  # current before anyone is told
                if self.on_round is not None:
                    self.on_round(a)
            elif isinstance(a, RoundAbandoned):
                if ex is not None:
                    ex.round_abandoned()
                log.warning("round %d attempt %d abandoned (%d/%d updates)", a.round, a.attempt, a.received, a.quorum)
            elif isinstance(a, Finished):
                log.info("federation %s finished after round %d%s", self.config.federation, a.round,
                         f": {a.reason}" if a.reason else "")
                if ex is not None:
                    ex.sync(self)
                if self.on_finished is not None:
                    self.on_finished(a)
        if not defer_sync:
            self.flush()
        if ex is not None:
            ex.sync(self)  # after every batch: the counters stay exactly the coordinator's


def central_evaluator(config: AggregatorConfig) -> Evaluator:
    """Evaluate every new global model on the configured central test set."""
    X, y = load_data(config.test_data, config.label_column)
    model = config.model.build()
    model.check_data(X, y, f"test_data {config.test_data}")
    return lambda params: model.evaluate(params, X, y)
