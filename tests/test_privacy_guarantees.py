"""The ε fedmqtt reports against the ε of the mechanism it really runs.

Every reference here is either measured on the running code (how far one
device moves a released quantity, how much noise really protects a device,
how often a device is really included) or computed by dp-accounting from
those measurements. None of them re-derives fedmqtt's own formulas.
"""

from __future__ import annotations

import math

import dp_accounting as dpa
import numpy as np
import pytest
from dp_accounting import rdp

from aggregator.config import AggregatorConfig, ModelConfig, PrivacyConfig, RoundConfig
from aggregator.coordinator import Coordinator, RoundClosed
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

FED = "dpg"
T = Topics(FED)
DELTA = 1e-5
ROUNDS = 100
TINY = {"W0": np.zeros((1, 1), np.float32), "b0": np.zeros(1, np.float32)}


def config(mode="central", rounds=0, **privacy) -> AggregatorConfig:
    p = dict(mode=mode, clip=1.0, noise_multiplier=1.0, expected_per_round=10, population=100)
    p.update(privacy)
    return AggregatorConfig(
        federation=FED, rounds=rounds,
        model=ModelConfig(kind="linear", n_features=1, n_outputs=1),
        round=RoundConfig(min_agents=1, quorum=1, timeout=10.0),
        privacy=PrivacyConfig(**p),
    )


class RecordingZeroNoise:
    """A noise source that returns zeros and records every std the code asks it for.

    With it the mechanism's pre-noise outputs can be read exactly, and the
    noise the running code requests is known exactly (that SecureRandom
    delivers the requested std is tested on its own below).
    """

    def __init__(self) -> None:
        self.calls: list[tuple[float, object]] = []

    def normal(self, loc=0.0, scale=1.0, size=None):
        self.calls.append((float(scale), size))
        return 0.0 if size is None else np.zeros(size)

    def random(self, size=None):
        raise AssertionError("the noise source must not be used for the selection")


def reference_epsilon(q: float, noise_multipliers: list[float], rounds: int) -> float:
    """dp-accounting's ε for ``rounds`` Poisson-sampled rounds of these Gaussian mechanisms composed."""
    inner = dpa.ComposedDpEvent([dpa.GaussianDpEvent(z) for z in noise_multipliers])
    acc = rdp.RdpAccountant()
    acc.compose(dpa.PoissonSampledDpEvent(q, inner), rounds)
    return acc.get_epsilon(DELTA)


def reported_epsilon(engine: PrivacyEngine, q: float, rounds: int) -> float:
    eps = 0.0
    for _ in range(rounds):
        eps = engine.charge(q)["epsilon"]
    return eps


# -- item 1: adaptive clipping --------------------------------------------------------

def _released(engine: PrivacyEngine, updates: list[tuple[dict, bool]]) -> tuple[np.ndarray, float]:
    """(noised sum, noised count of unclipped updates) the running code derives from ``updates``."""
    agg = engine.wrap(FedAvg())
    agg.begin(TINY)
    for delta, within in updates:
        agg.add(delta, 1.0, {"dp_unclipped": 1.0 if within else 0.0})
    out = agg.result(TINY)
    flat = np.concatenate([out[k].ravel() for k in sorted(out)]).astype(np.float64)
    # the aggregator divides by the expected count (fixed denominator): undo it to get the sum and the count
    return flat * engine.expected, (agg.noised_fraction - 0.5) * engine.expected


def measure_adaptive_mechanism(engine: PrivacyEngine, noise: RecordingZeroNoise) -> dict[str, float]:
    """Sensitivities of the released sum and count (one device more, noise off) and the noise stds drawn."""
    small = {"W0": np.full((1, 1), 0.1, np.float32), "b0": np.zeros(1, np.float32)}   # within S = 1
    big = {"W0": np.full((1, 1), 30.0, np.float32), "b0": np.full(1, 40.0, np.float32)}  # norm 50: clipped
    base = [(small, True)] * 5 + [(big, False)] * 5
    sum0, count0 = _released(engine, base)
    # neighbours: one device more, within the clip norm or not (the worst of the two is the sensitivity)
    sum_in, count_in = _released(engine, base + [(small, True)])
    sum_out, count_out = _released(engine, base + [(big, False)])
    stds = {size is None: scale for scale, size in noise.calls}  # count noise is drawn as a scalar
    return {"sum_sensitivity": max(np.linalg.norm(sum_in - sum0), np.linalg.norm(sum_out - sum0)),
            "count_sensitivity": max(abs(count_in - count0), abs(count_out - count0)),
            "sum_std": stds[False], "count_std": stds[True]}


@pytest.mark.parametrize("expected,reviewer_reported,reviewer_true", [(100, 7.90, 8.13), (40, 3.29, 3.99), (20, 1.84, 3.81)])
def test_adaptive_clipping_reports_the_epsilon_of_the_sum_and_count_it_releases(expected, reviewer_reported,
                                                                                 reviewer_true):
    cfg = config(adaptive_clip=True, expected_per_round=expected, population=1000, noise_multiplier=1.0)
    noise = RecordingZeroNoise()
    engine = PrivacyEngine(cfg, noise=noise)
    m = measure_adaptive_mechanism(engine, noise)
    sum_sensitivity, count_sensitivity = m["sum_sensitivity"], m["count_sensitivity"]
    sum_std, count_std = m["sum_std"], m["count_std"]
    assert sum_sensitivity == pytest.approx(cfg.privacy.clip, rel=1e-5)  # a clipped device moves the sum by S

    q = expected / 1000
    reference = reference_epsilon(q, [sum_std / sum_sensitivity, count_std / count_sensitivity], ROUNDS)
    reported = reported_epsilon(engine, q, ROUNDS)
    assert reported == pytest.approx(reference, rel=1e-6)
    # the reviewer's figures: what was reported before is what is true now, and the mechanism that
    # summed raw bits (sensitivity 1) would have been worth the larger figure
    assert reported == pytest.approx(reviewer_reported, abs=0.01)
    assert reference_epsilon(q, [sum_std / sum_sensitivity, count_std / 1.0], ROUNDS) == pytest.approx(
        reviewer_true, abs=0.01)


@pytest.mark.parametrize("mode", ["local", "distributed"])
def test_devices_send_their_bit_noised_and_centred(mode):
    cfg = config(mode=mode, adaptive_clip=True, expected_per_round=40, population=1000, min_clients=5)
    engine = PrivacyEngine(cfg)
    clip, std, count_std = engine.task_noise()
    assert count_std > 0
    spec = ModelSpec("linear", 1, 1)
    X = np.zeros((4, 1), np.float32)
    bits = []
    for i in range(400):
        core = AgentCore(f"a{i}", FED, LocalData(X, np.zeros(4, np.float32), X[:0], np.zeros(0, np.float32)))
        params = BuiltinModel(spec).init_params(0)
        m = wire.ModelMsg(FED, 0, wire.params_version(params), spec, params)
        core.receive(T.model, wire.encode(m))
        task = wire.TaskMsg(FED, 1, m.version, "open", 0, 0.0, wire.TrainConfig(
            0, 1, 0.1, clip_norm=clip, noise_std=std, dp_mode=mode, count_noise_std=count_std))
        deliver_task(core, task)
        (pub,) = [a for a in core.train(1, 0) if isinstance(a, Publish)]
        upd = wire.decode(pub.payload, expect="update")
        assert set(upd.metrics) == {"dp_bit"} and upd.num_samples == 1
        bits.append(upd.metrics["dp_bit"])
    # zero training: every update is within the clip norm, so each bit is +1/2 plus the device's share
    assert abs(np.mean(bits) - 0.5) < 5 * count_std / math.sqrt(len(bits))
    assert abs(np.std(bits) / count_std - 1) < 5 / math.sqrt(2 * len(bits))


# -- item 2: distributed noise that protects each device --------------------------------

BIG = ModelSpec("linear", 20_000, 1)


def _agent_update(agent: str, engine: PrivacyEngine) -> dict[str, np.ndarray]:
    """A real agent's update for a task from ``engine`` (zero epochs: its clean delta is 0, so it is pure noise)."""
    clip, std, count_std = engine.task_noise()
    X = np.zeros((3, BIG.n_features), np.float32)
    core = AgentCore(agent, FED, LocalData(X, np.zeros(3, np.float32), X[:0], np.zeros(0, np.float32)))
    params = BuiltinModel(BIG).init_params(0)
    m = wire.ModelMsg(FED, 0, wire.params_version(params), BIG, params)
    core.receive(T.model, wire.encode(m))
    deliver_task(core, wire.TaskMsg(FED, 1, m.version, "open", 0, 0.0, wire.TrainConfig(
        0, 1, 0.1, clip_norm=clip, noise_std=std, dp_mode=engine.cfg.mode, count_noise_std=count_std)))
    (pub,) = [a for a in core.train(1, 0) if isinstance(a, Publish)]
    return wire.decode(pub.payload, expect="update").delta


def measure_protecting_noise(engine: PrivacyEngine, n: int) -> float:
    """Std of the noise in the released sum that device 0 did not add itself, with ``n`` real agents' updates."""
    zero = BuiltinModel(BIG).init_params(0)
    updates = [_agent_update(f"a{i}", engine) for i in range(n)]
    agg = engine.wrap(FedAvg())
    agg.begin(zero)
    for u in updates:
        agg.add(u, 1.0, {})
    out = agg.result(zero)
    released_sum = {k: out[k].astype(np.float64) * engine.expected for k in out}
    protecting = np.concatenate([(released_sum[k] - updates[0][k]).ravel() for k in sorted(out)])
    return float(protecting.std())


@pytest.mark.parametrize("min_clients,n", [(2, 1), (2, 2), (2, 5), (5, 3), (5, 5), (5, 8)])
def test_distributed_noise_that_is_not_the_device_own_protects_it_by_z_s(min_clients, n):
    z, s = 1.0, 1.0
    cfg = config(mode="distributed", noise_multiplier=z, clip=s, min_clients=min_clients,
                 expected_per_round=100, population=1000)
    engine = PrivacyEngine(cfg)
    measured = measure_protecting_noise(engine, n)
    tol = 5 / math.sqrt(2 * BIG.num_params())
    assert measured / (z * s) > 1 - tol  # at least z S, also at the boundary n = min_clients and below it
    if n <= min_clients:
        assert measured / (z * s) < 1 + tol  # and not more than needed
    # the accountant charges z; dp-accounting on the noise that really protects a device agrees at the boundary
    q = 0.1
    reported = reported_epsilon(engine, q, ROUNDS)
    reference = reference_epsilon(q, [measured / s], ROUNDS)
    assert reported >= reference * 0.97  # never below the true figure
    if n <= min_clients:
        assert reported == pytest.approx(reference, rel=0.03)


def test_reviewer_case_distributed_default_min_clients():
    # q = 0.1, 100 rounds, m = 2: reported before 7.90 while a device had only z/sqrt(2) protecting it (16.1)
    engine = PrivacyEngine(config(mode="distributed", min_clients=2, expected_per_round=100, population=1000))
    _, share, _ = engine.task_noise()
    assert share == pytest.approx(1.0)  # shares of z S / sqrt(m - 1): the one other share carries z S
    assert reference_epsilon(0.1, [1 / math.sqrt(2)], ROUNDS) == pytest.approx(16.1, abs=0.05)
    assert reported_epsilon(engine, 0.1, ROUNDS) == pytest.approx(reference_epsilon(0.1, [share], ROUNDS), rel=1e-9)


# -- item 3: the sampling that is charged is the sampling that happens --------------------

def test_every_device_is_included_at_the_rate_that_is_charged():
    """10,000 rounds with empty draws and dropouts: inclusion frequency per device against the charged q."""
    n_agents, rounds = 10, 10_000
    cfg = config(expected_per_round=1, population=n_agents)  # q = 0.1: a third of the draws are empty
    c = Coordinator(cfg, FedAvg())
    c.privacy.sampler = np.random.default_rng(20261202)  # deterministic draws; the rule under test is unchanged
    drop = np.random.default_rng(7)
    agents = [f"a{i}" for i in range(n_agents)]
    now = 0.0
    c.start(now)
    for a in agents:
        c.receive(T.status(a), wire.encode(wire.StatusMsg(FED, 0, a, "online", 10, ["linear"])), now)
    included = dict.fromkeys(agents, 0)
    charged_rounds = 0
    while charged_rounds < rounds:
        o = c.open
        assert o is not None  # DP never leaves a gap: the next draw opens as the last round closes
        for a in o.selected:
            included[a] += 1
            if drop.random() < 0.3:
                continue  # this device dropped out: the round goes on without it
            upd = wire.UpdateMsg(FED, o.round, a, c.version, 10, TINY, {"dp_unclipped": 1.0})
            c.receive(T.update(a), wire.encode(upd), now)
        if c.open is o:
            now = o.deadline  # short of its target, or empty: released at the deadline or next tick
            c.tick(now)
        assert c.open is not o
        charged_rounds += 1
        assert c.privacy.accountant.rounds == charged_rounds  # every drawn round is charged exactly once
    (q_charged,) = {run[0] for run in c.privacy.accountant.events()}
    assert q_charged == pytest.approx(0.1)
    se = math.sqrt(q_charged * (1 - q_charged) / rounds)
    freq = {a: k / rounds for a, k in included.items()}
    assert all(abs(f - q_charged) < 3 * se for f in freq.values()), freq
    assert abs(np.mean(list(freq.values())) - q_charged) < 3 * se / math.sqrt(n_agents)


# -- item 4: target epsilon needs a horizon and stops there -------------------------------

def test_target_epsilon_without_rounds_is_a_config_error_naming_the_key():
    from edge_agent.config import ConfigError, from_dict

    with pytest.raises(ConfigError, match="privacy.target_epsilon"):
        from_dict(AggregatorConfig, {"rounds": 0, "privacy": {"mode": "central", "target_epsilon": 3.0,
                                                              "expected_per_round": 10, "population": 100}})


def test_target_epsilon_is_never_passed():
    cfg = config(target_epsilon=2.0, rounds=30)
    c = Coordinator(cfg, FedAvg())
    c.start(0.0)
    for i in range(100):
        c.receive(T.status(f"a{i:03d}"), wire.encode(wire.StatusMsg(FED, 0, f"a{i:03d}", "online", 10, ["linear"])), 0.0)
    eps = []
    now = 0.0
    for _ in range(60):
        if c.finished:
            break
        o = c.open
        for a in o.selected:
            out = c.receive(T.update(a), wire.encode(wire.UpdateMsg(FED, o.round, a, c.version, 10, TINY, {})), now)
            eps += [x.summary.metrics["epsilon"] for x in out if isinstance(x, RoundClosed)]
        if c.open is o:
            out = c.tick(o.deadline)
            eps += [x.summary.metrics["epsilon"] for x in out if isinstance(x, RoundClosed)]
        now += 1.0
    assert c.finished and len(eps) <= 30 and max(eps) <= 2.0
    # the planned noise spends close to the target over the horizon, checked with dp-accounting
    assert reference_epsilon(0.1, [c.privacy.noise_multiplier], len(eps)) == pytest.approx(eps[-1], rel=1e-6)
    assert eps[-1] > 1.9


# -- item 5: the noise source ---------------------------------------------------------------

def test_secure_random_draws_the_gaussian_it_is_asked_for():
    from scipy import stats

    draws = dp.SecureRandom().normal(0.0, 2.5, 200_000)
    assert stats.kstest(draws / 2.5, "norm").pvalue > 1e-4
    u = dp.SecureRandom().random(200_000)
    assert u.min() >= 0.0 and u.max() < 1.0 and stats.kstest(u, "uniform").pvalue > 1e-4
    # two draws never repeat each other (no fixed seed anywhere)
    assert not np.array_equal(dp.SecureRandom().normal(0.0, 1.0, 8), dp.SecureRandom().normal(0.0, 1.0, 8))


def test_dp_noise_and_the_public_selection_have_separate_secure_sources():
    engine = PrivacyEngine(config())
    assert isinstance(engine.noise, dp.SecureRandom) and isinstance(engine.sampler, dp.SecureRandom)
    assert engine.noise is not engine.sampler
    recorder = RecordingZeroNoise()
    engine = PrivacyEngine(config(), noise=recorder)
    engine.select([f"a{i}" for i in range(50)], 0.5)  # the selection never touches the noise source
    assert recorder.calls == []


# -- item 6: nothing unaccounted leaves -------------------------------------------------------

def test_dp_metrics_publish_nothing_per_device():
    cfg = config()
    c = Coordinator(cfg, FedAvg())
    c.start(0.0)
    for i in range(40):
        c.receive(T.status(f"a{i:02d}"), wire.encode(wire.StatusMsg(FED, 0, f"a{i:02d}", "online", 10, ["linear"])), 0.0)
    c.receive(T.update("a00"), b"garbage", 0.0)  # a rejection, counted in the aggregator's log only
    o = c.open
    out = []
    for a in o.selected[:-1]:  # one dropout
        out += c.receive(T.update(a), wire.encode(wire.UpdateMsg(FED, o.round, a, c.version, 10, TINY,
                                                                 {"train_loss": 0.3, "dp_unclipped": 1.0})), 1.0)
    out += c.tick(o.deadline)
    (pub,) = [a for a in out if isinstance(a, Publish) and a.topic == T.metrics]
    m = wire.decode(pub.payload, expect="metrics")
    assert m.participants == 0
    public = {"epsilon", "epsilon_budget", "delta", "noise_multiplier", "sampling_rate", "clip"}  # budget: a setting
    assert set(m.metrics) <= public
    assert {"epsilon", "clip"} <= set(m.metrics)
    assert all(set(h) <= {"round", *public} for h in m.history)


def test_a_device_stops_publishing_its_sample_count_once_it_sees_a_dp_task():
    X = np.zeros((7, 1), np.float32)
    core = AgentCore("a0", FED, LocalData(X, np.zeros(7, np.float32), X[:0], np.zeros(0, np.float32)))
    assert wire.decode(core.status().payload, expect="status").num_samples == 7
    spec = ModelSpec("linear", 1, 1)
    params = BuiltinModel(spec).init_params(0)
    core.receive(T.model, wire.encode(wire.ModelMsg(FED, 0, wire.params_version(params), spec, params)))
    out = core.receive(T.task, wire.encode(wire.TaskMsg(FED, 1, wire.params_version(params), "open", 0, 0.0,
                                                        wire.TrainConfig(clip_norm=1.0, dp_mode="central"))))
    (status,) = [a for a in out if isinstance(a, Publish) and a.topic == T.status("a0")]
    assert wire.decode(status.payload, expect="status").num_samples == 0


@pytest.mark.parametrize("sigma", [0.7, 3.0])
def test_discrete_gaussian_has_the_pmf_of_canonne_kamath_steinke(sigma):
    from scipy import stats

    x = dp.discrete_gaussian(sigma, 300_000)
    ks = np.arange(-int(6 * sigma) - 1, int(6 * sigma) + 2)
    pmf = np.exp(-ks.astype(float) ** 2 / (2 * sigma * sigma))
    pmf /= pmf.sum()
    observed = np.array([(x == k).sum() for k in ks])
    assert observed.sum() == x.size  # nothing beyond 6 sigma at this sample size
    # Chi-square needs an expected count of about 5 in every bin: each far tail is pooled with the
    # outermost bin that expects 5 or more (a single legitimate draw at |k| = 17 for sigma 3, expected
    # 0.004 times, once made p 1e-33; pooled into a bin of its own, one at |k| = 5 for sigma 0.7 did too).
    expected = pmf * x.size
    core = expected >= 5
    lo, hi = np.argmax(core), len(core) - np.argmax(core[::-1])
    obs = np.r_[observed[:lo + 1].sum(), observed[lo + 1:hi - 1], observed[hi - 1:].sum()]
    exp = np.r_[expected[:lo + 1].sum(), expected[lo + 1:hi - 1], expected[hi - 1:].sum()]
    assert exp.min() >= 5 and exp.sum() == pytest.approx(x.size)
    assert stats.chisquare(obs, exp).pvalue > 1e-4
    assert x.dtype == np.int64


def test_discrete_gaussian_at_a_large_scale_has_the_variance_asked_for():
    x = dp.discrete_gaussian(1e7, 100_000).astype(np.float64)
    assert abs(x.std() / 1e7 - 1) < 5 / math.sqrt(2 * x.size) and abs(x.mean()) < 5e7 / math.sqrt(x.size)
