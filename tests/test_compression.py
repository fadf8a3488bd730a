"""Update compression (issue 13 item 5): the codec, error feedback, the wire maps, hostile payloads,
the [compression] config, the agent's order of DP and compression, and the residual across restarts."""

from __future__ import annotations

import math
from fractions import Fraction
from pathlib import Path

import msgpack
import numpy as np
import pytest

from aggregator.config import AggregatorConfig, CompressionConfig, ModelConfig, PrivacyConfig, RoundConfig, \
    SecAggConfig, StrategyConfig
from aggregator.coordinator import Coordinator
from aggregator.strategies import FedAvg
from edge_agent import compression as C
from edge_agent import wire
from edge_agent.agent import AgentCore, AgentRunner, DropFeedback, PutOutbox, Train
from edge_agent.agent_store import RESIDUAL_FILE, AgentStore
from edge_agent.config import BrokerConfig, ConfigError, check
from edge_agent.data import LocalData
from edge_agent.models import BuiltinModel
from edge_agent.mqtt import Loop, Publish
from edge_agent.spec import ModelSpec
from edge_agent.topics import Topics

from .conftest import deliver_task

FED = "cmp"
T = Topics(FED)
SPEC = ModelSpec("softmax", 8, 3)


def rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def dense(seed: int = 0) -> dict[str, np.ndarray]:
    r = rng(seed)
    return {"W0": r.normal(0, 0.1, (8, 3)).astype(np.float32), "b0": r.normal(0, 0.1, 3).astype(np.float32)}


# --------------------------------------------------------------------------
# q8


@pytest.mark.parametrize("x", [
    np.random.default_rng(1).normal(0, 1, (40, 7)).astype(np.float32),
    np.random.default_rng(2).uniform(-1e-6, 1e-6, 100).astype(np.float32),
    np.array([3.5], np.float32),
    np.full((4, 4), -2.25, np.float32),
    np.array([-1e30, 0.0, 1e30], np.float32),
    np.array(0.75, np.float32),
    np.zeros((0, 3), np.float32),
])
def test_q8_round_trip_is_within_one_quantization_step(x):
    q = C.quantize_q8(x, rng())
    back = C.decompress(q)
    assert back.shape == x.shape and back.dtype == np.float32
    assert q.codes.dtype == np.uint8 and q.codes.size == x.size
    assert np.float32(q.offset) == q.offset and np.float32(q.scale) == q.scale  # float32 values
    if x.size:
        # one step of the grid, and a few float32 ulps of the values for the decode's own rounding
        tol = q.scale + 4 * np.spacing(np.float32(np.abs(x).max()))
        assert np.abs(back.astype(np.float64) - x).max() <= tol
        assert q.offset <= x.min() and q.offset + 255 * q.scale >= x.max()


def test_q8_is_unbiased_within_a_bound_from_its_variance():
    x = np.random.default_rng(3).normal(0, 1, 50).astype(np.float32)
    n = 20_000
    # One call on n stacked copies: the same min/max (so the same offset and
    # scale) and n independent stochastic roundings of every element.
    q = C.quantize_q8(np.tile(x, (n, 1)), rng(4))
    draws = C.decompress(q).astype(np.float64)
    mean = draws.mean(axis=0)
    # Stochastic rounding between the two grid points around v = (x - offset)/scale:
    # Var = scale^2 p (1 - p) with p the fractional part of v.
    v = (x.astype(np.float64) - q.offset) / q.scale
    p = v - np.floor(v)
    std_of_mean = q.scale * np.sqrt(p * (1 - p) / n)
    float_slack = 1e-6 * q.scale  # float32 decode rounding, far below the statistical bound
    assert np.all(np.abs(mean - x) <= 5 * std_of_mean + float_slack), np.abs(mean - x) / (std_of_mean + 1e-30)
    # The bound has power: rounding to the nearest grid point would be off by
    # up to scale/2, far outside it for elements whose p is near 1/2.
    assert (5 * std_of_mean + float_slack).max() < 0.05 * q.scale
    # And the whole tensor at once: a standardized sum, ~N(0, 1) when unbiased.
    z = (mean - x).sum() / math.sqrt((std_of_mean ** 2).sum())
    assert abs(z) < 5
    # The empirical variance agrees with the formula (the test above relies on it).
    np.testing.assert_allclose(draws.var(axis=0), q.scale ** 2 * p * (1 - p), rtol=0.1, atol=1e-3 * q.scale ** 2)


def test_q8_different_generators_round_differently():
    x = np.random.default_rng(5).normal(0, 1, 1000).astype(np.float32)
    assert not np.array_equal(C.quantize_q8(x, rng(1)).codes, C.quantize_q8(x, rng(2)).codes)


# --------------------------------------------------------------------------
# top-k


def _k(size: int, fraction: float) -> int:
    # exact rational arithmetic, independent of the codec's float formula
    return min(size, math.ceil(Fraction(str(fraction)) * size))


@pytest.mark.parametrize("shape, fraction", [((64, 10), 0.1), ((100,), 0.07), ((3, 5, 7), 0.33), ((10,), 1.0),
                                             ((1,), 0.01), ((1000,), 0.001), ((0,), 0.5)])
def test_topk_keeps_exactly_the_k_largest_magnitudes(shape, fraction):
    x = np.random.default_rng(6).normal(0, 1, shape).astype(np.float32)
    t = C.sparsify_topk(x, fraction)
    k = _k(x.size, fraction)
    assert t.indices.dtype == np.uint32 and t.values.dtype == np.float32
    assert t.indices.size == t.values.size == k == C.topk_count(x.size, fraction)
    assert np.all(np.diff(t.indices.astype(np.int64)) > 0)
    flat = x.reshape(-1)
    np.testing.assert_array_equal(t.values, flat[t.indices])
    if k:
        # the same set as numpy's own partition (continuous values: no ties) ...
        expect = np.argpartition(np.abs(flat), flat.size - k)[flat.size - k:]
        assert set(t.indices.tolist()) == set(expect.tolist())
        # ... and the same magnitudes as a full sort
        np.testing.assert_array_equal(np.sort(np.abs(t.values)), np.sort(np.abs(flat))[flat.size - k:])
    back = C.decompress(t)
    assert back.shape == x.shape
    mask = np.zeros(flat.size, bool)
    mask[t.indices] = True
    assert np.all(back.reshape(-1)[~mask] == 0)


def test_topk_count_is_the_ceiling_of_fraction_times_size():
    assert C.topk_count(100, 0.07) == 7  # 0.07 * 100 is 7.000000000000001 in floating point
    assert C.topk_count(10, 0.11) == 2
    assert C.topk_count(5, 1.0) == 5
    with pytest.raises(ValueError):
        C.topk_count(5, 0.0)


# --------------------------------------------------------------------------
# error feedback


@pytest.mark.parametrize("mode, fraction", [("q8", 1.0), ("topk", 0.1), ("topk", 0.01)])
def test_error_feedback_sent_plus_final_residual_is_the_sum_of_deltas(mode, fraction):
    r = rng(7)
    residual = None
    total_delta = {k: np.zeros(v.shape) for k, v in dense().items()}
    total_sent = {k: np.zeros(v.shape) for k, v in dense().items()}
    for rnd in range(30):
        delta = dense(100 + rnd)
        sent, residual = C.compress_update(delta, residual, mode, r, fraction)
        for k in delta:
            total_delta[k] += delta[k]
            total_sent[k] += C.decompress(sent[k])
    for k in total_delta:
        np.testing.assert_allclose(total_sent[k] + residual[k], total_delta[k], atol=1e-5)
    # Without the residual the sums would not match: top-k drops most of every round.
    if mode == "topk":
        assert max(float(np.abs(total_sent[k] - total_delta[k]).max()) for k in total_delta) > 1e-2


def test_error_feedback_restarts_from_the_previous_residual_after_an_abandoned_attempt():
    fb = C.ErrorFeedback()
    fb.compress(dense(1), 1, 0, "topk", rng(), 0.2)
    r1 = {k: v.copy() for k, v in fb.residual.items()}
    fb.compress(dense(2), 2, 0, "topk", rng(), 0.2)  # round 2, attempt 0 ...
    assert fb.previous is not None and all(np.array_equal(fb.previous[k], r1[k]) for k in r1)
    # ... abandoned: attempt 1 of round 2 starts again from round 1's residual, not from attempt 0's
    assert fb.base(2, 1) is fb.previous
    fb.compress(dense(3), 2, 1, "topk", rng(), 0.2)
    assert all(np.array_equal(fb.previous[k], r1[k]) for k in r1)
    assert fb.base(3, 0) is fb.residual


def test_error_feedback_drops_a_residual_of_another_model():
    fb = C.ErrorFeedback(residual={"W0": np.ones((2, 2), np.float32)}, round=1, attempt=0)
    sent = fb.compress(dense(), 2, 0, "q8", rng())
    assert fb.dropped == 1 and fb.previous is None and list(sent) == ["W0", "b0"]


# --------------------------------------------------------------------------
# wire: task config


def _task(**cfg) -> wire.TaskMsg:
    return wire.TaskMsg(FED, 1, "v1", "open", 0, 10.0, wire.TrainConfig(2, 8, 0.1, **cfg))


def test_task_config_carries_the_mode_and_none_sends_no_new_keys():
    for cfg in ({"compression": "q8"}, {"compression": "topk", "topk_fraction": 0.25}):
        back = wire.decode(wire.encode(_task(**cfg)), expect="task")
        assert back.config.compression == cfg["compression"]
        assert back.config.topk_fraction == cfg.get("topk_fraction", 0.0)
    raw = msgpack.unpackb(wire.encode(_task()))
    assert "compression" not in raw["config"] and "topk_fraction" not in raw["config"]
    assert wire.decode(wire.encode(_task()), expect="task").config.compression == "none"


@pytest.mark.parametrize("cfg, reason", [
    ({"compression": "zip"}, "bad_field"),
    ({"compression": 8}, "bad_field"),
    ({"compression": "topk"}, "missing_field"),
    ({"compression": "topk", "topk_fraction": 0.0}, "bad_field"),
    ({"compression": "topk", "topk_fraction": 1.5}, "bad_field"),
    ({"compression": "topk", "topk_fraction": -0.1}, "bad_field"),
    ({"compression": "topk", "topk_fraction": float("nan")}, "bad_field"),
    ({"compression": "topk", "topk_fraction": True}, "bad_field"),
])
def test_task_config_bad_compression_is_refused(cfg, reason):
    raw = msgpack.unpackb(wire.encode(_task()))
    raw["config"].update(cfg)
    with pytest.raises(wire.WireError) as e:
        wire.decode(msgpack.packb(raw), expect="task")
    assert e.value.reason == reason


# --------------------------------------------------------------------------
# wire: compressed update tensors


def _update_payload(delta) -> bytes:
    return wire.encode(wire.UpdateMsg(FED, 1, "a1", "v1", 10, delta, {"train_loss": 0.5}))


@pytest.mark.parametrize("mode, fraction", [("q8", 1.0), ("topk", 0.1)])
def test_compressed_update_decodes_to_the_dense_float32_tensors_and_is_smaller(mode, fraction):
    spec = ModelSpec("softmax", 64, 10)
    delta = {"W0": rng(8).normal(0, 0.1, (64, 10)).astype(np.float32), "b0": rng(9).normal(0, 0.1, 10).astype(np.float32)}
    sent, _ = C.compress_update(delta, None, mode, rng(), fraction)
    payload = _update_payload(sent)
    msg = wire.decode(payload, expect="update", spec=spec)
    for k in delta:
        assert msg.delta[k].dtype == np.float32 and msg.delta[k].shape == delta[k].shape
        np.testing.assert_array_equal(msg.delta[k], C.decompress(sent[k]))
        assert not msg.delta[k].flags.writeable
    plain = len(_update_payload(delta))
    assert len(payload) < (0.35 if mode == "q8" else 0.3) * plain, (len(payload), plain)


def test_an_update_may_mix_plain_and_compressed_tensors():
    d = dense()
    sent = {"W0": C.sparsify_topk(d["W0"], 0.5), "b0": d["b0"]}
    msg = wire.decode(_update_payload(sent), expect="update", spec=SPEC)
    np.testing.assert_array_equal(msg.delta["b0"], d["b0"])


def test_large_compressed_tensors_encode_byte_for_byte_like_msgpack():
    # the payload joins big bin values straight from the arrays: it must equal msgpack's own packing
    x = rng(10).normal(0, 1, (300, 100)).astype(np.float32)
    for c in (C.quantize_q8(x, rng()), C.sparsify_topk(x, 0.5)):
        msg = wire.UpdateMsg(FED, 1, "a1", "v1", 10, {"W0": c}, {})
        head = {"v": wire.WIRE_VERSION, "kind": "update", "fed": FED, "round": 1, "agent": "a1", "base": "v1",
                "num_samples": 10, "delta": {"W0": {k: bytes(v) if isinstance(v, memoryview) else v
                                                    for k, v in wire.encode_params({"W0": c})["W0"].items()}},
                "metrics": {}}
        assert wire.encode(msg) == msgpack.packb(head, use_bin_type=True)


def _raw_update(tensor_w0: dict, b0=None) -> bytes:
    d = dense()
    m = {"v": wire.WIRE_VERSION, "kind": "update", "fed": FED, "round": 1, "agent": "a1", "base": "v1",
         "num_samples": 10, "metrics": {},
         "delta": {"W0": tensor_w0, "b0": b0 if b0 is not None else
                   {"dtype": "<f4", "shape": [3], "data": d["b0"].tobytes()}}}
    return msgpack.packb(m, use_bin_type=True)


def _q8_map(**over) -> dict:
    m = {"codec": "q8", "shape": [8, 3], "offset": -1.0, "scale": 0.01, "data": bytes(range(24))}
    m.update(over)
    return {k: v for k, v in m.items() if v is not None}


def _topk_map(idx=(0, 5, 23), vals=(1.0, -2.0, 0.5), **over) -> dict:
    m = {"codec": "topk", "shape": [8, 3], "indices": np.array(idx, "<u4").tobytes(),
         "values": np.array(vals, "<f4").tobytes()}
    m.update(over)
    return {k: v for k, v in m.items() if v is not None}


def test_hand_built_compressed_maps_decode_as_documented():
    msg = wire.decode(_raw_update(_q8_map()), expect="update", spec=SPEC)
    np.testing.assert_allclose(msg.delta["W0"].reshape(-1), -1.0 + 0.01 * np.arange(24), rtol=1e-6)
    msg = wire.decode(_raw_update(_topk_map()), expect="update", spec=SPEC)
    expect = np.zeros(24, np.float32)
    expect[[0, 5, 23]] = [1.0, -2.0, 0.5]
    np.testing.assert_array_equal(msg.delta["W0"].reshape(-1), expect)
    msg = wire.decode(_raw_update(_topk_map(idx=(), vals=())), expect="update", spec=SPEC)  # k = 0: all zeros
    assert not msg.delta["W0"].any()


HOSTILE = [
    # top-k
    (_topk_map(idx=(0, 5, 24)), "bad_indices"),  # index out of range
    (_topk_map(idx=(0, 5, 2**32 - 1)), "bad_indices"),
    (_topk_map(idx=(5, 0, 23)), "bad_indices"),  # not increasing
    (_topk_map(idx=(0, 5, 5)), "bad_indices"),  # a repeated index
    (_topk_map(idx=range(25), vals=[1.0] * 25), "bad_indices"),  # k larger than the tensor
    (_topk_map(idx=(0, 5), vals=(1.0, 2.0, 3.0)), "shape_mismatch"),  # lengths differ
    (_topk_map(indices=b"\x00\x00\x00"), "shape_mismatch"),  # not whole uint32s
    (_topk_map(values=b"\x00" * 11), "shape_mismatch"),
    (_topk_map(vals=(1.0, float("nan"), 0.5)), "non_finite"),
    (_topk_map(vals=(1.0, float("inf"), 0.5)), "non_finite"),
    (_topk_map(indices=[0, 5, 23]), "bad_array"),  # not binary
    (_topk_map(shape=[8, 4]), "spec_mismatch"),
    (_topk_map(shape=[2**31, 2**31]), "spec_mismatch"),  # would be a huge allocation
    (_topk_map(shape=[8, -3]), "bad_array"),
    (_topk_map(shape="8x3"), "bad_array"),
    (_topk_map(extra=1), "bad_codec"),
    (_topk_map(values=None), "bad_codec"),  # a key missing
    # q8
    (_q8_map(data=bytes(23)), "shape_mismatch"),
    (_q8_map(data=bytes(25)), "shape_mismatch"),
    (_q8_map(scale=float("nan")), "non_finite"),
    (_q8_map(scale=float("inf")), "non_finite"),
    (_q8_map(offset=float("-inf")), "non_finite"),
    (_q8_map(offset=1e39), "non_finite"),  # finite in float64, not in float32
    (_q8_map(offset=3e38, scale=1e37), "non_finite"),  # each finite, the decoded values overflow
    (_q8_map(scale=-0.01), "bad_field"),
    (_q8_map(scale="0.01"), "bad_field"),
    (_q8_map(offset=True), "bad_field"),
    (_q8_map(data=list(range(24))), "bad_array"),
    (_q8_map(shape=[3, 8]), "spec_mismatch"),
    (_q8_map(scale=None), "bad_codec"),
    # either
    (_q8_map(codec="q4"), "bad_codec"),
    (_q8_map(codec=b"q8"), "bad_codec"),
]


@pytest.mark.parametrize("tensor, reason", HOSTILE, ids=[f"{i}-{r}" for i, (_, r) in enumerate(HOSTILE)])
def test_hostile_compressed_tensors_are_refused_with_a_reason(tensor, reason):
    with pytest.raises(wire.WireError) as e:
        wire.decode(_raw_update(tensor), expect="update", spec=SPEC)
    assert e.value.reason == reason, e.value


def test_without_a_spec_a_compressed_map_cannot_expand_beyond_the_limit():
    huge = _topk_map(idx=(), vals=(), shape=[wire.MAX_DECOMPRESSED_ELEMENTS + 1])
    with pytest.raises(wire.WireError) as e:
        wire.decode(_raw_update(huge), expect="update")
    assert e.value.reason == "bad_array"
    # the limit holds for the map as a whole, not per tensor
    half = _topk_map(idx=(), vals=(), shape=[wire.MAX_DECOMPRESSED_ELEMENTS // 2 + 1])
    with pytest.raises(wire.WireError) as e:
        wire.decode(_raw_update(half, b0=half), expect="update")
    assert e.value.reason == "bad_array"


def test_a_model_message_may_not_carry_compressed_tensors():
    params = BuiltinModel(SPEC).init_params(0)
    raw = msgpack.unpackb(wire.encode(wire.ModelMsg(FED, 0, wire.params_version(params), SPEC, params)))
    raw["params"]["W0"] = _q8_map()
    with pytest.raises(wire.WireError) as e:
        wire.decode(msgpack.packb(raw, use_bin_type=True), expect="model")
    assert e.value.reason == "bad_array"


# --------------------------------------------------------------------------
# the coordinator: a hostile compressed update is a counted rejection and changes nothing


def _coordinator(**kw) -> Coordinator:
    cfg = AggregatorConfig(federation=FED, rounds=2, model=ModelConfig(kind="softmax", n_features=8, n_outputs=3),
                           round=RoundConfig(min_agents=2, quorum=1, timeout=10.0), **kw)
    c = Coordinator(cfg, FedAvg())
    c.start(0.0)
    for a in ("a0", "a1"):
        c.receive(T.status(a), wire.encode(wire.StatusMsg(FED, 0, a, "online", 10, ["softmax"], "t")), now=0.0)
    assert c.open is not None
    return c


def _coord_update(c: Coordinator, agent: str, tensor_w0) -> tuple[str, bytes]:
    d = dense()
    raw = msgpack.unpackb(wire.encode(wire.UpdateMsg(FED, c.open.round, agent, c.version, 10, d, {})))
    raw["delta"]["W0"] = tensor_w0
    return T.update(agent), msgpack.packb(raw, use_bin_type=True)


def test_coordinator_counts_a_hostile_compressed_update_and_keeps_its_state():
    c, twin = _coordinator(), _coordinator()
    before = (c.accepted, set(c.open.received), c.round, c.version)
    assert c.receive(*_coord_update(c, "a0", _topk_map(idx=(0, 5, 99))), now=1.0) == []
    assert c.rejected["bad_indices"] == 1
    assert (c.accepted, set(c.open.received), c.round, c.version) == before
    # the same agent's honest compressed update is still taken (not a duplicate) ...
    good = {k: bytes(v) if isinstance(v, memoryview) else v
            for k, v in wire.encode_params({"W0": C.sparsify_topk(dense()["W0"], 0.5)})["W0"].items()}
    for coord in (c, twin):
        coord.receive(*_coord_update(coord, "a0", good), now=1.0)
        assert coord.accepted == 1 and "a0" in coord.open.received
        coord.receive(*_coord_update(coord, "a1", _q8_map()), now=1.0)
        assert coord.round == 1
    # ... and the round ends exactly as if the hostile message had never come
    assert twin.rejected == {} and c.version == twin.version
    for k in c.params:
        np.testing.assert_array_equal(c.params[k], twin.params[k])


def test_the_coordinator_task_asks_for_the_configured_compression():
    for mode, frac in (("q8", 0.1), ("topk", 0.25)):
        c = Coordinator(AggregatorConfig(federation=FED, rounds=1,
                                         model=ModelConfig(kind="softmax", n_features=8, n_outputs=3),
                                         round=RoundConfig(min_agents=1, quorum=1, timeout=10.0),
                                         compression=CompressionConfig(mode=mode, topk_fraction=frac)), FedAvg())
        c.start(0.0)
        actions = c.receive(T.status("a0"), wire.encode(wire.StatusMsg(FED, 0, "a0", "online", 10, ["softmax"], "t")),
                            now=0.0)
        (pub,) = [a for a in actions if isinstance(a, Publish) and a.topic == T.task]
        cfg = wire.decode(pub.payload, expect="task").config
        assert (cfg.compression, cfg.topk_fraction) == (mode, frac if mode == "topk" else 0.0)


# --------------------------------------------------------------------------
# [compression] config


def _check(cfg: AggregatorConfig) -> str:
    with pytest.raises(ConfigError) as e:
        check(cfg)
    return str(e.value)


@pytest.mark.parametrize("section, key", [
    (CompressionConfig(mode="zip"), "compression.mode:"),
    (CompressionConfig(mode="topk", topk_fraction=0.0), "compression.topk_fraction:"),
    (CompressionConfig(mode="topk", topk_fraction=1.5), "compression.topk_fraction:"),
    (CompressionConfig(mode="topk", topk_fraction=float("nan")), "compression.topk_fraction:"),
])
def test_bad_compression_values_name_the_key(section, key):
    assert key in _check(AggregatorConfig(compression=section))


def test_compression_loads_from_toml_and_is_refused_with_secure_aggregation(tmp_path):
    from edge_agent.config import load

    p = tmp_path / "a.toml"
    p.write_text('[compression]\nmode = "topk"\ntopk_fraction = 0.05\n')
    cfg = load(AggregatorConfig, p)
    assert (cfg.compression.mode, cfg.compression.topk_fraction) == ("topk", 0.05)
    p.write_text('[compression]\nmode = "q8"\n[secagg]\nmode = "secagg"\n[round]\nmin_agents = 3\n')
    with pytest.raises(ConfigError) as e:
        load(AggregatorConfig, p)
    assert "compression.mode:" in str(e.value) and "secure aggregation" in str(e.value)
    p.write_text('[compression]\nmode = "bogus"\n')
    with pytest.raises(ConfigError) as e:
        load(AggregatorConfig, p)
    assert "compression.mode:" in str(e.value) and "bogus" in str(e.value)


def test_compression_combines_with_robust_rules_and_dp():
    for strategy in ("median", "trimmed_mean", "krum"):
        check(AggregatorConfig(compression=CompressionConfig(mode="topk"), strategy=StrategyConfig(name=strategy)))
    check(AggregatorConfig(compression=CompressionConfig(mode="q8"), round=RoundConfig(agents_per_round=5),
                           privacy=PrivacyConfig(mode="central")))
    check(AggregatorConfig(compression=CompressionConfig(mode="none"), secagg=SecAggConfig(mode="secagg"),
                           round=RoundConfig(min_agents=3)))


# --------------------------------------------------------------------------
# the agent


def _data(n: int = 60, seed: int = 0) -> LocalData:
    r = rng(seed)
    X = r.random((n, 8), dtype=np.float32)
    y = np.arange(n) % 3
    return LocalData(X, y, X[:0], y[:0])


def _model(round_: int = 0, run: int = 0) -> wire.ModelMsg:
    params = BuiltinModel(SPEC).init_params(0)
    params["b0"] += np.float32(0.01 * round_)  # a new version every round
    return wire.ModelMsg(FED, round_, wire.params_version(params), SPEC, params, run=run)


def _open(c: AgentCore, m: wire.ModelMsg, attempt: int = 0, **cfg) -> list:
    """Deliver model m and the open task of round m.round + 1 selecting ``c``; train; return the train actions."""
    c.receive(T.model, wire.encode(m))
    task = wire.TaskMsg(FED, m.round + 1, m.version, "open", attempt, 100.0,
                        wire.TrainConfig(2, 8, 0.1, **cfg), run=m.run)
    trains = [a for a in deliver_task(c, task) if isinstance(a, Train)]
    assert len(trains) == 1, "the agent should train"
    return c.train(trains[0].round, trains[0].attempt)


def _sent(actions) -> tuple[bytes, wire.UpdateMsg]:
    (pub,) = [a for a in actions if isinstance(a, Publish) and T.parse(a.topic)[0] == "update"]
    return pub.payload, wire.decode(pub.payload, expect="update", fed=FED, spec=SPEC)


def _core(seed: int = 3) -> AgentCore:
    return AgentCore(agent_id="me", fed=FED, data=_data(), seed=seed)


@pytest.mark.parametrize("cfg", [{"compression": "q8"}, {"compression": "topk", "topk_fraction": 0.2}])
def test_agent_sends_a_compressed_update_and_keeps_the_residual_with_the_outbox_entry(cfg):
    c = _core()
    actions = _open(c, _model(), **cfg)
    payload, msg = _sent(actions)
    raw = msgpack.unpackb(payload)
    assert all(t["codec"] == cfg["compression"] for t in raw["delta"].values())
    (put,) = [a for a in actions if isinstance(a, PutOutbox)]
    assert put.payload == payload and put.feedback is c.feedback and (c.feedback.round, c.feedback.attempt) == (1, 0)
    plain = _core()
    _, plain_msg = _sent(_open(plain, _model()))
    # what was sent plus what was kept is exactly the uncompressed update
    for k in msg.delta:
        np.testing.assert_allclose(msg.delta[k] + c.feedback.residual[k], plain_msg.delta[k], atol=1e-6)


def test_agent_without_compression_sends_plain_arrays_and_no_residual():
    c = _core()
    actions = _open(c, _model())
    payload, _ = _sent(actions)
    assert all(set(t) == {"dtype", "shape", "data"} for t in msgpack.unpackb(payload)["delta"].values())
    (put,) = [a for a in actions if isinstance(a, PutOutbox)]
    assert put.feedback is None and c.feedback.residual is None


def test_agent_compresses_after_clipping():
    clip = 0.05
    c = _core()
    actions = _open(c, _model(), compression="topk", topk_fraction=0.1, clip_norm=clip)
    _, msg = _sent(actions)
    assert "dp_unclipped" in msg.metrics
    x = {k: msg.delta[k] + c.feedback.residual[k] for k in msg.delta}  # what went into the compressor
    norm = math.sqrt(sum(float((v.astype(np.float64) ** 2).sum()) for v in x.values()))
    assert norm <= clip * (1 + 1e-5)
    # the unclipped update is much longer: clipping did happen first
    plain = _core()
    _, pm = _sent(_open(plain, _model()))
    assert math.sqrt(sum(float((v.astype(np.float64) ** 2).sum()) for v in pm.delta.values())) > 2 * clip


def test_agent_does_not_compress_a_secure_aggregation_round():
    c = _core()
    m = _model()
    c.receive(T.model, wire.encode(m))
    sa = wire.SecAggParams(mode="secagg", threshold=2, qbits=16, bits=20, range=1.0)
    task = wire.TaskMsg(FED, 1, m.version, "open", 0, 100.0, wire.TrainConfig(2, 8, 0.1, compression="q8"),
                        secagg=sa)
    trains = [a for a in deliver_task(c, task, selection=["me", "p1", "p2"]) if isinstance(a, Train)]
    actions = c.train(trains[0].round, trains[0].attempt)
    assert actions and not [a for a in actions if isinstance(a, PutOutbox)]
    assert c.feedback.residual is None


def _runner(core: AgentCore, store_dir: Path) -> AgentRunner:
    # constructed, never started: no connection is opened, but the store is loaded as at a real start
    return AgentRunner(Loop(), core, BrokerConfig(), store=AgentStore(store_dir))


def _persist(runner: AgentRunner, actions) -> None:
    runner._execute([a for a in actions if not isinstance(a, (Publish, Train))])


def test_the_residual_survives_an_agent_restart(tmp_path):
    cfg = {"compression": "topk", "topk_fraction": 0.1}
    # one life: rounds 1 and 2
    steady = _core()
    _open(steady, _model(0), **cfg)
    want, _ = _sent(_open(steady, _model(1), **cfg))
    # round 1, then a restart from the state directory, then round 2
    first = _core()
    r1 = _runner(first, tmp_path)
    _persist(r1, _open(first, _model(0), **cfg))
    assert (tmp_path / "outbox" / RESIDUAL_FILE).is_file()
    second = _core()
    _runner(second, tmp_path)
    assert (second.feedback.round, second.feedback.attempt) == (1, 0)
    for k in first.feedback.residual:
        np.testing.assert_array_equal(second.feedback.residual[k], first.feedback.residual[k])
    got, _ = _sent(_open(second, _model(1), **cfg))
    assert got == want
    # without the residual round 2 would have been a different update
    fresh = _core()
    other, _ = _sent(_open(fresh, _model(1), **cfg))
    assert other != want


def test_an_unreadable_residual_file_starts_from_zero(tmp_path):
    store = AgentStore(tmp_path)
    (tmp_path / "outbox" / RESIDUAL_FILE).write_bytes(b"\x93garbage")
    assert store.load_feedback().residual is None
    assert store.load_outbox() == {}  # and it is never taken for an outbox entry


def test_a_new_federation_run_forgets_the_residual(tmp_path):
    cfg = {"compression": "q8"}
    c = _core()
    runner = _runner(c, tmp_path)
    _persist(runner, _open(c, _model(0, run=5), **cfg))
    assert c.feedback.residual is not None and (tmp_path / "outbox" / RESIDUAL_FILE).is_file()
    actions = c.receive(T.model, wire.encode(_model(0, run=6)))  # the federation was reset
    assert any(isinstance(a, DropFeedback) for a in actions)
    _persist(runner, actions)
    assert c.feedback.residual is None and not (tmp_path / "outbox" / RESIDUAL_FILE).exists()
    restarted = _core()
    _runner(restarted, tmp_path)
    assert restarted.feedback.residual is None


def test_a_re_run_attempt_starts_from_the_residual_before_the_abandoned_one():
    cfg = {"compression": "topk", "topk_fraction": 0.1}
    c = _core()
    _open(c, _model(0), **cfg)  # round 1, attempt 0
    m1 = _model(1)
    _open(c, m1, attempt=0, **cfg)  # round 2, attempt 0 ... abandoned
    got, _ = _sent(_open(c, m1, attempt=1, **cfg))  # round 2, attempt 1
    # an agent that only ever trained round 1 and then round 2's attempt 1 sends the same
    ref = _core()
    _open(ref, _model(0), **cfg)
    want, _ = _sent(_open(ref, m1, attempt=1, **cfg))
    assert got == want
