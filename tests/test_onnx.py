"""ONNX export: graph checks, equality with the numpy models, metadata, and distribution over a real broker."""

from __future__ import annotations

import json
import queue
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from aggregator.config import AggregatorConfig, ModelConfig, OnnxConfig, RoundConfig
from aggregator.onnx_export import IR_VERSION, OPSET, metadata, to_onnx, to_onnx_bytes
from aggregator.serve_onnx import load_model
from edge_agent import __version__, wire
from edge_agent.models import BuiltinModel
from edge_agent.spec import ModelSpec
from edge_agent.topics import Topics

from .conftest import WAIT_S

FEDMQTT = str(Path(sys.executable).parent / "fedmqtt")

SPECS = [
    ModelSpec("softmax", 64, 10),
    ModelSpec("softmax", 3, 2),
    ModelSpec("mlp", 64, 10, (32,)),
    ModelSpec("mlp", 5, 3, (8, 4, 6)),
    ModelSpec("linear", 1, 1),
    ModelSpec("linear", 13, 1),
]


def random_params(spec: ModelSpec, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {k: rng.standard_normal(s).astype(np.float32) for k, s in spec.param_shapes().items()}


def session(data: bytes) -> ort.InferenceSession:
    return ort.InferenceSession(data, providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.kind}-{s.n_features}-{s.n_outputs}-{s.hidden}")
@pytest.mark.parametrize("batch", [1, 7, 1000])
def test_onnxruntime_equals_the_numpy_model(spec, batch):
    params = random_params(spec)
    m = to_onnx(spec, params, federation="f", round=4, version="v")
    onnx.checker.check_model(m, full_check=True)
    assert m.ir_version == IR_VERSION and [(o.domain, o.version) for o in m.opset_import] == [("", OPSET)]
    X = np.random.default_rng(batch).standard_normal((batch, spec.n_features)).astype(np.float32)
    out = session(m.SerializeToString()).run(None, {"input": X})
    model = BuiltinModel(spec)
    if spec.kind == "linear":
        assert out[0].shape == (batch,) and out[0].dtype == np.float32
        np.testing.assert_allclose(out[0], model.predict(params, X), rtol=1e-5, atol=1e-5)
    else:
        probs, labels = out
        assert probs.shape == (batch, spec.n_outputs) and labels.dtype == np.int64 and labels.shape == (batch,)
        np.testing.assert_allclose(probs, model.predict_proba(params, X), atol=1e-5)
        np.testing.assert_array_equal(labels, model.predict(params, X))


def test_dynamic_batch_and_io_names():
    m = to_onnx(SPECS[0], random_params(SPECS[0]), federation="f", round=0, version="v")
    (inp,) = m.graph.input
    assert inp.name == "input" and inp.type.tensor_type.shape.dim[0].dim_param == "batch"
    assert inp.type.tensor_type.shape.dim[1].dim_value == 64
    assert [o.name for o in m.graph.output] == ["probabilities", "label"]


def test_metadata_round_trips_through_onnx_and_onnxruntime():
    spec = SPECS[2]
    data = to_onnx_bytes(spec, random_params(spec), federation="fleet-7", round=12, version="0123abcd",
                         class_labels=[f"digit{i}" for i in range(10)])
    expected = {
        "federation": "fleet-7", "round": "12", "model_version": "0123abcd", "model_kind": "mlp",
        "n_features": "64", "n_outputs": "10", "hidden": "[32]", "fedmqtt_version": __version__,
    }
    from_onnx = metadata(onnx.load_from_string(data))
    meta = session(data).get_modelmeta()
    for source in (from_onnx, meta.custom_metadata_map):
        assert {k: source[k] for k in expected} == expected
        assert json.loads(source["class_labels"])[3] == "digit3"
        assert source["created"].endswith("+00:00")
    assert "fleet-7" in meta.description and "round 12" in meta.description
    assert meta.producer_name == "fedmqtt"


def onnx_config(fed, broker_config, tmp_path, rounds=2, **onnx_kw) -> AggregatorConfig:
    return AggregatorConfig(
        federation=fed, rounds=rounds, state_dir=str(tmp_path / "state"),
        model=ModelConfig(kind="linear", n_features=1, n_outputs=1),
        round=RoundConfig(min_agents=1, quorum=1, timeout=WAIT_S),
        onnx=OnnxConfig(**onnx_kw), broker=broker_config,
    )


class Device:
    """A raw MQTT device that moves the model to chosen parameters, round by round."""

    def __init__(self, raw_client, fed: str, name: str = "dev") -> None:
        self.t = Topics(fed)
        self.fed, self.name = fed, name
        self.c = raw_client(name)
        self.c.subscribe(self.t.task)
        self.c.publish(self.t.status(name), wire.encode(wire.StatusMsg(fed, 0, name, "online", 1, ["linear"])), retain=True)
        self.last_round = 0

    def send(self, w: float, b: float, current: tuple[float, float]) -> None:
        task = self.c.wait_for_open_task(self.t.task, self.last_round)
        self.last_round = task.round
        delta = {"W0": np.array([[w - current[0]]], np.float32), "b0": np.array([b - current[1]], np.float32)}
        self.c.publish(self.t.update(self.name), wire.encode(wire.UpdateMsg(self.fed, task.round, self.name, task.base, 1, delta, {})))

    def leave(self) -> None:
        self.c.publish(self.t.status(self.name), b"", retain=True)


@pytest.mark.broker
def test_every_round_is_exported_and_the_latest_is_retained(fed, broker_config, tmp_path, start_aggregator, raw_client):
    ra = start_aggregator(onnx_config(fed, broker_config, tmp_path))
    dev = Device(raw_client, fed)
    watcher = raw_client()
    watcher.subscribe(Topics(fed).metrics)
    dev.send(1.0, 2.0, (0.0, 0.0))
    dev.send(3.0, 4.0, (1.0, 2.0))
    ra.wait_finished()
    assert [wire.decode(watcher.wait_for(Topics(fed).metrics)[0]).round for _ in range(2)] == [1, 2]
    state = tmp_path / "state"
    assert {p.name for p in state.glob("*.onnx")} == {"model-r0.onnx", "model-r1.onnx", "model-r2.onnx", "latest.onnx"}
    assert (state / "latest.onnx").read_bytes() == (state / "model-r2.onnx").read_bytes()
    # a fresh subscriber gets the retained ONNX model of round 2, usable as it is
    fresh = raw_client()
    fresh.client.on_message = lambda c, u, m: fresh.messages.put((m.topic, m.payload, (m.retain, m.properties)))
    fresh.subscribe(Topics(fed).model_onnx)
    payload, (retained, props) = fresh.wait_for(Topics(fed).model_onnx)
    assert retained and payload == (state / "latest.onnx").read_bytes()
    user = dict(props.UserProperty)
    assert user["round"] == "2" and user["version"] == ra.coordinator.version and props.ContentType == "application/onnx"
    loaded = load_model(payload)
    assert loaded.round == 2 and loaded.version == ra.coordinator.version
    assert loaded.session.run(None, {"input": np.array([[2.0]], np.float32)})[0][0] == pytest.approx(3 * 2 + 4)
    dev.leave()


@pytest.mark.broker
def test_export_every_k_rounds_and_keep(fed, broker_config, tmp_path, start_aggregator, raw_client):
    ra = start_aggregator(onnx_config(fed, broker_config, tmp_path, rounds=4, every=2, keep=2))
    dev = Device(raw_client, fed)
    current = (0.0, 0.0)
    for r in range(1, 5):
        dev.send(float(r), 0.0, current)
        current = (float(r), 0.0)
    ra.wait_finished()
    state = tmp_path / "state"
    assert {p.name for p in state.glob("*.onnx")} == {"model-r2.onnx", "model-r4.onnx", "latest.onnx"}
    dev.leave()


@pytest.mark.broker
def test_export_command_matches_the_live_export(fed, broker_config, tmp_path, start_aggregator, raw_client):
    cfg = onnx_config(fed, broker_config, tmp_path, rounds=1)
    cfg.model = ModelConfig(kind="mlp", n_features=1, n_outputs=3, hidden=[4])
    ra = start_aggregator(cfg)
    t = Topics(fed)
    dev = raw_client("dev")
    dev.subscribe(t.task)
    dev.publish(t.status("dev"), wire.encode(wire.StatusMsg(fed, 0, "dev", "online", 1, ["mlp"])), retain=True)
    task = dev.wait_for_open_task(t.task)
    spec = cfg.model.spec()
    delta = random_params(spec, seed=5)
    dev.publish(t.update("dev"), wire.encode(wire.UpdateMsg(fed, task.round, "dev", task.base, 1, delta, {})))
    ra.wait_finished()
    X = np.random.default_rng(1).standard_normal((50, 1)).astype(np.float32)
    live = session((tmp_path / "state" / "latest.onnx").read_bytes()).run(None, {"input": X})
    for source in (tmp_path / "state", tmp_path / "state" / "checkpoint.npz"):
        out = tmp_path / "exported.onnx"
        proc = subprocess.run([FEDMQTT, "export", "--checkpoint", str(source), "--out", str(out)],
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        exported = session(out.read_bytes()).run(None, {"input": X})
        np.testing.assert_array_equal(exported[0], live[0])
        np.testing.assert_array_equal(exported[1], live[1])
        assert metadata(onnx.load(out))["round"] == "1"
    dev.publish(t.status("dev"), b"", retain=True)


def test_export_command_refuses_what_is_not_a_model(tmp_path):
    bad = tmp_path / "x.npz"
    np.savez(bad, a=np.zeros(3))
    for target in (bad, tmp_path / "missing", tmp_path):
        proc = subprocess.run([FEDMQTT, "export", "--checkpoint", str(target), "--out", str(tmp_path / "o.onnx")],
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 2 and "Traceback" not in proc.stderr and str(target) in proc.stderr


def test_serve_onnx_refuses_bad_models():
    with pytest.raises(ValueError, match="not a loadable"):
        load_model(b"not an onnx model")
    # a valid ONNX graph that is not shaped like ours
    m = to_onnx(SPECS[0], random_params(SPECS[0]), federation="f", round=1, version="v")
    m.graph.input[0].name = "x"
    m.graph.node[0].input[0] = "x"
    with pytest.raises(ValueError, match="input"):
        load_model(m.SerializeToString())


@pytest.mark.broker
def test_serve_onnx_hot_swaps_from_round_one_to_round_two_while_answering(
    fed, broker, broker_config, tmp_path, start_aggregator, raw_client
):
    ra = start_aggregator(onnx_config(fed, broker_config, tmp_path))
    dev = Device(raw_client, fed)
    proc = subprocess.Popen([FEDMQTT, "serve-onnx", "--broker", broker.address, "--federation", fed],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    answers: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [answers.put(line) for line in proc.stdout], daemon=True).start()

    def ask_until(round_: int) -> str:
        end = time.monotonic() + WAIT_S
        while time.monotonic() < end:
            proc.stdin.write("2.0\n")
            proc.stdin.flush()
            line = answers.get(timeout=WAIT_S).strip()
            if line.startswith(f"{round_},"):
                return line
            time.sleep(0.02)  # keep answering while the next round is aggregated
        raise AssertionError(f"serve-onnx never answered with round {round_}")

    try:
        assert ask_until(0) == "0,0"  # the initial model: all zeros
        dev.send(1.0, 2.0, (0.0, 0.0))
        assert ask_until(1) == "1,4"  # 1*2 + 2
        dev.send(3.0, 4.0, (1.0, 2.0))
        assert ask_until(2) == "2,10"  # 3*2 + 4
        proc.stdin.write("1,2\nabc\n")  # wrong width, not numbers: error lines, the server keeps going
        proc.stdin.flush()
        assert answers.get(timeout=WAIT_S).startswith("error,expected 1 values")
        assert answers.get(timeout=WAIT_S).startswith("error,line")
        proc.stdin.close()
        assert proc.wait(timeout=WAIT_S) == 1  # bad input lines make the exit status 1
    finally:
        if proc.poll() is None:
            proc.kill()
        dev.leave()
    ra.wait_finished()
