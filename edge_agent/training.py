"""Local training of the built-in models on arrays: seeded minibatch SGD (what NumpyModel.fit does)."""

from __future__ import annotations

from typing import Mapping

import numpy as np

from .model_api import NumpyModel, Params, TrainData
from .wire import TrainConfig


def train_local(
    model: NumpyModel,
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
    batch loss of the last epoch, without the proximal term). With
    ``config.prox_mu > 0`` this is FedProx's local solver.
    """
    return model.fit(params, TrainData(X, y, len(X)), config, seed)


def round_seed(seed: int, round_number: int) -> np.random.SeedSequence:
    """The seed of one agent's training in one round: independent streams per (seed, round)."""
    return np.random.SeedSequence([seed, round_number])
