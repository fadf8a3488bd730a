"""Update compression: bytes per update and final accuracy, against no compression in the same run.

Every arm is a whole federation in this process on the real code path
(bench/experiments/harness.py: the real Coordinator and AgentCores, every
message the encoded wire payload), with the same data, seeds and selection
for every compression mode, so the only difference between the rows of one
setting is ``[compression] mode``:

- ``none``: plain float32 deltas (the baseline);
- ``q8``: 8-bit stochastic quantization;
- ``topk 0.1`` and ``topk 0.01``: the largest 10% / 1% of each tensor;

all with error feedback on the agents. Three settings per data set:

- ``fedavg``: plain FedAvg;
- ``central DP``: [privacy] mode = central (every update clipped to S = 1,
  Gaussian noise z·S on the sum with z = 0.3; the agents clip, then
  compress, and the aggregator clips the decoded update again). The
  aggregator's noise comes from a seeded generator here (the service uses
  the OS CSPRNG) so that the modes see the same noise;
- ``median`` and ``krum`` (f = 1): two robust rules, which look at single
  (decoded) updates.

Data sets: digits (10 agents, Dirichlet(0.5), softmax 64→10, E = 5, B = 32,
lr 0.1, 20 rounds, every agent every round: the FIELD-NOTES anchor setup)
and FedProx Synthetic(1,1) (30 devices, 10 per round, softmax 60→10,
E = 20, B = 10, lr 0.01 as in the paper, but 40 rounds instead of 200 to
stay within the bench's time budget).

Bytes are the msgpack payload of each ``update`` message the agents
published (the MQTT payload; topic and MQTT headers excluded), averaged
over all updates of the run. Accuracy is the aggregator's central test
accuracy after the last round.

Run from the repository root (about 2 minutes on 2 cores):
  .venv/bin/python bench/bench_compression.py [--jobs 2] [--seed 0] [--quick]
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402

from aggregator.config import CompressionConfig, ModelConfig, PrivacyConfig, TrainingConfig  # noqa: E402
from aggregator.coordinator import Coordinator  # noqa: E402
from aggregator.datasets import federated_synthetic  # noqa: E402
from bench.experiments import harness as H  # noqa: E402

MODES = (("none", 0.0), ("q8", 0.0), ("topk", 0.1), ("topk", 0.01))
SETTINGS = ("fedavg", "central DP", "median", "krum")
DP_CLIP, DP_Z = 1.0, 0.3


@dataclass(frozen=True)
class Job:
    dataset: str
    setting: str
    mode: str
    fraction: float
    rounds: int
    seed: int = 0


class _UpdateBytes:
    """Counts every update payload on its way to the coordinator (the harness's attack hook, changing nothing)."""

    def __init__(self) -> None:
        self.sizes: list[int] = []

    def apply(self, agent: str, payload: bytes) -> bytes:
        self.sizes.append(len(payload))
        return payload


def _data(name: str, seed: int):
    if name == "digits":
        data, _ = H.digits_federation(10, "dirichlet", 0.5, seed)
        return data, TrainingConfig(epochs=5, batch_size=32, lr=0.1), 10
    return federated_synthetic(30, 1.0, 1.0, seed), TrainingConfig(epochs=20, batch_size=10, lr=0.01), 10


def run(job: Job) -> dict[str, Any]:
    data, training, per_round = _data(job.dataset, job.seed)
    n = len(data.agents)
    rule = job.setting if job.setting in ("median", "krum") else "fedavg"
    cfg = H.make_config(
        federation="bench", rounds=job.rounds,
        model=ModelConfig(kind="softmax", n_features=data.n_features, n_outputs=data.n_classes, seed=job.seed),
        training=training, n_agents=n, agents_per_round=per_round if per_round < n else 0,
        strategy=H.strategy_config(rule, max_updates=n), seed=job.seed,
    )
    cfg.compression = CompressionConfig(mode=job.mode, topk_fraction=job.fraction or 0.1)
    if job.setting == "central DP":
        cfg.privacy = PrivacyConfig(mode="central", clip=DP_CLIP, noise_multiplier=DP_Z, population=n,
                                    expected_per_round=per_round)
    counter = _UpdateBytes()
    reclipped = [0]  # central DP: decoded updates longer than S, clipped again by the aggregator
    real = H.Coordinator

    class SeededCoordinator(Coordinator):
        """The aggregator's DP noise and Poisson draw from seeded generators: the same for every mode."""

        def __init__(self, *a: Any, **kw: Any) -> None:
            super().__init__(*a, **kw)
            if self.privacy is not None:
                self.privacy.noise = np.random.default_rng([job.seed, 1])
                self.privacy.sampler = np.random.default_rng([job.seed, 2])
                dp_sum, inner_add = self.strategy, self.strategy.add  # the DPAggregate around the rule

                def add(delta: Any, weight: float, metrics: Any = None) -> None:
                    before = dp_sum.clipped
                    inner_add(delta, weight, metrics)
                    reclipped[0] += dp_sum.clipped - before

                dp_sum.add = add

    H.Coordinator = SeededCoordinator
    try:
        res = H.run_federation(cfg, data.agents, data.X_test, data.y_test, seed=job.seed, attack=counter)
    finally:
        H.Coordinator = real
    last = res.rounds[-1]
    return {"job": job, "bytes": float(np.mean(counter.sizes)) if counter.sizes else float("nan"),
            "updates": len(counter.sizes), "accuracy": last.test_accuracy, "loss": last.test_loss, "rounds": last.round,
            "rejected": res.rejected, "seconds": res.wall_seconds, "reclipped": reclipped[0]}


def size_table() -> None:
    """Bytes of one encoded update by model size: where the fixed message fields stop mattering."""
    from edge_agent import compression, wire

    metrics = {"train_loss": 0.5, "eval_loss": 0.4, "eval_accuracy": 0.9, "eval_samples": 30.0}
    rng = np.random.default_rng(0)
    print("\n### One update by model size (one float32 tensor, encoded with wire.encode)\n")
    print("| parameters | none (bytes) | q8 | topk 0.1 | topk 0.01 |")
    print("|---:|---:|---:|---:|---:|")
    for n in (650, 10_000, 100_000, 1_000_000):
        delta = {"W0": rng.normal(0, 0.01, n).astype(np.float32)}

        def size(d: dict) -> int:
            return len(wire.encode(wire.UpdateMsg("bench", 1, "agent-000", "0123456789abcdef", 100, d, metrics)))

        plain = size(delta)
        cells = [f"{size(compression.compress_update(delta, None, m, rng, f or 1.0)[0]) / plain:.3f}x"
                 for m, f in MODES[1:]]
        print(f"| {n:,} | {plain:,} | " + " | ".join(cells) + " |")


def _label(mode: str, fraction: float) -> str:
    return f"topk {fraction:g}" if mode == "topk" else mode


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1))
    p.add_argument("--quick", action="store_true", help="5 rounds each (a smoke run, not the figures)")
    p.add_argument("--seed", type=int, default=0, help="seed of the data split, initial model, training and DP noise")
    args = p.parse_args(argv)
    rounds = {"digits": 20, "synthetic": 40}
    jobs = [Job(ds, s, m, f, 5 if args.quick else rounds[ds], args.seed)
            for ds in ("digits", "synthetic") for s in SETTINGS for m, f in MODES]
    t0 = time.perf_counter()
    results = H.parallel_map(run, jobs, args.jobs)
    print(f"# bench_compression: {len(jobs)} federations in {time.perf_counter() - t0:.0f} s, "
          f"seed={args.seed}, jobs={args.jobs}, python {sys.version.split()[0]}, numpy {np.__version__}")
    names = {"digits": "digits (10 agents, Dirichlet 0.5, softmax 64→10, 20 rounds)",
             "synthetic": "Synthetic(1,1) (30 devices, 10 per round, softmax 60→10, 40 rounds)"}
    for ds in ("digits", "synthetic"):
        print(f"\n## {names[ds]}\n")
        print("| setting | mode | bytes/update | vs none | final accuracy | vs none | test loss | rejected; DP |")
        print("|---|---|---:|---:|---:|---:|---:|---|")
        for s in SETTINGS:
            rows = [r for r in results if r["job"].dataset == ds and r["job"].setting == s]
            base = next(r for r in rows if r["job"].mode == "none")
            for r in rows:
                j = r["job"]
                ratio = r["bytes"] / base["bytes"]
                d_acc = r["accuracy"] - base["accuracy"]
                rej = ", ".join(f"{k} {v}" for k, v in sorted(r["rejected"].items())) or "none"
                if s == "central DP":
                    rej += f"; clipped again {r['reclipped']}/{r['updates']}"
                print(f"| {s} | {_label(j.mode, j.fraction)} | {r['bytes']:.0f} | "
                      f"{'—' if j.mode == 'none' else f'{ratio:.2f}x ({1 - ratio:.0%} saved)'} | "
                      f"{r['accuracy']:.3f} | {'—' if j.mode == 'none' else f'{d_acc:+.3f}'} | {r['loss']:.4f} | "
                      f"{rej} |")
                if not math.isfinite(r["accuracy"]):
                    print(f"  (no test accuracy for {j})")
    size_table()


if __name__ == "__main__":
    main()
