"""A short run of experiment 3 (bench/experiments/exp3_poisoning.py) as a test.

Digits, softmax, 10 agents, IID, 10 rounds; 2 of the 10 agents (20%) send
-10·Δ instead of their delta Δ (sign flip and 10x scaling at once: alone,
either one barely moves FedAvg on this convex problem, see docs/results.md).
Median and Multi-Krum (f = 2) must end within 5 points of their clean run,
FedAvg must lose more than 10 points. Everything runs in-process through the
real Coordinator and AgentCores (bench/experiments/harness.py), no broker.
"""

from __future__ import annotations

import time

import pytest

pytest.importorskip("sklearn")

from aggregator.strategies import STRATEGIES  # noqa: E402

pytestmark = pytest.mark.skipif(
    not {"median", "multi_krum"} <= set(STRATEGIES), reason="robust rules not in aggregator.strategies yet"
)

ROUNDS = 10


def final_accuracy(rule: str, attack: str) -> float:
    from bench.experiments.exp3_poisoning import Setup, run_one

    res, info = run_one(Setup(agents=10, partition="iid", rounds=ROUNDS), rule, attack)
    assert len(res.rounds) == ROUNDS and res.abandoned == 0
    assert all(r.participants == 10 for r in res.rounds)
    if attack != "clean":
        assert len(info["attackers"].split()) == 2
    return res.rounds[-1].test_accuracy


def test_robust_rules_resist_20_percent_poisoning_that_breaks_fedavg():
    t0 = time.monotonic()
    acc = {(rule, attack): final_accuracy(rule, attack)
           for rule in ("fedavg", "median", "multi_krum") for attack in ("clean", "flip_scale")}
    elapsed = time.monotonic() - t0
    # the clean federation learns (FedAvg reaches 0.91 after 10 rounds here)
    assert acc[("fedavg", "clean")] > 0.85, acc
    for rule in ("median", "multi_krum"):
        drop = acc[(rule, "clean")] - acc[(rule, "flip_scale")]
        assert drop < 0.05, f"{rule} lost {100 * drop:.1f} points under attack: {acc}"
    fedavg_drop = acc[("fedavg", "clean")] - acc[("fedavg", "flip_scale")]
    assert fedavg_drop > 0.10, f"FedAvg lost only {100 * fedavg_drop:.1f} points: {acc}"
    assert elapsed < 20.0, f"took {elapsed:.1f} s"
