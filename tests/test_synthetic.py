"""FedProx Synthetic(alpha, beta) generator (pure numpy, no MQTT)."""

from __future__ import annotations

import numpy as np
import pytest

from aggregator.synthetic import MAX_DEVICE_SAMPLES, synthetic


def _device_mean_spread(devices) -> float:
    """Spread across devices of each device's mean feature value."""
    return float(np.std([X.mean() for X, _ in devices]))


def _label_skew(devices, n_classes: int = 10) -> float:
    """Mean total-variation distance of the devices' label distributions from the pooled one."""
    pooled = np.concatenate([y for _, y in devices])
    g = np.bincount(pooled, minlength=n_classes) / len(pooled)
    return float(np.mean([0.5 * np.abs(np.bincount(y, minlength=n_classes) / len(y) - g).sum() for _, y in devices]))


@pytest.fixture(scope="module")
def default_devices():
    return synthetic(0.5, 0.5, seed=0)


def test_defaults_shape_and_types(default_devices):
    assert len(default_devices) == 30
    for X, y in default_devices:
        assert X.dtype == np.float32 and y.dtype == np.int64
        assert X.ndim == 2 and X.shape[1] == 60
        assert y.shape == (X.shape[0],)
        assert 50 <= len(y) <= MAX_DEVICE_SAMPLES
        assert y.min() >= 0 and y.max() <= 9
        assert np.all(np.isfinite(X))


def test_sizes_follow_a_heavy_tailed_law(default_devices):
    sizes = np.array([len(y) for _, y in default_devices])
    # lognormal(4, 2) + 50: very unequal devices, not a constant
    assert len(set(sizes.tolist())) > 20
    assert sizes.max() > 5 * np.median(sizes)


def test_all_classes_occur_somewhere(default_devices):
    pooled = np.concatenate([y for _, y in default_devices])
    assert set(np.unique(pooled).tolist()) == set(range(10))


def test_options():
    devices = synthetic(1, 1, n_devices=5, dim=7, n_classes=3, seed=1)
    assert len(devices) == 5
    for X, y in devices:
        assert X.shape[1] == 7 and y.max() <= 2


def test_seeded():
    a = synthetic(1, 1, seed=3)
    b = synthetic(1, 1, seed=3)
    c = synthetic(1, 1, seed=4)
    for (Xa, ya), (Xb, yb) in zip(a, b):
        assert Xa.tobytes() == Xb.tobytes() and np.array_equal(ya, yb)
    assert any(len(ya) != len(yc) or not np.array_equal(Xa, Xc) for (Xa, ya), (Xc, yc) in zip(a, c))


def test_iid_variant():
    devices = synthetic(0, 0, seed=0, iid=True)
    assert len(devices) == 30
    for X, y in devices:
        assert X.shape[1] == 60 and 50 <= len(y) <= MAX_DEVICE_SAMPLES
        assert y.min() >= 0 and y.max() <= 9
    # v = 0 everywhere: every device's features are centred on zero
    assert all(abs(X.mean()) < 0.1 for X, _ in devices)
    # one shared labelling function and input law: devices' labels look alike
    assert _label_skew(devices) < 0.25


def test_iid_is_much_more_homogeneous_than_non_iid():
    for seed in range(3):
        iid = synthetic(1, 1, seed=seed, iid=True)
        non_iid = synthetic(1, 1, seed=seed)
        assert _device_mean_spread(non_iid) > 10 * _device_mean_spread(iid)
        assert _label_skew(non_iid) > 2 * _label_skew(iid)


def test_beta_controls_feature_heterogeneity():
    # B_k ~ N(0, beta) shifts every feature mean of device k: beta = 1 spreads the
    # devices' mean features about 1 apart; beta = 0 leaves only v_k ~ N(0, 1) per
    # feature, averaging to about 1/sqrt(60). Fails if beta is ignored.
    for seed in range(3):
        hetero = _device_mean_spread(synthetic(1, 1, seed=seed))
        homo = _device_mean_spread(synthetic(0, 0, seed=seed))
        assert hetero > 3 * homo
        assert 0.5 < hetero < 2.0


def test_feature_variance_decays_with_index():
    # x ~ N(v, diag(j^-1.2)): within one device, feature 1 varies far more than feature 60
    X, _ = max(synthetic(0, 0, seed=0), key=lambda d: len(d[1]))
    var = X.var(axis=0)
    assert var[0] == pytest.approx(1.0, rel=0.2)
    assert var[-1] == pytest.approx(60 ** -1.2, rel=0.3)


def test_sizes_are_capped(monkeypatch):
    import aggregator.synthetic as syn

    monkeypatch.setattr(syn, "MAX_DEVICE_SAMPLES", 60)
    devices = syn.synthetic(0.5, 0.5, n_devices=10, seed=0)
    assert all(50 <= len(y) <= 60 for _, y in devices)
