"""Pure-logic tests of the numpy models, local training and the model spec (no MQTT)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge_agent.models import DTYPE, BuiltinModel, copy_params, subtract
from edge_agent.spec import MAX_DIM, MAX_HIDDEN_LAYERS, MAX_PARAMS, ModelSpec
from edge_agent.training import round_seed, train_local
from edge_agent.wire import TrainConfig

# ---------------------------------------------------------------------------
# helpers


def _problem(spec: ModelSpec, n: int, seed: int):
    """Random float32-representable inputs and matching targets for ``spec``."""
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, spec.n_features)).astype(np.float32)
    if spec.kind == "linear":
        y = rng.standard_normal(n).astype(np.float32)
    else:
        y = rng.integers(0, spec.n_outputs, n)
    return X, y


def _random_params(model: BuiltinModel, seed: int) -> dict[str, np.ndarray]:
    """Non-zero float64 parameters (biases too, so a wrong bias gradient shows)."""
    rng = np.random.default_rng(seed)
    return {k: rng.standard_normal(s) * 0.7 for k, s in model.spec.param_shapes().items()}


def _numeric_grads(model: BuiltinModel, params, X, y, eps: float = 1e-6):
    """Central finite differences of the loss, in float64."""
    out = {}
    for name, value in params.items():
        g = np.zeros_like(value)
        it = np.nditer(value, flags=["multi_index"])
        for _ in it:
            i = it.multi_index
            plus = {k: v.copy() for k, v in params.items()}
            minus = {k: v.copy() for k, v in params.items()}
            plus[name][i] += eps
            minus[name][i] -= eps
            lp, _ = model.loss_and_grads(plus, X, y)
            lm, _ = model.loss_and_grads(minus, X, y)
            g[i] = (lp - lm) / (2 * eps)
        out[name] = g
    return out


SPECS = [
    ModelSpec("softmax", 6, 4),
    ModelSpec("mlp", 6, 3, (7,)),
    ModelSpec("mlp", 5, 3, (5, 4)),
    ModelSpec("linear", 6, 1),
]


# ---------------------------------------------------------------------------
# gradients


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.kind}{list(s.hidden)}")
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gradients_match_finite_differences(spec, seed):
    # The model casts X to float32, but float64 parameters promote every
    # product to float64, so the central difference is accurate to ~1e-9 and
    # a tight tolerance is possible: a missing ReLU mask, a bias gradient
    # that is a mean instead of a sum, a missing 1/n or a wrong transpose
    # each move the analytic gradient by far more than this.
    model = BuiltinModel(spec)
    X, y = _problem(spec, 9, seed)
    params = _random_params(model, seed + 100)
    loss, grads = model.loss_and_grads(params, X, y)
    assert list(grads) == list(spec.param_shapes())
    num = _numeric_grads(model, params, X, y)
    for name in params:
        assert grads[name].shape == params[name].shape, name
        np.testing.assert_allclose(grads[name], num[name], rtol=1e-4, atol=1e-6, err_msg=name)
    # and the gradient is not trivially zero (the check above would be vacuous)
    assert max(np.abs(g).max() for g in grads.values()) > 1e-3


@settings(max_examples=25, deadline=None, derandomize=True)
@given(
    n_features=st.integers(1, 5),
    hidden=st.lists(st.integers(1, 5), min_size=1, max_size=3),
    n_classes=st.integers(2, 4),
    n=st.integers(1, 6),
    seed=st.integers(0, 2**16),
)
def test_mlp_gradients_match_finite_differences_any_shape(n_features, hidden, n_classes, n, seed):
    spec = ModelSpec("mlp", n_features, n_classes, tuple(hidden))
    model = BuiltinModel(spec)
    X, y = _problem(spec, n, seed)
    params = _random_params(model, seed + 1)
    _, grads = model.loss_and_grads(params, X, y)
    num = _numeric_grads(model, params, X, y)
    for name in params:
        np.testing.assert_allclose(grads[name], num[name], rtol=1e-4, atol=1e-6, err_msg=name)


def test_mlp_relu_mask_matters():
    """Guard for the gradient test: with dead units the masked gradient of W0 has zero columns."""
    spec = ModelSpec("mlp", 3, 2, (4,))
    model = BuiltinModel(spec)
    X, y = _problem(spec, 5, 0)
    params = _random_params(model, 0)
    params["b0"][:2] = -100.0  # units 0 and 1 are dead for every sample
    _, grads = model.loss_and_grads(params, X, y)
    assert np.all(grads["W0"][:, :2] == 0) and np.all(grads["b0"][:2] == 0)
    assert np.any(grads["W0"][:, 2:] != 0)


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.kind}{list(s.hidden)}")
def test_float32_gradients_agree_with_float64(spec):
    model = BuiltinModel(spec)
    X, y = _problem(spec, 16, 3)
    p64 = _random_params(model, 4)
    p32 = copy_params(p64)
    loss64, g64 = model.loss_and_grads(p64, X, y)
    loss32, g32 = model.loss_and_grads(p32, X, y)
    assert loss32 == pytest.approx(loss64, rel=1e-4)
    for name in p64:
        assert g32[name].dtype == DTYPE, name
        np.testing.assert_allclose(g32[name], g64[name], rtol=1e-3, atol=1e-5, err_msg=name)


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.kind}{list(s.hidden)}")
def test_loss_matches_evaluate(spec):
    model = BuiltinModel(spec)
    X, y = _problem(spec, 20, 5)
    params = copy_params(_random_params(model, 6))
    loss, _ = model.loss_and_grads(params, X, y)
    metrics = model.evaluate(params, X, y)
    assert metrics["loss"] == pytest.approx(loss, rel=1e-5)
    assert ("accuracy" in metrics) == model.classifier


def test_loss_values_are_the_textbook_ones():
    # zero softmax: uniform over k classes, cross-entropy = log k
    model = BuiltinModel(ModelSpec("softmax", 3, 5))
    X, y = _problem(model.spec, 7, 0)
    loss, _ = model.loss_and_grads(model.init_params(), X, y)
    assert loss == pytest.approx(np.log(5), rel=1e-6)
    # zero linear: prediction 0, MSE = mean(y^2)
    lin = BuiltinModel(ModelSpec("linear", 3, 1))
    X, y = _problem(lin.spec, 7, 0)
    loss, _ = lin.loss_and_grads(lin.init_params(), X, y)
    assert loss == pytest.approx(float(np.mean(y.astype(np.float64) ** 2)), rel=1e-6)


# ---------------------------------------------------------------------------
# training


def _blobs(n_per_class: int = 40, n_classes: int = 3, dim: int = 4, seed: int = 0):
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((n_classes, dim)) * 4
    X = np.concatenate([c + rng.standard_normal((n_per_class, dim)) * 0.5 for c in centers]).astype(np.float32)
    y = np.repeat(np.arange(n_classes), n_per_class)
    order = rng.permutation(len(y))
    return X[order], y[order]


@pytest.mark.parametrize("spec", [ModelSpec("softmax", 4, 3), ModelSpec("mlp", 4, 3, (8,))], ids=["softmax", "mlp"])
def test_training_reduces_loss_and_improves_accuracy(spec):
    X, y = _blobs()
    model = BuiltinModel(spec)
    p0 = model.init_params(seed=1)
    before = model.evaluate(p0, X, y)
    p1, metrics = train_local(model, p0, X, y, TrainConfig(epochs=10, batch_size=16, lr=0.1), seed=0)
    after = model.evaluate(p1, X, y)
    assert after["loss"] < 0.5 * before["loss"]
    assert after["accuracy"] > before["accuracy"]
    assert after["accuracy"] >= 0.95
    assert set(metrics) == {"train_loss"} and np.isfinite(metrics["train_loss"])


def test_training_fits_linear_regression():
    rng = np.random.default_rng(0)
    X = rng.standard_normal((200, 3)).astype(np.float32)
    y = (X @ np.array([1.5, -2.0, 0.5]) + 0.3 + 0.01 * rng.standard_normal(200)).astype(np.float32)
    model = BuiltinModel(ModelSpec("linear", 3, 1))
    p0 = model.init_params()
    p1, _ = train_local(model, p0, X, y, TrainConfig(epochs=20, batch_size=20, lr=0.05), seed=0)
    assert model.evaluate(p1, X, y)["loss"] < 0.01 * model.evaluate(p0, X, y)["loss"]
    np.testing.assert_allclose(p1["W0"][:, 0], [1.5, -2.0, 0.5], atol=0.05)
    np.testing.assert_allclose(p1["b0"], [0.3], atol=0.05)


def test_train_local_is_deterministic_per_seed():
    X, y = _blobs()
    model = BuiltinModel(ModelSpec("mlp", 4, 3, (6,)))
    p0 = model.init_params(0)
    cfg = TrainConfig(epochs=2, batch_size=8, lr=0.05)
    a, ma = train_local(model, p0, X, y, cfg, seed=round_seed(7, 1))
    b, mb = train_local(model, p0, X, y, cfg, seed=round_seed(7, 1))
    c, _ = train_local(model, p0, X, y, cfg, seed=round_seed(7, 2))
    d, _ = train_local(model, p0, X, y, cfg, seed=round_seed(8, 1))
    assert ma == mb
    for k in p0:
        assert a[k].tobytes() == b[k].tobytes(), k  # bit for bit
    assert any(not np.array_equal(a[k], c[k]) for k in p0)
    assert any(not np.array_equal(a[k], d[k]) for k in p0)


def test_train_local_does_not_modify_its_input():
    X, y = _blobs()
    model = BuiltinModel(ModelSpec("softmax", 4, 3))
    p0 = _random_params(model, 0)
    p0 = {k: v.astype(np.float32) for k, v in p0.items()}
    for v in p0.values():
        v.flags.writeable = False  # decoded wire arrays are read-only
    snapshot = {k: v.copy() for k, v in p0.items()}
    p1, _ = train_local(model, p0, X, y, TrainConfig(epochs=1, batch_size=10, lr=0.1), seed=0)
    for k in p0:
        assert np.array_equal(p0[k], snapshot[k]), k
        assert p1[k] is not p0[k] and not np.shares_memory(p1[k], p0[k])
        assert p1[k].dtype == DTYPE
    assert any(not np.array_equal(p1[k], p0[k]) for k in p0)


def test_train_local_epochs_and_batches_visit_every_sample():
    # One epoch with one batch of the whole set equals one full gradient step.
    X, y = _blobs(n_per_class=5)
    model = BuiltinModel(ModelSpec("softmax", 4, 3))
    p0 = copy_params(_random_params(model, 2))
    p1, _ = train_local(model, p0, X, y, TrainConfig(epochs=1, batch_size=len(X), lr=0.25), seed=0)
    _, g = model.loss_and_grads(p0, X, y)
    for k in p0:
        np.testing.assert_allclose(p1[k], p0[k] - 0.25 * g[k], rtol=1e-5, atol=1e-6)


def test_subtract_is_local_minus_global():
    a = {"W0": np.array([[3.0, 1.0]], dtype=np.float32), "b0": np.array([1.0, 2.0], dtype=np.float32)}
    b = {"W0": np.array([[1.0, 1.0]], dtype=np.float32), "b0": np.array([0.5, 4.0], dtype=np.float32)}
    d = subtract(a, b)
    np.testing.assert_array_equal(d["W0"], [[2.0, 0.0]])
    np.testing.assert_array_equal(d["b0"], [0.5, -2.0])
    assert all(v.dtype == DTYPE for v in d.values())


# ---------------------------------------------------------------------------
# initialisation and prediction


def test_init_params_seeded_mlp():
    model = BuiltinModel(ModelSpec("mlp", 8, 3, (5, 4)))
    a, b, c = model.init_params(3), model.init_params(3), model.init_params(4)
    assert list(a) == ["W0", "b0", "W1", "b1", "W2", "b2"]
    for k, shape in model.spec.param_shapes().items():
        assert a[k].shape == shape and a[k].dtype == DTYPE
        assert np.array_equal(a[k], b[k])
        if k.startswith("W"):
            assert not np.array_equal(a[k], c[k])
            assert np.all(a[k] != 0)
        else:
            assert np.all(a[k] == 0)
    # He-normal: std about sqrt(2 / fan_in)
    big = BuiltinModel(ModelSpec("mlp", 200, 2, (300,))).init_params(0)["W0"]
    assert big.std() == pytest.approx(np.sqrt(2 / 200), rel=0.05)


@pytest.mark.parametrize("spec", [ModelSpec("softmax", 5, 3), ModelSpec("linear", 5, 1)], ids=["softmax", "linear"])
def test_init_params_zero_for_convex_models(spec):
    model = BuiltinModel(spec)
    for seed in (0, 1, 99):
        params = model.init_params(seed)
        assert list(params) == list(spec.param_shapes())
        for k, v in params.items():
            assert v.shape == spec.param_shapes()[k] and v.dtype == DTYPE
            assert not v.any()


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.kind}{list(s.hidden)}")
def test_predict_shapes_and_dtypes(spec):
    model = BuiltinModel(spec)
    X, _ = _problem(spec, 11, 0)
    params = copy_params(_random_params(model, 1))
    pred = model.predict(params, X.astype(np.float64))
    assert pred.shape == (11,)
    if spec.kind == "linear":
        assert pred.dtype == np.float32
        expected = X @ params["W0"][:, 0] + params["b0"][0]
        np.testing.assert_allclose(pred, expected, rtol=1e-5, atol=1e-5)
    else:
        assert pred.dtype == np.int64
        assert pred.min() >= 0 and pred.max() < spec.n_outputs
        proba = model.predict_proba(params, X)
        assert proba.shape == (11, spec.n_outputs)
        np.testing.assert_allclose(proba.sum(axis=1), 1.0, rtol=1e-5)
        np.testing.assert_array_equal(proba.argmax(axis=1), pred)


def test_evaluate_empty_set():
    model = BuiltinModel(ModelSpec("softmax", 3, 2))
    assert model.evaluate(model.init_params(), np.zeros((0, 3)), np.zeros(0, dtype=np.int64)) == {}


def test_softmax_is_stable_for_huge_logits():
    model = BuiltinModel(ModelSpec("softmax", 1, 2))
    params = {"W0": np.array([[1e4, -1e4]], dtype=np.float32), "b0": np.zeros(2, dtype=np.float32)}
    X = np.array([[1.0], [-1.0]], dtype=np.float32)
    proba = model.predict_proba(params, X)
    assert np.all(np.isfinite(proba))
    np.testing.assert_allclose(proba, [[1, 0], [0, 1]], atol=1e-6)
    loss, grads = model.loss_and_grads(params, X, np.array([1, 0]))
    # confidently wrong on both samples: probability clipped at 1e-12, so the loss is finite
    assert loss == pytest.approx(-np.log(1e-12), rel=1e-4)
    assert all(np.all(np.isfinite(g)) for g in grads.values())


# ---------------------------------------------------------------------------
# ModelSpec


def test_param_shapes_order():
    spec = ModelSpec("mlp", 6, 3, (5, 4))
    assert list(spec.param_shapes().items()) == [
        ("W0", (6, 5)), ("b0", (5,)), ("W1", (5, 4)), ("b1", (4,)), ("W2", (4, 3)), ("b2", (3,)),
    ]
    assert spec.layer_sizes() == [6, 5, 4, 3]
    assert spec.num_params() == 6 * 5 + 5 + 5 * 4 + 4 + 4 * 3 + 3
    assert list(ModelSpec("softmax", 4, 2).param_shapes().items()) == [("W0", (4, 2)), ("b0", (2,))]


@pytest.mark.parametrize(
    "args, fragment",
    [
        (("not a kind!", 4, 2), "kind"),
        (("cnn", 4, 2), "params: a custom model lists"),  # a custom kind must list its parameters
        (("pkg.mod:Cnn", 4, 2, (), (("w", (4, 0)),)), "params: w: a shape"),
        (("pkg.mod:Cnn", 4, 2, (), (("w", (4,)), ("w", (2,)))), "must be distinct"),
        (("pkg.mod:Cnn", 4, 2, (), (("bad name", (4,)),)), "must be distinct and match"),
        (("pkg.mod:Cnn", 4, 2, (3,), (("w", (4,)),)), "hidden layers are only"),
        (("pkg.mod:Cnn", 4, 2, (), (("w", (MAX_DIM, 256)),)), "more than the limit"),
        (("softmax", 4, 2, (), (("w", (4,)),)), "only custom models list"),
        (("mlp", 4, 2, ()), "hidden layer"),
        (("softmax", 4, 2, (3,)), "only for kind 'mlp'"),
        (("linear", 4, 2), "n_outputs = 1"),
        (("softmax", 4, 1), "n_outputs >= 2"),
        (("softmax", 0, 2), "n_features"),
        (("softmax", MAX_DIM + 1, 2), "n_features"),
        (("softmax", True, 2), "n_features"),
        (("softmax", 4.0, 2), "n_features"),
        (("mlp", 4, 2, (0,)), "hidden: layer sizes must be"),
        (("mlp", 4, 2, (3, True)), "hidden: layer sizes must be"),
        (("mlp", 4, 2, [3]), "hidden: must be at most"),
        (("mlp", 4, 2, (2,) * (MAX_HIDDEN_LAYERS + 1)), "hidden: must be at most"),
        (("mlp", MAX_DIM, 10, (200,)), "more than the limit"),
    ],
)
def test_spec_problems(args, fragment):
    with pytest.raises(ValueError) as info:
        ModelSpec(*args)
    assert fragment in str(info.value)


def test_spec_param_limit_boundary():
    # An mlp [f, h, 2] has h (f + 3) + 2 parameters: find f, h that hit MAX_PARAMS exactly.
    f = next(
        f for f in range(1, 100_000)
        if (MAX_PARAMS - 2) % (f + 3) == 0 and (MAX_PARAMS - 2) // (f + 3) <= MAX_DIM
    )
    h = (MAX_PARAMS - 2) // (f + 3)
    assert ModelSpec("mlp", f, 2, (h,)).num_params() == MAX_PARAMS  # at the limit: accepted
    with pytest.raises(ValueError, match="more than the limit"):
        ModelSpec("mlp", f, 2, (h + 1,))  # f + 3 over it: refused


def test_spec_reports_every_problem():
    with pytest.raises(ValueError) as info:
        ModelSpec("softmax", 0, 0)
    msg = str(info.value)
    assert "n_features" in msg and "n_outputs" in msg


@settings(max_examples=50, deadline=None)
@given(
    kind=st.sampled_from(["softmax", "mlp", "linear"]),
    n_features=st.integers(1, 1000),
    n_classes=st.integers(2, 100),
    hidden=st.lists(st.integers(1, 64), min_size=1, max_size=MAX_HIDDEN_LAYERS),
)
def test_spec_wire_round_trip(kind, n_features, n_classes, hidden):
    spec = ModelSpec(
        kind,
        n_features,
        1 if kind == "linear" else n_classes,
        tuple(hidden) if kind == "mlp" else (),
    )
    wire = spec.to_wire()
    assert set(wire) == {"kind", "n_features", "n_outputs", "hidden"}
    assert isinstance(wire["hidden"], list)
    assert ModelSpec.from_wire(wire) == spec


@pytest.mark.parametrize(
    "wire, fragment",
    [
        ([1, 2], "must be a map"),
        ({"kind": "softmax", "n_features": 4, "n_outputs": 2, "extra": 1}, "unknown keys ['extra']"),
        ({"kind": "mlp", "n_features": 4, "n_outputs": 2, "hidden": 3}, "hidden must be a list"),
        ({"kind": "mlp", "n_features": 4, "n_outputs": 2, "hidden": (3,)}, "hidden must be a list"),
        ({"kind": "softmax", "n_features": "4", "n_outputs": 2}, "n_features"),
        ({"kind": "softmax", "n_features": 4, "n_outputs": 2.0}, "n_outputs"),
        ({"kind": 3, "n_features": 4, "n_outputs": 2}, "kind"),
        ({"n_features": 4, "n_outputs": 2}, "kind"),
        ({"kind": "softmax", "n_outputs": 2}, "n_features"),
        ({"kind": "mlp", "n_features": 4, "n_outputs": 2, "hidden": ["3"]}, "hidden: layer sizes must be"),
        ({"kind": "mlp", "n_features": 4, "n_outputs": 2, "hidden": [1 << 30]}, "hidden: layer sizes must be"),
    ],
)
def test_spec_from_wire_rejects(wire, fragment):
    with pytest.raises(ValueError) as info:
        ModelSpec.from_wire(wire)
    assert fragment in str(info.value)


def test_fedprox_proximal_term_pulls_towards_the_start_and_zero_mu_is_plain_sgd():
    from edge_agent.training import train_local
    from edge_agent.wire import TrainConfig

    rng = np.random.default_rng(0)
    X = rng.standard_normal((64, 5)).astype(np.float32)
    y = (X[:, 0] > 0).astype(np.int64)
    model = BuiltinModel(ModelSpec("softmax", 5, 2))
    start = {k: rng.standard_normal(v.shape).astype(np.float32) for k, v in model.init_params(0).items()}

    def dist(p):
        return float(sum(np.sum((p[k] - start[k]) ** 2) for k in p))

    plain, _ = train_local(model, start, X, y, TrainConfig(10, 8, 0.1), 1)
    zero, _ = train_local(model, start, X, y, TrainConfig(10, 8, 0.1, prox_mu=0.0), 1)
    prox, _ = train_local(model, start, X, y, TrainConfig(10, 8, 0.1, prox_mu=1.0), 1)
    strong, _ = train_local(model, start, X, y, TrainConfig(10, 8, 0.1, prox_mu=5.0), 1)
    for k in plain:
        np.testing.assert_array_equal(plain[k], zero[k])
    assert dist(strong) < dist(prox) < dist(plain)
    # one step by hand: the gradient gains mu * (w - w_start), which is 0 on the first step
    one, _ = train_local(model, start, X[:8], y[:8], TrainConfig(1, 8, 0.5, prox_mu=3.0), 1)
    _, g = model.loss_and_grads(start, X[:8][np.random.default_rng(1).permutation(8)], y[:8][np.random.default_rng(1).permutation(8)])
    for k in one:
        np.testing.assert_allclose(one[k], start[k] - 0.5 * g[k], atol=1e-6)
