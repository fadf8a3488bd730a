"""Update compression: 8-bit stochastic quantization and top-k sparsification, with error feedback.

Pure numpy, no I/O and no wire format: :mod:`edge_agent.wire` turns the
tensors here into msgpack maps and back (docs/PROTOCOL.md §3.3.1).

- ``q8`` (per tensor): ``offset = min(x)``, ``scale = (max(x) - min(x)) / 255``
  as float32, and one byte per element, ``q = floor((x - offset) / scale + u)``
  with ``u ~ U[0, 1)``: stochastic rounding, so ``E[offset + scale * q] = x``
  (unbiased) and each element is off by less than one ``scale``.
- ``topk`` (per tensor): the ``k = ceil(fraction * size)`` elements of
  largest magnitude, as strictly increasing uint32 flat (C-order) indices
  and their float32 values; every other element decodes as 0.
- Error feedback (Seide et al. 2014; Karimireddy et al. 2019, "Error
  Feedback Fixes SignSGD"): the agent compresses ``x = delta + residual``
  and keeps ``residual = x - decode(sent)`` for its next update, so what
  compression drops is delayed, not lost: over any number of rounds,
  ``sum(decode(sent)) + residual == sum(delta)``.

Decoding (:func:`decompress`) treats its input as hostile: it is what an
aggregator runs on bytes from the network, so every length, index, scale and
value is checked and a failure is a :class:`CompressionError` whose
``reason`` the wire codec reports as its own.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Mapping

import numpy as np

log = logging.getLogger(__name__)

Params = dict[str, np.ndarray]

#: task.config.compression values: no compression, 8-bit stochastic quantization, top-k sparsification.
MODES = ("none", "q8", "topk")
# The largest 8-bit code: 256 levels (0..255) is everything one byte holds,
# the finest grid that still cuts float32 to a quarter.
Q8_MAX_CODE = 255
# k = ceil(fraction * size) is computed in floating point, where for example
# 0.07 * 100 = 7.000000000000001; shaving this relative amount before the
# ceil keeps such products at the integer they mean (it is far below the
# spacing of fractions anyone configures).
_CEIL_SLACK = 1e-12


class CompressionError(ValueError):
    """A compressed tensor that must be refused. ``reason`` is a WireError reason code (docs/PROTOCOL.md §5.2)."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class Q8Tensor:
    """An 8-bit quantized tensor: element i decodes as ``offset + scale * codes[i]`` (float32)."""

    shape: tuple[int, ...]
    offset: float  # a float32 value
    scale: float  # a float32 value, >= 0
    codes: np.ndarray  # uint8, flat, prod(shape) entries


@dataclass(frozen=True)
class TopKTensor:
    """A sparse tensor: ``values[j]`` at flat C-order index ``indices[j]``, zeros elsewhere."""

    shape: tuple[int, ...]
    indices: np.ndarray  # uint32, strictly increasing, each < prod(shape)
    values: np.ndarray  # float32, as many as indices


Compressed = Q8Tensor | TopKTensor


def _size(shape: tuple[int, ...]) -> int:
    return math.prod(shape)


def topk_count(size: int, fraction: float) -> int:
    """k = ceil(fraction * size), at most ``size`` (``fraction`` in (0, 1])."""
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"topk fraction must be in (0, 1], got {fraction}")
    return min(size, math.ceil(fraction * size * (1.0 - _CEIL_SLACK)))


def quantize_q8(x: np.ndarray, rng: np.random.Generator) -> Q8Tensor:
    """Unbiased 8-bit stochastic quantization of one finite tensor."""
    a = np.asarray(x)
    flat = a.reshape(-1).astype(np.float64)
    if flat.size == 0:
        return Q8Tensor(a.shape, 0.0, 0.0, np.zeros(0, np.uint8))
    lo, hi = float(flat.min()), float(flat.max())
    # offset and scale are float32 on the wire: round offset down and scale
    # up, so the float32 grid still covers [lo, hi] and no code is clipped
    # (clipping would bias the extremes).
    offset = np.float32(lo)
    if float(offset) > lo:
        offset = np.nextafter(offset, np.float32(-np.inf))
    scale = np.float32((hi - float(offset)) / Q8_MAX_CODE)
    if float(offset) + float(scale) * Q8_MAX_CODE < hi:
        scale = np.nextafter(scale, np.float32(np.inf))
    if not (math.isfinite(offset) and math.isfinite(scale)):
        raise ValueError("tensor range does not fit float32 offset and scale")
    if scale == 0:  # a constant tensor: every element is exactly the offset
        return Q8Tensor(a.shape, float(offset), 0.0, np.zeros(flat.size, np.uint8))
    v = (flat - float(offset)) / float(scale)  # in [0, 255]: E[floor(v + u)] = v for u ~ U[0, 1)
    v += rng.random(flat.size)
    np.floor(v, out=v)
    np.clip(v, 0, Q8_MAX_CODE, out=v)  # only float rounding at the ends can step outside
    return Q8Tensor(a.shape, float(offset), float(scale), v.astype(np.uint8))


def sparsify_topk(x: np.ndarray, fraction: float) -> TopKTensor:
    """The k = ceil(fraction * size) elements of largest magnitude (ties: any of them)."""
    a = np.asarray(x, dtype=np.float32)
    flat = a.reshape(-1)
    k = topk_count(flat.size, fraction)
    if k == flat.size:
        idx = np.arange(flat.size, dtype=np.uint32)
    else:
        # argpartition is O(size); only the k kept indices are sorted.
        idx = np.sort(np.argpartition(np.abs(flat), flat.size - k)[flat.size - k:]).astype(np.uint32)
    return TopKTensor(a.shape, idx, flat[idx].astype(np.float32))


def compress(x: np.ndarray, mode: str, rng: np.random.Generator, fraction: float = 1.0) -> Compressed:
    """One tensor in ``mode`` (``q8`` or ``topk``)."""
    if mode == "q8":
        return quantize_q8(x, rng)
    if mode == "topk":
        return sparsify_topk(x, fraction)
    raise ValueError(f"compression mode must be one of {MODES[1:]}, got {mode!r}")


def decompress(c: Compressed) -> np.ndarray:
    """The dense float32 tensor of a compressed one, after checking it (:class:`CompressionError`)."""
    size = _size(c.shape)
    if isinstance(c, Q8Tensor):
        if c.codes.dtype != np.uint8 or c.codes.ndim != 1:
            raise CompressionError("bad_codec", "q8 codes must be a flat uint8 array")
        if c.codes.size != size:
            raise CompressionError("shape_mismatch", f"q8 tensor of shape {list(c.shape)} needs {size} codes, "
                                                     f"got {c.codes.size}")
        offset, scale = np.float32(c.offset), np.float32(c.scale)
        if not (math.isfinite(offset) and math.isfinite(scale)):
            raise CompressionError("non_finite", "q8 offset and scale must be finite float32 numbers")
        if scale < 0:
            raise CompressionError("bad_field", f"q8 scale must be >= 0, got {float(scale)}")
        out = offset + scale * c.codes.astype(np.float32)
        if size and not math.isfinite(out.max()):  # a finite offset and scale can still overflow float32
            raise CompressionError("non_finite", "q8 tensor decodes to values beyond float32")
        return out.reshape(c.shape)
    if isinstance(c, TopKTensor):
        idx, vals = c.indices, c.values
        if idx.dtype != np.uint32 or vals.dtype != np.float32 or idx.ndim != 1 or vals.ndim != 1:
            raise CompressionError("bad_codec", "topk indices must be flat uint32 and values flat float32")
        if idx.size != vals.size:
            raise CompressionError("shape_mismatch", f"topk has {idx.size} indices but {vals.size} values")
        if idx.size > size:
            raise CompressionError("bad_indices", f"topk keeps {idx.size} elements of a tensor of {size}")
        if idx.size:
            # uint32 comparison, not np.diff (which would wrap around)
            if not bool(np.all(idx[1:] > idx[:-1])):
                raise CompressionError("bad_indices", "topk indices must be strictly increasing")
            if int(idx[-1]) >= size:  # the largest, once they increase
                raise CompressionError("bad_indices", f"topk index {int(idx[-1])} is out of range for "
                                                      f"{size} elements")
            if not math.isfinite(float(np.einsum("i->", vals.astype(np.float64)))):
                raise CompressionError("non_finite", "topk values contain NaN or Inf")
        out = np.zeros(size, np.float32)
        out[idx] = vals
        return out.reshape(c.shape)
    raise CompressionError("bad_codec", f"not a compressed tensor: {type(c).__name__}")


def compress_update(
    delta: Mapping[str, np.ndarray],
    residual: Mapping[str, np.ndarray] | None,
    mode: str,
    rng: np.random.Generator,
    fraction: float = 1.0,
) -> tuple[dict[str, Compressed], Params]:
    """Error-feedback compression of one update: ``(sent, new residual)``.

    ``x = delta + residual`` (no residual: zeros), ``sent = C(x)`` per
    tensor, ``new residual = x - decode(sent)``, all float32.
    """
    sent: dict[str, Compressed] = {}
    new_residual: Params = {}
    for name, d in delta.items():
        x = np.asarray(d, dtype=np.float32)
        if residual is not None:
            x = x + residual[name]
        c = compress(x, mode, rng, fraction)
        sent[name] = c
        new_residual[name] = x - decompress(c)
    return sent, new_residual


def compatible(residual: Mapping[str, np.ndarray] | None, delta: Mapping[str, np.ndarray]) -> bool:
    """True when ``residual`` has exactly the names and shapes of ``delta`` (the same model)."""
    return residual is not None and list(residual) == list(delta) and all(
        np.shape(residual[k]) == np.shape(v) for k, v in delta.items())


@dataclass
class ErrorFeedback:
    """One agent's error-feedback memory across rounds (persisted with its outbox).

    ``residual`` is what the last compressed update (``round``, ``attempt``)
    left unsent; ``previous`` is the residual that update started from. A
    later attempt of the same round means that update's attempt was
    abandoned and never aggregated, so the next one starts from
    ``previous`` again: the abandoned update's delta is trained anew from
    the same model, and adding its leftover too would count it twice.
    """

    residual: Params | None = None
    round: int = -1
    attempt: int = -1
    previous: Params | None = None
    #: times a residual was dropped because it did not fit the model (logged)
    dropped: int = field(default=0, compare=False)

    def base(self, round_number: int, attempt: int) -> Params | None:
        """The residual an update for (round, attempt) adds to its delta."""
        if round_number == self.round and attempt > self.attempt:
            return self.previous
        return self.residual

    def compress(self, delta: Mapping[str, np.ndarray], round_number: int, attempt: int, mode: str,
                 rng: np.random.Generator, fraction: float = 1.0) -> dict[str, Compressed]:
        """Compress ``delta`` for (round, attempt) with error feedback, and remember the new residual."""
        base = self.base(round_number, attempt)
        if base is not None and not compatible(base, delta):
            log.warning("compression residual does not fit the model (names or shapes differ); starting from zero")
            self.dropped += 1
            base = None
        sent, residual = compress_update(delta, base, mode, rng, fraction)
        self.previous, self.residual = base, residual
        self.round, self.attempt = round_number, attempt
        return sent
