"""Model specification: which architecture, and the shape of every parameter.

The spec travels inside every ``model`` message so that a device (or a
decoder in another language) knows what arrays to expect before it trusts a
single byte of them. It is deliberately tiny and has no numpy maths in it:
the codec uses it to check shapes, the models use it to build parameters.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Mapping

import numpy as np

MODEL_KINDS = ("softmax", "mlp", "linear")

# Largest dimension accepted in a spec from the wire. A spec is untrusted input
# too: without a bound a hostile "model" message could ask a device to allocate
# an arbitrarily large parameter set. 2**20 covers any model a small device
# trains (the codec's payload cap is the real ceiling on total size).
MAX_DIM = 1 << 20
MAX_HIDDEN_LAYERS = 8
# Total scalar parameters a spec may declare: 8 million float32 values are
# 30.5 MiB, which fits the codec's 32 MiB payload cap with room for the
# msgpack framing; a larger model could never be sent.
MAX_PARAMS = 8_000_000


@dataclass(frozen=True)
class ModelSpec:
    """Architecture of a model: kind, input width, output width, hidden layers.

    ``n_outputs`` is the number of classes for classifiers (softmax, mlp) and 1
    for linear regression. ``hidden`` is only meaningful for ``mlp``.
    """

    kind: str
    n_features: int
    n_outputs: int
    hidden: tuple[int, ...] = field(default=())

    def __post_init__(self) -> None:
        problems = self.problems()
        if problems:
            raise ValueError("; ".join(f"{key}: {msg}" for key, msg in problems))

    def problems(self) -> list[tuple[str, str]]:
        """Every reason this spec is invalid, as (field, problem); empty when valid."""
        return spec_problems(self.kind, self.n_features, self.n_outputs, self.hidden)

    def layer_sizes(self) -> list[int]:
        """Widths from input to output, e.g. [64, 32, 10] for one hidden layer."""
        return [self.n_features, *self.hidden, self.n_outputs]

    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        """Parameter names in wire order with their shapes (W0, b0, W1, b1, ...)."""
        sizes = self.layer_sizes()
        shapes: dict[str, tuple[int, ...]] = {}
        for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
            shapes[f"W{i}"] = (n_in, n_out)
            shapes[f"b{i}"] = (n_out,)
        return shapes

    def flatten(self, params: Mapping[str, np.ndarray]) -> np.ndarray:
        """All parameters as one float64 vector, in wire order (what secure aggregation masks)."""
        return np.concatenate([np.asarray(params[k], np.float64).ravel() for k in self.param_shapes()])

    def unflatten(self, flat: np.ndarray) -> dict[str, np.ndarray]:
        """The inverse of :meth:`flatten`, as float32 arrays."""
        out, offset = {}, 0
        for name, shape in self.param_shapes().items():
            size = math.prod(shape)
            out[name] = np.asarray(flat[offset:offset + size]).reshape(shape).astype(np.float32)
            offset += size
        return out

    def num_params(self) -> int:
        """Total number of scalar parameters."""
        total = 0
        for shape in self.param_shapes().values():
            n = 1
            for d in shape:
                n *= d
            total += n
        return total

    def to_wire(self) -> dict:
        """The msgpack map for this spec (see docs/PROTOCOL.md)."""
        return {
            "kind": self.kind,
            "n_features": self.n_features,
            "n_outputs": self.n_outputs,
            "hidden": list(self.hidden),
        }

    @classmethod
    def from_wire(cls, m: object) -> "ModelSpec":
        """Build a spec from a decoded map; raises ValueError naming the problem."""
        if not isinstance(m, dict):
            raise ValueError("spec must be a map")
        unknown = set(m) - {"kind", "n_features", "n_outputs", "hidden"}
        if unknown:
            raise ValueError(f"spec has unknown keys {sorted(unknown)}")
        hidden = m.get("hidden", [])
        if not isinstance(hidden, list):
            raise ValueError("spec.hidden must be a list")
        return cls(
            kind=m.get("kind"),  # type: ignore[arg-type]
            n_features=m.get("n_features"),  # type: ignore[arg-type]
            n_outputs=m.get("n_outputs"),  # type: ignore[arg-type]
            hidden=tuple(hidden),
        )


def spec_problems(kind: object, n_features: object, n_outputs: object, hidden: object) -> list[tuple[str, str]]:
    """Every reason these would make an invalid spec, as (field, problem); empty when valid."""
    out: list[tuple[str, str]] = []
    if kind not in MODEL_KINDS:
        out.append(("kind", f"must be one of {', '.join(MODEL_KINDS)}, got {kind!r}"))
    for name, value in (("n_features", n_features), ("n_outputs", n_outputs)):
        if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= MAX_DIM:
            out.append((name, f"must be an integer in 1..{MAX_DIM}, got {value!r}"))
    if not isinstance(hidden, tuple) or len(hidden) > MAX_HIDDEN_LAYERS:
        out.append(("hidden", f"must be at most {MAX_HIDDEN_LAYERS} layer sizes"))
    elif any(not isinstance(h, int) or isinstance(h, bool) or not 1 <= h <= MAX_DIM for h in hidden):
        out.append(("hidden", f"layer sizes must be integers in 1..{MAX_DIM}, got {list(hidden)}"))
    if kind == "mlp" and not hidden:
        out.append(("hidden", "an mlp needs at least one hidden layer"))
    if kind != "mlp" and hidden:
        out.append(("hidden", f"hidden layers are only for kind 'mlp', not {kind!r}"))
    if not out:
        sizes = [n_features, *hidden, n_outputs]
        total = sum(a * b + b for a, b in zip(sizes[:-1], sizes[1:]))
        if total > MAX_PARAMS:
            out.append(("hidden", f"the model has {total} parameters, more than the limit {MAX_PARAMS}"))
    if kind == "linear" and n_outputs != 1:
        out.append(("n_outputs", "linear regression has n_outputs = 1"))
    if kind in ("softmax", "mlp") and isinstance(n_outputs, int) and n_outputs < 2:
        out.append(("n_outputs", "a classifier needs n_outputs >= 2 classes"))
    return out
