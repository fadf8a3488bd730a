"""The PyTorch adapter: parameters as named float32 arrays, the default loop against the numpy models, ONNX, the wire.

References are independent of the adapter: torch's own state_dict and
initialisation, the built-in numpy models (SoftmaxRegression,
LinearRegression) trained on the same batches, and onnxruntime running the
exported graph.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip(
    "torch", reason="the PyTorch adapter needs torch: pip install torch==2.13.0 (a CPU build), "
                    "or scripts/setup.sh .venv with the torch or dev extra")
from torch import nn  # noqa: E402

from edge_agent import wire  # noqa: E402
from edge_agent.agent import AgentCore, PutOutbox, Train  # noqa: E402
from edge_agent.data import LocalData  # noqa: E402
from edge_agent.model_api import ModelError, TrainData  # noqa: E402
from edge_agent.model_loader import load_model, model_for_spec  # noqa: E402
from edge_agent.models import LinearRegression, SoftmaxRegression  # noqa: E402
from edge_agent.mqtt import Publish  # noqa: E402
from edge_agent.topics import Topics  # noqa: E402
from edge_agent.torch_model import TorchModel  # noqa: E402
from edge_agent.wire import TrainConfig  # noqa: E402

from .conftest import deliver_task  # noqa: E402

FED = "f"
T = Topics(FED)


class SmallCNN(nn.Module):
    """Digits-sized CNN: the wire's rows are [n, 64]; forward makes them 8x8 images."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 4, kernel_size=3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4 * 4 * 4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(-1, 1, 8, 8)
        x = torch.max_pool2d(torch.relu(self.bn(self.conv1(x))), 2)
        return self.fc(torch.flatten(x, 1))


def make_cnn() -> nn.Module:
    return SmallCNN()


def digits_like(n: int = 60, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.random((n, 64), dtype=np.float32), (np.arange(n) % 10).astype(np.int64)


def float_state(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v for k, v in module.state_dict().items() if v.is_floating_point()}


# -- parameters ---------------------------------------------------------------


def test_params_are_the_float_state_dict_entries_and_round_trip_exactly():
    model = TorchModel(make_cnn, n_features=64, n_outputs=10)
    reference = make_cnn()
    expected = {k: tuple(v.shape) for k, v in float_state(reference).items()}
    assert "bn.num_batches_tracked" not in expected and "bn.running_mean" in expected
    assert model.parameter_shapes() == expected == model.spec.param_shapes()
    assert list(model.parameter_shapes()) == list(expected)  # state_dict order is the wire order

    params = model.init_params(3)
    params["bn.running_var"] += np.float32(0.25)  # buffers travel too
    assert all(a.dtype == np.float32 for a in params.values())
    fresh = model.load_params(params, make_cnn())
    for name, t in float_state(fresh).items():
        np.testing.assert_array_equal(t.numpy(), params[name])
    back = TorchModel.params_of(fresh)
    assert list(back) == list(params)
    for name in params:
        np.testing.assert_array_equal(back[name], params[name])

    # no memory shared either way: the caller's arrays and the module move independently
    before = params["fc.bias"].copy()
    params["fc.bias"] += 1.0
    np.testing.assert_array_equal(fresh.state_dict()["fc.bias"].numpy(), before)
    back["fc.weight"][:] = 7.0
    assert not torch.any(fresh.state_dict()["fc.weight"] == 7.0)


def test_read_only_wire_arrays_load():
    model = TorchModel(make_cnn, n_features=64, n_outputs=10)
    params = model.init_params(0)
    for a in params.values():
        a.flags.writeable = False  # as decoded from msgpack
    X, y = digits_like(20)
    new, _ = model.fit(params, TrainData(X, y, len(X)), TrainConfig(1, 10, 0.1), 0)
    assert all(a.flags.writeable for a in new.values())


def test_init_params_is_torch_seeded_init_of_the_factory():
    model = TorchModel(make_cnn, n_features=64, n_outputs=10)
    a, b, c = model.init_params(7), model.init_params(7), model.init_params(8)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(a["conv1.weight"], c["conv1.weight"])
    torch.manual_seed(7)
    reference = float_state(make_cnn())  # what a PyTorch user gets from that seed
    for k in a:
        np.testing.assert_array_equal(a[k], reference[k].numpy())


def test_init_params_leaves_torch_global_rng_alone():
    model = TorchModel(make_cnn, n_features=64, n_outputs=10)
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    model.init_params(5)
    model.fit(model.init_params(0), TrainData(*digits_like(10), 10), TrainConfig(1, 5, 0.1), 1)
    assert torch.equal(torch.rand(3), expected)


def test_a_module_instance_is_reinitialised_by_reset_parameters():
    module = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    model = TorchModel(module, n_features=4, n_outputs=3)
    a, b, c = model.init_params(1), model.init_params(1), model.init_params(2)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(a["0.weight"], c["0.weight"])
    assert list(a) == ["0.weight", "0.bias", "2.weight", "2.bias"]


def test_a_module_whose_init_cannot_be_redone_asks_for_a_factory():
    class Scaled(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(4, 3)
            self.scale = nn.Parameter(torch.randn(3))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.lin(x) * self.scale

    with pytest.raises(ModelError, match="pass a factory"):
        TorchModel(Scaled(), n_features=4, n_outputs=3).init_params(0)
    model = TorchModel(Scaled, n_features=4, n_outputs=3)  # the class is a factory
    assert np.array_equal(model.init_params(4)["scale"], model.init_params(4)["scale"])


@pytest.mark.parametrize("kwargs, match", [
    (dict(n_features=64, n_outputs=5), "logits"),  # the CNN has 10 outputs
    (dict(n_features=10, n_outputs=10), "fails on input"),  # 10 features do not make an 8x8 image
    (dict(n_features=64, n_outputs=10, task="ranking"), "task"),
])
def test_a_misconfigured_model_is_refused_at_construction(kwargs, match):
    with pytest.raises(ModelError, match=match) as info:
        TorchModel(make_cnn, **kwargs)
    assert info.value.reason == "bad_model"


# -- the default loop against the numpy models -----------------------------------


def start(seed: int = 0) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """A non-zero softmax start, as numpy (W0 [in, out]) and torch (weight [out, in]) parameters."""
    rng = np.random.default_rng(seed)
    W = (rng.standard_normal((64, 10)) * 0.1).astype(np.float32)
    b = (rng.standard_normal(10) * 0.1).astype(np.float32)
    return {"W0": W, "b0": b}, {"weight": np.ascontiguousarray(W.T), "bias": b.copy()}


def test_one_full_batch_epoch_is_one_sgd_step_on_cross_entropy():
    X, y = digits_like(80)
    np_start, torch_start = start()
    config = TrainConfig(epochs=1, batch_size=len(X), lr=0.5)  # one batch: the order does not matter
    ref, ref_metrics = SoftmaxRegression(64, 10).fit(np_start, TrainData(X, y, len(X)), config, 11)
    model = TorchModel(lambda: nn.Linear(64, 10), n_features=64, n_outputs=10)
    got, metrics = model.fit(torch_start, TrainData(X, y, len(X)), config, 99)
    np.testing.assert_allclose(got["weight"].T, ref["W0"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got["bias"], ref["b0"], rtol=1e-5, atol=1e-6)
    assert metrics["train_loss"] == pytest.approx(ref_metrics["train_loss"], rel=1e-5)
    assert not np.allclose(got["weight"], torch_start["weight"])  # it did move


@pytest.mark.parametrize("mu", [0.0, 0.5])
def test_minibatch_sgd_and_fedprox_follow_the_numpy_solver(mu):
    """Same seed, same batch order (both draw it from default_rng(seed)): the same model, FedProx included."""
    X, y = digits_like(60)
    np_start, torch_start = start(1)
    config = TrainConfig(epochs=3, batch_size=16, lr=0.3, prox_mu=mu)
    seed = np.random.SeedSequence([5, 2])  # what the agent passes (round_seed)
    ref, _ = SoftmaxRegression(64, 10).fit(np_start, TrainData(X, y, len(X)), config, seed)
    got, _ = TorchModel(lambda: nn.Linear(64, 10), n_features=64, n_outputs=10).fit(
        torch_start, TrainData(X, y, len(X)), config, seed)
    np.testing.assert_allclose(got["weight"].T, ref["W0"], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(got["bias"], ref["b0"], rtol=1e-4, atol=1e-6)


def test_regression_is_sgd_on_mean_squared_error():
    rng = np.random.default_rng(2)
    X = rng.random((40, 5), dtype=np.float32)
    y = (X @ np.arange(1, 6, dtype=np.float32) + 0.5).astype(np.float32)
    W = (rng.standard_normal((5, 1)) * 0.1).astype(np.float32)
    b = np.zeros(1, np.float32)
    config = TrainConfig(epochs=2, batch_size=8, lr=0.05)
    ref, _ = LinearRegression(5).fit({"W0": W, "b0": b}, TrainData(X, y, len(X)), config, 3)
    model = TorchModel(lambda: nn.Linear(5, 1), n_features=5, n_outputs=1, task="regression")
    got, _ = model.fit({"weight": np.ascontiguousarray(W.T), "bias": b}, TrainData(X, y, len(X)), config, 3)
    np.testing.assert_allclose(got["weight"].T, ref["W0"], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(got["bias"], ref["b0"], rtol=1e-4, atol=1e-6)
    assert model.predict(got, X).shape == (40,) and model.predict(got, X).dtype == np.float32


def test_fedprox_pulls_toward_the_global_model():
    X, y = digits_like(60)
    model = TorchModel(lambda: nn.Linear(64, 10), n_features=64, n_outputs=10)
    _, w0 = start(2)

    def distance(mu: float) -> float:
        w, _ = model.fit(w0, TrainData(X, y, len(X)), TrainConfig(5, 10, 0.5, prox_mu=mu), 4)
        return float(np.sqrt(sum(np.sum((w[k] - w0[k]) ** 2) for k in w)))

    assert distance(2.0) < 0.8 * distance(0.0)


def test_fit_is_deterministic_for_a_seed_and_differs_between_seeds():
    class Dropped(nn.Module):  # dropout draws from torch's RNG: seeded from the round's seed too
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Sequential(nn.Linear(64, 16), nn.ReLU(), nn.Dropout(0.5), nn.Linear(16, 10))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x)

    model = TorchModel(Dropped, n_features=64, n_outputs=10)
    params = model.init_params(0)
    X, y = digits_like(40)
    data = TrainData(X, y, len(X))
    config = TrainConfig(2, 8, 0.1)
    a, ma = model.fit(params, data, config, np.random.SeedSequence([1, 3]))
    b, mb = model.fit(params, data, config, np.random.SeedSequence([1, 3]))
    c, _ = model.fit(params, data, config, np.random.SeedSequence([1, 4]))
    assert ma == mb and all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(a["net.0.weight"], c["net.0.weight"])


def test_streamed_batches_train_like_arrays():
    X, y = digits_like(30)
    model = TorchModel(lambda: nn.Linear(64, 10), n_features=64, n_outputs=10)
    _, w0 = start(3)
    fixed = [(X[:15], y[:15]), (X[15:], y[15:])]
    got, metrics = model.fit(w0, TrainData(None, None, 30, batches=lambda seed: iter(fixed)), TrainConfig(1, 15, 0.2), 0)
    ref = TorchModel(lambda: nn.Linear(64, 10), n_features=64, n_outputs=10)
    w = {k: v.copy() for k, v in w0.items()}
    for Xb, yb in fixed:  # the same two steps, one batch at a time from arrays
        w, _ = ref.fit(w, TrainData(Xb, yb, len(Xb)), TrainConfig(1, len(Xb), 0.2), 0)
    for k in w:
        np.testing.assert_allclose(got[k], w[k], rtol=1e-6, atol=1e-7)
    assert "train_loss" in metrics


def test_evaluate_and_predict_match_the_numpy_softmax():
    X, y = digits_like(50, seed=4)
    np_start, torch_start = start(4)
    ref = SoftmaxRegression(64, 10)
    model = TorchModel(lambda: nn.Linear(64, 10), n_features=64, n_outputs=10)
    ev, ref_ev = model.evaluate(torch_start, X, y), ref.evaluate(np_start, X, y)
    assert ev["loss"] == pytest.approx(ref_ev["loss"], rel=1e-5)
    assert ev["accuracy"] == pytest.approx(ref_ev["accuracy"])
    np.testing.assert_allclose(model.predict_proba(torch_start, X), ref.predict_proba(np_start, X), rtol=1e-5,
                               atol=1e-7)
    np.testing.assert_array_equal(model.predict(torch_start, X), ref.predict(np_start, X))
    assert model.predict(torch_start, X).dtype == np.int64
    assert model.evaluate(torch_start, X[:0], y[:0]) == {}


# -- the user's own loops ------------------------------------------------------------


def test_fit_fn_gets_the_module_holding_the_global_params_and_its_metrics_come_back():
    seen = {}
    loader = object()  # stands for a DataLoader the device passed as its data

    def my_fit(module: nn.Module, data: TrainData, config: TrainConfig) -> dict:
        seen["state"] = {k: v.clone() for k, v in module.state_dict().items()}
        seen["training"], seen["source"], seen["epochs"] = module.training, data.source, config.epochs
        with torch.no_grad():
            module.bias += 1.0
        return {"loss": 0.25, "train_steps": 3}

    model = TorchModel(lambda: nn.Linear(64, 10), n_features=64, n_outputs=10, fit_fn=my_fit)
    _, w0 = start(5)
    new, metrics = model.fit(w0, TrainData(None, None, 12, source=loader), TrainConfig(epochs=4), 0)
    for k in w0:
        np.testing.assert_array_equal(seen["state"][k].numpy(), w0[k])
    assert seen["training"] and seen["source"] is loader and seen["epochs"] == 4
    assert metrics == {"train_loss": 0.25, "train_steps": 3.0}
    np.testing.assert_allclose(new["bias"], w0["bias"] + 1.0)
    np.testing.assert_array_equal(new["weight"], w0["weight"])


def test_an_exception_in_fit_fn_propagates():
    def broken(module, data, config):
        raise RuntimeError("CUDA out of memory (pretend)")

    model = TorchModel(lambda: nn.Linear(64, 10), n_features=64, n_outputs=10, fit_fn=broken)
    with pytest.raises(RuntimeError, match="pretend"):
        model.fit(model.init_params(0), TrainData(*digits_like(10), 10), TrainConfig(), 0)


def test_evaluate_fn_replaces_the_default_evaluation():
    calls = []

    def my_eval(module: nn.Module, X: np.ndarray, y: np.ndarray) -> dict:
        calls.append((module.training, torch.is_grad_enabled(), module.bias.detach().clone(), len(X)))
        return {"loss": 1.5, "accuracy": 0.5}

    model = TorchModel(lambda: nn.Linear(64, 10), n_features=64, n_outputs=10, evaluate_fn=my_eval)
    _, w0 = start(6)
    X, y = digits_like(20)
    assert model.evaluate(w0, X, y) == {"loss": 1.5, "accuracy": 0.5}
    training, grad, bias, n = calls[0]
    assert not training and not grad and n == 20
    np.testing.assert_array_equal(bias.numpy(), w0["bias"])


# -- in the agent --------------------------------------------------------------------


def agent_with(model: TorchModel) -> tuple[AgentCore, wire.ModelMsg]:
    X, y = digits_like(50)
    core = AgentCore(agent_id="me", fed=FED, data=LocalData(X[:40], y[:40], X[40:], y[40:]), seed=5, model=model)
    params = model.init_params(0)
    m = wire.ModelMsg(FED, 0, wire.params_version(params), model.spec, params)
    core.receive(T.model, wire.encode(m))
    t = wire.TaskMsg(FED, 1, m.version, "open", 0, 100.0, TrainConfig(1, 8, 0.1))
    assert [a for a in deliver_task(core, t) if isinstance(a, Train)] == [Train(1, 0)]
    return core, m


def test_an_agent_trains_a_torch_model_and_sends_its_delta():
    model = TorchModel(make_cnn, n_features=64, n_outputs=10)
    core, m = agent_with(model)
    actions = core.train(1, 0)
    update = [a for a in actions if isinstance(a, Publish) and a.topic == T.update("me")]
    assert len(update) == 1 and any(isinstance(a, PutOutbox) for a in actions)
    u = wire.decode(update[0].payload, expect="update", fed=FED, spec=model.spec)
    assert set(u.delta) == set(model.parameter_shapes()) and "train_loss" in u.metrics
    assert "eval_loss" in u.metrics and "eval_accuracy" in u.metrics


def test_a_failing_fit_fn_makes_the_agent_report_training_failed_and_send_nothing():
    def broken(module, data, config):
        raise RuntimeError("the user's loop broke")

    core, _ = agent_with(TorchModel(make_cnn, n_features=64, n_outputs=10, fit_fn=broken))
    actions = core.train(1, 0)
    assert not any(isinstance(a, PutOutbox) for a in actions)
    assert not any(isinstance(a, Publish) and a.topic == T.update("me") for a in actions)
    statuses = [wire.decode(a.payload, expect="status", fed=FED) for a in actions
                if isinstance(a, Publish) and a.topic == T.status("me")]
    assert len(statuses) == 1
    assert statuses[0].eligible is False
    assert statuses[0].reason.startswith("training_failed") and "the user's loop broke" in statuses[0].reason
    assert core.updates_sent == 0


# -- ONNX ----------------------------------------------------------------------------


def test_to_onnx_gives_the_modules_probabilities_and_passes_the_aggregators_export():
    onnx = pytest.importorskip("onnx", reason="ONNX export runs on the aggregator: pip install 'fedmqtt[aggregator]'")
    ort = pytest.importorskip("onnxruntime", reason="pip install 'fedmqtt[aggregator]'")
    from aggregator.onnx_export import metadata, model_to_onnx_bytes

    model = TorchModel(make_cnn, n_features=64, n_outputs=10)
    params = model.init_params(1)
    X, y = digits_like(60, seed=5)
    params, _ = model.fit(params, TrainData(X, y, len(X)), TrainConfig(1, 20, 0.1), 0)  # BN stats move too

    data = model.to_onnx(params)
    onnx.checker.check_model(data, full_check=True)
    graph = onnx.load_from_string(data)
    assert [i.name for i in graph.graph.input] == ["input"]
    assert [o.name for o in graph.graph.output] == ["probabilities", "label"]
    assert graph.opset_import[0].version == 17
    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    Xq = digits_like(7, seed=6)[0]  # another batch size than the export's probe: the batch axis is dynamic
    probabilities, label = session.run(None, {"input": Xq})

    reference = model.load_params(params, make_cnn()).eval()  # torch itself, not the adapter's predict
    with torch.no_grad():
        logits = reference(torch.from_numpy(Xq))
    np.testing.assert_allclose(probabilities, torch.softmax(logits, -1).numpy(), rtol=1e-5, atol=1e-7)
    assert label.dtype == np.int64 and label.shape == (7,)
    np.testing.assert_array_equal(label, logits.argmax(1).numpy())

    published = model_to_onnx_bytes(model, params, federation="f", round=1, version="v")
    meta = metadata(onnx.load_from_string(published))
    assert meta["model_kind"] == "torch" and meta["round"] == "1" and meta["n_features"] == "64"
    again, _ = ort.InferenceSession(published, providers=["CPUExecutionProvider"]).run(None, {"input": Xq})
    np.testing.assert_array_equal(again, probabilities)


def test_a_regression_model_exports_a_flat_prediction():
    pytest.importorskip("onnx", reason="pip install 'fedmqtt[aggregator]'")
    ort = pytest.importorskip("onnxruntime", reason="pip install 'fedmqtt[aggregator]'")
    model = TorchModel(lambda: nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)), n_features=3,
                       n_outputs=1, task="regression")
    params = model.init_params(0)
    X = np.random.default_rng(7).random((5, 3), dtype=np.float32)
    session = ort.InferenceSession(model.to_onnx(params), providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == ["prediction"]
    (prediction,) = session.run(None, {"input": X})
    assert prediction.shape == (5,)
    np.testing.assert_allclose(prediction, model.predict(params, X), rtol=1e-5, atol=1e-7)


# -- the wire and the loader ----------------------------------------------------------


def test_a_torch_model_speaks_the_same_msgpack_float32_arrays():
    model = TorchModel(make_cnn, n_features=64, n_outputs=10)
    params = model.init_params(2)
    msg = wire.ModelMsg(FED, 3, wire.params_version(params), model.spec, params, run=1)
    decoded = wire.decode(wire.encode(msg), expect="model", fed=FED)
    assert decoded.spec == model.spec
    assert list(decoded.params) == list(params)
    for name, a in params.items():
        assert decoded.params[name].dtype == np.float32
        np.testing.assert_array_equal(decoded.params[name], a)
    assert wire.params_version(decoded.params) == msg.version
    assert model_for_spec(decoded.spec, model) is model  # the device accepts it as its own model


def test_the_model_loader_builds_one_from_a_config():
    model = load_model("edge_agent.torch_model:TorchModel",
                       {"module": f"{__name__}:make_cnn", "n_features": 64, "n_outputs": 10})
    assert isinstance(model, TorchModel) and model.kind == "edge_agent.torch_model:TorchModel"
    assert model.parameter_shapes() == TorchModel(make_cnn, n_features=64, n_outputs=10).parameter_shapes()


def test_models_training_at_once_in_one_process_do_not_reseed_each_other():
    """torch's RNG is per process: a fit_fn that draws from it gives the same result alone or beside others."""
    import threading

    def noisy_fit(module, data, config):
        for _ in range(200):  # long enough for the threads to interleave
            with torch.no_grad():
                for p in module.parameters():
                    p.add_(torch.randn_like(p) * 1e-3)
        return {"loss": 0.0}

    X, y = digits_like()
    data = TrainData(X, y, len(X))
    cfg = TrainConfig(1, 16, 0.1)
    models = [TorchModel(make_cnn, n_features=64, n_outputs=10, fit_fn=noisy_fit) for _ in range(4)]
    start = models[0].init_params(0)
    alone = [m.fit(start, data, cfg, seed)[0] for seed, m in enumerate(models)]
    together: list = [None] * 4

    def run(i):
        together[i] = models[i].fit(start, data, cfg, i)[0]

    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for a, b in zip(alone, together):
        for k in a:
            np.testing.assert_array_equal(a[k], b[k])
    first = next(iter(alone[0]))
    assert not np.array_equal(alone[0][first], alone[1][first])  # the seeds differ, so do the fits
