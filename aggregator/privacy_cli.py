"""``fedmqtt privacy``: plan a DP federation's privacy budget before running it.

Either the ε a noise multiplier gives after R rounds (``--noise``), or the
noise multiplier a target ε needs (``--target-epsilon``); both with a table of
ε part-way through, so the number of rounds can be planned too. Assumptions
(Poisson sampling, device-level adjacency, Gaussian noise z·S on the sum):
:mod:`aggregator.accounting`.
"""

from __future__ import annotations

import argparse
import sys

from .accounting import ACCOUNTANTS, epsilon_for, noise_for_epsilon
from .argtypes import positive_float, positive_int, probability

#: Fractions of the planned rounds the table reports ε for.
TABLE_FRACTIONS = (0.10, 0.25, 0.50, 1.00)


def _fmt(x: float) -> str:
    """4 significant digits (1, 0.1, 1.797, 0.0001234)."""
    return f"{x:.4g}"


def _fmt_eps(eps: float) -> str:
    """ε with 3 decimals (7.904, 3.000), or 3 significant digits below 0.01."""
    return f"{eps:.3f}" if eps >= 0.01 or eps == 0 else f"{eps:.3g}"


def table_rounds(rounds: int) -> list[int]:
    """The round counts of the planning table: TABLE_FRACTIONS of ``rounds``, at least 1, no repeats."""
    out: list[int] = []
    for f in TABLE_FRACTIONS:
        r = max(1, round(rounds * f))
        if r not in out:
            out.append(r)
    return out


def privacy_main(argv: list[str]) -> int:
    """``fedmqtt privacy``; returns the exit code (argparse exits with 2 on bad flags)."""
    p = argparse.ArgumentParser(
        prog="fedmqtt privacy",
        description="Privacy budget of DP federated averaging: epsilon after R rounds for a noise "
        "multiplier, or the noise multiplier a target epsilon needs. Assumes each device is "
        "selected independently with probability q = per-round / population (Poisson sampling) "
        "and device-level DP (adding or removing one device's data).",
    )
    p.add_argument("--population", type=positive_int, required=True, metavar="N",
                   help="devices that can be selected")
    p.add_argument("--per-round", type=positive_int, required=True, metavar="K",
                   help="devices selected per round on average, over-selection included")
    p.add_argument("--rounds", type=positive_int, required=True, metavar="R", help="rounds to run")
    goal = p.add_mutually_exclusive_group(required=True)
    goal.add_argument("--noise", type=positive_float, metavar="Z",
                      help="noise multiplier z (noise stddev on the sum = z x clip norm)")
    goal.add_argument("--target-epsilon", type=positive_float, metavar="E",
                      help="find the smallest noise multiplier with epsilon <= E after R rounds")
    p.add_argument("--delta", type=probability, default=1e-5, help="delta (default 1e-5)")
    p.add_argument("--accountant", choices=ACCOUNTANTS, default="rdp",
                   help="rdp (fast) or pld (tighter, slower); default rdp")
    a = p.parse_args(argv)
    if a.per_round > a.population:
        p.error(f"argument --per-round: must be <= --population ({a.population}), got {a.per_round}")

    q = a.per_round / a.population
    out = sys.stdout
    try:
        if a.noise is not None:
            z = a.noise
        else:
            z = noise_for_epsilon(a.target_epsilon, a.population, a.per_round, a.rounds, a.delta, a.accountant)
        table = [(r, epsilon_for(a.population, a.per_round, r, z, a.delta, a.accountant))
                 for r in table_rounds(a.rounds)]
        eps = table[-1][1]  # the last row is all the rounds
    except ValueError as exc:
        sys.stderr.write(f"fedmqtt privacy: error: {exc}\n")
        return 2

    how = "every device, every round" if q == 1 else "Poisson sampling"
    out.write(f"sampling rate     q = {a.per_round}/{a.population} = {_fmt(q)} ({how})\n")
    if a.target_epsilon is not None:
        out.write(f"noise multiplier  z = {_fmt(z)} (smallest with epsilon <= {_fmt(a.target_epsilon)})\n")
    else:
        out.write(f"noise multiplier  z = {_fmt(z)}\n")
    out.write(f"delta               = {a.delta:g}\n")
    out.write(f"accountant          = {a.accountant}\n")
    out.write(f"epsilon after {a.rounds} round{'s' if a.rounds != 1 else ''} = {_fmt_eps(eps)}\n")
    out.write("\n   rounds   epsilon\n")
    for r, e in table:
        out.write(f"{r:>9}   {_fmt_eps(e)}\n")
    if a.delta >= 1.0 / a.population:
        out.write(f"\nnote: delta {a.delta:g} is not below 1/population = {_fmt(1.0 / a.population)} "
                  "(a delta that large admits mechanisms that publish a whole device's data)\n")
    return 0
