"""Experiment 2: FedAvg versus FedProx on the FedProx paper's Synthetic(α, β), with stragglers.

Setup of Li et al. 2020 ("Federated Optimization in Heterogeneous
Networks", §5.1 and the reference code): Synthetic(0,0), (0.5,0.5), (1,1)
from ``aggregator.datasets.federated_synthetic`` (30 devices, d = 60,
10 classes, per device 90/10 train/test, the 10% parts pooled as the test
set), multinomial logistic regression (softmax, zero init), 10 devices
selected per round (``RoundConfig.agents_per_round = 10``, no
over-selection), E = 20 local epochs, batch 10, lr 0.01, 200 rounds, μ = 1.

Stragglers (systems heterogeneity), as in the paper's reference code: each
round, of the 10 selected devices ``round(10 · (1 - p))`` do the full E
epochs and the rest are stragglers that manage ``U{1, ..., E-1}`` epochs
(one draw per straggler and round, the same draw for every method).

- FedAvg drops the stragglers: their updates miss the round's deadline, the
  coordinator closes the round with what arrived (quorum 1), and a
  straggler that finishes later finds the round moved on and sends nothing.
- FedProx keeps their partial work: a straggler receives the task with its
  smaller ``epochs`` and its update is aggregated like any other.
- ``FedProx μ=0`` (partial work, no proximal term) is run with stragglers
  to separate the two effects, as in the paper's Figure 1. Without
  stragglers it is exactly FedAvg, so it is not run twice.

Reported per round: the global model's training loss on all 30 devices'
training data (the paper's plotted quantity, = Σ_k p_k F_k(w) with
p_k = n_k / n) and its test accuracy.

Outputs in ``--out`` (default docs/results/exp2_fedprox_synthetic/):
  exp2_rounds.csv, exp2_final.csv, exp2_train_loss.png, exp2_test_accuracy.png, run.txt

Run from the repository root:
  .venv/bin/python bench/experiments/exp2_fedprox_synthetic.py [--rounds 200] [--stragglers 0 0.9]
      [--datasets 0,0 0.5,0.5 1,1] [--jobs 2]
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import numpy as np  # noqa: E402

from aggregator.config import ModelConfig, TrainingConfig  # noqa: E402
from aggregator.datasets import federated_synthetic  # noqa: E402
from bench.experiments import harness as H  # noqa: E402

NAME = "exp2_fedprox_synthetic"
METHODS = {
    # label: (rule, prox_mu, straggler mode)
    "FedAvg": ("fedavg", 0.0, "drop"),
    "FedProx mu=0": ("fedavg", 0.0, "partial"),
    "FedProx mu=1": ("fedprox", 1.0, "partial"),
}
STYLE = {"FedAvg": dict(color="#1f77b4"), "FedProx mu=0": dict(color="#2ca02c", linestyle="--"),
         "FedProx mu=1": dict(color="#d62728")}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--datasets", nargs="+", default=["0,0", "0.5,0.5", "1,1"], help="alpha,beta pairs")
    p.add_argument("--stragglers", type=float, nargs="+", default=[0.0, 0.9], help="fractions of the selected")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--rounds", type=int, default=200)
    p.add_argument("--devices", type=int, default=30)
    p.add_argument("--per-round", type=int, default=10)
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=10)
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--mu", type=float, default=1.0, help="mu of 'FedProx mu=1'")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--jobs", type=int, default=None)
    p.add_argument("--out", type=Path, default=H.RESULTS / NAME)
    p.add_argument("-v", "--verbose", action="store_true")
    return p.parse_args(argv)


def run_one(job: tuple) -> dict:
    ds, frac, method, args = job
    alpha, beta = (float(x) for x in ds.split(","))
    data = federated_synthetic(args.devices, alpha, beta, seed=args.seed)
    rule, mu, mode = METHODS[method]
    if method == "FedProx mu=1":
        mu = args.mu
    scfg = H.strategy_config(rule, prox_mu=mu)
    cfg = H.make_config(
        federation="exp2", rounds=args.rounds,
        model=ModelConfig(kind="softmax", n_features=data.n_features, n_outputs=data.n_classes, seed=args.seed),
        training=TrainingConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr),
        n_agents=args.devices, agents_per_round=args.per_round, quorum=1, strategy=scfg, seed=args.seed,
    )
    stragglers = H.Stragglers(frac, mode, seed=args.seed) if frac > 0 else None
    res = H.run_federation(cfg, data.agents, data.X_test, data.y_test, seed=args.seed, stragglers=stragglers,
                           train_eval=(data.X_train_pooled, data.y_train_pooled))
    rows = [{"dataset": f"Synthetic({alpha:g},{beta:g})", "stragglers": frac, "method": method, "round": r.round,
             "train_loss": r.global_train_loss, "train_accuracy": r.global_train_accuracy,
             "test_accuracy": r.test_accuracy, "test_loss": r.test_loss, "participants": r.participants,
             "stragglers_in_round": r.stragglers, "wall_seconds": r.wall_seconds} for r in res.rounds]
    return {"job": (ds, frac, method), "rows": rows, "seconds": res.wall_seconds, "rejected": res.rejected,
            "agent_rejected": res.agent_rejected,
            "abandoned": res.abandoned, "train_samples": int(sum(a.num_samples for a in data.agents)),
            "test_samples": int(len(data.y_test))}


def summarize(rows: list[dict]) -> dict:
    loss = np.array([r["train_loss"] for r in rows])
    acc = np.array([r["test_accuracy"] for r in rows])
    half = len(rows) // 2
    return {
        "final_train_loss": float(loss[-1]),
        "mean_train_loss_last10": float(loss[-10:].mean()),
        "final_test_accuracy": float(acc[-1]),
        "mean_test_accuracy_last10": float(acc[-10:].mean()),
        "max_train_loss_2nd_half": float(loss[half:].max()),
        # stability: how much the global objective moves from round to round in the second half
        "mean_abs_loss_change_2nd_half": float(np.abs(np.diff(loss[half:])).mean()) if len(rows) > 2 else float("nan"),
        "test_accuracy_std_2nd_half": float(acc[half:].std()),
        "mean_participants": float(np.mean([r["participants"] for r in rows])),
    }


def plot(out: Path, args, rows: list[dict], key: str, ylabel: str, fname: str) -> None:
    plt = H.plt_module()
    dsets = sorted({r["dataset"] for r in rows}, key=lambda d: [r["dataset"] for r in rows].index(d))
    fracs = args.stragglers
    fig, axes = plt.subplots(len(fracs), len(dsets), figsize=(4.6 * len(dsets), 3.4 * len(fracs)), dpi=100,
                             squeeze=False, sharex=True)
    for i, frac in enumerate(fracs):
        for j, ds in enumerate(dsets):
            ax = axes[i][j]
            ys_all = []
            for method in args.methods:
                rr = [r for r in rows if (r["dataset"], r["stragglers"], r["method"]) == (ds, frac, method)]
                if not rr:
                    continue
                ys = [r[key] for r in rr]
                ys_all += ys
                ax.plot([r["round"] for r in rr], ys, label=method, linewidth=1.3, **STYLE[method])
            if key == "train_loss" and ys_all:
                ax.set_ylim(0.0, 1.05 * max(ys_all))
            if key == "test_accuracy":
                ax.set_ylim(0.0, 1.0)
            ax.set_title(f"{ds}, {frac:.0%} stragglers", fontsize=10)
            ax.grid(alpha=0.3)
            if i == len(fracs) - 1:
                ax.set_xlabel("round")
            if j == 0:
                ax.set_ylabel(ylabel)
    handles, labels = [], []
    for ax in axes.flat:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            if lab not in labels:
                handles.append(h)
                labels.append(lab)
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=9)
    fig.suptitle(f"FedProx Synthetic: {args.devices} devices, {args.per_round}/round, E={args.epochs}, "
                 f"B={args.batch_size}, lr={args.lr}, mu={args.mu:g}")
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    fig.savefig(out / fname)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.ERROR, format="%(name)s: %(message)s")
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    jobs = [(ds, frac, m, args) for ds in args.datasets for frac in args.stragglers for m in args.methods
            if not (frac == 0 and m == "FedProx mu=0")]
    # longest first, so the two workers finish together
    order = sorted(range(len(jobs)), key=lambda i: (jobs[i][1] > 0, jobs[i][2] == "FedAvg"))
    print(f"{NAME}: {len(jobs)} runs of {args.rounds} rounds", flush=True)
    done = H.parallel_map(run_one, [jobs[i] for i in order], args.jobs or os.cpu_count() or 1)
    results = [None] * len(jobs)
    for k, i in enumerate(order):
        results[i] = done[k]
    rows = [r for res in results for r in res["rows"]]
    final = []
    for res in results:
        ds, frac, method = res["job"]
        s = summarize(res["rows"])
        final.append({"dataset": res["rows"][0]["dataset"], "stragglers": frac, "method": method, **s,
                      "rounds": len(res["rows"]), "seconds": res["seconds"],
                      "rejected": ";".join(f"{k}={v}" for k, v in sorted(res["rejected"].items())),
                      "agent_rejected": ";".join(f"{k}={v}" for k, v in sorted(res["agent_rejected"].items())),
                      "abandoned": res["abandoned"]})
        print(f"{final[-1]['dataset']:20s} {frac:4.0%} {method:13s} train loss {s['final_train_loss']:.4f} "
              f"(last10 {s['mean_train_loss_last10']:.4f})  test acc {s['final_test_accuracy']:.4f} "
              f"(last10 {s['mean_test_accuracy_last10']:.4f})  jitter {s['mean_abs_loss_change_2nd_half']:.4f}  "
              f"{res['seconds']:.1f}s", flush=True)
    H.write_csv(out / "exp2_rounds.csv", rows)
    H.write_csv(out / "exp2_final.csv", final)
    plot(out, args, rows, "train_loss", "training loss (global)", "exp2_train_loss.png")
    plot(out, args, rows, "test_accuracy", "test accuracy", "exp2_test_accuracy.png")
    total = time.perf_counter() - t0
    H.write_run_info(out, H.command_line(), total, {
        "runs": len(jobs),
        "run_seconds": "; ".join(f"{r['dataset']} {r['stragglers']:.0%} {r['method']} {r['seconds']:.1f}" for r in final),
        "samples": f"{results[0]['train_samples']} train / {results[0]['test_samples']} test" if results else "",
    })
    print(f"{NAME}: done in {total:.1f}s -> {out}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
