"""The integration suite's main scenario over a 3-node NATS server cluster speaking MQTT 3.1.1.

deploy/scale.md "Broker tier": the aggregator on node 1, agents spread over
nodes 2 and 3, every client with ``[broker] protocol = "3.1.1"``, 8 MiB
packets and the other nodes as ``failover``. A round, a late joiner that
catches up from retained messages published on another node, an agent that
vanishes without DISCONNECT (its will crosses nodes), and a SIGKILL of the
node three agents and the late joiner are on while a round is open: they
reconnect to another node, take part in later rounds, and the federation
finishes.

What nats-server 2.9.10 does (measured here, and what shapes the waits below):

- Each MQTT QoS 1 subscription is a JetStream consumer (``consumer_replicas:
  3``, aggregator/nats_cluster.py), created within the MQTT layer's fixed 4 s
  JetStream timeout or refused (SUBACK 0x80; fedmqtt's Connection asks again
  every 5 s). With all nodes up that is 0.1-0.8 s. With a node down, the new
  consumer's raft group still includes the dead node (2.9.10 places it on all
  the stream's peers) and gets no leader within 4 s when the dead node is its
  randomly chosen preferred leader: about a third of new subscriptions are
  refused, for as long as the node is down (29 % still 45 s after the kill),
  and none once it is back. A failed-over agent (clean session: all four of
  its subscriptions are new) thus gets its subscriptions back after a random
  number of 5 s retries; measured from the kill until all four such agents
  counted again: 18 s to more than 50 s. So the test waits for that
  condition (NATS lists the model, notice and task subscriptions of every
  failed-over agent) for NODE_DOWN_WAIT_S with the node down, and if NATS has
  not got there, restarts the node, saying why, and waits again. Once the node
  is back, NATS may hold back deliveries of consumers created while it was
  down for a while (seen: two rounds at their deadline without an agent that
  had its subscriptions, 15-30 s after the restart; once the done task
  reached one agent more than 30 s late or never), so the waits after a
  restart are longer.
- For some seconds after the kill a live node may also close live connections
  (most likely a QoS 1 publish JetStream could not store in time while the
  leader of the MQTT stream, on the dead node, was being replaced);
  the will of such a connection can reach the aggregator after the agent's
  fresh "online" status published through another node, and the aggregator
  then counts a connected agent offline (status messages carry nothing to
  order them by). With ``min_agents = 6`` no round would ever open again (seen:
  the federation stuck after round 3), so from the kill on rounds open with
  whoever the aggregator counts online.

Every failure message carries the run's story (rounds and who took part, each
agent's node, connection and subscriptions as NATS lists them, the
aggregator's view, each node's state and last errors, the log tail).

Needs Debian's nats-server (2.9); scripts/setup.sh installs it. Skipped,
saying so, where it is not installed.
"""

from __future__ import annotations

import collections
import json
import logging
import queue
import time
import urllib.request

import pytest

from aggregator.config import AggregatorConfig, ModelConfig, RoundConfig, SecurityConfig, TrainingConfig
from aggregator.datasets import federated_digits
from aggregator.nats_cluster import NATS_MAX_PACKET, NatsCluster, find_nats_server
from aggregator.sim import Simulation
from edge_agent.agent import AgentCore, AgentRunner
from edge_agent.mqtt import Loop

from .conftest import WAIT_S

pytestmark = [
    pytest.mark.broker,
    pytest.mark.skipif(find_nats_server() is None,
                       reason="nats-server is not installed (scripts/setup.sh installs it with apt-get; by hand: "
                              "apt-get install nats-server)"),
]

log = logging.getLogger(__name__)

# Seconds each agent "trains" (Simulation train_delay): long enough that a kill
# right after a round opens always lands before the victims' updates.
TRAIN_DELAY_S = 1.5
# Round deadline: a round short of an update (the killed agent, agents whose
# subscriptions NATS refused) closes here with the others' (quorum 1); every
# other round closes as soon as all arrived (~1.6 s).
ROUND_TIMEOUT_S = 10.0
AGGREGATOR_NODE, NODE_A, NODE_B = 0, 1, 2
# Rounds: 1 with all six, 2 without the killed agent, 3 with the node kill,
# then room for the failed-over agents to count again: up to NODE_DOWN_WAIT_S
# + NODE_BACK_WAIT_S after the kill (rounds at their deadline meanwhile), and
# a round or two of margin. Rounds with everyone are short, so spare ones cost
# ~1.6 s each.
ROUNDS = 9
# How long the failed-over agents get, with node 3 down, to have the
# subscriptions they need granted (module docstring) before node 3 is restarted.
NODE_DOWN_WAIT_S = 20.0
# ... and after the restart (measured: no subscription refused once the node is
# back, so the next 5 s retry of each agent goes through); also the extra time
# the survivors get to see the federation finish after a restart.
NODE_BACK_WAIT_S = 30.0
# A round at its deadline without quorum is tried again: round 3 may need two deadlines
# (the aggregator's own consumer is silent for 5-9 s when its leader was on the
# dead node, seen: round 3 attempt 0 with no update).
ROUND_3_WAIT_S = WAIT_S + 2 * ROUND_TIMEOUT_S
MONITOR_TIMEOUT_S = 2.0


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with NatsCluster(3, tmp_path_factory.mktemp("nats")) as c:
        yield c


def nats_subject(topic: str) -> str:
    """The NATS subject nats-server's MQTT layer subscribes for an MQTT topic filter (no '.' in ours)."""
    return topic.replace("/", ".").replace("+", "*").replace("#", ">")


class Story(logging.Handler):
    """What happened in this run, for every assertion message: the test's events, the rounds and who
    took part, each client's node and subscriptions as NATS lists them, the nodes' errors, the log tail."""

    def __init__(self, cluster: NatsCluster) -> None:
        super().__init__(logging.INFO)
        self.cluster = cluster
        self.t0 = time.monotonic()
        self.lines: collections.deque[str] = collections.deque(maxlen=400)
        self.events: list[str] = []
        # (round, attempt, closed at [s since start], seconds open, agents whose update counted)
        self.rounds: list[tuple[int, int, float, float, frozenset[str]]] = []
        self.refused: collections.Counter[str] = collections.Counter()  # refused SUBACKs by client id
        self.agents: dict[str, AgentRunner] = {}
        self.home: dict[str, str] = {}  # agent -> the node it was started on
        self.received: dict[str, collections.deque[str]] = {}  # agent -> its last messages (topic@time)
        self.ra = None
        self.killed_at: float | None = None

    # -- recording ----------------------------------------------------------

    def now(self) -> float:
        return time.monotonic() - self.t0

    def emit(self, record: logging.LogRecord) -> None:
        try:
            msg = record.getMessage()
        except Exception:  # noqa: BLE001 - a bad log call must not break the test
            msg = str(record.msg)
        if "refused the subscription" in msg and record.args:
            self.refused[str(record.args[0])] += 1
        self.lines.append(f"{self.now():6.1f}s {record.levelname[0]} {record.name}: {msg[:300]}")

    def event(self, what: str) -> None:
        self.events.append(f"{self.now():.1f}s {what}")
        log.info("%s", what)

    def watch_rounds(self, ra) -> None:
        """Record who took part in each closed round (RoundSummary only counts them)."""
        self.ra = ra
        coordinator = ra.coordinator
        close = coordinator._close

        def recording_close(now: float):
            o = coordinator.open
            actions = close(now)
            if o is not None and coordinator.round == o.round:  # closed, not abandoned
                self.rounds.append((o.round, o.attempt, self.now(), now - o.opened_at, frozenset(o.received)))
            return actions

        coordinator._close = recording_close

    def add_agents(self, runners: list[AgentRunner], node: int) -> None:
        for r in runners:
            self.agents[r.core.agent_id] = r
            self.home[r.core.agent_id] = self.cluster.nodes[node].name
            self._watch_messages(r)

    def _watch_messages(self, runner: AgentRunner) -> None:
        """Remember the last messages each agent got (when deliveries stop, the report shows since when)."""
        got = self.received[runner.core.agent_id] = collections.deque(maxlen=4)
        on_message = runner.on_message  # the Connection calls its handler's on_message

        def recording(conn, topic: str, payload: bytes, props) -> None:
            got.append(f"{topic.rsplit('/', 1)[-1]}@{self.now():.1f}s")
            on_message(conn, topic, payload, props)

        runner.on_message = recording

    # -- questions ----------------------------------------------------------

    def rounds_of(self, agent: str, since_round: int = 1) -> list[int]:
        return [r for r, _, _, _, who in list(self.rounds) if r >= since_round and agent in who]

    def closed(self, rnd: int):
        return next((x for x in list(self.rounds) if x[0] == rnd), None)

    def node_of(self, port: int):
        return next((n for n in self.cluster.nodes if n.mqtt_port == port), None)

    def nats_subscriptions(self, client_id: str, port: int) -> set[str] | None:
        """Subjects NATS lists for the MQTT client on the node at ``port``; None when it cannot say."""
        node = self.node_of(port)
        if node is None or not node.alive:
            return None
        url = f"http://127.0.0.1:{node.http_port}/connz?subs=1&mqtt_client={client_id}"
        try:
            with urllib.request.urlopen(url, timeout=MONITOR_TIMEOUT_S) as f:
                conns = json.loads(f.read()).get("connections") or []
        except (OSError, ValueError):
            return None
        return {s for c in conns for s in (c.get("subscriptions_list") or [])}

    def missing_subscriptions(self, runner: AgentRunner, needed: bool = False) -> list[str] | None:
        """Topics of ``runner`` that NATS does not list (yet) on its node; None while it is not connected.
        ``needed``: only those it needs to take part (model, selection notice, task; not the inbox,
        which only secure aggregation uses)."""
        conn = runner.conn
        if not conn.connected:
            return None
        have = self.nats_subscriptions(conn.client_id, conn.address[1])
        if have is None:
            return None
        t = runner.core.topics
        topics = [t.model, t.selected(runner.core.agent_id), t.task] if needed else runner.subscriptions()
        return [topic for topic in topics if nats_subject(topic) not in have]

    def subscribed(self, runners: list[AgentRunner], needed: bool = False) -> bool:
        return all(self.missing_subscriptions(r, needed) == [] for r in runners)

    # -- the report ---------------------------------------------------------

    def report(self) -> str:
        out = [f"--- at {self.now():.1f}s; test events: " + "; ".join(self.events)]
        try:
            out.append("rounds closed (round/attempt, closed at, seconds open, who counted): " + (" | ".join(
                f"r{r}/a{a} {t:.1f}s {sec:.1f}s {sorted(who)}" for r, a, t, sec, who in list(self.rounds))
                or "none"))
            co = self.ra.coordinator if self.ra is not None else None
            for agent, r in self.agents.items():
                c, conn = r.core, r.conn
                node = self.node_of(conn.address[1])
                missing = self.missing_subscriptions(r)
                seen = co.agents.get(agent) if co is not None else None
                out.append(
                    f"{agent} (started on {self.home.get(agent)}): "
                    f"{'connected to' if conn.connected else 'NOT connected, next try'} "
                    f"{node.name if node else conn.address}"
                    f"{'' if node is None or node.alive else ' (dead)'}; NATS lacks "
                    f"{'?' if missing is None else [m.rsplit('/', 1)[-1] for m in missing]}; "
                    f"refused SUBACKs {self.refused.get(conn.client_id, 0)}; aggregator counts it "
                    f"{'?' if seen is None else ('online' if seen.online else 'OFFLINE')}; took part in rounds "
                    f"{self.rounds_of(agent)}; model r{c.model_msg.round if c.model_msg else None}, task "
                    f"{(c.task.round, c.task.attempt, c.task.state) if c.task else None}, finished {c.finished}, "
                    f"updates sent {c.updates_sent}, dropped {dict(c.rejected)}, last messages "
                    f"{list(self.received.get(agent, ()))}")
            if co is not None:
                o = co.open
                conn = self.ra.service.conn
                out.append(
                    f"aggregator: last closed round {co.round}, open "
                    f"{(o.round, o.attempt, sorted(o.selected), sorted(o.received)) if o else None}, min_agents "
                    f"{co.config.round.min_agents}, counts online {sorted(a for a, i in co.agents.items() if i.online)}"
                    f", rejected {dict(co.rejected)}, connected {conn.connected}, refused SUBACKs "
                    f"{self.refused.get(conn.client_id, 0)}")
            for n in self.cluster.nodes:
                out.append(self._node_line(n))
        except Exception as exc:  # noqa: BLE001 - the report must never hide the failure it explains
            out.append(f"(report incomplete: {exc!r})")
        out.append("log tail:\n  " + "\n  ".join(list(self.lines)[-50:]))
        return "\n".join(out)

    def healthy(self, n) -> bool:
        """The node's /healthz says ok (JetStream current: what a restarted node reaches once caught up)."""
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{n.http_port}/healthz", timeout=MONITOR_TIMEOUT_S) as f:
                return json.loads(f.read()).get("status") == "ok"
        except (OSError, ValueError):
            return False

    def _node_line(self, n) -> str:
        state = "DOWN"
        if n.alive:
            state = f"up, healthz {'ok' if self.healthy(n) else 'NOT ok'}"
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{n.http_port}/jsz", timeout=MONITOR_TIMEOUT_S) as f:
                    meta = json.loads(f.read()).get("meta_cluster") or {}
                state += f", meta leader {meta.get('leader')}"
            except (OSError, ValueError) as exc:
                state += f", jsz: {exc}"
        lines = self.cluster.log_tail(n, 400_000).splitlines()
        errs = [ln.split(" ", 2)[-1] for ln in lines
                if ("[ERR]" in ln or "[WRN]" in ln) and "Error trying to connect to route" not in ln]
        refused = sum("Unable to add JetStream consumer" in ln for ln in lines)
        no_connect = sum("unable to connect" in ln for ln in lines)
        return (f"nats {n.name}: {state}; {refused} subscriptions refused (consumer not created in time), "
                f"{no_connect} connects refused, {len(errs)} ERR/WRN, last: " + " || ".join(e[:200] for e in errs[-3:]))


def _wait(pred, what: str, story: Story, timeout: float = WAIT_S, poll: float = 0.05) -> float:
    """Wait for ``pred``; on timeout fail with what was waited for and the story. Returns the seconds waited."""
    start = time.monotonic()
    while not pred():
        if time.monotonic() - start > timeout:
            raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}\n{story.report()}")
        time.sleep(poll)
    return time.monotonic() - start


def _next_round(ra, what: str, story: Story, timeout: float):
    """The next RoundClosed summary, or a failure saying which round was awaited, with the story."""
    try:
        return ra.rounds.get(timeout=timeout).summary
    except queue.Empty:
        raise AssertionError(f"no round closed within {timeout:.0f}s (waiting for {what})\n{story.report()}") from None


def test_a_federation_survives_an_agent_kill_and_a_node_kill_on_a_nats_cluster(cluster, fed, tmp_path,
                                                                               start_aggregator, caplog):
    caplog.set_level(logging.INFO)
    story = Story(cluster)
    logging.getLogger().addHandler(story)
    data = federated_digits(7, "iid", 0.5, 3)
    cfg = AggregatorConfig(
        federation=fed, rounds=ROUNDS, state_dir=str(tmp_path / "state"),
        model=ModelConfig(kind="softmax", n_features=64, n_outputs=10),
        training=TrainingConfig(epochs=1, batch_size=16, lr=0.1),
        # 6: round 1 waits for all six, round 3 for the five survivors and the late joiner
        # (lowered to 1 at the node kill: module docstring); quorum 1: a round short of
        # updates closes at its deadline with the others
        round=RoundConfig(min_agents=6, quorum=1, timeout=ROUND_TIMEOUT_S),
        security=SecurityConfig(probe_open_broker=False),  # anonymous by design here; the probe has its own tests
        broker=cluster.broker_config(AGGREGATOR_NODE, failover=False),
    )
    assert cfg.broker.protocol == "3.1.1" and cfg.broker.max_packet_size == NATS_MAX_PACKET, cfg.broker
    sim_a = Simulation(cluster.broker_config(NODE_A), fed, data.agents[0:3], seed=3, indices=range(0, 3),
                       train_delay=TRAIN_DELAY_S)
    sim_b = Simulation(cluster.broker_config(NODE_B), fed, data.agents[3:6], seed=3, indices=range(3, 6),
                       train_delay=TRAIN_DELAY_S)
    late_loop = Loop()
    late = AgentRunner(late_loop, AgentCore("late-agent", fed, data.agents[6], seed=99),
                       cluster.broker_config(NODE_B), train_delay=TRAIN_DELAY_S)
    story.add_agents(sim_a.runners, NODE_A)
    story.add_agents(sim_b.runners + [late], NODE_B)
    six = sim_a.runners + sim_b.runners
    dead = cluster.nodes[NODE_B]
    try:
        # The six agents first, until NATS lists every subscription of theirs: a subscription can be
        # refused on a loaded machine (its consumer not created within 4 s) and is asked for again 5 s
        # later, and an agent without its task or notice would miss round 1.
        sim_a.start()
        sim_b.start()
        took = _wait(lambda: story.subscribed(six), "NATS to list every subscription of the six agents", story,
                     poll=0.3)
        story.event(f"six agents connected and subscribed ({took:.1f}s)")
        ra = start_aggregator(cfg)
        story.watch_rounds(ra)  # in time: round 1 cannot close before its updates are trained (TRAIN_DELAY_S)
        first = _next_round(ra, "round 1", story, WAIT_S + ROUND_TIMEOUT_S)
        story.event(f"round 1 closed: {first.participants} updates")
        # Not necessarily all six: NATS 2.9 may not deliver a message to a subscription a second or two
        # old, though it lists the subscription (seen in fresh-clone CI runs: one agent never got the
        # round-0 model, two others never the open task of round 1, after its "waiting" one and their
        # notices). They miss round 1 and take part from the next messages on; the rounds go on
        # (quorum 1), which is what this test is about.
        assert first.round == 1 and first.participants >= 1, (
            f"round 1 should close with the updates that came: {first}\n{story.report()}")
        if first.participants < 6:
            log.warning("round 1 counted %d of 6: NATS did not deliver a model or task to a new subscriber",
                        first.participants)

        # Round 2 is open with the six. One of them vanishes without DISCONNECT before its update:
        # its will (retained "offline") is published by node 2 and reaches the aggregator on node 1.
        victim = sim_a.runners[0]
        victim_id = victim.core.agent_id
        sim_a.loop.call_soon_threadsafe(victim.conn.abort)
        story.event(f"{victim_id} aborted (no DISCONNECT)")
        # A late joiner on node 3 finds the model and task retained (published through node 1).
        late.start()
        late_loop.start(name="late-agent")
        # NATS 2.9 may also hand a subscriber on another node an older retained message of the
        # topic (seen: the round-0 model after the round-1 one): the agent drops it as replayed.
        _wait(lambda: late.core.model_msg is not None and late.core.model_msg.round >= 1,
              "the late joiner (node 3) to get the retained model of round 1, published through node 1", story)
        story.event("late joiner has the model of round 1")
        _wait(lambda: victim_id in ra.coordinator.agents and not ra.coordinator.agents[victim_id].online,
              f"the aggregator (node 1) to get the last will of {victim_id} (node 2)", story)
        story.event(f"will of {victim_id} arrived")
        second = _next_round(ra, "round 2", story, WAIT_S)
        r2 = story.closed(2)
        assert second.round == 2 and 1 <= second.participants <= 5 and r2 is not None and victim_id not in r2[4], (
            f"round 2 should close at its deadline with the survivors' updates, without {victim_id}: {second}\n"
            f"{story.report()}")

        # Round 3 opens with the five survivors and the late joiner. Node 3 dies while they train:
        # its four agents reconnect to another node (failover) and deliver.
        _wait(lambda: ra.coordinator.open is not None and ra.coordinator.round >= 2, "round 3 to open", story)
        failed_over = sim_b.runners + [late]
        ids = [r.core.agent_id for r in failed_over]

        def lower_min_agents() -> None:  # on the aggregator's loop, like everything it reads
            cfg.round.min_agents = 1

        ra.loop.call_soon_threadsafe(lower_min_agents)  # stale wills after a node death (module docstring)
        cluster.kill(NODE_B)
        story.killed_at = story.now()
        story.event(f"killed {dead.name} with round 3 open")
        took = _wait(lambda: all(r.conn.connected and r.conn.address[1] != dead.mqtt_port for r in failed_over),
                     f"the agents of {dead.name} {ids} to reconnect to another node", story)
        story.event(f"{ids} reconnected elsewhere ({took:.1f}s)")
        # The federation goes on without node 3: the round open at the kill closes with what arrived.
        _wait(lambda: story.closed(3) is not None, f"round 3 to close with {dead.name} down", story,
              timeout=ROUND_3_WAIT_S)
        r3 = story.closed(3)
        story.event(f"round 3 closed with {dead.name} down: {sorted(r3[4])}")

        # A failed-over agent needs its model, notice and task subscriptions back on its new node to
        # take part again. NATS 2.9.10 refuses a third of new subscriptions while node 3 is down (module
        # docstring): wait for NATS to list them, and bring node 3 back if it has not got there.
        left = max(0.0, story.killed_at + NODE_DOWN_WAIT_S - story.now())
        down_end = time.monotonic() + left
        while not story.subscribed(failed_over, needed=True) and time.monotonic() < down_end:
            time.sleep(0.3)
        restarted = not story.subscribed(failed_over, needed=True)
        if not restarted:
            story.event(f"failed-over agents have the subscriptions they need with {dead.name} down")
        else:
            lacking = {r.core.agent_id: story.missing_subscriptions(r, needed=True) for r in failed_over}
            lacking = {a: ("not connected" if m is None else [t.rsplit("/", 1)[-1] for t in m])
                       for a, m in lacking.items() if m != []}
            reason = (f"{NODE_DOWN_WAIT_S:.0f}s after the kill NATS still lacks subscriptions of {lacking} (refused "
                      f"SUBACKs so far: { {a: story.refused.get(r.conn.client_id, 0) for a, r in zip(ids, failed_over)} }"
                      f"; nats-server 2.9.10 refuses about a third of new subscriptions while a node is down)")
            story.event(f"restarting {dead.name}: {reason}")
            log.warning("restarting %s: %s", dead.name, reason)
            cluster.start_node(dead, wait=False)
            took = _wait(lambda: story.subscribed(failed_over, needed=True),
                         f"NATS to list the model, notice and task subscriptions of the failed-over agents {ids} "
                         f"after restarting {dead.name}", story, timeout=NODE_BACK_WAIT_S, poll=0.3)
            story.event(f"failed-over agents have the subscriptions they need, {took:.1f}s after the restart")
        _wait(lambda: all(story.rounds_of(a, since_round=4) for a in ids),
              f"each failed-over agent {ids} to take part in a round after round 3 (NATS lists the "
              "subscriptions they need)", story, timeout=WAIT_S + 2 * ROUND_TIMEOUT_S)
        story.event("every failed-over agent took part again: " + ", ".join(
            f"{a} in {story.rounds_of(a, since_round=4)}" for a in ids))

        try:
            ra.wait_finished(timeout=WAIT_S + ROUNDS * ROUND_TIMEOUT_S)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{story.report()}") from None
        rest = [_next_round(ra, f"round {n}", story, WAIT_S) for n in range(3, ROUNDS + 1)]
        assert [s.round for s in rest] == list(range(3, ROUNDS + 1)) and all(s.participants >= 1 for s in rest), (
            f"rounds 3..{ROUNDS} should each close once with at least one update: {rest}\n{story.report()}")
        # Every survivor saw the federation finish (the retained done task, through node 1 or 2).
        survivors = sim_a.runners[1:] + failed_over
        _wait(lambda: all(r.core.finished for r in survivors),
              f"the survivors {[r.core.agent_id for r in survivors]} to see the federation finish", story,
              timeout=WAIT_S + (NODE_BACK_WAIT_S if restarted else 0.0))
        # Only what resending after a failover explains: an outbox update for a round that closed
        # meanwhile (while the next is open, or before it opened), or for an attempt abandoned
        # meanwhile (the next attempt of the round, drawn while the agent was counted offline, did not
        # select it; seen), a QoS 1 redelivery.
        assert set(ra.coordinator.rejected) <= {"wrong_round", "no_open_round", "not_selected", "duplicate"}, (
            f"updates rejected for a reason a failover does not explain: {dict(ra.coordinator.rejected)}\n"
            f"{story.report()}")
        stale = [a for a, r in story.agents.items()
                 if a != victim_id and r.conn.connected and a in ra.coordinator.agents
                 and not ra.coordinator.agents[a].online]
        if stale:  # the status-ordering gap of the module docstring; nothing the test can wait for
            log.warning("the aggregator counts connected agents %s offline (a will that arrived after their "
                        "online status)", stale)
            story.event(f"aggregator counts connected agents {stale} offline (stale will)")
        print(story.report())
    finally:
        logging.getLogger().removeHandler(story)
        sim_a.stop()
        sim_b.stop()
        late_loop.stop()
        late_loop.thread and late_loop.thread.join(10)
        # (The cluster fixture stops the nodes, node 3 too when it was restarted.)
