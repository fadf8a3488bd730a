"""The integration suite's main scenario over a 3-node NATS server cluster speaking MQTT 3.1.1.

deploy/scale.md "Broker tier": the aggregator on node 1, agents spread over
nodes 2 and 3, every client with ``[broker] protocol = "3.1.1"``, 8 MiB
packets and the other nodes as ``failover``. A round, a late joiner that
catches up from retained messages published on another node, an agent that
vanishes without DISCONNECT (its will crosses nodes), and a SIGKILL of the
node three agents and the late joiner are on while a round is open: they
reconnect to another node and the federation finishes.

Needs Debian's nats-server (2.9); scripts/setup.sh installs it. Skipped,
saying so, where it is not installed.
"""

from __future__ import annotations

import time

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

# Seconds each agent "trains" (Simulation train_delay): long enough that a kill
# right after a round opens always lands before the victims' updates.
TRAIN_DELAY_S = 1.5
# Round deadline: the round in which an agent is killed closes here, with the
# others' updates (quorum 1); every other round closes as soon as all arrived.
ROUND_TIMEOUT_S = 10.0
AGGREGATOR_NODE, NODE_A, NODE_B = 0, 1, 2
# Rounds: 1 with all six, 2 without the killed agent, 3 with the node kill, and
# then enough for NATS 2.9 to re-home the dead node's JetStream consumers
# (seconds, longer on a loaded machine) and the failed-over agents to count again.
ROUNDS = 7


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with NatsCluster(3, tmp_path_factory.mktemp("nats")) as c:
        yield c


def _wait(pred, what: str, timeout: float = WAIT_S) -> None:
    end = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def test_a_federation_survives_an_agent_kill_and_a_node_kill_on_a_nats_cluster(cluster, fed, tmp_path,
                                                                               start_aggregator):
    data = federated_digits(7, "iid", 0.5, 3)
    cfg = AggregatorConfig(
        federation=fed, rounds=ROUNDS, state_dir=str(tmp_path / "state"),
        model=ModelConfig(kind="softmax", n_features=64, n_outputs=10),
        training=TrainingConfig(epochs=1, batch_size=16, lr=0.1),
        # 6: round 1 waits for all six, round 3 for the five survivors and the late joiner;
        # quorum 1: the round short of the killed agent closes at its deadline
        round=RoundConfig(min_agents=6, quorum=1, timeout=ROUND_TIMEOUT_S),
        security=SecurityConfig(probe_open_broker=False),  # anonymous by design here; the probe has its own tests
        broker=cluster.broker_config(AGGREGATOR_NODE, failover=False),
    )
    assert cfg.broker.protocol == "3.1.1" and cfg.broker.max_packet_size == NATS_MAX_PACKET
    ra = start_aggregator(cfg)
    sim_a = Simulation(cluster.broker_config(NODE_A), fed, data.agents[0:3], seed=3, indices=range(0, 3),
                       train_delay=TRAIN_DELAY_S)
    sim_b = Simulation(cluster.broker_config(NODE_B), fed, data.agents[3:6], seed=3, indices=range(3, 6),
                       train_delay=TRAIN_DELAY_S)
    late_loop = Loop()
    late = AgentRunner(late_loop, AgentCore("late-agent", fed, data.agents[6], seed=99),
                       cluster.broker_config(NODE_B), train_delay=TRAIN_DELAY_S)
    try:
        sim_a.start()
        sim_b.start()
        first = ra.rounds.get(timeout=WAIT_S).summary
        # All six, or five at the deadline on a loaded machine: NATS refuses a subscription while it
        # creates its streams (the first connects) and the agent asks again SUBSCRIBE_RETRY_S later.
        assert first.round == 1 and first.participants >= 5, first

        # Round 2 is open with the six. One of them vanishes without DISCONNECT before its update:
        # its will (retained "offline") is published by node 2 and reaches the aggregator on node 1.
        victim = sim_a.runners[0]
        sim_a.loop.call_soon_threadsafe(victim.conn.abort)
        # A late joiner on node 3 finds the model and task retained (published through node 1).
        late.start()
        late_loop.start(name="late-agent")
        # NATS 2.9 may also hand a subscriber on another node an older retained message of the
        # topic (seen: the round-0 model after the round-1 one): the agent drops it as replayed.
        _wait(lambda: late.core.model_msg is not None and late.core.model_msg.round >= 1,
              "the late joiner to get the retained model of round 1")
        _wait(lambda: victim.core.agent_id in ra.coordinator.agents
              and not ra.coordinator.agents[victim.core.agent_id].online, "the killed agent's last will")
        second = ra.rounds.get(timeout=WAIT_S).summary
        # closed at its deadline (it waited for six), without the victim
        assert second.round == 2 and 1 <= second.participants <= 5, second

        # Round 3 opens with the five survivors and the late joiner. Node 3 dies while they train:
        # its four agents reconnect to another node (failover) and deliver.
        _wait(lambda: ra.coordinator.open is not None and ra.coordinator.round >= 2, "round 3 to open")
        on_b = [r.conn for r in sim_b.runners] + [late.conn]
        cluster.kill(NODE_B)
        _wait(lambda: all(c.connected and c.address[1] != cluster.nodes[NODE_B].mqtt_port for c in on_b),
              "the agents of the killed node to reconnect elsewhere")
        ra.wait_finished(timeout=WAIT_S + (ROUNDS - 2) * ROUND_TIMEOUT_S)
        rest = [ra.rounds.get(timeout=WAIT_S).summary for _ in range(ROUNDS - 2)]
        assert [s.round for s in rest] == list(range(3, ROUNDS + 1))
        # NATS 2.9 takes seconds to re-home the JetStream consumers of a dead node: meanwhile it
        # refuses some new subscriptions (the Connection asks again), may reset connections and may
        # hand out an older retained message, so rounds can close at their deadline without some
        # failed-over agents. Node 2's two survivors give at most 2 updates a round: a round with
        # more counted failed-over agents, so the federation got them back.
        assert all(s.participants >= 1 for s in rest) and max(s.participants for s in rest) > 2, rest
        # Every survivor saw the federation finish (the retained done task, through node 1 or 2).
        _wait(lambda: all(r.core.finished for r in sim_a.runners[1:] + sim_b.runners + [late]),
              "the agents to see the end")
        # Only what resending after a failover explains: an outbox update for a round that closed
        # meanwhile (while the next is open, or before it opened), a QoS 1 redelivery.
        assert set(ra.coordinator.rejected) <= {"wrong_round", "no_open_round", "duplicate"}, ra.coordinator.rejected
    finally:
        sim_a.stop()
        sim_b.stop()
        late_loop.stop()
        late_loop.thread and late_loop.thread.join(10)
        # (Node 3 stays down: the cluster fixture stops the nodes; restarting one waits for
        # JetStream to be current again, which under load can take longer than its timeout.)
