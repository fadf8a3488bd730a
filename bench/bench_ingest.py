"""Aggregator ingest: folding 100 updates of a 1M-parameter model with the real FedAvg.

Measured: ``aggregator.strategies.FedAvg`` (weighted, the default
``fedavg`` strategy) on the model ``ModelSpec("softmax", 100_000, 10)``
(W0 float32[100000, 10] + b0 float32[10] = 1,000,010 parameters):
``begin(global)``, then 100 × ``add(delta, num_samples)`` with float32
deltas, then ``result(global)``. The headline figure is the 100 ``add``
calls (with the ``begin`` that starts them); ``begin`` alone and ``result``
are printed separately.

Baseline, same process: 100 plain ``numpy.add(acc, delta, out=acc)`` calls
on float64 accumulators of the same shapes with the same float32 deltas,
i.e. the unweighted float64 running sum with nothing else around it.
A third row, for reference only, computes the same weighted float64 sum as
FedAvg by ``copyto`` (exact float32 -> float64), in-place scale, add.

The deltas are a pool of ``--pool`` distinct random arrays (default 4)
used in turn, so that 100 updates do not need 400 MB of test data; both
the strategy and the baseline see exactly the same sequence.

Run: ``.venv/bin/python bench/bench_ingest.py [--repeat N] [--pool K]``
"""

from __future__ import annotations

import argparse

import numpy as np

from _common import Timing, machine_line, time_calls, time_interleaved
from aggregator.strategies import FedAvg
from edge_agent.spec import ModelSpec

Params = dict[str, np.ndarray]

SPEC = ModelSpec("softmax", 100_000, 10)
N_UPDATES = 100


def make_inputs(pool: int, seed: int = 0) -> tuple[Params, list[Params], list[int]]:
    """Global params (zeros), ``pool`` float32 deltas, and N_UPDATES sample counts."""
    rng = np.random.default_rng(seed)
    shapes = SPEC.param_shapes()
    global_params = {k: np.zeros(s, dtype=np.float32) for k, s in shapes.items()}
    deltas = [
        {k: rng.standard_normal(s, dtype=np.float32) * np.float32(0.01) for k, s in shapes.items()}
        for _ in range(pool)
    ]
    counts = [int(n) for n in rng.integers(20, 400, size=N_UPDATES)]
    return global_params, deltas, counts


def fedavg_adds(strategy: FedAvg, global_params: Params, deltas: list[Params], counts: list[int]) -> None:
    """begin + N_UPDATES adds (begin zero-fills the reused float64 sum: cheap, and part of a round)."""
    strategy.begin(global_params)
    for i, n in enumerate(counts):
        strategy.add(deltas[i % len(deltas)], n)


def baseline_adds(accs: Params, deltas: list[Params]) -> None:
    """Zero the float64 accumulators, then N_UPDATES plain in-place numpy adds."""
    for a in accs.values():
        a.fill(0.0)
    for i in range(N_UPDATES):
        d = deltas[i % len(deltas)]
        for k, acc in accs.items():
            np.add(acc, d[k], out=acc)


def check_result(strategy: FedAvg, global_params: Params, deltas: list[Params], counts: list[int]) -> None:
    """Refuse to report figures for a FedAvg whose average is wrong (float64 reference)."""
    expected = {k: np.zeros(v.shape) for k, v in global_params.items()}
    for i, n in enumerate(counts):
        for k in expected:
            expected[k] += n * deltas[i % len(deltas)][k].astype(np.float64)
    got = strategy.result(global_params)
    for k, e in expected.items():
        if not np.allclose(got[k], global_params[k] + e / sum(counts), rtol=1e-5, atol=1e-7):
            raise SystemExit(f"FedAvg result differs from the float64 weighted mean in {k}")


def reference_adds(accs: Params, scratch: Params, deltas: list[Params], counts: list[int]) -> None:
    """Reference, not fedmqtt code: the same weighted float64 sum as copy-cast, scale in place, add."""
    for a in accs.values():
        a.fill(0.0)
    for i, n in enumerate(counts):
        d = deltas[i % len(deltas)]
        w = float(n)
        for k, acc in accs.items():
            np.copyto(scratch[k], d[k])  # exact float32 -> float64
            scratch[k] *= w
            acc += scratch[k]


def measure(repeat: int, pool: int) -> dict[str, Timing]:
    """Time the numpy baseline, FedAvg begin+adds, result, and begin alone."""
    global_params, deltas, counts = make_inputs(pool)
    strategy = FedAvg(weighted=True)
    strategy.begin(global_params)  # allocate the float64 sum once, as every round after the first
    accs = {k: np.zeros(v.shape, dtype=np.float64) for k, v in global_params.items()}
    scratch = {k: np.empty(v.shape, dtype=np.float64) for k, v in global_params.items()}
    timings = time_interleaved(
        {
            "baseline": lambda: baseline_adds(accs, deltas),
            "fedavg": lambda: fedavg_adds(strategy, global_params, deltas, counts),
            "reference": lambda: reference_adds(accs, scratch, deltas, counts),
        },
        repeat,
    )
    timings["result"] = time_calls(lambda: strategy.result(global_params), repeat, warmup=1)
    check_result(strategy, global_params, deltas, counts)
    timings["begin"] = time_calls(lambda: strategy.begin(global_params), repeat, warmup=1)
    return timings


def report(t: dict[str, Timing]) -> None:
    """Print seconds per 100 updates, updates/s and the ratio to the baseline (best and median)."""
    base = t["baseline"]
    print(f"model: {SPEC} = {SPEC.num_params():,} params; {N_UPDATES} updates per trial")
    print(
        f"{'operation':<54} {'best s':>8} {'median s':>9} {'updates/s best':>15} {'updates/s med':>14} "
        f"{'x base best':>12} {'x base med':>11}"
    )
    rows = [
        (f"numpy.add(acc, delta, out=acc) x{N_UPDATES} [baseline]", base),
        (f"FedAvg.begin + FedAvg.add x{N_UPDATES}", t["fedavg"]),
        ("(reference) copyto + scale + add, same weighted sum", t["reference"]),
    ]
    for name, tm in rows:
        print(
            f"{name:<54} {tm.best:>8.4f} {tm.median:>9.4f} {N_UPDATES / tm.best:>15,.0f} "
            f"{N_UPDATES / tm.median:>14,.0f} {tm.best / base.best:>12.2f} {tm.median / base.median:>11.2f}"
        )
    once = (("FedAvg.begin alone (zero-fill, once per round)", "begin"), ("FedAvg.result (once per round)", "result"))
    for name, key in once:
        print(f"{name:<54} {t[key].best:>8.5f} {t[key].median:>9.5f}")
    print(f"({base.runs} timed trials per row after 1 warm-up; the three 100-update rows alternate trial by trial)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeat", type=int, default=21, help="timed trials of 100 updates (default 21)")
    p.add_argument("--pool", type=int, default=4, help="distinct deltas cycled through (default 4)")
    args = p.parse_args()
    print(machine_line())
    report(measure(args.repeat, args.pool))


if __name__ == "__main__":
    main()
