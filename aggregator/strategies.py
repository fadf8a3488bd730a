"""Aggregation strategies: one small class per rule behind one interface.

A strategy sees each accepted update once (:meth:`Strategy.add`) and at the
end of the round turns what it accumulated into the next global model
(:meth:`Strategy.result`). Streaming strategies keep O(model) memory: a
running float64 weighted sum, never the individual updates. Buffering
(robust) strategies keep every update of the round as one float32 row and
are capped by ``max_updates`` (:meth:`Strategy.full`).

Rules, formulas, defaults and memory bounds: docs/strategies.md.
"""

from __future__ import annotations

import logging
import math
from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any, Iterator, Mapping

import numpy as np

if TYPE_CHECKING:
    from .config import StrategyConfig

log = logging.getLogger(__name__)

Params = dict[str, np.ndarray]

#: Every rule ``[strategy] name`` accepts.
STRATEGIES = (
    "fedavg",
    "fedavg_unweighted",
    "fedprox",
    "fedavgm",
    "fedadam",
    "fedyogi",
    "fedadagrad",
    "median",
    "trimmed_mean",
    "krum",
    "multi_krum",
)
#: Rules that keep a server optimizer state (and read ``server_lr``).
SERVER_OPTIMIZERS = ("fedavgm", "fedadam", "fedyogi", "fedadagrad")
#: Rules that keep every update of the round (capped by ``max_updates``).
BUFFERING = ("median", "trimmed_mean", "krum", "multi_krum")
#: ``server_lr = 0`` in the config means this per-rule default:
#: FedAvgM as in Hsu et al. 2019 (η = 1, the momentum does the rest), the
#: adaptive rules a mid-grid value of the server rates Reddi et al. 2021 tune.
DEFAULT_SERVER_LR = {"fedavgm": 1.0, "fedadam": 0.1, "fedyogi": 0.1, "fedadagrad": 0.1}

# Working memory of the coordinate-wise passes over the buffered updates
# (median, sort, Gram matrix): columns are processed in blocks whose float64
# copy is about this size, never the whole n × d matrix at once.
_CHUNK_BYTES = 8 << 20


def _clip_factor(sq_norm: float, clip_norm: float) -> float:
    """min(1, C / ||Δ||₂) for a squared norm (1 when clipping is off)."""
    if clip_norm <= 0 or sq_norm <= clip_norm * clip_norm:
        return 1.0
    return clip_norm / math.sqrt(sq_norm)


class Strategy(ABC):
    """Interface every aggregation rule implements."""

    #: True when updates are folded into O(model) state as they arrive.
    streaming: bool = True
    name: str = ""
    #: L2 bound applied to each whole delta in :meth:`add` (0: off).
    clip_norm: float = 0.0
    #: Updates added in the current round, and how many of them were clipped.
    count: int = 0
    clipped: int = 0

    @abstractmethod
    def begin(self, global_params: Mapping[str, np.ndarray]) -> None:
        """Start a round on top of ``global_params`` (drops anything accumulated)."""

    @abstractmethod
    def add(self, delta: Mapping[str, np.ndarray], weight: float, metrics: Mapping[str, float] | None = None) -> None:
        """Fold one accepted update (``local - global``) into the round.

        ``weight`` is the update's sample count; rules that average
        uniformly, and the robust rules, ignore it. (In asynchronous mode
        the coordinator scales a stale delta before it gets here.)
        ``metrics`` are the agent's reported metrics (rules may ignore them).
        """

    @abstractmethod
    def result(self, global_params: Mapping[str, np.ndarray]) -> Params:
        """The next global model (float32) from what was added this round."""

    def full(self) -> bool:
        """True when the rule cannot take another update this round.

        Streaming rules never fill up. Rules that keep every update (median,
        Krum, ...) have a configured cap, and the coordinator rejects updates
        beyond it (reason ``round_full``) instead of growing without bound.
        """
        return False

    def state_dict(self) -> dict[str, Any]:
        """Strategy state that must survive a restart: a flat dict of numpy
        arrays and JSON scalars (none for plain FedAvg). Checkpoints store the
        arrays in the npz and the scalars in JSON."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` output."""


# ---------------------------------------------------------------------------
# streaming: FedAvg and the server optimizers built on its weighted mean


class FedAvg(Strategy):
    """Federated averaging (McMahan et al. 2017).

    ``weighted=True``: θ ← θ + Σ n_k Δ_k / Σ n_k (weights = sample counts).
    ``weighted=False``: the plain mean of the updates.
    The sum is kept in float64 so that the order in which updates arrive
    changes the result by rounding in the 16th digit, not the 7th.
    With ``clip_norm`` > 0 each delta is first scaled by min(1, C/||Δ||₂).
    """

    name = "fedavg"

    def __init__(self, weighted: bool = True, clip_norm: float = 0.0, name: str | None = None) -> None:
        self.weighted = weighted
        self.clip_norm = float(clip_norm)
        self.name = name or ("fedavg" if weighted else "fedavg_unweighted")
        self._sum: Params = {}
        self._scratch: Params = {}
        self._total = 0.0
        self.count = 0
        self.clipped = 0

    def begin(self, global_params: Mapping[str, np.ndarray]) -> None:
        if set(self._sum) != set(global_params) or any(
            self._sum[k].shape != v.shape for k, v in global_params.items()
        ):
            self._sum = {k: np.zeros(v.shape, dtype=np.float64) for k, v in global_params.items()}
            self._scratch = {k: np.empty(v.shape, dtype=np.float64) for k, v in global_params.items()}
        else:
            for a in self._sum.values():
                a.fill(0.0)
        self._total = 0.0
        self.count = 0
        self.clipped = 0

    def add(self, delta: Mapping[str, np.ndarray], weight: float, metrics: Mapping[str, float] | None = None) -> None:
        w = float(weight) if self.weighted else 1.0
        if self.clip_norm > 0:
            # Widen every parameter first: the norm is over all of them
            # together, and the clip factor folds into the weight.
            sq = 0.0
            for k, scratch in self._scratch.items():
                np.copyto(scratch, delta[k])
                flat = scratch.reshape(-1)
                sq += float(np.dot(flat, flat))
            factor = _clip_factor(sq, self.clip_norm)
            if factor < 1.0:
                self.clipped += 1
            for k, acc in self._sum.items():
                scratch = self._scratch[k]
                scratch *= w * factor
                acc += scratch
        else:
            self._accumulate(delta, w)
        self._total += w
        self.count += 1

    def _accumulate(self, values: Mapping[str, np.ndarray], w: float) -> None:
        """Add ``w`` × ``values`` to the float64 sum.

        Widen into a preallocated float64 buffer, scale, add: no allocation
        per call whatever the model size, and the product is formed in
        float64 (multiplying a float32 delta directly would round, or
        overflow, in float32). copyto + in-place ops run at the speed of a
        plain numpy.add (bench/bench_ingest.py).
        """
        for k, acc in self._sum.items():
            scratch = self._scratch[k]
            np.copyto(scratch, values[k])
            scratch *= w
            acc += scratch

    def add_partial(self, mean: Mapping[str, np.ndarray], weight: float, count: int, clipped: int = 0) -> None:
        """Fold in an ingest worker's share of the round: the mean of ``count`` updates whose weights sum to ``weight``.

        The worker ran this class's own :meth:`add` (with the same ``weighted``
        and ``clip_norm``) on each of its updates, so ``weight`` already is a
        sum of FedAvg weights and is used as it is, never replaced by 1.
        """
        self._accumulate(mean, float(weight))
        self._total += float(weight)
        self.count += int(count)
        self.clipped += int(clipped)

    def share(self) -> tuple[Params, float]:
        """What an ingest worker sends for :meth:`add_partial`: (the mean delta as float32, the sum of weights)."""
        if self.count == 0:
            raise ValueError("no updates to aggregate")
        with np.errstate(over="ignore", invalid="ignore"):
            return {k: self._mean_delta(k).astype(np.float32) for k in self._sum}, self._total

    def _mean_delta(self, k: str) -> np.ndarray:
        """The round's (weighted) mean delta of parameter ``k``, float64."""
        return self._sum[k] / self._total

    def result(self, global_params: Mapping[str, np.ndarray]) -> Params:
        if self.count == 0:
            raise ValueError("no updates to aggregate")
        # Overflow to inf is possible with hostile input; the coordinator
        # checks the result and refuses to publish it, so no warning here.
        with np.errstate(over="ignore"):
            return {
                k: (global_params[k].astype(np.float64) + self._mean_delta(k)).astype(np.float32)
                for k in global_params
            }


class _ServerOptimizer(FedAvg):
    """A server optimizer applied to FedAvg's weighted mean delta Δ (Reddi et al. 2021).

    The optimizer state is one float64 array per parameter per buffer
    (``buffers``), created on the first round. :meth:`result` advances it
    once per round: it computes the candidate state and the new model, and
    keeps the candidate only if the model is finite (the coordinator refuses
    a non-finite model and re-runs the round, which must start from the
    state before it). A second call in the same round returns the same
    model without stepping again.
    """

    buffers: tuple[str, ...] = ()

    def __init__(self, name: str, server_lr: float, clip_norm: float = 0.0) -> None:
        super().__init__(weighted=True, clip_norm=clip_norm, name=name)
        self.server_lr = float(server_lr)
        self.steps = 0
        self._state: dict[str, Params] = {}
        self._last: Params | None = None

    # subclass hooks
    def _initial(self, buffer: str, shape: tuple[int, ...]) -> np.ndarray:
        return np.zeros(shape, dtype=np.float64)

    @abstractmethod
    def _step(self, delta: np.ndarray, state: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """(new buffers, parameter step) for one parameter's mean delta."""

    def begin(self, global_params: Mapping[str, np.ndarray]) -> None:
        super().begin(global_params)
        self._last = None
        shapes = {k: v.shape for k, v in global_params.items()}
        if self._state and any(
            set(p) != set(shapes) or any(p[k].shape != s for k, s in shapes.items()) for p in self._state.values()
        ):
            # The coordinator refuses a checkpoint of another model, so this
            # means state of some other run: start the optimizer afresh.
            log.warning("%s: optimizer state does not match the model; starting it afresh", self.name)
            self._state = {}
            self.steps = 0
        if not self._state:
            self._state = {b: {k: self._initial(b, s) for k, s in shapes.items()} for b in self.buffers}

    def add(self, delta: Mapping[str, np.ndarray], weight: float, metrics: Mapping[str, float] | None = None) -> None:
        self._last = None
        super().add(delta, weight, metrics)

    def add_partial(self, mean: Mapping[str, np.ndarray], weight: float, count: int, clipped: int = 0) -> None:
        self._last = None
        super().add_partial(mean, weight, count, clipped)

    def result(self, global_params: Mapping[str, np.ndarray]) -> Params:
        if self.count == 0:
            raise ValueError("no updates to aggregate")
        if self._last is not None:
            return {k: v.copy() for k, v in self._last.items()}
        new_state: dict[str, Params] = {b: {} for b in self.buffers}
        out: Params = {}
        with np.errstate(over="ignore", invalid="ignore"):
            for k in global_params:
                bufs, step = self._step(self._mean_delta(k), {b: self._state[b][k] for b in self.buffers})
                for b in self.buffers:
                    new_state[b][k] = bufs[b]
                out[k] = (global_params[k].astype(np.float64) + step).astype(np.float32)
        if all(np.isfinite(a).all() for a in out.values()):
            self._state = new_state
            self.steps += 1
            self._last = {k: v.copy() for k, v in out.items()}
        return out

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"rule": self.name, "steps": self.steps}
        for b, per_param in self._state.items():
            for k, a in per_param.items():
                state[f"{b}/{k}"] = a.copy()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._last = None
        self._state = {}
        self.steps = 0
        if not state:
            return  # a checkpoint of a stateless rule, or of a fresh run
        rule = state.get("rule")
        if rule != self.name:
            log.warning("checkpoint holds %s state, the configured rule is %s: %s starts afresh",
                        rule or "another rule's", self.name, self.name)
            return
        loaded: dict[str, Params] = {b: {} for b in self.buffers}
        for key, value in state.items():
            b, sep, param = key.partition("/")
            if sep and b in loaded:
                a = np.array(value, dtype=np.float64)
                if not np.isfinite(a).all():
                    raise ValueError(f"{self.name} state {key!r} is not finite")
                loaded[b][param] = a
        names = [set(p) for p in loaded.values()]
        if not names[0] or any(n != names[0] for n in names):
            raise ValueError(f"{self.name} state needs {', '.join(b + '/<param>' for b in self.buffers)} "
                             f"for the same parameters; got keys {sorted(state)}")
        self._state = loaded
        self.steps = int(state.get("steps", 0))


class FedAvgM(_ServerOptimizer):
    """FedAvg with server momentum (Hsu et al. 2019): v ← βv + Δ; θ ← θ + ηv."""

    buffers = ("momentum",)

    def __init__(self, server_lr: float = 1.0, momentum: float = 0.9, clip_norm: float = 0.0) -> None:
        super().__init__("fedavgm", server_lr, clip_norm)
        self.momentum = float(momentum)

    def _step(self, delta, state):
        v = state["momentum"] * self.momentum + delta
        return {"momentum": v}, self.server_lr * v


class _Adaptive(_ServerOptimizer):
    """Reddi et al. 2021, Algorithm 2, without bias correction.

    m ← β1·m + (1−β1)·Δ; v by the rule; θ ← θ + η·m/(√v + τ).
    m starts at 0 and v at τ² (the paper asks for v₋₁ ≥ τ²).
    """

    buffers = ("m", "v")

    def __init__(self, name: str, server_lr: float = 0.1, beta1: float = 0.9, beta2: float = 0.99,
                 tau: float = 1e-3, clip_norm: float = 0.0) -> None:
        super().__init__(name, server_lr, clip_norm)
        self.beta1, self.beta2, self.tau = float(beta1), float(beta2), float(tau)

    def _initial(self, buffer, shape):
        return np.full(shape, self.tau * self.tau if buffer == "v" else 0.0, dtype=np.float64)

    @abstractmethod
    def _second_moment(self, v: np.ndarray, delta_sq: np.ndarray) -> np.ndarray: ...

    def _step(self, delta, state):
        m = state["m"] * self.beta1 + (1.0 - self.beta1) * delta
        v = self._second_moment(state["v"], delta * delta)
        return {"m": m, "v": v}, self.server_lr * m / (np.sqrt(v) + self.tau)


class FedAdagrad(_Adaptive):
    """v ← v + Δ²."""

    def __init__(self, **kw: float) -> None:
        super().__init__("fedadagrad", **kw)

    def _second_moment(self, v, delta_sq):
        return v + delta_sq


class FedAdam(_Adaptive):
    """v ← β2·v + (1−β2)·Δ²."""

    def __init__(self, **kw: float) -> None:
        super().__init__("fedadam", **kw)

    def _second_moment(self, v, delta_sq):
        return self.beta2 * v + (1.0 - self.beta2) * delta_sq


class FedYogi(_Adaptive):
    """v ← v − (1−β2)·Δ²·sign(v − Δ²)."""

    def __init__(self, **kw: float) -> None:
        super().__init__("fedyogi", **kw)

    def _second_moment(self, v, delta_sq):
        return v - (1.0 - self.beta2) * delta_sq * np.sign(v - delta_sq)


# ---------------------------------------------------------------------------
# buffering: robust rules over every update of the round (unweighted)


class _Buffered(Strategy):
    """Keeps each update of the round as one flattened float32 row.

    Memory: n × d × 4 bytes for n held updates of d parameters. The rules
    never build the n × d matrix: :meth:`_column_blocks` gathers the rows
    block of columns by block of columns into one float64 buffer of about
    ``_CHUNK_BYTES``, and works on that (Krum adds two n × n float64
    arrays). Robust rules are unweighted: the sample count cannot be
    verified, and weighting by it would let one agent that claims many
    samples dominate.
    """

    streaming = False

    def __init__(self, name: str, max_updates: int = 1000, clip_norm: float = 0.0) -> None:
        self.name = name
        self.max_updates = int(max_updates)
        self.clip_norm = float(clip_norm)
        self._layout: list[tuple[str, tuple[int, ...], int, int]] = []  # name, shape, offset, size
        self._d = 0
        self._rows: list[np.ndarray] = []
        self.count = 0
        self.clipped = 0

    @property
    def rows(self) -> tuple[np.ndarray, ...]:
        """The held updates (after clipping), flattened in parameter order, float32."""
        return tuple(self._rows)

    def begin(self, global_params: Mapping[str, np.ndarray]) -> None:
        self._layout = []
        off = 0
        for k, v in global_params.items():
            size = int(np.prod(v.shape, dtype=np.int64))
            self._layout.append((k, tuple(v.shape), off, size))
            off += size
        self._d = off
        self._rows = []
        self.count = 0
        self.clipped = 0

    def add(self, delta: Mapping[str, np.ndarray], weight: float, metrics: Mapping[str, float] | None = None) -> None:
        row = np.empty(self._d, dtype=np.float32)
        for k, _shape, off, size in self._layout:
            row[off:off + size] = np.ravel(delta[k])
        if self.clip_norm > 0:
            row64 = row.astype(np.float64)
            factor = _clip_factor(float(np.dot(row64, row64)), self.clip_norm)
            if factor < 1.0:
                row64 *= factor
                row[:] = row64
                self.clipped += 1
        self._rows.append(row)
        self.count += 1

    def full(self) -> bool:
        return self.count >= self.max_updates

    def _column_blocks(self, rows: list[np.ndarray]) -> Iterator[tuple[slice, np.ndarray]]:
        """(columns, their n × w float64 values) for consecutive column blocks.

        One buffer of about ``_CHUNK_BYTES`` is refilled for every block, so
        the caller may sort or partition the block in place.
        """
        n = len(rows)
        width = max(1, min(self._d, _CHUNK_BYTES // (8 * n)))
        buf = np.empty((n, width), dtype=np.float64)
        for j in range(0, self._d, width):
            w = min(width, self._d - j)
            block = buf[:, :w]
            for i, r in enumerate(rows):
                block[i] = r[j:j + w]
            yield slice(j, j + w), block

    @abstractmethod
    def _aggregate(self, rows: list[np.ndarray]) -> np.ndarray:
        """The aggregate delta (float64, length d) of the held rows."""

    def result(self, global_params: Mapping[str, np.ndarray]) -> Params:
        if self.count == 0:
            raise ValueError("no updates to aggregate")
        agg = self._aggregate(self._rows)
        with np.errstate(over="ignore"):
            return {
                k: (global_params[k].astype(np.float64) + agg[off:off + size].reshape(shape)).astype(np.float32)
                for k, shape, off, size in self._layout
            }

    def _median(self, rows: list[np.ndarray]) -> np.ndarray:
        out = np.empty(self._d, dtype=np.float64)
        for sl, block in self._column_blocks(rows):
            out[sl] = np.median(block, axis=0, overwrite_input=True)
        return out

    def _mean(self, rows: list[np.ndarray]) -> np.ndarray:
        out = np.empty(self._d, dtype=np.float64)
        for sl, block in self._column_blocks(rows):
            out[sl] = block.mean(axis=0)
        return out


class Median(_Buffered):
    """Coordinate-wise median (Yin et al. 2018); even n: mean of the two middle values."""

    def __init__(self, max_updates: int = 1000, clip_norm: float = 0.0) -> None:
        super().__init__("median", max_updates, clip_norm)

    def _aggregate(self, rows):
        return self._median(rows)


class TrimmedMean(_Buffered):
    """Coordinate-wise trimmed mean: drop the ⌊β·n⌋ largest and smallest values of each coordinate."""

    def __init__(self, trim_beta: float = 0.1, max_updates: int = 1000, clip_norm: float = 0.0) -> None:
        super().__init__("trimmed_mean", max_updates, clip_norm)
        self.trim_beta = float(trim_beta)

    def trimmed(self, n: int) -> int:
        """Values dropped from each side of a coordinate for n updates."""
        # the epsilon keeps e.g. 0.29 × 100 (= 28.999999999999996) at 29
        return int(math.floor(self.trim_beta * n + 1e-9))

    def _aggregate(self, rows):
        n = len(rows)
        k = self.trimmed(n)
        out = np.empty(self._d, dtype=np.float64)
        for sl, block in self._column_blocks(rows):
            block.sort(axis=0)
            out[sl] = block[k:n - k].mean(axis=0)
        return out


class Krum(_Buffered):
    """Krum and Multi-Krum (Blanchard et al. 2017).

    score_i = Σ of the squared distances from update i to its n − f − 2
    nearest other updates. Krum returns the lowest-score update; Multi-Krum
    (``multi=True``) the mean of the ``m`` lowest-score ones (m = 0: n − f;
    m is capped at n − f). Krum needs n > 2f + 2; with fewer updates the
    round falls back to the coordinate-wise median, with a warning
    (``fell_back`` is True for that round).
    """

    def __init__(self, byzantine_f: int = 1, multi: bool = False, multi_krum_m: int = 0,
                 max_updates: int = 1000, clip_norm: float = 0.0) -> None:
        super().__init__("multi_krum" if multi else "krum", max_updates, clip_norm)
        self.f = int(byzantine_f)
        self.multi = multi
        self.m = int(multi_krum_m)
        self.scores: np.ndarray | None = None
        self.selected: list[int] = []
        self.fell_back = False

    def begin(self, global_params: Mapping[str, np.ndarray]) -> None:
        super().begin(global_params)
        self.scores = None
        self.selected = []
        self.fell_back = False

    def krum_scores(self, rows: list[np.ndarray]) -> np.ndarray:
        """Krum score of every row (needs n > 2f + 2)."""
        n = len(rows)
        # Pairwise squared distances ||a||² + ||b||² − 2a·b from the Gram
        # matrix, accumulated in float64 over column blocks.
        gram = np.zeros((n, n), dtype=np.float64)
        for _sl, block in self._column_blocks(rows):
            gram += block @ block.T
        sq = np.diag(gram).copy()
        dist = gram
        dist *= -2.0
        dist += sq[:, None]
        dist += sq[None, :]
        np.maximum(dist, 0.0, out=dist)  # rounding can make a tiny distance negative
        np.fill_diagonal(dist, np.inf)
        k = n - self.f - 2
        dist.partition(k - 1, axis=1)
        return dist[:, :k].sum(axis=1)

    def _aggregate(self, rows):
        n = len(rows)
        if n <= 2 * self.f + 2:
            log.warning("%s needs more than 2f + 2 = %d updates, the round has %d: using the coordinate-wise median",
                        self.name, 2 * self.f + 2, n)
            self.fell_back = True
            self.scores = None
            self.selected = list(range(n))
            return self._median(rows)
        self.fell_back = False
        self.scores = self.krum_scores(rows)
        order = np.argsort(self.scores, kind="stable")
        if not self.multi:
            best = int(order[0])
            self.selected = [best]
            return rows[best].astype(np.float64)
        m = self.m or n - self.f
        if m > n - self.f:
            log.warning("multi_krum: m = %d exceeds n - f = %d this round; averaging %d", m, n - self.f, n - self.f)
            m = n - self.f
        self.selected = sorted(int(i) for i in order[:m])
        return self._mean([rows[i] for i in self.selected])


# ---------------------------------------------------------------------------


def make_strategy(config: "StrategyConfig") -> Strategy:
    """Build the strategy a ``[strategy]`` config section names."""
    name = config.name
    clip = config.clip_norm
    if name in ("fedavg", "fedprox"):
        # FedProx aggregates like FedAvg; its proximal term (prox_mu) is
        # applied by the agents, which receive it in every task.
        return FedAvg(weighted=True, clip_norm=clip, name=name)
    if name == "fedavg_unweighted":
        return FedAvg(weighted=False, clip_norm=clip, name=name)
    if name in SERVER_OPTIMIZERS:
        lr = config.server_lr or DEFAULT_SERVER_LR[name]
        if name == "fedavgm":
            return FedAvgM(server_lr=lr, momentum=config.momentum, clip_norm=clip)
        cls = {"fedadam": FedAdam, "fedyogi": FedYogi, "fedadagrad": FedAdagrad}[name]
        return cls(server_lr=lr, beta1=config.beta1, beta2=config.beta2, tau=config.tau, clip_norm=clip)
    if name == "median":
        return Median(max_updates=config.max_updates, clip_norm=clip)
    if name == "trimmed_mean":
        return TrimmedMean(trim_beta=config.trim_beta, max_updates=config.max_updates, clip_norm=clip)
    if name in ("krum", "multi_krum"):
        return Krum(byzantine_f=config.byzantine_f, multi=name == "multi_krum", multi_krum_m=config.multi_krum_m,
                    max_updates=config.max_updates, clip_norm=clip)
    raise ValueError(f"unknown strategy {name!r} (known: {', '.join(STRATEGIES)})")
