"""Model specification: which architecture, and the shape of every parameter.

The spec travels inside every ``model`` message so that a device (or a
decoder in another language) knows what arrays to expect before it trusts a
single byte of them. It is deliberately tiny and has no numpy maths in it:
the codec uses it to check shapes, the models use it to build parameters.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Mapping

import numpy as np

MODEL_KINDS = ("softmax", "mlp", "linear")
# Any other kind names a model the device and the aggregator configured
# themselves ("package.module:ClassName", or an entry-point name). On the
# wire it is only a label the local model must match: nothing is ever
# imported because a message named it.
CUSTOM_KIND = re.compile(r"^[A-Za-z_][A-Za-z0-9_.\-]*(:[A-Za-z_][A-Za-z0-9_]*)?$")
MAX_KIND_CHARS = 200
# Parameter names of custom models: state_dict keys such as "conv1.weight".
PARAM_NAME = re.compile(r"^[A-Za-z0-9_.\-]{1,128}$")
# Named arrays a custom model may have: the codec's limit on one params map
# (edge_agent.wire.MAX_ARRAYS; a test keeps the two equal).
MAX_PARAM_ARRAYS = 256
MAX_PARAM_NDIM = 8

# Largest dimension accepted in a spec from the wire. A spec is untrusted input
# too: without a bound a hostile "model" message could ask a device to allocate
# an arbitrarily large parameter set. 2**20 covers any model a small device
# trains (the codec's payload cap is the real ceiling on total size).
MAX_DIM = 1 << 20
MAX_HIDDEN_LAYERS = 8
# Total scalar parameters a spec may declare: 2^27 float32 values are 512 MiB.
# A model above one packet (32 MiB at most) travels in chunks
# (edge_agent/chunking.py, whose MAX_TOTAL_BYTES is this model plus framing);
# a spec alone allocates nothing, its arrays must arrive and match it.
MAX_PARAMS = 1 << 27


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
    # Custom kinds only: (name, shape) of every parameter array, in wire order.
    params: tuple[tuple[str, tuple[int, ...]], ...] = field(default=())

    def __post_init__(self) -> None:
        problems = self.problems()
        if problems:
            raise ValueError("; ".join(f"{key}: {msg}" for key, msg in problems))

    @classmethod
    def of(cls, kind: str, n_features: int, n_outputs: int, hidden=(), shapes: Mapping | None = None) -> "ModelSpec":
        """The spec of a model: built-in kinds are described by their sizes, custom ones by their shapes too."""
        if kind in MODEL_KINDS:
            return cls(kind, n_features, n_outputs, tuple(hidden))
        return cls(kind, n_features, n_outputs, (),
                   tuple((str(k), tuple(int(d) for d in v)) for k, v in (shapes or {}).items()))

    @property
    def builtin(self) -> bool:
        return self.kind in MODEL_KINDS

    def problems(self) -> list[tuple[str, str]]:
        """Every reason this spec is invalid, as (field, problem); empty when valid."""
        return spec_problems(self.kind, self.n_features, self.n_outputs, self.hidden, self.params)

    def layer_sizes(self) -> list[int]:
        """Widths from input to output, e.g. [64, 32, 10] for one hidden layer."""
        return [self.n_features, *self.hidden, self.n_outputs]

    def param_shapes(self) -> dict[str, tuple[int, ...]]:
        """Parameter names in wire order with their shapes (W0, b0, W1, b1, ... for the built-in kinds)."""
        if not self.builtin:
            return dict(self.params)
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
        m = {
            "kind": self.kind,
            "n_features": self.n_features,
            "n_outputs": self.n_outputs,
            "hidden": list(self.hidden),
        }
        if not self.builtin:
            m["params"] = [[name, list(shape)] for name, shape in self.params]
        return m

    @classmethod
    def from_wire(cls, m: object) -> "ModelSpec":
        """Build a spec from a decoded map; raises ValueError naming the problem."""
        if not isinstance(m, dict):
            raise ValueError("spec must be a map")
        unknown = set(m) - {"kind", "n_features", "n_outputs", "hidden", "params"}
        if unknown:
            raise ValueError(f"spec has unknown keys {sorted(unknown)}")
        hidden = m.get("hidden", [])
        if not isinstance(hidden, list):
            raise ValueError("spec.hidden must be a list")
        raw = m.get("params", [])
        if not isinstance(raw, list) or len(raw) > MAX_PARAM_ARRAYS or not all(
                isinstance(p, list) and len(p) == 2 and isinstance(p[1], list) for p in raw):
            raise ValueError(f"spec.params must be a list of at most {MAX_PARAM_ARRAYS} [name, shape] pairs")
        return cls(
            kind=m.get("kind"),  # type: ignore[arg-type]
            n_features=m.get("n_features"),  # type: ignore[arg-type]
            n_outputs=m.get("n_outputs"),  # type: ignore[arg-type]
            hidden=tuple(hidden),
            params=tuple((p[0], tuple(p[1])) for p in raw),
        )


def custom_kind(kind: object) -> bool:
    """True for a well-formed name of a model that is not built in."""
    return (isinstance(kind, str) and kind not in MODEL_KINDS and len(kind) <= MAX_KIND_CHARS
            and bool(CUSTOM_KIND.match(kind)))


def _params_problems(params: object) -> list[tuple[str, str]]:
    if not isinstance(params, tuple) or not params or len(params) > MAX_PARAM_ARRAYS:
        return [("params", f"a custom model lists 1..{MAX_PARAM_ARRAYS} parameter arrays")]
    names, total = set(), 0
    for item in params:
        name, shape = item if isinstance(item, tuple) and len(item) == 2 else (None, None)
        if not isinstance(name, str) or not PARAM_NAME.match(name) or name in names:
            return [("params", f"parameter names must be distinct and match {PARAM_NAME.pattern}, got {name!r}")]
        names.add(name)
        if not isinstance(shape, tuple) or len(shape) > MAX_PARAM_NDIM or any(
                not isinstance(d, int) or isinstance(d, bool) or not 1 <= d <= MAX_DIM for d in shape):
            return [("params", f"{name}: a shape has at most {MAX_PARAM_NDIM} dimensions of 1..{MAX_DIM}, "
                               f"got {shape!r}")]
        total += math.prod(shape)
    if total > MAX_PARAMS:
        return [("params", f"the model has {total} parameters, more than the limit {MAX_PARAMS}")]
    return []


def spec_problems(kind: object, n_features: object, n_outputs: object, hidden: object,
                  params: object = ()) -> list[tuple[str, str]]:
    """Every reason these would make an invalid spec, as (field, problem); empty when valid."""
    # Every kind, built in or custom, gives its input width and output count.
    sizes = [(name, f"must be an integer in 1..{MAX_DIM}, got {value!r}")
             for name, value in (("n_features", n_features), ("n_outputs", n_outputs))
             if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= MAX_DIM]
    if custom_kind(kind):
        out = sizes
        if hidden:
            out.append(("hidden", "hidden layers are only for kind 'mlp' (a custom model lists its params)"))
        return out + _params_problems(params)
    out = []
    if params:
        out.append(("params", f"only custom models list their parameters, not {kind!r}"))
    if kind not in MODEL_KINDS:
        out.append(("kind", f"must be one of {', '.join(MODEL_KINDS)} or 'package.module:Class', got {kind!r}"))
    out += sizes
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
