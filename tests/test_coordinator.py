"""The sans-I/O round coordinator: every rule, driven directly with events and a fake clock."""

from __future__ import annotations

import numpy as np
import pytest

from aggregator.config import AggregatorConfig, ModelConfig, RoundConfig
from aggregator.coordinator import (
    Coordinator,
    Finished,
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


def test_round_opens_when_min_agents_are_online_and_task_lists_them():
    c = Coordinator(config(min_agents=2), FedAvg())
    c.start(0.0)
    assert c.receive(*status("a0"), now=1.0) == []
    actions = c.receive(*status("a1"), now=1.0)
    (pub,) = published(actions, T.task)
    task = wire.decode(pub.payload)
    assert pub.retain and task.round == 1 and task.state == "open" and task.base == c.version
    assert task.selected == ["a0", "a1"] and task.deadline == 11.0


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
    assert kinds[0] == "SaveCheckpoint"
    assert kinds.index(f"Publish:{T.model}") > 0
    assert isinstance(actions[3], RoundClosed) and actions[3].summary.participants == 3
    (task_pub,) = published(actions, T.task)
    task = wire.decode(task_pub.payload)
    assert task.round == 2 and task.base == c.version
    assert actions[0].state["round"] == 1


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
    # a valid one is accepted, a repeat from the same agent is not
    assert c.receive(*update(c, "a0", [1, 1]), now=1.0) == []
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
    assert isinstance(actions[0], RoundAbandoned) and actions[0].received == 1
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
        c = Coordinator(config(min_agents=10, agents_per_round=4, seed=seed, rounds=3), FedAvg())
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
