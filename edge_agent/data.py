"""Loading a device's local data: ``.npz`` with ``X`` and ``y``, or ``.csv`` with a label column."""

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
    if X.ndim != 2 or y.ndim != 1 or len(X) != len(y):
        raise DataError(f"{p}: X must be [n, features] and y [n], got {X.shape} and {y.shape}")
    if len(X) == 0:
        raise DataError(f"{p}: no samples")
    if not np.isfinite(X).all():
        raise DataError(f"{p}: X contains NaN or Inf")
    if y.dtype.kind not in "iuf":
        raise DataError(f"{p}: y must hold numbers (class indices or regression targets), got dtype {y.dtype}")
    if y.dtype.kind == "f" and not np.isfinite(y).all():
        raise DataError(f"{p}: y contains NaN or Inf")
    return X, y


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
    if y.dtype.kind == "f" and np.all(y == np.round(y)):
        y = y.astype(np.int64)
    return X, y


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
