"""The randomized Hadamard rotation of the distributed discrete Gaussian mechanism (Kairouz, Liu, Steinke 2021).

x (length d, zero-padded to d' = 2^k) becomes H·D·x / sqrt(d'): D flips signs
by a public random seed, H is the Walsh-Hadamard matrix. The rotation keeps
the L2 norm and spreads a vector's mass over all coordinates, so that after
scaling to the integer grid no coordinate of the noised sum comes near the
modulus (modular wrap-around). Its inverse is D·H·y / sqrt(d').
"""

from __future__ import annotations

import numpy as np

from . import crypto


def padded_size(d: int) -> int:
    """d' = the smallest power of two >= d."""
    return 1 << max(0, (d - 1).bit_length())


def _signs(seed: bytes, n: int) -> np.ndarray:
    return 1.0 - 2.0 * crypto.expand_mask(seed, n, 1).astype(np.float64)


def _hadamard(x: np.ndarray) -> np.ndarray:
    """Unnormalized fast Walsh-Hadamard transform along a power-of-two length."""
    y = x.astype(np.float64, copy=True)
    n, h = y.size, 1
    while h < n:
        y = y.reshape(-1, 2, h)
        a, b = y[:, 0, :].copy(), y[:, 1, :]
        y[:, 0, :] += b
        y[:, 1, :] = a - b
        y = y.reshape(n)
        h *= 2
    return y


def rotate(x: np.ndarray, seed: bytes) -> np.ndarray:
    """H·D·pad(x) / sqrt(d')."""
    n = padded_size(x.size)
    padded = np.zeros(n)
    padded[:x.size] = x
    return _hadamard(padded * _signs(seed, n)) / np.sqrt(n)


def unrotate(y: np.ndarray, seed: bytes, d: int) -> np.ndarray:
    """The inverse of :func:`rotate`, cut back to the first ``d`` coordinates."""
    n = y.size
    return (_hadamard(y) / np.sqrt(n) * _signs(seed, n))[:d]
