"""Experiment 4: client-level differential privacy (DP-FedAvg), accuracy versus epsilon.

Digits, softmax, **1000 simulated agents** (IID: 1437 training samples cut
into 1000 near-equal parts, so 437 agents hold 2 samples and 563 hold 1),
100 rounds, E = 5 local epochs, batch 32, lr 0.1, FedAvg. Every DP run uses
the real Coordinator's privacy engine (aggregator/privacy.py):

- Poisson selection with q = expected_per_round / population = 100 / 1000;
- every update clipped to L2 norm S = 1.0 (the PrivacyConfig default),
  uniformly weighted, the noised sum divided by the *expected* 100 devices
  (fixed-denominator estimator);
- Gaussian noise z·S on the sum (``central``), z·S on *every* update
  (``local``, i.e. sqrt(#updates) ~ 10x more noise on the sum) or a share
  z·S/sqrt(m-1) on every update (``distributed``, m = ``min_clients``; with
  m = 2 that is z·S per update, the same noise on the sum as ``local``);
- the accountant (RDP, dp-accounting) charges one Poisson-subsampled
  Gaussian per released model; ε is reported at δ = 1e-5 (< 1/N = 1e-3).

Arms (``--arms``): ``nodp`` (privacy off: 100 agents drawn uniformly without
replacement, sample-weighted FedAvg), ``clip`` (central, z = 0.01: clipping,
Poisson selection and the fixed denominator with negligible noise),
``z0.5``, ``z1``, ``z2``, ``z4``, ``z8`` (central), ``local1`` (local, z = 1),
``dist1`` (distributed, z = 1, min_clients = 2), ``adaptive1`` (central,
z = 1, adaptive clipping from S = 1.0 towards the median update norm,
η_C = 0.2, count noise σ_b = 100/20 = 5), ``secagg1`` (distributed, z = 1,
inside secure aggregation: ``SecAggConfig(mode="secagg+")`` with the default
degree 2·ceil(log2 n) >= 4 and threshold t = a majority of each device's
peers; every device clips, rotates, rounds to the integer grid and adds a
discrete Gaussian share z·Δ/sqrt(t-1) before masking, so the aggregator sees
only the noised sum; ``[round] min_agents`` = the population, as the config
check asks). Each arm runs
with ``--seeds`` (selection, local-training seeds and DP noise; the data split
is always ``--data-seed``).

The noise. The library draws DP noise from OS entropy on purpose (noise that
can be reproduced protects nothing). To make this experiment reproducible,
this script — and only this script — replaces those generators by seeded
ones, per run: the aggregator's ``PrivacyEngine.noise`` and ``.sampler`` and
the agents' ``edge_agent.dp.add_gaussian_noise`` default source; for the
secure-aggregation arm also the devices' discrete Gaussian shares and
stochastic-rounding uniforms (``discrete_gaussian`` and ``crypto_uniform``
as ``edge_agent.secagg.client`` looks them up) and the round's public
rotation seed (``aggregator.secagg.ddg_params``, as the coordinator looks it
up). The masks, keys, Shamir shares and SecAgg+ neighbour graph stay on the
OS CSPRNG: the masks cancel exactly in the sum and no device drops out, so
they do not change the released model. The distributions are the same.
``--os-noise`` keeps the production generators (then runs differ).
The seeding, and the recording of the coordinator's round summaries (ε and
the clip norm per round, which the harness's RoundRecord does not carry), go
through a Coordinator subclass given to the harness for the duration of a
run (``harness.Coordinator`` is swapped and restored).

Besides ε (the coordinator's metric, checked against
``accounting.epsilon_for``; PLD as well, except below z = 0.3 where PLD takes
minutes), the summary gives the un-amplified ε for an observer who knows in
which rounds a device took part (k = qR participations, noise multiplier
z/2 for replace-one; see docs/results.md).

Outputs in ``--out`` (default docs/results/exp4_privacy/):
  exp4_rounds.csv      one row per arm, seed and round (accuracy, loss, ε, clip, selected)
  exp4_final.csv       one row per arm and seed (final accuracy, ε from the coordinator and
                       from accounting.epsilon_for, gap to the no-DP run of the same seed)
  exp4_summary.csv     one row per arm (means over seeds, ε with RDP and PLD, known-participation ε)
  exp4_table.md        the markdown table of docs/results.md
  exp4_accuracy.png    accuracy per round (mean over seeds, min-max band) and ε per round
  exp4_accuracy_vs_epsilon.png  final accuracy versus ε
  run.txt              command, machine, date, wall time, update norms at the initial model

Run from the repository root:
  .venv/bin/python bench/experiments/exp4_privacy.py [--rounds 100] [--seeds 0 1 2]
      [--arms nodp clip z0.5 z1 z2 z4 z8 local1 dist1 adaptive1 secagg1] [--jobs 2] [--os-noise]
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import numpy as np  # noqa: E402

from aggregator.accounting import MIN_NOISE_MULTIPLIER, epsilon_for  # noqa: E402
from aggregator.config import ModelConfig, PrivacyConfig, SecAggConfig, TrainingConfig  # noqa: E402
from aggregator.coordinator import Coordinator  # noqa: E402
from aggregator.datasets import FederatedData, federated_digits  # noqa: E402
from bench.experiments import harness as H  # noqa: E402
from edge_agent import dp, wire  # noqa: E402
from edge_agent.models import BuiltinModel, subtract  # noqa: E402
from edge_agent.training import round_seed, train_local  # noqa: E402

NAME = "exp4_privacy"
# Streams of the seeded DP noise (only with seeded noise, see the module doc).
CENTRAL_NOISE_STREAM = 0xD9
LOCAL_NOISE_STREAM = 0x10C
SELECTION_STREAM = 0x5E1  # the Poisson draw has its own source, as in production
DDG_NOISE_STREAM = 0xDD6  # secure aggregation: the devices' discrete Gaussian shares
DDG_ROUNDING_STREAM = 0x50D  # ... their stochastic rounding
ROTATION_STREAM = 0x20A  # ... the round's public rotation seed


@dataclass(frozen=True)
class Arm:
    key: str
    mode: str  # off | central | local | distributed
    z: float = 0.0
    adaptive: bool = False
    label: str = ""
    min_clients: int = 2  # distributed: each device adds z·S/sqrt(min_clients - 1)
    secagg: str = ""  # "secagg+": distributed DP inside secure aggregation (min_clients unused)


ARMS = {a.key: a for a in (
    Arm("nodp", "off", label="no DP"),
    Arm("clip", "central", 0.01, label="clip only (z = 0.01)"),
    Arm("z0.5", "central", 0.5, label="central z = 0.5"),
    Arm("z1", "central", 1.0, label="central z = 1"),
    Arm("z2", "central", 2.0, label="central z = 2"),
    Arm("z4", "central", 4.0, label="central z = 4"),
    Arm("z8", "central", 8.0, label="central z = 8"),
    Arm("local1", "local", 1.0, label="local z = 1"),
    Arm("dist1", "distributed", 1.0, min_clients=2, label="distributed z = 1 (m = 2)"),
    Arm("adaptive1", "central", 1.0, adaptive=True, label="central z = 1, adaptive S"),
    Arm("secagg1", "distributed", 1.0, secagg="secagg+", label="SecAgg+ with distributed DP z = 1"),
)}
CENTRAL_SWEEP = ("nodp", "clip", "z0.5", "z1", "z2", "z4", "z8")
STYLE = {
    "nodp": dict(color="black", linewidth=2.2),
    "clip": dict(color="#7f7f7f", linestyle="--"),
    "z0.5": dict(color="#1f77b4"),
    "z1": dict(color="#2ca02c", linewidth=2.0),
    "z2": dict(color="#ff7f0e"),
    "z4": dict(color="#d62728"),
    "z8": dict(color="#9467bd"),
    "local1": dict(color="#8c564b", linestyle=":", linewidth=2.0),
    "dist1": dict(color="#e377c2", linestyle="--"),
    "adaptive1": dict(color="#17becf", linestyle="-."),
    "secagg1": dict(color="#bcbd22", linewidth=2.0),
}


@dataclass(frozen=True)
class Setup:
    agents: int = 1000
    rounds: int = 100
    expected: int = 100  # expected devices per round: q = expected / agents
    epochs: int = 5
    batch_size: int = 32
    lr: float = 0.1
    clip: float = 1.0
    delta: float = 1e-5
    accountant: str = "rdp"
    target_quantile: float = 0.5
    clip_lr: float = 0.2
    data_seed: int = 0
    seeded_noise: bool = True

    @property
    def q(self) -> float:
        return self.expected / self.agents


# Built once in the parent process; forked workers inherit it.
_DATA: dict[tuple[int, int], FederatedData] = {}


def digits(s: Setup) -> FederatedData:
    key = (s.agents, s.data_seed)
    if key not in _DATA:
        _DATA[key] = federated_digits(s.agents, "iid", 0.0, s.data_seed)
    return _DATA[key]


def config_for(s: Setup, arm: Arm, seed: int):
    cfg = H.make_config(
        federation="exp4", rounds=s.rounds, model=ModelConfig(kind="softmax", n_features=64, n_outputs=10, seed=0),
        training=TrainingConfig(epochs=s.epochs, batch_size=s.batch_size, lr=s.lr),
        n_agents=s.agents, agents_per_round=s.expected, strategy=H.strategy_config("fedavg"), seed=seed,
    )
    privacy = PrivacyConfig(
        mode=arm.mode, clip=s.clip, noise_multiplier=arm.z if arm.mode != "off" else 1.0, delta=s.delta,
        accountant=s.accountant, population=s.agents, expected_per_round=s.expected,
        adaptive_clip=arm.adaptive, target_quantile=s.target_quantile, clip_lr=s.clip_lr,
        min_clients=arm.min_clients,
    )
    cfg = dataclasses.replace(cfg, privacy=privacy)
    if arm.secagg:
        # Every simulated agent is online: a Poisson draw from the whole
        # population is too small for secure aggregation with negligible
        # probability (the config check against delta).
        cfg = dataclasses.replace(cfg, secagg=SecAggConfig(mode=arm.secagg),
                                  round=dataclasses.replace(cfg.round, min_agents=s.agents))
    problems = cfg.problems() + [(f"privacy.{k}", v) for k, v in cfg.privacy.problems()]
    if problems:
        raise ValueError(f"invalid experiment config: {problems}")
    return cfg


def _seed_secagg(seed: int):
    """Seeded sources for the randomness of secure aggregation that reaches the released sum; returns the undo.

    The devices' discrete Gaussian shares and stochastic rounding (looked up
    by ``edge_agent.secagg.client`` at call time) and the round's rotation
    seed (``aggregator.secagg.ddg_params``, imported by the coordinator when
    a round opens). Same distributions; the harness delivers messages in a
    fixed order, so the devices draw from the shared streams in a fixed order.
    """
    from aggregator import secagg as agg_secagg
    from edge_agent.secagg import client as sa_client

    real_ddg, real_dg, real_uniform = agg_secagg.ddg_params, sa_client.discrete_gaussian, sa_client.crypto_uniform
    noise = np.random.default_rng([seed, DDG_NOISE_STREAM])
    rounding = np.random.default_rng([seed, DDG_ROUNDING_STREAM])
    rotation = np.random.default_rng([seed, ROTATION_STREAM])

    def seeded_ddg_params(*a: Any, **kw: Any):
        return dataclasses.replace(real_ddg(*a, **kw), rotation_seed=rotation.bytes(32).hex())

    def seeded_discrete_gaussian(sigma, size, source=None):
        return real_dg(sigma, size, source if source is not None else noise)

    def seeded_uniform(n: int) -> np.ndarray:
        return rounding.random(n)

    agg_secagg.ddg_params = seeded_ddg_params
    sa_client.discrete_gaussian, sa_client.crypto_uniform = seeded_discrete_gaussian, seeded_uniform

    def undo() -> None:
        agg_secagg.ddg_params = real_ddg
        sa_client.discrete_gaussian, sa_client.crypto_uniform = real_dg, real_uniform

    return undo


def run_one(s: Setup, arm: Arm, seed: int) -> dict[str, Any]:
    """One run of ``arm`` with ``seed``: the harness's run plus the coordinator's round summaries."""
    data = digits(s)
    cfg = config_for(s, arm, seed)
    coords: list[Coordinator] = []
    opened: dict[int, tuple[int, int, Any]] = {}  # secure aggregation: round -> (selected, degree, params)

    class RecordingCoordinator(Coordinator):
        def __init__(self, *a: Any, **kw: Any) -> None:
            super().__init__(*a, **kw)
            coords.append(self)
            if s.seeded_noise and self.privacy is not None:
                self.privacy.noise = np.random.default_rng([seed, CENTRAL_NOISE_STREAM])
                self.privacy.sampler = np.random.default_rng([seed, SELECTION_STREAM])

        def _maybe_open(self, now: float):  # records each secure-aggregation attempt's parameters
            out = super()._maybe_open(now)
            if self.secagg is not None and self.open is not None:
                n = len(self.open.selected)
                opened[self.open.round] = (n, self._secagg_degree(n), self.secagg.params)
            return out

    real_coordinator, real_noise = H.Coordinator, dp.add_gaussian_noise
    local_rng = np.random.default_rng([seed, LOCAL_NOISE_STREAM])

    def seeded_noise(delta, std, source=None):
        return real_noise(delta, std, source if source is not None else local_rng)

    H.Coordinator = RecordingCoordinator
    if s.seeded_noise:
        dp.add_gaussian_noise = seeded_noise
    restore_secagg = _seed_secagg(seed) if s.seeded_noise and arm.secagg else (lambda: None)
    try:
        res = H.run_federation(cfg, data.agents, data.X_test, data.y_test, seed=seed)
    finally:
        H.Coordinator, dp.add_gaussian_noise = real_coordinator, real_noise
        restore_secagg()
    coord = coords[0]
    hist = coord.history
    assert len(hist) == len(res.rounds) == s.rounds, (len(hist), len(res.rounds))
    rows = []
    for rec, summ in zip(res.rounds, hist):
        assert rec.round == summ.round
        m = summ.metrics
        rows.append({"arm": arm.key, "mode": arm.mode, "z": arm.z if arm.mode != "off" else 0.0, "seed": seed,
                     "round": rec.round, "test_accuracy": rec.test_accuracy, "test_loss": rec.test_loss,
                     "selected": summ.selected, "participants": summ.participants,
                     "epsilon": m.get("epsilon", 0.0), "clip": m.get("clip", float("nan")),
                     "sampling_rate": m.get("sampling_rate", float("nan")), "wall_seconds": rec.wall_seconds})
        if arm.secagg:
            n, degree, p = opened[rec.round]
            # Std of the noise on the released sum, in units of the central z·S:
            # every contributor's share, dp_sigma grid steps of dp_gamma each.
            rows[-1].update({"sa_degree": degree, "sa_threshold": p.threshold, "sa_dp_sigma": p.dp_sigma,
                             "sa_grid_steps_per_clip": p.dp_clip / p.dp_gamma,  # S/γ (γ itself is ~1e-8)
                             "sa_sum_noise_vs_central": math.sqrt(summ.participants) * p.dp_sigma * p.dp_gamma
                             / (arm.z * s.clip)})
    final_eps = hist[-1].metrics.get("epsilon", 0.0)
    return {"arm": arm.key, "seed": seed, "rows": rows, "seconds": res.wall_seconds, "epsilon": final_eps,
            "accounted_rounds": coord.privacy.accountant.rounds if coord.privacy is not None else 0,
            "events": coord.privacy.accountant.events() if coord.privacy is not None else [],
            "rejected": res.rejected, "agent_rejected": res.agent_rejected, "abandoned": res.abandoned}


def _job(job: tuple) -> dict:
    s, key, seed = job
    return run_one(s, ARMS[key], seed)


def initial_update_norms(s: Setup) -> np.ndarray:
    """L2 norm of every agent's update from the initial model (round 1's training, before clipping)."""
    data = digits(s)
    model = BuiltinModel(ModelConfig(kind="softmax", n_features=64, n_outputs=10, seed=0).spec())
    p0 = model.init_params(0)
    cfg = wire.TrainConfig(s.epochs, s.batch_size, s.lr)
    norms = []
    for i, a in enumerate(data.agents):
        w, _ = train_local(model, p0, a.X_train, a.y_train, cfg, round_seed(i, 1))
        norms.append(dp.l2_norm(subtract(w, p0)))
    return np.asarray(norms)


def known_participation_epsilon(z: float, participations: int, delta: float, accountant: str,
                                sensitivity: float = 2.0) -> float:
    """ε of ``participations`` un-amplified Gaussian releases with noise multiplier z / sensitivity.

    What an observer who knows in which rounds a device took part can learn
    about that device's data. Default, replace-one: its clipped update can
    change by 2S, against noise z·S on the sum (central) or on the update
    itself (local; distributed with m = 2), i.e. multiplier z/2.
    ``sensitivity=1``: against the device sending a zero update instead
    (change S, multiplier z).
    """
    import dp_accounting as dpa
    from dp_accounting import pld, rdp

    acc = rdp.RdpAccountant() if accountant == "rdp" else pld.PLDAccountant()
    acc.compose(dpa.GaussianDpEvent(z / sensitivity), participations)
    return float(acc.get_epsilon(delta))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--agents", type=int, default=1000, help="population N (IID split of digits)")
    p.add_argument("--expected", type=int, default=100, help="expected devices per round (q = expected / agents)")
    p.add_argument("--rounds", type=int, default=100)
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--clip", type=float, default=1.0, help="clip norm S (initial S with adaptive clipping)")
    p.add_argument("--delta", type=float, default=1e-5)
    p.add_argument("--accountant", default="rdp", choices=["rdp", "pld"], help="the coordinator's accountant")
    p.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--data-seed", type=int, default=0)
    p.add_argument("--os-noise", action="store_true", help="DP noise from OS entropy as in production (not reproducible)")
    p.add_argument("--jobs", type=int, default=None)
    p.add_argument("--out", type=Path, default=H.RESULTS / NAME)
    p.add_argument("-v", "--verbose", action="store_true")
    return p.parse_args(argv)


def _mean(xs: list[float]) -> float:
    return float(np.mean(xs)) if xs else float("nan")


def summarize(s: Setup, args, results: list[dict]) -> tuple[list[dict], list[dict]]:
    rounds_done = s.rounds
    nodp_final = {r["seed"]: r["rows"][-1]["test_accuracy"] for r in results if r["arm"] == "nodp"}
    nodp_last10 = {r["seed"]: _mean([x["test_accuracy"] for x in r["rows"][-10:]])
                   for r in results if r["arm"] == "nodp"}
    final, summary = [], []
    for r in results:
        arm = ARMS[r["arm"]]
        acc = r["rows"][-1]["test_accuracy"]
        last10 = _mean([x["test_accuracy"] for x in r["rows"][-10:]])
        check = epsilon_for(s.agents, s.expected, r["accounted_rounds"], arm.z, s.delta, s.accountant) \
            if arm.mode != "off" else 0.0
        final.append({
            "arm": arm.key, "label": arm.label, "mode": arm.mode, "z": arm.z if arm.mode != "off" else 0.0,
            "adaptive_clip": arm.adaptive, "seed": r["seed"], "rounds": len(r["rows"]),
            "accounted_rounds": r["accounted_rounds"], "final_accuracy": acc, "mean_last10_accuracy": last10,
            "nodp_final_accuracy": nodp_final.get(r["seed"], float("nan")),
            "gap_points": 100 * (nodp_final.get(r["seed"], float("nan")) - acc),
            "gap_last10_points": 100 * (nodp_last10.get(r["seed"], float("nan")) - last10),
            "epsilon_coordinator": r["epsilon"], "epsilon_for_check": check,
            "epsilon_abs_diff": abs(r["epsilon"] - check),
            "final_clip": r["rows"][-1]["clip"],
            "mean_participants": _mean([x["participants"] for x in r["rows"]]),
            "min_participants": min(x["participants"] for x in r["rows"]),
            "max_participants": max(x["participants"] for x in r["rows"]),
            "rejected": ";".join(f"{k}={v}" for k, v in sorted(r["rejected"].items())),
            "agent_rejected": ";".join(f"{k}={v}" for k, v in sorted(r["agent_rejected"].items())),
            "abandoned": r["abandoned"], "seconds": r["seconds"],
        })
        if arm.secagg:
            final[-1].update({
                "sa_degree_min": min(x["sa_degree"] for x in r["rows"]),
                "sa_degree_max": max(x["sa_degree"] for x in r["rows"]),
                "sa_threshold_min": min(x["sa_threshold"] for x in r["rows"]),
                "sa_threshold_max": max(x["sa_threshold"] for x in r["rows"]),
                "sa_sum_noise_vs_central_mean": _mean([x["sa_sum_noise_vs_central"] for x in r["rows"]]),
            })
    # One line per arm; ε does not depend on the seed (same q, z, rounds).
    expected_k = max(1, int(round(s.q * rounds_done)))
    from scipy.stats import binom  # the largest participation count among N devices, median over draws

    max_k = int(binom.ppf(0.5 ** (1.0 / s.agents), rounds_done, s.q))
    for key in args.arms:
        arm = ARMS[key]
        fr = [f for f in final if f["arm"] == key]
        if not fr:
            continue
        accs = [f["final_accuracy"] for f in fr]
        row = {"arm": key, "label": arm.label, "mode": arm.mode, "z": fr[0]["z"], "adaptive_clip": arm.adaptive,
               "seeds": len(fr), "rounds": fr[0]["rounds"],
               "final_accuracy_mean": _mean(accs), "final_accuracy_min": min(accs), "final_accuracy_max": max(accs),
               "mean_last10_accuracy": _mean([f["mean_last10_accuracy"] for f in fr]),
               "gap_points_mean": _mean([f["gap_points"] for f in fr]),
               "gap_last10_points_mean": _mean([f["gap_last10_points"] for f in fr]),
               "epsilon_rdp": fr[0]["epsilon_coordinator"] if s.accountant == "rdp" else float("nan"),
               "epsilon_check_max_abs_diff": max(f["epsilon_abs_diff"] for f in fr),
               "final_clip_mean": _mean([f["final_clip"] for f in fr]),
               "mean_participants": _mean([f["mean_participants"] for f in fr])}
        if arm.secagg:
            row.update({"sa_threshold_min": min(f["sa_threshold_min"] for f in fr),
                        "sa_threshold_max": max(f["sa_threshold_max"] for f in fr),
                        "sa_degree_min": min(f["sa_degree_min"] for f in fr),
                        "sa_degree_max": max(f["sa_degree_max"] for f in fr),
                        "sa_sum_noise_vs_central_mean": _mean([f["sa_sum_noise_vs_central_mean"] for f in fr])})
        if arm.mode != "off":
            row["epsilon_coordinator"] = fr[0]["epsilon_coordinator"]
            # PLD's discretisation makes small z very slow (minutes below z = 0.05): the
            # clip-only arm (z = 0.01) gets RDP only, and no known-participation figure.
            slow = arm.z < MIN_NOISE_MULTIPLIER
            row["epsilon_pld"] = float("nan") if slow else \
                epsilon_for(s.agents, s.expected, fr[0]["accounted_rounds"], arm.z, s.delta, "pld")
            row["known_participation_k"] = expected_k
            row["epsilon_known_participation"] = float("nan") if slow else \
                known_participation_epsilon(arm.z, expected_k, s.delta, "rdp")
            row["epsilon_known_participation_sensitivity_S"] = float("nan") if slow else \
                known_participation_epsilon(arm.z, expected_k, s.delta, "rdp", sensitivity=1.0)
            row["known_participation_kmax"] = max_k
            row["epsilon_known_participation_kmax"] = float("nan") if slow else \
                known_participation_epsilon(arm.z, max_k, s.delta, "rdp")
        summary.append(row)
    return final, summary


def fmt_eps(e: float) -> str:
    if e != e:
        return "–"
    if e >= 1000:
        return f"{e:.1e}"
    return f"{e:.2f}"


def table(s: Setup, summary: list[dict]) -> str:
    k = next((r["known_participation_k"] for r in summary if "known_participation_k" in r), "")
    lines = [
        f"| run | z | ε at δ = {s.delta:g} after {summary[0]['rounds']} rounds (RDP; PLD) | final accuracy % "
        f"(mean [min–max] of {summary[0]['seeds']} seeds) | gap to no DP (points) | mean of last 10 rounds % "
        f"| ε if participation is known (k = {k}) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in summary:
        if r["mode"] == "off":
            eps, kp, z = "∞ (no DP)", "–", "–"
        else:
            eps = f"{fmt_eps(r['epsilon_coordinator'])}; {fmt_eps(r['epsilon_pld'])}"
            kp = fmt_eps(r["epsilon_known_participation"])
            z = f"{r['z']:g}"
        lines.append(
            f"| {r['label']} | {z} | {eps} | {100 * r['final_accuracy_mean']:.1f} "
            f"[{100 * r['final_accuracy_min']:.1f}–{100 * r['final_accuracy_max']:.1f}] "
            f"| {'–' if r['gap_points_mean'] != r['gap_points_mean'] else format(r['gap_points_mean'], '+.1f')} "
            f"| {100 * r['mean_last10_accuracy']:.1f} | {kp} |")
    return "\n".join(lines) + "\n"


def plot(out: Path, s: Setup, args, rows: list[dict], summary: list[dict]) -> None:
    plt = H.plt_module()
    arms = args.arms

    def curve(key: str, field: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        by_seed = {}
        for r in rows:
            if r["arm"] == key:
                by_seed.setdefault(r["seed"], []).append(r[field])
        mat = np.array([v for _, v in sorted(by_seed.items())], dtype=float)
        x = np.arange(1, mat.shape[1] + 1)
        return x, mat.mean(0), mat.min(0), mat.max(0)

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.6), dpi=100)
    panels = [
        (axes[0], [k for k in CENTRAL_SWEEP if k in arms], "central DP, fixed S = %g" % s.clip),
        (axes[1], [k for k in ("nodp", "z1", "adaptive1", "local1", "dist1", "secagg1") if k in arms],
         "z = 1: central, adaptive S, local, distributed, SecAgg+"),
    ]
    for ax, keys, title in panels:
        for key in keys:
            x, m, lo, hi = curve(key, "test_accuracy")
            st = STYLE.get(key, {})
            ax.plot(x, m, label=ARMS[key].label, **st)
            ax.fill_between(x, lo, hi, color=st.get("color", "gray"), alpha=0.12, linewidth=0)
        ax.set_ylim(0.0, 1.0)
        ax.set_xlabel("round")
        ax.set_ylabel("test accuracy")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
    ax = axes[2]
    for key in arms:
        if ARMS[key].mode == "off" or key in ("clip", "local1", "dist1", "adaptive1", "secagg1"):
            continue  # clip only: ε ~ 1e5; local, distributed, adaptive and SecAgg+ are accounted as z = 1
        x, m, _, _ = curve(key, "epsilon")
        ax.plot(x, m, label=ARMS[key].label, **STYLE.get(key, {}))
    ax.set_yscale("log")
    ax.set_xlabel("round")
    ax.set_ylabel(f"ε at δ = {s.delta:g} ({s.accountant.upper()})")
    ax.set_title("privacy spent (the coordinator's metric)", fontsize=10)
    ax.grid(alpha=0.3, which="both")
    if ax.get_lines():
        ax.legend(fontsize=8)
    fig.suptitle(f"Digits, softmax, N = {s.agents} agents (IID, 1–2 samples each), q = {s.q:g} "
                 f"(~{s.expected}/round), E = {s.epochs}, lr {s.lr:g}; mean of {len(args.seeds)} seeds, band: min–max",
                 fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    fig.savefig(out / "exp4_accuracy.png")
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6.2, 4.3), dpi=100)
    by = {r["arm"]: r for r in summary}
    pts = [by[k] for k in ("z0.5", "z1", "z2", "z4", "z8") if k in by]
    if pts:
        e = [p["epsilon_coordinator"] for p in pts]
        m = np.array([p["final_accuracy_mean"] for p in pts])
        lo = m - np.array([p["final_accuracy_min"] for p in pts])
        hi = np.array([p["final_accuracy_max"] for p in pts]) - m
        ax.errorbar(e, m, yerr=[lo, hi], marker="o", color="#2ca02c", capsize=3, label="central, fixed S")
        for p, ei, mi in zip(pts, e, m):
            ax.annotate(f"z={p['z']:g}", (ei, mi), textcoords="offset points", xytext=(5, -12), fontsize=8)
    for key, marker, color in (("adaptive1", "s", "#17becf"), ("local1", "v", "#8c564b"), ("dist1", "^", "#e377c2"),
                               ("secagg1", "D", "#bcbd22")):
        if key in by:
            p = by[key]
            ax.errorbar([p["epsilon_coordinator"]], [p["final_accuracy_mean"]],
                        yerr=[[p["final_accuracy_mean"] - p["final_accuracy_min"]],
                              [p["final_accuracy_max"] - p["final_accuracy_mean"]]],
                        marker=marker, color=color, linestyle="none", capsize=3, label=ARMS[key].label)
    if "nodp" in by:
        ax.axhline(by["nodp"]["final_accuracy_mean"], color="black", linestyle="--", linewidth=1, label="no DP")
    if "clip" in by:
        ax.axhline(by["clip"]["final_accuracy_mean"], color="#7f7f7f", linestyle=":", linewidth=1,
                   label=f"clip only (ε ≈ {by['clip']['epsilon_coordinator']:.0e})")
    ax.set_xscale("log")
    ax.set_ylim(0.0, 1.0)
    ax.set_xlabel(f"ε at δ = {s.delta:g} after {s.rounds} rounds (RDP)")
    ax.set_ylabel("final test accuracy")
    ax.set_title(f"accuracy versus ε (N = {s.agents}, q = {s.q:g}, S = {s.clip:g})", fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(out / "exp4_accuracy_vs_epsilon.png")
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.ERROR, format="%(name)s: %(message)s")
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    s = Setup(agents=args.agents, rounds=args.rounds, expected=args.expected, epochs=args.epochs, lr=args.lr,
              clip=args.clip, delta=args.delta, accountant=args.accountant, data_seed=args.data_seed,
              seeded_noise=not args.os_noise)
    data = digits(s)  # before forking: the workers inherit it
    sizes = np.bincount([a.num_samples for a in data.agents])
    jobs = [(s, key, seed) for key in args.arms for seed in args.seeds]
    print(f"{NAME}: {len(jobs)} runs of {s.rounds} rounds, N = {s.agents}, q = {s.q:g}, delta = {s.delta:g}",
          flush=True)
    results = H.parallel_map(_job, jobs, args.jobs or os.cpu_count() or 1)
    rows = [r for res in results for r in res["rows"]]
    norms = initial_update_norms(s)  # after the workers: BLAS used in the parent before a fork can hang them
    final, summary = summarize(s, args, results)
    for f in final:
        print(f"{f['arm']:10s} seed {f['seed']}  final {f['final_accuracy']:.4f}  gap {f['gap_points']:+6.2f} pts  "
              f"eps {fmt_eps(f['epsilon_coordinator'])} (check {fmt_eps(f['epsilon_for_check'])})  "
              f"({f['seconds']:.1f}s)", flush=True)
    H.write_csv(out / "exp4_rounds.csv", rows)
    H.write_csv(out / "exp4_final.csv", final)
    H.write_csv(out / "exp4_summary.csv", summary)
    md = table(s, summary)
    (out / "exp4_table.md").write_text(md)
    print(md)
    plot(out, s, args, rows, summary)
    total = time.perf_counter() - t0
    q10, q50, q90 = np.percentile(norms, [10, 50, 90])
    H.write_run_info(out, H.command_line(), total, {
        "runs": len(jobs),
        "setup": " ".join(f"{k}={v}" for k, v in dataclasses.asdict(s).items()),
        "agent_sizes": " ".join(f"{n}_samples:{c}" for n, c in enumerate(sizes) if c),
        "update_norm_at_initial_model_p10_p50_p90": f"{q10:.3f} {q50:.3f} {q90:.3f}",
        "noise": "seeded per run (experiment only)" if s.seeded_noise else "OS entropy (production)",
        "max_epsilon_check_abs_diff": f"{max((f['epsilon_abs_diff'] for f in final), default=0.0):.3g}",
    })
    print(f"update norms at the initial model (p10/p50/p90): {q10:.3f} {q50:.3f} {q90:.3f}")
    print(f"{NAME}: done in {total:.1f}s -> {out}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
