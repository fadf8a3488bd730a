"""Quantization of a float update into integers mod 2^b, and back for the sum.

Each coordinate is clamped to [-r, r] and mapped to [0, 2^q - 1] with
stochastic rounding (unbiased: the expected integer is the exact scaled
value). The sum of n such integers is below n * 2^q, so a modulus of
2^(q + ceil(log2 n)) bits never wraps and the unmasked sum is exact.
"""

from __future__ import annotations

import numpy as np

#: The masked vector travels as little-endian uint32: the modulus is at most 2^32.
MAX_MODULUS_BITS = 32


def levels(qbits: int) -> int:
    """Largest quantized value: 2^q - 1."""
    return (1 << qbits) - 1


def modulus_bits(qbits: int, n: int) -> int:
    """Bits b of the modulus so that the sum of ``n`` inputs of ``qbits`` bits never wraps."""
    return qbits + max(0, (n - 1).bit_length())


def quantize(x: np.ndarray, r: float, qbits: int, uniform: np.ndarray) -> np.ndarray:
    """``x`` (float) as uint64 in [0, 2^q - 1]; ``uniform`` is one U[0, 1) per coordinate for the rounding."""
    scaled = (np.clip(np.asarray(x, dtype=np.float64), -r, r) + r) * (levels(qbits) / (2.0 * r))
    low = np.floor(scaled)
    q = low + (uniform < (scaled - low))
    return np.minimum(q, levels(qbits)).astype(np.uint64)


def dequantize_sum(total: np.ndarray, n: int, r: float, qbits: int) -> np.ndarray:
    """The float sum of ``n`` inputs from the exact integer sum of their quantizations."""
    return np.asarray(total, dtype=np.float64) * (2.0 * r / levels(qbits)) - n * r


def quantization_error_bound(n: int, r: float, qbits: int) -> float:
    """Largest possible per-coordinate error of the dequantized sum of ``n`` inputs within [-r, r]."""
    return n * 2.0 * r / levels(qbits)
