"""The codec: round trips, and every hostile payload rejected with its specific reason."""

from __future__ import annotations

import math

import msgpack
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from edge_agent import wire
from edge_agent.spec import ModelSpec

SPEC = ModelSpec("softmax", 4, 3)


def _params(spec: ModelSpec = SPEC, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {k: rng.standard_normal(s).astype(np.float32) for k, s in spec.param_shapes().items()}


def _update(**kw) -> wire.UpdateMsg:
    base = dict(fed="f1", round=3, agent="a-1", base="abcd", num_samples=17, delta=_params(), metrics={"train_loss": 0.5})
    base.update(kw)
    return wire.UpdateMsg(**base)


def _raw_update(**overrides) -> dict:
    """The decoded map of a valid update, to be broken field by field."""
    m = msgpack.unpackb(wire.encode(_update()), raw=False)
    m.update(overrides)
    return m


def _pack(m: object) -> bytes:
    return msgpack.packb(m, use_bin_type=True)


def _reason(payload: bytes, **kw) -> str:
    with pytest.raises(wire.WireError) as e:
        wire.decode(payload, **kw)
    return e.value.reason


# -- round trips -------------------------------------------------------------

@pytest.mark.parametrize("dtype", sorted(wire.ALLOWED_DTYPES))
@pytest.mark.parametrize("shape", [(), (0,), (1,), (5,), (3, 4), (2, 0, 3), (2, 3, 4, 1, 2)])
def test_array_round_trip_every_allowed_dtype_and_shape(dtype, shape):
    dt = np.dtype(dtype)
    n = math.prod(shape)
    arr = (np.arange(n) % 100).astype(dt).reshape(shape)
    back = wire.decode_array(msgpack.unpackb(_pack(wire.encode_array(arr)), raw=False))
    assert back.dtype == dt and back.shape == shape
    np.testing.assert_array_equal(back, arr)


@settings(max_examples=60, deadline=None)
@given(
    hnp.arrays(
        dtype=st.sampled_from([np.float16, np.float32, np.float64]),
        shape=hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=6),
        elements={"allow_nan": False, "allow_infinity": False},
    )
)
def test_float_arrays_round_trip_bit_exact(arr):
    back = wire.decode_array(msgpack.unpackb(_pack(wire.encode_array(arr)), raw=False))
    assert back.tobytes() == np.ascontiguousarray(arr).tobytes() and back.shape == arr.shape


def test_big_endian_and_non_contiguous_input_is_sent_little_endian_c_order():
    a = np.arange(12, dtype=">f4").reshape(3, 4).T  # big-endian, Fortran-ordered view
    m = wire.encode_array(a)
    assert m["dtype"] == "<f4" and m["shape"] == [4, 3]
    np.testing.assert_array_equal(wire.decode_array(msgpack.unpackb(_pack(m), raw=False)), a)


def test_every_message_kind_round_trips():
    msgs = [
        wire.ModelMsg("f1", 2, wire.params_version(_params()), SPEC, _params()),
        wire.TaskMsg("f1", 3, "abcd", "open", 2, 1700000000.5, ["a-1", "b_2"], wire.TrainConfig(3, 16, 0.05)),
        _update(),
        wire.StatusMsg("f1", 2, "a-1", "online", 120, ["softmax", "mlp"], "0.1.0", False),
        wire.MetricsMsg("f1", 2, "abcd", 7, {"test_accuracy": 0.9}),
    ]
    for msg in msgs:
        back = wire.decode(wire.encode(msg), fed="f1")
        assert type(back) is type(msg)
        for name, value in vars(msg).items():
            got = getattr(back, name)
            if isinstance(value, dict) and value and isinstance(next(iter(value.values())), np.ndarray):
                assert list(got) == list(value)
                for k in value:
                    np.testing.assert_array_equal(got[k], value[k])
            else:
                assert got == value, name


def test_update_decodes_against_spec():
    msg = wire.decode(wire.encode(_update()), expect="update", spec=SPEC)
    assert list(msg.delta) == ["W0", "b0"] and msg.delta["W0"].shape == (4, 3)


def test_version_hash_depends_on_values_names_and_shapes():
    p = _params()
    v = wire.params_version(p)
    assert v == wire.params_version({k: a.copy() for k, a in p.items()}) and len(v) == 16
    q = {k: a.copy() for k, a in p.items()}
    q["b0"][0] += 1e-6
    assert wire.params_version(q) != v
    assert wire.params_version({"W0": p["W0"].reshape(3, 4), "b0": p["b0"]}) != v
    assert wire.params_version({"X0": p["W0"], "b0": p["b0"]}) != v


# -- hostile input: each rejected with a specific reason ----------------------

def test_truncated_payload():
    payload = wire.encode(_update())
    for cut in (1, len(payload) // 2, len(payload) - 1):
        assert _reason(payload[:cut]) == "not_msgpack"


def test_empty_payload():
    assert _reason(b"") == "empty"


def test_oversize_payload_rejected_before_decoding():
    assert _reason(b"\x00" * 101, max_bytes=100) == "oversize"
    big = _pack({"v": 1, "pad": b"x" * (wire.MAX_PAYLOAD_BYTES + 1)})
    assert _reason(big) == "oversize"


def test_not_a_map_and_garbage():
    assert _reason(_pack([1, 2, 3])) == "not_a_map"
    assert _reason(b"\xc1\xc1\xc1") == "not_msgpack"  # 0xc1 is never valid msgpack
    assert _reason(_pack({1: 2})) == "not_msgpack"  # non-string map keys are refused by strict_map_key


def test_extension_types_refused():
    assert _reason(_pack({"v": 1, "x": msgpack.ExtType(1, b"abc")})) == "not_msgpack"


def test_container_limits():
    assert _reason(_pack({"v": 1, "x": list(range(wire.MAX_LIST_LEN + 1))})) == "not_msgpack"
    assert _reason(_pack({f"k{i}": 0 for i in range(wire.MAX_MAP_LEN + 1)})) == "not_msgpack"
    assert _reason(_pack({"v": 1, "x": "y" * (wire.MAX_STR_LEN + 1)})) == "not_msgpack"


def test_deep_nesting_does_not_crash():
    payload = b"\x91" * 100_000 + b"\x00"  # [[[[...]]]] far deeper than any real message
    assert _reason(payload) == "not_msgpack"


def test_wrong_version_and_kind():
    assert _reason(_pack(_raw_update(v=2))) == "bad_version"
    assert _reason(_pack(_raw_update(kind="pickle"))) == "unknown_kind"
    assert _reason(wire.encode(_update()), expect="model") == "wrong_kind"


def test_wrong_federation():
    assert _reason(wire.encode(_update()), fed="other") == "wrong_federation"


@pytest.mark.parametrize(
    "field,value",
    [("round", "3"), ("round", -1), ("round", True), ("agent", "a/b"), ("agent", ""), ("fed", "x" * 65),
     ("num_samples", 0), ("num_samples", 2.5), ("base", ""), ("metrics", {"loss": "low"}),
     ("metrics", {"loss": float("nan")}), ("delta", [1, 2])],
)
def test_wrong_field_types_and_values(field, value):
    assert _reason(_pack(_raw_update(**{field: value}))) == "bad_field"


def test_missing_field():
    m = _raw_update()
    del m["num_samples"]
    assert _reason(_pack(m)) == "missing_field"


def _with_array(**array_overrides) -> bytes:
    m = _raw_update()
    m["delta"]["W0"].update(array_overrides)
    return _pack(m)


def test_shape_byte_count_mismatch():
    assert _reason(_with_array(shape=[4, 4])) == "shape_mismatch"
    assert _reason(_with_array(data=b"\x00" * 7)) == "shape_mismatch"


def test_unknown_and_object_dtypes():
    assert _reason(_with_array(dtype="|O")) == "bad_dtype"  # object dtype: could hold anything
    assert _reason(_with_array(dtype=">f4")) == "bad_dtype"  # big-endian
    assert _reason(_with_array(dtype="<U4")) == "bad_dtype"
    assert _reason(_with_array(dtype="f4; import os")) == "bad_dtype"
    with pytest.raises(wire.WireError) as e:
        wire.encode_array(np.array([object()], dtype=object))
    assert e.value.reason == "bad_dtype"


def test_bad_array_maps():
    assert _reason(_with_array(shape=[-1, 3])) == "bad_array"
    assert _reason(_with_array(shape=[1] * (wire.MAX_NDIM + 1))) == "bad_array"
    assert _reason(_with_array(data="text")) == "bad_array"
    m = _raw_update()
    m["delta"]["W0"]["extra"] = 1
    assert _reason(_pack(m)) == "bad_array"


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_values(bad):
    d = _params()
    d["W0"][1, 2] = bad
    assert _reason(wire.encode(_update(delta=d))) == "non_finite"


def test_huge_but_finite_float64_values_are_accepted():
    # The fast finite check sums in float64; an overflowing sum must fall back, not reject.
    a = np.full(4, 1e308)
    assert np.array_equal(wire.decode_array(msgpack.unpackb(_pack(wire.encode_array(a)), raw=False)), a)


def test_spec_mismatch_names_shapes_and_dtype():
    assert _reason(wire.encode(_update(delta={"W0": np.zeros((4, 3), np.float32)})), spec=SPEC) == "spec_mismatch"
    d = _params()
    d["W0"] = np.zeros((3, 4), np.float32)
    assert _reason(wire.encode(_update(delta=d)), spec=SPEC) == "spec_mismatch"
    d = _params()
    d["b0"] = np.zeros(3, np.int32)
    assert _reason(wire.encode(_update(delta=d)), spec=SPEC) == "spec_mismatch"
    d = {"b0": _params()["b0"], "W0": _params()["W0"]}  # right arrays, wrong order
    assert _reason(wire.encode(_update(delta=d)), spec=SPEC) == "spec_mismatch"


def test_too_many_arrays():
    m = _raw_update()
    m["delta"] = {f"p{i}": wire.encode_array(np.zeros(1, np.float32)) for i in range(wire.MAX_ARRAYS + 1)}
    for v in m["delta"].values():
        v["data"] = bytes(v["data"])
    assert _reason(_pack(m)) == "bad_field"


def test_hostile_model_spec_is_refused():
    m = msgpack.unpackb(wire.encode(wire.ModelMsg("f1", 0, "v", SPEC, _params())), raw=False)
    m["spec"]["n_features"] = 10**9  # would make a device allocate gigabytes
    assert _reason(_pack(m)) == "bad_field"
    m["spec"] = {"kind": "softmax", "n_features": 4, "n_outputs": 3, "hidden": [], "code": "x"}
    assert _reason(_pack(m)) == "bad_field"


def test_task_and_status_enumerations():
    t = msgpack.unpackb(wire.encode(wire.TaskMsg("f1", 1, "b")), raw=False)
    assert _reason(_pack({**t, "state": "maybe"})) == "bad_field"
    assert _reason(_pack({**t, "selected": ["ok", "not ok"]})) == "bad_field"
    assert _reason(_pack({**t, "config": {"epochs": -1, "batch_size": 1, "lr": 0.1}})) == "bad_field"
    assert _reason(_pack({**t, "mode": "turbo"})) == "bad_field"
    assert _reason(_pack({**t, "retry_after": -1.0})) == "bad_field"
    assert _reason(_pack({**t, "deadline": float("inf")})) == "bad_field"
    s = msgpack.unpackb(wire.encode(wire.StatusMsg("f1", 0, "a", "online")), raw=False)
    assert _reason(_pack({**s, "state": "asleep"})) == "bad_field"
    assert _reason(_pack({**s, "eligible": 1})) == "bad_field"


def test_run_is_optional_non_negative_and_bounded():
    model = wire.ModelMsg("f1", 2, wire.params_version(_params()), SPEC, _params(), run=1_700_000_000_123)
    task = wire.TaskMsg("f1", 3, "abcd", run=wire.MAX_RUN)
    assert wire.decode(wire.encode(model)).run == 1_700_000_000_123
    assert wire.decode(wire.encode(task)).run == wire.MAX_RUN
    for msg in (model, task):
        m = msgpack.unpackb(wire.encode(msg), raw=False)
        del m["run"]
        assert wire.decode(_pack(m)).run == 0  # a sender that predates run ids
        for bad in (-1, wire.MAX_RUN + 1, 2**64 - 1, 1.5, True, "1", None):
            assert _reason(_pack({**m, "run": bad})) == "bad_field", bad


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=512))
def test_random_bytes_never_raise_anything_but_wire_error(data):
    try:
        wire.decode(data, spec=SPEC)
    except wire.WireError:
        pass


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_mutated_valid_payloads_never_raise_anything_but_wire_error(data):
    payload = bytearray(wire.encode(_update()))
    for _ in range(data.draw(st.integers(1, 8))):
        i = data.draw(st.integers(0, len(payload) - 1))
        payload[i] = data.draw(st.integers(0, 255))
    try:
        msg = wire.decode(bytes(payload), spec=SPEC)
    except wire.WireError:
        return
    # Anything that still decodes must be a fully valid update.
    assert isinstance(msg, wire.UpdateMsg)
    assert all(np.isfinite(a).all() for a in msg.delta.values())


# -- found in review: each of these used to escape as a non-WireError or poison state

def test_empty_array_with_absurd_shape_is_refused():
    assert _reason(_with_array(shape=[0, 2**64 - 1], data=b"")) == "bad_array"
    assert _reason(_with_array(shape=[0] + [2**31] * 7, data=b"")) == "bad_array"


def test_metric_keys_must_be_strings_and_values_bounded():
    m = _raw_update()
    m["metrics"] = {b"eval_loss": 1.0}
    assert _reason(_pack(m)) == "bad_field"
    assert _reason(_pack(_raw_update(metrics={"train_loss": 1e300}))) == "bad_field"
    assert _reason(_pack(_raw_update(metrics={"": 1.0}))) == "bad_field"


def test_deltas_must_be_float32_like_the_model():
    d = {k: v.astype(np.float64) for k, v in _params().items()}
    assert _reason(wire.encode(_update(delta=d)), spec=SPEC) == "spec_mismatch"


@pytest.mark.parametrize("v", [True, 1.0, "1", None])
def test_version_must_be_the_integer_one(v):
    assert _reason(_pack(_raw_update(v=v))) == "bad_version"
