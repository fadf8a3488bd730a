"""Whole federations over a real mosquitto: aggregator service, agents, raw MQTT devices."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from aggregator import checkpoint
from aggregator.config import AggregatorConfig, ModelConfig, RoundConfig, TrainingConfig
from aggregator.datasets import federated_digits
from aggregator.sim import Simulation
from edge_agent import wire
from edge_agent.agent import AgentCore, AgentRunner
from edge_agent.mqtt import Loop
from edge_agent.topics import Topics

from .conftest import WAIT_S, offline_fedavg

pytestmark = pytest.mark.broker

REPO = Path(__file__).resolve().parents[1]
FEDMQTT = str(Path(sys.executable).parent / "fedmqtt")


def digits_config(fed, broker_config, tmp_path, rounds=3, min_agents=5, **kw) -> AggregatorConfig:
    return AggregatorConfig(
        federation=fed,
        rounds=rounds,
        state_dir=str(tmp_path / "state"),
        model=ModelConfig(kind="softmax", n_features=64, n_outputs=10),
        training=TrainingConfig(epochs=2, batch_size=16, lr=0.1),
        round=RoundConfig(min_agents=min_agents, quorum=1, timeout=WAIT_S, **kw),
        broker=broker_config,
    )


def test_textbook_fedavg_through_the_broker(fed, broker_config, tmp_path, start_aggregator, raw_client):
    """Three devices at θ1=[1,2], θ2=[2,3], θ3=[3,4] with equal weights give [2,3]."""
    topics = Topics(fed)
    cfg = AggregatorConfig(
        federation=fed, rounds=1, state_dir=str(tmp_path / "state"),
        model=ModelConfig(kind="linear", n_features=1, n_outputs=1),
        round=RoundConfig(min_agents=3, quorum=3, timeout=WAIT_S), broker=broker_config,
    )
    ra = start_aggregator(cfg)
    observer = raw_client()
    observer.subscribe(topics.task)
    observer.subscribe(topics.metrics)
    devices = {}
    for agent in ("dev-1", "dev-2", "dev-3"):
        d = raw_client(agent)
        d.subscribe(topics.selected(agent))
        d.publish(topics.status(agent), wire.encode(wire.StatusMsg(fed, 0, agent, "online", 5, ["linear"])), retain=True)
        devices[agent] = d
    task = observer.wait_for_open_task(topics.task)
    for agent, d in devices.items():  # each device is told it is selected, on its own topic
        notice = wire.decode(d.wait_for(topics.selected(agent))[0], expect="selected", fed=fed)
        assert (notice.agent, notice.round, notice.attempt, notice.base) == (agent, task.round, task.attempt, task.base)
    for agent, target in zip(devices, ([1, 2], [2, 3], [3, 4])):
        delta = {"W0": np.array([[target[0]]], np.float32), "b0": np.array([target[1]], np.float32)}  # from θ0 = 0
        upd = wire.UpdateMsg(fed, task.round, agent, task.base, 5, delta, {})
        devices[agent].publish(topics.update(agent), wire.encode(upd))
    ra.wait_finished()
    # metrics leave after the model on the same connection: once they are here,
    # the broker holds the round-1 model as its retained message
    assert wire.decode(observer.wait_for(topics.metrics)[0]).round == 1
    fresh = raw_client()
    fresh.subscribe(topics.model)
    payload, retained = fresh.wait_for(topics.model)
    model = wire.decode(payload, expect="model")
    assert retained and model.round == 1
    np.testing.assert_allclose([model.params["W0"][0, 0], model.params["b0"][0]], [2.0, 3.0], atol=1e-6)
    for agent in devices:  # clean up retained statuses and notices of this test's federation
        devices[agent].publish(topics.status(agent), b"", retain=True)
        devices[agent].publish(topics.selected(agent), b"", retain=True)


def test_five_agents_three_rounds_match_the_offline_computation(fed, broker_config, tmp_path, start_aggregator):
    seed = 4
    data = federated_digits(5, "dirichlet", 0.5, seed)
    cfg = digits_config(fed, broker_config, tmp_path, rounds=3, min_agents=5)
    ra = start_aggregator(cfg)
    sim = Simulation(broker_config, fed, data.agents, seed=seed)
    sim.start()
    try:
        ra.wait_finished()
        assert sim.finished.wait(WAIT_S), "agents did not see the federation finish"
    finally:
        sim.stop()
    expected = offline_fedavg(data.agents, cfg, seed, 3)
    got = ra.coordinator.params
    for k in expected:
        np.testing.assert_allclose(got[k], expected[k], atol=1e-6, rtol=0)
    rounds = [ra.rounds.get_nowait().summary for _ in range(3)]
    assert [s.participants for s in rounds] == [5, 5, 5]
    assert not ra.coordinator.rejected
    # the checkpoint on disk is the final model
    state = checkpoint.load(cfg.state_dir)
    assert state["round"] == 3 and state["version"] == wire.params_version(got)


def test_agent_starting_after_round_one_picks_up_the_retained_model_and_joins(
    fed, broker_config, tmp_path, start_aggregator
):
    data = federated_digits(6, "iid", 0.5, 1)
    cfg = digits_config(fed, broker_config, tmp_path, rounds=3, min_agents=5)
    ra = start_aggregator(cfg)
    sim = Simulation(broker_config, fed, data.agents[:5], seed=1)
    gate = threading.Event()
    late_loop = Loop()
    try:
        sim.start()
        first = ra.rounds.get(timeout=WAIT_S).summary
        assert first.round == 1 and first.participants == 5
        # Hold the five early agents so round 2 (already opened with them) waits
        # until the late agent is known to the aggregator.
        sim.loop.call_soon_threadsafe(lambda: gate.wait(WAIT_S))
        late = AgentRunner(late_loop, AgentCore("late-agent", fed, data.agents[5], seed=99), broker_config)
        late.start()
        late_loop.start(name="late-agent")
        end = time.monotonic() + WAIT_S
        while "late-agent" not in ra.coordinator.agents and time.monotonic() < end:
            time.sleep(0.01)
        assert "late-agent" in ra.coordinator.agents
        gate.set()
        ra.wait_finished()
    finally:
        gate.set()
        sim.stop()
        late_loop.stop()
        late_loop.thread and late_loop.thread.join(10)
    summaries = [first] + [ra.rounds.get_nowait().summary for _ in range(2)]
    assert [s.participants for s in summaries] == [5, 5, 6]
    # It picked up a retained model of round >= 1 (never the initial one) and trained once.
    assert late.core.trained == {(3, 0)}
    assert late.core.updates_sent == 1


def test_cli_processes_run_a_federation(fed, broker, tmp_path):
    """`fedmqtt aggregator` and two `fedmqtt agent` processes, as a user would run them."""
    data = federated_digits(2, "iid", 0.5, 0)
    for i, d in enumerate(data.agents):
        np.savez(tmp_path / f"agent{i}.npz", X=d.X_train, y=d.y_train)
    agg_toml = tmp_path / "aggregator.toml"
    agg_toml.write_text(
        f'federation = "{fed}"\nrounds = 2\nstate_dir = "{tmp_path / "state"}"\n'
        "[model]\nkind = \"softmax\"\nn_features = 64\nn_outputs = 10\n"
        "[round]\nmin_agents = 2\ntimeout = 30.0\n"
    )
    common = ["--broker", broker.address]
    agg = subprocess.Popen([FEDMQTT, "aggregator", "--config", str(agg_toml), *common],
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    agents = [
        subprocess.Popen(
            [FEDMQTT, "agent", "--federation", fed, "--agent-id", f"cli-{i}", "--data", str(tmp_path / f"agent{i}.npz"),
             "--exit-when-done", "true", "--state-dir", str(tmp_path / f"agent{i}-state"), *common],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        for i in range(2)
    ]
    try:
        out, _ = agg.communicate(timeout=60)
        assert agg.returncode == 0, out
        for a in agents:
            aout, _ = a.communicate(timeout=30)
            assert a.returncode == 0, aout
    finally:
        for p in (agg, *agents):
            if p.poll() is None:
                p.kill()
    state = checkpoint.load(tmp_path / "state")
    assert state["round"] == 2 and [h["participants"] for h in state["history"]] == [2, 2]


def test_agent_command_imports_no_aggregator_code_or_extras(fed, broker, tmp_path, raw_client):
    """`fedmqtt agent` run for real must not load the aggregator package or any extra."""
    np.savez(tmp_path / "d.npz", X=np.random.default_rng(0).random((20, 64), dtype=np.float32), y=np.arange(20) % 10)
    # A finished federation makes the agent connect, decode a task and exit.
    raw_client().publish(Topics(fed).task, wire.encode(wire.TaskMsg(fed, 1, "v", state="done")), retain=True)
    script = (
        "import json, sys\n"
        "from fedmqtt.cli import main\n"
        f"rc = main(['agent', '--broker', '{broker.address}', '--federation', '{fed}', '--agent-id', 'probe',"
        f" '--data', '{tmp_path / 'd.npz'}', '--exit-when-done', 'true', '--state-dir', '{tmp_path / 's'}'])\n"
        "print(json.dumps(sorted(sys.modules)))\n"
        "sys.exit(rc)\n"
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    modules = json.loads(proc.stdout.strip().splitlines()[-1])
    assert "edge_agent.agent" in modules and "paho.mqtt.client" in modules  # it really ran
    forbidden = ("aggregator", "onnx", "onnxruntime", "sklearn", "matplotlib", "scipy")
    assert [m for m in modules if m.split(".")[0] in forbidden] == []


# Libraries a feature needs; none may load unless that feature is configured (start-up time, issue 13).
OPTIONAL_LIBRARIES = ("dp_accounting", "scipy", "onnx", "onnxruntime", "sklearn", "matplotlib", "plotly",
                      "prometheus_client", "cryptography")


@pytest.mark.parametrize("privacy", ["off", "central"])
def test_aggregator_command_imports_only_the_libraries_of_the_features_configured(fed, broker, tmp_path, privacy):
    """A real `fedmqtt aggregator` up to systemd READY: DP off loads no dp-accounting/scipy; ONNX off no onnx."""
    toml = tmp_path / "aggregator.toml"
    toml.write_text(
        f'federation = "{fed}"\nrounds = 0\nstate_dir = "{tmp_path / "state"}"\n'
        f'[onnx]\nevery = 0\n[privacy]\nmode = "{privacy}"\nexpected_per_round = 10\n'
        f'[broker]\nhost = "{broker.host}"\nport = {broker.port}\n'
    )
    script = (
        "import json, sys\n"
        "from fedmqtt.cli import main\n"
        f"rc = main(['aggregator', '--config', {str(toml)!r}])\n"
        "print(json.dumps(sorted(sys.modules)))\n"
        "sys.exit(rc)\n"
    )
    address = f"@fedmqtt-test-{os.getpid()}-{fed}"  # abstract: no sun_path length limit on tmp_path
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
        notify.bind("\0" + address[1:])
        notify.settimeout(WAIT_S)
        env = {k: v for k, v in os.environ.items() if not k.startswith("WATCHDOG_")}
        proc = subprocess.Popen([sys.executable, "-c", script], env={**env, "NOTIFY_SOCKET": address},
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            while "READY=1" not in notify.recv(4096).decode().split("\n"):
                pass
            proc.send_signal(signal.SIGTERM)  # systemctl stop: the loop stops, main returns
            out, err = proc.communicate(timeout=WAIT_S)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    assert proc.returncode == 0, err
    modules = json.loads(out.strip().splitlines()[-1])
    assert "aggregator.service" in modules and "paho.mqtt.client" in modules  # it really ran
    loaded = sorted({m.split(".")[0] for m in modules} & set(OPTIONAL_LIBRARIES))
    assert loaded == (["dp_accounting", "scipy"] if privacy == "central" else [])
    assert ("aggregator.accounting" in modules) == (privacy == "central")
    assert "aggregator.onnx_export" not in modules


@pytest.mark.parametrize("module,needle", [("edge_agent", "fedmqtt agent"), ("aggregator", "fedmqtt aggregator")])
def test_python_dash_m_entry_points(module, needle):
    proc = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and needle in proc.stdout


def test_one_hundred_simulated_agents_on_one_thread(fed, broker_config, tmp_path, start_aggregator):
    data = federated_digits(100, "iid", 0.5, 0)
    cfg = digits_config(fed, broker_config, tmp_path, rounds=2, min_agents=100)
    ra = start_aggregator(cfg)
    before = threading.active_count()
    sim = Simulation(broker_config, fed, data.agents, seed=0)
    sim.start()
    try:
        assert threading.active_count() == before + 1  # one loop thread for all 100 clients
        ra.wait_finished(timeout=120)
        assert sim.finished.wait(WAIT_S)
    finally:
        sim.stop()
    assert [ra.rounds.get_nowait().summary.participants for _ in range(2)] == [100, 100]


def test_sim_command_runs_agents_against_a_broker(fed, broker, broker_config, tmp_path, start_aggregator):
    cfg = digits_config(fed, broker_config, tmp_path, rounds=2, min_agents=3)
    ra = start_aggregator(cfg)
    proc = subprocess.run(
        [FEDMQTT, "sim", "--agents", "3", "--broker", broker.address, "--federation", fed,
         "--partition", "iid", "--holdout", "0.2", "--exit-when-done"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    ra.wait_finished()
    summaries = [ra.rounds.get_nowait().summary for _ in range(2)]
    assert [s.participants for s in summaries] == [3, 3]
    # with a holdout the agents evaluate the global model before training: federated evaluation
    assert 0.0 <= summaries[1].metrics["eval_accuracy"] <= 1.0 and summaries[1].metrics["eval_accuracy"] > 0.5


def test_status_command_shows_the_fleet_and_last_rounds_from_retained_messages(
    fed, broker, broker_config, tmp_path, start_aggregator
):
    data = federated_digits(3, "iid", 0.5, 0)
    cfg = digits_config(fed, broker_config, tmp_path, rounds=2, min_agents=3)
    ra = start_aggregator(cfg, evaluate=lambda p: {"accuracy": 0.5})
    sim = Simulation(broker_config, fed, data.agents, seed=0)
    sim.start()
    try:
        ra.wait_finished()
        proc = subprocess.run([FEDMQTT, "status", "--broker", broker.address, "--federation", fed],
                              capture_output=True, text=True, timeout=60)
    finally:
        sim.stop()
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert f"federation {fed}" in out and "finished after round 2" in out
    assert "3 known, 3 online, 3 eligible" in out
    assert all(f"agent-00{i}" in out for i in range(3))
    rows = [line.split() for line in out.splitlines() if line.strip()[:1].isdigit()]
    assert [r[:3] for r in rows] == [["1", "3", "3"], ["2", "3", "3"]]  # round, updates, selected
    assert all(r[4] == "0.5000" for r in rows)  # test_accuracy column
    empty = subprocess.run([FEDMQTT, "status", "--broker", broker.address, "--federation", fed + "-none"],
                           capture_output=True, text=True, timeout=60)
    assert empty.returncode == 1 and "nothing retained" in empty.stdout  # 1: nothing of that federation
