"""``fedmqtt privacy``: plan a DP federation's privacy budget before running it.

Either the ε a noise multiplier gives after R rounds (``--noise``), or the
noise multiplier a target ε needs (``--target-epsilon``); both with a table of
ε part-way through, so the number of rounds can be planned too. Assumptions
(Poisson sampling, device-level adjacency, Gaussian noise z·S on the sum):
:mod:`aggregator.accounting`.
"""

from __future__ import annotations

import argparse
import math
import sys

from .accounting import ACCOUNTANTS, adaptive_clip_noise_split, epsilon_for, noise_for_epsilon
from .argtypes import positive_float, positive_int, probability
from .config import COUNT_STDDEV_DIVISOR

#: Who adds the noise (as ``[privacy] mode``).
MODES = ("central", "local", "distributed")

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
    p.add_argument("--mode", choices=MODES, default="central",
                   help="who adds the noise, as [privacy] mode (default central); epsilon is the same, "
                        "the noise each device adds differs")
    p.add_argument("--min-clients", type=positive_int, default=2, metavar="M",
                   help="distributed: each device adds z S / sqrt(M - 1), so any M updates protect each "
                        "device by z S from the others' noise (default 2)")
    p.add_argument("--clip", type=positive_float, default=1.0, metavar="S",
                   help="clip norm S, to print the noise standard deviations (default 1)")
    p.add_argument("--adaptive-clip", action="store_true",
                   help="adaptive clipping: part of z pays for the noised count of unclipped updates")
    p.add_argument("--count-stddev", type=positive_float, metavar="SIGMA_B",
                   help="adaptive clipping: noise on the count (default per-round / 20)")
    a = p.parse_args(argv)
    if a.per_round > a.population:
        p.error(f"argument --per-round: must be <= --population ({a.population}), got {a.per_round}")
    if a.mode == "distributed" and a.min_clients < 2:
        p.error("argument --min-clients: must be >= 2 (a device's own share does not protect it)")
    if a.count_stddev is not None and not a.adaptive_clip:
        p.error("argument --count-stddev: only with --adaptive-clip")

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
        sigma_b = (a.count_stddev or a.per_round / COUNT_STDDEV_DIVISOR) if a.adaptive_clip else 0.0
        z_sum = adaptive_clip_noise_split(z, sigma_b) if a.adaptive_clip else z
    except ValueError as exc:
        sys.stderr.write(f"fedmqtt privacy: error: {exc}\n")
        return 2

    how = "every device, every round" if q == 1 else "Poisson sampling"
    out.write(f"sampling rate     q = {a.per_round}/{a.population} = {_fmt(q)} ({how})\n")
    if a.target_epsilon is not None:
        out.write(f"noise multiplier  z = {_fmt(z)} (smallest with epsilon <= {_fmt(a.target_epsilon)})\n")
    else:
        out.write(f"noise multiplier  z = {_fmt(z)}\n")
    if a.adaptive_clip:
        out.write(f"adaptive clipping   count noise sigma_b = {_fmt(sigma_b)} on the centred count; the sum then "
                  f"needs z_sum = {_fmt(z_sum)} (sum and count together: z)\n")
    full = z_sum * a.clip
    if a.mode == "central":
        out.write(f"noise               the aggregator adds std {_fmt(full)} to the sum of updates\n")
    elif a.mode == "local":
        out.write(f"noise               every device adds std {_fmt(full)} to its own update\n")
    else:
        share = full / math.sqrt(a.min_clients - 1)
        out.write(f"noise               every device adds std {_fmt(share)} to its update: any {a.min_clients} updates "
                  f"protect each device by {_fmt(full)} from the others' shares (the aggregator tops up below that)\n")
    if a.adaptive_clip and a.mode != "central":
        divisor = 1.0 if a.mode == "local" else math.sqrt(a.min_clients - 1)
        out.write(f"                    and std {_fmt(sigma_b / divisor)} to its centred clipping bit\n")
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
