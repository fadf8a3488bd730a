"""examples/torch_digits: a PyTorch CNN on the 8x8 digits, federated over a real mosquitto.

Ten agents, each its own fedmqtt.Agent and MQTT connection, train the
example's CNN (digits_cnn.DigitsCNN, a fedmqtt.TorchModel with its own
momentum-SGD loop) for 20 rounds of FedAvg; the aggregator exports every
global model through torch.onnx. The references are independent of the
example: the built-in numpy MLP 64-64-10 trained offline by the same FedAvg
over the same partition with the same seeds (measured here, not a number
copied from docs/results.md), onnxruntime on the exported file, and the
wire decoder in a process that cannot import torch.

Measured on 2 cores: the CNN reaches 0.978 test accuracy (0.592 after
round 1; the run is deterministic), the MLP reference 0.958 (as
docs/results.md says); ONNX probabilities match PyTorch within ~1e-6; the
federation takes 16-19 s, the whole file ~22 s.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip(
    "torch", reason="the torch example needs torch: pip install torch==2.13.0 (a CPU build), "
                    "or scripts/setup.sh .venv with the torch or dev extra")
pytest.importorskip("sklearn", reason="the digits come from scikit-learn: pip install scikit-learn")
pytest.importorskip("onnx", reason="the aggregator exports ONNX: pip install onnx")
pytest.importorskip("onnxruntime", reason="the ONNX check runs the exported model: pip install onnxruntime")

from aggregator.config import AggregatorConfig  # noqa: E402
from aggregator.strategies import FedAvg  # noqa: E402
from edge_agent import wire  # noqa: E402
from edge_agent.data import local_data  # noqa: E402
from edge_agent.model_api import TrainData  # noqa: E402
from edge_agent.models import MLP, subtract  # noqa: E402
from edge_agent.training import round_seed  # noqa: E402
from edge_agent.topics import Topics  # noqa: E402

from .conftest import load_example, offline_fedavg  # noqa: E402

pytestmark = pytest.mark.broker

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "torch_digits"
N_AGENTS, ROUNDS, SEED = 10, 20, 0


def _example():
    return load_example("torch_digits", "digits_cnn", "federate")


def _agent_data(federate):
    """What each agent trains on: the example's shards as fedmqtt.Agent holds them (holdout 0, seed i)."""
    shards, test = federate.digits(N_AGENTS, SEED)
    return [local_data(shard, holdout=0.0, seed=i) for i, shard in enumerate(shards)], test


@pytest.fixture(scope="module")
def federation(broker, tmp_path_factory):
    """The example run once over the test broker: (result, wall seconds)."""
    _, federate = _example()
    start = time.monotonic()
    result = federate.run(broker.address, n_agents=N_AGENTS, rounds=ROUNDS, seed=SEED,
                          state_dir=str(tmp_path_factory.mktemp("torch-digits")))
    return result, time.monotonic() - start


def test_the_example_partition_is_the_projects_built_in_digits_split():
    """sklearn + Dirichlet(0.5) written out in the example == aggregator.datasets.federated_digits(10, ..., 0).

    So the example's figures are comparable with docs/results.md (same
    train/test split, same agents' samples, in the same order).
    """
    from aggregator.datasets import federated_digits

    _, federate = _example()
    datas, (X_te, y_te) = _agent_data(federate)
    builtin = federated_digits(N_AGENTS, "dirichlet", 0.5, SEED)
    np.testing.assert_array_equal(X_te, builtin.X_test)
    np.testing.assert_array_equal(y_te, builtin.y_test)
    for mine, theirs in zip(datas, builtin.agents, strict=True):
        np.testing.assert_array_equal(mine.X_train, theirs.X_train)
        np.testing.assert_array_equal(mine.y_train, theirs.y_train)
    assert sum(d.num_samples for d in datas) == 1437 and min(d.num_samples for d in datas) >= 10


def test_a_config_file_names_the_model_with_no_arguments():
    """`kind = "digits_cnn:DigitsCNN"` (examples/torch_digits on PYTHONPATH) builds the same model."""
    import fedmqtt

    digits_cnn, _ = _example()
    sys.path.insert(0, str(EXAMPLE))
    try:
        loaded = fedmqtt.load_model("digits_cnn:DigitsCNN")
    finally:
        sys.path.remove(str(EXAMPLE))
    direct = digits_cnn.DigitsCNN()
    assert loaded.spec == direct.spec and loaded.kind == direct.kind == "digits_cnn:DigitsCNN"
    assert sum(np.prod(s) for s in direct.parameter_shapes().values()) == 9930
    first, again = direct.init_params(SEED), loaded.init_params(SEED)
    assert all(np.array_equal(first[k], again[k]) for k in first)


def test_the_cnn_federated_over_mqtt_beats_the_builtin_mlp_and_exports_faithful_onnx(federation):
    result, seconds = federation
    assert result["rounds"] == ROUNDS

    # (3) every agent's update went over the broker, every round
    assert result["participants"] == [N_AGENTS] * ROUNDS
    assert result["updates_sent"] == [ROUNDS] * N_AGENTS

    # (1) the reference, measured now: the built-in numpy MLP 64-64-10 (He init, seed 0) through the
    # same FedAvg over the same agents' data, seeds and rounds, E = 5, B = 32, lr 0.1 (its tuned setting)
    _, federate = _example()
    datas, (X_te, y_te) = _agent_data(federate)
    cfg = AggregatorConfig()
    cfg.model.kind, cfg.model.hidden, cfg.model.seed = "mlp", [64], SEED
    cfg.training.epochs, cfg.training.batch_size, cfg.training.lr = 5, 32, 0.1
    mlp_params = offline_fedavg(datas, cfg, SEED, ROUNDS)
    mlp_accuracy = MLP(64, 10, hidden=(64,)).evaluate(mlp_params, X_te, y_te)["accuracy"]
    assert mlp_accuracy == pytest.approx(0.958, abs=0.01)  # docs/results.md: MLP, FedAvg, 10 agents Dir(0.5)

    # the first round over MQTT is the offline computation: the same CNN, seeds and FedAvg give the same
    # model (so the agents' seeded training is reproducible with ten of them in one process)
    assert result["accuracy"][0] == pytest.approx(_offline_cnn_round(datas, X_te, y_te), abs=1.5 / len(y_te))

    cnn = result["test_accuracy"]
    print(f"\nCNN {cnn:.4f} (round 1: {result['accuracy'][0]:.4f}), MLP reference {mlp_accuracy:.4f}, "
          f"ONNX max |diff| {result['onnx_max_abs_diff']:.2e}, federation {seconds:.1f} s")
    assert cnn >= mlp_accuracy, (cnn, mlp_accuracy, result["accuracy"])
    assert cnn > result["accuracy"][0]  # learning over the rounds, not a lucky first round

    # (2) the aggregator's torch.onnx export, run in onnxruntime, is the PyTorch module
    assert result["onnx_max_abs_diff"] < 1e-5
    assert result["onnx_labels_agree"]


def _offline_cnn_round(datas, X_te, y_te) -> float:
    """Test accuracy after one round of the example's federation computed without MQTT."""
    digits_cnn, federate = _example()
    model = digits_cnn.DigitsCNN()
    params = model.init_params(SEED)
    config = wire.TrainConfig(federate.EPOCHS, federate.BATCH_SIZE, federate.LR)
    strategy = FedAvg()
    strategy.begin(params)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the example runs: the same kernels, the same sums
    try:
        for i, d in enumerate(datas):
            local, _ = model.fit(params, TrainData(d.X_train, d.y_train, d.num_samples), config, round_seed(i, 1))
            strategy.add(subtract(local, params), float(d.num_samples))
    finally:
        torch.set_num_threads(threads)
    return model.evaluate(strategy.result(params), X_te, y_te)["accuracy"]


# A device without torch: torch cannot be imported at all in this process.
_NUMPY_DEVICE = """
import json, sys
sys.modules["torch"] = None
import numpy as np
from edge_agent import wire
payload = open(sys.argv[1], "rb").read()
m = wire.decode(payload, expect="model")
print(json.dumps({
    "kind": m.spec.kind, "round": m.round,
    "params": [[k, list(v.shape), v.dtype.str] for k, v in m.params.items()],
    "version_is_content_hash": wire.params_version(m.params) == m.version,
    "reencodes_to_same_bytes": wire.encode(m) == payload,
}))
"""


def test_a_torch_model_on_the_wire_is_named_float32_arrays_any_numpy_device_reads(federation, raw_client, tmp_path):
    """(4) The retained global model: state_dict names, float32 arrays, same msgpack bytes as numpy models use."""
    result, _ = federation
    digits_cnn, federate = _example()
    client = raw_client()
    client.subscribe(Topics(federate.FEDERATION).model)
    payload, retained = client.wait_for(Topics(federate.FEDERATION).model)
    assert retained
    m = wire.decode(payload, expect="model")
    assert m.round == ROUNDS and m.spec.kind == "digits_cnn:DigitsCNN"
    state = digits_cnn.Net().state_dict()
    assert list(m.params) == list(state)  # state_dict names, in state_dict order
    assert [["conv1.weight", [16, 1, 3, 3]], ["conv1.bias", [16]]] == m.spec.to_wire()["params"][:2]
    for name, a in m.params.items():
        assert a.dtype == np.float32 and a.shape == tuple(state[name].shape)
        np.testing.assert_array_equal(a, result["params"][name])  # what the aggregator holds, bit for bit
    assert sum(a.size for a in m.params.values()) == 9930

    # the same bytes mean the same to a numpy-only device: decoded without torch, re-encoded identically
    (tmp_path / "model.msgpack").write_bytes(payload)
    out = subprocess.run([sys.executable, "-c", _NUMPY_DEVICE, str(tmp_path / "model.msgpack")], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    seen = json.loads(out.stdout)
    assert seen["kind"] == "digits_cnn:DigitsCNN" and seen["round"] == ROUNDS
    assert seen["params"] == [[k, list(v.shape), "<f4"] for k, v in state.items()]
    assert seen["version_is_content_hash"] and seen["reencodes_to_same_bytes"]
