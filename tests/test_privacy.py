"""Differential privacy: clipping, noise of the right size in every mode, adaptive clipping, budget, resume."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest

from aggregator.accounting import epsilon_for
from aggregator.config import AggregatorConfig, ModelConfig, PrivacyConfig, RoundConfig
from aggregator.coordinator import Coordinator, Finished, RoundClosed, SaveCheckpoint
from aggregator.privacy import PrivacyEngine
from aggregator.strategies import FedAvg
from edge_agent import dp, wire
from edge_agent.agent import AgentCore
from edge_agent.data import LocalData
from edge_agent.models import BuiltinModel
from edge_agent.mqtt import Publish
from edge_agent.spec import ModelSpec
from edge_agent.topics import Topics

from .conftest import deliver_task

FED = "dp"
T = Topics(FED)
BIG = ModelSpec("linear", 20_000, 1)  # 20,001 parameters: enough coordinates to measure a std


def dp_config(mode="central", n_features=1, **privacy) -> AggregatorConfig:
    p = dict(mode=mode, clip=1.0, noise_multiplier=1.0, expected_per_round=10, population=100)
    p.update(privacy)
    return AggregatorConfig(
        federation=FED, rounds=0,
        model=ModelConfig(kind="linear", n_features=n_features, n_outputs=1),
        round=RoundConfig(min_agents=1, quorum=1, timeout=10.0),
        privacy=PrivacyConfig(**p),
    )


# -- clipping -------------------------------------------------------------------

@pytest.mark.parametrize("scale", [1e-3, 0.5, 0.999, 1.001, 3.0, 1e4])
def test_clipping_bounds_every_norm_and_leaves_small_updates_alone(scale):
    rng = np.random.default_rng(int(scale * 10))
    delta = {"W0": rng.standard_normal((30, 4)).astype(np.float32), "b0": rng.standard_normal(4).astype(np.float32)}
    delta = {k: v * np.float32(scale / dp.l2_norm(delta)) for k, v in delta.items()}  # norm = scale
    clipped, norm, within = dp.clip(delta, 1.0)
    assert norm == pytest.approx(scale, rel=1e-5)
    assert dp.l2_norm(clipped) <= 1.0 + 1e-6
    assert within is (scale <= 1.0)
    if within:
        for k in delta:
            np.testing.assert_array_equal(clipped[k], delta[k])
    else:  # the direction is kept
        np.testing.assert_allclose(clipped["W0"] / dp.l2_norm(clipped), delta["W0"] / scale, rtol=1e-4, atol=1e-7)


# -- noise of the right size, per mode --------------------------------------------

def _empirical_std(arrays) -> float:
    flat = np.concatenate([np.ravel(a) for a in arrays]).astype(np.float64)
    return float(flat.std())


def _tolerance(n: int) -> float:
    # std of a sample std of n normal draws is about sigma / sqrt(2n); allow 5 of those
    return 5.0 / math.sqrt(2 * n)


def test_central_noise_on_the_sum_has_std_z_times_clip():
    z, s = 1.3, 0.7
    engine = PrivacyEngine(dp_config(noise_multiplier=z, clip=s, expected_per_round=1))
    agg = engine.wrap(FedAvg())
    zero = BuiltinModel(BIG).init_params(0)
    agg.begin(zero)
    agg.add({k: np.zeros_like(v) for k, v in zero.items()}, 1.0, {"dp_unclipped": 1.0})
    out = agg.result(zero)  # expected_per_round = 1: the mean is the noised sum itself
    n = BIG.num_params()
    assert abs(_empirical_std(out.values()) / (z * s) - 1) < _tolerance(n)


@pytest.mark.parametrize("mode,divisor", [("local", 1.0), ("distributed", math.sqrt(4 - 1))])
def test_devices_add_the_noise_the_task_asks_for(mode, divisor):
    z, s = 0.8, 2.0
    engine = PrivacyEngine(dp_config(mode=mode, noise_multiplier=z, clip=s, min_clients=4))
    clip, std, count_std = engine.task_noise()
    assert clip == s and std == pytest.approx(z * s / divisor) and count_std == 0.0
    # a real agent, given that task, adds exactly that noise (zero epochs: the clean delta is 0)
    X = np.zeros((5, BIG.n_features), np.float32)
    core = AgentCore("a0", FED, LocalData(X, np.zeros(5, np.float32), X[:0], np.zeros(0, np.float32)), seed=0)
    params = BuiltinModel(BIG).init_params(0)
    m = wire.ModelMsg(FED, 0, wire.params_version(params), BIG, params)
    core.receive(T.model, wire.encode(m))
    task = wire.TaskMsg(FED, 1, m.version, "open", 0, 0.0,
                        wire.TrainConfig(0, 1, 0.1, clip_norm=clip, noise_std=std, dp_mode=mode))
    deliver_task(core, task)
    (pub,) = [a for a in core.train(1, 0) if isinstance(a, Publish)]
    upd = wire.decode(pub.payload, expect="update")
    # the aggregator is not trusted in these modes: nothing but the noised update leaves the device
    assert upd.metrics == {} and upd.num_samples == 1
    assert abs(_empirical_std(upd.delta.values()) / std - 1) < _tolerance(BIG.num_params())


def test_any_min_clients_minus_one_shares_add_up_to_the_full_noise():
    # a device's own share does not protect it: the other m - 1 shares must carry z S
    z, s, m = 1.0, 1.0, 9
    engine = PrivacyEngine(dp_config(mode="distributed", noise_multiplier=z, clip=s, min_clients=m))
    _, share, _ = engine.task_noise()
    rng = np.random.default_rng(1)
    total = sum(rng.normal(0.0, share, 50_000) for _ in range(m - 1))
    assert abs(total.std() / (z * s) - 1) < _tolerance(50_000)


# -- adaptive clipping direction ------------------------------------------------------

@pytest.mark.parametrize("unclipped,direction", [(0.0, "up"), (1.0, "down")])
def test_adaptive_clipping_moves_the_norm_the_right_way(unclipped, direction):
    # the count noise must exceed z/2 to split the budget (Andrew et al.): z = 0.5, sigma_b = 0.5,
    # small against 20 devices, so the noised fraction is close to the true one
    engine = PrivacyEngine(dp_config(adaptive_clip=True, noise_multiplier=0.5, clip=1.0, expected_per_round=20,
                                     count_stddev=0.5))
    agg = engine.wrap(FedAvg())
    zero = {"W0": np.zeros((1, 1), np.float32), "b0": np.zeros(1, np.float32)}
    agg.begin(zero)
    for _ in range(20):
        agg.add(zero, 1.0, {"dp_unclipped": unclipped})
    agg.result(zero)
    assert engine.clip == 1.0  # not before the round's model is released
    engine.charge(0.1)
    # γ = 0.5, η = 0.2: all clipped -> C·e^{0.1}; none clipped -> C·e^{-0.1} (up to the count noise)
    if direction == "up":
        assert engine.clip > 1.05
    else:
        assert engine.clip < 0.95


# -- selection, accounting, budget, resume ---------------------------------------------

def status(agent: str) -> tuple[str, bytes]:
    return T.status(agent), wire.encode(wire.StatusMsg(FED, 0, agent, "online", 10, ["linear"]))


def run_rounds(c: Coordinator, now: float = 0.0, max_rounds: int = 100):
    """Every selected agent answers with a zero update until the coordinator finishes or max_rounds."""
    actions_seen = []
    for _ in range(max_rounds):
        if c.finished:
            break
        if c.open is None:
            actions_seen += c.tick(now)
            if c.open is None:
                now += 1.0
                continue
        o = c.open
        for a in list(o.selected):
            delta = {"W0": np.zeros((1, 1), np.float32), "b0": np.zeros(1, np.float32)}
            upd = wire.UpdateMsg(FED, o.round, a, c.version, 10, delta, {"dp_unclipped": 1.0})
            actions_seen += c.receive(T.update(a), wire.encode(upd), now)
        if c.open is o:  # an empty draw: it is released at the next tick
            actions_seen += c.tick(now)
        now += 1.0
    return actions_seen


def started(cfg: AggregatorConfig, n_agents: int = 100, state=None) -> Coordinator:
    c = Coordinator(cfg, FedAvg(), state=state)
    c.start(0.0)
    for i in range(n_agents):
        c.receive(*status(f"a{i:03d}"), now=0.0)
    return c


def test_poisson_selection_rate_matches_q():
    c = started(dp_config(), n_agents=100)
    sizes = []
    for _ in range(40):
        sizes.append(len(c.open.selected))
        run_rounds(c, max_rounds=1)
    # q = 10 / 100: Binomial(100, 0.1) round sizes, mean 10
    assert abs(np.mean(sizes) - 10) < 2.5 and np.std(sizes) > 1.0  # not a fixed-size sample


def test_budget_stop_at_the_predicted_round_and_resume_continues_the_accounting():
    budget = 4.0
    cfg = dp_config(budget=budget, noise_multiplier=1.0)
    # the last round whose epsilon stays within the budget: q = 0.1, z = 1, delta 1e-5
    predicted = 1
    while epsilon_for(100, 10, predicted + 1, 1.0, 1e-5) <= budget:
        predicted += 1
    c = started(cfg)
    actions = run_rounds(c, max_rounds=predicted + 20)
    fin = [a for a in actions if isinstance(a, Finished)]
    assert len(fin) == 1 and c.round == predicted and "privacy budget exhausted" in fin[0].reason
    closes = [a.summary for a in actions if isinstance(a, RoundClosed)]
    eps = [s.metrics["epsilon"] for s in closes]
    assert eps == sorted(eps) and eps[-1] <= budget
    assert eps[-1] == pytest.approx(epsilon_for(100, 10, predicted, 1.0, 1e-5), rel=1e-6)
    ckpt = [a.state for a in actions if isinstance(a, SaveCheckpoint)][-1]
    assert ckpt["privacy"]["epsilon"] == pytest.approx(eps[-1])

    # a resumed run with a larger budget continues from the spent epsilon, not from zero
    cfg2 = dp_config(budget=budget + 1.0, noise_multiplier=1.0)
    resumed = started(cfg2, state=ckpt)
    assert resumed.privacy.accountant.rounds == predicted
    more = run_rounds(resumed, max_rounds=3)
    first_new = next(a.summary for a in more if isinstance(a, RoundClosed))
    assert first_new.metrics["epsilon"] == pytest.approx(epsilon_for(100, 10, predicted + 1, 1.0, 1e-5), rel=1e-6)


def test_dp_config_errors_name_the_key():
    from edge_agent.config import ConfigError, from_dict

    with pytest.raises(ConfigError, match="privacy.mode"):
        from_dict(AggregatorConfig, {"privacy": {"mode": "maybe"}})
    with pytest.raises(ConfigError, match="privacy.expected_per_round"):
        from_dict(AggregatorConfig, {"privacy": {"mode": "central"}})
    with pytest.raises(ConfigError, match="privacy.count_stddev"):
        from_dict(AggregatorConfig, {"privacy": {"mode": "central", "expected_per_round": 20, "adaptive_clip": True,
                                                 "noise_multiplier": 3.0}})
    with pytest.raises(ConfigError, match="privacy.population"):
        from_dict(AggregatorConfig, {"privacy": {"mode": "central", "target_epsilon": 3.0, "expected_per_round": 5}})


@pytest.mark.broker
def test_a_dp_demo_over_the_broker_reports_epsilon_every_round(tmp_path):
    from aggregator.demo import DemoOptions, run_demo

    out = io.StringIO()
    result = run_demo(DemoOptions(agents=20, rounds=4, dp="central", noise=0.8, clip=1.0, expected=10,
                                  out=str(tmp_path / "o")), out)
    eps = [s.metrics["epsilon"] for s in result.rounds]
    assert len(eps) == 4 and all(e > 0 for e in eps) and eps == sorted(eps)
    assert out.getvalue().count("epsilon") >= 4
    assert eps[-1] == pytest.approx(epsilon_for(20, 10, 4, 0.8, 1e-5), rel=1e-6)


def test_pld_refuses_noise_it_cannot_account_in_time():
    from edge_agent.config import ConfigError, from_dict

    with pytest.raises(ConfigError, match="privacy.accountant"):
        from_dict(AggregatorConfig, {"privacy": {"mode": "central", "expected_per_round": 5, "accountant": "pld",
                                                 "noise_multiplier": 0.05}})
