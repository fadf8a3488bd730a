"""Differential privacy on the device: clip the update, and add noise when the task asks for it.

The aggregator decides the numbers (clip norm S, noise standard deviations)
and sends them in every task; the device only applies them.

**Where the noise comes from.** Every DP draw (the device's noise share, the
aggregator's noise, the noised count of adaptive clipping) comes from
:class:`SecureRandom`: the operating system's cryptographically secure
generator (``os.urandom``), turned into Gaussians by the Box-Muller
transform. Nothing else draws from it, so no published value (the public
device selection, a training seed) says anything about the noise, and the
noise cannot be predicted or replayed from a seed.

**What floating-point Gaussian noise does and does not guarantee.** The
accountant assumes exact real-valued Gaussian noise. A float64 sample is a
rounded one: Mironov (2012, "On significance of the least significant bits
for differential privacy") showed that for the Laplace mechanism the set of
reachable floating-point outputs depends on the secret input, so an
attacker who sees the *exact* noised floats can sometimes tell inputs
apart, whatever ε says. The same concern applies in principle to Gaussian
noise. Here the noised sum is divided, cast to float32 and added to the
model (further rounding that blurs the low bits), and our Box-Muller
samples are truncated at about 8.6 σ (probability below 1e-17); but that is
mitigation, not proof. A discrete Gaussian on an integer grid (Canonne,
Kamath and Steinke 2020) removes the issue and is what secure aggregation
will use; until then the guarantee holds for the idealized real-valued
mechanism.
"""

from __future__ import annotations

import math
import os
from typing import Mapping, Protocol

import numpy as np

Params = dict[str, np.ndarray]

# Uniforms are built from 53 random bits (a float64 mantissa's worth).
_MANTISSA_BITS = 53
_TWO_POW_MINUS_53 = 2.0 ** -_MANTISSA_BITS


class NoiseSource(Protocol):
    """What DP code draws from: the two methods of numpy's Generator that it uses.

    :class:`SecureRandom` is the one used in production; tests may pass a
    seeded ``numpy.random.Generator`` (or a zero source) to measure the
    mechanism itself.
    """

    def normal(self, loc: float = 0.0, scale: float = 1.0, size: int | tuple[int, ...] | None = None): ...

    def random(self, size: int | tuple[int, ...] | None = None): ...


class SecureRandom:
    """Uniform and Gaussian samples from ``os.urandom`` (the kernel's CSPRNG), numpy-shaped.

    ``random`` returns float64 in [0, 1) with 53 random bits; ``normal`` uses
    Box-Muller on two such uniforms (the first shifted into (0, 1] so the
    logarithm is finite). Cost: 16 bytes of OS randomness per two normals,
    about 25 ms per million on the development machine.
    """

    def random(self, size: int | tuple[int, ...] | None = None):
        n = 1 if size is None else int(np.prod(size))
        bits = np.frombuffer(os.urandom(8 * n), dtype="<u8") >> np.uint64(64 - _MANTISSA_BITS)
        out = bits.astype(np.float64) * _TWO_POW_MINUS_53
        return float(out[0]) if size is None else out.reshape(size)

    def normal(self, loc: float = 0.0, scale: float = 1.0, size: int | tuple[int, ...] | None = None):
        n = 1 if size is None else int(np.prod(size))
        pairs = (n + 1) // 2
        u = self.random(2 * pairs)
        u1 = 1.0 - u[:pairs]  # (0, 1]: log(u1) is finite
        radius = np.sqrt(-2.0 * np.log(u1))
        angle = (2.0 * math.pi) * u[pairs:]
        z = np.concatenate([radius * np.cos(angle), radius * np.sin(angle)])[:n]
        z = loc + scale * z
        return float(z[0]) if size is None else z.reshape(size)


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


def centred_bit(within: bool) -> float:
    """Adaptive clipping's per-device contribution: +1/2 if the update was within S, else -1/2.

    Centring (Andrew et al. 2021) makes one device move the count by at most
    1/2, the sensitivity the privacy accounting charges; a raw 0/1 bit would
    move it by 1.
    """
    return 0.5 if within else -0.5


def add_gaussian_noise(delta: Mapping[str, np.ndarray], std: float, source: NoiseSource | None = None) -> Params:
    """``delta`` plus independent N(0, std²) noise on every coordinate (from the OS CSPRNG by default)."""
    source = source or SecureRandom()
    return {k: (np.asarray(v, dtype=np.float32) + source.normal(0.0, std, v.shape).astype(np.float32))
            for k, v in delta.items()}


# Rejection rounds of the discrete Gaussian sampler before giving up; each
# round accepts a candidate with probability above 1/2 (Canonne et al.), so
# 200 rounds leave a coordinate unsampled with probability below 2^-200.
MAX_DISCRETE_GAUSSIAN_ROUNDS = 200


def discrete_gaussian(sigma: float, size: int, source: NoiseSource | None = None) -> np.ndarray:
    """``size`` independent samples of the discrete Gaussian N_Z(0, σ²) (int64).

    P(X = x) ∝ exp(−x²/(2σ²)) on the integers: Algorithm 3 of Canonne, Kamath
    and Steinke 2020 ("The Discrete Gaussian for Differential Privacy"),
    vectorized: a discrete Laplace candidate of scale t = floor(σ) + 1 (the
    difference of two geometric variables, each floor(−t·ln U)), accepted
    with probability exp(−(|Y| − σ²/t)² / (2σ²)). Uniforms come from the OS
    CSPRNG; the acceptance test is computed in float64, so the distribution
    is exact up to float64 rounding of these probabilities (relative 1e-16),
    not in exact rational arithmetic as in the paper.
    """
    if not (sigma > 0 and math.isfinite(sigma)):
        raise ValueError(f"sigma must be a finite number > 0, got {sigma}")
    source = source or SecureRandom()
    t = math.floor(sigma) + 1
    out = np.zeros(size, dtype=np.int64)
    todo = np.arange(size)
    for _ in range(MAX_DISCRETE_GAUSSIAN_ROUNDS):
        if todo.size == 0:
            return out
        m = todo.size
        u = 1.0 - np.asarray(source.random(3 * m)).reshape(3, m)  # (0, 1]
        y = np.floor(-t * np.log(u[0])) - np.floor(-t * np.log(u[1]))
        accept = u[2] <= np.exp(-((np.abs(y) - sigma * sigma / t) ** 2) / (2.0 * sigma * sigma))
        out[todo[accept]] = y[accept].astype(np.int64)
        todo = todo[~accept]
    raise RuntimeError("discrete Gaussian sampler did not converge")  # pragma: no cover - probability < 2^-200
