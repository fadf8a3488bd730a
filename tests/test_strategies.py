"""Aggregation strategies: every rule on small hand-computed inputs, clipping, memory, state, config."""

from __future__ import annotations

import logging
import math
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from aggregator import checkpoint, strategies
from aggregator.config import AggregatorConfig, StrategyConfig
from aggregator.strategies import (
    BUFFERING,
    SERVER_OPTIMIZERS,
    STRATEGIES,
    FedAvg,
    Krum,
    Median,
    TrimmedMean,
    make_strategy,
)
from edge_agent.config import ConfigError, load


def vec(*xs) -> dict[str, np.ndarray]:
    """A one-parameter model (or delta) holding the vector ``xs``."""
    return {"w": np.array(xs, dtype=np.float32)}


def run_round(s, global_params, deltas, weights=None):
    s.begin(global_params)
    for i, d in enumerate(deltas):
        s.add(d, 1.0 if weights is None else weights[i])
    return s.result(global_params)


def strategy(name: str, **kw):
    cfg = StrategyConfig(name=name, **kw)
    assert cfg.problems() == []
    return make_strategy(cfg)


# ---------------------------------------------------------------------------
# averaging rules


def test_unweighted_mean():
    s = strategy("fedavg_unweighted")
    out = run_round(s, vec(0, 0), [vec(1, 2), vec(2, 3), vec(3, 4)], weights=[1, 10, 100])
    np.testing.assert_array_equal(out["w"], [2, 3])
    assert out["w"].dtype == np.float32


@pytest.mark.parametrize("name", ["fedavg", "fedprox"])
def test_weighted_fedavg_by_hand(name):
    s = strategy(name, prox_mu=0.01) if name == "fedprox" else strategy(name)
    # (1·[1, 2] + 3·[4, 8]) / 4 = [13/4, 26/4], on top of [0.5, -1]
    out = run_round(s, vec(0.5, -1), [vec(1, 2), vec(4, 8)], weights=[1, 3])
    np.testing.assert_array_equal(out["w"], [0.5 + 3.25, -1 + 6.5])
    assert s.name == name


def test_fedavgm_two_rounds_by_hand():
    s = strategy("fedavgm", server_lr=0.5, momentum=0.9)
    x = vec(1, 1)
    # round 1: Δ = (1·[2, -4] + 2·[0.5, -1]) / 3 = [1, -2]; v = [1, -2]; x = [1, 1] + 0.5·v
    x = run_round(s, x, [vec(2, -4), vec(0.5, -1)], weights=[1, 2])
    np.testing.assert_allclose(x["w"], [1.5, 0.0], rtol=1e-7)
    # round 2: Δ = [0.5, 1]; v = 0.9·[1, -2] + [0.5, 1] = [1.4, -0.8]; x += 0.5·v
    x = run_round(s, x, [vec(0.5, 1)], weights=[7])
    np.testing.assert_allclose(x["w"], [1.5 + 0.7, 0.0 - 0.4], rtol=1e-6)
    assert s.steps == 2


def test_fedavgm_defaults_follow_hsu_et_al():
    s = strategy("fedavgm")
    assert (s.server_lr, s.momentum) == (1.0, 0.9)
    x = run_round(s, vec(0, 0), [vec(1, 2)])
    x = run_round(s, x, [vec(1, 2)])
    # v1 = Δ, v2 = 0.9Δ + Δ: x = Δ + 1.9Δ
    np.testing.assert_allclose(x["w"], [2.9, 5.8], rtol=1e-6)


# Reddi et al. 2021, Algorithm 2, two server steps written out for one
# coordinate with plain floats: Δ1 then Δ2, m0 = 0, v0 = τ², no bias correction.
LR, B1, B2, TAU = 0.1, 0.9, 0.99, 1e-3


def _sign(x: float) -> float:
    return (x > 0) - (x < 0)


def adam_by_hand(x: float, d1: float, d2: float) -> float:
    m1 = 0.9 * 0.0 + 0.1 * d1
    v1 = 0.99 * 1e-6 + 0.01 * d1 * d1
    x1 = x + 0.1 * m1 / (math.sqrt(v1) + 1e-3)
    m2 = 0.9 * m1 + 0.1 * d2
    v2 = 0.99 * v1 + 0.01 * d2 * d2
    return x1 + 0.1 * m2 / (math.sqrt(v2) + 1e-3)


def yogi_by_hand(x: float, d1: float, d2: float) -> float:
    m1 = 0.1 * d1
    v1 = 1e-6 - 0.01 * d1 * d1 * _sign(1e-6 - d1 * d1)
    x1 = x + 0.1 * m1 / (math.sqrt(v1) + 1e-3)
    m2 = 0.9 * m1 + 0.1 * d2
    v2 = v1 - 0.01 * d2 * d2 * _sign(v1 - d2 * d2)
    return x1 + 0.1 * m2 / (math.sqrt(v2) + 1e-3)


def adagrad_by_hand(x: float, d1: float, d2: float) -> float:
    m1 = 0.1 * d1
    v1 = 1e-6 + d1 * d1
    x1 = x + 0.1 * m1 / (math.sqrt(v1) + 1e-3)
    m2 = 0.9 * m1 + 0.1 * d2
    v2 = v1 + d2 * d2
    return x1 + 0.1 * m2 / (math.sqrt(v2) + 1e-3)


def test_adam_first_step_spelled_out():
    # Δ = 1: m = 0.1, v = 0.99e-6 + 0.01 = 0.01000099, √v = 0.10000495, step = 0.01 / 0.10100495
    s = strategy("fedadam")
    out = run_round(s, vec(0), [vec(1)])
    np.testing.assert_allclose(out["w"], [0.01 / (math.sqrt(0.01000099) + 0.001)], rtol=1e-6)


@pytest.mark.parametrize(
    "name, by_hand", [("fedadam", adam_by_hand), ("fedyogi", yogi_by_hand), ("fedadagrad", adagrad_by_hand)]
)
def test_adaptive_rules_two_steps_by_hand(name, by_hand):
    s = strategy(name, server_lr=LR, beta1=B1, beta2=B2, tau=TAU)
    x0 = [0.5, -0.25, 0.0, 2.0]
    # step 1: weighted mean Δ1 = (1·a + 3·b) / 4 per coordinate
    a, b = [2.0, -4.0, 0.0, 0.01], [0.0, 0.0, 0.0, 0.01]
    d1 = [(1 * ai + 3 * bi) / 4 for ai, bi in zip(a, b)]  # [0.5, -1.0, 0.0, 0.01]
    d2 = [0.25, 3.0, -0.5, 0.01]
    x = run_round(s, vec(*x0), [vec(*a), vec(*b)], weights=[1, 3])
    x = run_round(s, x, [vec(*d2)], weights=[5])
    expected = [by_hand(xi, p, q) for xi, p, q in zip(x0, d1, d2)]
    np.testing.assert_allclose(x["w"], expected, rtol=2e-6, atol=1e-7)
    assert s.steps == 2


@pytest.mark.parametrize("name", ["fedadam", "fedyogi", "fedadagrad"])
def test_adaptive_defaults_and_server_lr_zero_means_rule_default(name):
    s = strategy(name)
    assert (s.server_lr, s.beta1, s.beta2, s.tau) == (0.1, 0.9, 0.99, 1e-3)
    assert strategy(name, server_lr=0.3).server_lr == 0.3
    assert strategy("fedavgm", server_lr=0.3).server_lr == 0.3


def test_non_finite_result_leaves_optimizer_state_untouched():
    big = float(np.finfo(np.float32).max)
    s = strategy("fedavgm")
    x = run_round(s, vec(0, 0), [vec(1, 1)])
    before = s.state_dict()
    out = run_round(s, vec(big, 0), [vec(big, 0)])  # big + 1.9·big overflows float32
    assert not np.isfinite(out["w"]).all()
    after = s.state_dict()
    assert after["steps"] == before["steps"] == 1
    np.testing.assert_array_equal(after["momentum/w"], before["momentum/w"])
    # the coordinator re-runs the round: it starts from the state before
    x = run_round(s, x, [vec(1, 1)])
    np.testing.assert_allclose(x["w"], [2.9, 2.9], rtol=1e-6)


def test_server_optimizer_result_is_idempotent_within_a_round():
    s = strategy("fedadam")
    s.begin(vec(0, 0))
    s.add(vec(1, 2), 1.0)
    first = s.result(vec(0, 0))
    second = s.result(vec(0, 0))
    np.testing.assert_array_equal(first["w"], second["w"])
    assert s.steps == 1


# ---------------------------------------------------------------------------
# robust rules


@pytest.fixture(params=[False, True], ids=["one-block", "column-blocks"])
def blocks(request, monkeypatch):
    """Run robust rules with their default working block, and with one column per block."""
    if request.param:
        monkeypatch.setattr(strategies, "_CHUNK_BYTES", 8)


def random_model_updates(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    g = {"W0": rng.normal(size=(3, 4)).astype(np.float32), "b0": rng.normal(size=5).astype(np.float32)}
    ds = [{k: rng.normal(scale=3.0, size=v.shape).astype(np.float32) for k, v in g.items()} for _ in range(n)]
    return g, ds


@pytest.mark.parametrize("n", [7, 8])
def test_median_matches_numpy(n, blocks):
    g, ds = random_model_updates(n, seed=n)
    s = strategy("median")
    out = run_round(s, g, ds, weights=list(range(1, n + 1)))  # weights are ignored
    for k in g:
        ref = g[k].astype(np.float64) + np.median(np.stack([d[k] for d in ds]).astype(np.float64), axis=0)
        np.testing.assert_array_equal(out[k], ref.astype(np.float32))
        assert out[k].dtype == np.float32


@pytest.mark.parametrize("n, beta, k", [(7, 0.25, 1), (8, 0.25, 2), (8, 0.0, 0), (10, 0.49, 4)])
def test_trimmed_mean_matches_sorted_slice(n, beta, k, blocks):
    g, ds = random_model_updates(n, seed=10 + n)
    s = strategy("trimmed_mean", trim_beta=beta)
    assert s.trimmed(n) == k
    out = run_round(s, g, ds, weights=[1000.0] + [1.0] * (n - 1))
    for key in g:
        col = np.sort(np.stack([d[key] for d in ds]).astype(np.float64), axis=0)
        ref = g[key].astype(np.float64) + col[k:n - k].mean(axis=0)
        np.testing.assert_allclose(out[key], ref.astype(np.float32), rtol=1e-6)


def test_trimmed_count_is_not_fooled_by_float_rounding():
    assert TrimmedMean(trim_beta=0.29).trimmed(100) == 29  # 0.29 × 100 = 28.999999999999996


def honest_and_attacker(seed: int = 1):
    rng = np.random.default_rng(seed)
    honest = [vec(*(np.array([1.0, 1.0]) + rng.normal(scale=0.1, size=2))) for _ in range(5)]
    attacker = vec(100, -100)
    return honest, [honest[0], honest[1], attacker, honest[2], honest[3], honest[4]]


def test_krum_scores_by_hand():
    # 1-D points 0, 1, 2, 10 with f = 0: each sums its n - f - 2 = 2 nearest squared distances
    s = Krum(byzantine_f=0)
    s.begin(vec(0))
    for x in (0, 1, 2, 10):
        s.add(vec(x), 1.0)
    out = s.result(vec(0))
    np.testing.assert_array_equal(s.scores, [1 + 4, 1 + 1, 1 + 4, 64 + 81])
    assert s.selected == [1] and out["w"][0] == 1.0


def test_krum_picks_an_honest_update(blocks):
    honest, updates = honest_and_attacker()
    s = strategy("krum", byzantine_f=1)
    out = run_round(s, vec(0, 0), updates)
    assert s.selected != [2] and not s.fell_back
    (i,) = s.selected
    np.testing.assert_array_equal(out["w"], updates[i]["w"])
    assert any(np.array_equal(out["w"], h["w"]) for h in honest)


def test_multi_krum_averages_the_honest_updates(blocks):
    honest, updates = honest_and_attacker()
    s = strategy("multi_krum", byzantine_f=1)  # m = n - f = 5
    out = run_round(s, vec(0, 0), updates)
    assert s.selected == [0, 1, 3, 4, 5]
    ref = np.mean([h["w"].astype(np.float64) for h in honest], axis=0)
    np.testing.assert_allclose(out["w"], ref.astype(np.float32), rtol=1e-6)


def test_multi_krum_m_picks_the_lowest_scores():
    s = strategy("multi_krum", byzantine_f=0, multi_krum_m=2)
    out = run_round(s, vec(0), [vec(0), vec(1), vec(2), vec(10)])  # scores 5, 2, 5, 145 (ties: first)
    assert s.selected == [0, 1]
    np.testing.assert_allclose(out["w"], [0.5])


def test_krum_with_too_few_updates_falls_back_to_the_median(caplog):
    s = strategy("krum", byzantine_f=1)
    with caplog.at_level(logging.WARNING, logger="aggregator.strategies"):
        out = run_round(s, vec(0, 0), [vec(1, 1), vec(2, 5), vec(3, 3), vec(100, -100)])  # n = 4 <= 2f + 2
    assert s.fell_back
    assert "2f + 2" in caplog.text and "median" in caplog.text
    np.testing.assert_array_equal(out["w"], [2.5, 2.0])
    # the next round with enough updates uses Krum again
    honest, updates = honest_and_attacker()
    run_round(s, vec(0, 0), updates)
    assert not s.fell_back and s.selected != [2]


def test_full_at_max_updates():
    s = strategy("median", max_updates=3)
    s.begin(vec(0))
    for i in range(3):
        assert not s.full()
        s.add(vec(i), 1.0)
    assert s.full()
    s.begin(vec(0))  # a new round empties it
    assert not s.full()


@pytest.mark.parametrize("name", [n for n in STRATEGIES if n not in BUFFERING])
def test_streaming_rules_never_fill(name):
    s = strategy(name, **({"prox_mu": 0.1} if name == "fedprox" else {}))
    assert s.streaming
    s.begin(vec(0))
    for _ in range(5):
        s.add(vec(1), 1.0)
    assert not s.full()


# ---------------------------------------------------------------------------
# clipping


def big_and_small():
    """Two-parameter deltas: norms 5 (clipped to 1) and 0.5 (kept)."""
    return ([{"W0": np.array([[3.0]], np.float32), "b0": np.array([4.0], np.float32)},
             {"W0": np.array([[0.3]], np.float32), "b0": np.array([0.4], np.float32)}])


ZERO = {"W0": np.zeros((1, 1), np.float32), "b0": np.zeros(1, np.float32)}


@pytest.mark.parametrize("name", ["fedavg_unweighted", "median", "trimmed_mean"])
def test_clipping_scales_big_deltas_and_leaves_small_ones(name):
    s = strategy(name, clip_norm=1.0)
    out = run_round(s, ZERO, big_and_small())
    # the norm is over all parameters together: [3, 4] -> [0.6, 0.8]; [0.3, 0.4] untouched
    assert s.clipped == 1
    np.testing.assert_allclose([out["W0"][0, 0], out["b0"][0]], [0.45, 0.6], rtol=1e-6)


def test_clipping_with_server_momentum():
    s = strategy("fedavgm", clip_norm=1.0)
    out = run_round(s, ZERO, big_and_small()[:1])
    np.testing.assert_allclose([out["W0"][0, 0], out["b0"][0]], [0.6, 0.8], rtol=1e-6)


@pytest.mark.parametrize("name", STRATEGIES)
def test_clipping_bounds_every_delta_of_every_rule(name):
    rng = np.random.default_rng(3)
    g, _ = random_model_updates(0)
    deltas = [{k: rng.normal(scale=s, size=v.shape).astype(np.float32) for k, v in g.items()}
              for s in (0.01, 5.0, 0.02, 9.0, 3.0, 0.001)]
    norms = [math.sqrt(sum(float(np.sum(a.astype(np.float64) ** 2)) for a in d.values())) for d in deltas]
    C = 1.0
    s = strategy(name, clip_norm=C, byzantine_f=0, **({"prox_mu": 0.1} if name == "fedprox" else {}))
    out = run_round(s, g, deltas, weights=[1, 2, 3, 4, 5, 6])
    assert s.clipped == sum(n > C for n in norms) == 3
    assert all(np.isfinite(a).all() and a.dtype == np.float32 for a in out.values())
    if name in BUFFERING:
        rows = [r.astype(np.float64) for r in s.rows]
        for row, d, n in zip(rows, deltas, norms):
            assert np.linalg.norm(row) <= C * (1 + 1e-6)
            if n <= C:  # small deltas are kept bit for bit
                np.testing.assert_array_equal(row, np.concatenate([np.ravel(d[k]) for k in g]))


def test_weighted_mean_of_clipped_deltas_has_norm_at_most_c():
    rng = np.random.default_rng(4)
    g, _ = random_model_updates(0)
    s = strategy("fedavg", clip_norm=0.5)
    out = run_round(s, g, [{k: rng.normal(scale=10, size=v.shape).astype(np.float32) for k, v in g.items()}
                           for _ in range(4)], weights=[1, 2, 3, 4])
    step = np.concatenate([(out[k].astype(np.float64) - g[k]).ravel() for k in g])
    assert np.linalg.norm(step) <= 0.5 * (1 + 1e-6) and s.clipped == 4


# ---------------------------------------------------------------------------
# memory


def _peak_while_folding(s, n_updates: int, size: int) -> int:
    g = {"W0": np.zeros(size, np.float32)}
    delta = {"W0": np.full(size, 0.5, np.float32)}
    tracemalloc.start()
    try:
        s.begin(g)
        for _ in range(n_updates):
            s.add(delta, 3.0)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return peak


def test_streaming_rules_use_o_model_memory():
    size, n = 100_000, 200
    model64 = size * 8
    peak = _peak_while_folding(FedAvg(), n, size)
    assert peak < 5 * model64, f"FedAvg peaked at {peak} bytes for a {model64}-byte float64 model"
    # with clipping the norm is taken in the same float64 scratch buffer
    assert _peak_while_folding(FedAvg(clip_norm=1.0), n, size) < 5 * model64
    # the check has teeth: a rule that keeps every update holds n float32 copies
    kept = _peak_while_folding(Median(max_updates=n), n, size)
    assert kept > n * size * 4 > 50 * model64


@pytest.mark.parametrize("name", BUFFERING)
def test_buffering_rules_hold_one_float32_copy_of_the_updates(name, monkeypatch):
    monkeypatch.setattr(strategies, "_CHUNK_BYTES", 1 << 20)
    size, n = 50_000, 60
    held, model64 = n * size * 4, size * 8
    s = strategy(name)
    g = {"W0": np.zeros(size, np.float32)}
    deltas = [{"W0": np.full(size, float(i % 7), np.float32)} for i in range(n)]
    tracemalloc.start()
    try:
        run_round(s, g, deltas)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # the rows, one working block of columns, and a few model-sized vectors;
    # never a second n x d matrix (that alone would be another `held`)
    assert held < peak < held + 2 * strategies._CHUNK_BYTES + 4 * model64, (peak, held)


# ---------------------------------------------------------------------------
# state through a checkpoint file


ROUNDS = [
    ([vec(0.5, -1.0, 2.0), vec(0.1, 0.2, 0.3)], [10, 30]),
    ([vec(-0.2, 0.4, 1.0)], [5]),
    ([vec(0.3, 0.3, -0.3), vec(1.0, -1.0, 0.0), vec(0.0, 0.5, 0.5)], [1, 2, 3]),
]


@pytest.mark.parametrize("name", SERVER_OPTIMIZERS)
def test_state_survives_a_checkpoint_round_trip(name, tmp_path: Path):
    cfg = StrategyConfig(name=name)
    x0 = vec(1.0, 2.0, 3.0)

    uninterrupted = make_strategy(cfg)
    x = x0
    for deltas, weights in ROUNDS:
        x = run_round(uninterrupted, x, deltas, weights)

    first = make_strategy(cfg)
    y = run_round(first, x0, *ROUNDS[0])
    checkpoint.save(tmp_path, {"params": y, "strategy": {"name": first.name, "state": first.state_dict()}})
    state = checkpoint.load(tmp_path)
    resumed = make_strategy(cfg)
    resumed.load_state_dict(state["strategy"]["state"])
    assert resumed.steps == 1
    y = state["params"]
    for deltas, weights in ROUNDS[1:]:
        y = run_round(resumed, y, deltas, weights)
    np.testing.assert_array_equal(y["w"], x["w"])
    assert resumed.steps == uninterrupted.steps == 3


def test_state_keys_are_flat_float64_arrays_and_json_scalars():
    s = strategy("fedadam")
    run_round(s, vec(0, 0), [vec(1, 1)])
    state = s.state_dict()
    assert set(state) == {"rule", "steps", "m/w", "v/w"}
    assert state["rule"] == "fedadam" and state["steps"] == 1
    assert state["m/w"].dtype == state["v/w"].dtype == np.float64
    assert set(strategy("fedavgm").state_dict()) == {"rule", "steps"}  # nothing before the first round
    assert strategy("median").state_dict() == {} and strategy("fedavg").state_dict() == {}


def test_fresh_optimizer_starts_with_v_tau_squared():
    s = strategy("fedyogi", tau=0.01)
    s.begin(vec(0, 0))
    assert s.state_dict()["v/w"].tolist() == [1e-4, 1e-4]
    assert s.state_dict()["m/w"].tolist() == [0.0, 0.0]


def test_state_of_another_rule_is_not_loaded(caplog):
    adam = strategy("fedadam")
    run_round(adam, vec(0, 0), [vec(1, 1)])
    yogi = strategy("fedyogi")
    with caplog.at_level(logging.WARNING, logger="aggregator.strategies"):
        yogi.load_state_dict(adam.state_dict())
    assert "fedadam" in caplog.text and yogi.steps == 0
    fresh = strategy("fedyogi")
    x1 = run_round(yogi, vec(0, 0), [vec(1, 1)])
    np.testing.assert_array_equal(x1["w"], run_round(fresh, vec(0, 0), [vec(1, 1)])["w"])
    yogi.load_state_dict({})  # a checkpoint of a stateless rule
    assert yogi.steps == 0


def test_incomplete_state_is_an_error():
    s = strategy("fedadam")
    with pytest.raises(ValueError, match="m/<param>"):
        s.load_state_dict({"rule": "fedadam", "steps": 1, "m/w": np.zeros(2)})


# ---------------------------------------------------------------------------
# construction and config


@pytest.mark.parametrize("name", STRATEGIES)
def test_every_rule_builds_and_aggregates(name):
    s = strategy(name, byzantine_f=0, **({"prox_mu": 0.1} if name == "fedprox" else {}))
    assert s.name == name and s.streaming == (name not in BUFFERING)
    g, ds = random_model_updates(5, seed=9)
    out = run_round(s, g, ds, weights=[1, 2, 3, 4, 5])
    assert set(out) == set(g)
    assert all(out[k].shape == g[k].shape and out[k].dtype == np.float32 for k in g)


def test_unknown_name_is_an_error():
    with pytest.raises(ValueError, match="unknown strategy"):
        make_strategy(StrategyConfig(name="fedsgd"))


def _toml(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "agg.toml"
    p.write_text(text)
    return p


@pytest.mark.parametrize(
    "text, key",
    [
        ("trim_beta = 0.7", "strategy.trim_beta"),
        ("trim_beta = 0.5", "strategy.trim_beta"),
        ("trim_beta = -0.1", "strategy.trim_beta"),
        ('name = "fedprox"', "strategy.prox_mu"),
        ('name = "fedprox"\nprox_mu = 0.0', "strategy.prox_mu"),
        ("prox_mu = -1.0", "strategy.prox_mu"),
        ("server_lr = -0.1", "strategy.server_lr"),
        ("server_lr = nan", "strategy.server_lr"),
        ("momentum = 1.0", "strategy.momentum"),
        ("beta1 = 1.0", "strategy.beta1"),
        ("beta2 = -0.5", "strategy.beta2"),
        ("tau = 0.0", "strategy.tau"),
        ("byzantine_f = -1", "strategy.byzantine_f"),
        ('name = "krum"\nbyzantine_f = 2\nmax_updates = 6', "strategy.byzantine_f"),
        ("multi_krum_m = -1", "strategy.multi_krum_m"),
        ('name = "multi_krum"\nbyzantine_f = 1\nmax_updates = 10\nmulti_krum_m = 10', "strategy.multi_krum_m"),
        ("clip_norm = -1.0", "strategy.clip_norm"),
        ("clip_norm = inf", "strategy.clip_norm"),
        ("max_updates = 0", "strategy.max_updates"),
        ("byzantine_f = 1.5", "strategy.byzantine_f"),
    ],
)
def test_invalid_strategy_config_names_the_key(tmp_path, text, key):
    p = _toml(tmp_path, f"[strategy]\n{text}\n")
    with pytest.raises(ConfigError) as info:
        load(AggregatorConfig, p)
    assert f"{key}:" in str(info.value), str(info.value)


def test_strategy_keys_load_from_toml_and_flags(tmp_path):
    p = _toml(tmp_path, '[strategy]\nname = "fedyogi"\nbeta2 = 0.999\ntau = 1e-4\nclip_norm = 5\n')
    cfg = load(AggregatorConfig, p, {"strategy.server_lr": "0.05"})
    assert cfg.strategy == StrategyConfig(name="fedyogi", beta2=0.999, tau=1e-4, clip_norm=5.0, server_lr=0.05)
    s = make_strategy(cfg.strategy)
    assert (s.name, s.server_lr, s.beta2, s.tau, s.clip_norm) == ("fedyogi", 0.05, 0.999, 1e-4, 5.0)
    cfg = load(AggregatorConfig, p, {"strategy.name": "multi_krum", "strategy.byzantine_f": "2",
                                     "strategy.multi_krum_m": "4", "strategy.max_updates": "50"})
    s = make_strategy(cfg.strategy)
    assert (s.f, s.m, s.max_updates, s.multi) == (2, 4, 50, True)


def test_defaults_are_valid_for_every_rule():
    for name in STRATEGIES:
        cfg = StrategyConfig(name=name, prox_mu=0.01 if name == "fedprox" else 0.0)
        assert cfg.problems() == [], name
