"""Experiment 1: every aggregation rule on digits, next to the centralized baseline.

Grid (defaults): 10 and 50 agents x IID / Dirichlet(0.5) / Dirichlet(0.1)
label splits x softmax and MLP (one hidden layer of 64) x every rule in
``aggregator.strategies.STRATEGIES``; 20 rounds, every agent every round,
E = 5 local epochs, batch 32, lr 0.1 (both models). Each run is the real
Coordinator + real AgentCores in one process (bench/experiments/harness.py).

The centralized baseline is the same SGD (same initial model, batch, lr) on
the pooled training data for rounds x E = 100 epochs, the budget
``aggregator.demo.centralized_baseline`` uses.

``--broker-check`` (on by default) also runs one configuration (10 agents,
Dirichlet(0.5), softmax, fedavg) over a real mosquitto with the
AggregatorService and the Simulation of ``fedmqtt demo``, and plots both
curves with their per-round absolute difference.

Outputs in ``--out`` (default docs/results/exp1_digits/):
  exp1_rounds.csv   one row per run and round
  exp1_final.csv    one row per run: final accuracy, baseline, gap
  exp1_rules.csv    the StrategyConfig every rule ran with
  exp1_softmax.png, exp1_mlp.png   accuracy per round, one panel per (agents, split)
  exp1_broker.csv, exp1_broker.png the broker check
  run.txt           command, machine, date, wall time

Run from the repository root:
  .venv/bin/python bench/experiments/exp1_digits.py [--agents 10 50] [--partitions iid dir0.5 dir0.1]
      [--models softmax mlp] [--rules fedavg median ...] [--jobs 2] [--no-broker-check]
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
import time
from dataclasses import asdict
from functools import lru_cache
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import numpy as np  # noqa: E402

from aggregator.config import ModelConfig, TrainingConfig  # noqa: E402
from aggregator.datasets import load_digits_split  # noqa: E402
from bench.experiments import harness as H  # noqa: E402

NAME = "exp1_digits"
PARTITIONS = {"iid": ("iid", 0.0), "dir0.5": ("dirichlet", 0.5), "dir0.1": ("dirichlet", 0.1)}
PARTITION_LABEL = {"iid": "IID", "dir0.5": "Dirichlet(0.5)", "dir0.1": "Dirichlet(0.1)"}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--agents", type=int, nargs="+", default=[10, 50])
    p.add_argument("--partitions", nargs="+", default=list(PARTITIONS), choices=list(PARTITIONS))
    p.add_argument("--models", nargs="+", default=["softmax", "mlp"], choices=["softmax", "mlp"])
    p.add_argument("--rules", nargs="+", default=None, help="default: every rule available in aggregator.strategies")
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=0.1, help="local SGD lr of the softmax model")
    p.add_argument("--mlp-lr", type=float, default=0.1, help="local SGD lr of the MLP")
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--prox-mu", type=float, default=0.1, help="mu of the fedprox rule (not tuned)")
    p.add_argument("--byzantine-f", type=int, default=None,
                   help="f assumed by krum/multi_krum with no attackers (default: the StrategyConfig default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--jobs", type=int, default=None, help="worker processes (default: all CPUs)")
    p.add_argument("--broker-check", action=argparse.BooleanOptionalAction, default=True,
                   help="also run 10 agents, Dirichlet(0.5), softmax, fedavg over a real mosquitto")
    p.add_argument("--out", type=Path, default=H.RESULTS / NAME)
    p.add_argument("-v", "--verbose", action="store_true")
    return p.parse_args(argv)


def rule_overrides(rule: str, n_agents: int, args: argparse.Namespace) -> dict:
    """The non-default StrategyConfig fields of ``rule`` in this experiment."""
    kw: dict = {}
    if rule == "fedprox":
        kw["prox_mu"] = args.prox_mu
    if rule in ("krum", "multi_krum") and args.byzantine_f is not None:
        kw["byzantine_f"] = args.byzantine_f
    return kw


def lr_of(model: str, args: argparse.Namespace) -> float:
    return args.mlp_lr if model == "mlp" else args.lr


def model_config(model: str, args: argparse.Namespace) -> ModelConfig:
    hidden = [args.hidden] if model == "mlp" else []
    return ModelConfig(kind=model, n_features=64, n_outputs=10, hidden=hidden, seed=args.seed)


@lru_cache(maxsize=None)
def data_for(n_agents: int, partition: str, seed: int):
    kind, alpha = PARTITIONS[partition]
    return H.digits_federation(n_agents, kind, alpha, seed)


def run_one(job: tuple) -> dict:
    """One (model, agents, partition, rule) run; returns its rows (picklable)."""
    model, n_agents, partition, rule, args = job
    data, note = data_for(n_agents, partition, args.seed)
    scfg = H.strategy_config(rule, max_updates=n_agents, **rule_overrides(rule, n_agents, args))
    cfg = H.make_config(
        federation="exp1", rounds=args.rounds, model=model_config(model, args),
        training=TrainingConfig(epochs=args.epochs, batch_size=args.batch_size, lr=lr_of(model, args)),
        n_agents=n_agents, strategy=scfg, seed=args.seed,
    )
    t0 = time.perf_counter()
    try:
        res = H.run_federation(cfg, data.agents, data.X_test, data.y_test, seed=args.seed)
    except H.Stall as exc:
        return {"job": job[:4], "rows": [], "error": str(exc), "note": note, "seconds": time.perf_counter() - t0,
                "strategy": asdict(scfg)}
    rows = [
        {"model": model, "agents": n_agents, "partition": partition, "rule": rule, "round": r.round,
         "test_accuracy": r.test_accuracy, "test_loss": r.test_loss, "agent_train_loss": r.agent_train_loss,
         "participants": r.participants, "wall_seconds": r.wall_seconds}
        for r in res.rounds
    ]
    return {"job": job[:4], "rows": rows, "error": "", "note": note, "seconds": res.wall_seconds,
            "rejected": res.rejected, "agent_rejected": res.agent_rejected, "abandoned": res.abandoned,
            "strategy": asdict(scfg),
            "min_samples": min(a.num_samples for a in data.agents)}


def baselines(args: argparse.Namespace) -> dict[str, dict[str, float]]:
    X_tr, y_tr, X_te, y_te = load_digits_split(args.seed)
    return {
        m: H.centralized_baseline(model_config(m, args), X_tr, y_tr, X_te, y_te, epochs=args.rounds * args.epochs,
                                  batch_size=args.batch_size, lr=lr_of(m, args), seed=args.seed)
        for m in args.models
    }


def plot(out: Path, model: str, args, rows, base: dict[str, float], notes: dict) -> None:
    plt = H.plt_module()
    from matplotlib.ticker import MaxNLocator
    agents, parts = args.agents, args.partitions
    fig, axes = plt.subplots(len(agents), len(parts), figsize=(4.6 * len(parts), 3.6 * len(agents)),
                             dpi=100, squeeze=False, sharey=True)
    vals = [r["test_accuracy"] for r in rows if r["model"] == model and r["round"] >= 3]
    bottom = min(0.6, math.floor(min(vals, default=0.6) * 10) / 10)
    for i, n in enumerate(agents):
        for j, part in enumerate(parts):
            ax = axes[i][j]
            for rule in args.rules:
                rr = [r for r in rows if (r["model"], r["agents"], r["partition"], r["rule"]) == (model, n, part, rule)]
                if rr:
                    ax.plot([r["round"] for r in rr], [r["test_accuracy"] for r in rr], label=rule,
                            **H.RULE_STYLE.get(rule, {}))
            ax.axhline(base["accuracy"], color="black", linestyle=":", linewidth=1.2, label="centralized")
            title = f"{n} agents, {PARTITION_LABEL[part]}"
            if notes.get((n, part)):
                title += f"\n({notes[(n, part)].split(' (')[0]})"
            ax.set_title(title, fontsize=10)
            ax.set_ylim(bottom, 1.0)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.grid(alpha=0.3)
            if i == len(agents) - 1:
                ax.set_xlabel("round")
            if j == 0:
                ax.set_ylabel("test accuracy")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="center right", fontsize=9)
    lr = lr_of(model, args)
    desc = "softmax" if model == "softmax" else f"MLP (hidden {args.hidden})"
    fig.suptitle(f"Digits, {desc}: E={args.epochs}, B={args.batch_size}, lr={lr}, seed {args.seed}")
    fig.tight_layout(rect=(0, 0, 0.86, 1))
    fig.savefig(out / f"exp1_{model}.png")
    plt.close(fig)


def broker_check(args: argparse.Namespace, out: Path) -> dict:
    """10 agents, Dirichlet(0.5), softmax, fedavg: in-process versus a real broker."""
    n, part, model, rule = 10, "dir0.5", "softmax", "fedavg"
    data, _ = data_for(n, part, args.seed)
    cfg = H.make_config(
        federation="exp1-broker", rounds=args.rounds, model=model_config(model, args),
        training=TrainingConfig(epochs=args.epochs, batch_size=args.batch_size, lr=lr_of(model, args)),
        n_agents=n, strategy=H.strategy_config(rule), seed=args.seed, timeout=60.0,
    )
    local = H.run_federation(cfg, data.agents, data.X_test, data.y_test, seed=args.seed)
    summaries, params, secs = H.run_over_broker(cfg, data.agents, data.X_test, data.y_test, seed=args.seed)
    param_diff = max(float(np.max(np.abs(params[k] - local.params[k]))) for k in local.params)
    rows = []
    for a, b in zip(local.rounds, summaries):
        rows.append({"round": a.round, "inprocess_accuracy": a.test_accuracy,
                     "broker_accuracy": b.metrics["test_accuracy"],
                     "abs_diff": abs(a.test_accuracy - b.metrics["test_accuracy"]),
                     "inprocess_loss": a.test_loss, "broker_loss": b.metrics["test_loss"],
                     "abs_diff_loss": abs(a.test_loss - b.metrics["test_loss"]),
                     "broker_participants": b.participants})
    H.write_csv(out / "exp1_broker.csv", rows)
    plt = H.plt_module()
    from matplotlib.ticker import MaxNLocator
    fig, (ax, ax2) = plt.subplots(2, 1, figsize=(6.4, 5.6), dpi=100, sharex=True,
                                  gridspec_kw={"height_ratios": [3, 1.2]})
    ax.plot([r["round"] for r in rows], [r["inprocess_accuracy"] for r in rows], marker="o", label="in-process harness")
    ax.plot([r["round"] for r in rows], [r["broker_accuracy"] for r in rows], marker="x", linestyle="--",
            label="real mosquitto (AggregatorService + Simulation)")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel("test accuracy")
    ax.set_title("Digits, 10 agents, Dirichlet(0.5), softmax, FedAvg")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    ax2.plot([r["round"] for r in rows], [r["abs_diff"] for r in rows], marker=".", label="|accuracy diff|")
    ax2.plot([r["round"] for r in rows], [r["abs_diff_loss"] for r in rows], marker=".", label="|loss diff|")
    ax2.set_xlabel("round")
    ax2.set_ylabel("abs. difference")
    ax2.grid(alpha=0.3)
    ax2.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "exp1_broker.png")
    plt.close(fig)
    return {"broker_seconds": secs, "inprocess_seconds": local.wall_seconds, "rounds": len(rows),
            "max_abs_diff_accuracy": max((r["abs_diff"] for r in rows), default=float("nan")),
            "max_abs_diff_loss": max((r["abs_diff_loss"] for r in rows), default=float("nan")),
            "broker_rounds": len(summaries), "max_abs_diff_final_params": param_diff}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.ERROR, format="%(name)s: %(message)s")
    available = H.available_rules()
    if args.rules is None:
        args.rules = list(available)
    missing = [r for r in args.rules if r not in available]
    if missing:
        print(f"rules not in aggregator.strategies (skipped): {', '.join(missing)}", file=sys.stderr)
        args.rules = [r for r in args.rules if r in available]
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()

    jobs = [(m, n, p, r, args) for m in args.models for n in args.agents for p in args.partitions for r in args.rules]
    print(f"{NAME}: {len(jobs)} runs of {args.rounds} rounds; rules: {', '.join(args.rules)}", flush=True)
    base = baselines(args)
    for m, b in base.items():
        print(f"centralized baseline {m}: accuracy {b['accuracy']:.4f}", flush=True)
    import os

    results = H.parallel_map(run_one, jobs, args.jobs or os.cpu_count() or 1)
    grid_seconds = time.perf_counter() - t0

    rows = [row for res in results for row in res["rows"]]
    notes = {}
    final, rules_used = [], {}
    for res in results:
        model, n, part, rule = res["job"]
        if res["note"]:
            notes[(n, part)] = res["note"]
        rules_used[(rule, n)] = res["strategy"]
        rr = res["rows"]
        acc = rr[-1]["test_accuracy"] if rr else float("nan")
        final.append({
            "model": model, "agents": n, "partition": part, "rule": rule,
            "final_accuracy": acc, "best_accuracy": max((r["test_accuracy"] for r in rr), default=float("nan")),
            "baseline_accuracy": base[model]["accuracy"],
            "gap_points": 100 * (base[model]["accuracy"] - acc),
            "final_test_loss": rr[-1]["test_loss"] if rr else float("nan"),
            "rounds": len(rr), "seconds": res["seconds"],
            "min_agent_samples": res.get("min_samples", ""),
            "rejected": ";".join(f"{k}={v}" for k, v in sorted(res.get("rejected", {}).items())),
            "agent_rejected": ";".join(f"{k}={v}" for k, v in sorted(res.get("agent_rejected", {}).items())),
            "abandoned": res.get("abandoned", ""),
            "note": (res["note"] + " " + res["error"]).strip(),
        })
        print(f"{model:7s} {n:3d} {part:7s} {rule:18s} final {acc:.4f}  gap {100 * (base[model]['accuracy'] - acc):+6.2f} pts"
              f"  {res['seconds']:.2f}s {res['error']}", flush=True)
    H.write_csv(out / "exp1_rounds.csv", rows)
    H.write_csv(out / "exp1_final.csv", final)
    H.write_csv(out / "exp1_rules.csv", [{"rule": r, "agents": n, **{k: v for k, v in s.items() if k != "name"}}
                                          for (r, n), s in rules_used.items()])
    for m in args.models:
        plot(out, m, args, rows, base[m], notes)
    extra = {"runs": len(jobs), "grid_seconds": f"{grid_seconds:.1f}",
             "baselines": "; ".join(f"{m} {b['accuracy']:.4f}" for m, b in base.items())}
    if args.broker_check:
        bc = broker_check(args, out)
        print(f"broker check: {bc['rounds']} rounds, max |accuracy diff| {bc['max_abs_diff_accuracy']:.2e}, "
              f"max |loss diff| {bc['max_abs_diff_loss']:.2e}, max |final param diff| "
              f"{bc['max_abs_diff_final_params']:.2e}; broker run {bc['broker_seconds']:.1f}s, "
              f"in-process {bc['inprocess_seconds']:.2f}s", flush=True)
        extra.update({f"broker_{k}" if not k.startswith("broker") else k: v for k, v in bc.items()})
    total = time.perf_counter() - t0
    H.write_run_info(out, H.command_line(), total, extra)
    print(f"{NAME}: done in {total:.1f}s -> {out}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
