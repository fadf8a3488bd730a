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
        wire.TaskMsg("f1", 3, "abcd", "open", 2, 1700000000.5, wire.TrainConfig(3, 16, 0.05)),
        wire.SelectedMsg("f1", 3, "a-1", 2, "abcd", run=7),
        wire.SelectedMsg("f1", 3, "a-1", 0, "abcd", selected=["a-1", "b_2"]),
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
    # version 1 (a task that lists the selection: a v1 agent would never find
    # its notice) and a future version are both refused
    for v in (1, 3, 2.0, True):
        assert _reason(_pack(_raw_update(v=v))) == "bad_version"
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


# -- wire bytes: identical to the encoder before the single-copy packing (issue 13, item 7)

def _fixed_messages() -> dict[str, wire.Message]:
    """Messages of every kind with deterministic arrays of every bin size class and layout case."""
    spec = ModelSpec("mlp", 4, 3, (5,))
    params = {k: (np.arange(math.prod(s), dtype=np.float32).reshape(s) * 0.25 - 1.0)
              for k, s in spec.param_shapes().items()}
    big = (np.arange(1 << 20, dtype=np.float32) % 1000 - 500).reshape(1024, 1024) / 8
    mixed = {
        "scalar": np.float32(1.5).reshape(()),
        "empty": np.zeros((2, 0, 3), np.float64),
        "f2": np.arange(7, dtype=np.float16),
        "f8_bin16": np.arange(40, dtype=np.float64),  # 320 bytes: bin 16
        "u1_bin8": np.arange(255, dtype=np.uint8),  # 255 bytes: bin 8
        "u1_256": np.arange(256, dtype=np.uint8),  # 256 bytes: bin 16
        "i8_65535": np.zeros(65535, np.int8),  # largest bin 16, joined from the array
        "i8_65536": np.ones(65536, np.int8),  # smallest bin 32
        "be_fortran": np.arange(12, dtype=">f4").reshape(3, 4).T,
        "strided": np.arange(20, dtype=np.int32)[::3],
        "u8": np.array([2**64 - 1, 0], np.uint64),
    }
    return {
        "model": wire.ModelMsg("f1", 2, wire.params_version(params), spec, params, run=1_700_000_000_123),
        "model_mixed": wire.ModelMsg("fed_X-9", 0, "v", spec, mixed),
        "update_big": wire.UpdateMsg("bench", 1, "agent-0", "0123456789abcdef", 100, {"W0": big},
                                     {"train_loss": 0.5}),
        "update": wire.UpdateMsg("f1", 3, "a-1", "abcd", 17, params, {"train_loss": 0.5, "n": 3}),
        "task": wire.TaskMsg("f1", 3, "abcd", "open", 2, 1700000000.5,
                             wire.TrainConfig(3, 16, 0.05, 0.01, 1.0, 0.1, "local", 0.5), retry_after=2.5,
                             mode="async", run=wire.MAX_RUN,
                             secagg=wire.SecAggParams("secagg+", 3, 16, 20, 2.0, 1.0, 0, 1.5, 0.01, 3.0,
                                                      "ab" * 32)),
        "task_plain": wire.TaskMsg("f1", 1, "b"),
        "status": wire.StatusMsg("f1", 2, "a-1", "online", 120, ["softmax", "mlp"], "0.1.0", False, "on battery"),
        "metrics": wire.MetricsMsg("f1", 2, "abcd", 7, {"test_accuracy": 0.9, "loss": 1e-3},
                                   [{"round": 1.0, "acc": 0.5}, {"round": 2.0}]),
        "keys": wire.KeysMsg("f1", 4, ["0" * 64, "aB" * 32]),
        "selected": wire.SelectedMsg("f1", 3, "a-1", 2, "abcd", run=1_700_000_000_123, selected=["a-1", "b_2"]),
    }


# (length, SHA-256) of wire.encode(msg) as computed by the encoder before this
# change (msgpack.Packer(use_bin_type=True).pack of the whole map), commit ca998ac.
# Wire version 2 (commit after 3600720): those version-1 payloads, checked
# against the version-1 table, then unpacked, given "v": 2 (and the task its
# "selected" list removed) and packed again with msgpack.packb(use_bin_type=True);
# "selected" is msgpack.packb of its map written out by hand in PROTOCOL.md §3.8's field order.
_WIRE_VECTORS = {
    "keys": (166, "9753c0c178c4ac3e9c0e338f430aea1a5354c890fca7b0f3dad497c7f5530443"),
    "metrics": (158, "6cee10fd3c5b7b83f7e5fbd53575eed6d7ae7acd8345bcedde849dd0bbb78f57"),
    "model": (412, "0f340c587c77da19160bb46e3ccac8fe8a605dc54a3b1043be269a0f1be23b34"),
    "model_mixed": (132499, "2349354e0f63609ecb3e83a2a1db1acbe3ceb57c39221560da7aceb06fb60367"),
    "selected": (92, "a0265888002077b4600862b3fdc1a03fd9b4d811c38e585899d7b29dc2c676ee"),
    "status": (135, "61d1c94312ce79d93dc673fa7cd691f96d4801027164c40c833935a6afcb2767"),
    "task": (462, "ed442d22bf3399910b29053f4c7605787ad1d7f3837339aaf54562f1cca253d9"),
    "task_plain": (204, "32677ae202041ab50cebce71ef153f9ac3af92b5d7ddad6286fd655a5661e36c"),
    "update": (400, "f7bc91b838f6deffee1083d3750c13f239b1d3defaf3c38eef05f3ec64d71864"),
    "update_big": (4194459, "cafd4b0dbc95b56034bd3458d8d90db1112a93b3e3215ec5a6d2c7ca8eb45afa"),
}

# The same encoder's bytes in full for one small message.
_STATUS_HEX = (
    "8ba17602a46b696e64a6737461747573a3666564a26631a5726f756e6402a56167656e74a3612d31a57374617465a66f6e6c696e65"
    "ab6e756d5f73616d706c657378ac6361706162696c697469657392a7736f66746d6178a36d6c70a8736f667477617265a5302e312e30"
    "a8656c696769626c65c2a6726561736f6eaa6f6e2062617474657279"
)


@pytest.mark.parametrize("name", sorted(_WIRE_VECTORS))
def test_encoded_bytes_equal_the_previous_encoder(name):
    import hashlib

    payload = wire.encode(_fixed_messages()[name])
    assert type(payload) is bytes
    assert (len(payload), hashlib.sha256(payload).hexdigest()) == _WIRE_VECTORS[name]


def test_encoded_bytes_of_a_small_message_in_full():
    assert wire.encode(_fixed_messages()["status"]).hex() == _STATUS_HEX


@pytest.mark.parametrize("name", sorted(_WIRE_VECTORS))
def test_encoded_bytes_equal_plain_msgpack_of_the_same_map(name):
    # Reference encoding: msgpack.packb of the decoded map. Both sides agree
    # byte for byte only if encode() wrote what msgpack itself would.
    payload = wire.encode(_fixed_messages()[name])
    assert msgpack.packb(msgpack.unpackb(payload, raw=False), use_bin_type=True) == payload


@pytest.mark.parametrize("n", [0, 1, 255, 256, 65535, 65536, wire._JOIN_MIN_BYTES - 1, wire._JOIN_MIN_BYTES,
                               wire._JOIN_MIN_BYTES + 1, 300_000])
def test_bin_header_is_msgpacks_and_update_of_every_size_matches_plain_msgpack(n):
    data = bytes(range(256)) * (n // 256) + bytes(n % 256)
    assert wire._bin_header(n) + data == msgpack.packb(data, use_bin_type=True)
    delta = {"a": np.frombuffer(data, np.uint8), "b": np.arange(n // 8, dtype="<i8"), "c": np.ones(3, np.float32)}
    payload = wire.encode(_update(delta=delta))
    assert msgpack.packb(msgpack.unpackb(payload, raw=False), use_bin_type=True) == payload
    back = wire.decode(payload)
    assert all(np.array_equal(back.delta[k], v) for k, v in delta.items())


def test_bin_header_refuses_what_msgpack_cannot_frame():
    with pytest.raises(ValueError):
        wire._bin_header(1 << 32)


@settings(max_examples=60, deadline=None)
@given(
    st.dictionaries(
        st.text("abcXYZ_0", min_size=1, max_size=4),
        hnp.arrays(
            dtype=st.sampled_from([np.float16, np.float32, np.float64, np.uint8, np.int64, np.dtype(">f4")]),
            shape=hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=40),
            elements={"allow_nan": False, "allow_infinity": False},
        ),
        max_size=4,
    )
)
def test_encode_equals_plain_msgpack_of_the_wire_map(params):
    msg = wire.ModelMsg("f1", 1, "v", SPEC, params)
    reference = msgpack.packb(
        {"v": wire.WIRE_VERSION, "kind": "model", "fed": "f1", "round": 1, "version": "v", "spec": SPEC.to_wire(),
         "params": wire.encode_params(params), "run": 0},
        use_bin_type=True,
    )
    assert wire.encode(msg) == reference


# -- the NaN/Inf check: exact, including its fast path's overflow fallback

@pytest.mark.parametrize("dtype,huge", [(np.float16, 65504.0), (np.float32, 3.4e38), (np.float64, 1.7e308)])
def test_huge_finite_values_whose_sum_overflows_are_accepted(dtype, huge):
    # The fast check sums in the array's dtype; these sums overflow to ±Inf
    # (or NaN, +Inf + -Inf) and must fall back to the exact test, not reject.
    for arr in (np.full(100_000, huge, dtype), np.full(9, -huge, dtype),
                np.tile(np.array([huge, -huge, huge], dtype), 20_000).reshape(3, -1)):
        assert np.isinf(np.einsum("i->", arr.reshape(-1))) or np.isnan(np.einsum("i->", arr.reshape(-1)))
        back = wire.decode_array(msgpack.unpackb(_pack(wire.encode_array(arr)), raw=False))
        assert back.tobytes() == arr.tobytes()


@pytest.mark.parametrize("dtype,huge", [(np.float16, 65504.0), (np.float32, 3.4e38), (np.float64, 1.7e308)])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf, "nan_and_inf", "inf_and_minus_inf"])
@pytest.mark.parametrize("n", [1, 7, 8192, 100_003])
def test_non_finite_values_anywhere_are_refused_even_among_huge_ones(dtype, huge, bad, n):
    for where in sorted({0, n // 2, n - 1}):
        for fill in (0.5, huge):
            a = np.full(n, fill, dtype)
            if bad == "nan_and_inf":
                a[where], a[0] = np.nan, np.inf
            elif bad == "inf_and_minus_inf":
                a[where], a[0] = -np.inf, np.inf
            else:
                a[where] = bad
            assert not wire._all_finite(a)
            m = msgpack.unpackb(_pack(wire.encode_array(a)), raw=False)
            with pytest.raises(wire.WireError) as e:
                wire.decode_array(m)
            assert e.value.reason == "non_finite"


@settings(max_examples=200, deadline=None)
@given(
    hnp.arrays(
        dtype=st.sampled_from([np.float16, np.float32, np.float64]),
        shape=hnp.array_shapes(min_dims=0, max_dims=3, min_side=0, max_side=50),
        elements={"allow_nan": True, "allow_infinity": True, "allow_subnormal": True},
    )
)
def test_finite_check_agrees_with_numpy_isfinite(arr):
    expected = bool(np.isfinite(arr).all())
    assert wire._all_finite(np.ascontiguousarray(arr)) is expected
    assert wire._all_finite(arr.T) is expected  # not C-contiguous: the exact path
    m = msgpack.unpackb(_pack(wire.encode_array(arr)), raw=False)
    if expected:
        assert wire.decode_array(m).tobytes() == np.ascontiguousarray(arr).tobytes()
    else:
        with pytest.raises(wire.WireError):
            wire.decode_array(m)


def test_misaligned_float_arrays_take_the_exact_path():
    good = np.frombuffer(b"\0" + np.full(10_000, 3.0e38, np.float32).tobytes(), np.float32, offset=1)
    assert not good.flags.aligned and wire._all_finite(good)
    bad = good.copy()
    bad[5_000] = -np.inf
    bad = np.frombuffer(b"\0" + bad.tobytes(), np.float32, offset=1)
    assert not wire._all_finite(bad)


# -- decoded arrays are safe to hand out

def test_decoded_arrays_are_read_only_and_do_not_share_the_callers_buffer():
    payload = bytearray(wire.encode(_update()))
    msg = wire.decode(payload, spec=SPEC)
    want = {k: a.copy() for k, a in msg.delta.items()}
    for a in msg.delta.values():
        assert not a.flags.writeable
        with pytest.raises(ValueError):
            a[...] = 0
        with pytest.raises(ValueError):
            a.setflags(write=True)
        assert isinstance(a.base, bytes)  # immutable memory nobody else holds
    payload[:] = bytes(len(payload))  # the caller reuses its buffer
    for k, a in msg.delta.items():
        np.testing.assert_array_equal(a, want[k])


def test_encode_shares_no_memory_with_the_message():
    d = _params()
    payload = wire.encode(_update(delta=d))
    d["W0"][...] = 7  # changing the arrays afterwards does not change the payload
    assert wire.decode(payload).delta["W0"][0, 0] != 7
