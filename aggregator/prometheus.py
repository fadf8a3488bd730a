"""The aggregator's Prometheus/OpenMetrics endpoint (``[metrics] listen = "127.0.0.1:9108"``).

One job: keep a private :class:`~prometheus_client.CollectorRegistry` up to
date from the service and serve it on ``http://<listen>/metrics`` from a
daemon thread. The service (aggregator/service.py) calls :meth:`sync` after
carrying out each batch of coordinator actions, :meth:`agent_changed` after
each status message, and the ``round_*``/``observe_*`` methods from its
``_execute``; everything runs on the service's loop thread, and the scrape
thread only reads the registry (prometheus_client locks each value). The
coordinator stays sans-I/O and never imports this module; this module is
imported only when the endpoint is on.

Every metric has the label ``federation``. The names, with the
``prometheus_client`` suffixes (``_total`` of counters, ``_bucket``/``_sum``/
``_count`` of histograms), are in README "Watching a federation".
"""

from __future__ import annotations

import logging
import re
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from edge_agent.config import ConfigError

from .argtypes import parse_listen
from .coordinator import AgentInfo, RoundSummary

if TYPE_CHECKING:
    from .service import AggregatorService

log = logging.getLogger(__name__)

# Round durations: the demo's rounds take tens of milliseconds, a fleet's minutes.
ROUND_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)
# Journal appends are one write + fsync; checkpoints write the whole model (+ fsyncs).
JOURNAL_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1)
CHECKPOINT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
# A device that cannot train says why in its status: "<code>: <detail>" for a
# problem (edge_agent/agent.py), or the text of the eligibility rule that
# failed (edge_agent/eligibility.py, free text with numbers in it). The label
# is the code, or a fixed code per eligibility rule, so the series stay few.
_CODE = re.compile(r"^([A-Za-z][A-Za-z0-9_]{0,47}):")
ELIGIBILITY_CODES = (
    ("not on mains power", "not_on_mains"),
    ("battery at ", "battery_low"),
    ("CPU load ", "cpu_load"),
    ("outside the training window", "outside_window"),
)
# Reasons are chosen by devices: past this many distinct labels, new ones count as "other".
MAX_REASON_LABELS = 32


def reason_code(info: AgentInfo, model_kind: str) -> str:
    """The label under which a device that cannot train is counted."""
    reason = info.reason.strip()
    if not reason:
        return "unsupported_model" if model_kind not in info.capabilities else "unspecified"
    m = _CODE.match(reason)
    if m:
        return m.group(1)
    for prefix, code in ELIGIBILITY_CODES:
        if reason.startswith(prefix):
            return code
    return "other"


class PrometheusExporter:
    """The metrics of one federation's aggregator, and the HTTP server that serves them."""

    def __init__(self, federation: str, listen: str, model_kind: str) -> None:
        try:
            self.host, self.port = parse_listen(listen)
        except ValueError as exc:
            raise ConfigError(f"metrics.listen: {exc}") from None
        self.listen = listen
        self.federation = federation
        self.model_kind = model_kind
        self.registry = CollectorRegistry(auto_describe=True)
        self.address: tuple[str, int] | None = None  # where it listens, once started
        self._server = None
        self._thread = None
        fed = federation

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(name, doc, ["federation"], registry=self.registry).labels(fed)

        def counter(name: str, doc: str) -> Counter:
            return Counter(name, doc, ["federation"], registry=self.registry).labels(fed)

        def histogram(name: str, doc: str, buckets) -> Histogram:
            return Histogram(name, doc, ["federation"], buckets=buckets, registry=self.registry).labels(fed)

        self.round = gauge("fedmqtt_round", "Last closed round: the round of the current global model")
        self.attempt = gauge("fedmqtt_round_attempt", "Attempt number of the open round (or of the next one)")
        self.round_open = gauge("fedmqtt_round_open", "1 while a round (fedmqtt_round + 1) is open")
        self.round_updates = gauge("fedmqtt_round_updates", "Updates accepted so far in the open round")
        self.finished = gauge("fedmqtt_finished", "1 once the federation has finished")
        self.participants = gauge("fedmqtt_last_round_participants", "Updates accepted in the last closed round")
        self.selected = gauge("fedmqtt_last_round_selected", "Agents selected in the last closed round's attempt")
        self.dropouts = gauge("fedmqtt_last_round_dropouts",
                              "Selected agents whose update the last closed round did not get (sync mode)")
        self.last_seconds = gauge("fedmqtt_last_round_duration_seconds",
                                  "Seconds from opening to closing of the last closed round")
        self.duration = histogram("fedmqtt_round_duration_seconds",
                                  "Seconds from opening to closing of each round closed since start", ROUND_BUCKETS)
        self.closed = counter("fedmqtt_rounds_closed", "Rounds closed since the aggregator started")
        self.abandoned = counter("fedmqtt_rounds_abandoned",
                                 "Round attempts abandoned (deadline short of quorum, ...) since start")
        self.accepted = counter("fedmqtt_updates_accepted", "Updates accepted since the aggregator started")
        self._rejections = Counter("fedmqtt_rejections",
                                   "Messages dropped by the coordinator since start, by reason (as rejected_<reason>)",
                                   ["federation", "reason"], registry=self.registry)
        self.agents_known = gauge("fedmqtt_agents_known", "Agents with a status since the aggregator started")
        self.agents_online = gauge("fedmqtt_agents_online", "Agents whose status says online")
        self.agents_eligible = gauge("fedmqtt_agents_eligible", "Online agents that may be selected")
        self._not_eligible = Gauge("fedmqtt_agents_not_eligible",
                                   "Online agents that may not be selected, by the reason code of their status",
                                   ["federation", "reason"], registry=self.registry)
        self.journal = histogram("fedmqtt_journal_append_seconds",
                                 "Seconds per journal append (the write; fsyncs are fedmqtt_journal_fsync_seconds)",
                                 JOURNAL_BUCKETS)
        self.journal_sync = histogram("fedmqtt_journal_fsync_seconds",
                                      "Seconds per journal fsync (one per group of records written together)",
                                      JOURNAL_BUCKETS)
        self.checkpoint = histogram("fedmqtt_checkpoint_save_seconds", "Seconds per checkpoint save",
                                    CHECKPOINT_BUCKETS)
        self.onnx_failures = counter("fedmqtt_onnx_export_failures", "ONNX exports that failed since start")
        self._epsilon: Gauge | None = None  # created when DP is on
        self._dp_rounds = -1
        # What has been exported, to add exact increments and keep the agent counts.
        self._rejected: dict[str, int] = {}
        self._accepted = 0
        self._onnx_failures = 0
        self._agents: dict[str, tuple[bool, bool, str]] = {}  # agent -> (online, eligible, reason label)
        self._reason_counts: dict[str, int] = {}

    # -- serving -----------------------------------------------------------------------------

    def start(self) -> None:
        """Serve /metrics on a daemon thread; ConfigError naming ``metrics.listen`` if it cannot."""
        if self._server is not None:
            return
        try:
            started = start_http_server(self.port, self.host, registry=self.registry)
        except OSError as exc:
            raise ConfigError(f"metrics.listen: cannot serve on {self.listen!r}: {exc.strerror or exc}") from None
        if not isinstance(started, tuple):  # prometheus-client < 0.17 returns nothing: no way to stop it
            raise ConfigError("metrics.listen: needs prometheus-client >= 0.17")
        self._server, self._thread = started
        self.address = tuple(self._server.server_address[:2])
        log.info("metrics for Prometheus on http://%s/metrics", _url_host(*self.address))

    def stop(self) -> None:
        """Stop serving (idempotent)."""
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        if self._thread is not None:
            self._thread.join(5)

    # -- updates from the service (loop thread) ---------------------------------------------

    def observe_journal(self, seconds: float) -> None:
        self.journal.observe(seconds)

    def observe_journal_sync(self, seconds: float) -> None:
        self.journal_sync.observe(seconds)

    def observe_checkpoint(self, seconds: float) -> None:
        self.checkpoint.observe(seconds)

    def round_closed(self, s: RoundSummary) -> None:
        self.participants.set(s.participants)
        self.selected.set(s.selected)
        self.dropouts.set(s.metrics.get("dropouts", max(0, s.selected - s.participants)))
        self.last_seconds.set(s.seconds)
        self.duration.observe(s.seconds)
        self.closed.inc()

    def round_abandoned(self) -> None:
        self.abandoned.inc()

    def agent_changed(self, agent: str, info: AgentInfo | None) -> None:
        """The coordinator's view of ``agent`` after one of its status messages."""
        before = self._agents.get(agent)
        if info is None:
            return  # never a valid status: not known
        online = info.online
        eligible = online and info.eligible
        label = self._label(reason_code(info, self.model_kind)) if online and not eligible else ""
        now = (online, eligible, label)
        if now == before:
            return
        self._agents[agent] = now
        for state, sign in ((before, -1), (now, 1)):
            if state is None:
                continue
            if state[0]:
                self.agents_online.inc(sign)
            if state[1]:
                self.agents_eligible.inc(sign)
            if state[2]:
                self._reason_counts[state[2]] = self._reason_counts.get(state[2], 0) + sign
                self._not_eligible.labels(self.federation, state[2]).set(self._reason_counts[state[2]])
        self.agents_known.set(len(self._agents))

    def _label(self, code: str) -> str:
        if code in self._reason_counts or len(self._reason_counts) < MAX_REASON_LABELS:
            return code
        return "other"

    def sync(self, service: "AggregatorService") -> None:
        """Copy the coordinator's state: round, attempt, counters (as exact increments), privacy."""
        c = service.coordinator
        self.round.set(c.round)
        self.attempt.set(c.open.attempt if c.open is not None else c.attempt)
        self.round_open.set(1 if c.open is not None else 0)
        self.round_updates.set(len(c.open.received) if c.open is not None else 0)
        self.finished.set(1 if c.finished else 0)
        if c.accepted != self._accepted:
            self.accepted.inc(c.accepted - self._accepted)
            self._accepted = c.accepted
        for reason, n in c.rejected.items():
            done = self._rejected.get(reason, 0)
            if n > done:
                self._rejections.labels(self.federation, reason).inc(n - done)
                self._rejected[reason] = n
        if service.onnx_failures != self._onnx_failures:
            self.onnx_failures.inc(service.onnx_failures - self._onnx_failures)
            self._onnx_failures = service.onnx_failures
        p = c.privacy
        if p is not None and p.accountant.rounds != self._dp_rounds:
            # epsilon() is cached by the accountant until the next round is composed
            self._dp_rounds = p.accountant.rounds
            if self._epsilon is None:
                self._epsilon = Gauge("fedmqtt_dp_epsilon", "Privacy spent so far: epsilon at fedmqtt_dp_delta",
                                      ["federation"], registry=self.registry).labels(self.federation)
                Gauge("fedmqtt_dp_delta", "The delta of (epsilon, delta)", ["federation"],
                      registry=self.registry).labels(self.federation).set(p.cfg.delta)
                if p.budget:
                    Gauge("fedmqtt_dp_epsilon_budget", "No round starts that would take epsilon above this",
                          ["federation"], registry=self.registry).labels(self.federation).set(p.budget)
            self._epsilon.set(p.accountant.epsilon())


def _url_host(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
