"""Federate a small PyTorch CNN on scikit-learn's 8x8 digits over MQTT, with fedmqtt's public API only.

    python examples/torch_digits/federate.py                  # a private mosquitto, 10 agents, 20 rounds
    python examples/torch_digits/federate.py --broker 127.0.0.1:1883

Needs torch (``pip install torch==2.13.0``, a CPU build), scikit-learn,
onnx and onnxruntime. The 1,437 training digits are split over ten devices
with label skew (Dirichlet(0.5): some devices see mostly a few digits);
the 360 test digits stay with the aggregator, which evaluates every global
model on them. Every device is its own :class:`fedmqtt.Agent` with its own
MQTT connection and data; the aggregator averages their updates (FedAvg,
weighted by sample count) and exports each global model to ONNX through
torch.onnx, which is checked here in onnxruntime against PyTorch.

Local training: E = 5 epochs, batch 32, lr 0.05 with momentum 0.9 (the
model's own loop, see digits_cnn.py); every agent trains every round.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # digits_cnn, as the configs name it

import fedmqtt  # noqa: E402
from digits_cnn import DigitsCNN  # noqa: E402

FEDERATION = "torch-digits"
ALPHA = 0.5  # Dirichlet concentration of each class over the agents: small = strongly skewed
MIN_SAMPLES = 10  # every agent gets at least this many digits
MAX_TRIES = 100  # redraws of the partition before giving up
EPOCHS, BATCH_SIZE, LR = 5, 32, 0.05


def digits(n_agents: int = 10, seed: int = 0) -> tuple[list[tuple[np.ndarray, np.ndarray]], tuple[np.ndarray, np.ndarray]]:
    """Each agent's (X, y) and the central test set: pixels/16 as float32, 80/20 stratified, Dirichlet labels.

    Per class: shuffle its indices, draw the agents' shares from
    Dirichlet([ALPHA] * n_agents), cut there; redrawn (same generator) until
    every agent has MIN_SAMPLES digits.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    X = (d.data / 16.0).astype(np.float32)
    y = d.target.astype(np.int64)
    X_tr, X_te, y_tr, y_te = train_test_split(X, y, test_size=0.2, stratify=y, random_state=seed)
    rng = np.random.default_rng(seed)
    for _ in range(MAX_TRIES):
        parts: list[list[np.ndarray]] = [[] for _ in range(n_agents)]
        for c in np.unique(y_tr):
            idx = np.flatnonzero(y_tr == c)
            rng.shuffle(idx)
            p = rng.dirichlet([ALPHA] * n_agents)
            for k, chunk in enumerate(np.split(idx, (np.cumsum(p) * len(idx)).astype(int)[:-1])):
                parts[k].append(chunk)
        split = [np.sort(np.concatenate(p)) for p in parts]
        if min(len(s) for s in split) >= MIN_SAMPLES:
            return [(X_tr[s], y_tr[s]) for s in split], (X_te, y_te)
    raise ValueError(f"no Dirichlet({ALPHA}) split gave each of {n_agents} agents {MIN_SAMPLES} digits "
                     f"in {MAX_TRIES} draws; use fewer agents")


def run(broker: str, n_agents: int = 10, rounds: int = 20, seed: int = 0, state_dir: str | None = None) -> dict:
    """Run the federation to the end; returns the test accuracy per round, the ONNX check and the traffic."""
    start = time.monotonic()
    host, _, port = broker.rpartition(":")
    broker_cfg = fedmqtt.BrokerConfig(host=host, port=int(port))
    shards, test = digits(n_agents, seed)
    state = Path(state_dir or tempfile.mkdtemp(prefix="fedmqtt-digits-"))
    cfg = fedmqtt.AggregatorConfig(federation=FEDERATION, state_dir=str(state / "aggregator"), broker=broker_cfg)
    cfg.rounds, cfg.round.min_agents, cfg.round.timeout = rounds, n_agents, 120.0
    cfg.training.epochs, cfg.training.batch_size, cfg.training.lr = EPOCHS, BATCH_SIZE, LR
    cfg.model.seed = seed  # initial parameters: torch.manual_seed(seed); Net()
    agg = fedmqtt.Aggregator(cfg, model=DigitsCNN(), test_data=test)
    agents = [
        # holdout = 0: each device trains on all its digits (the test set is the aggregator's)
        fedmqtt.Agent(fedmqtt.AgentConfig(agent_id=f"digits-{i:02d}", federation=FEDERATION, seed=i, holdout=0.0,
                                          exit_when_done=True, state_dir=str(state / f"digits-{i:02d}"),
                                          broker=broker_cfg),
                      model=DigitsCNN(), data=data)
        for i, data in enumerate(shards)
    ]
    # One torch thread for this process: with torch's default (one per core) the federation ran 2-3x
    # slower on 2 cores, its threads contending with the agents' and the aggregator's MQTT loops.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with agg:
            for a in agents:
                a.start()
            try:
                if not agg.wait(timeout=600):
                    raise SystemExit(f"the federation did not finish; at round {agg.round}")
            finally:
                for a in agents:
                    a.stop()
    finally:
        torch.set_num_threads(threads)
    seconds = time.monotonic() - start
    history = agg.history
    prob_diff, labels_agree = onnx_check(state / "aggregator" / "latest.onnx", agg.params, test[0])
    return {
        "rounds": history[-1].round,
        "accuracy": [s.metrics.get("test_accuracy") for s in history],
        "test_accuracy": history[-1].metrics.get("test_accuracy"),
        "participants": [s.participants for s in history],
        "updates_sent": [a.updates_sent for a in agents],
        "onnx_max_abs_diff": prob_diff,
        "onnx_labels_agree": labels_agree,
        "seconds": seconds,
        "params": agg.params,
        "state_dir": str(state),
    }


def onnx_check(path: Path, params: dict, X: np.ndarray) -> tuple[float, bool]:
    """onnxruntime on the exported model against PyTorch: (max |probability diff|, labels all equal)."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    probabilities, label = session.run(["probabilities", "label"], {"input": X})
    net = DigitsCNN().load_params(params).eval()  # the plain nn.Module holding the global model
    with torch.no_grad():
        logits = net(torch.tensor(X))
    expected = torch.softmax(logits, dim=-1).numpy()
    return float(np.abs(probabilities - expected).max()), bool(np.array_equal(label, logits.argmax(dim=1).numpy()))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--broker", help="HOST:PORT of a running broker (default: start a private mosquitto)")
    p.add_argument("--agents", type=int, default=10)
    p.add_argument("--rounds", type=int, default=20)
    a = p.parse_args()
    if a.broker:
        result = run(a.broker, a.agents, a.rounds)
    else:
        with fedmqtt.LocalBroker() as broker:
            result = run(broker.address, a.agents, a.rounds)
    print(f"{a.agents} agents, {result['rounds']} rounds in {result['seconds']:.1f} s: test accuracy "
          f"{result['accuracy'][0]:.3f} -> {result['test_accuracy']:.3f}; ONNX probabilities match PyTorch within "
          f"{result['onnx_max_abs_diff']:.1e}, labels {'agree' if result['onnx_labels_agree'] else 'DIFFER'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
