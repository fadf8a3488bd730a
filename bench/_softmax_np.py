"""Softmax regression in plain numpy, for the Flower clients of bench_flower.py.

The Flower side runs in its own virtualenv (flwr and numpy only), so it
cannot import fedmqtt. This file repeats, operation for operation, what
fedmqtt's agent computes (``edge_agent.models.BuiltinModel`` for kind
"softmax" and ``NumpyModel.fit``): float32 throughout, zero init, each epoch
a permutation drawn from ``default_rng(SeedSequence([agent_seed, round]))``
(``edge_agent.training.round_seed``), minibatches in that order, cross-entropy
gradient, ``w -= lr * g``. bench_flower.py checks in the project's
virtualenv that both give the same parameters bit for bit before it reports
anything.
"""

from __future__ import annotations

import numpy as np

DTYPE = np.float32


def init_params(n_features: int = 64, n_classes: int = 10) -> list[np.ndarray]:
    """[W0 float32[n_features, n_classes], b0 float32[n_classes]], zeros (fedmqtt's softmax init)."""
    return [np.zeros((n_features, n_classes), dtype=DTYPE), np.zeros(n_classes, dtype=DTYPE)]


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    np.exp(z, out=z)
    z /= z.sum(axis=1, keepdims=True)
    return z


def loss_and_grads(W: np.ndarray, b: np.ndarray, X: np.ndarray, y: np.ndarray):
    n = X.shape[0]
    p = _softmax(X @ W + b)
    picked = p[np.arange(n), y]
    loss = float(-np.log(np.maximum(picked, 1e-12)).mean())
    g = p
    g[np.arange(n), y] -= 1.0
    g /= n
    return loss, X.T @ g, g.sum(axis=0)


def fit(params: list[np.ndarray], X: np.ndarray, y: np.ndarray, epochs: int, batch_size: int, lr: float,
        agent_seed: int, round_number: int) -> tuple[list[np.ndarray], float]:
    """Local SGD from ``params``; returns (new params, mean batch loss of the last epoch)."""
    rng = np.random.default_rng(np.random.SeedSequence([agent_seed, round_number]))
    W = np.array(params[0], dtype=DTYPE, copy=True)
    b = np.array(params[1], dtype=DTYPE, copy=True)
    X = np.asarray(X, dtype=DTYPE)
    y = np.asarray(y, dtype=np.int64)
    step = DTYPE(lr)
    last: list[float] = []
    for _ in range(epochs):
        last = []
        order = rng.permutation(len(X))
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            loss, gW, gb = loss_and_grads(W, b, X[idx], y[idx])
            W -= step * gW
            b -= step * gb
            last.append(loss)
    return [W, b], (float(np.mean(last)) if last else 0.0)


def evaluate(params: list[np.ndarray], X: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """(loss, accuracy) on a data set."""
    W, b = params
    X = np.asarray(X, dtype=DTYPE)
    y = np.asarray(y, dtype=np.int64)
    p = _softmax(X @ W + b)
    loss = float(-np.log(np.maximum(p[np.arange(len(y)), y], 1e-12)).mean())
    return loss, float((p.argmax(axis=1) == y).mean())
