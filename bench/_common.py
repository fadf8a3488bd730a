"""Shared helpers for the benchmarks: repeated wall-clock timing and a machine line.

Benchmarks print figures; they never assert timings. Every figure is printed
next to a baseline measured in the same process (or, for memory, the same
run), so that a slower or faster machine moves both together.
"""

from __future__ import annotations

import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class Timing:
    """Seconds per call over ``runs`` timed calls."""

    best: float
    median: float
    runs: int


def time_calls(fn: Callable[[], object], repeat: int, warmup: int = 3) -> Timing:
    """Time ``fn()`` ``repeat`` times with ``time.perf_counter`` after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    samples: list[float] = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t0)
    return Timing(best=min(samples), median=statistics.median(samples), runs=repeat)


def time_interleaved(fns: dict[str, Callable[[], object]], repeat: int, warmup: int = 1) -> dict[str, Timing]:
    """Like :func:`time_calls` for several functions, alternating them call by call.

    Alternating A, B, A, B... spreads background noise (other tenants of a
    VM, frequency changes) over every function instead of one unlucky block.
    """
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - t0)
    return {name: Timing(min(s), statistics.median(s), repeat) for name, s in samples.items()}


def machine_line() -> str:
    """One line naming the interpreter, numpy and CPU count, for the record."""
    import numpy

    return (
        f"python {platform.python_version()} ({sys.executable}), numpy {numpy.__version__}, "
        f"{os.cpu_count()} CPUs, {platform.machine()} {platform.system()}"
    )
