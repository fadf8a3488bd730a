"""The wire codec: every fedmqtt payload as one msgpack map (docs/PROTOCOL.md).

Encoding writes arrays as ``{"dtype", "shape", "data"}`` maps whose ``data``
is the raw little-endian C-order bytes of the array. msgpack packs
everything around the large ``data`` values, and one ``b"".join`` copies
those straight from the arrays' memory into the payload: one copy of the
array bytes, the same bytes msgpack.packb of the map would give. Decoding
costs one copy out of the payload (msgpack's, into an aligned bytes object
the array then views) plus one read-only pass to check finiteness
(docs/benchmarks.md has the figures).

Decoding treats every payload as hostile: the size is checked before msgpack
sees a byte, msgpack's container limits are set, every field is type-checked,
element counts are checked against shapes, shapes and dtypes against the
model spec, and NaN/Inf are refused. Every failure is a :class:`WireError`
carrying a short ``reason`` code that callers count and log. Nothing here
can run code from a payload: there is no pickle anywhere.
"""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass, field
from typing import Any, Mapping

import msgpack
import numpy as np

from . import compression as _compression
from .spec import MAX_PARAMS, ModelSpec

# 2: the task no longer lists the selected agents; each selected agent gets
# its own retained `selected` message instead (docs/PROTOCOL.md §3.8). An
# agent of version 1 would find itself in no task and never train, so the
# version says it cannot follow.
WIRE_VERSION = 2

# Largest payload decoded at all. 32 MiB holds a float32 model of 8 Mi
# parameters, far beyond what a device trains, and matches the broker's
# max_packet_size in mosquitto.conf (which adds room for topic and headers).
MAX_PAYLOAD_BYTES = 32 * 1024 * 1024
# msgpack container limits. A secure-aggregation `selected` message lists the
# attempt's whole selection, so lists get 100k entries (far beyond what one
# SecAgg round can hold); maps (params, metrics, config) are small.
MAX_LIST_LEN = 100_000
MAX_MAP_LEN = 1024
# Strings are ids, names and versions: 64 KiB is generous and keeps a hostile
# payload from making us hash or log megabytes of text.
MAX_STR_LEN = 64 * 1024
# A model has a handful of tensors (two per layer); 256 bounds per-message work.
MAX_ARRAYS = 256
MAX_NDIM = 8
# Largest single dimension: an empty array may claim a shape like [0, 2**64]
# that passes the byte count yet breaks numpy; no real tensor is this wide.
MAX_DIM_SIZE = 1 << 31
# Reported metrics are losses, accuracies and counts. Bounding their size
# keeps sums over a whole fleet finite (1e12 x 100k agents << float64 max).
MAX_METRIC_ABS = 1e12
# The dtype of every model parameter and delta on the wire.
PARAM_DTYPE = "<f4"
# Largest run id (model.run, task.run: milliseconds since the Unix epoch):
# 2^53 - 1 is exact in an int64, a float64 and JSON numbers everywhere, and
# lasts until the year 287 396.
MAX_RUN = (1 << 53) - 1

# Little-endian numeric dtypes only: no object, string, void or big-endian
# arrays, so decoding can never build anything but plain numbers.
ALLOWED_DTYPES = frozenset(
    {"<f2", "<f4", "<f8", "|i1", "|u1", "<i2", "<u2", "<i4", "<u4", "<i8", "<u8"}
)

# The np.dtype of each allowed name and back: per-array lookups that are
# cheaper than np.dtype(name) and dtype.str.
_NP_DTYPES = {name: np.dtype(name) for name in ALLOWED_DTYPES}
_WIRE_DTYPE_NAMES = {dt: name for name, dt in _NP_DTYPES.items()}
_PARAM_NP_DTYPE = _NP_DTYPES[PARAM_DTYPE]
_ARRAY_KEYS = frozenset({"dtype", "shape", "data"})

KINDS = ("model", "task", "update", "status", "metrics", "keys", "selected")
TASK_STATES = ("open", "waiting", "done")
TASK_MODES = ("sync", "async")
# task.config.dp_mode: "" no DP; "central": the (trusted) aggregator adds the
# noise; "local"/"distributed": the device noises its update and sends
# nothing the privacy accounting does not cover.
DP_MODES = ("", "central", "local", "distributed")
# Signing keys one keys message may announce (the current one and a few next).
MAX_SIGNING_KEYS = 8
# Round summaries a metrics message may carry (the recent history that
# `fedmqtt status` shows from the retained message alone).
MAX_METRICS_HISTORY = 20
STATUS_STATES = ("online", "offline")

_ID_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


class WireError(ValueError):
    """A payload that must be dropped. ``reason`` is a short code for counters."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def valid_id(value: object) -> bool:
    """True for a federation or agent id: 1-64 of ``[A-Za-z0-9_-]``."""
    return isinstance(value, str) and _ID_RE.match(value) is not None


Params = dict[str, np.ndarray]


# --------------------------------------------------------------------------
# messages


@dataclass
class TrainConfig:
    """Local training settings the aggregator sends in each task."""

    epochs: int = 5
    batch_size: int = 32
    lr: float = 0.1
    # FedProx (Li et al. 2020): weight of the proximal term mu/2 ||w - w_global||^2.
    prox_mu: float = 0.0
    # Differential privacy: clip the update to this L2 norm (0: no clipping),
    # then add Gaussian noise of this standard deviation (0: none; local and
    # distributed DP modes).
    clip_norm: float = 0.0
    noise_std: float = 0.0
    # Who adds the DP noise (DP_MODES). In "local" and "distributed" modes the
    # aggregator is not trusted: the device sends only its noised update,
    # num_samples = 1 and, with adaptive clipping, the metric ``dp_bit``: its
    # centred clipping bit (+1/2 within the clip norm, -1/2 not) plus
    # Gaussian noise of std count_noise_std.
    dp_mode: str = ""
    count_noise_std: float = 0.0
    # Update compression (docs/PROTOCOL.md §3.3.1): "none", "q8" (8-bit
    # stochastic quantization) or "topk" (the topk_fraction largest
    # magnitudes of each tensor), with error feedback on the device.
    compression: str = "none"
    topk_fraction: float = 0.0


@dataclass
class ModelMsg:
    """The current global model (retained on ``fl/<fed>/model``)."""

    fed: str
    round: int
    version: str
    spec: ModelSpec
    params: Params
    # The federation run: milliseconds since the Unix epoch when the
    # aggregator created this federation's state. A reset federation (state
    # wiped) gets a larger one, so agents can tell it from a replayed old
    # model. 0: a sender that predates run ids.
    run: int = 0


SECAGG_MODES = ("secagg", "secagg+")
_HEX_SEED = re.compile(r"^[0-9a-f]{64}$")


@dataclass
class SecAggParams:
    """Secure aggregation settings of a round (task field ``secagg``; docs/PROTOCOL.md §7)."""

    mode: str  # "secagg": every selected device is a peer of every other; "secagg+": k neighbours each
    threshold: int  # t: shares needed to recover one device's secrets
    qbits: int  # each coordinate is quantized to this many bits
    bits: int  # modulus 2^bits of the masked sum (qbits + ceil(log2 n): the sum never wraps)
    range: float  # coordinates are clamped to [-range, range] before quantization
    clip: float = 0.0  # the whole update is first clipped to this L2 norm (0: no clipping)
    # Weighted rounds (FedAvg by sample count): each device sends its update
    # times w / max_weight, w = min(samples, max_weight), and then w itself as
    # one extra coordinate. 0: every update counts once (always so under DP).
    max_weight: int = 0
    # Distributed DP (Kairouz, Liu, Steinke 2021), all 0/empty when off: the
    # update is clipped to dp_clip, rotated (randomized Hadamard, public
    # rotation_seed, 64 hex digits), divided by the grid step dp_gamma,
    # stochastically rounded to integers, and discrete Gaussian noise of std
    # dp_sigma (grid steps) is added before masking; masked vectors then have
    # the padded length (the next power of two).
    dp_sigma: float = 0.0
    dp_gamma: float = 0.0
    dp_clip: float = 0.0
    rotation_seed: str = ""


@dataclass
class TaskMsg:
    """The open round (retained on ``fl/<fed>/task``)."""

    fed: str
    round: int
    base: str
    state: str = "open"
    attempt: int = 0
    deadline: float = 0.0
    config: TrainConfig = field(default_factory=TrainConfig)
    # Pace steering: seconds until the next round is expected to open, so an
    # agent that is not selected can sleep instead of staying awake for it.
    retry_after: float = 0.0
    # "sync": rounds with a selection and a deadline; "async" (FedBuff): every
    # eligible agent trains on each new model, no deadline.
    mode: str = "sync"
    # Secure aggregation of this round (None: plain updates).
    secagg: SecAggParams | None = None
    # The federation run, as in ModelMsg.
    run: int = 0


@dataclass
class SelectedMsg:
    """One agent is selected for one attempt (retained on ``fl/<fed>/agent/<agent>/selected``).

    The task no longer lists the selection: each selected agent gets this
    message on its own topic, so a device reads a few dozen bytes per round
    whatever the fleet size, and, with the broker's ACL, never learns who
    else was selected. It selects the agent for the open task with the same
    ``(run, round, attempt, base)`` and for nothing else, so a stale one left
    retained from an earlier attempt is harmless.
    """

    fed: str
    round: int
    agent: str
    attempt: int
    base: str
    run: int = 0
    # Secure-aggregation attempts only: the whole selection, sorted (share
    # points are positions in it, docs/PROTOCOL.md §7). Empty otherwise.
    selected: list[str] = field(default_factory=list)


@dataclass
class UpdateMsg:
    """One agent's update for one round (``fl/<fed>/update/<agent>``)."""

    fed: str
    round: int
    agent: str
    base: str
    num_samples: int
    # Decoded: always dense float32 arrays. To send, a value may also be an
    # edge_agent.compression tensor (Q8Tensor, TopKTensor; §3.3.1).
    delta: Params
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class StatusMsg:
    """An agent's retained status (``fl/<fed>/agent/<agent>/status``)."""

    fed: str
    round: int
    agent: str
    state: str
    num_samples: int = 0
    capabilities: list[str] = field(default_factory=list)
    software: str = ""
    eligible: bool = True
    # Why the agent is not eligible (e.g. "on battery at 18%"), empty when it is.
    reason: str = ""


@dataclass
class MetricsMsg:
    """Summary of the last closed round (retained on ``fl/<fed>/metrics``)."""

    fed: str
    round: int
    version: str
    participants: int
    metrics: dict[str, float] = field(default_factory=dict)
    # Summaries of the last few closed rounds, newest last (at most MAX_METRICS_HISTORY).
    history: list[dict[str, float]] = field(default_factory=list)


@dataclass
class KeysMsg:
    """The aggregator's model-signing public keys (retained on ``fl/<fed>/keys``, signed).

    Agents that trust the signer add these keys: how a new signing key
    reaches the fleet without touching any device.
    """

    fed: str
    round: int
    keys: list[str] = field(default_factory=list)


Message = ModelMsg | TaskMsg | UpdateMsg | StatusMsg | MetricsMsg | KeysMsg | SelectedMsg


# --------------------------------------------------------------------------
# arrays


def encode_array(arr: np.ndarray) -> dict[str, Any]:
    """The wire map of one array, sharing memory with it (no copy for contiguous input)."""
    a = np.asarray(arr)
    name = _WIRE_DTYPE_NAMES.get(a.dtype)  # the common case, without building a.dtype.str
    if name is None:
        if a.dtype.byteorder == ">":
            a = a.astype(a.dtype.newbyteorder("<"))
        name = a.dtype.str
        if name not in ALLOWED_DTYPES:
            raise WireError("bad_dtype", f"cannot send dtype {name}")
    a = _c_order(a)
    # memoryview(a).cast("B") is the cheap flat byte view, but refuses empty arrays.
    data = memoryview(a).cast("B") if a.size else memoryview(a.reshape(-1).view(np.uint8))
    return {"dtype": name, "shape": list(a.shape), "data": data}


def _c_order(a: np.ndarray) -> np.ndarray:
    # Not np.ascontiguousarray: it turns a 0-d array into shape (1,).
    return a if a.flags.c_contiguous else a.copy(order="C")


def decode_array(m: object, where: str = "array") -> np.ndarray:
    """Check and build one array from its wire map. The result is read-only.

    The array is a view of ``data``, an immutable bytes object (from
    :func:`unpack`, msgpack's own copy of the bin, never the caller's
    payload buffer), so building it copies nothing.
    """
    if not isinstance(m, dict) or m.keys() != _ARRAY_KEYS:
        raise WireError("bad_array", f"{where} must be a map with exactly dtype, shape, data")
    dtype, shape, data = m["dtype"], m["shape"], m["data"]
    dt = _NP_DTYPES.get(dtype) if isinstance(dtype, str) else None
    if dt is None:
        raise WireError("bad_dtype", f"{where} has dtype {dtype!r}, allowed: {sorted(ALLOWED_DTYPES)}")
    if not isinstance(shape, list) or len(shape) > MAX_NDIM:
        raise _bad_shape(where)
    count = 1
    for d in shape:
        if not isinstance(d, int) or isinstance(d, bool) or not 0 <= d <= MAX_DIM_SIZE:
            raise _bad_shape(where)
        count *= d
    if not isinstance(data, bytes):
        raise WireError("bad_array", f"{where} data must be binary")
    if count * dt.itemsize != len(data):
        raise WireError(
            "shape_mismatch",
            f"{where}: shape {shape} of {dtype} needs {count * dt.itemsize} bytes, got {len(data)}",
        )
    try:
        arr = np.ndarray(shape, dt, data)  # read-only: a view of the immutable bytes
    except (ValueError, TypeError) as exc:  # numpy's own limits on shapes
        raise WireError("bad_array", f"{where}: shape {shape}: {exc}") from None
    if dt.kind == "f" and not _all_finite(arr):
        raise WireError("non_finite", f"{where} contains NaN or Inf")
    return arr


def _bad_shape(where: str) -> WireError:
    return WireError("bad_array", f"{where} shape must be a list of at most {MAX_NDIM} ints in 0..{MAX_DIM_SIZE}")


def _all_finite(arr: np.ndarray) -> bool:
    """True iff no element of the float array ``arr`` is NaN or ±Inf. Exact, one read pass, no temporary.

    Fast path: the sum of all elements, ``np.einsum("i->", flat)``, one SIMD
    pass in the array's dtype (``arr.sum()`` is pairwise and 3x slower on
    large arrays; float16 accumulates in float32 and rounds back).

    Why a finite sum proves every element finite: in IEEE arithmetic an
    addition with a non-finite operand never gives a finite result
    (NaN + x = NaN, ±Inf + finite = ±Inf, Inf + -Inf = NaN, ±Inf + ±Inf
    = ±Inf, and rounding a NaN or Inf to float16 keeps it). By induction
    over the additions, in whatever order and with however many partial
    accumulators the kernel uses, every partial sum that includes a NaN or
    Inf element is non-finite, and the result includes every element.

    The converse does not hold: finite values can overflow (3e38 + 3e38 is
    Inf in float32), so a non-finite sum falls back to the exact min/max
    test (max propagates NaN, min/max expose ±Inf). A hostile sender can
    force the fallback with huge finite values; that costs one more pass,
    never a wrong answer. (A float64 sum of float32 values could not
    overflow at all, 8 Mi elements x 3.4e38 << 1.8e308, but widening makes
    it 5-7x slower than this; docs/benchmarks.md.)
    """
    if arr.size == 0:
        return True
    # Decoded arrays are always C-contiguous and aligned (views of a bytes
    # object); einsum on anything else would copy or crawl, so that goes
    # straight to the exact test. (einsum, unlike np.add.reduce, does not
    # warn when a sum of finite values overflows.)
    flags = arr.flags
    if flags.c_contiguous and flags.aligned and math.isfinite(np.einsum("i->", arr.reshape(-1))):
        return True
    return math.isfinite(arr.max()) and math.isfinite(arr.min())


def encode_params(params: Mapping[str, np.ndarray]) -> dict[str, Any]:
    """Wire map of a parameter set, names in the given order (compressed tensors as their maps, §3.3.1)."""
    return {name: _encode_compressed(a) if isinstance(a, (_compression.Q8Tensor, _compression.TopKTensor))
            else encode_array(a) for name, a in params.items()}


# --------------------------------------------------------------------------
# compressed update tensors (docs/PROTOCOL.md §3.3.1)

_Q8_KEYS = frozenset({"codec", "shape", "offset", "scale", "data"})
_TOPK_KEYS = frozenset({"codec", "shape", "indices", "values"})
_CODEC_KEYS = {"q8": _Q8_KEYS, "topk": _TOPK_KEYS}
# Dense elements the compressed tensors of one parameter map may expand to
# when no spec bounds them: a top-k map of a few bytes can claim a huge
# shape, so without this a tiny payload could make the decoder allocate
# gigabytes. The largest model a spec allows (MAX_PARAMS) fits.
MAX_DECOMPRESSED_ELEMENTS = MAX_PARAMS
_U4, _F4 = np.dtype("<u4"), np.dtype("<f4")


def _byte_view(a: np.ndarray) -> memoryview:
    """Flat byte view of a C-contiguous array (empty arrays too)."""
    return memoryview(_c_order(a).reshape(-1).view(np.uint8))


def _encode_compressed(c: _compression.Compressed) -> dict[str, Any]:
    if isinstance(c, _compression.Q8Tensor):
        return {"codec": "q8", "shape": list(c.shape), "offset": float(np.float32(c.offset)),
                "scale": float(np.float32(c.scale)), "data": _byte_view(np.asarray(c.codes, np.uint8))}
    return {"codec": "topk", "shape": list(c.shape), "indices": _byte_view(np.asarray(c.indices, _U4)),
            "values": _byte_view(np.asarray(c.values, _F4))}


def _decode_compressed(m: dict, where: str, expected: tuple[int, ...] | None, budget: list[int]) -> np.ndarray:
    """Check a compressed tensor map and expand it to a dense, read-only float32 array.

    The claimed shape is checked against the spec (or the ``budget`` of
    dense elements left) before anything is allocated.
    """
    codec = m.get("codec")
    keys = _CODEC_KEYS.get(codec) if isinstance(codec, str) else None
    if keys is None:
        raise WireError("bad_codec", f"{where}: codec {codec!r}, known: {sorted(_CODEC_KEYS)}")
    if m.keys() != keys:
        raise WireError("bad_codec", f"{where}: a {codec} tensor has exactly the keys {sorted(keys)}")
    shape = m["shape"]
    if not isinstance(shape, list) or len(shape) > MAX_NDIM or not all(
            isinstance(d, int) and not isinstance(d, bool) and 0 <= d <= MAX_DIM_SIZE for d in shape):
        raise _bad_shape(where)
    shape_t = tuple(shape)
    if expected is not None and shape_t != expected:
        raise WireError("spec_mismatch", f"{where} has shape {shape}, model needs {list(expected)}")
    size = math.prod(shape_t)
    if size > budget[0]:
        raise WireError("bad_array", f"{where}: compressed tensors of this map expand to more than "
                                     f"{MAX_DECOMPRESSED_ELEMENTS} elements")
    budget[0] -= size
    try:
        if codec == "q8":
            offset, scale, data = m["offset"], m["scale"], m["data"]
            for key, value in (("offset", offset), ("scale", scale)):
                if isinstance(value, bool) or not isinstance(value, (int, float)):
                    raise WireError("bad_field", f"{where}.{key} must be a number")
            if not isinstance(data, bytes):
                raise WireError("bad_array", f"{where}.data must be binary")
            c: _compression.Compressed = _compression.Q8Tensor(
                shape_t, float(offset), float(scale), np.frombuffer(data, np.uint8))
        else:
            idx, vals = m["indices"], m["values"]
            if not isinstance(idx, bytes) or not isinstance(vals, bytes):
                raise WireError("bad_array", f"{where}: indices and values must be binary")
            if len(idx) % 4 or len(vals) % 4:
                raise WireError("shape_mismatch", f"{where}: indices and values must be 4 bytes each, "
                                                  f"got {len(idx)} and {len(vals)} bytes")
            c = _compression.TopKTensor(shape_t, np.frombuffer(idx, _U4).astype(np.uint32, copy=False),
                                        np.frombuffer(vals, _F4).astype(np.float32, copy=False))
        with np.errstate(over="ignore", invalid="ignore"):  # overflow is checked, as non_finite
            arr = _compression.decompress(c)
    except _compression.CompressionError as exc:
        raise WireError(exc.reason, f"{where}: {exc.detail}") from None
    arr.flags.writeable = False  # like a plain decoded array
    return arr


def decode_params(m: object, spec: ModelSpec | None, where: str, compressed: bool = False) -> Params:
    """Decode a parameter map; with a spec, names, shapes and float dtype must match it.

    ``compressed``: tensors may also be compressed maps (an update's delta,
    §3.3.1); they come back as dense float32 arrays.
    """
    if not isinstance(m, dict):
        raise WireError("bad_field", f"{where} must be a map of arrays")
    if len(m) > MAX_ARRAYS:
        raise WireError("bad_field", f"{where} has {len(m)} arrays, limit {MAX_ARRAYS}")
    if spec is not None:
        expected = spec.param_shapes()
        if list(m) != list(expected):
            raise WireError("spec_mismatch", f"{where} names {list(m)} do not match the model {list(expected)}")
    out: Params = {}
    budget = [MAX_DECOMPRESSED_ELEMENTS]  # dense elements compressed tensors may still expand to
    for name, am in m.items():
        if not isinstance(name, str):
            raise WireError("bad_field", f"{where} keys must be strings")
        if compressed and isinstance(am, dict) and "codec" in am:
            arr = _decode_compressed(am, f"{where}.{name}", expected.get(name) if spec is not None else None, budget)
        else:
            arr = decode_array(am, f"{where}.{name}")
        if spec is not None:
            if arr.shape != expected[name]:
                raise WireError(
                    "spec_mismatch", f"{where}.{name} has shape {list(arr.shape)}, model needs {list(expected[name])}"
                )
            if arr.dtype != _PARAM_NP_DTYPE:
                # float32 only: a float64 delta could average to values that
                # overflow when the model is cast back to float32.
                raise WireError("spec_mismatch", f"{where}.{name} must be {PARAM_DTYPE}, got {arr.dtype.str}")
        out[name] = arr
    return out


def params_version(params: Mapping[str, np.ndarray]) -> str:
    """Content hash of a parameter set: 16 hex digits of SHA-256 over names, dtypes, shapes, bytes.

    Agents name the model they trained on by this hash, so an update built
    on any other model is recognisably stale.
    """
    h = hashlib.sha256()
    for name, a in params.items():
        a = _c_order(np.asarray(a))
        h.update(f"{name}|{a.dtype.str}|{list(a.shape)}|".encode())
        h.update(memoryview(a.reshape(-1).view(np.uint8)))
    return h.hexdigest()[:16]


# --------------------------------------------------------------------------
# encode


def encode(msg: Message) -> bytes:
    """Serialize a message to its msgpack payload."""
    head = {"v": WIRE_VERSION, "kind": _KIND_OF[type(msg)], "fed": msg.fed, "round": msg.round}
    if isinstance(msg, ModelMsg):
        body = {"version": msg.version, "spec": msg.spec.to_wire(), "params": encode_params(msg.params),
                "run": msg.run}
    elif isinstance(msg, TaskMsg):
        body = {
            "base": msg.base,
            "state": msg.state,
            "attempt": msg.attempt,
            "deadline": float(msg.deadline),
            "config": {
                "epochs": msg.config.epochs,
                "batch_size": msg.config.batch_size,
                "lr": float(msg.config.lr),
                "prox_mu": float(msg.config.prox_mu),
                "clip_norm": float(msg.config.clip_norm),
                "noise_std": float(msg.config.noise_std),
                **({"dp_mode": msg.config.dp_mode, "count_noise_std": float(msg.config.count_noise_std)}
                   if msg.config.dp_mode else {}),
                **_compression_config(msg.config),
            },
            "retry_after": float(msg.retry_after),
            "mode": msg.mode,
            "run": msg.run,
            **({"secagg": _secagg_map(msg.secagg)} if msg.secagg is not None else {}),
        }
    elif isinstance(msg, UpdateMsg):
        body = {
            "agent": msg.agent,
            "base": msg.base,
            "num_samples": msg.num_samples,
            "delta": encode_params(msg.delta),
            "metrics": {k: float(v) for k, v in msg.metrics.items()},
        }
    elif isinstance(msg, StatusMsg):
        body = {
            "agent": msg.agent,
            "state": msg.state,
            "num_samples": msg.num_samples,
            "capabilities": list(msg.capabilities),
            "software": msg.software,
            "eligible": bool(msg.eligible),
            "reason": msg.reason,
        }
    elif isinstance(msg, KeysMsg):
        body = {"keys": list(msg.keys)}
    elif isinstance(msg, SelectedMsg):
        body = {"agent": msg.agent, "attempt": msg.attempt, "base": msg.base, "run": msg.run,
                "selected": list(msg.selected)}
    else:
        body = {
            "version": msg.version,
            "participants": msg.participants,
            "metrics": {k: float(v) for k, v in msg.metrics.items()},
            "history": [{k: float(v) for k, v in h.items()} for h in msg.history[-MAX_METRICS_HISTORY:]],
        }
    head.update(body)
    return _pack(head, "params" if isinstance(msg, ModelMsg) else "delta" if isinstance(msg, UpdateMsg) else None)


# Array data at least this long is not copied into msgpack's buffer but
# joined into the payload straight from the array's memory; shorter data is
# packed by msgpack (cheaper than a join piece).
_JOIN_MIN_BYTES = 16 * 1024


def _pack(head: dict[str, Any], arrays_key: str | None) -> bytes:
    """``msgpack.packb(head, use_bin_type=True)``, byte for byte, copying array data once.

    msgpack would copy each array's bytes into its buffer and the whole
    buffer again into the returned bytes. Here msgpack packs everything but
    the large ``data`` values (the parameter map under ``arrays_key``, as
    built by :func:`encode_params`); each of those becomes the bin header
    msgpack would write plus the array's memoryview, and one ``b"".join``
    copies every piece into the payload.
    """
    p = msgpack.Packer(use_bin_type=True, autoreset=False)
    pieces: list[bytes | memoryview] = []
    p.pack_map_header(len(head))
    for key, value in head.items():
        p.pack(key)
        if key != arrays_key:
            p.pack(value)
            continue
        p.pack_map_header(len(value))
        for name, am in value.items():
            p.pack(name)
            p.pack_map_header(len(am))
            for k, v in am.items():
                p.pack(k)
                if isinstance(v, memoryview) and v.nbytes >= _JOIN_MIN_BYTES:  # data; a compressed tensor's too
                    pieces += (p.bytes(), _bin_header(v.nbytes), v)
                    p.reset()
                else:
                    p.pack(v)
    pieces.append(p.bytes())
    return b"".join(pieces)


def _bin_header(n: int) -> bytes:
    """The msgpack bin header msgpack writes for ``n`` bytes (bin 8, 16 or 32, length big-endian)."""
    if n < 1 << 8:
        return b"\xc4" + n.to_bytes(1, "big")
    if n < 1 << 16:
        return b"\xc5" + n.to_bytes(2, "big")
    if n < 1 << 32:
        return b"\xc6" + n.to_bytes(4, "big")
    raise ValueError(f"array data of {n} bytes is too large for msgpack")


_KIND_OF = {ModelMsg: "model", TaskMsg: "task", UpdateMsg: "update", StatusMsg: "status", MetricsMsg: "metrics",
            KeysMsg: "keys", SelectedMsg: "selected"}


# --------------------------------------------------------------------------
# decode


def unpack(payload: bytes, max_bytes: int = MAX_PAYLOAD_BYTES) -> dict[str, Any]:
    """Bounded msgpack decode of an untrusted payload into the top-level map."""
    if not isinstance(payload, (bytes, bytearray, memoryview)):
        raise WireError("bad_payload", f"payload must be bytes, got {type(payload).__name__}")
    if len(payload) > max_bytes:
        raise WireError("oversize", f"payload of {len(payload)} bytes exceeds the limit {max_bytes}")
    if len(payload) == 0:
        raise WireError("empty", "empty payload")
    try:
        obj = msgpack.unpackb(
            payload,
            raw=False,
            strict_map_key=True,
            use_list=True,
            max_bin_len=max_bytes,
            max_str_len=MAX_STR_LEN,
            max_array_len=MAX_LIST_LEN,
            max_map_len=MAX_MAP_LEN,
            max_ext_len=0,
        )
    except Exception as exc:  # msgpack raises several unrelated types for bad input
        raise WireError("not_msgpack", f"{type(exc).__name__}: {exc}") from None
    if not isinstance(obj, dict):
        raise WireError("not_a_map", f"payload is a msgpack {type(obj).__name__}, not a map")
    return obj


def decode(
    payload: bytes,
    *,
    expect: str | None = None,
    fed: str | None = None,
    spec: ModelSpec | None = None,
    max_bytes: int = MAX_PAYLOAD_BYTES,
) -> Message:
    """Decode and validate one payload.

    ``expect`` is the kind the topic implies, ``fed`` the federation the topic
    belongs to, ``spec`` the model that update deltas must match. Raises
    :class:`WireError` for anything that is not exactly a valid message.
    """
    m = unpack(payload, max_bytes)
    v = m.get("v")
    if not isinstance(v, int) or isinstance(v, bool) or v != WIRE_VERSION:
        raise WireError("bad_version", f"wire version {m.get('v')!r}, this build speaks {WIRE_VERSION}")
    kind = m.get("kind")
    if kind not in KINDS:
        raise WireError("unknown_kind", f"kind {kind!r}")
    if expect is not None and kind != expect:
        raise WireError("wrong_kind", f"expected a {expect} message, got {kind!r}")
    r = _Reader(m, kind)
    msg_fed = r.id("fed")
    if fed is not None and msg_fed != fed:
        raise WireError("wrong_federation", f"message for federation {msg_fed!r}, expected {fed!r}")
    rnd = r.nonneg_int("round")
    if kind == "model":
        try:
            mspec = ModelSpec.from_wire(r.get("spec", dict))
        except (ValueError, TypeError) as exc:
            raise WireError("bad_field", f"model.spec: {exc}") from None
        msg: Message = ModelMsg(
            fed=msg_fed,
            round=rnd,
            version=r.text("version"),
            spec=mspec,
            params=decode_params(r.get("params", dict), mspec, "params"),
            run=r.run(),
        )
    elif kind == "task":
        state = r.text("state")
        if state not in TASK_STATES:
            raise WireError("bad_field", f"task.state must be one of {TASK_STATES}, got {state!r}")
        cfg = r.get("config", dict)
        c = _Reader(cfg, "task.config")
        config = TrainConfig(
            epochs=c.nonneg_int("epochs"),  # 0: evaluate only (protocol benchmarks)
            batch_size=c.pos_int("batch_size"),
            lr=c.pos_float("lr"),
            prox_mu=c.nonneg_float("prox_mu") if "prox_mu" in cfg else 0.0,
            clip_norm=c.nonneg_float("clip_norm") if "clip_norm" in cfg else 0.0,
            noise_std=c.nonneg_float("noise_std") if "noise_std" in cfg else 0.0,
            dp_mode=c.optional("dp_mode", str, ""),
            count_noise_std=c.nonneg_float("count_noise_std") if "count_noise_std" in cfg else 0.0,
            compression=c.optional("compression", str, "none"),
            topk_fraction=c.pos_float("topk_fraction") if "topk_fraction" in cfg else 0.0,
        )
        _check_compression(config)
        if config.dp_mode not in DP_MODES:
            raise WireError("bad_field", f"task.config.dp_mode must be one of {DP_MODES}, got {config.dp_mode!r}")
        mode = r.optional("mode", str, "sync")
        if mode not in TASK_MODES:
            raise WireError("bad_field", f"task.mode must be one of {TASK_MODES}, got {mode!r}")
        msg = TaskMsg(
            fed=msg_fed,
            round=rnd,
            base=r.text("base"),
            state=state,
            attempt=r.nonneg_int("attempt"),
            deadline=r.number("deadline"),
            config=config,
            retry_after=r.nonneg_float("retry_after") if "retry_after" in m else 0.0,
            mode=mode,
            run=r.run(),
            secagg=_secagg_params(r.get("secagg", dict)) if "secagg" in m else None,
        )
    elif kind == "update":
        msg = UpdateMsg(
            fed=msg_fed,
            round=rnd,
            agent=r.id("agent"),
            base=r.text("base"),
            num_samples=r.pos_int("num_samples"),
            delta=decode_params(r.get("delta", dict), spec, "delta", compressed=True),
            metrics=r.float_map("metrics"),
        )
    elif kind == "status":
        state = r.text("state")
        if state not in STATUS_STATES:
            raise WireError("bad_field", f"status.state must be one of {STATUS_STATES}, got {state!r}")
        caps = r.get("capabilities", list)
        if not all(isinstance(c, str) for c in caps):
            raise WireError("bad_field", "status.capabilities must be a list of strings")
        msg = StatusMsg(
            fed=msg_fed,
            round=rnd,
            agent=r.id("agent"),
            state=state,
            num_samples=r.nonneg_int("num_samples"),
            capabilities=caps,
            software=r.text("software", allow_empty=True),
            eligible=r.get("eligible", bool),
            reason=r.optional("reason", str, ""),
        )
    elif kind == "keys":
        keys = r.get("keys", list)
        if not keys or len(keys) > MAX_SIGNING_KEYS or not all(
            isinstance(k, str) and len(k) == 64 and all(c in "0123456789abcdefABCDEF" for c in k) for k in keys
        ):
            raise WireError("bad_field", f"keys.keys must be 1..{MAX_SIGNING_KEYS} Ed25519 public keys (64 hex digits)")
        msg = KeysMsg(fed=msg_fed, round=rnd, keys=keys)
    elif kind == "selected":
        selection = r.get("selected", list)
        if not all(valid_id(a) for a in selection):
            raise WireError("bad_field", "selected.selected must be a list of agent ids")
        msg = SelectedMsg(fed=msg_fed, round=rnd, agent=r.id("agent"), attempt=r.nonneg_int("attempt"),
                          base=r.text("base"), run=r.run(), selected=selection)
    else:
        msg = MetricsMsg(
            fed=msg_fed,
            round=rnd,
            version=r.text("version"),
            participants=r.nonneg_int("participants"),
            metrics=r.float_map("metrics"),
            history=_history(r.optional("history", list, [])),
        )
    return msg


def _compression_config(c: TrainConfig) -> dict[str, Any]:
    """The task.config keys of update compression: none at all without it (older decoders see nothing new)."""
    if c.compression == "none":
        return {}
    return {"compression": c.compression, **({"topk_fraction": float(c.topk_fraction)} if c.compression == "topk" else {})}


def _check_compression(c: TrainConfig) -> None:
    if c.compression not in _compression.MODES:
        raise WireError("bad_field", f"task.config.compression must be one of {_compression.MODES}, "
                                     f"got {c.compression!r}")
    if c.topk_fraction > 1.0:
        raise WireError("bad_field", f"task.config.topk_fraction must be in (0, 1], got {c.topk_fraction}")
    if c.compression == "topk" and c.topk_fraction == 0.0:
        raise WireError("missing_field", "task.config.topk_fraction is missing (needed with compression = topk)")


def _secagg_map(p: SecAggParams) -> dict[str, Any]:
    m = {"mode": p.mode, "threshold": p.threshold, "qbits": p.qbits, "bits": p.bits, "range": float(p.range),
         "clip": float(p.clip)}
    if p.max_weight > 0:
        m["max_weight"] = p.max_weight
    if p.dp_sigma > 0:
        m.update(dp_sigma=float(p.dp_sigma), dp_gamma=float(p.dp_gamma), dp_clip=float(p.dp_clip),
                 rotation_seed=p.rotation_seed)
    return m


def _secagg_params(m: dict) -> SecAggParams:
    r = _Reader(m, "task.secagg")
    p = SecAggParams(mode=r.text("mode"), threshold=r.pos_int("threshold"), qbits=r.pos_int("qbits"),
                     bits=r.pos_int("bits"), range=r.pos_float("range"), clip=r.nonneg_float("clip"))
    if "max_weight" in m:
        p.max_weight = r.pos_int("max_weight")
    if "dp_sigma" in m:
        p.dp_sigma, p.dp_gamma, p.dp_clip = r.pos_float("dp_sigma"), r.pos_float("dp_gamma"), r.pos_float("dp_clip")
        p.rotation_seed = r.text("rotation_seed")
        if not _HEX_SEED.fullmatch(p.rotation_seed):
            raise WireError("bad_field", "task.secagg.rotation_seed must be 64 hex digits")
    if p.mode not in SECAGG_MODES:
        raise WireError("bad_field", f"task.secagg.mode must be one of {SECAGG_MODES}, got {p.mode!r}")
    if not p.qbits <= p.bits <= 32:
        raise WireError("bad_field", f"task.secagg needs qbits <= bits <= 32, got {p.qbits} and {p.bits}")
    if p.max_weight >= 1 << p.qbits or (p.max_weight and p.dp_sigma):
        raise WireError("bad_field", f"task.secagg.max_weight must be below 2^qbits and not set with DP, "
                                     f"got {p.max_weight}")
    return p


def _history(items: list) -> list[dict[str, float]]:
    if len(items) > MAX_METRICS_HISTORY:
        raise WireError("bad_field", f"metrics.history has {len(items)} entries, limit {MAX_METRICS_HISTORY}")
    out = []
    for i, h in enumerate(items):
        if not isinstance(h, dict):
            raise WireError("bad_field", f"metrics.history[{i}] must be a map")
        out.append(_Reader({"h": h}, f"metrics.history[{i}]").float_map("h"))
    return out


class _Reader:
    """Typed field access on a decoded map; every miss is a WireError naming the field."""

    def __init__(self, m: dict, where: str) -> None:
        self.m = m
        self.where = where

    def get(self, key: str, typ: type) -> Any:
        if key not in self.m:
            raise WireError("missing_field", f"{self.where}.{key} is missing")
        value = self.m[key]
        # bool is an int subclass; an int field must not accept True.
        if not isinstance(value, typ) or (typ is int and isinstance(value, bool)):
            raise WireError("bad_field", f"{self.where}.{key} must be {typ.__name__}, got {type(value).__name__}")
        return value

    def optional(self, key: str, typ: type, default: Any) -> Any:
        """A field newer senders include and older ones may omit."""
        return self.get(key, typ) if key in self.m else default

    def text(self, key: str, allow_empty: bool = False) -> str:
        value = self.get(key, str)
        if not value and not allow_empty:
            raise WireError("bad_field", f"{self.where}.{key} must not be empty")
        return value

    def id(self, key: str) -> str:
        value = self.get(key, str)
        if not valid_id(value):
            raise WireError("bad_field", f"{self.where}.{key} must match [A-Za-z0-9_-]{{1,64}}")
        return value

    def nonneg_int(self, key: str) -> int:
        value = self.get(key, int)
        if value < 0:
            raise WireError("bad_field", f"{self.where}.{key} must be >= 0, got {value}")
        return value

    def run(self) -> int:
        """The optional ``run`` field: 0 (a sender that predates run ids) when absent."""
        value = self.optional("run", int, 0)
        if not 0 <= value <= MAX_RUN:
            raise WireError("bad_field", f"{self.where}.run must be in 0..{MAX_RUN}, got {value}")
        return value

    def pos_int(self, key: str) -> int:
        value = self.get(key, int)
        if value <= 0:
            raise WireError("bad_field", f"{self.where}.{key} must be > 0, got {value}")
        return value

    def number(self, key: str) -> float:
        value = self.m.get(key)
        if key not in self.m:
            raise WireError("missing_field", f"{self.where}.{key} is missing")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise WireError("bad_field", f"{self.where}.{key} must be a finite number")
        return float(value)

    def nonneg_float(self, key: str) -> float:
        value = self.number(key)
        if value < 0:
            raise WireError("bad_field", f"{self.where}.{key} must be >= 0, got {value}")
        return value

    def pos_float(self, key: str) -> float:
        value = self.number(key)
        if value <= 0:
            raise WireError("bad_field", f"{self.where}.{key} must be > 0, got {value}")
        return value

    def float_map(self, key: str) -> dict[str, float]:
        value = self.get(key, dict)
        out: dict[str, float] = {}
        for k, v in value.items():
            if not isinstance(k, str) or not k:
                raise WireError("bad_field", f"{self.where}.{key} keys must be non-empty strings")
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or abs(v) > MAX_METRIC_ABS:
                raise WireError("bad_field", f"{self.where}.{key}.{k} must be a finite number within ±{MAX_METRIC_ABS:g}")
            out[k] = float(v)
        return out


#: Typed field access on a decoded map, for the codecs of protocol extensions
#: (edge_agent.secagg.messages) that build on this one.
FieldReader = _Reader
