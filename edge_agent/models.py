"""The built-in numpy models: softmax regression, MLP (ReLU), linear regression.

They implement :class:`~edge_agent.model_api.NumpyModel` like any user's
model. Everything is float32 and vectorised: no Python loop over
parameters or samples. Parameters are plain ``dict[str, ndarray]`` in the
order of :meth:`ModelSpec.param_shapes`, which is also their wire order, so
a built-in model is nothing but its spec and its arrays.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np

from .model_api import CLASSIFICATION, DTYPE, REGRESSION, NumpyModel, Params
from .spec import ModelSpec

__all__ = ["BuiltinModel", "SoftmaxRegression", "MLP", "LinearRegression", "DTYPE", "Params", "copy_params",
           "subtract"]


class BuiltinModel(NumpyModel):
    """Forward pass, loss, gradients and metrics of one built-in :class:`ModelSpec` (softmax, mlp, linear)."""

    def __init__(self, spec: ModelSpec) -> None:
        if not spec.builtin:
            raise ValueError(f"{spec.kind!r} is not a built-in model kind")
        self._spec = spec
        self.kind, self.n_features, self.n_outputs = spec.kind, spec.n_features, spec.n_outputs
        self.hidden = spec.hidden
        self.n_layers = len(spec.layer_sizes()) - 1
        self.task = CLASSIFICATION if spec.kind in ("softmax", "mlp") else REGRESSION

    @property
    def spec(self) -> ModelSpec:
        return self._spec

    def parameter_shapes(self) -> dict[str, tuple[int, ...]]:
        return self._spec.param_shapes()

    @property
    def has_onnx(self) -> bool:
        return True  # the aggregator builds these graphs itself (aggregator/onnx_export.py)

    # -- parameters ---------------------------------------------------------

    def init_params(self, seed: int = 0) -> Params:
        """Seeded initial parameters.

        Softmax and linear regression start at zero (convex problems, and the
        usual reference setup for FedAvg on digits); an MLP needs symmetry
        broken, so its weights are He-normal from ``default_rng(seed)``.
        """
        rng = np.random.default_rng(seed)
        params: Params = {}
        for name, shape in self._spec.param_shapes().items():
            if name.startswith("W") and self.kind == "mlp":
                params[name] = (rng.standard_normal(shape) * np.sqrt(2.0 / shape[0])).astype(DTYPE)
            else:
                params[name] = np.zeros(shape, dtype=DTYPE)
        return params

    # -- forward --------------------------------------------------------------

    def _forward(self, params: Mapping[str, np.ndarray], X: np.ndarray) -> list[np.ndarray]:
        """Activations of every layer; the last entry is the output layer's pre-activation."""
        acts = [X]
        h = X
        for i in range(self.n_layers):
            z = h @ params[f"W{i}"] + params[f"b{i}"]
            if i < self.n_layers - 1:
                z = np.maximum(z, 0, out=z)
            acts.append(z)
            h = z
        return acts

    def predict_proba(self, params: Mapping[str, np.ndarray], X: np.ndarray) -> np.ndarray:
        """Class probabilities (classifiers only)."""
        return _softmax(self._forward(params, _as_input(X))[-1])

    def predict(self, params: Mapping[str, np.ndarray], X: np.ndarray) -> np.ndarray:
        """Labels for classifiers (int64), predictions for regression (float32, shape [n])."""
        out = self._forward(params, _as_input(X))[-1]
        if self.classifier:
            return out.argmax(axis=1).astype(np.int64)
        return out[:, 0]

    # -- training -------------------------------------------------------------

    def loss_and_grads(
        self, params: Mapping[str, np.ndarray], X: np.ndarray, y: np.ndarray
    ) -> tuple[float, Params]:
        """Mean loss over the batch and its gradient for every parameter.

        Cross-entropy for classifiers (``y`` integer labels), mean squared
        error for regression.
        """
        X = _as_input(X)
        n = X.shape[0]
        acts = self._forward(params, X)
        out = acts[-1]
        if self.classifier:
            p = _softmax(out)
            yi = np.asarray(y, dtype=np.int64)
            picked = p[np.arange(n), yi]
            loss = float(-np.log(np.maximum(picked, 1e-12)).mean())
            g = p
            g[np.arange(n), yi] -= 1.0
            g /= n
        else:
            err = out[:, 0] - np.asarray(y, dtype=DTYPE)
            loss = float(np.mean(err * err))
            g = (2.0 / n) * err[:, None].astype(DTYPE)
        grads: Params = {}
        for i in range(self.n_layers - 1, -1, -1):
            grads[f"W{i}"] = acts[i].T @ g
            grads[f"b{i}"] = g.sum(axis=0)
            if i > 0:
                g = g @ params[f"W{i}"].T
                g *= acts[i] > 0  # ReLU derivative
        return loss, {name: grads[name] for name in self._spec.param_shapes()}

    def evaluate(self, params: Mapping[str, np.ndarray], X: np.ndarray, y: np.ndarray) -> dict[str, float]:
        """Loss (and accuracy for classifiers) on a data set."""
        X = _as_input(X)
        if len(X) == 0:
            return {}
        out = self._forward(params, X)[-1]
        if self.classifier:
            p = _softmax(out)
            yi = np.asarray(y, dtype=np.int64)
            loss = float(-np.log(np.maximum(p[np.arange(len(yi)), yi], 1e-12)).mean())
            return {"loss": loss, "accuracy": float((p.argmax(axis=1) == yi).mean())}
        err = out[:, 0] - np.asarray(y, dtype=DTYPE)
        return {"loss": float(np.mean(err * err))}


class SoftmaxRegression(BuiltinModel):
    """Multinomial logistic regression: ``W0`` [n_features, n_classes], ``b0`` [n_classes]."""

    def __init__(self, n_features: int, n_outputs: int) -> None:
        super().__init__(ModelSpec("softmax", n_features, n_outputs))


class MLP(BuiltinModel):
    """A ReLU multi-layer perceptron classifier with the given hidden layer sizes."""

    def __init__(self, n_features: int, n_outputs: int, hidden: tuple[int, ...] | list[int] = (32,)) -> None:
        super().__init__(ModelSpec("mlp", n_features, n_outputs, tuple(hidden)))


class LinearRegression(BuiltinModel):
    """Least-squares linear regression: ``W0`` [n_features, 1], ``b0`` [1]."""

    def __init__(self, n_features: int, n_outputs: int = 1) -> None:
        super().__init__(ModelSpec("linear", n_features, n_outputs))


def _as_input(X: np.ndarray) -> np.ndarray:
    return np.asarray(X, dtype=DTYPE)


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    np.exp(z, out=z)
    z /= z.sum(axis=1, keepdims=True)
    return z


def copy_params(params: Mapping[str, np.ndarray]) -> Params:
    """A writable float32 copy (decoded wire arrays are read-only)."""
    return {k: np.array(v, dtype=DTYPE, copy=True) for k, v in params.items()}


def subtract(a: Mapping[str, np.ndarray], b: Mapping[str, np.ndarray]) -> Params:
    """``a - b`` per parameter (an update's delta is local minus global)."""
    return {k: np.subtract(a[k], b[k], dtype=DTYPE) for k in a}
