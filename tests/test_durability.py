"""Failures for real: kill -9 the aggregator, restart mosquitto, kill agents, take agents offline.

Every test runs real processes or real MQTT clients against a real mosquitto
and checks that training ends where an undisturbed run ends.
"""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from aggregator import checkpoint
from aggregator.broker import LocalBroker
from aggregator.config import AggregatorConfig, ModelConfig, RoundConfig, TrainingConfig
from aggregator.datasets import federated_digits
from aggregator.demo import DemoOptions, run_demo
from aggregator.journal import JournalFile
from aggregator.sim import Simulation
from edge_agent import wire
from edge_agent.agent import AgentCore, AgentRunner
from edge_agent.agent_store import AgentStore
from edge_agent.config import BrokerConfig
from edge_agent.mqtt import Loop
from edge_agent.topics import Topics

from .conftest import WAIT_S, RawClient, offline_fedavg

pytestmark = pytest.mark.broker

FEDMQTT = str(Path(sys.executable).parent / "fedmqtt")


def wait_until(cond, timeout: float = WAIT_S, what: str = "condition") -> None:
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


class Device:
    """A scripted device on a plain paho client: it moves θ = [w, b] where the test says, when it says."""

    def __init__(self, broker, fed: str, name: str) -> None:
        self.t = Topics(fed)
        self.fed, self.name = fed, name
        self.c = RawClient(broker, name)
        self.c.subscribe(self.t.task)
        self.c.publish(self.t.status(name), wire.encode(wire.StatusMsg(fed, 0, name, "online", 1, ["linear"])),
                       retain=True)

    def task(self, after_round: int) -> wire.TaskMsg:
        return self.c.wait_for_open_task(self.t.task, after_round)

    def send(self, task: wire.TaskMsg, target: list[float], current: list[float]) -> None:
        delta = {"W0": np.array([[target[0] - current[0]]], np.float32),
                 "b0": np.array([target[1] - current[1]], np.float32)}
        upd = wire.UpdateMsg(self.fed, task.round, self.name, task.base, 1, delta, {})
        self.c.publish(self.t.update(self.name), wire.encode(upd))

    def close(self) -> None:
        self.c.publish(self.t.status(self.name), b"", retain=True)
        self.c.close()


def linear_toml(path: Path, fed: str, state: Path, rounds: int, **round_kw) -> Path:
    rk = {"min_agents": 3, "quorum": 3, "timeout": 60.0, **round_kw}
    path.write_text(
        f'federation = "{fed}"\nrounds = {rounds}\nstate_dir = "{state}"\n'
        '[model]\nkind = "linear"\nn_features = 1\nn_outputs = 1\n'
        "[round]\n" + "".join(f"{k} = {v}\n" for k, v in rk.items())
    )
    return path


def start_aggregator_process(toml: Path, broker) -> subprocess.Popen:
    return subprocess.Popen([FEDMQTT, "aggregator", "--config", str(toml), "--broker", broker.address],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def test_kill_9_mid_round_and_updates_sent_while_down_are_used(fed, broker, tmp_path):
    """kill -9 the aggregator after 2 of 3 updates of round 2; the third is sent while it is down."""
    state = tmp_path / "state"
    toml = linear_toml(tmp_path / "agg.toml", fed, state, rounds=3)
    devices = [Device(broker, fed, f"dev{i}") for i in range(3)]
    targets = {1: [[1, 1], [2, 2], [3, 3]], 2: [[4, 0], [5, 1], [6, 2]], 3: [[0, 0], [1, 1], [8, 2]]}
    current = [0.0, 0.0]
    agg = start_aggregator_process(toml, broker)
    try:
        task = devices[0].task(0)
        for d, tgt in zip(devices, targets[1]):
            d.send(task, tgt, current)
        current = [2.0, 2.0]
        task = devices[0].task(1)
        assert task.round == 2
        devices[0].send(task, targets[2][0], current)
        devices[1].send(task, targets[2][1], current)
        journal = JournalFile(state)
        wait_until(lambda: sum(r["type"] == "update" and r["round"] == 2 for r in journal.load()) == 2,
                   what="two round-2 updates in the journal")
        agg.send_signal(signal.SIGKILL)
        agg.wait(10)
        # the third device publishes while no aggregator is connected
        devices[2].send(task, targets[2][2], current)
        time.sleep(0.2)
        agg = start_aggregator_process(toml, broker)
        current = [5.0, 1.0]
        task = devices[0].task(2)
        assert task.round == 3 and task.base == wire.params_version(
            {"W0": np.array([[5.0]], np.float32), "b0": np.array([1.0], np.float32)})
        for d, tgt in zip(devices, targets[3]):
            d.send(task, tgt, current)
        out, _ = agg.communicate(timeout=WAIT_S)
        assert agg.returncode == 0, out
        assert "resumed round 2 attempt 0 with 2 accepted updates" in out
    finally:
        if agg.poll() is None:
            agg.kill()
        for d in devices:
            d.close()
    final = checkpoint.load(state)
    # an undisturbed run: the mean of each round's targets
    assert final["round"] == 3
    np.testing.assert_allclose([final["params"]["W0"][0, 0], final["params"]["b0"][0]], [3.0, 1.0], atol=1e-6)
    assert [h["participants"] for h in final["history"]] == [3, 3, 3]


# The real aggregator process (`fedmqtt aggregator`), with one test hook put in
# from outside: it stops itself (SIGSTOP) just before the fsync of a group of
# two or more round-2 updates, i.e. after their records were written and
# before anything covering them was fsynced or acknowledged. After every
# fsync (and reset) it records the journal's durable size in argv[1].
PAUSE_BEFORE_GROUP_FSYNC = """
import os, signal, sys
from aggregator import journal
from fedmqtt.cli import main

durable_file = sys.argv.pop(1)
real_append, real_sync, real_reset = journal.JournalFile.append, journal.JournalFile.sync, journal.JournalFile.reset

def record_durable(self):
    tmp = durable_file + ".tmp"
    with open(tmp, "w") as fh:
        fh.write(str(self.path.stat().st_size))
    os.replace(tmp, durable_file)

def append(self, record, sync=True):
    if record.get("type") == "update" and record.get("round") == 2:
        self.test_group = getattr(self, "test_group", 0) + 1
    return real_append(self, record, sync)

def sync(self):
    if getattr(self, "test_group", 0) >= 2:
        os.kill(os.getpid(), signal.SIGSTOP)  # written, not yet fsynced or acknowledged: the test kills us here
    done = real_sync(self)
    self.test_group = 0
    record_durable(self)
    return done

def reset(self):
    real_reset(self)
    self.test_group = 0
    record_durable(self)

journal.JournalFile.append, journal.JournalFile.sync, journal.JournalFile.reset = append, sync, reset
sys.exit(main(sys.argv[1:]))
"""


def process_state(pid: int) -> str:
    with open(f"/proc/{pid}/stat") as fh:
        return fh.read().rsplit(")", 1)[1].split()[0]


@pytest.mark.parametrize("crash", ["kill_9", "power_cut"])
def test_kill_9_between_a_group_write_and_its_fsync(fed, broker, tmp_path, crash):
    """Group commit: two updates read in one pass are written, then the process dies before their one fsync.

    round 2, 4 devices: dev0's update alone (written, fsynced, acknowledged);
    then dev1's and dev2's arrive together, the aggregator writes both and is
    killed -9 before the fsync. "kill_9": the page cache keeps what was
    written. "power_cut": the test also cuts the journal back to its durable
    size plus part of dev1's record, as a power cut may. dev3 sends while the
    aggregator is down. After a restart the final model is an undisturbed
    run's: dev0's acknowledged update comes from the journal (it is never
    delivered again), dev1's and dev2's from the journal or, never having been
    acknowledged, from the broker again.
    """
    state = tmp_path / "state"
    durable_file = tmp_path / "durable-size"
    toml = linear_toml(tmp_path / "agg.toml", fed, state, rounds=3, min_agents=4, quorum=4)
    devices = [Device(broker, fed, f"dev{i}") for i in range(4)]
    targets = {1: [[1, 1], [2, 2], [3, 3], [6, 6]], 2: [[4, 0], [5, 1], [6, 2], [9, 5]],
               3: [[0, 0], [1, 1], [8, 2], [3, 1]]}
    means = {r: np.mean(t, axis=0).tolist() for r, t in targets.items()}
    journal = JournalFile(state)

    def round2_agents() -> list[str]:
        return [r["agent"] for r in journal.load() if r["type"] == "update" and r["round"] == 2]

    def durable_size() -> int:
        try:
            return int(durable_file.read_text())
        except (FileNotFoundError, ValueError):
            return -1

    agg = subprocess.Popen([sys.executable, "-c", PAUSE_BEFORE_GROUP_FSYNC, str(durable_file), "aggregator",
                            "--config", str(toml), "--broker", broker.address],
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        task = devices[0].task(0)
        for d, tgt in zip(devices, targets[1]):
            d.send(task, tgt, [0.0, 0.0])
        task = devices[0].task(1)
        assert task.round == 2
        devices[0].send(task, targets[2][0], means[1])
        wait_until(lambda: round2_agents() == ["dev0"] and durable_size() == journal.path.stat().st_size,
                   what="dev0's update journaled and fsynced")
        # Hold the aggregator while dev1 and dev2 send: their updates wait in its
        # socket and are read in one pass when it runs again.
        agg.send_signal(signal.SIGSTOP)
        devices[1].send(task, targets[2][1], means[1])
        devices[2].send(task, targets[2][2], means[1])
        time.sleep(0.3)
        agg.send_signal(signal.SIGCONT)
        wait_until(lambda: round2_agents() == ["dev0", "dev1", "dev2"] and process_state(agg.pid) == "T",
                   what="the aggregator stopped before the fsync of dev1's and dev2's records")
        durable, written = durable_size(), journal.path.stat().st_size
        assert 0 < durable < written  # two records written, not yet durable
        agg.send_signal(signal.SIGKILL)
        agg.wait(10)
        if crash == "power_cut":
            with open(journal.path, "r+b") as fh:
                fh.truncate(durable + (written - durable) // 4)  # inside dev1's record
        devices[3].send(task, targets[2][3], means[1])
        time.sleep(0.2)
        agg = start_aggregator_process(toml, broker)
        task = devices[0].task(2)
        assert task.round == 3
        for d, tgt in zip(devices, targets[3]):
            d.send(task, tgt, means[2])
        out, _ = agg.communicate(timeout=WAIT_S)
        assert agg.returncode == 0, out
    finally:
        if agg.poll() is None:
            agg.kill()
        for d in devices:
            d.close()
    if crash == "power_cut":
        assert "resumed round 2 attempt 0 with 1 accepted updates" in out, out
        assert "torn last record" in out, out
    else:
        assert "resumed round 2 attempt 0 with 3 accepted updates" in out, out
    final = checkpoint.load(state)
    assert final["round"] == 3
    np.testing.assert_allclose([final["params"]["W0"][0, 0], final["params"]["b0"][0]], means[3], atol=1e-6)
    assert [h["participants"] for h in final["history"]] == [4, 4, 4]


def digits_cfg(fed, bcfg, tmp_path, rounds, **round_kw) -> AggregatorConfig:
    return AggregatorConfig(
        federation=fed, rounds=rounds, state_dir=str(tmp_path / "state"),
        model=ModelConfig(kind="softmax", n_features=64, n_outputs=10),
        training=TrainingConfig(epochs=2, batch_size=16, lr=0.1),
        round=RoundConfig(**{"quorum": 1, "timeout": WAIT_S, **round_kw}), broker=bcfg,
    )


def test_broker_restart_with_persistence_in_the_middle_of_a_round(tmp_path, start_aggregator):
    """mosquitto stops (SIGTERM, persisting) and comes back while round 1 waits for a slow device."""
    fed = "restart"
    with LocalBroker() as b:
        bcfg = BrokerConfig(host=b.host, port=b.port)
        data = federated_digits(3, "iid", 0.5, 2)
        cfg = digits_cfg(fed, bcfg, tmp_path, rounds=2, min_agents=4)
        ra = start_aggregator(cfg)
        sim = Simulation(bcfg, fed, data.agents, seed=2)
        slow = RawClient(b, "slow")
        t = Topics(fed)
        slow.subscribe(t.task)
        slow.publish(t.status("slow"), wire.encode(wire.StatusMsg(fed, 0, "slow", "online", 1, ["softmax"])),
                     retain=True)
        sim.start()
        try:
            wait_until(lambda: ra.coordinator.open is not None and len(ra.coordinator.open.received) == 3,
                       what="the three simulated agents' round-1 updates")
            task = slow.wait_for_open_task(t.task, 0)
            b.stop()
            time.sleep(0.5)
            b.start()  # same port, same persistence directory
            wait_until(lambda: ra.service.conn.connected and all(r.conn.connected for r in sim.runners),
                       what="everyone reconnecting")
            zero = {k: np.zeros(s, np.float32) for k, s in cfg.model.spec().param_shapes().items()}
            slow.publish(t.update("slow"), wire.encode(wire.UpdateMsg(fed, 1, "slow", task.base, 1, zero, {})))
            task2 = slow.wait_for_open_task(t.task, 1)
            slow.publish(t.update("slow"), wire.encode(wire.UpdateMsg(fed, 2, "slow", task2.base, 1, zero, {})))
            ra.wait_finished()
        finally:
            sim.stop()
            slow.close()
    expected = offline_fedavg(data.agents, cfg, 2, 2, extra_weight=1.0)
    for k in expected:
        np.testing.assert_allclose(ra.coordinator.params[k], expected[k], atol=1e-6)
    assert [h.participants for h in ra.coordinator.history] == [4, 4]


def _sim(broker, fed, n, prefix, delay=0.0, extra=()) -> subprocess.Popen:
    return subprocess.Popen(
        [FEDMQTT, "sim", "--agents", str(n), "--broker", broker.address, "--federation", fed, "--partition", "iid",
         "--prefix", prefix, "--train-delay", str(delay), *extra],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )


def test_killing_30_percent_of_the_selected_agents(fed, broker, broker_config, tmp_path, start_aggregator):
    """3 of 10 selected agents are killed mid-round: the round closes at the deadline with quorum 7."""
    cfg = digits_cfg(fed, broker_config, tmp_path, rounds=1, min_agents=10, quorum=7, timeout=3.0)
    ra = start_aggregator(cfg)
    slow = _sim(broker, fed, 3, "slow", delay=60.0)
    fast = _sim(broker, fed, 7, "fast")
    try:
        wait_until(lambda: ra.coordinator.open is not None and len(ra.coordinator.open.received) == 7,
                   what="the 7 fast updates")
        assert len(ra.coordinator.open.selected) == 10
        os.kill(slow.pid, signal.SIGKILL)
        ra.wait_finished()
    finally:
        for p in (slow, fast):
            p.kill()
            p.wait()
    (s,) = ra.coordinator.history
    assert (s.selected, s.participants, s.metrics["dropouts"]) == (10, 7, 3.0)
    assert s.seconds >= 3.0  # it waited for the deadline


def test_too_few_survivors_abandon_the_round_and_it_reruns(fed, broker, broker_config, tmp_path, start_aggregator):
    cfg = digits_cfg(fed, broker_config, tmp_path, rounds=1, min_agents=7, quorum=8, timeout=3.0)
    ra = start_aggregator(cfg)
    slow = _sim(broker, fed, 3, "slow", delay=60.0)
    fast = None
    try:
        wait_until(lambda: sum(a.startswith("slow") for a in ra.coordinator.agents) == 3, what="the slow agents")
        fast = _sim(broker, fed, 7, "fast")
        wait_until(lambda: ra.coordinator.open is not None, what="round 1 opening")
        first = list(ra.coordinator.open.selected)
        assert {"slow-000", "slow-001", "slow-002"} <= set(first)
        os.kill(slow.pid, signal.SIGKILL)
        ra.wait_finished()
    finally:
        for p in (slow, fast):
            if p is not None:
                p.kill()
                p.wait()
    (s,) = ra.coordinator.history
    assert s.attempt == 1  # attempt 0 was abandoned
    assert s.participants == 7 and all(a.startswith("fast") for a in ra.coordinator.agents
                                       if ra.coordinator.agents[a].online)
    assert ra.coordinator.rejected.get("wrong_round", 0) == 0


def test_an_agent_offline_for_three_rounds_rejoins_from_the_retained_model_and_task(
    fed, broker_config, tmp_path, start_aggregator
):
    data = federated_digits(4, "iid", 0.5, 3)
    # a round that selected the roamer before it left closes at its 2 s deadline with the other three
    cfg = digits_cfg(fed, broker_config, tmp_path, rounds=12, min_agents=3, quorum=3, timeout=2.0)
    ra = start_aggregator(cfg)
    sim = Simulation(broker_config, fed, data.agents[:3], seed=3)
    store_dir = tmp_path / "roamer"

    def roamer() -> tuple[AgentRunner, Loop]:
        loop = Loop()
        r = AgentRunner(loop, AgentCore("roamer", fed, data.agents[3], seed=7), broker_config, store=AgentStore(store_dir))
        r.start()
        loop.start(name="roamer")
        return r, loop

    gate = threading.Event()
    r1, loop1 = roamer()
    sim.start()
    try:
        # round 1 needs min_agents = 3 only; wait until the roamer took part in a round
        wait_until(lambda: r1.core.updates_sent >= 1, what="the roamer's first update")
        loop1.stop()
        loop1.thread.join(10)  # clean stop: it publishes "offline" first
        wait_until(lambda: not ra.coordinator.agents["roamer"].online, what="the roamer going offline")
        went = max(r for r, _ in r1.core.trained)  # the last round it trained before leaving
        wait_until(lambda: ra.coordinator.round >= went + 3, what="three rounds without the roamer")
        sim.loop.call_soon_threadsafe(lambda: gate.wait(WAIT_S))  # hold the others: the roamer must catch up
        r2, loop2 = roamer()
        wait_until(lambda: ra.coordinator.agents["roamer"].online, what="the roamer back online")
        back = ra.coordinator.round
        gate.set()
        ra.wait_finished()
    finally:
        gate.set()
        sim.stop()
        for lp in (loop1, locals().get("loop2")):
            if lp is not None:
                lp.stop()
    missed = {h.round for h in ra.coordinator.history if went < h.round <= went + 3}
    assert len(missed) == 3
    trained_rounds = {r for r, _ in r2.core.trained}
    assert not trained_rounds & missed  # it trained in none of the rounds it was away for
    assert max(trained_rounds) > back  # and in a round after it came back
    assert r2.core.model_msg.round >= back  # from the retained model, not the one it had


def test_async_mode_is_within_two_points_of_sync_on_the_demo(tmp_path):
    sync = run_demo(DemoOptions(rounds=20, out=str(tmp_path / "sync")), io.StringIO())
    # FedBuff applies every 5 updates: 40 versions use the same 200 local trainings as 20 sync rounds
    asyn = run_demo(DemoOptions(rounds=40, mode="async", buffer=5, out=str(tmp_path / "async")), io.StringIO())
    assert abs(asyn.final_accuracy - sync.final_accuracy) <= 0.02, (asyn.final_accuracy, sync.final_accuracy)
    assert any(s.metrics.get("mean_staleness", 0) > 0 for s in asyn.rounds)  # it really was asynchronous
