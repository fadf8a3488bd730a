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
from functools import partial
from pathlib import Path
from typing import Callable

from edge_agent import chunking, wire
from edge_agent.config import ConfigError
from edge_agent.data import load as load_data
from edge_agent.mqtt import Connection, Loop, Publish
from edge_agent.ratelog import RejectionLog
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

# Receive Maximum announced on CONNECT (the MQTT 5 maximum): how many QoS 1
# messages the broker may send us unacknowledged. The chunks of a payload are
# acknowledged only when the whole payload is durable, so up to
# chunking.MAX_CHUNKS per sender wait at once.
RECEIVE_MAXIMUM = 65535
# Outgoing messages paho may hold for the aggregator. A round opening publishes
# one retained `selected` notice per selected agent before its task, so the
# agents' bound (edge_agent.mqtt.MAX_QUEUED_MESSAGES, 1000) would refuse the
# task of any round that selects more than about 1000 devices. This covers
# the selection of the largest list a message may carry (wire.MAX_LIST_LEN,
# 100,000) plus a model's chunks and the round's few other messages, and
# still stops growth while the broker is gone.
MAX_QUEUED_PUBLISHES = 2 * wire.MAX_LIST_LEN + 10_000
# Shortest time a chunked update may take (the round timeout when longer):
# a payload whose chunks stop coming is dropped as chunk_incomplete after it.
CHUNK_TIMEOUT_MIN_S = 10.0

# How often deadlines are checked. Deadlines are seconds to minutes long;
# a quarter second keeps the overshoot small without busy work.
TICK_INTERVAL_S = 0.25


class AggregatorService:
    """Runs one federation's coordinator on a Loop."""

    #: The coordinator's class: a site aggregator runs a subclass (aggregator/site.py).
    coordinator_class: type[Coordinator] = Coordinator

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
        cls = self.coordinator_class
        if config.workers.count:
            # The updates are read by ingest workers (aggregator/ingest/worker.py); this process decides.
            from .ingest.coordinator import IngestCoordinator

            cls = IngestCoordinator
        self.coordinator = cls(config, make_strategy(config.strategy), evaluate, state, records, run=run_id(clock()))
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
            # The chunks of a payload stay unacknowledged until the whole payload is
            # journaled (docs/PROTOCOL.md §8.6): mosquitto's default window of 20 would stall them.
            receive_maximum=RECEIVE_MAXIMUM,
            max_queued=MAX_QUEUED_PUBLISHES,
        )
        if not config.broker.mqtt5:
            # MQTT 3.1.1 (docs/PROTOCOL.md §1.1): neither session_expiry nor RECEIVE_MAXIMUM can be sent.
            log.info("MQTT 3.1.1: persistent session (clean session off) kept until the broker drops it; "
                     "session_expiry = %d is not sent; the broker's own in-flight window (mosquitto "
                     "max_inflight_messages, NATS mqtt max_ack_pending) bounds the chunks held unacknowledged; "
                     "packet limit [broker] max_packet_size = %d", config.session_expiry,
                     config.broker.max_packet_size)
        self._started = False
        # Chunked updates being reassembled, per sender (docs/PROTOCOL.md §8): one
        # payload buffer each, bounded by the model's size, and the acks held back
        # until the payload is journaled.
        self.assemblies: dict[str, chunking.Reassembler] = {}
        self._held_acks: dict[str, list[tuple[int, int]]] = {}
        # Seconds a chunked update may take from its manifest to its last chunk.
        self.chunk_timeout = max(float(config.round.timeout), CHUNK_TIMEOUT_MIN_S)
        self._max_update_bytes = chunking.payload_bound(self.coordinator.spec.num_params())
        self._model_chunks_published = 0  # retained chunk topics holding a model (cleared when fewer are needed)
        self._chunk_log = RejectionLog(log, "dropped")
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
        self.loop.call_every(TICK_INTERVAL_S, self._expire_chunked)

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
        if self.config.workers.count:
            # Single-packet updates go to the workers' shared subscription; chunked ones
            # still come here (their chunks must be reassembled in one place).
            return [t.statuses, t.all_update_chunks, *self.coordinator.ingest_topics.from_workers]
        return [t.statuses, t.updates, t.all_update_chunks]

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
        if self.config.workers.count:
            # A persistent session of a run without workers still has update/+: every
            # update would come here as well as to a worker.
            conn.unsubscribe([c.topics.updates])
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
        kind, agent = self.coordinator.topics.parse_chunk(topic)
        if kind == "update_chunk":
            self._on_update_chunk(conn, str(agent), payload)
            return
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

    def _publish_onnx(self, round_number: int, version: str, params: dict) -> None:
        """Export and publish the ONNX copy of the model of ``round_number``, unless a newer one has closed since."""
        if self.coordinator.version != version or self.fatal is not None:
            return  # a later round's model is out (its own export is queued), or we are stopping
        onnx = self._onnx_export(round_number, version, params)
        if onnx is not None:
            self.conn.publish(self._signed(onnx))

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
                if a.topic == self.coordinator.topics.model and self._model_too_large(a):
                    self._publish_model_chunks(a)
                else:
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
                    export = partial(self._publish_onnx, s.round, s.version, self.coordinator.params)
                    if any(isinstance(x, Finished) for x in actions):
                        export()  # the last round: nothing waits, and the federation ends with its file
                    else:
                        # After this pass, so the next task goes out first: the export
                        # (graph building, onnx.checker) is the largest cost of a round
                        # close, and nothing of the round protocol waits for model/onnx.
                        self.loop.call_soon(export)
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


    # -- chunked payloads (docs/PROTOCOL.md §8) ---------------------------------

    def _chunk_reject(self, reason: str, detail: str) -> None:
        self.coordinator.rejected[reason] += 1  # published as rejected_<reason> like every other drop
        self._chunk_log.log(reason, detail)

    def _release(self, agent: str, *extra: tuple[int, int] | None) -> None:
        """Acknowledge the held messages of ``agent``'s payload (and ``extra``), after the next flush."""
        keys = self._held_acks.pop(agent, []) + [k for k in extra if k is not None]
        self.conn.release_acks(keys)

    def _on_update_chunk(self, conn: Connection, agent: str, payload: bytes) -> None:
        """A manifest or chunk of ``agent``'s update: reassembled here, handed over whole.

        Every message of a payload in progress keeps its ack until the whole
        update is journaled: a crash mid-payload leaves them all in the
        broker's session, which delivers them again (§8.6). A message that is
        refused is acknowledged at once, like any dropped message.
        """
        key = conn.hold_ack()
        now = self.clock()
        if not payload:
            conn.release_acks([key] if key else [])  # nothing to act on
            return
        try:
            try:
                item: chunking.Chunk | chunking.Manifest = chunking.decode_chunk(payload, fed=self.config.federation)
            except wire.WireError as exc:
                if exc.reason != "wrong_kind":
                    raise
                item = chunking.decode_manifest(payload, fed=self.config.federation)
            if isinstance(item, chunking.Manifest):
                self._on_update_manifest(agent, item, key, now)
                return
            r = self.assemblies.get(agent)
            if r is None:
                raise chunking.ChunkError("chunk_without_manifest", f"chunk {item.index} with no payload in progress")
            done = r.add(item)
        except wire.WireError as exc:
            self._chunk_reject(exc.reason, f"chunked update from {agent}: {exc.detail}")
            if exc.reason == "chunk_total_mismatch":
                self.assemblies.pop(agent, None)
                self._release(agent)
            conn.release_acks([key] if key else [])
            return
        if key is not None:
            self._held_acks.setdefault(agent, []).append(key)
        if done is None:
            return
        del self.assemblies[agent]
        log.info("chunked update from %s complete (%d bytes, %d chunks)", agent, len(done), item.index + 1)
        # As if it had arrived whole: the coordinator's checks, its journal record, then
        # (flush, in this read pass) the acks of every message of the payload.
        self.on_message(conn, self.coordinator.topics.update(agent), done, {})
        del done
        self._release(agent)

    def _on_update_manifest(self, agent: str, m: chunking.Manifest, key: tuple[int, int] | None, now: float) -> None:
        if m.of != "update":
            raise chunking.ChunkError("chunk_bad_manifest", f"a manifest of a {m.of} on an update topic")
        if self.coordinator.open is None:
            # Nothing could accept it: refuse before buffering anything (updates would be no_open_round).
            raise wire.WireError("no_open_round", f"manifest of payload {m.id} from {agent}")
        o = self.coordinator.open
        if agent not in self.coordinator.agents and agent not in o.chosen:
            # Only agents that announced themselves (a status) or are selected in the
            # open attempt get a buffer: a flood of made-up ids cannot make the
            # aggregator hold one model each. (After a restart the session delivers
            # the held chunks of a selected agent before the retained statuses, and
            # the resumed attempt's selection comes from the journal.)
            raise wire.WireError("not_selected", f"manifest of payload {m.id} from {agent}, who sent no status "
                                                 "and is not selected")
        r = self.assemblies.get(agent)
        if r is None:
            r = self.assemblies[agent] = chunking.Reassembler(max_total=self._max_update_bytes,
                                                              timeout=self.chunk_timeout)
        if r.begin(m, now):
            # A new payload replaces the one in progress: the old one's messages are
            # not needed any more, so they are acknowledged (dropped).
            self._release(agent)
            log.info("chunked update from %s: %d bytes in %d chunks (payload %s)", agent, m.size, m.count, m.id)
        if key is not None:
            self._held_acks.setdefault(agent, []).append(key)

    def _expire_chunked(self) -> None:
        """Drop chunked updates whose chunks stopped coming (chunk_incomplete) and acknowledge their messages."""
        now = self.clock()
        expired = False
        for agent, r in list(self.assemblies.items()):
            err = r.expire(now)
            if err is not None:
                del self.assemblies[agent]
                self._chunk_reject(err.reason, f"chunked update from {agent}: {err.detail}")
                self._release(agent)
                expired = True
        if expired:
            self.conn.send_acks()

    def _model_too_large(self, p: Publish) -> bool:
        limit = chunking.effective_limit(self.conn.max_packet_size, self.config.broker.max_packet_size)
        # (the two signature properties add under 256 bytes; not signing twice a model of megabytes)
        return self.conn.packet_size(p) + (256 if self.signer is not None else 0) > limit

    def _publish_model_chunks(self, p: Publish) -> None:
        """The model above the packet limit: retained chunks first, then its (signed) manifest on ``model``.

        One client's publishes reach the broker in order, so once the manifest is
        retained its chunks are too: a late joiner reads the manifest and then
        fetches the retained chunks. Retained chunk topics a smaller earlier
        model left beyond the new count are cleared.
        """
        t = self.coordinator.topics
        limit = chunking.effective_limit(self.conn.max_packet_size, self.config.broker.max_packet_size)
        try:
            m, pieces = chunking.split(p.payload, chunking.chunk_size_for(limit), fed=self.config.federation,
                                       round=self.coordinator.round, of="model")
        except ValueError as exc:
            self._stop_for_good(f"broker: the model message of {len(p.payload)} bytes exceeds the broker's maximum "
                                f"packet size of {limit} bytes and cannot go in chunks ({exc}): raise the broker's "
                                "max_packet_size or use a smaller model")
            return
        for i, piece in enumerate(pieces):
            chunk = chunking.Chunk(m.fed, m.round, m.sha256, i, piece)
            self.conn.publish(Publish(t.model_chunk(i), chunking.encode_chunk(chunk), qos=1, retain=True))
        for i in range(m.count, self._model_chunks_published):
            self.conn.publish(Publish(t.model_chunk(i), b"", qos=1, retain=True))
        self._model_chunks_published = m.count
        log.info("model of round %d published in %d chunks of %d bytes (payload %s)", m.round, m.count,
                 m.chunk_size, m.id)
        self.conn.publish(self._signed(Publish(t.model, chunking.encode_manifest(m), qos=1, retain=True)))


def central_evaluator(config: AggregatorConfig) -> Evaluator:
    """Evaluate every new global model on the configured central test set."""
    X, y = load_data(config.test_data, config.label_column)
    model = config.model.build()
    model.check_data(X, y, f"test_data {config.test_data}")
    return lambda params: model.evaluate(params, X, y)
