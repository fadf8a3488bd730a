"""Aggregation strategies: one small class per rule behind one interface.

A strategy sees each accepted update once (:meth:`Strategy.add`) and at the
end of the round turns what it accumulated into the next global model
(:meth:`Strategy.result`). Streaming strategies keep O(model) memory: a
running float64 weighted sum, never the individual updates.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any, Mapping

import numpy as np

if TYPE_CHECKING:
    from .config import StrategyConfig

Params = dict[str, np.ndarray]


class Strategy(ABC):
    """Interface every aggregation rule implements."""

    #: True when updates are folded into O(model) state as they arrive.
    streaming: bool = True
    name: str = ""

    @abstractmethod
    def begin(self, global_params: Mapping[str, np.ndarray]) -> None:
        """Start a round on top of ``global_params`` (drops anything accumulated)."""

    @abstractmethod
    def add(self, delta: Mapping[str, np.ndarray], weight: float, metrics: Mapping[str, float] | None = None) -> None:
        """Fold one accepted update (``local - global``) into the round.

        ``weight`` is the update's sample count (times a staleness factor in
        asynchronous mode); rules that average uniformly ignore it.
        ``metrics`` are the agent's reported metrics (rules may ignore them).
        """

    @abstractmethod
    def result(self, global_params: Mapping[str, np.ndarray]) -> Params:
        """The next global model (float32) from what was added this round."""

    def full(self) -> bool:
        """True when the rule cannot take another update this round.

        Streaming rules never fill up. Rules that keep every update (median,
        Krum, ...) have a configured cap, and the coordinator rejects updates
        beyond it (reason ``round_full``) instead of growing without bound.
        """
        return False

    def state_dict(self) -> dict[str, Any]:
        """Strategy state that must survive a restart: a flat dict of numpy
        arrays and JSON scalars (none for plain FedAvg). Checkpoints store the
        arrays in the npz and the scalars in JSON."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output."""


class FedAvg(Strategy):
    """Federated averaging (McMahan et al. 2017).

    ``weighted=True``: θ ← θ + Σ n_k Δ_k / Σ n_k (weights = sample counts).
    ``weighted=False``: the plain mean of the updates.
    The sum is kept in float64 so that the order in which updates arrive
    changes the result by rounding in the 16th digit, not the 7th.
    """

    name = "fedavg"

    def __init__(self, weighted: bool = True) -> None:
        self.weighted = weighted
        self._sum: Params = {}
        self._scratch: Params = {}
        self._total = 0.0
        self.count = 0

    def begin(self, global_params: Mapping[str, np.ndarray]) -> None:
        if set(self._sum) != set(global_params) or any(
            self._sum[k].shape != v.shape for k, v in global_params.items()
        ):
            self._sum = {k: np.zeros(v.shape, dtype=np.float64) for k, v in global_params.items()}
            self._scratch = {k: np.empty(v.shape, dtype=np.float64) for k, v in global_params.items()}
        else:
            for a in self._sum.values():
                a.fill(0.0)
        self._total = 0.0
        self.count = 0

    def add(self, delta: Mapping[str, np.ndarray], weight: float, metrics: Mapping[str, float] | None = None) -> None:
        w = float(weight) if self.weighted else 1.0
        for k, acc in self._sum.items():
            # Widen into a preallocated float64 buffer, scale, add: no
            # allocation per update whatever the model size, and the product
            # is formed in float64 (multiplying the float32 delta directly
            # would round, or overflow, in float32). copyto + in-place ops
            # run at the speed of a plain numpy.add (bench/bench_ingest.py).
            scratch = self._scratch[k]
            np.copyto(scratch, delta[k])
            scratch *= w
            acc += scratch
        self._total += w
        self.count += 1

    def result(self, global_params: Mapping[str, np.ndarray]) -> Params:
        if self.count == 0:
            raise ValueError("no updates to aggregate")
        # Overflow to inf is possible with hostile input; the coordinator
        # checks the result and refuses to publish it, so no warning here.
        with np.errstate(over="ignore"):
            return {
                k: (global_params[k].astype(np.float64) + self._sum[k] / self._total).astype(np.float32)
                for k in global_params
            }


STRATEGIES = ("fedavg", "fedavg_unweighted")


def make_strategy(config: "StrategyConfig") -> Strategy:
    """Build the strategy a ``[strategy]`` config section names."""
    if config.name == "fedavg":
        return FedAvg(weighted=True)
    if config.name == "fedavg_unweighted":
        return FedAvg(weighted=False)
    raise ValueError(f"unknown strategy {config.name!r} (known: {', '.join(STRATEGIES)})")
