"""A device's local data: ``.npz`` with ``X`` and ``y``, ``.csv`` with a label column, or (Python API) arrays,
a callable returning arrays, or a stream of batches (:class:`Batches`)."""

from __future__ import annotations

import csv
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np


class DataError(ValueError):
    """Local data that cannot be used, with a message naming the file and problem."""


@dataclass
class LocalData:
    """Training and holdout split of one device's data.

    From files and arrays, ``X_train``/``y_train`` hold the training rows.
    A device whose data is a stream instead sets them to None and gives
    ``batches(seed)`` (one epoch of ``(X, y)`` minibatches) and
    ``samples`` (its size, what FedAvg weighs by); ``source`` is handed to
    models that run their own loops (e.g. a PyTorch DataLoader).
    """

    X_train: np.ndarray | None
    y_train: np.ndarray | None
    X_holdout: np.ndarray
    y_holdout: np.ndarray
    batches: Callable[[int], Iterable[tuple[np.ndarray, np.ndarray]]] | None = None
    samples: int = 0
    source: Any = None

    @property
    def num_samples(self) -> int:
        return len(self.X_train) if self.X_train is not None else self.samples

    def training_rows(self) -> tuple[np.ndarray, np.ndarray]:
        """Rows to check the data against a model with: the training arrays, or a stream's first batch."""
        if self.X_train is not None and self.y_train is not None:
            return self.X_train, self.y_train
        if self.batches is None:
            raise DataError("no training data: neither arrays nor batches")
        for X, y in self.batches(0):
            return np.asarray(X), np.asarray(y)
        raise DataError("the batch stream yielded no batch")


@dataclass
class Batches:
    """Local training data as a stream of ``(X, y)`` minibatches (Python API).

    ``source`` is either a re-iterable of batches (a list, a PyTorch
    ``DataLoader``: iterated once per epoch) or a callable ``source(seed)``
    returning a fresh iterable for one epoch (shuffled from ``seed`` if you
    like). One-shot iterators (generators) are refused: every round trains
    several epochs. ``samples`` is what FedAvg weighs this device by; when
    omitted it is counted by one pass over ``source``. ``holdout`` is an
    optional ``(X, y)`` the global model is evaluated on before training.
    Batches keep the batch size the source gives them (the task's
    ``batch_size`` applies to arrays only).
    """

    source: Any
    samples: int | None = None
    holdout: tuple[Any, Any] | None = None

    def epochs(self) -> Callable[[int], Iterable[tuple[np.ndarray, np.ndarray]]]:
        """``f(seed)`` giving one epoch of numpy batches."""
        src = self.source
        if iter_once(src):
            raise DataError("Batches: a one-shot iterator (generator) cannot be replayed every epoch; pass a list, "
                            "a DataLoader or a callable seed -> iterable")
        make = src if callable(src) else (lambda _seed: src)

        def epoch(seed: int) -> Iterable[tuple[np.ndarray, np.ndarray]]:
            for i, batch in enumerate(make(seed)):
                yield _batch_arrays(batch, i)

        return epoch


def iter_once(obj: Any) -> bool:
    """True for an iterator that is its own iterable (a generator): it can be consumed only once."""
    return hasattr(obj, "__next__") and iter(obj) is obj


def _batch_arrays(batch: Any, i: int) -> tuple[np.ndarray, np.ndarray]:
    try:
        X, y = batch
    except (TypeError, ValueError):
        raise DataError(f"batch {i} must be a pair (X, y), got {type(batch).__name__}") from None
    X, y = _numpy(X), _numpy(y)
    return X.astype(np.float32, copy=False) if X.dtype != np.float32 else X, y


def _numpy(a: Any) -> np.ndarray:
    # Framework tensors (torch, tf) convert through their own .numpy().
    if hasattr(a, "detach"):
        a = a.detach()
    if hasattr(a, "numpy") and not isinstance(a, np.ndarray):
        a = a.numpy()
    return np.asarray(a)


def local_data(data: Any, *, holdout: float = 0.2, seed: int = 0, label_column: str = "label") -> LocalData:
    """A device's data from whatever the Python API was given.

    ``data`` may be a path (.npz or .csv, as for the CLI), a pair of arrays
    ``(X, y)``, a callable with no arguments returning such a pair (loaded
    once, when the agent starts), :class:`Batches` (a stream), or a
    :class:`LocalData` used as it is. Arrays get ``holdout`` of their rows
    held out (seeded) to evaluate the global model. Raises DataError naming
    the problem: shapes, non-numeric values, NaN or Inf, no rows.
    """
    if isinstance(data, LocalData):
        return data
    if isinstance(data, (str, Path)):
        X, y = load(data, label_column)
        return split_holdout(X, y, holdout, seed)
    if isinstance(data, Batches):
        epoch = data.epochs()
        samples = data.samples
        if samples is None:
            samples = sum(len(X) for X, _ in epoch(0))
        if not isinstance(samples, int) or isinstance(samples, bool) or samples < 1:
            raise DataError(f"Batches: samples must be a positive integer, got {samples!r}")
        if data.holdout is not None:
            X_h, y_h = _checked_arrays(data.holdout, "Batches holdout", allow_empty=True)
        else:
            X_h, y_h = np.zeros((0, 0), np.float32), np.zeros(0, np.int64)
        out = LocalData(None, None, X_h, y_h, batches=epoch, samples=samples, source=data.source)
        out.training_rows()  # fails now, not at the first round, when the stream is empty or malformed
        return out
    if callable(data):
        try:
            loaded = data()
        except DataError:
            raise
        except Exception as exc:  # the user's loader: any failure is a data problem, said once
            raise DataError(f"the data callable failed: {type(exc).__name__}: {exc}") from None
        return local_data(loaded, holdout=holdout, seed=seed, label_column=label_column)
    if isinstance(data, (tuple, list)) and len(data) == 2:
        X, y = _checked_arrays(data, "data")
        return split_holdout(X, y, holdout, seed)
    raise DataError(f"data must be a path, (X, y), a callable returning (X, y), Batches or LocalData; "
                    f"got {type(data).__name__}")


def _checked_arrays(pair: Any, where: str, allow_empty: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """``(X, y)`` given in Python: as from a file (:func:`checked`), regression targets as float32."""
    try:
        X, y = (_numpy(a) for a in pair)
    except (TypeError, ValueError) as exc:
        raise DataError(f"{where}: must be a pair of arrays (X, y): {exc}") from None
    X, y = checked(X, y, where, allow_empty)
    return X, (y.astype(np.float32) if y.dtype.kind == "f" else y)


def checked(X: np.ndarray, y: np.ndarray, where: str, allow_empty: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """The checks all local data passes, from a file or from Python: X float32 [n, features], y [n].

    Raises DataError naming ``where`` and the problem: shapes, non-numeric
    values, no rows, NaN or Inf. Labels written as whole floats become int64
    class indices.
    """
    if X.ndim != 2 or y.ndim != 1 or len(X) != len(y):
        raise DataError(f"{where}: X must be [n, features] and y [n], got {X.shape} and {y.shape}")
    if X.dtype.kind not in "iuf":
        raise DataError(f"{where}: X must be numeric, got dtype {X.dtype}")
    if y.dtype.kind not in "iuf":
        raise DataError(f"{where}: y must hold numbers (class indices or regression targets), got dtype {y.dtype}")
    if len(X) == 0 and not allow_empty:
        raise DataError(f"{where}: no samples")
    X = X.astype(np.float32, copy=False)
    if not np.isfinite(X).all():
        raise DataError(f"{where}: X contains NaN or Inf")
    if y.dtype.kind == "f":
        if not np.isfinite(y).all():
            raise DataError(f"{where}: y contains NaN or Inf")
        if np.all(y == np.round(y)):
            y = y.astype(np.int64)
    return X, y


def load(path: str | Path, label_column: str = "label") -> tuple[np.ndarray, np.ndarray]:
    """Load ``X`` (float32, [n, features]) and ``y`` from an .npz or .csv file."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{p}: no such file")
    if p.suffix == ".npz":
        X, y = _load_npz(p)
    elif p.suffix == ".csv":
        X, y = _load_csv(p, label_column)
    else:
        raise DataError(f"{p}: unknown data format {p.suffix!r} (use .npz with X and y, or .csv)")
    return checked(X, y, str(p))


def _load_npz(p: Path) -> tuple[np.ndarray, np.ndarray]:
    # allow_pickle=False: a data file is not trusted to run code either.
    # numpy refuses object arrays (and unreadable files) with a bare
    # ValueError/BadZipFile/EOFError; turn those into a DataError naming the
    # file. The file is opened here so that it is closed on those errors too
    # (np.load leaks its own handle when a truncated zip fails to open).
    try:
        with p.open("rb") as fh, np.load(fh, allow_pickle=False) as f:
            missing = {"X", "y"} - set(f.files)
            if missing:
                raise DataError(f"{p}: missing array(s) {sorted(missing)} (has {f.files})")
            X = np.asarray(f["X"], dtype=np.float32)
            y = f["y"]
    except DataError:
        raise
    except (ValueError, TypeError, AttributeError, OSError, EOFError, zipfile.BadZipFile) as exc:
        raise DataError(f"{p}: not a readable .npz of numeric arrays X and y ({exc})") from None
    return X, y  # whole-float labels become class indices in checked()


def _load_csv(p: Path, label_column: str) -> tuple[np.ndarray, np.ndarray]:
    with p.open(newline="") as fh:
        reader = csv.reader(fh)
        try:
            header = next(reader)
        except StopIteration:
            raise DataError(f"{p}: empty file") from None
        if label_column not in header:
            raise DataError(f"{p}: no label column {label_column!r} in header {header}")
        li = header.index(label_column)
        rows = [row for row in reader if row]
    for i, row in enumerate(rows):
        if len(row) != len(header):
            raise DataError(f"{p}: every row must have {len(header)} columns, data row {i + 1} has {len(row)}")
    try:
        table = np.array(rows, dtype=np.float64)
    except ValueError as exc:
        raise DataError(f"{p}: every cell must be a number ({exc})") from None
    if table.ndim != 2 or table.shape[1] != len(header):
        raise DataError(f"{p}: every row must have {len(header)} columns")
    y = table[:, li]
    X = np.delete(table, li, axis=1).astype(np.float32)
    if np.all(y == np.round(y)):
        return X, y.astype(np.int64)
    return X, y.astype(np.float32)


def split_holdout(X: np.ndarray, y: np.ndarray, fraction: float, seed: int) -> LocalData:
    """Hold out ``fraction`` of the samples (seeded) for evaluating the global model."""
    n = len(X)
    order = np.random.default_rng(seed).permutation(n)
    k = int(round(n * fraction)) if n > 1 else 0
    k = min(k, n - 1)
    hold, train = order[:k], order[k:]
    return LocalData(X[train], y[train], X[hold], y[hold])
