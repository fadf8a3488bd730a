"""The public API: `import fedmqtt`, the model interface with a user's own model, data beyond files,
plugins that misbehave, and code that is loaded only from the device's own configuration."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

import fedmqtt
from edge_agent import wire
from edge_agent.agent import AgentCore, Train
from edge_agent.data import Batches, DataError, LocalData, local_data
from edge_agent.model_api import ModelError, NumpyModel
from edge_agent.model_loader import load_model, model_for_spec
from edge_agent.mqtt import Publish
from edge_agent.spec import ModelSpec
from edge_agent.topics import Topics

from .conftest import deliver_task

FED = "f"
T = Topics(FED)


class TinyRegressor(NumpyModel):
    """y = X @ w + b, a user's model in a test module."""

    kind = "tests.test_api:TinyRegressor"
    n_features, n_outputs, task = 3, 1, "regression"

    def parameter_shapes(self):
        return {"dense.w": (3,), "dense.b": (1,)}

    def init_params(self, seed=0):
        return {"dense.w": np.zeros(3, np.float32), "dense.b": np.zeros(1, np.float32)}

    def loss_and_grads(self, params, X, y):
        err = X @ params["dense.w"] + params["dense.b"][0] - y
        g = (err / len(X)).astype(np.float32)
        return float(0.5 * np.mean(err * err)), {"dense.w": X.T @ g, "dense.b": np.array([g.sum()], np.float32)}

    def predict(self, params, X):
        return (X @ params["dense.w"] + params["dense.b"][0]).astype(np.float32)


class Broken(TinyRegressor):
    """A plugin whose fit does what the test says (options: how)."""

    kind = "tests.test_api:Broken"

    def __init__(self, how: str = "raise") -> None:
        self.how = how

    def fit(self, params, data, config, seed):
        if self.how == "raise":
            raise RuntimeError("CUDA out of memory")
        out = {k: np.array(v, copy=True) for k, v in params.items()}
        if self.how == "nan":
            out["dense.w"][0] = np.nan
        elif self.how == "missing":
            del out["dense.b"]
        elif self.how == "shape":
            out["dense.w"] = np.zeros(4, np.float32)
        elif self.how == "nan_metric":
            return out, {"train_loss": float("nan")}
        return out, {}


def regression_data(n=30, holdout=0):
    rng = np.random.default_rng(0)
    X = rng.standard_normal((n + holdout, 3)).astype(np.float32)
    y = (X @ np.array([1.0, -2.0, 0.5], np.float32) + 0.25).astype(np.float32)
    return LocalData(X[:n], y[:n], X[n:], y[n:])


def model_message(model, round_=0):
    params = model.init_params(0)
    m = wire.ModelMsg(FED, round_, wire.params_version(params), model.spec, params)
    return T.model, wire.encode(m), m


def task(m):
    return wire.TaskMsg(FED, m.round + 1, m.version, "open", 0, 100.0, wire.TrainConfig(2, 8, 0.1))


def status_of(actions):
    (pub,) = [a for a in actions if isinstance(a, Publish) and a.topic == T.status("me")]
    return wire.decode(pub.payload, expect="status")


# ---------------------------------------------------------------------------
# import fedmqtt


def test_import_fedmqtt_on_a_device_loads_no_aggregator_and_no_extra():
    script = textwrap.dedent("""
        import json, sys
        import fedmqtt
        before = sorted(sys.modules)
        fedmqtt.Agent, fedmqtt.Model, fedmqtt.NumpyModel, fedmqtt.Batches, fedmqtt.AgentConfig, fedmqtt.run_agent
        fedmqtt.SoftmaxRegression(64, 10)
        print(json.dumps([before, sorted(sys.modules)]))
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    before, after = json.loads(proc.stdout)
    # import fedmqtt alone is lazy: not even the agent is loaded yet
    assert "edge_agent.agent" not in before and "paho" not in {m.split(".")[0] for m in before}
    assert "edge_agent.api" in after  # the names really resolved
    forbidden = ("aggregator", "onnx", "onnxruntime", "dp_accounting", "scipy", "sklearn", "matplotlib", "torch",
                 "cryptography")
    assert [m for m in after if m.split(".")[0] in forbidden] == []


def test_every_public_name_resolves_and_is_documented():
    for name in fedmqtt.__all__:
        if name == "TorchModel" and not _has_torch():
            continue
        obj = getattr(fedmqtt, name)
        if name != "__version__":
            assert (obj.__doc__ or "").strip(), f"fedmqtt.{name} has no docstring"
    assert fedmqtt.Model is __import__("edge_agent.model_api").model_api.FedModel
    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        fedmqtt.Nope  # noqa: B018


def _has_torch() -> bool:
    import importlib.util

    return importlib.util.find_spec("torch") is not None


def test_edge_agent_never_imports_the_aggregator_even_lazily():
    """No module of edge_agent names the aggregator package (the dispatcher moved to fedmqtt.cli)."""
    from pathlib import Path

    import edge_agent

    root = Path(edge_agent.__file__).parent
    offenders = [str(p.relative_to(root)) for p in root.rglob("*.py")
                 if "import aggregator" in p.read_text() or "from aggregator" in p.read_text()]
    assert offenders == []


# ---------------------------------------------------------------------------
# a user's model through the interface


def test_a_custom_model_trains_and_its_spec_carries_names_and_shapes():
    model = load_model("tests.test_api:TinyRegressor")
    assert model.spec == ModelSpec("tests.test_api:TinyRegressor", 3, 1, (), (("dense.w", (3,)), ("dense.b", (1,))))
    # the wire form round-trips, names and shapes included
    _, payload, m = model_message(model)
    back = wire.decode(payload, expect="model")
    assert back.spec == model.spec and list(back.params) == ["dense.w", "dense.b"]
    # NumpyModel.fit is plain SGD on the user's gradient: it fits the line
    d = regression_data(200)
    params, metrics = model.fit(model.init_params(), fedmqtt.TrainData(d.X_train, d.y_train, 200),
                                wire.TrainConfig(20, 10, 0.1), 0)
    reference, *_ = np.linalg.lstsq(np.c_[d.X_train, np.ones(200)], d.y_train, rcond=None)
    np.testing.assert_allclose(np.r_[params["dense.w"], params["dense.b"]], reference, atol=1e-3)
    assert metrics["train_loss"] < 1e-5


def test_a_device_with_a_custom_model_trains_and_sends_the_same_named_arrays():
    model = TinyRegressor()
    c = AgentCore(agent_id="me", fed=FED, data=regression_data(40, 10), seed=1, model=model)
    topic, payload, m = model_message(model)
    c.receive(topic, payload)
    assert [a for a in deliver_task(c, task(m)) if isinstance(a, Train)] == [Train(1, 0)]
    _, pub = c.train(1, 0)
    u = wire.decode(pub.payload, expect="update", spec=model.spec)
    assert list(u.delta) == ["dense.w", "dense.b"] and u.num_samples == 40
    assert u.metrics["eval_loss"] > 0 and "train_loss" in u.metrics


@pytest.mark.parametrize("spec, reason", [
    (ModelSpec("softmax", 3, 2), "unsupported_model"),  # the federation trains something else
    (ModelSpec("tests.test_api:TinyRegressor", 3, 1, (), (("dense.w", (3,)), ("dense.b", (2,)))),
     "incompatible_model"),  # same name, other shapes
])
def test_a_device_refuses_a_model_that_is_not_its_own_and_says_so(spec, reason):
    c = AgentCore(agent_id="me", fed=FED, data=regression_data(), model=TinyRegressor())
    params = {k: np.zeros(s, np.float32) for k, s in spec.param_shapes().items()}
    m = wire.ModelMsg(FED, 0, wire.params_version(params), spec, params)
    actions = c.receive(T.model, wire.encode(m))
    assert c.model_msg is None and c.rejected[reason] == 1
    st = status_of(actions)  # a model the device cannot train is in its status: it is not selected
    assert not st.eligible and st.reason.startswith(f"{reason}: ")


# ---------------------------------------------------------------------------
# code is loaded only from the device's own configuration


@pytest.fixture
def trap_module(tmp_path, monkeypatch):
    """A module on sys.path that records being imported (a hostile message would name it)."""
    marker = tmp_path / "imported"
    (tmp_path / "fm_trap.py").write_text(
        f"open({str(marker)!r}, 'w').write('imported')\n"
        "from edge_agent.model_api import NumpyModel\n"
        "class Evil(NumpyModel):\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield marker
    sys.modules.pop("fm_trap", None)


@pytest.mark.parametrize("own_model", [False, True], ids=["builtin-device", "custom-model-device"])
def test_a_model_message_naming_a_module_imports_nothing(trap_module, own_model):
    spec = ModelSpec("fm_trap:Evil", 3, 1, (), (("w", (3,)),))
    params = {"w": np.zeros(3, np.float32)}
    payload = wire.encode(wire.ModelMsg(FED, 0, wire.params_version(params), spec, params))
    c = AgentCore(agent_id="me", fed=FED, data=regression_data(), model=TinyRegressor() if own_model else None)
    c.receive(T.model, payload)
    assert c.model_msg is None and sum(c.rejected.values()) == 1
    with pytest.raises(ModelError, match="unsupported_model|incompatible_model"):
        model_for_spec(spec, TinyRegressor() if own_model else None)
    assert not trap_module.exists() and "fm_trap" not in sys.modules
    # ...while the device's own configuration does load it (so the trap works)
    with pytest.raises(ModelError):
        load_model("fm_trap:Evil")
    assert trap_module.exists()


# ---------------------------------------------------------------------------
# plugins that misbehave: a clear reason, not selected again, nothing sent


@pytest.mark.parametrize("how, reason", [
    ("raise", "training_failed: tests.test_api:Broken model: RuntimeError: CUDA out of memory"),
    ("nan", "bad_params: tests.test_api:Broken model.fit: dense.w holds NaN or Inf"),
    ("missing", "bad_params: tests.test_api:Broken model.fit: missing ['dense.b'], unexpected []"),
    ("shape", "bad_params: tests.test_api:Broken model.fit: dense.w has shape (4,), expected (3,)"),
    ("nan_metric", "bad_params: tests.test_api:Broken model: metrics ['train_loss'] are NaN or Inf"),
])
def test_a_plugin_that_fails_makes_the_device_say_so_and_send_nothing(how, reason):
    model = load_model("tests.test_api:Broken", {"how": how})
    c = AgentCore(agent_id="me", fed=FED, data=regression_data(), model=model)
    topic, payload, m = model_message(model)
    c.receive(topic, payload)
    deliver_task(c, task(m))
    actions = c.train(1, 0)
    assert [a for a in actions if isinstance(a, Publish) and a.topic == T.update("me")] == []
    st = status_of(actions)
    assert not st.eligible and st.reason == reason
    assert c.problem[0] == reason.split(":")[0]
    # ...and it does not train again when selected for the next round
    _, payload2, m2 = model_message(model, round_=1)
    c.receive(topic, payload2)
    assert [a for a in deliver_task(c, task(m2)) if isinstance(a, Train)] == []


# ---------------------------------------------------------------------------
# data beyond files, checked against the model at start


def test_local_data_from_arrays_a_callable_and_batches():
    X = np.random.default_rng(0).standard_normal((50, 3)).astype(np.float32)
    y = (np.arange(50) % 2).astype(np.float64)  # integral floats become class indices
    d = local_data((X, y), holdout=0.2, seed=0)
    assert d.num_samples == 40 and len(d.X_holdout) == 10 and d.y_train.dtype == np.int64
    assert local_data(lambda: (X, y), holdout=0.0).num_samples == 50
    batches = [(X[i:i + 10], y[i:i + 10]) for i in range(0, 50, 10)]
    s = local_data(Batches(batches, holdout=(X[:5], y[:5])))
    assert s.num_samples == 50 and s.X_train is None and len(s.X_holdout) == 5
    assert [len(b[0]) for b in s.batches(3)] == [10] * 5
    seeds = []
    f = local_data(Batches(lambda seed: seeds.append(seed) or batches[:2], samples=20))
    assert f.num_samples == 20 and len(list(f.batches(7))) == 2 and 7 in seeds


@pytest.mark.parametrize("data, fragment", [
    ((np.zeros((5, 3)), np.zeros(4)), "X must be [n, features] and y [n]"),
    ((np.full((5, 3), np.nan), np.zeros(5)), "X contains NaN or Inf"),
    ((np.zeros((0, 3)), np.zeros(0)), "no samples"),
    ((np.array([["a", "b", "c"]]), np.zeros(1)), "must be numeric"),
    (Batches((b for b in [(np.zeros((2, 3)), np.zeros(2))])), "one-shot iterator"),
    (Batches([]), "samples must be a positive integer"),
    (Batches([np.zeros(3)]), "batch 0 must be a pair"),
    (lambda: 1 / 0, "the data callable failed: ZeroDivisionError"),
    (42, "data must be a path"),
])
def test_bad_local_data_is_one_clear_error(data, fragment):
    with pytest.raises(DataError) as info:
        local_data(data)
    assert fragment in str(info.value)


@pytest.mark.parametrize("X, y, fragment", [
    (np.zeros((6, 64), np.float32), np.array([0, 1, 2, 11, 3, 4]), "labels range over 0..11, the model has classes 0..9"),
    (np.zeros((6, 60), np.float32), np.zeros(6, np.int64), "60 features per row, the model takes 64"),
    (np.zeros((6, 64), np.float32), np.array([0, 1, 0.5, 2, 3, 4]), "labels must be class indices"),
])
def test_an_agent_whose_data_cannot_fit_its_model_fails_at_start(X, y, fragment):
    cfg = fedmqtt.AgentConfig(agent_id="car-1", state_dir="")
    with pytest.raises(ModelError) as info:
        fedmqtt.Agent(cfg, model=fedmqtt.SoftmaxRegression(64, 10), data=(X, y))
    assert fragment in str(info.value)


def test_a_device_without_its_own_model_reports_bad_labels_when_the_model_arrives():
    """A built-in federation model with too few classes for this device's labels: status, not a traceback."""
    X = np.zeros((20, 4), np.float32)
    y = np.arange(20) % 12
    c = AgentCore(agent_id="me", fed=FED, data=LocalData(X, y, X[:0], y[:0]))
    spec = ModelSpec("softmax", 4, 10)
    params = {k: np.zeros(s, np.float32) for k, s in spec.param_shapes().items()}
    st = status_of(c.receive(T.model, wire.encode(wire.ModelMsg(FED, 0, wire.params_version(params), spec, params))))
    assert not st.eligible
    assert st.reason == "bad_data: local data: labels range over 0..11, the model has classes 0..9"


# ---------------------------------------------------------------------------
# entry points and config errors


def test_a_model_registered_as_an_entry_point_is_found_by_name(tmp_path, monkeypatch):
    dist = tmp_path / "fm_plugin-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: fm-plugin\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[fedmqtt.models]\ntiny = tests.test_api:TinyRegressor\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    model = load_model("tiny")
    assert isinstance(model, TinyRegressor) and model.kind == "tiny" and model.spec.kind == "tiny"
    with pytest.raises(ModelError, match="no entry point of that name"):
        load_model("tinier")


@pytest.mark.parametrize("kind, options, fragment", [
    ("no_such_module_xyz:Model", {}, "cannot import no_such_module_xyz"),
    ("tests.test_api:Nothing", {}, "has no class Nothing"),
    ("tests.test_api:Broken", {"colour": "red"}, "Broken(colour='red') failed: TypeError"),
    ("tests.test_api:regression_data", {}, "has no class regression_data"),
    ("softmax", {"x": 1}, "takes no options"),
    ("not a kind!", {}, "neither built in"),
])
def test_a_bad_model_name_or_options_is_one_clear_error(kind, options, fragment):
    with pytest.raises(ModelError) as info:
        load_model(kind, options, n_features=4, n_outputs=2)
    assert fragment in str(info.value)


def test_an_aggregator_config_naming_a_missing_model_names_the_key(tmp_path):
    from edge_agent.config import ConfigError, load

    from aggregator.config import AggregatorConfig

    p = tmp_path / "a.toml"
    p.write_text('[model]\nkind = "no_such_module_xyz:Model"\n')
    with pytest.raises(ConfigError, match=r"model\.kind: model 'no_such_module_xyz:Model': cannot import"):
        load(AggregatorConfig, p)


def test_a_device_installs_numpy_msgpack_and_paho_only():
    """The installed distribution's unconditional requirements (what `pip install fedmqtt` pulls in)."""
    import re
    from importlib import metadata

    requires = metadata.requires("fedmqtt") or []
    base = sorted(re.split(r"[<>=!~ ;\[]", r)[0].lower() for r in requires if "extra ==" not in r)
    assert base == ["msgpack", "numpy", "paho-mqtt"]
    torch_extra = [r for r in requires if 'extra == "torch"' in r]
    assert torch_extra and all(r.startswith("torch") for r in torch_extra)


def test_the_spec_allows_no_more_arrays_than_the_codec_carries():
    from edge_agent import spec

    assert spec.MAX_PARAM_ARRAYS == wire.MAX_ARRAYS


class Float64Init(TinyRegressor):
    """A plugin whose init_params returns float64 arrays, in another order than its shapes."""

    kind = "tests.test_api:Float64Init"

    def init_params(self, seed=0):
        return {"dense.b": np.zeros(1), "dense.w": np.ones(3)}


def test_the_aggregator_checks_a_plugins_initial_parameters():
    from aggregator.config import AggregatorConfig
    from aggregator.coordinator import Coordinator
    from aggregator.strategies import FedAvg

    cfg = AggregatorConfig(federation=FED)
    cfg.model.use(load_model("tests.test_api:Float64Init"))
    co = Coordinator(cfg, FedAvg())
    published = [a for a in co.start(0.0) if isinstance(a, Publish) and a.topic == T.model]
    m = wire.decode(published[0].payload, expect="model", spec=cfg.model.spec())
    assert list(m.params) == ["dense.w", "dense.b"] and m.params["dense.w"].dtype == np.float32


def test_a_replayed_model_of_another_shape_does_not_make_the_device_ineligible():
    model = TinyRegressor()
    c = AgentCore(agent_id="me", fed=FED, data=regression_data(), model=model)
    c.receive(*model_message(model, round_=3)[:2])
    other = ModelSpec(model.kind, 3, 1, (), (("dense.w", (3,)), ("dense.b", (2,))))
    params = {k: np.zeros(s, np.float32) for k, s in other.param_shapes().items()}
    old = wire.ModelMsg(FED, 1, wire.params_version(params), other, params)
    assert [a for a in c.receive(T.model, wire.encode(old)) if isinstance(a, Publish)] == []
    assert c.rejected["replayed"] == 1 and c.problem is None and c.model_msg.round == 3


def test_a_problem_a_model_caused_clears_when_the_current_model_comes_again():
    model = TinyRegressor()
    c = AgentCore(agent_id="me", fed=FED, data=regression_data(), model=model)
    c.receive(*model_message(model, round_=1)[:2])
    bad = ModelSpec(model.kind, 3, 1, (), (("dense.w", (3,)), ("dense.b", (2,))))
    params = {k: np.zeros(s, np.float32) for k, s in bad.param_shapes().items()}
    st = status_of(c.receive(T.model, wire.encode(wire.ModelMsg(FED, 2, wire.params_version(params), bad, params))))
    assert not st.eligible and st.reason.startswith("incompatible_model")
    # the aggregator's next model has the device's own spec again: eligible again
    assert status_of(c.receive(*model_message(model, round_=3)[:2])).eligible and c.problem is None


def test_a_device_configured_for_one_builtin_kind_reports_another_in_its_status():
    X = np.zeros((20, 4), np.float32)
    c = AgentCore(agent_id="me", fed=FED, data=LocalData(X, np.arange(20) % 3, X[:0], np.zeros(0)),
                  capabilities=("softmax",))
    spec = ModelSpec("mlp", 4, 3, (8,))
    params = {k: np.zeros(s, np.float32) for k, s in spec.param_shapes().items()}
    st = status_of(c.receive(T.model, wire.encode(wire.ModelMsg(FED, 0, wire.params_version(params), spec, params))))
    assert not st.eligible and st.reason == "unsupported_model: model kind mlp not in ('softmax',)"


class NoGraph(TinyRegressor):
    """A plugin whose ONNX export raises."""

    kind = "tests.test_api:NoGraph"

    def to_onnx(self, params):
        raise RuntimeError("exporter crashed")


@pytest.mark.broker
def test_a_failing_onnx_export_costs_the_onnx_copy_not_the_round(broker_config, tmp_path):
    cfg = fedmqtt.AggregatorConfig(federation="noonnx", rounds=2, state_dir=str(tmp_path / "agg"), broker=broker_config)
    cfg.round.min_agents, cfg.round.timeout = 1, 30.0
    agg = fedmqtt.Aggregator(cfg, model=NoGraph())
    agent = fedmqtt.Agent(fedmqtt.AgentConfig(agent_id="a1", federation="noonnx", state_dir="", broker=broker_config,
                                              exit_when_done=True),
                          model=NoGraph(), data=(regression_data(40).X_train, regression_data(40).y_train))
    with agg, agent:
        assert agg.wait(60), f"stuck at round {agg.round}"
    assert [s.participants for s in agg.history] == [1, 1]
    assert agg.service.onnx_failures == 3  # the initial model and both rounds


def test_wait_returns_when_the_agent_is_stopped_from_another_thread_and_a_stopped_agent_cannot_start():
    import threading

    agent = fedmqtt.Agent(fedmqtt.AgentConfig(agent_id="a1", state_dir="",
                                              broker=fedmqtt.BrokerConfig(port=1)),  # nothing listens: no broker
                          data=(regression_data(10).X_train, regression_data(10).y_train), model=TinyRegressor())
    agent.start()
    result = []
    waiter = threading.Thread(target=lambda: result.append(agent.wait()))
    waiter.start()
    time.sleep(0.3)
    agent.stop()
    waiter.join(5)
    assert not waiter.is_alive() and result == [False]
    with pytest.raises(RuntimeError, match="already started or stopped"):
        agent.start()
