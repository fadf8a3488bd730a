"""Ingest workers (issue 14 item 2): updates split over worker processes by an MQTT 5 shared subscription.

Units drive the sans-I/O IngestCoordinator and the ingest codec directly.
The integration tests run a real mosquitto with two workers: in-process
(the result equals flat FedAvg of the same agents computed without MQTT,
conftest.offline_fedavg), and as real `fedmqtt worker` processes of which
one is killed with SIGKILL in the middle of a round.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from aggregator.ingest import wire as iw
from aggregator.config import AggregatorConfig, ModelConfig, RoundConfig, TrainingConfig, WorkersConfig
from aggregator.coordinator import Coordinator, Journal, RoundAbandoned, RoundClosed
from aggregator.datasets import federated_digits
from aggregator.ingest.coordinator import IngestCoordinator, worker_status_id
from aggregator.ingest.supervisor import WorkerSupervisor
from aggregator.ingest.worker import IngestWorker
from aggregator.sim import Simulation
from aggregator.strategies import FedAvg, make_strategy
from edge_agent import wire
from edge_agent.config import BrokerConfig, ConfigError, load
from edge_agent.mqtt import Loop, Publish
from edge_agent.topics import Topics

from .conftest import WAIT_S, offline_fedavg

FED = "unit"
T = Topics(FED)
IT = iw.IngestTopics(T)
SEED = 5


# -- codec ------------------------------------------------------------------------------------------


def _delta(w: float, b: float) -> dict[str, np.ndarray]:
    return {"W0": np.array([[w]], np.float32), "b0": np.array([b], np.float32)}


def test_ingest_messages_round_trip_and_hostile_ones_are_refused_by_reason():
    spec = ModelConfig(kind="linear", n_features=1, n_outputs=1).spec()
    msgs = [iw.Claim(FED, 3, 1, "a0", "v1", 10, {"train_loss": 0.5}),
            iw.Grant(FED, 3, 0, "a0", True), iw.Grant(FED, 3, 0, "a1", False, "duplicate"),
            iw.Collect(FED, 3, 2),
            iw.Partial(FED, 3, 0, 1, ["a0", "a1"], 25.0, 1, _delta(0.5, -1.0), {"not_msgpack": 2})]
    kinds = ["ingest_claim", "ingest_grant", "ingest_grant", "ingest_collect", "ingest_partial"]
    for m, kind in zip(msgs, kinds):
        back = iw.decode(iw.encode(m), expect=kind, fed=FED, spec=spec)
        if isinstance(m, iw.Partial):
            assert (back.agents, back.weight, back.clipped, back.rejected) == (m.agents, m.weight, 1, m.rejected)
            np.testing.assert_array_equal(back.delta["W0"], m.delta["W0"])
        else:
            assert back == m

    def reason(payload, kind="ingest_partial") -> str:
        with pytest.raises(wire.WireError) as e:
            iw.decode(payload, expect=kind, fed=FED, spec=spec)
        return e.value.reason

    good = msgs[-1]
    assert reason(b"\xc1garbage") == "not_msgpack"
    assert reason(iw.encode(good), "ingest_claim") == "wrong_kind"
    assert reason(iw.encode(iw.Partial("other", 3, 0, 1, ["a0"], 1.0, 0, _delta(0, 0)))) == "wrong_federation"
    assert reason(iw.encode(iw.Partial(FED, 3, 0, iw.MAX_WORKERS, ["a0"], 1.0, 0, _delta(0, 0)))) == "bad_field"
    assert reason(iw.encode(iw.Partial(FED, 3, 0, 1, ["a0", "a0"], 1.0, 0, _delta(0, 0)))) == "bad_field"
    assert reason(iw.encode(iw.Partial(FED, 3, 0, 1, ["a0"], 1.0, 2, _delta(0, 0)))) == "bad_field"
    assert reason(iw.encode(iw.Partial(FED, 3, 0, 1, ["a0"], 0.0, 0, _delta(0, 0)))) == "bad_field"
    wrong_shape = {"W0": np.zeros((2, 1), np.float32), "b0": np.zeros(1, np.float32)}
    assert reason(iw.encode(iw.Partial(FED, 3, 0, 1, ["a0"], 1.0, 0, wrong_shape))) == "spec_mismatch"
    assert reason(iw.encode(iw.Claim(FED, 3, 1, "a/0", "v", 1)), "ingest_claim") == "bad_field"  # not an agent id
    assert IT.parse(IT.claim(3)) == ("claim", 3)
    assert IT.parse(f"{IT.base}/03/claim") == ("", None)
    assert IT.parse(f"{IT.base}/{iw.MAX_WORKERS}/claim") == ("", None)
    assert IT.shared_updates("g") == f"$share/g/fl/{FED}/update/+"


# -- the coordinator, sans I/O ----------------------------------------------------------------------


def _config(**kw) -> AggregatorConfig:
    rc = dict(min_agents=4, quorum=1, timeout=10.0)
    rc.update(kw.pop("round", {}))
    return AggregatorConfig(federation=FED, rounds=kw.pop("rounds", 2),
                            model=ModelConfig(kind="linear", n_features=1, n_outputs=1),
                            round=RoundConfig(**rc), workers=WorkersConfig(count=2, spawn=False, collect_timeout=2.0),
                            **kw)


def _status(agent: str) -> tuple[str, bytes]:
    return T.status(agent), wire.encode(wire.StatusMsg(FED, 0, agent, "online", 10, ["linear"], "test", True))


def _worker_status(w: int, state: str = "online") -> tuple[str, bytes]:
    return IT.status(w), wire.encode(wire.StatusMsg(FED, 0, worker_status_id(w), state, 0, ["ingest"], "t", False))


def _claim(c: Coordinator, w: int, agent: str, n: int = 10) -> tuple[str, bytes]:
    return IT.claim(w), iw.encode(iw.Claim(FED, c.open.round, w, agent, c.version, n, {"train_loss": 1.0}))


def _grants(actions, w: int) -> list[iw.Grant]:
    return [iw.decode(a.payload, expect="ingest_grant", fed=FED) for a in actions
            if isinstance(a, Publish) and a.topic == IT.control(w) and b"ingest_grant" in a.payload]


def _collects(actions) -> list[int]:
    return sorted(IT.parse(a.topic)[1] for a in actions
                  if isinstance(a, Publish) and IT.parse(a.topic)[0] == "control" and b"ingest_collect" in a.payload)


def _partial(c: Coordinator, w: int, deltas: dict[str, tuple[dict, int]]) -> tuple[str, bytes]:
    """Worker ``w``'s partial of ``deltas`` (agent -> (delta, n)), formed as the worker forms it."""
    s = FedAvg()
    s.begin(c.params)
    for d, n in deltas.values():
        s.add(d, n)
    mean, weight = s.share()
    o = c.open
    return IT.partial(w), iw.encode(iw.Partial(FED, o.round, o.attempt, w, list(deltas), weight, 0, mean))


def _started(journal: list[dict] | None = None, **kw) -> IngestCoordinator:
    """Four agents and both workers online: round 1 open. ``journal`` collects the Journal records."""
    c = IngestCoordinator(_config(**kw), make_strategy(_config(**kw).strategy))
    actions = c.start(0.0)
    for i in range(4):
        actions += c.receive(*_status(f"a{i}"), now=0.0)
    assert c.open is None, "no round may open before a worker is there to read the updates"
    actions += c.receive(*_worker_status(0), now=0.1)
    actions += c.receive(*_worker_status(1), now=0.1)
    assert c.open is not None
    if journal is not None:
        journal += [a.record for a in actions if isinstance(a, Journal)]
    return c


DELTAS = {"a0": (_delta(1.0, 2.0), 10), "a1": (_delta(-3.0, 0.5), 30), "a2": (_delta(0.25, 4.0), 20),
          "a3": (_delta(2.0, -1.0), 40)}


def test_partials_of_two_workers_give_the_flat_fedavg_of_the_same_updates():
    c = _started()
    flat = FedAvg()
    flat.begin(c.params)
    for d, n in DELTAS.values():
        flat.add(d, n)
    expected = flat.result(c.params)
    split = {0: ["a0", "a2"], 1: ["a1", "a3"]}
    actions = []
    for w, agents in split.items():
        for a in agents:
            actions = c.receive(*_claim(c, w, a, DELTAS[a][1]), now=1.0)
            assert [g.ok for g in _grants(actions, w)] == [True]
            assert any(isinstance(x, Journal) and x.record["type"] == "grant" for x in actions)
    assert _collects(actions) == [0, 1], "the fourth grant reaches the target: both workers are asked"
    assert c.round == 0, "the round closes only once the partials are in"
    assert c.receive(*_partial(c, 0, {a: DELTAS[a] for a in split[0]}), now=1.1) == []
    out = c.receive(*_partial(c, 1, {a: DELTAS[a] for a in split[1]}), now=1.2)
    closed = [a for a in out if isinstance(a, RoundClosed)]
    assert closed and closed[0].summary.participants == 4 and c.round == 1
    for k in expected:
        np.testing.assert_allclose(c.params[k], expected[k], rtol=1e-6)
    assert closed[0].summary.metrics["train_loss"] == pytest.approx(1.0)


def test_an_update_claimed_by_two_workers_counts_once_and_a_worker_asking_again_is_granted_again():
    c = _started()
    assert _grants(c.receive(*_claim(c, 0, "a0"), now=1.0), 0)[0].ok
    second = _grants(c.receive(*_claim(c, 1, "a0"), now=1.0), 1)
    assert [(g.ok, g.reason) for g in second] == [(False, "duplicate")]
    again = c.receive(*_claim(c, 0, "a0"), now=1.0)  # worker 0 restarted before journaling it
    assert [g.ok for g in _grants(again, 0)] == [True]
    assert not any(isinstance(x, Journal) for x in again), "a repeated grant is not a second participant"
    assert c.open.received == {"a0"} and c.rejected["duplicate"] == 1
    assert [(g.ok, g.reason) for g in _grants(c.receive(*_claim(c, 1, "zz"), now=1.0), 1)] == [(False, "not_selected")]
    assert c.receive(IT.claim(7), b"x", now=1.0) == [] and c.rejected["unknown_worker"] == 1
    forged = iw.encode(iw.Claim(FED, c.open.round, 0, "a1", c.version, 10))
    assert c.receive(IT.claim(1), forged, now=1.0) == [] and c.rejected["identity_mismatch"] == 1


def test_a_worker_that_never_answers_costs_its_updates_not_the_round():
    c = _started()
    for w, a in ((0, "a0"), (1, "a1"), (0, "a2")):
        c.receive(*_claim(c, w, a, DELTAS[a][1]), now=1.0)
    c.receive(*_worker_status(0, "offline"), now=2.0)  # killed: its last will
    end = c.open.deadline
    assert c.tick(end - 0.1) == []
    asked = c.tick(end)  # the deadline, 3 of 4 with quorum 1: ask for the partials
    assert _collects(asked) == [0, 1]
    assert c.receive(*_partial(c, 1, {"a1": DELTAS["a1"]}), now=end + 0.1) == []
    out = c.tick(end + 0.25)  # worker 0 is down and the deadline passed: not waited for
    closed = [a for a in out if isinstance(a, RoundClosed)]
    assert closed, f"round not closed: {out}"
    s = closed[0].summary
    assert (s.participants, s.metrics["dropouts"]) == (1, 3.0)
    assert c.rejected["lost_with_worker"] == 2
    np.testing.assert_allclose(c.params["W0"], [[-3.0]], rtol=1e-6)


def test_below_quorum_after_a_lost_worker_the_attempt_is_abandoned_and_run_again():
    c = _started(round={"quorum": 2})
    c.receive(*_claim(c, 0, "a0"), now=1.0)
    c.receive(*_claim(c, 0, "a1"), now=1.0)
    c.receive(*_claim(c, 1, "a2"), now=1.0)
    end = c.open.deadline
    assert _collects(c.tick(end)) == [0, 1]
    c.receive(*_partial(c, 1, {"a2": DELTAS["a2"]}), now=end + 0.1)
    assert _collects(c.tick(end + 1.9)) == [0], "a collect not answered is asked again, of that worker only"
    out = c.tick(end + 2.0)  # worker 0 online but silent: collect_timeout (2 s) passes
    assert [a for a in out if isinstance(a, RoundAbandoned)]
    assert c.open is not None and c.open.attempt == 1 and c.round == 0


def test_a_restarted_coordinator_resumes_grants_and_collection_from_its_journal():
    journal: list[dict] = []
    c = _started(journal)
    for w, a in ((0, "a0"), (1, "a1"), (0, "a2"), (1, "a3")):
        for x in c.receive(*_claim(c, w, a, DELTAS[a][1]), now=1.0):
            if isinstance(x, Journal):
                journal.append(x.record)
    assert [r["type"] for r in journal] == ["open"] + ["grant"] * 4 + ["collect"]
    c2 = IngestCoordinator(_config(), make_strategy(_config().strategy), journal=journal)
    actions = c2.start(5.0)
    assert c2.open is not None and c2.open.received == set(DELTAS)
    assert _collects(actions) == [0, 1], "the partials are asked for again"
    c2.receive(*_partial(c2, 0, {a: DELTAS[a] for a in ("a0", "a2")}), now=5.1)
    out = c2.receive(*_partial(c2, 1, {a: DELTAS[a] for a in ("a1", "a3")}), now=5.2)
    assert [a for a in out if isinstance(a, RoundClosed)][0].summary.participants == 4


def test_a_lost_grant_is_claimed_again_and_a_partial_without_it_is_not_the_last_word():
    # Grants travel at QoS 0: the worker claims again, and a partial sent before the
    # grant arrived is replaced by the next one (the coordinator keeps asking).
    c = _started()
    for w, a in ((0, "a0"), (1, "a1"), (0, "a2"), (1, "a3")):
        c.receive(*_claim(c, w, a, DELTAS[a][1]), now=1.0)
    assert c.collecting is not None
    # Worker 0 saw a0's grant only: its first partial lacks a2, and it claims a2 again.
    assert c.receive(*_partial(c, 0, {"a0": DELTAS["a0"]}), now=1.1) == []
    again = c.receive(*_claim(c, 0, "a2", DELTAS["a2"][1]), now=1.2)
    assert [g.ok for g in _grants(again, 0)] == [True], "re-granted while collecting: it is counted already"
    assert _collects(c.tick(2.2)) == [0, 1], "both are asked again: 0 lacks a grant, 1 has not answered"
    c.receive(*_partial(c, 1, {a: DELTAS[a] for a in ("a1", "a3")}), now=2.3)
    out = c.receive(*_partial(c, 0, {a: DELTAS[a] for a in ("a0", "a2")}), now=2.4)
    closed = [a for a in out if isinstance(a, RoundClosed)]
    assert closed and closed[0].summary.participants == 4 and not c.rejected.get("lost_with_worker")


def test_a_restarted_worker_sums_its_granted_updates_again_and_claims_the_waiting_ones_again(tmp_path):
    from aggregator.journal import JournalFile

    cfg = _config(state_dir=str(tmp_path))
    spec = cfg.model.spec()
    assert spec.param_shapes() == {"W0": (1, 1), "b0": (1,)}

    def payload(agent: str, w: float) -> bytes:
        return wire.encode(wire.UpdateMsg(FED, 1, agent, "base", 10, _delta(w, 0.0)))

    from aggregator.ingest.worker import worker_state_dir

    j = JournalFile(worker_state_dir(cfg, 0), "journal-0.bin")
    for rec in ({"type": "held", "agent": "a0", "payload": payload("a0", 1.0)},
                {"type": "granted", "run": 7, "round": 1, "attempt": 0, "agent": "a0"},
                {"type": "held", "agent": "a9", "payload": payload("a9", 5.0)},  # an attempt that was abandoned
                {"type": "granted", "run": 7, "round": 1, "attempt": 1, "agent": "a1", "payload": payload("a1", 2.0)},
                {"type": "held", "agent": "a2", "payload": payload("a2", 4.0)},  # claimed, no answer yet
                {"type": "granted", "run": 7, "round": 1, "attempt": 1, "agent": "a9"}):
        j.append(rec)
    j.close()
    w = IngestWorker(cfg, 0, Loop())
    assert w.attempt_key == (7, 1, 1)
    assert sorted(w.counted) == ["a1", "a9"], "attempt 0's a0 is gone; a9 was granted in attempt 1"
    assert list(w.pending) == ["a2"]
    mean, weight = w.sum.share()
    assert weight == 20.0 and float(mean["W0"][0, 0]) == pytest.approx(3.5)
    assert iw.decode(w.pending["a2"].claim, expect="ingest_claim", fed=FED).agent == "a2"
    # A grant of the next attempt starts a new segment and deletes the old one: a2 is granted in it.
    w._on_grant(iw.Grant(FED, 1, 2, "a2", True, "", 7))
    assert (list(w.counted), w.attempt_key, list(w.segments)) == (["a2"], (7, 1, 2), [1])
    w.flush()
    w2 = IngestWorker(cfg, 0, Loop())
    assert (list(w2.counted), list(w2.pending), w2.attempt_key) == (["a2"], [], (7, 1, 2))
    assert sorted(p.name for p in worker_state_dir(cfg, 0).iterdir()) == ["journal-1.bin"]


def test_workers_are_refused_where_a_partial_sum_cannot_be_right():
    def problem(**flags) -> str:
        with pytest.raises(ConfigError) as e:
            load(AggregatorConfig, None, {"workers.count": "2", **flags})
        return str(e.value)

    assert "median" in problem(**{"strategy.name": "median"})
    assert "privacy.mode" in problem(**{"privacy.mode": "central", "privacy.expected_per_round": "10"})
    assert "secagg.mode" in problem(**{"secagg.mode": "secagg"})
    assert "round.mode" in problem(**{"round.mode": "async"})
    assert "broker.protocol" in problem(**{"broker.protocol": "3.1.1"})
    assert "workers.count" in problem(**{"workers.count": "65"})
    assert "workers.group" in problem(**{"workers.group": "a/b"})
    load(AggregatorConfig, None, {"workers.count": "2", "strategy.name": "fedadam"})  # a server optimizer is fine


# -- over a real mosquitto ---------------------------------------------------------------------------


def _fed_config(fed: str, broker_config: BrokerConfig, tmp_path: Path, n_agents: int, rounds: int,
                **round_kw) -> AggregatorConfig:
    rc = dict(min_agents=n_agents, quorum=1, timeout=WAIT_S)
    rc.update(round_kw)
    return AggregatorConfig(
        federation=fed, rounds=rounds, state_dir=str(tmp_path / "state"),
        model=ModelConfig(kind="softmax", n_features=64, n_outputs=10),
        training=TrainingConfig(epochs=2, batch_size=16, lr=0.1),
        round=RoundConfig(**rc), workers=WorkersConfig(count=2, spawn=False, collect_timeout=3.0),
        broker=broker_config,
    )


def test_two_in_process_workers_equal_the_flat_federation(fed, tmp_path, broker_config, start_aggregator):
    data = federated_digits(6, "dirichlet", 0.5, SEED, holdout=0.1)
    cfg = _fed_config(fed, broker_config, tmp_path, 6, rounds=3)
    agg = start_aggregator(cfg)
    loops = []
    workers = []
    try:
        for i in range(2):
            loop = Loop()
            workers.append(IngestWorker(cfg, i, loop))
            workers[-1].start()
            loop.start(name=f"test-worker-{i}")
            loops.append(loop)
        sim = Simulation(broker_config, fed, data.agents, seed=SEED)
        sim.start()
        try:
            agg.wait_finished(WAIT_S)
        finally:
            sim.stop()
    finally:
        for loop in loops:
            loop.stop()
    expected = offline_fedavg(data.agents, cfg, SEED, 3)
    for k in expected:
        np.testing.assert_allclose(agg.coordinator.params[k], expected[k], atol=1e-6, rtol=1e-5)
    summaries = [agg.rounds.get_nowait().summary for _ in range(3)]
    assert [(s.selected, s.participants) for s in summaries] == [(6, 6)] * 3
    assert not agg.coordinator.rejected
    # The broker split the stream: each worker summed some of the last round's updates.
    assert all(w.counted for w in workers), [w.counted for w in workers]
    assert sorted(a for w in workers for a in w.counted) == sorted(f"agent-{i:03d}" for i in range(6))


def test_a_burst_of_updates_to_one_worker_all_count(fed, tmp_path, broker_config, start_aggregator, raw_client):
    # 100 updates at once to one worker. A worker that held each update's MQTT ack until its grant
    # came had its window (then 32) filled by them, and the grants, queued behind, never arrived: a
    # deadlock seen in the bench. It acknowledges once its journal holds the update, before claiming.
    n = 100
    cfg = AggregatorConfig(federation=fed, rounds=1, state_dir=str(tmp_path / "state"),
                           model=ModelConfig(kind="linear", n_features=1, n_outputs=1),
                           round=RoundConfig(min_agents=n, quorum=1, timeout=WAIT_S),
                           workers=WorkersConfig(count=1, spawn=False), broker=broker_config)
    agg = start_aggregator(cfg)
    loop = Loop()
    worker = IngestWorker(cfg, 0, loop)
    worker.start()
    loop.start(name="test-worker-0")
    t = Topics(fed)
    devices = raw_client()
    try:
        devices.subscribe(t.task)
        for i in range(n):
            devices.publish(t.status(f"d{i:03d}"), wire.encode(wire.StatusMsg(fed, 0, f"d{i:03d}", "online", 5,
                                                                             ["linear"], "t", True)), retain=True)
        task = devices.wait_for_open_task(t.task)
        for i in range(n):
            devices.client.publish(t.update(f"d{i:03d}"), wire.encode(wire.UpdateMsg(
                fed, task.round, f"d{i:03d}", task.base, 5, _delta(float(i), 1.0))), qos=1)
        agg.wait_finished(WAIT_S)
        s = agg.rounds.get_nowait().summary
        assert s.participants == n and not agg.coordinator.rejected
        np.testing.assert_allclose(agg.coordinator.params["W0"], [[(n - 1) / 2]], rtol=1e-6)
    finally:
        loop.stop()
        for i in range(n):
            devices.publish(t.status(f"d{i:03d}"), b"", retain=True)


def _write_config(path: Path, cfg: AggregatorConfig, collect_timeout: float) -> None:
    b = cfg.broker
    path.write_text(f"""federation = "{cfg.federation}"
rounds = {cfg.rounds}
state_dir = "{cfg.state_dir}"
[model]
kind = "softmax"
n_features = 64
n_outputs = 10
[training]
epochs = 2
batch_size = 16
lr = 0.1
[round]
min_agents = {cfg.round.min_agents}
quorum = {cfg.round.quorum}
timeout = {cfg.round.timeout}
[workers]
count = 2
collect_timeout = {collect_timeout}
[broker]
host = "{b.host}"
port = {b.port}
""")


def _wait(cond, timeout: float, what: str) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return
        time.sleep(0.02)
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")


def test_a_worker_killed_mid_round_is_restarted_and_loses_nothing_it_acknowledged(
        fed, tmp_path, broker_config, start_aggregator):
    # 4 fast agents and 2 that train for 3 s: worker 0 is killed (SIGKILL) after it has journaled
    # and acknowledged updates, before the slow agents send. Its supervisor restarts it; it folds
    # its journal again and reads what its session queued meanwhile. The round closes with all 6.
    data = federated_digits(6, "dirichlet", 0.5, SEED, holdout=0.1)
    cfg = _fed_config(fed, broker_config, tmp_path, 6, rounds=1)
    path = tmp_path / "aggregator.toml"
    _write_config(path, cfg, collect_timeout=15.0)
    cfg = load(AggregatorConfig, str(path))
    agg = start_aggregator(cfg)
    sup_loop = Loop()
    sup = WorkerSupervisor(sup_loop, ["--config", str(path)], 2)
    sup_loop.call_soon(sup.start)
    sup_loop.start(name="test-supervisor")
    sims = []
    try:
        c = agg.coordinator
        _wait(lambda: c.workers_online == {0, 1}, WAIT_S, "both workers online")
        fast = Simulation(broker_config, fed, data.agents[:4], seed=SEED, indices=range(4))
        slow = Simulation(broker_config, fed, data.agents[4:], seed=SEED, indices=range(4, 6), train_delay=3.0)
        sims = [fast, slow]
        fast.start()
        slow.start()
        _wait(lambda: len(c.granted) >= 4 and any(g.worker == 0 for g in dict(c.granted).values()), WAIT_S,
              "the fast agents' updates granted, one of them to worker 0")
        journal = Path(cfg.state_dir) / "worker-0"
        _wait(lambda: any(f.stat().st_size > 0 for f in journal.glob("journal-*.bin")), WAIT_S,
              "worker 0's journal written")
        victim = sup.procs[0]
        os.kill(victim.pid, signal.SIGKILL)
        victim.wait(10)
        agg.wait_finished(WAIT_S * 2)
        s = agg.rounds.get_nowait().summary
        assert (s.participants, s.metrics["dropouts"]) == (6, 0.0), (s, dict(c.rejected))
        assert "lost_with_worker" not in c.rejected
        assert sup.restarts >= 1 and sup.procs[0].pid != victim.pid
    finally:
        for sim in sims:
            sim.stop()
        sup_loop.stop()
        if sup_loop.thread is not None:
            sup_loop.thread.join(15)
    expected = offline_fedavg(data.agents, cfg, SEED, 1)
    for k in expected:
        np.testing.assert_allclose(agg.coordinator.params[k], expected[k], atol=1e-6, rtol=1e-5)


def test_a_worker_killed_for_good_does_not_hold_the_round_past_its_deadline(
        fed, tmp_path, broker_config, start_aggregator, raw_client):
    # Six agents answer at once, a seventh (online, eligible) never does, so the round runs to its
    # deadline. Worker 0 is killed and not restarted: at the deadline its updates count as dropouts
    # and the round closes with worker 1's, without waiting for collect_timeout.
    data = federated_digits(6, "dirichlet", 0.5, SEED, holdout=0.1)
    timeout = 6.0
    cfg = _fed_config(fed, broker_config, tmp_path, 7, rounds=1, timeout=timeout, quorum=2)
    path = tmp_path / "aggregator.toml"
    _write_config(path, cfg, collect_timeout=20.0)
    cfg = load(AggregatorConfig, str(path))
    agg = start_aggregator(cfg)
    procs = [subprocess.Popen([sys.executable, "-m", "fedmqtt", "worker", "--config", str(path), "--index", str(i)])
             for i in range(2)]
    silent = raw_client()
    sim = None
    try:
        c = agg.coordinator
        _wait(lambda: c.workers_online == {0, 1}, WAIT_S, "both workers online")
        silent.publish(Topics(fed).status("silent"), wire.encode(wire.StatusMsg(fed, 0, "silent", "online", 10,
                                                                                 ["softmax"], "t", True)), retain=True)
        sim = Simulation(broker_config, fed, data.agents, seed=SEED)
        sim.start()
        _wait(lambda: len(c.granted) == 6, WAIT_S, "six updates granted")
        held = sum(1 for g in dict(c.granted).values() if g.worker == 0)
        assert 0 < held < 6, f"the broker gave worker 0 {held} of 6 updates"
        procs[0].send_signal(signal.SIGKILL)
        procs[0].wait(10)
        _wait(lambda: 0 not in c.workers_online, WAIT_S, "worker 0's last will")
        agg.wait_finished(timeout + WAIT_S)
        s = agg.rounds.get_nowait().summary
        assert s.seconds < timeout + 2.0, f"the round took {s.seconds:.1f} s with a deadline of {timeout} s"
        assert (s.participants, s.metrics["dropouts"]) == (6 - held, float(1 + held))
        assert c.rejected["lost_with_worker"] == held
    finally:
        if sim is not None:
            sim.stop()
        silent.publish(Topics(fed).status("silent"), b"", retain=True)
        for p in procs:
            if p.poll() is None:
                p.terminate()
                p.wait(10)
