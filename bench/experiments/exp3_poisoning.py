"""Experiment 3: model poisoning by 20% of the agents, FedAvg versus robust rules.

Digits, softmax, 10 agents (``--agents``), IID and Dirichlet(0.5) label
splits, 20 rounds, every agent every round, E = 5, batch 32, lr 0.1. A
seeded 20% of the agents (2 of 10, the same agents for every rule) are
attackers: each round they train honestly, then replace their delta Δ by

- ``sign_flip``: -Δ
- ``scale``:     10·Δ

(the update payload is decoded, changed and re-encoded, so the coordinator
sees a well-formed update; see bench/experiments/harness.py). Rules:
``fedavg``, ``median`` (coordinate-wise), ``trimmed_mean`` with β = 0.2 and
``multi_krum`` with f = number of attackers (m = n - f, the default), each
also run with no attack (``clean``). The rule's settings are the same with
and without the attack.

Outputs in ``--out`` (default docs/results/exp3_poisoning/):
  exp3_rounds.csv, exp3_final.csv, exp3_poisoning.png, run.txt

Run from the repository root:
  .venv/bin/python bench/experiments/exp3_poisoning.py [--agents 10] [--partitions iid dir0.5]
      [--attacks clean sign_flip scale] [--rules fedavg median trimmed_mean multi_krum]
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from aggregator.config import ModelConfig, TrainingConfig  # noqa: E402
from aggregator.sim import agent_ids  # noqa: E402
from bench.experiments import harness as H  # noqa: E402

NAME = "exp3_poisoning"
PARTITIONS = {"iid": ("iid", 0.0), "dir0.5": ("dirichlet", 0.5)}
PARTITION_LABEL = {"iid": "IID", "dir0.5": "Dirichlet(0.5)"}
ATTACKS = ("clean", "sign_flip", "scale", "flip_scale")
ATTACK_LABEL = {"clean": "no attack", "sign_flip": "sign flip (−Δ)", "scale": "scaling (10·Δ)",
                "flip_scale": "both (−10·Δ)"}
RULES = ("fedavg", "median", "trimmed_mean", "multi_krum")


@dataclass(frozen=True)
class Setup:
    agents: int = 10
    partition: str = "dir0.5"
    rounds: int = 20
    epochs: int = 5
    batch_size: int = 32
    lr: float = 0.1
    attacker_fraction: float = 0.2
    scale: float = 10.0
    trim_beta: float = 0.2
    seed: int = 0


def strategy_for(rule: str, s: Setup, n_attackers: int):
    kw: dict = {}
    if rule == "trimmed_mean":
        kw["trim_beta"] = s.trim_beta
    if rule in ("krum", "multi_krum"):
        kw["byzantine_f"] = n_attackers
    return H.strategy_config(rule, max_updates=s.agents, **kw)


def run_one(s: Setup, rule: str, attack: str) -> tuple[H.RunResult, dict]:
    """One run of ``rule`` under ``attack`` ("clean", "sign_flip" or "scale")."""
    kind, alpha = PARTITIONS[s.partition]
    data, note = H.digits_federation(s.agents, kind, alpha, s.seed)
    attackers = H.pick_attackers(agent_ids(s.agents), s.attacker_fraction, s.seed)
    scfg = strategy_for(rule, s, len(attackers))
    cfg = H.make_config(
        federation="exp3", rounds=s.rounds, model=ModelConfig(kind="softmax", n_features=64, n_outputs=10, seed=s.seed),
        training=TrainingConfig(epochs=s.epochs, batch_size=s.batch_size, lr=s.lr),
        n_agents=s.agents, strategy=scfg, seed=s.seed,
    )
    atk = None if attack == "clean" else H.Attack(attack, attackers, s.scale)
    res = H.run_federation(cfg, data.agents, data.X_test, data.y_test, seed=s.seed, attack=atk)
    info = {"attackers": " ".join(sorted(attackers)), "note": note, "strategy": asdict(scfg)}
    return res, info


def _job(job: tuple) -> dict:
    s, rule, attack = job
    res, info = run_one(s, rule, attack)
    rows = [{"agents": s.agents, "partition": s.partition, "attack": attack, "rule": rule, "round": r.round,
             "test_accuracy": r.test_accuracy, "test_loss": r.test_loss, "participants": r.participants,
             "wall_seconds": r.wall_seconds} for r in res.rounds]
    return {"job": (s.partition, attack, rule), "rows": rows, "seconds": res.wall_seconds,
            "rejected": res.rejected, "agent_rejected": res.agent_rejected, "abandoned": res.abandoned, **info}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--agents", type=int, default=10)
    p.add_argument("--partitions", nargs="+", default=list(PARTITIONS), choices=list(PARTITIONS))
    p.add_argument("--attacks", nargs="+", default=list(ATTACKS), choices=list(ATTACKS))
    p.add_argument("--rules", nargs="+", default=list(RULES))
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--attacker-fraction", type=float, default=0.2)
    p.add_argument("--scale", type=float, default=10.0, help="factor of the scaling attack")
    p.add_argument("--trim-beta", type=float, default=0.2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--jobs", type=int, default=None)
    p.add_argument("--out", type=Path, default=H.RESULTS / NAME)
    p.add_argument("-v", "--verbose", action="store_true")
    return p.parse_args(argv)


def plot(out: Path, args, rows) -> None:
    plt = H.plt_module()
    from matplotlib.ticker import MaxNLocator
    parts, attacks = args.partitions, args.attacks
    fig, axes = plt.subplots(len(parts), len(attacks), figsize=(4.4 * len(attacks), 3.5 * len(parts)), dpi=100,
                             squeeze=False, sharey=True)
    for i, part in enumerate(parts):
        for j, attack in enumerate(attacks):
            ax = axes[i][j]
            for rule in args.rules:
                rr = [r for r in rows if (r["partition"], r["attack"], r["rule"]) == (part, attack, rule)]
                ax.plot([r["round"] for r in rr], [r["test_accuracy"] for r in rr], label=rule,
                        **H.RULE_STYLE.get(rule, {}))
            ax.set_title(f"{PARTITION_LABEL[part]}, {ATTACK_LABEL[attack]}", fontsize=10)
            ax.set_ylim(0.0, 1.0)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.grid(alpha=0.3)
            if i == len(parts) - 1:
                ax.set_xlabel("round")
            if j == 0:
                ax.set_ylabel("test accuracy")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=9)
    fig.suptitle(f"Digits, softmax, {args.agents} agents, {args.attacker_fraction:.0%} attackers")
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    fig.savefig(out / "exp3_poisoning.png")
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.ERROR, format="%(name)s: %(message)s")
    missing = [r for r in args.rules if r not in H.available_rules()]
    if missing:
        print(f"rules not in aggregator.strategies: {', '.join(missing)}", file=sys.stderr)
        return 2
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    setups = {p: Setup(agents=args.agents, partition=p, rounds=args.rounds, attacker_fraction=args.attacker_fraction,
                       scale=args.scale, trim_beta=args.trim_beta, seed=args.seed) for p in args.partitions}
    jobs = [(setups[p], rule, attack) for p in args.partitions for attack in args.attacks for rule in args.rules]
    print(f"{NAME}: {len(jobs)} runs of {args.rounds} rounds", flush=True)
    results = H.parallel_map(_job, jobs, args.jobs or os.cpu_count() or 1)
    rows = [r for res in results for r in res["rows"]]
    clean = {(res["job"][0], res["job"][2]): res["rows"][-1]["test_accuracy"]
             for res in results if res["job"][1] == "clean"}
    final = []
    for res in results:
        part, attack, rule = res["job"]
        acc = res["rows"][-1]["test_accuracy"]
        c = clean.get((part, rule), float("nan"))
        c_avg = clean.get((part, "fedavg"), float("nan"))
        final.append({"agents": args.agents, "partition": part, "attack": attack, "rule": rule,
                      "final_accuracy": acc, "clean_same_rule": c, "drop_points": 100 * (c - acc),
                      "drop_vs_clean_fedavg_points": 100 * (c_avg - acc),
                      "min_accuracy": min(r["test_accuracy"] for r in res["rows"]),
                      "attackers": res["attackers"],
                      "byzantine_f": res["strategy"]["byzantine_f"] if rule in ("krum", "multi_krum") else "",
                      "trim_beta": res["strategy"]["trim_beta"] if rule == "trimmed_mean" else "",
                      "rejected": ";".join(f"{k}={v}" for k, v in sorted(res["rejected"].items())),
                      "agent_rejected": ";".join(f"{k}={v}" for k, v in sorted(res["agent_rejected"].items())),
                      "abandoned": res["abandoned"], "seconds": res["seconds"]})
        print(f"{part:7s} {attack:10s} {rule:13s} final {acc:.4f}  drop vs clean {100 * (c - acc):+6.2f} pts"
              f"  ({res['seconds']:.2f}s)", flush=True)
    H.write_csv(out / "exp3_rounds.csv", rows)
    H.write_csv(out / "exp3_final.csv", final)
    plot(out, args, rows)
    total = time.perf_counter() - t0
    H.write_run_info(out, H.command_line(), total, {"runs": len(jobs),
                                                   "attackers": results[0]["attackers"] if results else ""})
    print(f"{NAME}: done in {total:.1f}s -> {out}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
