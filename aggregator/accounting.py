"""Privacy accounting for DP federated averaging (issue 6), on Google's dp-accounting.

What the numbers mean, i.e. what the accountant assumes about a round:

* **Poisson sampling.** Each round, every device of the population takes part
  independently with probability ``q`` (``q = 1``: every device, every
  round). ``q`` is the probability that a device is *selected*, so it must
  include any over-selection: it is ``selected per round / population``, not
  the number of updates the round waits for. Selecting exactly K of N devices
  (fixed-size sampling without replacement) is a different mechanism whose
  analysis needs the REPLACE_ONE neighbouring relation (and gives other
  numbers); when DP is on this project selects devices by Poisson sampling so
  that the accounting below is the right one.
* **Device-level (user-level) adjacency.** Two federations are neighbours when
  one has an extra device with all of its data (dp-accounting's
  ADD_OR_REMOVE_ONE relation). ε bounds what the released models reveal about
  whether any one device took part at all, not just about one of its examples.
* **The Gaussian mechanism on the sum.** Every device's whole update is clipped
  to L2 norm ``S``, so adding or removing one device moves the sum of clipped
  updates by at most ``S`` (the sensitivity); the aggregator adds Gaussian
  noise of standard deviation ``z·S`` per coordinate to that sum, ``z`` being
  the *noise multiplier*. Dividing the noised sum by a fixed number (the
  expected ``q·N``) is post-processing and costs nothing; dividing by the
  actual number of updates is not, unless that count is itself noised (as in
  adaptive clipping, :func:`adaptive_clip_noise_split`).
* **Central DP.** The aggregator adds the noise: the guarantee covers every
  model it publishes (and anything computed from them), not the aggregator
  itself, which sees the clipped updates.

One round is then ``PoissonSampledDpEvent(q, GaussianDpEvent(z))`` and the
accountant composes the rounds: RDP (Mironov 2017; Mironov, Talwar & Zhang
2019) is fast and slightly pessimistic; PLD (privacy loss distributions,
Koskela et al. 2020; Doroshenko et al. 2022) is tighter and slower. For
q = 0.1, z = 1, 100 rounds and δ = 1e-5: ε ≈ 7.90 with RDP, ≈ 7.05 with PLD.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import logging
import math
from typing import Any, Iterator, Sequence

import dp_accounting as dpa
import numpy as np
from dp_accounting import pld, rdp

log = logging.getLogger(__name__)

#: Accountants :class:`PrivacyAccountant` accepts.
ACCOUNTANTS = ("rdp", "pld")

# Search bracket of noise_for_epsilon. Below 0.3 a single round with every
# device taking part already costs ε ≈ 20 at δ = 1e-5, and PLD's
# discretisation gets several times slower; a budget that loose is met by
# 0.3 too (with more noise than strictly needed, never less).
MIN_NOISE_MULTIPLIER = 0.3
# Past 100 the noise is 100x the clip norm on the sum: a federation that
# still misses its target there needs fewer rounds, a lower sampling rate or
# a larger budget, not more noise.
MAX_NOISE_MULTIPLIER = 100.0


@contextlib.contextmanager
def _quiet_absl() -> Iterator[None]:
    """Drop absl warnings below ERROR while dp-accounting computes.

    dp-accounting's RDP code logs "failed to converge ... Excluding this order"
    for the small orders (α ≈ 1.1-1.5) of a sampled Gaussian at moderate q;
    that is expected and harmless (the order is left out of the minimum over
    orders, which can only make ε larger, i.e. safe), but it floods the logs
    with dozens of lines per round. The level is process-wide, so absl
    warnings from other threads during the computation are dropped as well.
    """
    logger = logging.getLogger("absl")
    old = logger.level
    logger.setLevel(max(old, logging.ERROR))
    try:
        yield
    finally:
        logger.setLevel(old)


def _check_round(q: float, noise_multiplier: float) -> tuple[float, float]:
    q, z = float(q), float(noise_multiplier)
    if not 0.0 < q <= 1.0:
        raise ValueError(f"sampling rate q must be in (0, 1], got {q}")
    if not (z > 0.0 and math.isfinite(z)):
        raise ValueError(f"noise multiplier must be a finite number > 0, got {z}")
    return q, z


def _check_delta(delta: float) -> float:
    delta = float(delta)
    if not 0.0 < delta < 1.0:
        raise ValueError(f"delta must be in (0, 1), got {delta}")
    return delta


def _round_event(q: float, noise_multiplier: float) -> dpa.DpEvent:
    """One round: the Gaussian mechanism, Poisson-subsampled unless q = 1."""
    gaussian = dpa.GaussianDpEvent(noise_multiplier)
    return gaussian if q == 1.0 else dpa.PoissonSampledDpEvent(q, gaussian)


_RDP_ORDERS = np.asarray(rdp.RdpAccountant().orders)


@functools.lru_cache(maxsize=256)
def _single_round_rdp(q: float, noise_multiplier: float) -> np.ndarray:
    """RDP curve (at dp-accounting's default orders) of one round of (q, z), read from dp-accounting."""
    acc = rdp.RdpAccountant(_RDP_ORDERS)
    acc.compose(_round_event(q, noise_multiplier), 1)
    curve = acc.rdp
    curve.setflags(write=False)  # shared by every caller
    return curve


def _append_run(runs: list[list[Any]], q: float, z: float, count: int) -> None:
    """Append ``count`` rounds of (q, z) to ``runs``, merging with the last run."""
    if runs and runs[-1][0] == q and runs[-1][1] == z:
        runs[-1][2] += count
    else:
        runs.append([q, z, count])


class PrivacyAccountant:
    """The privacy spent so far by a DP federation, as ε at a fixed δ.

    The state is the history of composed rounds as runs ``[q, z, count]``
    (consecutive rounds with the same ``(q, z)`` merged), which
    :meth:`events` returns and :meth:`from_events` rebuilds from. ε is always
    computed from those runs in the same way — every finished run composed
    into a dp-accounting accountant with its count, then the current run — so
    composing round by round, composing all at once, and rebuilding from
    :meth:`events` give bit-identical ε. Composing a run with a count is also
    what keeps PLD affordable: 100 single PLD compositions take ~30 s, one
    composition of count 100 ~0.4 s.

    ``accountant``: ``"rdp"`` (``rdp.RdpAccountant()``, default orders) or
    ``"pld"`` (``pld.PLDAccountant()``); ``delta``: the δ ε is reported at.
    """

    def __init__(self, accountant: str = "rdp", delta: float = 1e-5) -> None:
        if accountant not in ACCOUNTANTS:
            raise ValueError(f"accountant must be one of {', '.join(ACCOUNTANTS)}, got {accountant!r}")
        self.accountant = accountant
        self.delta = _check_delta(delta)
        self._runs: list[list[Any]] = []
        # Every run but the last one, composed; ε copies it and adds the last.
        self._closed = self._new_accountant()
        self._closed_rdp = np.zeros(len(_RDP_ORDERS))  # RDP: the closed runs' curve
        self._n_closed = 0
        self._epsilon: float | None = None  # cached ε of the current runs

    def _new_accountant(self) -> dpa.PrivacyAccountant:
        return rdp.RdpAccountant() if self.accountant == "rdp" else pld.PLDAccountant()

    def _close_runs(self, upto: int) -> None:
        """Compose runs ``[_n_closed, upto)`` into the closed accountant."""
        with _quiet_absl():
            for q, z, count in self._runs[self._n_closed:upto]:
                if self.accountant == "rdp":
                    self._closed_rdp = self._closed_rdp + count * _single_round_rdp(q, z)
                else:
                    self._closed.compose(_round_event(q, z), count)
        self._n_closed = max(self._n_closed, upto)

    def _epsilon_with(self, tail: Sequence[Sequence[Any]]) -> float:
        """ε of the closed runs followed by ``tail`` (composed on a copy)."""
        if self._n_closed == 0 and not tail:
            return 0.0
        with _quiet_absl():
            if self.accountant == "rdp":
                # RDP composes by adding the per-order curves: exactly what
                # RdpAccountant.compose(event, count) does, with the curve of
                # one round computed once per (q, z) instead of every round.
                total = self._closed_rdp
                for q, z, count in tail:
                    total = total + count * _single_round_rdp(q, z)
                return float(rdp.compute_epsilon(_RDP_ORDERS, total, self.delta)[0])
            acc = copy.deepcopy(self._closed)
            for q, z, count in tail:
                acc.compose(_round_event(q, z), count)
            return float(acc.get_epsilon(self.delta))

    @property
    def rounds(self) -> int:
        """Number of rounds composed so far."""
        return sum(run[2] for run in self._runs)

    def compose_round(self, q: float, noise_multiplier: float) -> None:
        """Account for one round sampled with probability ``q`` and noised with ``z``.

        The event is ``PoissonSampledDpEvent(q, GaussianDpEvent(z))``, or
        ``GaussianDpEvent(z)`` when ``q = 1`` (every device takes part).
        Cheap when ``(q, z)`` is the same as last round; otherwise the
        finished run is composed now. The rest of the dp-accounting work
        happens when ε is next asked for.
        """
        q, z = _check_round(q, noise_multiplier)
        if self._runs and self._runs[-1][:2] != [q, z]:
            self._close_runs(len(self._runs))
        _append_run(self._runs, q, z, 1)
        self._epsilon = None

    def events(self) -> list[list[float]]:
        """The composed rounds as JSON-able runs ``[q, z, count]`` (a copy)."""
        return [list(run) for run in self._runs]

    @classmethod
    def from_events(
        cls, events: Sequence[Sequence[float]], accountant: str = "rdp", delta: float = 1e-5
    ) -> PrivacyAccountant:
        """Rebuild an accountant from :meth:`events` output (e.g. read back from JSON).

        Consecutive runs with the same ``(q, z)`` are merged, as
        :meth:`compose_round` would have done.
        """
        acc = cls(accountant, delta)
        for i, event in enumerate(events):
            if not isinstance(event, (list, tuple)) or len(event) != 3:
                raise ValueError(f"event {i}: expected [q, noise_multiplier, count], got {event!r}")
            try:
                q, z = _check_round(event[0], event[1])
            except (TypeError, ValueError) as exc:
                raise ValueError(f"event {i}: {exc}") from None
            count = event[2]
            if not isinstance(count, (int, float)) or isinstance(count, bool) or not float(count).is_integer() \
                    or count < 1:
                raise ValueError(f"event {i}: count must be an integer >= 1, got {count!r}")
            _append_run(acc._runs, q, z, int(count))
        acc._close_runs(len(acc._runs) - 1)
        return acc

    def epsilon(self) -> float:
        """ε at :attr:`delta` for every round composed so far (0.0 before the first).

        Cached until the next :meth:`compose_round`. Recomputing costs a copy
        of the finished runs' state plus one composition of the current run:
        ~50 ms with RDP; with PLD ~0.1-0.4 s for z between 2 and 1, ~2 s at z = 0.3.
        """
        if self._epsilon is None:
            self._epsilon = self._epsilon_with(self._runs[self._n_closed:])
        return self._epsilon

    def epsilon_if(self, q: float, noise_multiplier: float, rounds: int = 1) -> float:
        """ε after ``rounds`` more rounds of ``(q, z)``, without composing them.

        Exactly what :meth:`epsilon` would return after that many
        :meth:`compose_round` calls. Cost: a copy of the dp-accounting state
        plus one composition of the current run and one of the new rounds
        (milliseconds with RDP; with PLD up to about a second, more for small z).
        """
        q, z = _check_round(q, noise_multiplier)
        if isinstance(rounds, bool) or int(rounds) != rounds or rounds < 0:
            raise ValueError(f"rounds must be an integer >= 0, got {rounds!r}")
        if rounds == 0:
            return self.epsilon()
        tail = [list(run) for run in self._runs[self._n_closed:]]
        _append_run(tail, q, z, int(rounds))
        return self._epsilon_with(tail)

    def __repr__(self) -> str:
        return f"PrivacyAccountant({self.accountant!r}, delta={self.delta}, rounds={self.rounds})"


def sampling_rate(population: int, per_round: int) -> float:
    """q = per_round / population, checked (``per_round`` counts selected devices)."""
    if population < 1:
        raise ValueError(f"population must be >= 1, got {population}")
    if not 1 <= per_round <= population:
        raise ValueError(f"devices per round must be in 1..population ({population}), got {per_round}")
    return per_round / population


def epsilon_for(
    population: int,
    per_round: int,
    rounds: int,
    noise_multiplier: float,
    delta: float,
    accountant: str = "rdp",
) -> float:
    """ε after ``rounds`` rounds selecting ``per_round`` of ``population`` devices on average.

    Each round samples every device with probability q = per_round / population.
    """
    q = sampling_rate(population, per_round)
    return PrivacyAccountant(accountant, delta).epsilon_if(q, noise_multiplier, rounds)


def noise_for_epsilon(
    target_epsilon: float,
    population: int,
    per_round: int,
    rounds: int,
    delta: float,
    accountant: str = "rdp",
    tol: float = 1e-3,
) -> float:
    """The smallest noise multiplier z whose ε after ``rounds`` rounds is <= ``target_epsilon``.

    Bisection on z (geometric, since the bracket spans orders of magnitude)
    in [MIN_NOISE_MULTIPLIER, MAX_NOISE_MULTIPLIER], until the bracket is
    within a factor ``1 + tol``; the upper end, whose ε is known to meet the
    target, is returned. A target already met at MIN_NOISE_MULTIPLIER returns
    MIN_NOISE_MULTIPLIER. About 15 ε evaluations at the default ``tol``:
    under a second with RDP, a few seconds with PLD.

    Raises ValueError when even MAX_NOISE_MULTIPLIER misses the target.
    """
    target = float(target_epsilon)
    if not (target > 0.0 and math.isfinite(target)):
        raise ValueError(f"target epsilon must be a finite number > 0, got {target_epsilon}")
    if not 0.0 < tol < 1.0:
        raise ValueError(f"tol must be in (0, 1), got {tol}")
    q = sampling_rate(population, per_round)
    acc = PrivacyAccountant(accountant, delta)
    if isinstance(rounds, bool) or int(rounds) != rounds or rounds < 1:
        raise ValueError(f"rounds must be an integer >= 1, got {rounds!r}")

    def eps(z: float) -> float:
        return acc.epsilon_if(q, z, rounds)

    lo, hi = MIN_NOISE_MULTIPLIER, MAX_NOISE_MULTIPLIER
    eps_hi = eps(hi)
    if eps_hi > target:
        raise ValueError(
            f"epsilon {target:g} is out of reach for {rounds} rounds at q = {q:.4g}, delta = {delta:g}: "
            f"even noise multiplier {hi:g} gives epsilon {eps_hi:.4g}; "
            "run fewer rounds, select fewer devices per round or accept a larger epsilon"
        )
    while hi > lo * (1.0 + tol):
        mid = math.sqrt(lo * hi)
        if eps(mid) <= target:
            hi = mid
        else:
            lo = mid
    # The lower end is only evaluated when the search ends next to it: small
    # z are the slowest to account with PLD (~2 s at z = 0.3).
    if lo == MIN_NOISE_MULTIPLIER and eps(lo) <= target:
        return lo
    log.debug("noise multiplier %.6g for epsilon %g (%s, q=%.4g, %d rounds)", hi, target, accountant, q, rounds)
    return hi


def adaptive_clip_noise_split(noise_multiplier: float, count_stddev: float) -> float:
    """The noise multiplier z_Δ of the update sum when adaptive clipping spends part of z.

    Adaptive clipping (Andrew et al. 2021, "Differentially Private Learning
    with Adaptive Clipping") also releases, every round, a noised count of
    the updates that were not clipped: each device contributes a bit b ∈ {0, 1}
    (sensitivity 1/2 after centring) and the count gets Gaussian noise of
    standard deviation σ_b (``count_stddev``, on the count, not on the
    fraction). By their Theorem 1 the two releases together are the Gaussian
    mechanism with noise multiplier

        z = (z_Δ⁻² + (2σ_b)⁻²)^(-1/2),

    so to keep the accounted ``z`` the sum must use

        z_Δ = (z⁻² − (2σ_b)⁻²)^(-1/2)  >  z.

    Raises ValueError when (2σ_b)⁻² ≥ z⁻², i.e. 2σ_b ≤ z: the count noise
    alone would already spend the whole budget. (A common choice, from the
    paper, is σ_b = expected updates per round / 20.)
    """
    z, sigma_b = float(noise_multiplier), float(count_stddev)
    if not (z > 0.0 and math.isfinite(z)):
        raise ValueError(f"noise multiplier must be a finite number > 0, got {noise_multiplier}")
    if not (sigma_b > 0.0 and math.isfinite(sigma_b)):
        raise ValueError(f"count noise stddev must be a finite number > 0, got {count_stddev}")
    rest = z ** -2 - (2.0 * sigma_b) ** -2
    if rest <= 0.0:
        raise ValueError(
            f"count noise stddev {sigma_b:g} is too small to split noise multiplier {z:g}: "
            f"it must be more than z/2 = {z / 2:g} (larger still to leave noise for the sum)"
        )
    return rest ** -0.5
