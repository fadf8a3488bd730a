"""Selection that costs each device O(1): the retained per-agent `selected` notice (PROTOCOL.md §3.8).

Unit tests drive the sans-I/O Coordinator and AgentCore directly; the last
tests run the aggregator service and a real agent over a real mosquitto.
"""

from __future__ import annotations

import queue
import time

import numpy as np
import pytest

from aggregator.config import AggregatorConfig, ModelConfig, RoundConfig, TrainingConfig
from aggregator.coordinator import Coordinator
from aggregator.strategies import FedAvg
from edge_agent import wire
from edge_agent.agent import MAX_HELD_NOTICES, AgentCore, AgentRunner, Train
from edge_agent.data import LocalData
from edge_agent.models import BuiltinModel
from edge_agent.mqtt import Loop, Publish
from edge_agent.spec import ModelSpec
from edge_agent.topics import Topics

from .conftest import WAIT_S

FED = "sel"
T = Topics(FED)
SPEC = ModelSpec("softmax", 4, 3)


# -- the coordinator ------------------------------------------------------------


def _coordinator(**round_kw) -> Coordinator:
    cfg = AggregatorConfig(federation=FED, model=ModelConfig(kind="softmax", n_features=4, n_outputs=3),
                           round=RoundConfig(**{"min_agents": 1, "timeout": 10.0, **round_kw}))
    c = Coordinator(cfg, FedAvg())
    c.start(0.0)
    return c


def _open_with(n: int, **round_kw) -> tuple[Coordinator, list]:
    """A coordinator whose first attempt opens once ``n`` agents are online; the actions of that opening."""
    c = _coordinator(min_agents=n, **round_kw)
    actions: list = []
    for i in range(n):
        st = wire.StatusMsg(FED, 0, f"d{i:05d}", "online", 10, ["softmax"])
        actions = c.receive(T.status(f"d{i:05d}"), wire.encode(st), now=0.0)
    assert c.open is not None
    return c, actions


def _notices(actions) -> dict[str, Publish]:
    return {T.parse(a.topic)[1]: a for a in actions if isinstance(a, Publish) and T.parse(a.topic)[0] == "selected"}


def test_the_task_a_device_downloads_does_not_grow_with_the_fleet():
    small, small_actions = _open_with(3)
    big, big_actions = _open_with(3000)
    (small_task,) = [a for a in small_actions if isinstance(a, Publish) and a.topic == T.task]
    (big_task,) = [a for a in big_actions if isinstance(a, Publish) and a.topic == T.task]
    # Same fields, same values apart from the run id (same digit count): the same size,
    # where a task listing 3,000 ids would have been ~30 KB.
    assert len(big_task.payload) == len(small_task.payload) < 400
    # Every selected device gets one notice of a fixed size, and nobody else gets one.
    notices = _notices(big_actions)
    assert sorted(notices) == big.open.selected and len(notices) == 3000
    assert {len(p.payload) for p in notices.values()} == {len(next(iter(_notices(small_actions).values())).payload)}


def test_over_selection_notifies_exactly_the_seeded_sample():
    c, actions = _open_with(20, agents_per_round=5, over_select=1.4)
    assert sorted(_notices(actions)) == c.open.selected and len(c.open.selected) == 7  # ceil(5 x 1.4)


# -- the agent --------------------------------------------------------------------


def _agent(agent: str = "me") -> AgentCore:
    rng = np.random.default_rng(0)
    X = rng.normal(size=(20, 4)).astype(np.float32)
    return AgentCore(agent, FED, LocalData(X[:16], np.arange(16) % 3, X[16:], np.arange(4) % 3), seed=1)


def _model() -> wire.ModelMsg:
    params = BuiltinModel(SPEC).init_params(0)
    return wire.ModelMsg(FED, 0, wire.params_version(params), SPEC, params, run=5)


def _task(m: wire.ModelMsg, attempt: int = 0, mode: str = "sync", secagg=None) -> tuple[str, bytes]:
    t = wire.TaskMsg(FED, 1, m.version, "open", attempt, 100.0, wire.TrainConfig(1, 4, 0.1), mode=mode, run=m.run,
                     secagg=secagg)
    return T.task, wire.encode(t)


def _notice(m: wire.ModelMsg, agent: str = "me", attempt: int = 0, **kw) -> tuple[str, bytes]:
    fields = dict(fed=FED, round=1, agent=agent, attempt=attempt, base=m.version, run=m.run)
    fields.update(kw)
    return T.selected(agent), wire.encode(wire.SelectedMsg(**fields))


def _trains(actions) -> list:
    return [a for a in actions if isinstance(a, Train)]


def test_the_agent_subscribes_to_its_own_notice_before_the_task():
    subs = _agent().subscriptions()
    assert T.selected("me") in subs and subs.index(T.selected("me")) < subs.index(T.task)
    assert not any(s.endswith("/+/selected") or s.endswith("#") for s in subs)


@pytest.mark.parametrize("notice_first", [True, False])
def test_a_selected_agent_trains_once_whichever_of_notice_and_task_comes_first(notice_first):
    c, m = _agent(), _model()
    c.receive(T.model, wire.encode(m))
    first, second = (_notice(m), _task(m)) if notice_first else (_task(m), _notice(m))
    assert _trains(c.receive(*first)) == []
    assert _trains(c.receive(*second)) == [Train(1, 0)]
    # redeliveries of either (QoS 1, a reconnect) train nothing more
    assert _trains(c.receive(*first) + c.receive(*second)) == []


@pytest.mark.parametrize("change", [dict(attempt=1), dict(base="0123456789abcdef"), dict(run=4), dict(round=2)])
def test_a_notice_for_another_attempt_selects_for_nothing(change):
    c, m = _agent(), _model()
    c.receive(T.model, wire.encode(m))
    c.receive(*_notice(m, **change))
    assert _trains(c.receive(*_task(m))) == [] and not c.rejected
    # a later attempt that does select us still trains
    assert _trains(c.receive(*_notice(m, attempt=1)) + c.receive(*_task(m, attempt=1))) == [Train(1, 1)]


def test_notices_in_any_order_each_select_for_their_own_attempt_and_few_are_held():
    c, m = _agent(), _model()
    c.receive(T.model, wire.encode(m))
    c.receive(*_notice(m, attempt=2))
    c.receive(*_notice(m, attempt=1))  # older, and late
    assert _trains(c.receive(*_task(m, attempt=1))) == [Train(1, 1)]
    assert _trains(c.receive(*_task(m, attempt=2))) == [Train(1, 2)]
    for attempt in range(3, 30):  # a flood (a forger on a broker without ACL) holds only a few
        c.receive(*_notice(m, attempt=attempt))
    assert len(c.notices) == MAX_HELD_NOTICES
    assert _trains(c.receive(*_task(m, attempt=29))) == [Train(1, 29)]


def test_without_a_notice_a_sync_task_is_not_for_us_but_an_async_one_is():
    c, m = _agent(), _model()
    c.receive(T.model, wire.encode(m))
    assert _trains(c.receive(*_task(m))) == []
    # async (FedBuff): every eligible agent trains on each model, no notice needed
    assert _trains(c.receive(*_task(m, attempt=1, mode="async"))) == [Train(1, 1)]


@pytest.mark.parametrize("topic,payload,reason", [
    (T.selected("other"), None, "not_for_us"),  # another device's notice (a broker without ACL)
    (T.selected("me"), "names-other", "identity_mismatch"),
    (T.selected("me"), b"\xc1", "not_msgpack"),
    (T.selected("me"), "bad-ids", "bad_field"),
    (T.selected("me"), "v1", "bad_version"),
])
def test_a_hostile_or_malformed_notice_is_dropped_with_a_reason_and_changes_nothing(topic, payload, reason):
    import msgpack

    c, m = _agent(), _model()
    c.receive(T.model, wire.encode(m))
    good = msgpack.unpackb(_notice(m)[1])
    payload = {None: _notice(m, agent="other")[1], "names-other": _notice(m, agent="other")[1],
               "bad-ids": msgpack.packb({**good, "selected": ["ok", "not ok/"]}),
               "v1": msgpack.packb({**good, "v": 1})}.get(payload, payload)
    assert c.receive(topic, payload) == []
    assert c.rejected == {reason: 1} and not c.notices
    assert _trains(c.receive(*_task(m))) == []


def test_a_secure_aggregation_notice_must_list_the_agent_in_the_selection():
    c, m = _agent(), _model()
    c.receive(T.model, wire.encode(m))
    sa = wire.SecAggParams("secagg", 2, 16, 18, 1.0)
    c.receive(*_notice(m, selected=["a", "b", "c"]))  # the selection, without us
    assert _trains(c.receive(*_task(m, secagg=sa))) == []
    c.receive(*_notice(m, attempt=1, selected=["a", "b", "me"]))
    assert _trains(c.receive(*_task(m, attempt=1, secagg=sa))) == [Train(1, 1)]


def test_with_pinned_keys_an_unsigned_or_forged_notice_is_refused(tmp_path):
    from edge_agent.signing import Signer, Verifier

    from .test_security import make_key

    pub = make_key(tmp_path / "k.pem")
    make_key(tmp_path / "other.pem")
    signer, other = Signer(str(tmp_path / "k.pem")), Signer(str(tmp_path / "other.pem"))
    c, m = _agent(), _model()
    c.verifier = Verifier([pub])
    c.receive(T.model, wire.encode(m), dict(signer.properties(T.model, wire.encode(m))))
    topic, payload = _notice(m)
    assert c.receive(topic, payload, {}) == [] and c.rejected["unsigned"] == 1
    assert c.receive(topic, payload, dict(other.properties(topic, payload))) == []
    assert not c.notices
    # signed for another agent's topic: the signature binds the topic
    assert c.receive(topic, payload, dict(signer.properties(T.selected("other"), payload))) == []
    assert not c.notices
    c.receive(topic, payload, dict(signer.properties(topic, payload)))
    task_topic, task_payload = _task(m)
    assert _trains(c.receive(task_topic, task_payload, dict(signer.properties(task_topic, task_payload)))) == [
        Train(1, 0)]


# -- over a real broker -------------------------------------------------------------


@pytest.mark.broker
def test_a_device_that_reconnects_inside_the_open_round_finds_its_notice_retained_and_trains(
        fed, broker_config, tmp_path, start_aggregator, raw_client):
    """dev-2 is selected while connected, goes away before it read anything, and comes back as a real agent."""
    topics = Topics(fed)
    cfg = AggregatorConfig(
        federation=fed, rounds=1, state_dir=str(tmp_path / "state"),
        model=ModelConfig(kind="softmax", n_features=4, n_outputs=3),
        training=TrainingConfig(epochs=1, batch_size=4, lr=0.1),
        round=RoundConfig(min_agents=2, quorum=2, timeout=WAIT_S), broker=broker_config,
    )
    ra = start_aggregator(cfg)
    dev1, dev2 = raw_client("dev-1"), raw_client("dev-2")
    dev1.subscribe(topics.selected("dev-1"))
    dev1.subscribe(topics.task)
    for name, d in (("dev-1", dev1), ("dev-2", dev2)):
        d.publish(topics.status(name), wire.encode(wire.StatusMsg(fed, 0, name, "online", 8, ["softmax"])),
                  retain=True)
    notice = wire.decode(dev1.wait_for(topics.selected("dev-1"))[0], expect="selected")
    task = dev1.wait_for_open_task(topics.task)
    assert (notice.round, notice.attempt, notice.base) == (task.round, task.attempt, task.base)
    zero = {k: np.zeros(v.shape, np.float32) for k, v in BuiltinModel(cfg.model.spec()).init_params(0).items()}
    dev1.publish(topics.update("dev-1"), wire.encode(wire.UpdateMsg(fed, task.round, "dev-1", task.base, 8, zero, {})))
    dev2.close()  # gone before it ever subscribed to anything

    loop = Loop()
    rng = np.random.default_rng(3)
    X = rng.normal(size=(12, 4)).astype(np.float32)
    agent = AgentRunner(loop, AgentCore("dev-2", fed, LocalData(X[:8], np.arange(8) % 3, X[8:], np.arange(4) % 3)),
                        broker_config)
    try:
        agent.start()
        loop.start(name="dev-2")
        ra.wait_finished()
    finally:
        loop.stop()
        loop.thread and loop.thread.join(10)
    (closed,) = [ra.rounds.get_nowait().summary]
    assert closed.participants == 2 and closed.attempt == 0  # no re-run: the returning device made the round
    assert agent.core.trained == {(1, 0)} and [n.agent for n in agent.core.notices.values()] == ["dev-2"]
    for name, d in (("dev-1", dev1),):
        d.publish(topics.status(name), b"", retain=True)


@pytest.mark.broker
def test_an_agent_that_is_not_selected_never_trains_over_the_broker(fed, broker_config, tmp_path, start_aggregator):
    """Three real agents, one selected per round: each round exactly the notified agent trains."""
    from aggregator.sim import Simulation

    rng = np.random.default_rng(1)
    datas = []
    for _ in range(3):
        X = rng.normal(size=(12, 4)).astype(np.float32)
        datas.append(LocalData(X[:8], np.arange(8) % 3, X[8:], np.arange(4) % 3))
    cfg = AggregatorConfig(
        federation=fed, rounds=4, state_dir=str(tmp_path / "state"),
        model=ModelConfig(kind="softmax", n_features=4, n_outputs=3),
        training=TrainingConfig(epochs=1, batch_size=4, lr=0.1),
        round=RoundConfig(min_agents=3, agents_per_round=1, over_select=1.0, quorum=1, timeout=WAIT_S),
        broker=broker_config,
    )
    ra = start_aggregator(cfg)
    sim = Simulation(broker_config, fed, datas, seed=2)
    sim.start()
    try:
        ra.wait_finished()
        end = time.monotonic() + WAIT_S
        while sum(r.core.updates_sent for r in sim.runners) < 4 and time.monotonic() < end:
            time.sleep(0.01)
    finally:
        sim.stop()
    summaries = [ra.rounds.get_nowait().summary for _ in range(4)]
    assert [(s.selected, s.participants) for s in summaries] == [(1, 1)] * 4
    assert sum(r.core.updates_sent for r in sim.runners) == 4  # nobody trained for a round it was not in
    assert not ra.coordinator.rejected


@pytest.mark.broker
def test_a_round_that_selects_more_devices_than_an_agents_queue_holds_still_publishes_its_task(
        fed, broker_config, tmp_path, start_aggregator, raw_client):
    """1,500 selected: 1,500 notices, then the task, all leave the aggregator (found by bench_scale at N = 1,000)."""
    from edge_agent.mqtt import MAX_QUEUED_MESSAGES

    n = MAX_QUEUED_MESSAGES + 500
    topics = Topics(fed)
    cfg = AggregatorConfig(
        federation=fed, rounds=1, state_dir=str(tmp_path / "state"),
        model=ModelConfig(kind="linear", n_features=1, n_outputs=1),
        round=RoundConfig(min_agents=n, quorum=1, timeout=WAIT_S), broker=broker_config,
    )
    cfg.onnx.every = 0
    watcher = raw_client()
    watcher.subscribe(f"{topics.prefix}/agent/+/selected")
    watcher.subscribe(topics.task)
    ra = start_aggregator(cfg)
    devices = raw_client()
    names = [f"d{i:05d}" for i in range(n)]
    for name in names:  # one client speaks for all: the statuses are what makes the round open
        devices.client.publish(topics.status(name),
                               wire.encode(wire.StatusMsg(fed, 0, name, "online", 1, ["linear"])), qos=1, retain=True)
    got: dict[str, wire.SelectedMsg] = {}
    task = None
    end = time.monotonic() + WAIT_S
    while (task is None or len(got) < n) and time.monotonic() < end:
        try:
            t, payload, _ = watcher.messages.get(timeout=0.5)
        except queue.Empty:
            continue
        kind, agent = topics.parse(t)
        if kind == "selected" and payload:
            got[agent] = wire.decode(payload, expect="selected")
        elif kind == "task" and payload:
            msg = wire.decode(payload, expect="task")
            if msg.state == "open":
                assert len(got) == n  # every notice came before the task
                task = msg
    assert task is not None, f"no open task; {len(got)} notices; rejected {dict(ra.coordinator.rejected)}"
    assert {(m.round, m.attempt) for m in got.values()} == {(task.round, task.attempt)}
    got = set(got)
    assert got == set(names)
    for name in names:  # clean up: no retained state of this test's federation
        devices.client.publish(topics.status(name), b"", qos=1, retain=True)
        devices.client.publish(topics.selected(name), b"", qos=1, retain=True)
