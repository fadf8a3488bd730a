"""Differential privacy on the device: clip the update, and add noise when the task asks for it.

The aggregator decides the numbers (clip norm S, noise standard deviation)
and sends them in every task; the device only applies them. The noise comes
from a generator seeded by the operating system on every call, never from
the training seed: noise that could be reproduced would protect nothing.
"""

from __future__ import annotations

import math
from typing import Mapping

import numpy as np

Params = dict[str, np.ndarray]


def l2_norm(delta: Mapping[str, np.ndarray]) -> float:
    """The L2 norm of all parameters together (float64 accumulation)."""
    total = 0.0
    for a in delta.values():
        flat = np.asarray(a, dtype=np.float64).ravel()  # widened once, not once per dot operand
        total += float(np.dot(flat, flat))
    return math.sqrt(total)


def clip(delta: Mapping[str, np.ndarray], max_norm: float) -> tuple[Params, float, bool]:
    """Scale ``delta`` into the L2 ball of radius ``max_norm``: (clipped, original norm, was within the bound)."""
    norm = l2_norm(delta)
    if norm <= max_norm:
        return {k: np.asarray(v, dtype=np.float32) for k, v in delta.items()}, norm, True
    factor = np.float32(max_norm / norm)
    return {k: (np.asarray(v, dtype=np.float32) * factor) for k, v in delta.items()}, norm, False


def add_gaussian_noise(delta: Mapping[str, np.ndarray], std: float, rng: np.random.Generator | None = None) -> Params:
    """``delta`` plus independent N(0, std²) noise on every coordinate."""
    rng = rng or np.random.default_rng()  # fresh OS entropy: the noise must not be reproducible
    return {k: (np.asarray(v, dtype=np.float32) + rng.normal(0.0, std, v.shape).astype(np.float32))
            for k, v in delta.items()}
