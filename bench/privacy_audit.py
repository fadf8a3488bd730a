"""Privacy audit: the ε fedmqtt reports next to dp-accounting's ε for the mechanism as it runs.

For each case the running code is measured (the measurements are the ones
tests/test_privacy_guarantees.py asserts on): how far one device moves the
released sum and the released count with the noise off, which noise
standard deviations the code draws, and in distributed mode how much of the
released noise a device did not add itself (real agents, real noise,
20,001 coordinates). dp-accounting then composes those measured Gaussian
mechanisms, Poisson-subsampled, over the rounds; fedmqtt's figure is what
its PrivacyEngine reports after charging the same rounds.

Cases: the reviewer's three adaptive-clipping cases of issue 10 (z = 1,
population 1000, 100 rounds, δ = 1e-5, expected 100, 40 and 20 per round)
and distributed mode with the default min_clients = 2 at q = 0.1, with 2
updates (the boundary) and 1 (the aggregator tops up the noise).

Run: .venv/bin/python bench/privacy_audit.py
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from aggregator.privacy import PrivacyEngine  # noqa: E402
from tests.test_privacy_guarantees import (  # noqa: E402
    ROUNDS, RecordingZeroNoise, config, measure_adaptive_mechanism, measure_protecting_noise, reference_epsilon,
    reported_epsilon,
)

POPULATION = 1000


def adaptive_case(expected: int) -> tuple[str, float, float, str]:
    noise = RecordingZeroNoise()
    engine = PrivacyEngine(config(adaptive_clip=True, expected_per_round=expected, population=POPULATION), noise=noise)
    m = measure_adaptive_mechanism(engine, noise)
    q = expected / POPULATION
    ref = reference_epsilon(q, [m["sum_std"] / m["sum_sensitivity"], m["count_std"] / m["count_sensitivity"]], ROUNDS)
    how = (f"sum std {m['sum_std']:.4f} / sensitivity {m['sum_sensitivity']:.3f}; "
           f"count std {m['count_std']:.3f} / sensitivity {m['count_sensitivity']:.3f}")
    return f"adaptive clipping, expected {expected}", reported_epsilon(engine, q, ROUNDS), ref, how


def distributed_case(min_clients: int, n: int) -> tuple[str, float, float, str]:
    engine = PrivacyEngine(config(mode="distributed", min_clients=min_clients, expected_per_round=100,
                                  population=POPULATION))
    measured = measure_protecting_noise(engine, n)
    clip = engine.clip
    ref = reference_epsilon(0.1, [measured / clip], ROUNDS)
    how = f"noise not its own protecting one device: std {measured:.4f} (clip {clip:g}), {n} updates"
    return f"distributed, min_clients {min_clients}, {n} updates", reported_epsilon(engine, 0.1, ROUNDS), ref, how


def main() -> None:
    logging.getLogger("absl").setLevel(logging.ERROR)  # dp-accounting's harmless order warnings
    rows = [adaptive_case(e) for e in (100, 40, 20)] + [distributed_case(2, 2), distributed_case(2, 1)]
    print(f"z = 1, {ROUNDS} rounds, delta 1e-05, population {POPULATION}, RDP")
    print(f"{'case':<40} {'fedmqtt reports':>16} {'dp-accounting':>14}   measured")
    for name, rep, ref, how in rows:
        print(f"{name:<40} {rep:>16.3f} {ref:>14.3f}   {how}")


if __name__ == "__main__":
    main()
