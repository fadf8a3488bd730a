"""Loading a device's local data (.npz / .csv) and the holdout split; pure logic, no MQTT."""

from __future__ import annotations

import gc
import warnings
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge_agent.data import DataError, LocalData, load, split_holdout


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


# ---------------------------------------------------------------------------
# happy paths


def test_load_npz(tmp_path):
    X = np.arange(12, dtype=np.float64).reshape(4, 3)
    y = np.array([0, 1, 2, 1])
    np.savez(tmp_path / "d.npz", X=X, y=y)
    X2, y2 = load(tmp_path / "d.npz")
    assert X2.dtype == np.float32 and X2.shape == (4, 3)
    np.testing.assert_array_equal(X2, X)
    np.testing.assert_array_equal(y2, y)
    assert y2.dtype.kind == "i"


def test_load_npz_integral_float_labels_become_int64(tmp_path):
    np.savez(tmp_path / "d.npz", X=np.ones((3, 2)), y=np.array([0.0, 2.0, 1.0]))
    _, y = load(str(tmp_path / "d.npz"))  # a str path works too
    assert y.dtype == np.int64
    np.testing.assert_array_equal(y, [0, 2, 1])


def test_load_npz_regression_targets_stay_float(tmp_path):
    np.savez(tmp_path / "d.npz", X=np.ones((3, 2)), y=np.array([0.5, 2.0, 1.0]))
    _, y = load(tmp_path / "d.npz")
    assert y.dtype.kind == "f"
    np.testing.assert_allclose(y, [0.5, 2.0, 1.0])


def test_load_csv_with_label_column_anywhere(tmp_path):
    p = _write(tmp_path / "d.csv", "a,target,b\n1,0,2\n3,1,4.5\n\n5,2,6\n")
    X, y = load(p, label_column="target")
    assert X.dtype == np.float32
    np.testing.assert_array_equal(X, [[1, 2], [3, 4.5], [5, 6]])
    assert y.dtype == np.int64
    np.testing.assert_array_equal(y, [0, 1, 2])


def test_load_csv_default_label_column_and_float_targets(tmp_path):
    p = _write(tmp_path / "d.csv", "x1,x2,label\n1,2,0.25\n3,4,1.5\n")
    X, y = load(p)
    assert X.shape == (2, 2)
    assert y.dtype == np.float32
    np.testing.assert_allclose(y, [0.25, 1.5])


def test_csv_and_npz_agree(tmp_path):
    rng = np.random.default_rng(0)
    X = rng.integers(0, 16, (20, 5)).astype(np.float32)
    y = rng.integers(0, 10, 20)
    np.savez(tmp_path / "d.npz", X=X, y=y)
    lines = ["f0,f1,f2,f3,f4,label"] + [",".join(map(str, [*map(int, r), c])) for r, c in zip(X, y)]
    _write(tmp_path / "d.csv", "\n".join(lines) + "\n")
    Xn, yn = load(tmp_path / "d.npz")
    Xc, yc = load(tmp_path / "d.csv")
    np.testing.assert_array_equal(Xn, Xc)
    np.testing.assert_array_equal(yn, yc)


# ---------------------------------------------------------------------------
# every bad input is a DataError naming the file and the problem


def _bad(path: Path, *fragments: str, **kwargs) -> str:
    with pytest.raises(DataError) as info:
        load(path, **kwargs)
    msg = str(info.value)
    assert path.name in msg, msg
    for f in fragments:
        assert f in msg, (f, msg)
    return msg


def test_missing_file(tmp_path):
    _bad(tmp_path / "nope.npz", "no such file")


def test_directory_is_not_a_file(tmp_path):
    d = tmp_path / "dir.npz"
    d.mkdir()
    _bad(d, "no such file")


def test_unknown_suffix(tmp_path):
    _bad(_write(tmp_path / "d.json", "{}"), "unknown data format", "'.json'")


def test_npz_missing_y(tmp_path):
    np.savez(tmp_path / "d.npz", X=np.ones((3, 2)))
    _bad(tmp_path / "d.npz", "missing", "'y'")


def test_npz_missing_both(tmp_path):
    np.savez(tmp_path / "d.npz", features=np.ones((3, 2)))
    _bad(tmp_path / "d.npz", "'X'", "'y'", "features")


def test_npz_object_array_is_refused(tmp_path):
    # allow_pickle=False: an object array needs pickle and must not be loaded.
    X = np.empty((2, 2), dtype=object)
    X[:] = 1.0
    np.savez(tmp_path / "d.npz", X=X, y=np.array([0, 1]))
    _bad(tmp_path / "d.npz")


def test_npz_object_labels_are_refused(tmp_path):
    np.savez(tmp_path / "d.npz", X=np.ones((2, 2)), y=np.array([0, None], dtype=object))
    _bad(tmp_path / "d.npz")


def test_npz_that_is_not_an_npz(tmp_path):
    _bad(_write(tmp_path / "d.npz", "X,y\n1,2\n"))


def test_npz_truncated_zip(tmp_path):
    np.savez(tmp_path / "good.npz", X=np.ones((50, 4)), y=np.zeros(50))
    data = (tmp_path / "good.npz").read_bytes()
    (tmp_path / "d.npz").write_bytes(data[: len(data) // 2])
    _bad(tmp_path / "d.npz")


def test_npz_empty_file(tmp_path):
    (tmp_path / "d.npz").write_bytes(b"")
    _bad(tmp_path / "d.npz")


def test_npz_bad_file_is_closed(tmp_path):
    # a refused file must not leave its handle open (numpy's own np.load(path) leaks it on a bad zip)
    np.savez(tmp_path / "good.npz", X=np.ones((50, 4)), y=np.zeros(50))
    data = (tmp_path / "good.npz").read_bytes()
    (tmp_path / "d.npz").write_bytes(data[: len(data) // 2])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        _bad(tmp_path / "d.npz")
        gc.collect()
    assert not [w for w in caught if issubclass(w.category, ResourceWarning)], [str(w.message) for w in caught]


def test_npy_renamed_to_npz(tmp_path):
    np.save(tmp_path / "d.npy", np.ones((3, 2)))
    (tmp_path / "d.npy").rename(tmp_path / "d.npz")
    _bad(tmp_path / "d.npz")


def test_npz_non_numeric_X(tmp_path):
    np.savez(tmp_path / "d.npz", X=np.array([["a", "b"], ["c", "d"]]), y=np.array([0, 1]))
    _bad(tmp_path / "d.npz")


def test_npz_length_mismatch(tmp_path):
    np.savez(tmp_path / "d.npz", X=np.ones((3, 2)), y=np.array([0, 1]))
    _bad(tmp_path / "d.npz", "(3, 2)", "(2,)")


def test_npz_wrong_dimensions(tmp_path):
    np.savez(tmp_path / "d.npz", X=np.ones(3), y=np.array([0, 1, 0]))
    _bad(tmp_path / "d.npz", "[n, features]")
    np.savez(tmp_path / "e.npz", X=np.ones((3, 2)), y=np.ones((3, 1)))
    _bad(tmp_path / "e.npz", "[n, features]")


def test_npz_no_samples(tmp_path):
    np.savez(tmp_path / "d.npz", X=np.ones((0, 2)), y=np.zeros(0))
    _bad(tmp_path / "d.npz", "no samples")


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_npz_nonfinite_X(tmp_path, bad):
    X = np.ones((3, 2))
    X[1, 1] = bad
    np.savez(tmp_path / "d.npz", X=X, y=np.array([0, 1, 0]))
    _bad(tmp_path / "d.npz", "NaN or Inf")


def test_csv_without_label_column(tmp_path):
    _bad(_write(tmp_path / "d.csv", "a,b,c\n1,2,3\n"), "no label column", "'label'")


def test_csv_with_other_label_column_name(tmp_path):
    p = _write(tmp_path / "d.csv", "a,b,label\n1,2,3\n")
    _bad(p, "'y'", label_column="y")


def test_csv_non_number_cell(tmp_path):
    _bad(_write(tmp_path / "d.csv", "a,b,label\n1,2,0\n3,four,1\n"), "number", "four")


def test_csv_empty_cell(tmp_path):
    _bad(_write(tmp_path / "d.csv", "a,b,label\n1,,0\n"), "number")


def test_csv_empty_file(tmp_path):
    _bad(_write(tmp_path / "d.csv", ""), "empty")


def test_csv_header_only(tmp_path):
    _bad(_write(tmp_path / "d.csv", "a,b,label\n"))


@pytest.mark.parametrize(
    "text",
    [
        "a,b,label\n1,2,0\n3,0\n",  # a short row
        "a,b,label\n1,2,0\n3,4,5,0\n",  # a long row
        "a,b,label\n1,2\n3,4\n",  # every row short
    ],
    ids=["short", "long", "all-short"],
)
def test_csv_ragged_rows(tmp_path, text):
    _bad(_write(tmp_path / "d.csv", text), "3 columns")


def test_csv_nan_in_X(tmp_path):
    _bad(_write(tmp_path / "d.csv", "a,b,label\n1,nan,0\n2,3,1\n"), "NaN or Inf")


def test_data_error_is_a_value_error():
    assert issubclass(DataError, ValueError)


# ---------------------------------------------------------------------------
# split_holdout


def test_split_holdout_sizes_and_cover(tmp_path):
    X = np.arange(100, dtype=np.float32).reshape(50, 2)
    y = np.arange(50)
    d = split_holdout(X, y, 0.2, seed=3)
    assert isinstance(d, LocalData)
    assert len(d.X_holdout) == len(d.y_holdout) == 10
    assert len(d.X_train) == len(d.y_train) == d.num_samples == 40
    train, hold = set(d.y_train.tolist()), set(d.y_holdout.tolist())
    assert not train & hold
    assert train | hold == set(range(50))
    # rows stay paired with their labels
    np.testing.assert_array_equal(d.X_train[:, 0], 2 * d.y_train)
    np.testing.assert_array_equal(d.X_holdout[:, 0], 2 * d.y_holdout)


def test_split_holdout_is_seeded():
    X = np.arange(60, dtype=np.float32).reshape(30, 2)
    y = np.arange(30)
    a, b, c = split_holdout(X, y, 0.3, 1), split_holdout(X, y, 0.3, 1), split_holdout(X, y, 0.3, 2)
    np.testing.assert_array_equal(a.y_holdout, b.y_holdout)
    np.testing.assert_array_equal(a.y_train, b.y_train)
    assert not np.array_equal(a.y_holdout, c.y_holdout)


def test_split_holdout_zero_fraction_and_single_sample():
    X = np.ones((5, 2), dtype=np.float32)
    y = np.arange(5)
    d = split_holdout(X, y, 0.0, 0)
    assert d.num_samples == 5 and len(d.y_holdout) == 0
    one = split_holdout(X[:1], y[:1], 0.5, 0)
    assert one.num_samples == 1 and len(one.y_holdout) == 0


@settings(max_examples=100, deadline=None)
@given(n=st.integers(1, 300), fraction=st.floats(0.0, 0.99), seed=st.integers(0, 2**32 - 1))
def test_split_holdout_properties(n, fraction, seed):
    X = np.arange(n, dtype=np.float32)[:, None]
    y = np.arange(n)
    d = split_holdout(X, y, fraction, seed)
    assert d.num_samples >= 1  # training always keeps at least one sample
    assert d.num_samples + len(d.y_holdout) == n
    expected = min(round(n * fraction), n - 1) if n > 1 else 0  # nearest count, capped
    assert len(d.y_holdout) == expected
    assert sorted(np.concatenate([d.y_train, d.y_holdout]).tolist()) == list(range(n))


def test_labels_must_be_finite_numbers(tmp_path):
    from edge_agent.data import DataError, load

    np.savez(tmp_path / "s.npz", X=np.zeros((3, 2), np.float32), y=np.array(["a", "b", "c"]))
    with pytest.raises(DataError, match="y must hold numbers"):
        load(tmp_path / "s.npz")
    np.savez(tmp_path / "n.npz", X=np.zeros((3, 2), np.float32), y=np.array([0.5, np.nan, 1.0]))
    with pytest.raises(DataError, match="y contains NaN"):
        load(tmp_path / "n.npz")
