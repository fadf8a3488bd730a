"""The model interface: what any model federated by fedmqtt implements.

A model is a set of named float32 parameter arrays plus the code that
trains and uses them. fedmqtt never looks inside: it sends the arrays
(msgpack, docs/PROTOCOL.md), averages their deltas, and asks the model to
initialise, train, evaluate and predict. So a numpy model, a PyTorch
module (:mod:`edge_agent.torch_model`) or anything else speaks the same
bytes on the wire, and a device that uses the built-in numpy models needs
nothing but numpy.

Write a model by subclassing :class:`FedModel` (any framework: implement
``fit`` yourself) or :class:`NumpyModel` (implement ``loss_and_grads`` and
``predict``; minibatch SGD, FedProx and evaluation come with it). Name it
in the agent's and the aggregator's config as
``kind = "package.module:ClassName"`` (or register it under the
``fedmqtt.models`` entry point group); see :func:`edge_agent.model_loader.load_model`.

Input rows are always ``X``: float32 ``[n, n_features]``; ``y`` holds class
indices in ``[0, n_outputs)`` for classifiers and float targets for
regression.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Mapping

import numpy as np

from .data import DataError, checked
from .spec import ModelSpec
from .wire import TrainConfig

Params = dict[str, np.ndarray]
DTYPE = np.float32

# A classifier's labels must fit the int64 class index the built-in losses use.
CLASSIFICATION, REGRESSION = "classification", "regression"


class ModelError(ValueError):
    """A model or its data that cannot be used; ``reason`` is a short code for counters and the status."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass
class TrainData:
    """The local training data one ``fit`` call sees.

    ``X``/``y`` are the arrays (absent when the data comes only as batches);
    ``batches(seed)`` yields ``(X, y)`` minibatches for one epoch when the
    device's data is a stream (a user-supplied iterator factory);
    ``num_samples`` is the count FedAvg weighs by.
    """

    X: np.ndarray | None
    y: np.ndarray | None
    num_samples: int
    batches: Callable[[int], Iterable[tuple[np.ndarray, np.ndarray]]] | None = None
    source: Any = None  # whatever the user passed in (a DataLoader, a path): for frameworks' own loops

    def epoch(self, rng: np.random.Generator, batch_size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """One epoch of minibatches: shuffled arrays, or the user's batches for this epoch."""
        if self.X is not None and self.y is not None:
            order = rng.permutation(len(self.X))
            for start in range(0, len(order), batch_size):
                idx = order[start:start + batch_size]
                yield self.X[idx], self.y[idx]
        elif self.batches is not None:
            yield from self.batches(int(rng.integers(0, 2 ** 63 - 1)))
        else:
            raise ModelError("bad_data", "no training data: neither arrays nor batches")


class FedModel(ABC):
    """One model architecture; its parameters live outside it, as a dict of named float32 arrays.

    Subclasses set ``kind`` (how configs and the wire name it),
    ``n_features``, ``n_outputs`` and ``task`` (``"classification"`` or
    ``"regression"``), and implement the abstract methods. Methods take the
    parameters as an argument and never keep them: the same object trains
    on every round's global model.
    """

    kind: str = ""
    n_features: int = 0
    n_outputs: int = 0
    task: str = CLASSIFICATION

    @property
    def classifier(self) -> bool:
        return self.task == CLASSIFICATION

    @abstractmethod
    def parameter_shapes(self) -> dict[str, tuple[int, ...]]:
        """Parameter names and shapes, in wire order (the order never changes)."""

    @abstractmethod
    def init_params(self, seed: int = 0) -> Params:
        """The initial parameters (seeded: the same seed gives the same arrays)."""

    @abstractmethod
    def fit(self, params: Mapping[str, np.ndarray], data: TrainData, config: TrainConfig,
            seed: int | np.random.SeedSequence) -> tuple[Params, dict[str, float]]:
        """Train locally from ``params`` with the round's ``config`` (epochs, batch size, lr, prox_mu).

        Returns the new parameters (same names and shapes, float32) and
        metrics whose names start with ``train_`` (e.g. ``train_loss``).
        Must not modify ``params``.
        """

    @abstractmethod
    def evaluate(self, params: Mapping[str, np.ndarray], X: np.ndarray, y: np.ndarray) -> dict[str, float]:
        """``loss`` (and ``accuracy`` for classifiers) on a data set; {} for an empty one."""

    @abstractmethod
    def predict(self, params: Mapping[str, np.ndarray], X: np.ndarray) -> np.ndarray:
        """Class indices (int64) for classifiers, predictions (float32, shape [n]) for regression."""

    def predict_proba(self, params: Mapping[str, np.ndarray], X: np.ndarray) -> np.ndarray:
        """Class probabilities [n, n_outputs] (classifiers); not every model has them."""
        raise NotImplementedError(f"{type(self).__name__} gives no probabilities")

    def to_onnx(self, params: Mapping[str, np.ndarray]) -> bytes | None:
        """The model with these parameters as a serialized ONNX graph, or None if it has none.

        Called on the aggregator only (which has ``onnx``); the graph takes
        ``X`` float32 [n, n_features] like every fedmqtt model.
        """
        return None

    @property
    def has_onnx(self) -> bool:
        """Whether :meth:`to_onnx` is implemented (the aggregator exports ONNX only then)."""
        return type(self).to_onnx is not FedModel.to_onnx

    # -- derived ------------------------------------------------------------------

    @property
    def spec(self) -> ModelSpec:
        """What the wire says about this model (docs/PROTOCOL.md §2.5)."""
        return ModelSpec.of(self.kind, self.n_features, self.n_outputs, getattr(self, "hidden", ()),
                            self.parameter_shapes())

    def num_params(self) -> int:
        return sum(math.prod(s) for s in self.parameter_shapes().values())

    def check_data(self, X: np.ndarray, y: np.ndarray, where: str = "local data") -> None:
        """Raise ModelError("bad_data") unless ``X``/``y`` fit this model (features, labels, finite values)."""
        check_data(self, X, y, where)

    def check_params(self, params: Mapping[str, np.ndarray], where: str) -> Params:
        """The parameters as float32 arrays, or ModelError("bad_params") naming what a plugin got wrong."""
        shapes = self.parameter_shapes()
        if not isinstance(params, Mapping):
            raise ModelError("bad_params", f"{where}: returned {type(params).__name__}, not a dict of arrays")
        missing, extra = set(shapes) - set(params), set(params) - set(shapes)
        if missing or extra:
            raise ModelError("bad_params", f"{where}: missing {sorted(missing)}, unexpected {sorted(extra)}")
        out: Params = {}
        for name, shape in shapes.items():
            try:
                a = np.asarray(params[name], dtype=DTYPE)
            except (TypeError, ValueError) as exc:
                raise ModelError("bad_params", f"{where}: {name} is not numeric ({exc})") from None
            if a.shape != tuple(shape):
                raise ModelError("bad_params", f"{where}: {name} has shape {a.shape}, expected {tuple(shape)}")
            if not np.isfinite(a).all():
                raise ModelError("bad_params", f"{where}: {name} holds NaN or Inf")
            out[name] = a
        return out


def check_data(model: FedModel, X: Any, y: Any, where: str = "local data") -> None:
    """Raise ModelError with one clear message unless the data fits the model.

    The checks every local data set passes (:func:`edge_agent.data.checked`:
    shapes, numbers, NaN/Inf) give ``bad_data``; then the model's own: its
    feature count (``incompatible_model``) and, for classifiers, integer
    labels in its class range (``bad_data``).
    """
    try:
        X, y = checked(np.asarray(X), np.asarray(y), where, allow_empty=True)
    except DataError as exc:
        raise ModelError("bad_data", str(exc)) from None
    if X.shape[1] != model.n_features:
        raise ModelError("incompatible_model", f"{where}: {X.shape[1]} features per row, the model takes "
                                               f"{model.n_features}")
    if model.classifier and len(y):
        if not np.all(y == np.round(y)):
            raise ModelError("bad_data", f"{where}: labels must be class indices (integers), got fractions")
        low, high = int(y.min()), int(y.max())
        if low < 0 or high >= model.n_outputs:
            raise ModelError("bad_data", f"{where}: labels range over {low}..{high}, the model has classes "
                                         f"0..{model.n_outputs - 1}")


class NumpyModel(FedModel):
    """A model defined by its loss gradient: minibatch SGD, FedProx and evaluation come with it.

    Implement :meth:`loss_and_grads` and :meth:`predict` (and
    ``parameter_shapes``/``init_params``). ``fit`` runs ``config.epochs``
    epochs of minibatch SGD in an order drawn from the seed (so the same
    seed gives the same model bit for bit); with ``config.prox_mu > 0`` it
    is FedProx's local solver (the gradient gains mu (w - w_global)).
    """

    @abstractmethod
    def loss_and_grads(self, params: Mapping[str, np.ndarray], X: np.ndarray,
                       y: np.ndarray) -> tuple[float, Params]:
        """Mean loss over the batch and its gradient for every parameter."""

    def fit(self, params: Mapping[str, np.ndarray], data: TrainData, config: TrainConfig,
            seed: int | np.random.SeedSequence) -> tuple[Params, dict[str, float]]:
        rng = np.random.default_rng(seed)
        w = {k: np.array(v, dtype=DTYPE, copy=True) for k, v in params.items()}
        mu = DTYPE(config.prox_mu)
        anchor = {k: np.array(v, dtype=DTYPE, copy=True) for k, v in params.items()} if mu > 0 else None
        lr = DTYPE(config.lr)
        last: list[float] = []
        for _ in range(config.epochs):
            last = []
            for Xb, yb in data.epoch(rng, config.batch_size):
                loss, grads = self.loss_and_grads(w, Xb, yb)
                for name, g in grads.items():
                    if anchor is not None:
                        g = g + mu * (w[name] - anchor[name])
                    w[name] -= lr * g
                last.append(loss)
        return w, ({"train_loss": float(np.mean(last))} if last else {})

    def evaluate(self, params: Mapping[str, np.ndarray], X: np.ndarray, y: np.ndarray) -> dict[str, float]:
        X = np.asarray(X, dtype=DTYPE)
        if len(X) == 0:
            return {}
        loss, _ = self.loss_and_grads(params, X, y)
        out = {"loss": float(loss)}
        if self.classifier:
            out["accuracy"] = float((self.predict(params, X) == np.asarray(y, dtype=np.int64)).mean())
        return out
