"""Shamir t-of-n secret sharing over the prime field of the Mersenne prime 2^521 - 1.

A secret of up to 64 bytes is the constant term of a random polynomial of
degree t - 1; share x is the polynomial at x (x = 1, 2, ...). Any t shares
give the secret back by Lagrange interpolation at 0; t - 1 shares are
consistent with every secret (for any secret there is exactly one
polynomial through them), so they say nothing about it.
"""

from __future__ import annotations

import functools
import secrets
from typing import Mapping

# A prime well above 2^512, so any 64-byte secret is a field element, and a
# Mersenne prime, whose primality is not in doubt.
PRIME = (1 << 521) - 1
SHARE_BYTES = 66  # ceil(521 / 8)
MAX_SECRET_BYTES = 64


class ShamirError(ValueError):
    """Shares that cannot be combined (too few, malformed, duplicate x)."""


def split(secret: bytes, xs: list[int], t: int) -> dict[int, bytes]:
    """Shares of ``secret`` for each x in ``xs`` (distinct, 1 <= x < PRIME); any ``t`` of them recover it."""
    if len(secret) > MAX_SECRET_BYTES:
        raise ShamirError(f"secret of {len(secret)} bytes, at most {MAX_SECRET_BYTES}")
    if not 1 <= t <= len(xs):
        raise ShamirError(f"threshold {t} must be in 1..{len(xs)} (the number of shares)")
    if len(set(xs)) != len(xs) or any(not 0 < x < PRIME for x in xs):
        raise ShamirError("share points must be distinct and in 1..PRIME-1")
    coeffs = [int.from_bytes(secret, "big")] + [secrets.randbelow(PRIME) for _ in range(t - 1)]
    out = {}
    for x in xs:
        y = 0
        for c in reversed(coeffs):  # Horner
            y = (y * x + c) % PRIME
        out[x] = y.to_bytes(SHARE_BYTES, "big")
    return out


@functools.lru_cache(maxsize=1024)
def _lagrange_at_zero(xs: tuple[int, ...]) -> tuple[int, ...]:
    """Lagrange weights at 0 for these points: the same for every secret shared over them (cached)."""
    out = []
    for i, xi in enumerate(xs):
        num, den = 1, 1
        for j, xj in enumerate(xs):
            if j != i:
                num = num * (-xj) % PRIME
                den = den * (xi - xj) % PRIME
        out.append(num * pow(den, -1, PRIME) % PRIME)
    return tuple(out)


def combine(shares: Mapping[int, bytes], t: int, secret_bytes: int) -> bytes:
    """The secret from at least ``t`` shares {x: share} (the first ``t`` by x are used)."""
    if len(shares) < t:
        raise ShamirError(f"{len(shares)} shares, {t} needed")
    points = []
    for x, s in sorted(shares.items())[:t]:
        if not 0 < x < PRIME or len(s) != SHARE_BYTES:
            raise ShamirError(f"malformed share at x={x}")
        y = int.from_bytes(s, "big")
        if y >= PRIME:
            raise ShamirError(f"share at x={x} is not a field element")
        points.append((x, y))
    weights = _lagrange_at_zero(tuple(x for x, _ in points))
    secret = sum(yi * w for (_, yi), w in zip(points, weights)) % PRIME
    if secret >= 1 << (8 * secret_bytes):
        raise ShamirError("the shares do not combine to a secret of the expected size")
    return secret.to_bytes(secret_bytes, "big")
