"""Print the markdown tables of docs/results.md from the experiments' CSV files.

Run from the repository root after the experiments:
  .venv/bin/python bench/experiments/tables.py [--results docs/results]
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from bench.experiments import harness as H  # noqa: E402

PART = {"iid": "IID", "dir0.5": "Dir(0.5)", "dir0.1": "Dir(0.1)"}


def read(path: Path) -> list[dict]:
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


def pct(x: str) -> str:
    return f"{100 * float(x):.1f}" if x not in ("", None) else "–"


def exp1(res: Path) -> None:
    rows = read(res / "exp1_digits" / "exp1_final.csv")
    models = list(dict.fromkeys(r["model"] for r in rows))
    configs = list(dict.fromkeys((r["agents"], r["partition"]) for r in rows))
    rules = list(dict.fromkeys(r["rule"] for r in rows))
    for m in models:
        mrows = [r for r in rows if r["model"] == m]
        base = float(mrows[0]["baseline_accuracy"])
        print(f"\n**{m}** — final test accuracy (%) after {mrows[0]['rounds']} rounds; centralized baseline "
              f"{100 * base:.1f}. In brackets: gap to the baseline in points.\n")
        print("| rule | " + " | ".join(f"{n} agents {PART[p]}" for n, p in configs) + " |")
        print("|---|" + "---:|" * len(configs))
        best = {}
        for c in configs:
            accs = [float(r["final_accuracy"]) for r in mrows if (r["agents"], r["partition"]) == c]
            best[c] = max(accs)
        for rule in rules:
            cells = []
            for c in configs:
                r = next(r for r in mrows if (r["agents"], r["partition"], r["rule"]) == (*c, rule))
                a = float(r["final_accuracy"])
                cell = f"{100 * a:.1f} ({100 * (base - a):+.1f})"
                cells.append(f"**{cell}**" if a == best[c] else cell)
            print(f"| {rule} | " + " | ".join(cells) + " |")


def exp2(res: Path) -> None:
    rows = read(res / "exp2_fedprox_synthetic" / "exp2_final.csv")
    print("\n| data | stragglers | method | train loss (final / mean last 10) | test acc % (final / mean last 10) "
          "| mean abs. loss change, rounds 101–200 | test acc std % rounds 101–200 | updates / round |")
    print("|---|---:|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['dataset']} | {100 * float(r['stragglers']):.0f}% | {r['method']} | "
              f"{float(r['final_train_loss']):.3f} / {float(r['mean_train_loss_last10']):.3f} | "
              f"{pct(r['final_test_accuracy'])} / {pct(r['mean_test_accuracy_last10'])} | "
              f"{float(r['mean_abs_loss_change_2nd_half']):.4f} | {pct(r['test_accuracy_std_2nd_half'])} | "
              f"{float(r['mean_participants']):.1f} |")


def exp3(res: Path, name: str = "exp3_poisoning") -> None:
    rows = read(res / name / "exp3_final.csv")
    parts = list(dict.fromkeys(r["partition"] for r in rows))
    attacks = list(dict.fromkeys(r["attack"] for r in rows))
    rules = list(dict.fromkeys(r["rule"] for r in rows))
    for p in parts:
        print(f"\n**{rows[0]['agents']} agents, {PART[p]}** — final test accuracy (%); in brackets the change "
              "from the same rule's clean run, in points.\n")
        print("| rule | " + " | ".join(attacks) + " |")
        print("|---|" + "---:|" * len(attacks))
        for rule in rules:
            cells = []
            for a in attacks:
                r = next(r for r in rows if (r["partition"], r["attack"], r["rule"]) == (p, a, rule))
                cell = pct(r["final_accuracy"])
                if a != "clean":
                    cell += f" ({0.0 - float(r['drop_points']):+.1f})"
                cells.append(cell)
            print(f"| {rule} | " + " | ".join(cells) + " |")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--results", type=Path, default=H.RESULTS)
    args = p.parse_args()
    for name, fn in (("exp1_digits", exp1), ("exp2_fedprox_synthetic", exp2), ("exp3_poisoning", exp3),
                     ("exp3_poisoning_20agents", lambda r: exp3(r, "exp3_poisoning_20agents"))):
        if (args.results / name).is_dir():
            print(f"\n## {name}")
            fn(args.results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
