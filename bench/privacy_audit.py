"""Privacy audit: the ε fedmqtt reports next to dp-accounting's ε for the mechanism as it runs.

For each case the script measures the running code: how far one device
moves the released sum and the released count (noise switched off), which
noise standard deviations the code draws, and (distributed mode) how much
of the released noise a device did not add itself (real agents, real noise,
20,001 coordinates). dp-accounting then composes those measured Gaussian
mechanisms, Poisson-subsampled, over the rounds; fedmqtt's figure is what
its PrivacyEngine reports after charging the same rounds.

Cases: the reviewer's three adaptive-clipping cases of issue 10 (z = 1,
population 1000, 100 rounds, δ = 1e-5, expected 100, 40 and 20 per round)
and distributed mode with the default min_clients = 2 at q = 0.1.

Run: .venv/bin/python bench/privacy_audit.py
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import dp_accounting as dpa
import numpy as np
from dp_accounting import rdp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from aggregator.config import AggregatorConfig, ModelConfig, PrivacyConfig, RoundConfig  # noqa: E402
from aggregator.privacy import PrivacyEngine  # noqa: E402
from aggregator.strategies import FedAvg  # noqa: E402
from edge_agent import wire  # noqa: E402
from edge_agent.agent import AgentCore  # noqa: E402
from edge_agent.data import LocalData  # noqa: E402
from edge_agent.models import Model  # noqa: E402
from edge_agent.mqtt import Publish  # noqa: E402
from edge_agent.spec import ModelSpec  # noqa: E402
from edge_agent.topics import Topics  # noqa: E402

DELTA, ROUNDS, POPULATION = 1e-5, 100, 1000
TINY = {"W0": np.zeros((1, 1), np.float32), "b0": np.zeros(1, np.float32)}
BIG = ModelSpec("linear", 20_000, 1)
T = Topics("audit")


def config(**privacy) -> AggregatorConfig:
    p = dict(mode="central", clip=1.0, noise_multiplier=1.0, population=POPULATION)
    p.update(privacy)
    return AggregatorConfig(federation="audit", rounds=0, model=ModelConfig(kind="linear", n_features=1, n_outputs=1),
                            round=RoundConfig(min_agents=1, quorum=1, timeout=10.0), privacy=PrivacyConfig(**p))


class ZeroNoise:
    """Returns zeros and remembers the standard deviations asked for."""

    def __init__(self) -> None:
        self.stds: dict[bool, float] = {}

    def normal(self, loc=0.0, scale=1.0, size=None):
        self.stds[size is None] = float(scale)  # the count is drawn as a scalar, the sum as arrays
        return 0.0 if size is None else np.zeros(size)

    def random(self, size=None):
        raise AssertionError("the selection has its own source")


def dp_accounting_epsilon(q: float, multipliers: list[float]) -> float:
    acc = rdp.RdpAccountant()
    inner = dpa.ComposedDpEvent([dpa.GaussianDpEvent(z) for z in multipliers])
    acc.compose(dpa.PoissonSampledDpEvent(q, inner), ROUNDS)
    return acc.get_epsilon(DELTA)


def reported(engine: PrivacyEngine, q: float) -> float:
    eps = 0.0
    for _ in range(ROUNDS):
        eps = engine.charge(q)["epsilon"]
    return eps


def released(engine: PrivacyEngine, updates: list[tuple[dict, bool]]) -> tuple[np.ndarray, float]:
    agg = engine.wrap(FedAvg())
    agg.begin(TINY)
    for delta, within in updates:
        agg.add(delta, 1.0, {"dp_unclipped": 1.0 if within else 0.0})
    out = agg.result(TINY)
    flat = np.concatenate([out[k].ravel() for k in sorted(out)]).astype(np.float64)
    return flat * engine.expected, (agg.noised_fraction - 0.5) * engine.expected


def adaptive_case(expected: int) -> tuple[str, float, float, str]:
    noise = ZeroNoise()
    engine = PrivacyEngine(config(adaptive_clip=True, expected_per_round=expected), noise=noise)
    small = {"W0": np.full((1, 1), 0.1, np.float32), "b0": np.zeros(1, np.float32)}
    big = {"W0": np.full((1, 1), 30.0, np.float32), "b0": np.full(1, 40.0, np.float32)}
    base = [(small, True)] * 5 + [(big, False)] * 5
    s0, c0 = released(engine, base)
    s1, c1 = released(engine, base + [(small, True)])
    s2, c2 = released(engine, base + [(big, False)])
    d_sum = max(np.linalg.norm(s1 - s0), np.linalg.norm(s2 - s0))
    d_count = max(abs(c1 - c0), abs(c2 - c0))
    q = expected / POPULATION
    ref = dp_accounting_epsilon(q, [noise.stds[False] / d_sum, noise.stds[True] / d_count])
    how = (f"sum std {noise.stds[False]:.4f} / sensitivity {d_sum:.3f}; "
           f"count std {noise.stds[True]:.3f} / sensitivity {d_count:.3f}")
    return f"adaptive clipping, expected {expected}", reported(engine, q), ref, how


def distributed_case(min_clients: int, n: int) -> tuple[str, float, float, str]:
    engine = PrivacyEngine(config(mode="distributed", min_clients=min_clients, expected_per_round=100))
    clip, std, count_std = engine.task_noise()
    params = Model(BIG).init_params(0)
    model = wire.ModelMsg("audit", 0, wire.params_version(params), BIG, params)
    updates = []
    for i in range(n):
        X = np.zeros((3, BIG.n_features), np.float32)
        core = AgentCore(f"a{i}", "audit", LocalData(X, np.zeros(3, np.float32), X[:0], np.zeros(0, np.float32)))
        core.receive(T.model, wire.encode(model))
        core.receive(T.task, wire.encode(wire.TaskMsg("audit", 1, model.version, "open", 0, 0.0, [f"a{i}"],
                                                      wire.TrainConfig(0, 1, 0.1, clip_norm=clip, noise_std=std,
                                                                       dp_mode="distributed"))))
        (pub,) = [a for a in core.train(1, 0) if isinstance(a, Publish)]
        updates.append(wire.decode(pub.payload, expect="update").delta)
    agg = engine.wrap(FedAvg())
    agg.begin(params)
    for u in updates:
        agg.add(u, 1.0, {})
    out = agg.result(params)
    protecting = np.concatenate([(out[k].astype(np.float64) * engine.expected - updates[0][k]).ravel()
                                 for k in sorted(out)])
    measured = float(protecting.std())
    ref = dp_accounting_epsilon(0.1, [measured / clip])
    how = f"noise not its own protecting one device: std {measured:.4f} (clip {clip:g}), {n} updates"
    return f"distributed, min_clients {min_clients}, {n} updates", reported(engine, 0.1), ref, how


def main() -> None:
    logging.getLogger("absl").setLevel(logging.ERROR)  # dp-accounting's harmless order warnings
    rows = [adaptive_case(e) for e in (100, 40, 20)] + [distributed_case(2, 2), distributed_case(2, 1)]
    print(f"z = 1, {ROUNDS} rounds, delta {DELTA:g}, population {POPULATION}, RDP")
    print(f"{'case':<40} {'fedmqtt reports':>16} {'dp-accounting':>14}   measured")
    for name, rep, ref, how in rows:
        print(f"{name:<40} {rep:>16.3f} {ref:>14.3f}   {how}")


if __name__ == "__main__":
    main()
