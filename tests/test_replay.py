"""Replay protection (issue 10, item 7): run ids, the order agents accept models and tasks in.

The aggregator stamps every model and task with its federation run (the
millisecond its state was created); agents refuse a model or task older than
the newest they accepted, and keep that across restarts.
"""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from aggregator import checkpoint
from aggregator.config import AggregatorConfig, ModelConfig, OnnxConfig, RoundConfig, SecurityConfig, TrainingConfig
from aggregator.coordinator import Coordinator, SaveCheckpoint, run_id
from aggregator.datasets import federated_digits
from aggregator.service import AggregatorService
from aggregator.strategies import FedAvg
from edge_agent import wire
from edge_agent.agent import AgentCore, AgentRunner, DropOutbox, SaveAccepted, SaveTrained, Train, task_key
from edge_agent.agent_store import ACCEPTED_FILE, AgentStore
from edge_agent.config import BrokerConfig
from edge_agent.data import LocalData
from edge_agent.mqtt import Loop, Publish
from edge_agent.signing import Verifier
from edge_agent.topics import Topics

from . import test_agent
from .conftest import WAIT_S, RawClient
from .test_agent import trains
from .test_coordinator import T, config, published, started, status, update
from .test_security import make_key

RUN = 1_700_000_000_000


# -- the aggregator: run ids ----------------------------------------------------------


def _run_of(actions, topic: str) -> list[int]:
    return [wire.decode(p.payload).run for p in published(actions, topic)]


def test_every_model_and_task_carries_the_run_id():
    c = Coordinator(config(min_agents=1, rounds=1, timeout=5.0), FedAvg(), run=RUN)
    actions = c.start(0.0)
    assert _run_of(actions, T.model) == [RUN] and _run_of(actions, T.task) == [RUN]  # waiting
    assert wire.decode(published(actions, T.task)[0].payload).state == "waiting"
    actions = c.receive(*status("a0"), now=0.0)
    assert _run_of(actions, T.task) == [RUN]  # open
    actions = c.receive(*update(c, "a0", [1, 1]), now=1.0)
    (done,) = published(actions, T.task)
    assert _run_of(actions, T.model) == [RUN] and wire.decode(done.payload).state == "done"
    assert wire.decode(done.payload).run == RUN


def test_a_done_task_carries_the_attempt_that_would_open_next():
    # Agents order a done task where the next waiting task would stand, so it
    # names that attempt, as a waiting task does: 0 after a close, more when
    # the privacy budget ends a round that was abandoned before.
    c = started(n_agents=1, min_agents=1, rounds=1)
    c.tick(100.0)  # round 1 attempt 0 abandoned, attempt 1 opens
    assert (c.open.round, c.open.attempt) == (1, 1)
    (done,) = published(c.receive(*update(c, "a0", [1, 1]), now=101.0), T.task)
    done = wire.decode(done.payload)
    assert (done.state, done.round, done.attempt) == ("done", 1, 0)
    c.attempt = 3
    done = wire.decode(c._task_done().payload)
    assert (done.round, done.attempt) == (1, 3)


def test_the_run_id_survives_checkpoint_and_restore():
    c = Coordinator(config(min_agents=1), FedAvg(), run=RUN)
    first = c.start(0.0)
    # the new run id is made durable before any message carries it
    assert isinstance(first[0], SaveCheckpoint) and first[0].state["run"] == RUN
    c.receive(*status("a0"), now=0.0)
    ck = next(a for a in c.receive(*update(c, "a0", [1, 1]), now=1.0) if isinstance(a, SaveCheckpoint))
    assert ck.state["run"] == RUN
    resumed = Coordinator(config(min_agents=1), FedAvg(), state=ck.state, run=RUN + 5_000)
    assert resumed.run == RUN
    actions = resumed.start(2.0)
    assert not any(isinstance(a, SaveCheckpoint) for a in actions)  # nothing new to save
    assert _run_of(actions, T.model) == [RUN] and set(_run_of(actions, T.task)) == {RUN}


def test_a_checkpoint_older_than_run_ids_takes_a_new_one_and_saves_it():
    c = started(n_agents=1, min_agents=1)
    ck = next(a for a in c.receive(*update(c, "a0", [1, 1]), now=1.0) if isinstance(a, SaveCheckpoint)).state
    del ck["run"]
    resumed = Coordinator(config(min_agents=1), FedAvg(), state=ck, run=RUN)
    actions = resumed.start(2.0)
    assert resumed.run == RUN and resumed.round == 1
    assert isinstance(actions[0], SaveCheckpoint) and actions[0].state["run"] == RUN
    assert _run_of(actions, T.model) == [RUN]


def test_a_fresh_state_with_a_journal_to_replay_keeps_the_journal():
    # Saving a checkpoint resets the journal; with records to replay that
    # would lose accepted updates, so the run id waits for the next close.
    c = Coordinator(config(min_agents=1), FedAvg(), run=RUN)
    c.start(0.0)
    journal = [a.record for a in c.receive(*status("a0"), now=0.0) if hasattr(a, "record")]
    assert [r["type"] for r in journal] == ["open"]
    again = Coordinator(config(min_agents=1), FedAvg(), journal=journal, run=RUN + 1)
    actions = again.start(1.0)
    assert not any(isinstance(a, SaveCheckpoint) for a in actions) and again.open.round == 1
    ck = next(a for a in again.receive(*update(again, "a0", [1, 1]), now=2.0) if isinstance(a, SaveCheckpoint))
    assert ck.state["run"] == RUN + 1


def test_the_run_id_is_checked():
    for bad in (0, -1, wire.MAX_RUN + 1):
        with pytest.raises(ValueError, match="run id"):
            Coordinator(config(), FedAvg(), run=bad)
    assert run_id(1_700_000_000.1234) == 1_700_000_000_123


def test_the_service_takes_the_run_from_its_clock_and_a_reset_federation_gets_a_larger_one(tmp_path):
    def service(now: float) -> AggregatorService:
        cfg = AggregatorConfig(federation="svc", rounds=2, state_dir=str(tmp_path / "state"),
                               model=ModelConfig(kind="linear", n_features=1, n_outputs=1), onnx=OnnxConfig(every=0))
        return AggregatorService(cfg, Loop(), clock=lambda: now)

    first = service(1_700_000_000.0)
    assert first.coordinator.run == 1_700_000_000_000
    first._execute(first.coordinator.start(1_700_000_000.0)[:1])  # the checkpoint only, nothing to publish to
    assert checkpoint.load(tmp_path / "state")["run"] == 1_700_000_000_000
    # restarted later: the same run
    assert service(1_700_000_100.0).coordinator.run == 1_700_000_000_000
    # the state directory wiped: a reset federation, a larger run
    (tmp_path / "state" / checkpoint.CHECKPOINT_NAME).unlink()
    assert service(1_700_000_200.0).coordinator.run == 1_700_000_200_000



# -- the agent: what it accepts, in which order ---------------------------------------


def _model(round_: int, run: int = RUN) -> tuple[str, bytes]:
    return test_agent.model_msg(round_=round_, run=run)[:2]


def _task(round_: int, state: str = "open", attempt: int = 0, run: int = RUN) -> tuple[str, bytes]:
    m = test_agent.model_msg(round_=round_ - 1 if state != "done" else round_, run=run)[2]
    return test_agent.task_msg(m, attempt=attempt, state=state, round_=round_)


def _newest(c: AgentCore) -> tuple:
    return (c.model_msg.run, c.model_msg.round) if c.model_msg else None, c.task and task_key(c.task)


def test_a_replayed_older_model_is_refused_and_counted():
    c = test_agent.core()
    c.receive(*_model(3))
    c.receive(*_model(5))
    before = _newest(c)
    assert c.receive(*_model(3)) == []
    assert c.rejected == {"replayed": 1} and _newest(c) == before and c.accepted_model == (RUN, 5)


def test_a_replayed_old_done_task_is_refused_and_the_agent_goes_on():
    c = test_agent.core()
    c.receive(*_model(5))
    c.receive(*_task(6))
    assert c.receive(*_task(2, state="done")) == []  # the end of round 2, long ago
    assert c.rejected == {"replayed": 1} and not c.finished and c.task.state == "open"
    # a done task of an earlier run of the federation, however late its round
    assert c.receive(*_task(50, state="done", run=RUN - 1)) == []
    assert c.rejected == {"replayed": 2} and not c.finished


def test_an_equal_key_is_accepted_the_same_retained_message_again():
    c = test_agent.core()
    model, task = _model(5), _task(6)
    assert c.receive(*model) == [SaveAccepted((RUN, 5), None)]
    c.receive(*task)
    # again (a redelivery, or republished by a restarted aggregator): accepted, nothing to save
    assert not any(isinstance(a, SaveAccepted) for a in c.receive(*model) + c.receive(*task))
    assert not c.rejected and _newest(c) == ((RUN, 5), (RUN, 6, 0, 1))


def test_a_larger_run_is_a_reset_federation_followed_and_the_old_run_forgotten():
    c = test_agent.core()
    c.receive(*_model(20))
    c.receive(*_task(20, state="done"))
    assert c.finished
    c.trained |= {(19, 0), (20, 0)}
    c.outbox[(20, 0)] = b"old"
    topic, payload, m = test_agent.model_msg(round_=0, run=RUN + 1)
    actions = c.receive(topic, payload)
    assert actions == [SaveTrained(set()), DropOutbox((20, 0)), SaveAccepted((RUN + 1, 0), (RUN, 21, 0, 0))]
    assert c.trained == set() and c.outbox == {} and not c.finished
    assert c.task is None  # the old run's task never meets the new run's model
    assert trains(test_agent.deliver(c, m)) == [Train(1, 0)]
    # the old run is over: its messages are replays now
    assert c.receive(*_model(20)) == [] and c.receive(*_task(20, state="done")) == []
    assert c.rejected == {"replayed": 2} and not c.finished


def test_the_new_run_may_announce_itself_by_its_task_first():
    # MQTT orders messages within a topic only: the reset federation's task can come first
    c = test_agent.core()
    c.receive(*_model(7))
    c.trained.add((7, 0))
    topic, payload, m = test_agent.model_msg(round_=0, run=RUN + 1)
    actions = test_agent.deliver(c, m)
    assert SaveTrained(set()) in actions and c.model_msg is None
    assert c.receive(*_model(7)) == [] and c.rejected == {"replayed": 1}  # the old run's model, late
    assert trains(c.receive(topic, payload)) == [Train(1, 0)]


def test_the_order_the_aggregator_publishes_is_accepted_step_by_step():
    c = test_agent.core()
    steps = [
        _model(0), _task(1, "waiting"), _task(1, "open"),
        _task(1, "waiting", attempt=1), _task(1, "open", attempt=1),  # abandoned, re-run
        _task(1, "open", attempt=2),  # abandoned again, re-opened at once
        _model(1), _task(2, "open"), _model(2),
        _task(2, "done"),  # rounds done
        _task(3, "waiting"), _task(3, "open"),  # continued with more rounds
        _task(3, "waiting", attempt=1), _task(2, "done", attempt=1),  # privacy budget spent after an abandon
        _task(3, "waiting", attempt=1),  # continued with a larger budget
    ]
    for i, msg in enumerate(steps):
        c.receive(*msg)
        assert not c.rejected, (i, c.rejected)
    # every step that is not the current one is a replay now
    for msg in steps[:-1]:
        c.receive(*msg)
    # equal to what it holds: the model of round 2, the waiting task (3, 1) and
    # the done task just before it (a done task ranks with the next waiting one)
    assert c.rejected["replayed"] == len(steps) - 1 - 3


def test_a_task_behind_the_model_and_a_model_behind_the_task_are_replays():
    # a new device (nothing remembered) meets a replayed retained message beside a current one
    c = test_agent.core()
    c.receive(*_model(5))
    assert c.receive(*_task(2, state="done")) == [] and not c.finished
    assert c.receive(*_task(5, "open")) == []  # round 5 is closed: model 5 came out of it
    d = test_agent.core()
    d.receive(*_task(6, "open"))
    assert d.receive(*_model(3)) == [] and d.model_msg is None
    assert c.rejected == {"replayed": 2} and d.rejected == {"replayed": 1}
    d.receive(*_model(5))
    assert d.model_msg.round == 5 and d.rejected == {"replayed": 1}


def test_run_zero_is_an_older_aggregator_ordered_like_any_run():
    c = test_agent.core()
    c.receive(*_model(5, run=0))
    assert c.receive(*_model(3, run=0)) == [] and c.rejected == {"replayed": 1}
    c.trained.add((5, 0))
    actions = c.receive(*_model(5, run=RUN))  # the aggregator was upgraded: a run id appears
    assert SaveTrained(set()) in actions and c.model_msg.run == RUN
    assert c.receive(*_model(9, run=0)) == [] and c.rejected == {"replayed": 2}  # a capture from before


def test_the_real_aggregator_sequence_is_accepted_and_every_older_step_refused():
    """Drive the real coordinator through waits, an abandonment, closes, done and a continuation."""
    cfg = config(min_agents=1, rounds=2, timeout=10.0)
    spec = cfg.model.spec()
    X = np.zeros((4, spec.n_features), np.float32)
    agent = AgentCore("watcher", cfg.federation, LocalData(X, np.zeros(4), X[:0], np.zeros(0)))
    sent: list[tuple[str, bytes]] = []

    def deliver(actions) -> list:
        for p in published(actions, T.model) + published(actions, T.task):
            sent.append((p.topic, p.payload))
        for a in actions:
            if isinstance(a, Publish) and a.topic in (T.model, T.task):
                agent.receive(a.topic, a.payload)
        return actions

    c = Coordinator(cfg, FedAvg(), run=RUN)
    deliver(c.start(0.0))  # model 0, waiting (1, 0)
    deliver(c.receive(*status("a0"), now=1.0))  # open (1, 0)
    deliver(c.receive(*status("a0", state="offline"), now=2.0))
    deliver(c.tick(20.0))  # abandoned: waiting (1, 1)
    deliver(c.receive(*status("a0"), now=21.0))  # open (1, 1)
    deliver(c.receive(*update(c, "a0", [1, 1]), now=22.0))  # model 1, open (2, 0)
    ck = next(a for a in deliver(c.receive(*update(c, "a0", [2, 2]), now=23.0))
              if isinstance(a, SaveCheckpoint)).state  # model 2, done
    assert agent.finished
    # the operator continues the same run with more rounds
    more = Coordinator(config(min_agents=1, rounds=3, timeout=10.0), FedAvg(), state=ck, run=RUN + 99)
    deliver(more.start(30.0))  # model 2 again, waiting (3, 0)
    deliver(more.receive(*status("a0"), now=31.0))  # open (3, 0)
    states = [(wire.decode(p).state if t == T.task else "model") for t, p in sent]
    assert states == ["model", "waiting", "open", "waiting", "open", "model", "open", "model", "done",
                      "model", "waiting", "open"]
    assert not agent.rejected and agent.task.state == "open" and agent.task.round == 3
    for msg in sent:
        agent.receive(*msg)
    # refused: everything but the current task and the models of round 2 (equal keys)
    assert agent.rejected == {"replayed": len(sent) - 3}


# -- across restarts --------------------------------------------------------------


def test_the_newest_keys_survive_a_restart_of_the_agent(tmp_path):
    store = AgentStore(tmp_path)
    first = AgentRunner(Loop(), test_agent.core(), BrokerConfig(), store=store)
    for msg in (_model(3), _task(4), _model(5), _task(6)):
        first._execute(first.core.receive(*msg))
    assert store.load_accepted() == ((RUN, 5), (RUN, 6, 0, 1))
    assert json.loads((tmp_path / ACCEPTED_FILE).read_text()) == {"model": [RUN, 5], "task": [RUN, 6, 0, 1]}

    second = AgentRunner(Loop(), test_agent.core(), BrokerConfig(), store=AgentStore(tmp_path))
    c = second.core
    assert (c.accepted_model, c.accepted_task) == ((RUN, 5), (RUN, 6, 0, 1))
    # a broker holding replayed messages as its retained ones: refused after the restart too
    assert c.receive(*_model(3)) == [] and c.receive(*_task(2, state="done")) == []
    assert c.rejected == {"replayed": 2} and c.model_msg is None and not c.finished
    second._execute(c.receive(*_model(5)))
    assert c.model_msg.round == 5


def test_an_unreadable_accepted_file_is_logged_and_ignored(tmp_path, caplog):
    (tmp_path / ACCEPTED_FILE).write_text('{"model": [1, "x"], "task": null}')
    assert AgentStore(tmp_path).load_accepted() == (None, None)
    assert "unreadable" in caplog.text
    (tmp_path / ACCEPTED_FILE).write_text('{"model": null, "task": null}')
    assert AgentStore(tmp_path).load_accepted() == (None, None)


# -- signed replays over a real broker ------------------------------------------------


def _wait(cond, what: str, timeout: float = WAIT_S) -> None:
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


def _republish(client: RawClient, topic: str, payload: bytes, props: dict[str, str]) -> None:
    """Publish a captured message again, retained, with its signature (MQTT v5 user properties)."""
    p = Properties(PacketTypes.PUBLISH)
    p.UserProperty = list(props.items())
    client.client.publish(topic, payload, qos=1, retain=True, properties=p).wait_for_publish(WAIT_S)


@pytest.mark.broker
def test_signed_replays_over_a_real_broker_are_refused_also_after_a_restart(
    fed, broker, broker_config, tmp_path, start_aggregator
):
    key_file = tmp_path / "signing.pem"
    pub = make_key(key_file)
    t = Topics(fed)
    zero = {"W0": np.zeros((64, 10), np.float32), "b0": np.zeros(10, np.float32)}

    def aggregator(name: str, rounds: int, min_agents: int):
        # quorum = min_agents and a long timeout: an attempt that lacks an update stays open
        return start_aggregator(AggregatorConfig(
            federation=fed, rounds=rounds, state_dir=str(tmp_path / name),
            model=ModelConfig(kind="softmax", n_features=64, n_outputs=10),
            training=TrainingConfig(epochs=1, batch_size=16, lr=0.1),
            round=RoundConfig(min_agents=min_agents, quorum=min_agents, timeout=10 * WAIT_S),
            security=SecurityConfig(signing_key=str(key_file)), onnx=OnnxConfig(every=0), broker=broker_config,
        ))

    data = federated_digits(2, "iid", 0.5, 0).agents[0]

    def pinned_agent() -> tuple[AgentRunner, Loop]:
        loop = Loop()
        runner = AgentRunner(loop, AgentCore("pinned", fed, data, verifier=Verifier([pub])), broker_config,
                             store=AgentStore(tmp_path / "agent-state"))
        runner.start()
        loop.start()
        return runner, loop

    # Everything the aggregator publishes on model and task, signatures included.
    captured: list[tuple[str, bytes, dict[str, str]]] = []
    watcher = RawClient(broker)
    watcher.client.on_message = lambda c, u, m: captured.append(
        (m.topic, m.payload, dict(getattr(m.properties, "UserProperty", None) or [])))
    watcher.subscribe(t.model)
    watcher.subscribe(t.task)
    helper = attacker = None
    loops: list[Loop] = []
    try:
        # Run A: two rounds, done.
        run_a = aggregator("state-a", rounds=2, min_agents=1)
        runner, loop = pinned_agent()
        loops.append(loop)
        run_a.wait_finished()
        _wait(lambda: runner.core.finished, "the agent to see run A's done task")
        run_a.stop()
        # Run B: the federation reset (a new state directory: a larger run id).
        # A scripted second device answers rounds 1 to 5 only, so round 6 stays open.
        helper = RawClient(broker, "helper")
        helper.subscribe(t.task)
        helper.publish(t.status("helper"), wire.encode(wire.StatusMsg(fed, 0, "helper", "online", 1, ["softmax"])),
                       retain=True)
        run_b = aggregator("state-b", rounds=0, min_agents=2)
        assert run_b.coordinator.run > run_a.coordinator.run
        for r in range(1, 6):
            task = helper.wait_for_open_task(t.task, r - 1)
            helper.publish(t.update("helper"), wire.encode(wire.UpdateMsg(fed, task.round, "helper", task.base, 1,
                                                                          zero, {})))
        _wait(lambda: run_b.coordinator.round == 5 and run_b.coordinator.open is not None
              and run_b.coordinator.open.received == {"pinned"}, "round 6 to hold the agent's update")
        c = runner.core
        _wait(lambda: c.model_msg is not None and c.model_msg.round == 5, "the agent to hold model 5")
        assert (c.model_msg.run, c.task.state, c.task.round) == (run_b.coordinator.run, "open", 6)
        assert not c.finished and not c.rejected  # run B was followed: the trained rounds of run A forgotten

        def find(topic: str, run: int, round_: int, state: str | None = None):
            for top, payload, props in captured:
                if top == topic:
                    msg = wire.decode(payload)
                    if (msg.run, msg.round) == (run, round_) and state in (None, getattr(msg, "state", None)):
                        Verifier([pub]).verify(top, payload, props)  # validly signed: only the order refuses it
                        return payload, props
            raise AssertionError(f"no {topic} of run {run} round {round_} captured")

        old_model = find(t.model, run_b.coordinator.run, 3)
        old_done = find(t.task, run_a.coordinator.run, 2, "done")

        # The replays, retained: the broker now hands them to whoever subscribes.
        attacker = RawClient(broker, "replayer")
        _republish(attacker, t.model, *old_model)
        _republish(attacker, t.task, *old_done)
        _wait(lambda: c.rejected["replayed"] >= 2, "the agent to refuse both replays")
        time.sleep(0.2)  # nothing else may follow
        assert c.rejected == {"replayed": 2}
        assert (c.model_msg.run, c.model_msg.round) == (run_b.coordinator.run, 5)
        assert (c.task.state, c.task.round) == ("open", 6) and not c.finished

        # The agent restarts from its state directory and meets the replays as retained messages.
        loop.stop()
        loop.thread.join(10)
        runner, loop = pinned_agent()
        loops.append(loop)
        c = runner.core
        assert c.accepted_model == (run_b.coordinator.run, 5)
        _wait(lambda: c.rejected["replayed"] >= 2, "the restarted agent to refuse both replays")
        time.sleep(0.2)
        assert c.rejected == {"replayed": 2} and c.model_msg is None and c.task is None and not c.finished

        # Not locked out: when round 6 closes, the new model and task are taken.
        helper.publish(t.update("helper"), wire.encode(wire.UpdateMsg(fed, 6, "helper", run_b.coordinator.version,
                                                                      1, zero, {})))
        _wait(lambda: c.model_msg is not None and c.model_msg.round == 6 and c.task is not None
              and c.task.round == 7, "the restarted agent to follow round 7")
        assert c.rejected == {"replayed": 2}
    finally:
        for lp in loops:
            lp.stop()
        if helper is not None:
            helper.publish(t.status("helper"), b"", retain=True)
            helper.close()
        if attacker is not None:
            attacker.close()
        watcher.close()
