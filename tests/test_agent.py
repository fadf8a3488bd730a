"""The sans-I/O agent core: when it trains, what it sends, what it drops."""

from __future__ import annotations

import numpy as np
import pytest

from edge_agent import wire
from edge_agent.agent import AgentCore, Done, DropOutbox, PutOutbox, SaveAccepted, SaveTrained, Train
from edge_agent.data import LocalData
from edge_agent.models import BuiltinModel
from edge_agent.mqtt import Publish
from edge_agent.spec import ModelSpec
from edge_agent.topics import Topics
from edge_agent.training import round_seed, train_local

FED = "f"
T = Topics(FED)
SPEC = ModelSpec("softmax", 4, 3)


def data(n: int = 40, holdout: int = 10) -> LocalData:
    rng = np.random.default_rng(0)
    X = rng.random((n + holdout, 4), dtype=np.float32)
    y = np.arange(n + holdout) % 3
    return LocalData(X[:n], y[:n], X[n:], y[n:])


def core(**kw) -> AgentCore:
    return AgentCore(agent_id="me", fed=FED, data=data(), seed=5, **kw)


def model_msg(round_: int = 0, seed: int = 0, spec: ModelSpec = SPEC, run: int = 0) -> tuple[str, bytes, wire.ModelMsg]:
    params = BuiltinModel(spec).init_params(seed)
    params["b0"] += np.float32(round_)  # distinct versions per round
    m = wire.ModelMsg(FED, round_, wire.params_version(params), spec, params, run=run)
    return T.model, wire.encode(m), m


def task_msg(m: wire.ModelMsg, attempt: int = 0, state: str = "open", round_: int | None = None):
    t = wire.TaskMsg(FED, m.round + 1 if round_ is None else round_, m.version, state, attempt, 100.0,
                     wire.TrainConfig(2, 8, 0.1), run=m.run)
    return T.task, wire.encode(t)


def notice_msg(m: wire.ModelMsg, attempt: int = 0, round_: int | None = None, agent: str = "me",
               selected=()) -> tuple[str, bytes]:
    """The retained notice that ``agent`` is selected for the attempt ``task_msg`` opens on ``m``."""
    n = wire.SelectedMsg(FED, m.round + 1 if round_ is None else round_, agent, attempt, m.version, run=m.run,
                         selected=list(selected))
    return T.selected(agent), wire.encode(n)


def deliver(c: AgentCore, m: wire.ModelMsg, selected=("me",), attempt: int = 0, state: str = "open",
            round_: int | None = None) -> list:
    """An attempt as the broker delivers it to ``c``: its notice (when ``selected`` names it), then the task."""
    actions = []
    if state == "open" and c.agent_id in selected:
        actions += c.receive(*notice_msg(m, attempt, round_, c.agent_id))
    return actions + c.receive(*task_msg(m, attempt, state, round_))


def effects(actions) -> list:
    """The actions apart from persisting the newest model and task accepted (replay protection)."""
    return [a for a in actions if not isinstance(a, SaveAccepted)]


def trains(actions) -> list[Train]:
    """The Train actions (each is preceded by persisting the trained set)."""
    out = [a for a in actions if isinstance(a, Train)]
    for t in out:
        i = actions.index(t)
        assert i > 0 and isinstance(actions[i - 1], SaveTrained) and (t.round, t.attempt) in actions[i - 1].trained
    return out


def test_trains_once_when_selected_on_the_model_it_holds():
    c = core()
    topic, payload, m = model_msg()
    assert effects(c.receive(topic, payload)) == []
    assert trains(deliver(c, m)) == [Train(1, 0)]
    assert deliver(c, m) == []  # the same task again (e.g. retained redelivery)
    put, pub = c.train(1, 0)
    assert isinstance(put, PutOutbox) and put.key == (1, 0) and put.payload == pub.payload
    assert isinstance(pub, Publish) and pub.topic == T.update("me") and pub.qos == 1 and not pub.retain
    u = wire.decode(pub.payload, expect="update", spec=SPEC)
    assert (u.round, u.agent, u.base, u.num_samples) == (1, "me", m.version, 40)
    # the delta is exactly local - global for the seeded training
    local, _ = train_local(BuiltinModel(SPEC), m.params, c.data.X_train, c.data.y_train, wire.TrainConfig(2, 8, 0.1),
                           round_seed(5, 1))
    for k in local:
        np.testing.assert_allclose(u.delta[k], local[k] - m.params[k], atol=1e-7)
    # it evaluated the global model on its holdout before training
    ev = BuiltinModel(SPEC).evaluate(m.params, c.data.X_holdout, c.data.y_holdout)
    assert u.metrics["eval_accuracy"] == pytest.approx(ev["accuracy"]) and u.metrics["eval_samples"] == 10
    assert "train_loss" in u.metrics


def test_task_before_model_waits_for_the_matching_model():
    c = core()
    topic, payload, m = model_msg()
    assert effects(deliver(c, m)) == []
    assert trains(c.receive(topic, payload)) == [Train(1, 0)]


def test_not_selected_or_other_base_does_not_train():
    c = core()
    topic, payload, m = model_msg()
    c.receive(topic, payload)
    assert effects(deliver(c, m, selected=("someone-else",))) == []
    _, _, other = model_msg(round_=3)
    assert effects(deliver(c, other, round_=1)) == []  # base is a model we do not hold


def test_a_rerun_attempt_trains_again():
    c = core()
    topic, payload, m = model_msg()
    c.receive(topic, payload)
    assert trains(deliver(c, m, attempt=0)) == [Train(1, 0)]
    assert trains(deliver(c, m, attempt=1)) == [Train(1, 1)]


def test_training_is_skipped_when_the_task_moved_on():
    c = core()
    topic, payload, m = model_msg()
    c.receive(topic, payload)
    deliver(c, m, attempt=0)
    deliver(c, m, attempt=1, selected=("other",))  # re-run without us
    assert c.train(1, 0) == []
    deliver(c, m, state="done")
    assert c.train(1, 1) == []
    assert c.updates_sent == 0


def test_done_task_is_reported_once():
    c = core()
    _, _, m = model_msg()
    assert effects(deliver(c, m, state="done")) == [Done(1)]
    assert deliver(c, m, state="done") == []
    assert c.finished


@pytest.mark.parametrize(
    "payload,reason",
    [(b"\xc1", "not_msgpack"), (wire.encode(wire.StatusMsg(FED, 0, "x", "online")), "wrong_kind")],
)
def test_malformed_messages_are_dropped_and_counted(payload, reason):
    c = core()
    assert c.receive(T.model, payload) == [] and c.receive(T.task, payload) == []
    assert c.rejected[reason] == 2 and c.model_msg is None and c.task is None


def test_model_whose_hash_does_not_match_is_dropped():
    c = core()
    _, _, m = model_msg()
    m.version = "0000000000000000"
    assert c.receive(T.model, wire.encode(m)) == []
    assert c.rejected["bad_version_hash"] == 1 and c.model_msg is None


def test_model_for_other_data_or_unsupported_kind_is_dropped():
    c = core(capabilities=("softmax",))
    (status,) = c.receive(*model_msg(spec=ModelSpec("softmax", 5, 3))[:2])
    # the device says why in its retained status, which makes it not eligible
    st = wire.decode(status.payload, expect="status")
    assert status.topic == T.status("me") and not st.eligible
    assert st.reason == "incompatible_model: local data: 4 features per row, the model takes 5"
    (status,) = c.receive(*model_msg(spec=ModelSpec("linear", 4, 1))[:2])
    assert wire.decode(status.payload, expect="status").reason == "unsupported_model: model kind linear not in ('softmax',)"
    assert c.rejected["incompatible_model"] == 1 and c.rejected["unsupported_model"] == 1
    assert c.model_msg is None
    # a model that fits clears it
    (status, *_) = c.receive(*model_msg(spec=ModelSpec("softmax", 4, 3))[:2])
    assert wire.decode(status.payload, expect="status").eligible and c.model_msg is not None


def test_a_restarted_federation_is_followed_even_though_its_rounds_start_again():
    # seen for real: agents kept a dead run's retained round-20 model and never
    # trained on the new run's round-0 model (a reset federation has a larger run id)
    c = core()
    c.receive(*model_msg(round_=20, run=1)[:2])
    topic, payload, m = model_msg(round_=0, run=2)
    c.receive(topic, payload)
    assert c.model_msg.round == 0 and not c.rejected
    assert trains(deliver(c, m)) == [Train(1, 0)]


def test_cleared_retained_messages_and_foreign_topics_are_ignored():
    c = core()
    assert c.receive(T.model, b"") == [] and c.receive("fl/other/model", b"\xc1") == []
    assert not c.rejected


def test_status_and_last_will():
    c = core()
    on, off = c.status("online"), c.status("offline")
    assert on.retain and off.retain and on.topic == off.topic == T.status("me")
    s = wire.decode(on.payload, expect="status")
    assert s.state == "online" and s.num_samples == 40 and "softmax" in s.capabilities
    assert wire.decode(off.payload).state == "offline"


def test_bad_agent_id_is_refused():
    with pytest.raises(ValueError):
        AgentCore(agent_id="a/b", fed=FED, data=data())


# -- issue 4: eligibility, outbox, remembered rounds ---------------------------

def test_ineligible_agent_says_why_and_does_not_train_until_eligible_again():
    c = core()
    topic, payload, m = model_msg()
    c.receive(topic, payload)
    (status,) = c.set_eligibility(False, "battery at 12%, below 30%")
    s = wire.decode(status.payload, expect="status")
    assert s.eligible is False and s.reason == "battery at 12%, below 30%" and status.retain
    assert trains(deliver(c, m)) == []
    assert c.set_eligibility(False, "battery at 12%, below 30%") == []  # no change, nothing published
    actions = c.set_eligibility(True)
    assert wire.decode(actions[0].payload).eligible is True
    assert trains(actions) == [Train(1, 0)]  # the open task it was selected for


def test_outbox_resends_after_reconnect_while_the_round_is_open_and_drops_it_after():
    c = core()
    topic, payload, m = model_msg()
    c.receive(topic, payload)
    deliver(c, m)
    put, pub = c.train(1, 0)
    assert c.outbox == {(1, 0): pub.payload}
    again = [a for a in c.connected() if isinstance(a, Publish) and a.topic == T.update("me")]
    assert [a.payload for a in again] == [pub.payload]
    assert [a for a in deliver(c, m) if isinstance(a, Publish)] == []  # once per connection
    # the round closes: the next task drops the entry
    _, payload2, m2 = model_msg(round_=1)
    c.receive(T.model, payload2)
    actions = deliver(c, m2, selected=("other",))
    assert DropOutbox((1, 0)) in actions and c.outbox == {}


def test_a_restarted_agent_with_its_store_neither_retrains_nor_loses_its_update(tmp_path):
    from edge_agent.agent import AgentRunner
    from edge_agent.agent_store import AgentStore
    from edge_agent.config import BrokerConfig
    from edge_agent.mqtt import Loop

    store = AgentStore(tmp_path)
    first = AgentRunner(Loop(), core(), BrokerConfig(), store=store)
    topic, payload, m = model_msg()
    first._execute(first.core.receive(topic, payload))
    first._execute(deliver(first.core, m))
    first._execute(first.core.train(1, 0))  # what the deferred job would run
    assert store.load_trained() == {(1, 0)} and list(store.load_outbox()) == [(1, 0)]

    second = AgentRunner(Loop(), core(), BrokerConfig(), store=AgentStore(tmp_path))
    c = second.core
    c.receive(topic, payload)
    actions = deliver(c, m)
    assert trains(actions) == []  # trained before the restart
    assert [a.payload for a in actions if isinstance(a, Publish)] == [store.load_outbox()[(1, 0)]]


def test_not_selected_agents_keep_the_pace_hint():
    c = core()
    topic, payload, m = model_msg()
    c.receive(topic, payload)
    t = wire.TaskMsg(FED, 1, m.version, "open", 0, 100.0, wire.TrainConfig(), retry_after=42.0)
    c.receive(T.task, wire.encode(t))
    assert c.retry_after == 42.0


def test_waiting_task_does_not_train():
    c = core()
    topic, payload, m = model_msg()
    c.receive(topic, payload)
    assert trains(deliver(c, m, state="waiting")) == []


def test_a_restarted_federation_is_trained_for_even_with_remembered_rounds():
    # state of a version before run ids: no run accepted yet, only trained rounds
    c = core()
    c.trained |= {(r, 0) for r in range(1, 21)}  # an earlier run, loaded from trained.json
    c.outbox[(20, 0)] = b"old"
    topic, payload, m = model_msg(round_=0)
    actions = c.receive(topic, payload)
    assert SaveTrained(set()) in actions and DropOutbox((20, 0)) in actions
    assert trains(deliver(c, m)) == [Train(1, 0)]
