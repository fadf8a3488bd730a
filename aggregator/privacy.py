"""Client-level DP-FedAvg: Poisson selection, clipping, noise, adaptive clipping, accounting, budget.

The guarantee (McMahan et al. 2018, "Learning Differentially Private
Recurrent Language Models"): every released global model is (ε, δ)-DP with
respect to adding or removing **one device's entire data**, under these
conditions, which this module makes true:

- each round selects every eligible device independently with probability
  q = expected_per_round / population (Poisson sampling, what the accountant
  assumes);
- every update is clipped to L2 norm S, and updates count uniformly, so one
  device moves the sum by at most S;
- Gaussian noise of standard deviation z·S is added to the sum: by the
  aggregator (``central``), by each device to its own update (``local``:
  z·S each, far more total noise), or by each device in shares of
  z·S/√min_clients that add up to at least z·S over min_clients devices
  (``distributed``, meant for secure aggregation);
- the noised sum is divided by the *expected* number of devices, not the
  number that arrived (the fixed-denominator estimator), so that the count
  of participants reveals nothing.

The accountant (dp-accounting, RDP or PLD) composes one Poisson-subsampled
Gaussian mechanism per *released* model. Abandoned rounds release nothing
and are not charged. Each new round is refused if it would take ε above the
budget.

Adaptive clipping (Andrew et al. 2021): devices report whether their update
was within S; the aggregator noises that count with σ_b and moves
S ← S·exp(−η_C(b̄ − γ)), where b̄ is the noised fraction *not* clipped: if
most updates are clipped, b̄ < γ and S grows. Part of the privacy budget
pays for the count: the sum then uses z_Δ = (z⁻² − (2σ_b)⁻²)^(−1/2).
"""

from __future__ import annotations

import logging
import math
from typing import Any, Mapping

import numpy as np

from edge_agent import dp

from .config import AggregatorConfig
from .strategies import Strategy

log = logging.getLogger(__name__)

Params = dict[str, np.ndarray]

# Andrew et al. 2021 suggest a count noise of σ_b = (expected devices) / 20.
COUNT_STDDEV_DIVISOR = 20.0


class PrivacyEngine:
    """DP state of one federation: clip norm, noise multipliers, accountant."""

    def __init__(self, config: AggregatorConfig, state: Mapping[str, Any] | None = None) -> None:
        from .accounting import PrivacyAccountant, adaptive_clip_noise_split, noise_for_epsilon

        self.cfg = config.privacy
        self.expected = self.cfg.expected_per_round or config.round.agents_per_round
        self.noise_rng = np.random.default_rng()  # OS entropy, never checkpointed: noise must be unpredictable
        if state:
            self.noise_multiplier = float(state["noise_multiplier"])
            self.clip = float(state["clip"])
            self.accountant = PrivacyAccountant.from_events(state["events"], self.cfg.accountant, self.cfg.delta)
        else:
            z = self.cfg.noise_multiplier
            if self.cfg.target_epsilon:
                z = noise_for_epsilon(self.cfg.target_epsilon, self.cfg.population, self.expected,
                                      config.rounds or 1, self.cfg.delta, self.cfg.accountant)
                log.info("privacy: noise multiplier %.4f gives epsilon %.3f after %d rounds",
                         z, self.cfg.target_epsilon, config.rounds)
            self.noise_multiplier = z
            self.clip = self.cfg.clip
            self.accountant = PrivacyAccountant(self.cfg.accountant, self.cfg.delta)
        self.pending_clip: float | None = None
        self.count_stddev = self.cfg.count_stddev or self.expected / COUNT_STDDEV_DIVISOR
        # With adaptive clipping the count query takes part of the budget (Andrew et al., Thm 1).
        self.sum_noise_multiplier = (
            adaptive_clip_noise_split(self.noise_multiplier, self.count_stddev) if self.cfg.adaptive_clip
            else self.noise_multiplier
        )

    # -- selection and budget -------------------------------------------------

    def sampling_rate(self, known_agents: int) -> float:
        """q for this round: expected devices over the population (configured, or all agents seen)."""
        population = self.cfg.population or max(known_agents, self.expected)
        return min(1.0, self.expected / population)

    def select(self, candidates: list[str], q: float) -> list[str]:
        """Poisson sampling: every candidate independently with probability q.

        Drawn from OS entropy, not the federation's seed: a sample anyone can
        predict gives no amplification (the draw is journaled, so a restart
        still resumes the same round).
        """
        draws = self.noise_rng.random(len(candidates))
        return [a for a, u in zip(candidates, draws) if u < q]

    def min_updates(self) -> int:
        """Updates a round needs before anything may be released (distributed mode: min_clients)."""
        return self.cfg.min_clients if self.cfg.mode == "distributed" else 1

    def budget_problem(self, q: float) -> str:
        """Why the next round may not start (empty when it may)."""
        if not self.cfg.budget:
            return ""
        eps = self.accountant.epsilon_if(q, self.noise_multiplier)
        if eps > self.cfg.budget:
            return (f"privacy budget exhausted: one more round would spend epsilon {eps:.3f} "
                    f"> budget {self.cfg.budget:g} at delta {self.cfg.delta:g} "
                    f"(spent {self.accountant.epsilon():.3f} in {self.accountant.rounds} rounds)")
        return ""

    def task_noise(self) -> tuple[float, float]:
        """(clip norm, noise std) the devices apply, by mode."""
        s = self.clip
        if self.cfg.mode == "local":
            return s, self.sum_noise_multiplier * s
        if self.cfg.mode == "distributed":
            return s, self.sum_noise_multiplier * s / math.sqrt(self.cfg.min_clients)
        return s, 0.0

    def charge(self, q: float) -> dict[str, float]:
        """Compose one released round (and adopt its adaptive clip norm); the figures for the metrics message."""
        if self.pending_clip is not None:
            self.clip, self.pending_clip = self.pending_clip, None
        self.accountant.compose_round(q, self.noise_multiplier)
        eps = self.accountant.epsilon()
        log.info("privacy: epsilon %.4f at delta %g after %d rounds (q %.4f, z %.3f, clip %.4f)",
                 eps, self.cfg.delta, self.accountant.rounds, q, self.noise_multiplier, self.clip)
        return {"epsilon": eps, "delta": self.cfg.delta, "noise_multiplier": self.noise_multiplier,
                "sampling_rate": q}

    def state(self) -> dict[str, Any]:
        return {"events": self.accountant.events(), "clip": self.clip, "noise_multiplier": self.noise_multiplier,
                "epsilon": self.accountant.epsilon()}

    def wrap(self, inner: Strategy) -> "DPAggregate":
        return DPAggregate(self, inner)


class DPAggregate(Strategy):
    """Uniformly weighted, clipped, noised mean of the round's updates, handed to any rule as one update.

    Post-processing keeps the guarantee, so the inner rule may be FedAvg,
    FedAvgM or an adaptive optimizer (DP-FedAdam).
    """

    streaming = True

    def __init__(self, engine: PrivacyEngine, inner: Strategy) -> None:
        self.engine = engine
        self.inner = inner
        self.name = f"dp-{inner.name}"
        self._sum: Params = {}
        self.count = 0
        self.unclipped = 0.0
        self.clipped = 0

    def begin(self, global_params: Mapping[str, np.ndarray]) -> None:
        self.engine.pending_clip = None  # a new clip norm from an abandoned round is never adopted
        self._sum = {k: np.zeros(v.shape, dtype=np.float64) for k, v in global_params.items()}
        self.count = 0
        self.unclipped = 0.0
        self.clipped = 0

    def add(self, delta: Mapping[str, np.ndarray], weight: float, metrics: Mapping[str, float] | None = None) -> None:
        if self.engine.cfg.mode == "central":
            # The devices clipped already; clipping again here bounds a device
            # that did not (in local/distributed modes the update carries the
            # device's noise, which clipping would cut, so it is left alone).
            delta, _, within = dp.clip(delta, self.engine.clip)
            self.clipped += 0 if within else 1
        for k, acc in self._sum.items():
            acc += delta[k]
        self.count += 1
        # The device's own bit: was its update within the clip norm before clipping?
        self.unclipped += float(bool((metrics or {}).get("dp_unclipped", 0.0)))

    def result(self, global_params: Mapping[str, np.ndarray]) -> Params:
        e = self.engine
        noised = self._sum
        if e.cfg.mode == "central":
            std = e.sum_noise_multiplier * e.clip
            noised = {k: v + e.noise_rng.normal(0.0, std, v.shape) for k, v in self._sum.items()}
        # Fixed denominator: the expected number of devices, not the number that came.
        mean = {k: (v / e.expected).astype(np.float32) for k, v in noised.items()}
        self.inner.begin(global_params)
        self.inner.add(mean, 1.0, None)
        out = self.inner.result(global_params)
        if e.cfg.adaptive_clip:
            b = (self.unclipped + e.noise_rng.normal(0.0, e.count_stddev)) / e.expected
            # Applied by charge(), i.e. only if this round's model is released:
            # a new S derived from an abandoned round would leak unaccounted.
            e.pending_clip = float(e.clip * math.exp(-e.cfg.clip_lr * (b - e.cfg.target_quantile)))
            log.info("adaptive clipping: %.0f of %d unclipped (noised fraction %.3f): clip %.4f -> %.4f",
                     self.unclipped, self.count, b, e.clip, e.pending_clip)
        return out

    def full(self) -> bool:
        return self.inner.full()

    def state_dict(self) -> dict[str, Any]:
        return self.inner.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.inner.load_state_dict(state)
