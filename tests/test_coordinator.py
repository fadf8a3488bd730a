"""The sans-I/O round coordinator: every rule, driven directly with events and a fake clock."""

from __future__ import annotations

import msgpack
import numpy as np
import pytest

from aggregator.config import AggregatorConfig, ModelConfig, RoundConfig
from aggregator.coordinator import (
    Coordinator,
    Finished,
    Journal,
    RoundAbandoned,
    RoundClosed,
    SaveCheckpoint,
)
from aggregator.strategies import FedAvg
from edge_agent import wire
from edge_agent.mqtt import Publish
from edge_agent.topics import Topics

FED = "unit"
T = Topics(FED)


def config(**round_kw) -> AggregatorConfig:
    rounds = round_kw.pop("rounds", 3)
    rc = dict(min_agents=3, quorum=1, timeout=10.0)
    rc.update(round_kw)
    # linear regression on 1 feature: params W0 [1,1] and b0 [1], i.e. θ = [w, b], initialised to 0
    return AggregatorConfig(
        federation=FED, rounds=rounds, model=ModelConfig(kind="linear", n_features=1, n_outputs=1),
        round=RoundConfig(**rc),
    )


def status(agent: str, state: str = "online", eligible: bool = True, caps=("softmax", "mlp", "linear")) -> tuple:
    return T.status(agent), wire.encode(wire.StatusMsg(FED, 0, agent, state, 10, list(caps), "test", eligible))


def theta(params) -> list[float]:
    return [float(params["W0"][0, 0]), float(params["b0"][0])]


def update(c: Coordinator, agent: str, target: list[float], n: int = 10, **kw) -> tuple:
    """An update that moves the current global model to ``target``."""
    g = theta(c.params)
    delta = {"W0": np.array([[target[0] - g[0]]], np.float32), "b0": np.array([target[1] - g[1]], np.float32)}
    fields = dict(fed=FED, round=c.open.round if c.open else c.round + 1, agent=agent, base=c.version,
                  num_samples=n, delta=delta, metrics={"train_loss": 1.0})
    fields.update(kw)
    return T.update(agent), wire.encode(wire.UpdateMsg(**fields))


def published(actions, topic: str):
    return [a for a in actions if isinstance(a, Publish) and a.topic == topic]


def notified(actions) -> list[str]:
    """The agents given a retained ``selected`` notice by these actions, checked against their topics."""
    out = []
    for a in actions:
        if isinstance(a, Publish) and T.parse(a.topic)[0] == "selected":
            n = wire.decode(a.payload, expect="selected", fed=FED)
            assert a.retain and a.qos == 1 and a.topic == T.selected(n.agent)
            out.append(n.agent)
    return sorted(out)


def started(n_agents: int = 3, **kw) -> Coordinator:
    c = Coordinator(config(**kw), FedAvg())
    c.start(0.0)
    for i in range(n_agents):
        c.receive(*status(f"a{i}"), now=0.0)
    return c


def test_start_publishes_the_initial_model_retained():
    c = Coordinator(config(), FedAvg())
    actions = c.start(0.0)
    (pub,) = published(actions, T.model)
    assert pub.retain and pub.qos == 1
    msg = wire.decode(pub.payload)
    assert msg.round == 0 and msg.version == wire.params_version(msg.params) == c.version
    assert c.open is None  # nobody online yet


def test_round_opens_when_min_agents_are_online_and_each_selected_agent_is_notified():
    c = Coordinator(config(min_agents=2), FedAvg())
    c.start(0.0)
    assert c.receive(*status("a0"), now=1.0) == []
    actions = c.receive(*status("a1"), now=1.0)
    (pub,) = published(actions, T.task)
    task = wire.decode(pub.payload)
    assert pub.retain and task.round == 1 and task.state == "open" and task.base == c.version
    assert task.deadline == 11.0
    # The task names nobody (O(1) bytes per device); each selected agent gets
    # its own notice for this attempt, published before the task.
    assert "selected" not in msgpack.unpackb(pub.payload)
    assert notified(actions) == ["a0", "a1"]
    order = [a.topic for a in actions if isinstance(a, Publish)]
    assert order.index(T.task) > max(order.index(T.selected(a)) for a in ("a0", "a1"))
    for a in ("a0", "a1"):
        (n,) = published(actions, T.selected(a))
        n = wire.decode(n.payload)
        assert (n.round, n.attempt, n.base, n.run, n.selected) == (1, 0, c.version, c.run, [])


def test_offline_or_ineligible_agents_are_not_selected():
    c = Coordinator(config(min_agents=2), FedAvg())
    c.start(0.0)
    c.receive(*status("a0"), now=0.0)
    c.receive(*status("a1", eligible=False), now=0.0)
    c.receive(*status("a2", caps=("softmax",)), now=0.0)  # cannot train a linear model
    c.receive(*status("a3", state="offline"), now=0.0)
    assert c.open is None
    c.receive(*status("a4"), now=0.0)
    assert c.open.selected == ["a0", "a4"]


def test_textbook_fedavg_equal_weights():
    c = started()
    for agent, target in (("a0", [1, 2]), ("a1", [2, 3]), ("a2", [3, 4])):
        actions = c.receive(*update(c, agent, target), now=1.0)
    assert c.round == 1
    np.testing.assert_allclose(theta(c.params), [2.0, 3.0], atol=1e-6)
    (model_pub,) = published(actions, T.model)
    assert theta(wire.decode(model_pub.payload).params) == theta(c.params)


def test_fedavg_weighted_by_sample_count():
    c = started(n_agents=2, min_agents=2)
    c.receive(*update(c, "a0", [1, 0], n=1), now=1.0)
    c.receive(*update(c, "a1", [5, 4], n=3), now=1.0)
    # (1*[1,0] + 3*[5,4]) / 4 = [4, 3]
    np.testing.assert_allclose(theta(c.params), [4.0, 3.0], atol=1e-6)


def test_unweighted_fedavg_ignores_sample_counts():
    c = Coordinator(config(min_agents=2), FedAvg(weighted=False))
    c.start(0.0)
    for a in ("a0", "a1"):
        c.receive(*status(a), now=0.0)
    c.receive(*update(c, "a0", [1, 0], n=1), now=1.0)
    c.receive(*update(c, "a1", [5, 4], n=3), now=1.0)
    np.testing.assert_allclose(theta(c.params), [3.0, 2.0], atol=1e-6)


def test_close_checkpoints_before_publishing_then_opens_next_round():
    c = started()
    actions = []
    for a in ("a0", "a1", "a2"):
        actions = c.receive(*update(c, a, [1, 1]), now=2.0)
    kinds = [type(a).__name__ + (":" + a.topic if isinstance(a, Publish) else "") for a in actions]
    # the last update is journaled, then the checkpoint, then the new model goes out
    assert kinds[:3] == ["Journal", "SaveCheckpoint", f"Publish:{T.model}"]
    assert actions[0].record["type"] == "update" and actions[0].record["agent"] == "a2"
    closed = next(a for a in actions if isinstance(a, RoundClosed))
    assert closed.summary.participants == 3
    (task_pub,) = published(actions, T.task)
    task = wire.decode(task_pub.payload)
    assert task.round == 2 and task.base == c.version
    assert actions[1].state["round"] == 1
    assert [a.record["type"] for a in actions if isinstance(a, Journal)] == ["update", "open"]


def _assert_rejected(c: Coordinator, reason: str, topic_payload, now: float = 1.0) -> None:
    before = (c.round, c.version, set(c.open.received) if c.open else None, c.accepted)
    assert c.receive(*topic_payload, now=now) == []
    assert c.rejected[reason] == 1, dict(c.rejected)
    assert (c.round, c.version, set(c.open.received) if c.open else None, c.accepted) == before


def test_rejections_are_counted_and_change_nothing():
    c = started(rounds=5)
    _assert_rejected(c, "wrong_round", update(c, "a0", [1, 1], round=7))
    _assert_rejected(c, "not_selected", update(c, "zz", [1, 1]))
    _assert_rejected(c, "stale_base", update(c, "a0", [1, 1], base="0123456789abcdef"))
    topic, payload = update(c, "a1", [1, 1])
    _assert_rejected(c, "identity_mismatch", (T.update("a0"), payload))
    _assert_rejected(c, "not_msgpack", (T.update("a0"), b"\xc1garbage"))
    _assert_rejected(c, "oversize", (T.update("a0"), b"\x00" * (wire.MAX_PAYLOAD_BYTES + 1)))
    bad = {"W0": np.zeros((2, 1), np.float32), "b0": np.zeros(1, np.float32)}
    _assert_rejected(c, "spec_mismatch", update(c, "a0", [1, 1], delta=bad))
    nan = {"W0": np.array([[np.nan]], np.float32), "b0": np.zeros(1, np.float32)}
    _assert_rejected(c, "non_finite", update(c, "a0", [1, 1], delta=nan))
    _assert_rejected(c, "wrong_federation", (T.update("a0"), update(c, "a0", [1, 1], fed="other")[1]))
    # a valid one is accepted (and journaled), a repeat from the same agent is not
    assert [type(a) for a in c.receive(*update(c, "a0", [1, 1]), now=1.0)] == [Journal]
    assert c.accepted == 1
    _assert_rejected(c, "duplicate", update(c, "a0", [9, 9]))


def test_update_with_no_open_round_is_rejected():
    c = Coordinator(config(), FedAvg())
    c.start(0.0)
    _assert_rejected(c, "no_open_round", update(c, "a0", [1, 1], round=1))


def test_malformed_status_is_dropped():
    c = Coordinator(config(min_agents=1), FedAvg())
    c.start(0.0)
    assert c.receive(T.status("a0"), b"junk", now=0.0) == []
    assert c.receive(T.status("a0"), status("a1")[1], now=0.0) == []  # a1's status on a0's topic
    assert c.rejected["not_msgpack"] == 1 and c.rejected["identity_mismatch"] == 1
    assert c.agents == {} and c.open is None


def test_deadline_with_quorum_closes_with_the_updates_it_has():
    c = started(quorum=2)
    c.receive(*update(c, "a0", [2, 2]), now=1.0)
    c.receive(*update(c, "a1", [4, 4]), now=1.0)
    assert c.tick(9.9) == []
    actions = c.tick(10.0)
    closed = [a for a in actions if isinstance(a, RoundClosed)]
    assert closed and closed[0].summary.participants == 2 and closed[0].summary.selected == 3
    np.testing.assert_allclose(theta(c.params), [3.0, 3.0], atol=1e-6)


def test_deadline_short_of_quorum_abandons_and_reruns_as_a_new_attempt():
    c = started(quorum=2)
    v0 = c.version
    c.receive(*update(c, "a0", [2, 2]), now=1.0)
    actions = c.tick(10.0)
    assert isinstance(actions[0], Journal) and actions[0].record["type"] == "abandon"
    assert isinstance(actions[1], RoundAbandoned) and actions[1].received == 1
    (task_pub,) = published(actions, T.task)
    task = wire.decode(task_pub.payload)
    assert task.round == 1 and task.attempt == 1 and task.deadline == 20.0
    assert c.version == v0 and c.round == 0  # the model did not move
    # the earlier update does not count in the new attempt; a0 may send again
    assert c.open.received == set()
    c.receive(*update(c, "a0", [2, 2]), now=11.0)
    assert c.accepted == 2


def test_seeded_sampling_selects_agents_per_round_reproducibly():
    def selections(seed: int) -> list[list[str]]:
        c = Coordinator(config(min_agents=10, agents_per_round=4, over_select=1.0, seed=seed, rounds=3), FedAvg())
        c.start(0.0)
        for i in range(10):
            c.receive(*status(f"a{i}"), now=0.0)
        out = []
        while c.open is not None:
            out.append(list(c.open.selected))
            for a in list(c.open.selected):
                c.receive(*update(c, a, [1, 1]), now=1.0)
        return out

    a, b = selections(7), selections(7)
    assert a == b and len(a) == 3 and all(len(s) == 4 for s in a)
    assert len({tuple(s) for s in a}) > 1  # different agents in different rounds
    assert selections(8) != a


def test_finishes_after_the_configured_rounds_with_a_done_task():
    c = started(rounds=2)
    actions = []
    for _ in range(2):
        for a in ("a0", "a1", "a2"):
            actions = c.receive(*update(c, a, [1, 1]), now=1.0)
    assert isinstance(actions[-1], Finished) and c.finished
    (task_pub,) = published(actions, T.task)
    assert wire.decode(task_pub.payload).state == "done"
    assert c.tick(1000.0) == []  # nothing opens after the end
    _assert_rejected(c, "no_open_round", update(c, "a0", [1, 1], round=3))


def test_agent_metrics_are_weighted_by_their_sample_counts():
    c = started(n_agents=2, min_agents=2)
    c.receive(*update(c, "a0", [1, 1], n=1, metrics={"train_loss": 1.0, "eval_accuracy": 0.5, "eval_samples": 3.0}), now=1.0)
    actions = c.receive(*update(c, "a1", [1, 1], n=3, metrics={"train_loss": 2.0, "eval_accuracy": 1.0, "eval_samples": 1.0}), now=1.0)
    s = next(a for a in actions if isinstance(a, RoundClosed)).summary
    assert s.metrics["train_loss"] == pytest.approx((1 * 1.0 + 3 * 2.0) / 4)
    assert s.metrics["eval_accuracy"] == pytest.approx((3 * 0.5 + 1 * 1.0) / 4)


def test_central_evaluation_lands_in_metrics():
    c = Coordinator(config(min_agents=1), FedAvg(), evaluate=lambda p: {"accuracy": float(p["b0"][0])})
    c.start(0.0)
    c.receive(*status("a0"), now=0.0)
    actions = c.receive(*update(c, "a0", [0, 0.25]), now=1.0)
    (metrics_pub,) = published(actions, T.metrics)
    m = wire.decode(metrics_pub.payload)
    assert m.metrics["test_accuracy"] == pytest.approx(0.25) and m.participants == 1


def test_checkpoint_restore_continues_rounds_and_sampling():
    cfg = config(min_agents=5, agents_per_round=2, rounds=4, seed=3)

    def fresh(state=None) -> Coordinator:
        c = Coordinator(cfg, FedAvg(), state=state)
        c.start(0.0)
        for i in range(5):
            c.receive(*status(f"a{i}"), now=0.0)
        return c

    def drive(c: Coordinator, rounds: int) -> tuple[list[list[str]], dict]:
        sel, ckpt = [], {}
        for _ in range(rounds):
            sel.append(list(c.open.selected))
            for a in list(c.open.selected):
                for act in c.receive(*update(c, a, [c.round + 1.0, 1.0], n=c.round + 1), now=1.0):
                    if isinstance(act, SaveCheckpoint):
                        ckpt = act.state
        return sel, ckpt

    straight_sel, _ = drive(fresh(), 4)
    first = fresh()
    first_sel, ckpt = drive(first, 2)
    # a restarted process: load the checkpoint written when round 2 closed
    resumed = fresh(state=ckpt)
    assert resumed.version == ckpt["version"] and resumed.open.round == 3
    resumed_sel, _ = drive(resumed, 2)
    assert first_sel + resumed_sel == straight_sel  # the selection RNG continued, not restarted
    np.testing.assert_allclose(theta(resumed.params), [4.0, 1.0], atol=1e-6)
    assert [h.round for h in resumed.history] == [1, 2, 3, 4]


def test_restore_refuses_another_federations_checkpoint():
    c = started()
    snap = c.snapshot()
    snap["federation"] = "someone-else"
    with pytest.raises(ValueError, match="federation"):
        Coordinator(config(), FedAvg(), state=snap)


def test_save_checkpoint_action_carries_a_copy():
    c = started(n_agents=1, min_agents=1)
    actions = c.receive(*update(c, "a0", [1, 1]), now=1.0)
    ck = next(a for a in actions if isinstance(a, SaveCheckpoint))
    ck.state["params"]["b0"][0] = 99.0
    assert theta(c.params) == [1.0, 1.0]


def test_an_aggregate_that_overflows_float32_is_not_published():
    c = started(n_agents=2, min_agents=2)
    big = float(np.finfo(np.float32).max)
    c.receive(*update(c, "a0", [big, 0]), now=1.0)
    c.receive(*update(c, "a1", [big, 0]), now=1.0)  # weighted mean of two maxima: still finite
    assert c.round == 1 and theta(c.params)[0] == big
    v_before = c.version
    # every delta is finite, but global + mean delta overflows float32
    c.receive(*update(c, "a0", [0, 0], delta={"W0": np.array([[big]], np.float32), "b0": np.zeros(1, np.float32)}), now=2.0)
    actions = c.receive(*update(c, "a1", [0, 0], delta={"W0": np.array([[big]], np.float32), "b0": np.zeros(1, np.float32)}), now=2.0)
    assert any(isinstance(a, RoundAbandoned) for a in actions)
    assert not published(actions, T.model)
    assert c.version == v_before and c.round == 1 and c.rejected["non_finite_aggregate"] == 1
    assert c.open.round == 2 and c.open.attempt == 1


def test_strategy_state_with_arrays_survives_a_checkpoint_file(tmp_path):
    from aggregator import checkpoint

    class Momentum(FedAvg):
        name = "momentum-test"

        def __init__(self):
            super().__init__()
            self.m = {"W0": np.full((1, 1), 0.5), "b0": np.array([0.25])}
            self.steps = 3

        def state_dict(self):
            return {"m/W0": self.m["W0"], "m/b0": self.m["b0"], "steps": self.steps}

        def load_state_dict(self, state):
            self.m = {"W0": state["m/W0"], "b0": state["m/b0"]}
            self.steps = state["steps"]

    c = Coordinator(config(min_agents=1), Momentum())
    c.start(0.0)
    c.receive(*status("a0"), now=0.0)
    ck = next(a for a in c.receive(*update(c, "a0", [1, 1]), now=1.0) if isinstance(a, SaveCheckpoint))
    checkpoint.save(tmp_path, ck.state)
    s = Momentum()
    s.m, s.steps = {}, 0
    resumed = Coordinator(config(min_agents=1), s, state=checkpoint.load(tmp_path))
    assert resumed.round == 1 and s.steps == 3
    np.testing.assert_array_equal(s.m["W0"], [[0.5]])
    np.testing.assert_array_equal(s.m["b0"], [0.25])


def test_updates_beyond_what_a_buffering_rule_keeps_are_rejected():
    class KeepsTwo(FedAvg):
        def full(self):
            return self.count >= 2

    c = Coordinator(config(min_agents=3), KeepsTwo())
    c.start(0.0)
    for i in range(3):
        c.receive(*status(f"a{i}"), now=0.0)
    c.receive(*update(c, "a0", [1, 1]), now=1.0)
    c.receive(*update(c, "a1", [1, 1]), now=1.0)
    _assert_rejected(c, "round_full", update(c, "a2", [1, 1]))


# -- issue 4: selection, pace steering, journal, async --------------------------

def _task(actions):
    (pub,) = published(actions, T.task)
    return wire.decode(pub.payload, expect="task")


def test_over_selection_and_closing_at_the_target():
    c = Coordinator(config(min_agents=10, agents_per_round=4, over_select=1.3), FedAvg())
    c.start(0.0)
    actions = []
    for i in range(10):
        actions = c.receive(*status(f"a{i}"), now=0.0) or actions
    chosen = notified(actions)
    assert len(chosen) == 6 and chosen == c.open.selected  # ceil(4 x 1.3)
    first4 = chosen[:4]
    for a in first4[:3]:
        c.receive(*update(c, a, [1, 1]), now=1.0)
    assert c.round == 0
    actions = c.receive(*update(c, first4[3], [1, 1]), now=1.0)
    assert c.round == 1  # closed at the target, without waiting for the other two
    s = next(a for a in actions if isinstance(a, RoundClosed)).summary
    assert (s.selected, s.participants) == (6, 4)
    m = wire.decode(published(actions, T.metrics)[0].payload)
    assert m.metrics["dropouts"] == 2 and m.metrics["selected"] == 6
    # the two late ones are now for a closed round
    _assert_rejected(c, "wrong_round", update(c, chosen[5], [1, 1], round=1))


def test_fraction_of_eligible_agents_is_the_target():
    c = Coordinator(config(min_agents=1, fraction=0.5, over_select=1.0), FedAvg())
    c.start(0.0)
    actions = []
    for i in range(8):
        actions = c.receive(*status(f"a{i}"), now=0.0) or actions
    # the round opened as soon as min_agents (1) was online: target ceil(0.5 x 1) = 1
    assert c.open.target == 1 and len(c.open.selected) == 1
    c.receive(*update(c, c.open.selected[0], [1, 1]), now=1.0)
    assert c.round == 1 and c.open.target == 4 and len(c.open.selected) == 4


def test_pace_steering_hint_and_waiting_task():
    c = Coordinator(config(min_agents=2, timeout=30.0), FedAvg())
    actions = c.start(0.0)
    waiting = _task(actions)
    assert waiting.state == "waiting" and waiting.retry_after == 30.0 and notified(actions) == []
    c.receive(*status("a0"), now=0.0)
    task = _task(c.receive(*status("a1"), now=5.0))
    assert task.state == "open" and task.retry_after == 30.0 and task.deadline == 35.0
    c.receive(*update(c, "a0", [1, 1]), now=7.0)
    actions = c.receive(*update(c, "a1", [1, 1]), now=9.0)  # a 4-second round
    assert _task(actions).retry_after == pytest.approx(4.0)  # the next one is expected as quick


def test_ineligible_agents_are_recorded_with_their_reason():
    c = Coordinator(config(min_agents=1), FedAvg())
    c.start(0.0)
    topic = T.status("a0")
    c.receive(topic, wire.encode(wire.StatusMsg(FED, 0, "a0", "online", 5, ["linear"], "x", False, "on battery at 12%")), now=0.0)
    assert c.agents["a0"].reason == "on battery at 12%" and c.open is None


def _journal_of(actions):
    return [a.record for a in actions if isinstance(a, Journal)]


def test_restart_from_checkpoint_and_journal_continues_the_open_round():
    cfg = config(min_agents=3, rounds=2)
    straight = started(rounds=2)
    for r in (1, 2):
        for a, target in zip(("a0", "a1", "a2"), ([r, 1], [r + 1, 2], [r + 2, 3])):
            straight.receive(*update(straight, a, target), now=float(r))

    # the same federation, crashing in round 2 after two accepted updates
    first = Coordinator(cfg, FedAvg())
    journal: list[dict] = []
    ckpt = None

    def run(c, actions):
        nonlocal ckpt, journal
        for a in actions:
            if isinstance(a, SaveCheckpoint):
                ckpt, journal = a.state, []
            elif isinstance(a, Journal):
                journal.append(a.record)

    run(first, first.start(0.0))
    for i in range(3):
        run(first, first.receive(*status(f"a{i}"), now=0.0))
    for a, target in zip(("a0", "a1", "a2"), ([1, 1], [2, 2], [3, 3])):
        run(first, first.receive(*update(first, a, target), now=1.0))
    assert ckpt["round"] == 1
    run(first, first.receive(*update(first, "a0", [2, 1]), now=2.0))
    run(first, first.receive(*update(first, "a1", [3, 2]), now=2.0))
    assert [r["type"] for r in journal] == ["open", "update", "update"]

    resumed = Coordinator(cfg, FedAvg(), state=ckpt, journal=journal)
    actions = resumed.start(3.0)
    assert resumed.open.round == 2 and resumed.open.received == {"a0", "a1"}
    assert resumed.open.deadline == journal[0]["deadline"]
    assert _task(actions).round == 2
    # the notices of the resumed attempt are published again (a broker that lost them, or never got them)
    assert notified(actions) == ["a0", "a1", "a2"]
    _assert_rejected(resumed, "duplicate", update(resumed, "a0", [9, 9]))
    resumed.receive(*update(resumed, "a2", [4, 3]), now=3.0)
    assert resumed.round == 2 and resumed.finished
    np.testing.assert_allclose(theta(resumed.params), theta(straight.params), atol=1e-6)


def test_journal_records_older_than_the_checkpoint_are_ignored():
    c = started()
    journal = []
    for a in ("a0", "a1", "a2"):
        journal += _journal_of(c.receive(*update(c, a, [1, 1]), now=1.0))
    # a crash after the checkpoint but before the journal reset leaves round 1 behind
    resumed = Coordinator(config(), FedAvg(), state=c.snapshot(), journal=journal)
    resumed.start(2.0)
    assert resumed.round == 1 and resumed.accepted == 0


def test_restart_replays_an_abandon_so_the_attempt_counter_survives():
    c = Coordinator(config(quorum=3), FedAvg())
    rec = _journal_of(c.start(0.0))
    for i in range(3):
        rec += _journal_of(c.receive(*status(f"a{i}"), now=0.0))
    rec += _journal_of(c.tick(100.0))  # abandoned, re-run as attempt 1
    assert [r["type"] for r in rec] == ["open", "abandon", "open"] and rec[-1]["attempt"] == 1
    resumed = Coordinator(config(quorum=3), FedAvg(), journal=rec)  # no checkpoint yet: round 0
    resumed.start(101.0)
    assert resumed.open.attempt == 1 and resumed.open.deadline == rec[-1]["deadline"]
    assert resumed.rng.bit_generator.state == c.rng.bit_generator.state


def async_config(**kw) -> AggregatorConfig:
    cfg = config(min_agents=1, mode="async", **kw)
    cfg.fedbuff.buffer = 2
    cfg.fedbuff.staleness_exponent = 1.0
    cfg.fedbuff.max_staleness = 1
    return cfg


def test_async_mode_weights_updates_by_staleness_and_rejects_too_stale_ones():
    c = Coordinator(async_config(), FedAvg())
    c.start(0.0)
    for i in range(3):
        c.receive(*status(f"a{i}"), now=0.0)
    v0 = c.version
    assert c.open.target == 2 and c.open.deadline == 10.0  # flushes a partial buffer only
    c.receive(*update(c, "a0", [2, 0], n=1), now=1.0)
    c.receive(*update(c, "a1", [4, 0], n=1), now=1.0)
    assert c.round == 1 and theta(c.params)[0] == pytest.approx(3.0)  # buffer of 2 applied
    # a2 trained on v0 (one version behind): its delta is scaled by (1 + 1)^-1 = 1/2; a0 is fresh
    stale = {"W0": np.array([[6.0 - 0.0]], np.float32), "b0": np.zeros(1, np.float32)}  # moves v0 (w=0) to 6
    c.receive(*update(c, "a2", [0, 0], n=1, base=v0, round=1, delta=stale), now=2.0)
    c.receive(*update(c, "a0", [5, 0], n=1), now=2.0)  # delta +2 from 3
    # (0.5 x 6 + 1 x 2) / 2 = 2.5 added to 3: the stale update pulls less, and the
    # normalisation does not undo it
    assert c.round == 2 and theta(c.params)[0] == pytest.approx(3.0 + 2.5, rel=1e-5)
    # v0 is now two versions behind: beyond max_staleness = 1
    _assert_rejected(c, "too_stale", update(c, "a1", [0, 0], n=1, base=v0, round=1, delta=stale))
    _assert_rejected(c, "stale_base", update(c, "a1", [0, 0], base="ffffffffffffffff"))
    m = next(h for h in c.history if h.round == 2)
    assert m.metrics["mean_staleness"] == pytest.approx(0.5)


def test_async_mode_lets_newcomers_in_without_reopening():
    c = Coordinator(async_config(), FedAvg())
    c.start(0.0)
    c.receive(*status("a0"), now=0.0)
    assert c.open.selected == ["a0"]
    # An async task selects every eligible agent: a newcomer needs no notice
    # and no new task (publishing one per arrival would cost O(N) per agent).
    assert c.receive(*status("a1"), now=1.0) == []
    assert c.open.selected == ["a0", "a1"] and c.open.round == 1 and c.open.attempt == 0


def test_async_mode_takes_a_stale_and_a_fresh_update_from_the_same_agent():
    c = Coordinator(async_config(), FedAvg())  # buffer 2
    c.start(0.0)
    for i in range(3):
        c.receive(*status(f"a{i}"), now=0.0)
    v0 = c.version
    c.receive(*update(c, "a0", [1, 0]), now=1.0)
    c.receive(*update(c, "a2", [1, 0]), now=1.0)
    assert c.round == 1
    delta = {"W0": np.array([[1.0]], np.float32), "b0": np.zeros(1, np.float32)}
    c.receive(*update(c, "a1", [0, 0], base=v0, round=1, delta=delta), now=2.0)  # stale (trained on v0)
    assert c.open.received == {f"a1@{v0}"}
    c.receive(*update(c, "a1", [2, 0]), now=2.0)  # fresh from the same agent: accepted too
    assert c.round == 2 and c.accepted == 4


def test_async_redelivery_after_its_version_was_applied_is_a_duplicate():
    c = Coordinator(async_config(), FedAvg())
    c.start(0.0)
    for i in range(2):
        c.receive(*status(f"a{i}"), now=0.0)
    first = update(c, "a0", [1, 0])
    c.receive(*first, now=1.0)
    c.receive(*update(c, "a1", [1, 0]), now=1.0)
    assert c.round == 1
    _assert_rejected(c, "duplicate", first)  # QoS 1 redelivery of an applied update


def test_async_buffer_larger_than_the_fleet_still_closes():
    c = Coordinator(async_config(), FedAvg())
    c.config.fedbuff.buffer = 10
    c.start(0.0)
    c.receive(*status("a0"), now=0.0)
    assert c.open.target == 1
    c.receive(*update(c, "a0", [1, 0]), now=1.0)
    assert c.round == 1


def test_agent_metrics_cannot_spoof_aggregator_names_or_grow_without_bound():
    c = started(n_agents=1, min_agents=1)
    junk = {f"x{i}": 1.0 for i in range(100)} | {"seconds": 1e9, "rejected_fake": 5.0, "train_loss": 2.0}
    junk |= {f"train_m{i}": 1.0 for i in range(100)}
    actions = c.receive(*update(c, "a0", [1, 1], metrics=junk), now=1.0)
    m = wire.decode(published(actions, T.metrics)[0].payload).metrics
    assert m["seconds"] == 1.0 and "rejected_fake" not in m and "x0" not in m
    assert sum(k.startswith("train_") for k in m) <= 32


def test_async_deadline_flushes_a_partial_buffer_and_never_discards_updates():
    c = Coordinator(async_config(quorum=1), FedAvg())
    c.config.fedbuff.buffer = 3
    c.start(0.0)
    for i in range(3):
        c.receive(*status(f"a{i}"), now=0.0)
    assert c.open.target == 3
    assert c.tick(10.0) == [] and c.open.deadline == 20.0  # nothing yet: wait another period
    c.receive(*update(c, "a0", [2, 0]), now=11.0)  # then two agents leave: the buffer cannot fill
    actions = c.tick(20.0)
    closed = [a for a in actions if isinstance(a, RoundClosed)]
    assert closed and closed[0].summary.participants == 1 and c.round == 1
    assert theta(c.params)[0] == pytest.approx(2.0)
    task = wire.decode(published(actions, T.task)[0].payload)
    assert task.mode == "async" and task.deadline == 0.0  # the flush timer is not published
