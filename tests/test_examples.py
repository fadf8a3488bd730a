"""The examples in examples/ run as a user runs them, over a real mosquitto."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from edge_agent import wire
from edge_agent.topics import Topics

from .conftest import load_example

pytestmark = pytest.mark.broker

ROOT = Path(__file__).resolve().parents[1]
ENERGY = ROOT / "examples" / "vehicle_energy"


def _energy():
    return load_example("vehicle_energy", "energy_model", "fleet")


def test_vehicle_energy_fleet_learns_what_pooled_least_squares_learns(broker, tmp_path):
    """8 cars, each its own Agent and MQTT connection; the model is the user's own numpy class."""
    energy_model, fleet = _energy()
    result = fleet.run(broker.address, n_cars=8, rounds=20, seed=0, state_dir=str(tmp_path))
    assert result["rounds"] == 20
    # The independent reference: least squares on the same expanded features over the pooled data
    # (what a central data lake would fit; Huber and least squares agree away from the outliers).
    cars, (X_te, y_te) = fleet.fleet(8, 0)
    X = np.concatenate([d[0] for _, d in cars])
    y = np.concatenate([d[1] for _, d in cars])
    keep = np.abs(y - fleet.true_consumption(X)) < 10  # the faulty readings a robust loss ignores
    Z = np.c_[energy_model.expand(X[keep]), np.ones(keep.sum())]
    coef, *_ = np.linalg.lstsq(Z, y[keep], rcond=None)
    central_mae = float(np.abs(np.c_[energy_model.expand(X_te), np.ones(len(X_te))] @ coef - y_te).mean())
    assert central_mae < 0.1  # the model family holds the physics: the reference fits it almost exactly
    # FedAvg over non-IID cars (city cars never see motorway speeds) approaches it slowly: about 0.3
    # after 20 rounds from 4.7 after the first. 0.5 kWh/100 km is 3 % of the fleet's mean consumption.
    assert result["test_mae_first"] > 3.0
    assert result["test_mae"] < 0.5, (result["test_mae"], central_mae)
    # the aggregator exported the user's own ONNX graph, and onnxruntime agrees with numpy
    assert result["onnx_max_abs_diff"] < 1e-4


def test_a_custom_model_named_in_the_config_files_federates_with_the_cli(broker, tmp_path, raw_client):
    """`kind = "energy_model:EnergyRegressor"` on both sides, real `fedmqtt` processes."""
    energy_model, fleet = _energy()
    fed = "energy-cli"
    cars, _ = fleet.fleet(2, 1)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ENERGY), os.environ.get("PYTHONPATH", "")])}
    host, port = broker.address.split(":")
    common = f'federation = "{fed}"\n'
    broker_toml = f'[broker]\nhost = "{host}"\nport = {port}\n'
    (tmp_path / "agg.toml").write_text(
        common + f'rounds = 2\nstate_dir = "{tmp_path / "state"}"\n'
        '[round]\nmin_agents = 2\ntimeout = 30\n[model]\nkind = "energy_model:EnergyRegressor"\n' + broker_toml)
    procs = [subprocess.Popen([sys.executable, "-m", "fedmqtt", "aggregator", "--config", str(tmp_path / "agg.toml")],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)]
    try:
        for name, (X, y) in cars:
            np.savez(tmp_path / f"{name}.npz", X=X, y=y)
            (tmp_path / f"{name}.toml").write_text(
                common + f'agent_id = "{name}"\ndata = "{tmp_path / (name + ".npz")}"\nexit_when_done = true\n'
                f'state_dir = "{tmp_path / name}"\n[model]\nkind = "energy_model:EnergyRegressor"\n' + broker_toml)
            procs.append(subprocess.Popen([sys.executable, "-m", "fedmqtt", "agent", "--config",
                                           str(tmp_path / f"{name}.toml")],
                                          env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
        outs = [p.communicate(timeout=90)[0] for p in procs]
        assert [p.returncode for p in procs] == [0, 0, 0], outs
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    # The retained global model names the user's class and its arrays, as PROTOCOL.md says.
    client = raw_client()
    client.subscribe(Topics(fed).model)
    payload, retained = client.wait_for(Topics(fed).model)
    m = wire.decode(payload, expect="model")
    assert m.round == 2 and m.spec.kind == "energy_model:EnergyRegressor"
    assert m.spec.to_wire()["params"] == [["w", [5]], ["b", [1]]]
    assert np.abs(m.params["w"]).sum() > 0
