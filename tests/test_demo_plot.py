"""The demo's plot says what was run: the rule, async mode, DP with its epsilon, secure aggregation."""

from __future__ import annotations

from aggregator.config import AggregatorConfig
from aggregator.demo import STRATEGY_NAMES, run_label
from aggregator.strategies import STRATEGIES


def test_every_rule_has_a_legend_name():
    assert set(STRATEGY_NAMES) == set(STRATEGIES)


def test_the_legend_names_the_mode():
    c = AggregatorConfig()
    assert run_label(c, {}) == "federated (FedAvg)"
    c.strategy.name, c.round.mode = "median", "async"
    c.privacy.mode, c.privacy.noise_multiplier = "central", 1.0
    assert run_label(c, {"epsilon": 7.904}) == "federated (median, async, FedBuff, central DP z=1, ε=7.90)"
    c.secagg.mode = "secagg+"
    assert run_label(c, {}).endswith("central DP z=1, secagg+)")
