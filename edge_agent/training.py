"""Local training: seeded minibatch SGD on the device's own data."""

from __future__ import annotations

from typing import Mapping

import numpy as np

from .models import Model, Params, copy_params
from .wire import TrainConfig


def train_local(
    model: Model,
    params: Mapping[str, np.ndarray],
    X: np.ndarray,
    y: np.ndarray,
    config: TrainConfig,
    seed: int | np.random.SeedSequence,
) -> tuple[Params, dict[str, float]]:
    """Run ``config.epochs`` of minibatch SGD from ``params``; return new params and metrics.

    Each epoch visits every sample once in an order drawn from
    ``default_rng(seed)``, so the same seed gives the same model bit for bit.
    The input ``params`` are not modified. Metrics: ``train_loss`` (mean
    batch loss of the last epoch, without the proximal term).

    With ``config.prox_mu > 0`` this is FedProx's local solver: the
    objective gains mu/2 ||w - w_global||^2, i.e. every step adds
    mu (w - w_global) to the gradient, pulling the local model towards the
    global model it started from.
    """
    rng = np.random.default_rng(seed)
    w = copy_params(params)
    mu = np.float32(config.prox_mu)
    anchor = copy_params(params) if mu > 0 else None
    n = len(X)
    last_losses: list[float] = []
    for _ in range(config.epochs):
        order = rng.permutation(n)
        last_losses = []
        for start in range(0, n, config.batch_size):
            idx = order[start : start + config.batch_size]
            loss, grads = model.loss_and_grads(w, X[idx], y[idx])
            for name, g in grads.items():
                if anchor is not None:
                    g += mu * (w[name] - anchor[name])
                w[name] -= np.float32(config.lr) * g
            last_losses.append(loss)
    metrics = {"train_loss": float(np.mean(last_losses))} if last_losses else {}
    return w, metrics


def round_seed(seed: int, round_number: int) -> np.random.SeedSequence:
    """The seed of one agent's training in one round: independent streams per (seed, round)."""
    return np.random.SeedSequence([seed, round_number])
