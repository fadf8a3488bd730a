"""Data sets for simulations: scikit-learn's bundled digits, and FedProx Synthetic(α, β).

Nothing here downloads anything: digits ships inside scikit-learn, and
Synthetic is generated.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edge_agent.data import LocalData, split_holdout

from .partition import partition
from .synthetic import synthetic

DATASETS = ("digits", "synthetic")


@dataclass
class FederatedData:
    """Per-agent local data plus a central test set (for the aggregator's evaluation)."""

    agents: list[LocalData]
    X_test: np.ndarray
    y_test: np.ndarray
    n_features: int
    n_classes: int

    @property
    def X_train_pooled(self) -> np.ndarray:
        return np.concatenate([a.X_train for a in self.agents])

    @property
    def y_train_pooled(self) -> np.ndarray:
        return np.concatenate([a.y_train for a in self.agents])


@dataclass(frozen=True)
class DataSpec:
    """How to build a simulation's data: a few numbers, not arrays.

    ``fedmqtt sim --procs K`` sends this to each worker process, which builds
    the same :class:`FederatedData` and keeps only its own agents' part, so
    agent i gets the data it gets in one process. ``holdout`` applies to
    digits; Synthetic always keeps each device's 10% (as ``fedmqtt sim`` does).
    """

    agents: int
    dataset: str = "digits"
    partition: str = "dirichlet"
    alpha: float = 0.5
    beta: float = 0.5
    seed: int = 0
    holdout: float = 0.0

    def build(self) -> FederatedData:
        if self.dataset == "digits":
            return federated_digits(self.agents, self.partition, self.alpha, self.seed, self.holdout)
        if self.dataset == "synthetic":
            return federated_synthetic(self.agents, self.alpha, self.beta, self.seed)
        raise ValueError(f"unknown dataset {self.dataset!r} (expected one of {', '.join(DATASETS)})")


def load_digits_split(seed: int = 0, test_size: float = 0.2) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Digits scaled to [0, 1] (X/16), 80/20 stratified split with ``seed``."""
    from sklearn.datasets import load_digits  # the demo extra; only the simulator needs it
    from sklearn.model_selection import train_test_split

    d = load_digits()
    X = (d.data / 16.0).astype(np.float32)
    y = d.target.astype(np.int64)
    X_tr, X_te, y_tr, y_te = train_test_split(X, y, test_size=test_size, stratify=y, random_state=seed)
    return X_tr, y_tr, X_te, y_te


def federated_digits(
    n_agents: int, partition_kind: str = "dirichlet", alpha: float = 0.5, seed: int = 0, holdout: float = 0.0
) -> FederatedData:
    """Digits split across agents; the 20% test split stays central."""
    X_tr, y_tr, X_te, y_te = load_digits_split(seed)
    parts = partition(y_tr, n_agents, partition_kind, np.random.default_rng(seed), alpha)
    agents = [split_holdout(X_tr[idx], y_tr[idx], holdout, seed + k) for k, idx in enumerate(parts)]
    return FederatedData(agents, X_te, y_te, X_tr.shape[1], 10)


def federated_synthetic(
    n_agents: int = 30, alpha: float = 0.5, beta: float = 0.5, seed: int = 0, holdout: float = 0.1
) -> FederatedData:
    """Synthetic(α, β): each device keeps its own 90/10 split; the pooled 10% parts are the test set."""
    devices = synthetic(alpha, beta, n_devices=n_agents, seed=seed)
    agents, X_te, y_te = [], [], []
    for k, (X, y) in enumerate(devices):
        d = split_holdout(X, y, holdout, seed + k)
        agents.append(LocalData(d.X_train, d.y_train, d.X_holdout, d.y_holdout))
        X_te.append(d.X_holdout)
        y_te.append(d.y_holdout)
    return FederatedData(agents, np.concatenate(X_te), np.concatenate(y_te), devices[0][0].shape[1], 10)
