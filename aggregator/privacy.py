"""Client-level DP-FedAvg: Poisson selection, clipping, noise, adaptive clipping, accounting, budget.

The guarantee (McMahan et al. 2018, "Learning Differentially Private
Recurrent Language Models"): every released global model is (ε, δ)-DP with
respect to adding or removing **one device's entire data**, under these
conditions, which this module makes true:

- each round selects every eligible device independently with probability
  q = expected_per_round / population (Poisson sampling, what the
  accountant assumes), and **every round that is drawn is charged**, whatever
  comes of it: an empty draw or a round short of its updates at the
  deadline still releases its noised result, and is never redrawn, because
  redrawing would condition on success and raise every device's real
  inclusion probability above the q that was charged;
- every update is clipped to L2 norm S, and updates count uniformly, so one
  device moves the sum by at most S;
- every device is protected by Gaussian noise of standard deviation at least
  z·S on the sum **that is not its own**: a device's own noise share does
  not protect it. ``central``: the aggregator adds z·S. ``local``: every
  device adds z·S to its own update. ``distributed`` (meant for secure
  aggregation): every device adds a share z·S/√(m−1), m = ``min_clients``,
  so with n ≥ m updates the other n−1 shares carry at least z·S. Whenever
  the others' noise falls short (fewer than m updates, or fewer than 2 in
  local mode) the aggregator adds the missing part before releasing, so the
  accounted z holds for every released round;
- the noised sum is divided by the *expected* number of devices, not the
  number that arrived (the fixed-denominator estimator), so the model
  depends on the updates only through the noised sum. This does **not**
  hide participation: the task lists the selected devices, the broker sees
  who sends updates, and under DP the ``metrics`` message publishes no count
  of participants, dropouts, attempts or rejections (README, "What it is not").

All DP noise comes from the OS's CSPRNG (:class:`edge_agent.dp.SecureRandom`);
the public selection has its own source.

The accountant (dp-accounting, RDP or PLD) composes one Poisson-subsampled
Gaussian mechanism per round drawn. Each new round is refused if it would
take ε above the budget.

Adaptive clipping (Andrew et al. 2021): every device contributes the
centred bit b − ½ (b = 1 when its update was within S), so one device moves
the count by at most ½; the count gets Gaussian noise σ_b (``count_stddev``)
and S ← S·exp(−η_C(b̄ − γ)) with b̄ = (Σ(b − ½) + noise)/expected + ½,
clamped to [0, 1]: if most updates are clipped, b̄ < γ and S grows. The sum
and the count are two Gaussian mechanisms on the same sample, together the
Gaussian mechanism with z = (z_Δ⁻² + (2σ_b)⁻²)^(−1/2) (Andrew et al.,
Theorem 1); to keep the accounted z the sum uses z_Δ = (z⁻² − (2σ_b)⁻²)^(−1/2).
"""

from __future__ import annotations

import logging
import math
from typing import Any, Mapping

import numpy as np

from edge_agent import dp

from .config import COUNT_STDDEV_DIVISOR, AggregatorConfig
from .strategies import Strategy

log = logging.getLogger(__name__)

Params = dict[str, np.ndarray]

# A device's noised centred bit (local/distributed modes) is accepted within
# ±(1/2 + this many of its noise std): an honest one is out of that range
# with probability < 1e-15, a hostile one cannot move the count by more.
BIT_BOUND_STDS = 8.0


def top_up_std(required_std: float, share_std: float, n: int) -> float:
    """Noise the aggregator adds so that each of ``n`` devices is protected by ``required_std``.

    A device is protected only by the noise it did not add itself: the other
    n−1 shares of ``share_std`` each, plus what the aggregator adds.
    """
    others = max(0, n - 1) * share_std ** 2
    return math.sqrt(max(0.0, required_std ** 2 - others))


class PrivacyEngine:
    """DP state of one federation: clip norm, noise multipliers, accountant.

    ``noise`` draws every DP noise sample and ``sampler`` the public Poisson
    selection; both default to :class:`edge_agent.dp.SecureRandom` (two
    separate uses of the OS CSPRNG). Tests pass seeded generators to measure
    the mechanism.
    """

    def __init__(self, config: AggregatorConfig, state: Mapping[str, Any] | None = None, *,
                 noise: dp.NoiseSource | None = None, sampler: dp.NoiseSource | None = None) -> None:
        from .accounting import PrivacyAccountant, adaptive_clip_noise_split, noise_for_epsilon

        self.cfg = config.privacy
        self.expected = self.cfg.expected_per_round or config.round.agents_per_round
        self.noise: dp.NoiseSource = noise or dp.SecureRandom()
        self.sampler: dp.NoiseSource = sampler or dp.SecureRandom()
        if state:
            self.noise_multiplier = float(state["noise_multiplier"])
            self.clip = float(state["clip"])
            self.accountant = PrivacyAccountant.from_events(state["events"], self.cfg.accountant, self.cfg.delta)
        else:
            z = self.cfg.noise_multiplier
            if self.cfg.target_epsilon:
                # config validation guarantees rounds > 0: the planning horizon
                z = noise_for_epsilon(self.cfg.target_epsilon, self.cfg.population, self.expected,
                                      config.rounds, self.cfg.delta, self.cfg.accountant)
                log.info("privacy: noise multiplier %.4f gives epsilon %.3f after %d rounds",
                         z, self.cfg.target_epsilon, config.rounds)
            self.noise_multiplier = z
            self.clip = self.cfg.clip
            self.accountant = PrivacyAccountant(self.cfg.accountant, self.cfg.delta)
        # A target epsilon is also a budget: the run stops before passing it.
        self.budget = self.cfg.budget or self.cfg.target_epsilon
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

        Drawn from its own CSPRNG source, not the federation's seed: a sample
        anyone can predict gives no amplification (the draw is journaled, so
        a restart still resumes the same round).
        """
        draws = np.asarray(self.sampler.random(len(candidates)))
        return [a for a, u in zip(candidates, draws) if u < q]

    def budget_problem(self, q: float) -> str:
        """Why the next round may not start (empty when it may)."""
        if not self.budget:
            return ""
        eps = self.accountant.epsilon_if(q, self.noise_multiplier)
        if eps > self.budget:
            return (f"privacy budget exhausted: one more round would spend epsilon {eps:.3f} "
                    f"> budget {self.budget:g} at delta {self.cfg.delta:g} "
                    f"(spent {self.accountant.epsilon():.3f} in {self.accountant.rounds} rounds)")
        return ""

    # -- who adds which noise -------------------------------------------------

    def _share_divisor(self) -> float:
        """Devices' noise share = full noise / this (0: devices add none)."""
        if self.cfg.mode == "local":
            return 1.0
        if self.cfg.mode == "distributed":
            return math.sqrt(self.cfg.min_clients - 1)
        return 0.0

    def sum_share_std(self) -> float:
        """Std of the noise each device adds to its update (0 in central mode)."""
        d = self._share_divisor()
        return self.sum_noise_multiplier * self.clip / d if d else 0.0

    def count_share_std(self) -> float:
        """Std of the noise each device adds to its centred bit (adaptive clipping, local/distributed)."""
        d = self._share_divisor()
        return self.count_stddev / d if d and self.cfg.adaptive_clip else 0.0

    def task_noise(self) -> tuple[float, float, float]:
        """(clip norm, noise std on the update, noise std on the centred bit) the devices apply."""
        return self.clip, self.sum_share_std(), self.count_share_std()

    def devices_trusted(self) -> bool:
        """Central mode: devices send their clean clipped update and raw bit to the aggregator."""
        return self.cfg.mode == "central"

    # -- accounting -----------------------------------------------------------

    def charge(self, q: float, released: bool = True) -> dict[str, float]:
        """Compose one round that was drawn; adopt its adaptive clip norm if it was released.

        Every drawn round is charged, released or not: what happens to a
        round depends on who was in it, so not charging the ones that failed
        would condition the accounted sampling on success.
        """
        if self.pending_clip is not None and released:
            self.clip = self.pending_clip
        self.pending_clip = None
        self.accountant.compose_round(q, self.noise_multiplier)
        eps = self.accountant.epsilon()
        log.info("privacy: epsilon %.4f at delta %g after %d rounds (q %.4f, z %.3f, clip %.4f)",
                 eps, self.cfg.delta, self.accountant.rounds, q, self.noise_multiplier, self.clip)
        out = {"epsilon": eps, "delta": self.cfg.delta, "noise_multiplier": self.noise_multiplier,
               "sampling_rate": q}
        if self.budget:
            out["epsilon_budget"] = self.budget  # a setting, not data: public, so a dashboard can draw it
        return out

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
        self.bits = 0.0  # sum of centred bits (noised by the devices in local/distributed modes)
        self.clipped = 0
        self.noised_fraction: float | None = None  # b̄ of the last result(), for logs and tests

    def begin(self, global_params: Mapping[str, np.ndarray]) -> None:
        self.engine.pending_clip = None  # a new clip norm from an abandoned round is never adopted
        self._sum = {k: np.zeros(v.shape, dtype=np.float64) for k, v in global_params.items()}
        self.count = 0
        self.bits = 0.0
        self.clipped = 0
        self.noised_fraction = None

    def add(self, delta: Mapping[str, np.ndarray], weight: float, metrics: Mapping[str, float] | None = None) -> None:
        e = self.engine
        metrics = metrics or {}
        if e.devices_trusted():
            # The devices clipped already; clipping again here bounds a device
            # that did not (in local/distributed modes the update carries the
            # device's noise, which clipping would cut, so it is left alone).
            delta, _, within = dp.clip(delta, e.clip)
            self.clipped += 0 if within else 1
            # The trusted aggregator centres the device's raw bit itself.
            bit = dp.centred_bit(bool(metrics.get("dp_unclipped", 0.0)))
        else:
            # Only the device's noised centred bit is used; a missing one
            # counts as neutral (0), an absurd one is bounded.
            bound = 0.5 + BIT_BOUND_STDS * e.count_share_std()
            bit = min(bound, max(-bound, float(metrics.get("dp_bit", 0.0))))
        for k, acc in self._sum.items():
            acc += delta[k]
        self.count += 1
        self.bits += bit

    def result(self, global_params: Mapping[str, np.ndarray]) -> Params:
        e = self.engine
        # Whatever noise the devices' shares leave missing for the worst-off
        # device (all of it in central mode) is added here.
        std = top_up_std(e.sum_noise_multiplier * e.clip, e.sum_share_std(), self.count)
        noised = {k: v + e.noise.normal(0.0, std, v.shape) for k, v in self._sum.items()} if std > 0 else self._sum
        # Fixed denominator: the expected number of devices, not the number that came.
        mean = {k: (v / e.expected).astype(np.float32) for k, v in noised.items()}
        self.inner.begin(global_params)
        self.inner.add(mean, 1.0, None)
        out = self.inner.result(global_params)
        if e.cfg.adaptive_clip:
            count_std = top_up_std(e.count_stddev, e.count_share_std(), self.count)
            noise = float(e.noise.normal(0.0, count_std)) if count_std > 0 else 0.0
            b = min(1.0, max(0.0, (self.bits + noise) / e.expected + 0.5))
            self.noised_fraction = b
            # Applied by charge(), i.e. only if this round's model is released:
            # a new S derived from an abandoned round is never published.
            e.pending_clip = float(e.clip * math.exp(-e.cfg.clip_lr * (b - e.cfg.target_quantile)))
            log.info("adaptive clipping: noised unclipped fraction %.3f of %d updates: clip %.4f -> %.4f",
                     b, self.count, e.clip, e.pending_clip)
        return out

    def full(self) -> bool:
        return self.inner.full()

    def state_dict(self) -> dict[str, Any]:
        return self.inner.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.inner.load_state_dict(state)
