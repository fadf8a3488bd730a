"""Federate the energy regressor over a fleet of simulated cars, with fedmqtt's public API only.

    python examples/vehicle_energy/fleet.py                 # a private mosquitto, 8 cars, 20 rounds
    python examples/vehicle_energy/fleet.py --broker 127.0.0.1:1883

Every car is its own :class:`fedmqtt.Agent` with its own MQTT connection
and its own data, which never leaves it: city cars crawl through winter
traffic, vans haul payloads up hills, motorway commuters cruise. The
aggregator averages their updates (FedAvg), evaluates each global model on
a held-out fleet-wide test set and exports ONNX, which is checked here in
onnxruntime against the numpy model.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))  # energy_model, as the configs name it

import fedmqtt  # noqa: E402
from energy_model import EnergyRegressor  # noqa: E402

FEDERATION = "vehicle-energy"
# Driving profiles: (speed mean, speed sd, temp mean, gradient sd, payload mean).
PROFILES = {
    "city": (35, 12, 2, 1.0, 80),
    "van": (60, 15, 12, 3.0, 450),
    "motorway": (115, 12, 18, 1.5, 120),
}


def true_consumption(X: np.ndarray) -> np.ndarray:
    """The physics the fleet does not know: rolling + drag + climate + climbing + payload."""
    speed, temp, grad, load = X.T
    return (11.0 + 0.0012 * speed ** 2 + 0.25 * np.abs(temp - 20.0) + 1.8 * grad + 0.004 * load).astype(np.float32)


def car_data(profile: str, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """One car's trip log: sensor rows and measured kWh/100 km (noisy, with rare faulty readings)."""
    s_mu, s_sd, t_mu, g_sd, p_mu = PROFILES[profile]
    X = np.stack([
        np.clip(rng.normal(s_mu, s_sd, n), 5, 160),
        rng.normal(t_mu, 6, n),
        rng.normal(0, g_sd, n),
        np.clip(rng.normal(p_mu, 0.3 * p_mu, n), 0, 900),
    ], axis=1).astype(np.float32)
    y = true_consumption(X) + rng.normal(0, 0.5, n).astype(np.float32)
    faulty = rng.random(n) < 0.01
    y[faulty] += 40.0  # a stuck sensor: the Huber loss keeps it from steering the model
    return X, y


def fleet(n_cars: int, seed: int) -> tuple[list[tuple[str, tuple[np.ndarray, np.ndarray]]], tuple]:
    rng = np.random.default_rng(seed)
    names = list(PROFILES)
    cars = [(f"car-{i:02d}", car_data(names[i % len(names)], int(rng.integers(150, 400)), rng))
            for i in range(n_cars)]
    test = [car_data(p, 300, rng) for p in names]
    X_te = np.concatenate([X for X, _ in test])
    return cars, (X_te, true_consumption(X_te))


def run(broker: str, n_cars: int = 8, rounds: int = 20, seed: int = 0, state_dir: str | None = None) -> dict:
    """Run the federation to the end; returns the final test MAE, its round, and the ONNX check."""
    host, _, port = broker.rpartition(":")
    broker_cfg = fedmqtt.BrokerConfig(host=host, port=int(port))
    cars, test = fleet(n_cars, seed)
    state = Path(state_dir or tempfile.mkdtemp(prefix="fedmqtt-energy-"))
    cfg = fedmqtt.AggregatorConfig(federation=FEDERATION, state_dir=str(state / "aggregator"), broker=broker_cfg)
    cfg.rounds, cfg.round.min_agents, cfg.round.timeout = rounds, n_cars, 60.0
    cfg.training.epochs, cfg.training.batch_size, cfg.training.lr = 5, 16, 0.1
    agg = fedmqtt.Aggregator(cfg, model=EnergyRegressor(), test_data=test)
    agents = [
        fedmqtt.Agent(fedmqtt.AgentConfig(agent_id=name, federation=FEDERATION, seed=i, exit_when_done=True,
                                          state_dir=str(state / name), broker=broker_cfg),
                      model=EnergyRegressor(), data=data)
        for i, (name, data) in enumerate(cars)
    ]
    with agg:
        for a in agents:
            a.start()
        try:
            if not agg.wait(timeout=300):
                raise SystemExit(f"the federation did not finish; at round {agg.round}")
        finally:
            for a in agents:
                a.stop()
    first, last = agg.history[0], agg.history[-1]
    onnx_file = state / "aggregator" / "latest.onnx"
    return {
        "rounds": last.round,
        "test_mae_first": first.metrics.get("test_mae"),
        "test_mae": last.metrics.get("test_mae"),
        "onnx_max_abs_diff": onnx_check(onnx_file, agg.params, test[0]),
        "params": agg.params,
    }


def onnx_check(path: Path, params: dict, X: np.ndarray) -> float:
    """Largest |onnxruntime - numpy| prediction difference of the exported global model."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (pred,) = session.run(["prediction"], {"input": X})
    return float(np.abs(pred - EnergyRegressor().predict(params, X)).max())


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--broker", help="HOST:PORT of a running broker (default: start a private mosquitto)")
    p.add_argument("--cars", type=int, default=8)
    p.add_argument("--rounds", type=int, default=20)
    a = p.parse_args()
    if a.broker:
        result = run(a.broker, a.cars, a.rounds)
    else:
        with fedmqtt.LocalBroker() as broker:
            result = run(broker.address, a.cars, a.rounds)
    print(f"{a.cars} cars, {result['rounds']} rounds: test MAE {result['test_mae_first']:.2f} -> "
          f"{result['test_mae']:.2f} kWh/100 km; ONNX matches numpy within {result['onnx_max_abs_diff']:.1e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
