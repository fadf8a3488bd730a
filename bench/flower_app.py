"""The Flower side of bench_flower.py: a legacy gRPC server and one client process per agent.

Runs under the bench's own virtualenv (``.bench-venv``, flwr 1.42.0 and
numpy), never the project's. Flower's legacy entry points only:
``flwr.server.start_server`` (gRPC bidi, FedAvg) and
``flwr.client.start_client``; not the Deployment runtime (SuperLink /
SuperNode) and not the Ray simulation.

  python bench/flower_app.py server --port P --agents N --rounds R --data DIR --out log.json
  python bench/flower_app.py client --port P --index I --data DIR

The server writes a JSON log: wall-clock (``time.time()``) instants at which
each round's fit instructions were ready (``opened``: every client sampled),
its fit results aggregated (``fit_done``) and the new model evaluated on the
central test set (``evaluated``), the accuracy and the participants of every
round.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np

from _softmax_np import evaluate, fit, init_params


def _shard(data_dir: str, name: str) -> tuple[np.ndarray, np.ndarray]:
    with np.load(os.path.join(data_dir, name)) as f:
        return f["X"].astype(np.float32), f["y"].astype(np.int64)


def server(a: argparse.Namespace) -> None:
    import flwr as fl
    from flwr.common import ndarrays_to_parameters
    from flwr.server.strategy import FedAvg

    X_te, y_te = _shard(a.data, "test.npz")
    log: dict = {"opened": {}, "fit_done": {}, "evaluated": {}, "accuracy": {}, "loss": {}, "participants": {},
                 "failures": {}, "server_started": time.time()}

    class TimedFedAvg(FedAvg):
        def configure_fit(self, server_round, parameters, client_manager):
            ins = super().configure_fit(server_round, parameters, client_manager)  # waits for N clients
            log["opened"][server_round] = time.time()
            return ins

        def aggregate_fit(self, server_round, results, failures):
            out = super().aggregate_fit(server_round, results, failures)
            log["fit_done"][server_round] = time.time()
            log["participants"][server_round] = len(results)
            log["failures"][server_round] = len(failures)
            return out

    def evaluate_fn(server_round, ndarrays, config):
        loss, acc = evaluate(ndarrays, X_te, y_te)
        log["evaluated"][server_round] = time.time()
        log["accuracy"][server_round] = acc
        log["loss"][server_round] = loss
        return loss, {"accuracy": acc}

    strategy = TimedFedAvg(
        fraction_fit=1.0,
        fraction_evaluate=0.0,  # no federated evaluation: the central test set, as fedmqtt's test_data
        min_fit_clients=a.agents,
        min_evaluate_clients=0,
        min_available_clients=a.agents,
        evaluate_fn=evaluate_fn,
        on_fit_config_fn=lambda r: {"epochs": a.epochs, "batch_size": a.batch_size, "lr": a.lr, "round": r},
        initial_parameters=ndarrays_to_parameters(init_params()),
    )
    fl.server.start_server(server_address=f"127.0.0.1:{a.port}",
                           config=fl.server.ServerConfig(num_rounds=a.rounds), strategy=strategy)
    log["finished"] = time.time()
    with open(a.out, "w") as fh:
        json.dump(log, fh)


def client(a: argparse.Namespace) -> None:
    import flwr as fl

    X, y = _shard(a.data, f"agent-{a.index:03d}.npz")

    class SoftmaxClient(fl.client.NumPyClient):
        def get_parameters(self, config):
            return init_params()

        def fit(self, parameters, config):
            new, loss = fit(parameters, X, y, int(config["epochs"]), int(config["batch_size"]), float(config["lr"]),
                            agent_seed=a.index, round_number=int(config["round"]))
            return new, len(X), {"train_loss": loss}

    fl.client.start_client(server_address=f"127.0.0.1:{a.port}", client=SoftmaxClient().to_client(), insecure=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="role", required=True)
    s = sub.add_parser("server")
    s.add_argument("--port", type=int, required=True)
    s.add_argument("--agents", type=int, required=True)
    s.add_argument("--rounds", type=int, default=20)
    s.add_argument("--epochs", type=int, default=5)
    s.add_argument("--batch-size", type=int, default=32)
    s.add_argument("--lr", type=float, default=0.1)
    s.add_argument("--data", required=True)
    s.add_argument("--out", required=True)
    c = sub.add_parser("client")
    c.add_argument("--port", type=int, required=True)
    c.add_argument("--index", type=int, required=True)
    c.add_argument("--data", required=True)
    a = p.parse_args()
    (server if a.role == "server" else client)(a)


if __name__ == "__main__":
    sys.exit(main())
