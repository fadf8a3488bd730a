"""Privacy accounting (issue 6): ε against dp-accounting, the event history, noise search, adaptive split, CLI."""

from __future__ import annotations

import json
import logging
import math
import re

import dp_accounting as dpa
import pytest
from dp_accounting import pld, rdp

from aggregator.accounting import (
    MAX_NOISE_MULTIPLIER,
    MIN_NOISE_MULTIPLIER,
    PrivacyAccountant,
    adaptive_clip_noise_split,
    epsilon_for,
    noise_for_epsilon,
)
from aggregator.privacy_cli import privacy_main, table_rounds


@pytest.fixture(autouse=True)
def _quiet_absl():
    """The direct dp-accounting calls below log absl convergence warnings; keep them out of the report."""
    logger = logging.getLogger("absl")
    old = logger.level
    logger.setLevel(logging.ERROR)
    yield
    logger.setLevel(old)


def direct_epsilon(kind: str, q: float, z: float, rounds: int, delta: float) -> float:
    """ε straight from dp-accounting, as its documentation shows it."""
    acc = rdp.RdpAccountant() if kind == "rdp" else pld.PLDAccountant()
    event = dpa.GaussianDpEvent(z) if q == 1 else dpa.PoissonSampledDpEvent(q, dpa.GaussianDpEvent(z))
    acc.compose(event, rounds)
    return acc.get_epsilon(delta)


# ---------------------------------------------------------------------------
# ε against dp-accounting


def test_example_from_the_notes():
    """q = 0.1, z = 1, 100 rounds, δ = 1e-5: ≈ 7.90 with RDP, ≈ 7.05 with PLD."""
    eps_rdp = epsilon_for(1000, 100, 100, 1.0, 1e-5, "rdp")
    assert eps_rdp == pytest.approx(direct_epsilon("rdp", 0.1, 1.0, 100, 1e-5), rel=1e-12)
    assert abs(eps_rdp - 7.9) < 0.1
    eps_pld = epsilon_for(1000, 100, 100, 1.0, 1e-5, "pld")
    assert eps_pld == pytest.approx(direct_epsilon("pld", 0.1, 1.0, 100, 1e-5), rel=1e-9)
    assert abs(eps_pld - 7.05) < 0.1
    assert eps_pld < eps_rdp  # PLD is the tighter accountant


@pytest.mark.parametrize(
    "q, z, rounds, delta",
    [(0.1, 1.0, 100, 1e-5), (0.01, 1.1, 1000, 1e-6), (1.0, 5.0, 10, 1e-5), (0.3, 2.0, 50, 1e-3), (0.05, 0.7, 1, 1e-5)],
)
def test_rdp_matches_dp_accounting(q, z, rounds, delta):
    acc = PrivacyAccountant("rdp", delta)
    for _ in range(rounds):
        acc.compose_round(q, z)
    assert acc.rounds == rounds
    assert acc.epsilon() == pytest.approx(direct_epsilon("rdp", q, z, rounds, delta), rel=1e-12)


@pytest.mark.parametrize("q, z, rounds, delta", [(0.1, 2.0, 20, 1e-5), (1.0, 5.0, 3, 1e-5)])
def test_pld_matches_dp_accounting(q, z, rounds, delta):
    acc = PrivacyAccountant("pld", delta)
    for _ in range(rounds):
        acc.compose_round(q, z)
    assert acc.epsilon() == pytest.approx(direct_epsilon("pld", q, z, rounds, delta), rel=1e-9)


def test_nothing_composed_is_zero():
    for kind in ("rdp", "pld"):
        acc = PrivacyAccountant(kind)
        assert acc.rounds == 0
        assert acc.events() == []
        assert acc.epsilon() == 0.0


def test_epsilon_grows_with_rounds_and_shrinks_with_noise():
    acc = PrivacyAccountant()
    previous = 0.0
    for _ in range(3):
        acc.compose_round(0.2, 1.5)
        assert acc.epsilon() > previous
        previous = acc.epsilon()
    assert epsilon_for(100, 20, 50, 2.0, 1e-5) < epsilon_for(100, 20, 50, 1.0, 1e-5)


def test_no_absl_convergence_warnings(caplog):
    """dp-accounting's "failed to converge" warnings (q = 0.1, z = 1 triggers them) are silenced."""
    logging.getLogger("absl").setLevel(logging.NOTSET)
    with caplog.at_level(logging.WARNING):
        acc = PrivacyAccountant("rdp")
        acc.compose_round(0.1, 1.0)
        acc.epsilon()
    assert not [r for r in caplog.records if r.name == "absl"]
    assert logging.getLogger("absl").level == logging.NOTSET  # restored afterwards


# ---------------------------------------------------------------------------
# the event history


def test_round_by_round_equals_all_at_once():
    one = PrivacyAccountant("rdp")
    for _ in range(40):
        one.compose_round(0.1, 1.0)
    assert one.events() == [[0.1, 1.0, 40]]
    assert one.epsilon() == PrivacyAccountant.from_events([[0.1, 1.0, 40]]).epsilon()
    assert one.epsilon() == epsilon_for(1000, 100, 40, 1.0, 1e-5)


def test_mixed_history_runs_and_rebuild():
    """Changing q or z starts a new run; from_events(events()) reproduces ε exactly, also through JSON."""
    # PLD is slow for small z: its case uses more noise
    for kind, z, rounds in (("rdp", 1.0, 30), ("pld", 3.0, 4)):
        acc = PrivacyAccountant(kind, 1e-6)
        plan = [(0.1, z)] * rounds + [(0.05, z)] * 2 + [(0.1, z)] * rounds + [(0.1, z + 0.5)]
        for q, zz in plan:
            acc.compose_round(q, zz)
        assert acc.events() == [[0.1, z, rounds], [0.05, z, 2], [0.1, z, rounds], [0.1, z + 0.5, 1]]
        assert acc.rounds == len(plan)
        eps = acc.epsilon()
        rebuilt = PrivacyAccountant.from_events(json.loads(json.dumps(acc.events())), kind, 1e-6)
        assert rebuilt.epsilon() == eps
        assert rebuilt.events() == acc.events()
        assert rebuilt.rounds == acc.rounds
        # composing on after a rebuild gives the same as composing on the original
        acc.compose_round(0.1, z + 0.5)
        rebuilt.compose_round(0.1, z + 0.5)
        assert rebuilt.epsilon() == acc.epsilon() > eps


def test_events_is_a_copy_and_from_events_merges():
    acc = PrivacyAccountant()
    acc.compose_round(0.5, 2.0)
    acc.events()[0][2] = 99
    assert acc.rounds == 1
    merged = PrivacyAccountant.from_events([[0.5, 2.0, 1], [0.5, 2.0, 2]])
    assert merged.events() == [[0.5, 2.0, 3]]


@pytest.mark.parametrize(
    "events",
    [[[0.1, 1.0]], [[0.0, 1.0, 1]], [[1.5, 1.0, 1]], [[0.1, 0.0, 1]], [[0.1, 1.0, 0]], [[0.1, 1.0, 1.5]], ["x"]],
)
def test_from_events_rejects_malformed(events):
    with pytest.raises(ValueError):
        PrivacyAccountant.from_events(events)


def test_epsilon_if_does_not_change_state():
    acc = PrivacyAccountant()
    for _ in range(10):
        acc.compose_round(0.1, 1.0)
    before, events = acc.epsilon(), acc.events()
    same = acc.epsilon_if(0.1, 1.0, rounds=5)
    other = acc.epsilon_if(0.2, 0.8, rounds=3)
    assert acc.epsilon_if(0.1, 1.0, rounds=0) == before
    assert acc.epsilon() == before and acc.events() == events and acc.rounds == 10
    assert other > same > before
    # and it is exactly what composing would give
    for _ in range(5):
        acc.compose_round(0.1, 1.0)
    assert acc.epsilon() == same
    fresh = PrivacyAccountant()
    assert fresh.epsilon_if(0.1, 1.0, 100) == epsilon_for(1000, 100, 100, 1.0, 1e-5)
    assert fresh.rounds == 0 and fresh.epsilon() == 0.0


def test_invalid_arguments():
    with pytest.raises(ValueError, match="accountant"):
        PrivacyAccountant("moments")
    with pytest.raises(ValueError, match="delta"):
        PrivacyAccountant("rdp", delta=0.0)
    acc = PrivacyAccountant()
    with pytest.raises(ValueError, match="sampling rate"):
        acc.compose_round(0.0, 1.0)
    with pytest.raises(ValueError, match="noise multiplier"):
        acc.compose_round(0.1, 0.0)
    with pytest.raises(ValueError, match="rounds"):
        acc.epsilon_if(0.1, 1.0, rounds=-1)
    assert acc.rounds == 0
    with pytest.raises(ValueError, match="per round"):
        epsilon_for(10, 11, 5, 1.0, 1e-5)
    with pytest.raises(ValueError, match="population"):
        epsilon_for(0, 0, 5, 1.0, 1e-5)


# ---------------------------------------------------------------------------
# noise search


@pytest.mark.parametrize(
    "target, population, per_round, rounds, delta",
    [(3.0, 1000, 100, 100, 1e-5), (1.0, 10_000, 100, 1000, 1e-6), (8.0, 50, 50, 20, 1e-5), (0.5, 1000, 10, 10, 1e-5)],
)
def test_noise_for_epsilon_is_monotone_and_tight(target, population, per_round, rounds, delta):
    z = noise_for_epsilon(target, population, per_round, rounds, delta)
    assert MIN_NOISE_MULTIPLIER < z < MAX_NOISE_MULTIPLIER
    assert epsilon_for(population, per_round, rounds, z, delta) <= target
    assert epsilon_for(population, per_round, rounds, z * 0.97, delta) > target


def test_noise_for_epsilon_pld_small():
    # every device every round (q = 1): PLD's fast case
    z = noise_for_epsilon(2.0, 10, 10, 3, 1e-5, accountant="pld", tol=1e-2)
    assert epsilon_for(10, 10, 3, z, 1e-5, "pld") <= 2.0
    assert epsilon_for(10, 10, 3, z * 0.97, 1e-5, "pld") > 2.0
    # PLD is tighter, so it needs no more noise than RDP
    assert z <= noise_for_epsilon(2.0, 10, 10, 3, 1e-5) * 1.01


def test_noise_for_epsilon_unreachable_and_loose_targets():
    with pytest.raises(ValueError, match="out of reach"):
        noise_for_epsilon(0.01, 10, 10, 1000, 1e-5)
    # a budget met by the least noise searched returns that noise
    assert noise_for_epsilon(1e6, 1000, 1, 1, 1e-5) == MIN_NOISE_MULTIPLIER
    with pytest.raises(ValueError, match="target epsilon"):
        noise_for_epsilon(0.0, 1000, 100, 10, 1e-5)


# ---------------------------------------------------------------------------
# adaptive clipping's noise split (Andrew et al. 2021, Theorem 1)


@pytest.mark.parametrize("z, sigma_b", [(1.0, 5.0), (0.5, 0.3), (2.0, 100.0), (1.1, 0.56)])
def test_adaptive_split_recombines(z, sigma_b):
    z_delta = adaptive_clip_noise_split(z, sigma_b)
    assert z_delta > z
    assert (z_delta ** -2 + (2 * sigma_b) ** -2) ** -0.5 == pytest.approx(z, rel=1e-12)


def test_adaptive_split_known_value():
    # σ_b = 1/√3 makes (2σ_b)⁻² = 3/4, so with z = 1: z_Δ = (1 − 3/4)^(-1/2) = 2
    sigma_b = 1 / math.sqrt(3)
    assert adaptive_clip_noise_split(1.0, sigma_b) == pytest.approx(2.0, rel=1e-12)


@pytest.mark.parametrize("z, sigma_b", [(1.0, 0.5), (1.0, 0.4), (2.0, 0.1)])
def test_adaptive_split_count_noise_too_small(z, sigma_b):
    with pytest.raises(ValueError, match="too small"):
        adaptive_clip_noise_split(z, sigma_b)


def test_adaptive_split_rejects_nonpositive():
    with pytest.raises(ValueError):
        adaptive_clip_noise_split(0.0, 1.0)
    with pytest.raises(ValueError):
        adaptive_clip_noise_split(1.0, 0.0)


# ---------------------------------------------------------------------------
# fedmqtt privacy


def test_privacy_cli_noise(capsys):
    assert privacy_main(["--population", "1000", "--per-round", "100", "--rounds", "100", "--noise", "1.0"]) == 0
    out = capsys.readouterr().out
    eps = epsilon_for(1000, 100, 100, 1.0, 1e-5)
    assert f"epsilon after 100 rounds = {eps:.3f}" in out
    assert "7.904" in out
    assert "q = 100/1000 = 0.1" in out
    for rounds in (10, 25, 50):
        assert f"{epsilon_for(1000, 100, rounds, 1.0, 1e-5):.3f}" in out
    assert "note: delta" not in out


def test_privacy_cli_target_epsilon(capsys):
    # q = 1 (every device every round) keeps the search fast
    argv = ["--population", "50", "--per-round", "50", "--rounds", "20", "--target-epsilon", "3",
            "--delta", "1e-6"]
    assert privacy_main(argv) == 0
    out = capsys.readouterr().out
    z = noise_for_epsilon(3.0, 50, 50, 20, 1e-6)
    assert f"z = {z:.4g} (smallest with epsilon <= 3)" in out
    assert f"epsilon after 20 rounds = {epsilon_for(50, 50, 20, z, 1e-6):.3f}" in out


def test_privacy_cli_pld_and_delta_note(capsys):
    assert privacy_main(["--population", "10", "--per-round", "10", "--rounds", "3", "--noise", "2",
                         "--delta", "0.2", "--accountant", "pld"]) == 0
    out = capsys.readouterr().out
    assert "accountant          = pld" in out
    assert f"epsilon after 3 rounds = {epsilon_for(10, 10, 3, 2.0, 0.2, 'pld'):.3f}" in out
    assert "note: delta 0.2 is not below 1/population" in out


def test_privacy_cli_unreachable_target(capsys):
    argv = ["--population", "10", "--per-round", "10", "--rounds", "1000", "--target-epsilon", "0.01"]
    assert privacy_main(argv) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith("fedmqtt privacy: error: epsilon 0.01 is out of reach")
    assert captured.err.count("\n") == 1


BASE = ["--population", "100", "--per-round", "10", "--rounds", "10"]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--population", "0", "--per-round", "1", "--rounds", "1", "--noise", "1"], "--population: must be >= 1"),
        (["--population", "10", "--per-round", "11", "--rounds", "1", "--noise", "1"], "must be <= --population"),
        (["--population", "10", "--per-round", "1", "--rounds", "0", "--noise", "1"], "--rounds: must be >= 1"),
        (BASE + ["--noise", "0"], "--noise: must be a finite number > 0"),
        (BASE + ["--noise", "-1"], "--noise: must be a finite number > 0"),
        (BASE + ["--target-epsilon", "0"], "--target-epsilon: must be a finite number > 0"),
        (BASE + ["--noise", "1", "--delta", "1"], "--delta: must be in (0, 1)"),
        (BASE + ["--noise", "1", "--delta", "0"], "--delta: must be in (0, 1)"),
        (BASE + ["--noise", "1", "--target-epsilon", "2"], "not allowed with"),
        (BASE, "one of the arguments --noise --target-epsilon is required"),
        (BASE + ["--noise", "1", "--accountant", "moments"], "invalid choice"),
        (BASE + ["--noise", "abc"], "expected a number"),
    ],
)
def test_privacy_cli_invalid_arguments(capsys, argv, message):
    with pytest.raises(SystemExit) as exc:
        privacy_main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert message in err


def test_table_rounds():
    assert table_rounds(100) == [10, 25, 50, 100]
    assert table_rounds(1) == [1]
    assert table_rounds(4) == [1, 2, 4]


def test_privacy_cli_plans_adaptive_clipping_as_dp_accounting_composes_sum_and_count(capsys):
    # the sum (std z_sum S, sensitivity S) and the centred count (std sigma_b, sensitivity 1/2) on one sample
    argv = ["--population", "1000", "--per-round", "40", "--rounds", "100", "--noise", "1.0", "--adaptive-clip"]
    assert privacy_main(argv) == 0
    out = capsys.readouterr().out
    eps = float(re.search(r"epsilon after 100 rounds = ([0-9.]+)", out).group(1))
    z_sum = float(re.search(r"z_sum = ([0-9.]+)", out).group(1))
    sigma_b = float(re.search(r"sigma_b = ([0-9.]+)", out).group(1))
    assert sigma_b == 2.0  # per-round / 20
    acc = dpa.rdp.RdpAccountant()
    inner = dpa.ComposedDpEvent([dpa.GaussianDpEvent(z_sum), dpa.GaussianDpEvent(sigma_b / 0.5)])
    acc.compose(dpa.PoissonSampledDpEvent(0.04, inner), 100)
    assert eps == pytest.approx(acc.get_epsilon(1e-5), abs=2e-3)  # printed with 3 decimals, z_sum with 4 digits


def test_privacy_cli_plans_distributed_shares(capsys):
    argv = ["--population", "1000", "--per-round", "100", "--rounds", "100", "--noise", "1.0",
            "--mode", "distributed", "--min-clients", "5", "--clip", "2"]
    assert privacy_main(argv) == 0
    out = capsys.readouterr().out
    share = float(re.search(r"every device adds std ([0-9.]+)", out).group(1))
    # the other min_clients - 1 shares protect one device: dp-accounting's epsilon for that noise is the printed one
    protecting = math.sqrt(5 - 1) * share / 2.0  # as a multiple of the clip norm
    eps = float(re.search(r"epsilon after 100 rounds = ([0-9.]+)", out).group(1))
    acc = dpa.rdp.RdpAccountant()
    acc.compose(dpa.PoissonSampledDpEvent(0.1, dpa.GaussianDpEvent(protecting)), 100)
    assert eps == pytest.approx(acc.get_epsilon(1e-5), abs=2e-3)
    with pytest.raises(SystemExit) as exc:
        privacy_main(argv[:-4] + ["--min-clients", "1"])
    assert exc.value.code == 2 and "--min-clients" in capsys.readouterr().err
