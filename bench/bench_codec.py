"""Wire codec throughput: encode and decode of a 4 MiB float32 update and of a 1M-parameter model.

Measured, two cases:

- ``update``: ``edge_agent.wire.encode`` of an ``UpdateMsg`` whose delta is
  ``{"W0": float32[1024, 1024]}`` (1,048,576 values, 4,194,304 bytes), and
  ``edge_agent.wire.decode(payload, expect="update")`` of its payload (no
  spec, so names and shapes are not checked against a model; every other
  check runs, including the NaN/Inf scan).
- ``model``: ``wire.encode`` of a ``ModelMsg`` of the MLP
  ``ModelSpec("mlp", 784, 10, (1024, 192))`` (1,002,570 float32 values in
  six arrays, 4,010,280 bytes; the model of bench_onnx.py), and
  ``wire.decode(payload, expect="model")`` (names, shapes and dtypes checked
  against the spec it carries, and the NaN/Inf scan).

Baseline, same process: one copy of the same array bytes into a new bytes
object (``bytes(memoryview(arr))``; for the model, ``b"".join`` of its
arrays' memoryviews), the least any encoder that returns ``bytes`` must do.
For reference the table also shows raw ``msgpack.packb``/``msgpack.unpackb``
of the same map, i.e. plain msgpack without fedmqtt's own work, and the
floor of any decoder that copies the arrays out of the payload and then
checks them in a separate pass: a copy of each array followed by one
float32 sum over the copy (the NaN/Inf check's fast path).

Throughput is array bytes per second in MB/s (1 MB = 10**6 bytes) for
every row, so the rows compare directly. Hot cache: the arrays and the
payload are reused across runs (4 MiB fits the L3 of most CPUs).

Run: ``.venv/bin/python bench/bench_codec.py [--repeat N] [--case update|model] [--profile]``
"""

from __future__ import annotations

import argparse
import cProfile
import math
import pstats
from dataclasses import dataclass
from typing import Callable

import msgpack
import numpy as np

from _common import Timing, machine_line, time_calls
from edge_agent import wire
from edge_agent.spec import ModelSpec

SHAPE = (1024, 1024)
MODEL_SPEC = ModelSpec("mlp", 784, 10, (1024, 192))


@dataclass
class Case:
    """One message to encode and decode, with the kind decode is told to expect."""

    name: str
    msg: wire.UpdateMsg | wire.ModelMsg
    expect: str
    arrays: dict[str, np.ndarray]
    arrays_key: str  # "delta" or "params": where the arrays sit in the wire map


def make_message(seed: int = 0) -> wire.UpdateMsg:
    """An update whose delta is one float32 array of SHAPE, normal values."""
    arr = np.random.default_rng(seed).standard_normal(SHAPE, dtype=np.float32)
    return wire.UpdateMsg(
        fed="bench",
        round=1,
        agent="agent-0",
        base="0123456789abcdef",
        num_samples=100,
        delta={"W0": arr},
        metrics={"train_loss": 0.5},
    )


def make_model_message(seed: int = 0) -> wire.ModelMsg:
    """The global model of MODEL_SPEC (1,002,570 float32 parameters in six arrays), normal values."""
    rng = np.random.default_rng(seed)
    params = {k: rng.standard_normal(s, dtype=np.float32) for k, s in MODEL_SPEC.param_shapes().items()}
    return wire.ModelMsg("bench", 1, wire.params_version(params), MODEL_SPEC, params, run=1_700_000_000_000)


def make_cases() -> dict[str, Case]:
    update, model = make_message(), make_model_message()
    return {
        "update": Case("update", update, "update", update.delta, "delta"),
        "model": Case("model", model, "model", model.params, "params"),
    }


def check_round_trip(case: Case, payload: bytes) -> None:
    """Refuse to report figures for a codec that does not round-trip."""
    back = wire.decode(payload, expect=case.expect)
    got = back.delta if isinstance(back, wire.UpdateMsg) else back.params
    if list(got) != list(case.arrays) or not all(np.array_equal(got[k], a) for k, a in case.arrays.items()):
        raise SystemExit(f"{case.name}: decode(encode(msg)) does not give the message back")
    if wire.encode(case.msg) != msgpack.packb(msgpack.unpackb(payload, raw=False), use_bin_type=True):
        raise SystemExit(f"{case.name}: wire.encode differs from msgpack.packb of the same map")


def measure(case: Case, repeat: int) -> dict[str, Timing]:
    """Time the baseline copy, raw msgpack, and the fedmqtt codec."""
    views = [memoryview(a.reshape(-1).view(np.uint8)) for a in case.arrays.values()]
    copy = (lambda: bytes(views[0])) if len(views) == 1 else (lambda: b"".join(views))
    payload = wire.encode(case.msg)
    check_round_trip(case, payload)
    wire_map = msgpack.unpackb(payload, raw=False)
    for name, view in zip(case.arrays, views):
        wire_map[case.arrays_key][name]["data"] = view
    kind = type(case.msg).__name__

    def copy_then_sum() -> None:  # one copy per array, then one summing pass over each copy
        for view in views:
            np.einsum("i->", np.frombuffer(bytes(view), np.float32))

    return {
        "memory copy of the array bytes [baseline]": time_calls(copy, repeat),
        "msgpack.packb (same map, raw)": time_calls(lambda: msgpack.packb(wire_map, use_bin_type=True), repeat),
        "msgpack.unpackb (same payload, raw)": time_calls(lambda: msgpack.unpackb(payload, raw=False), repeat),
        "copy, then einsum sum of the copy (floor)": time_calls(copy_then_sum, repeat),
        f"wire.encode({kind})": time_calls(lambda: wire.encode(case.msg), repeat),
        f'wire.decode(payload, expect="{case.expect}")': time_calls(
            lambda: wire.decode(payload, expect=case.expect), repeat
        ),
    }


def print_table(case: Case, results: dict[str, Timing], payload_bytes: int) -> None:
    """Operation, MB/s (best and median), median ratio to the memory copy."""
    nbytes = sum(a.nbytes for a in case.arrays.values())
    base = next(iter(results.values()))
    shapes = ", ".join(f"{k}{list(a.shape)}" for k, a in case.arrays.items())
    print(f"\n[{case.name}] float32 {shapes} = {nbytes:,} bytes; payload {payload_bytes:,} bytes")
    print(f"{'operation':<48} {'best MB/s':>10} {'median MB/s':>12} {'median us':>10} {'x copy time':>12}")
    for name, t in results.items():
        print(
            f"{name:<48} {nbytes / t.best / 1e6:>10,.0f} {nbytes / t.median / 1e6:>12,.0f} "
            f"{t.median * 1e6:>10,.0f} {t.median / base.median:>12.2f}"
        )
    print(f"({base.runs} timed runs per row after 3 warm-up calls; 'x copy time' = median time / copy median time)")


def profile_decode(payload: bytes, expect: str, calls: int = 50) -> None:
    """cProfile of repeated decodes: where the decode time goes."""
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(calls):
        wire.decode(payload, expect=expect)
    prof.disable()
    print(f"\ncProfile of {calls} decodes (tottime, top 8):")
    pstats.Stats(prof).sort_stats("tottime").print_stats(8)


def finite_check_breakdown(arr: np.ndarray, repeat: int) -> None:
    """Time the NaN/Inf scan decode runs (wire._all_finite) next to exact alternatives and floors."""
    nbytes = arr.nbytes
    rows: dict[str, Callable[[], object]] = {}
    all_finite = getattr(wire, "_all_finite", None)  # private: may be renamed
    if all_finite is not None:
        rows["wire._all_finite(arr)"] = lambda: all_finite(arr)
    flat = arr.reshape(-1)
    # What a zero-copy np.frombuffer view of the payload would be: misaligned.
    misaligned = np.frombuffer(b"\0" + arr.tobytes(), arr.dtype, offset=1)
    rows |= {
        f"np.isfinite(arr).all() ({arr.size:,} B temporary)": lambda: bool(np.isfinite(arr).all()),
        "isfinite(arr.max()) and isfinite(arr.min())": lambda: math.isfinite(arr.max()) and math.isfinite(arr.min()),
        'isfinite(np.einsum("i->", flat)) (float32 sum)': lambda: math.isfinite(np.einsum("i->", flat)),
        "isfinite(arr.sum()) (float32, pairwise)": lambda: math.isfinite(arr.sum()),
        "isfinite(arr.sum(dtype=float64))": lambda: math.isfinite(arr.sum(dtype=np.float64)),
        "arr.max() alone (misses -Inf; a floor)": lambda: arr.max(),
        "misaligned view: einsum sum": lambda: np.einsum("i->", misaligned),
        "misaligned view: max and min": lambda: (misaligned.max(), misaligned.min()),
        "misaligned view: np.dot(v, v) (no BLAS)": lambda: np.dot(misaligned, misaligned),
        "aligned: np.dot(flat, flat)": lambda: np.dot(flat, flat),
    }
    print("\nNaN/Inf scan of the same array:")
    for name, fn in rows.items():
        t = time_calls(fn, repeat)
        print(f"  {name:<48} median {t.median * 1e6:>6,.0f} us  ({nbytes / t.median / 1e6:>8,.0f} MB/s)")


def data_offsets(payload: bytes) -> list[int]:
    """Payload offset of each array's bin data (after each ``"data"`` key), where a zero-copy view would start."""
    out, i = [], payload.find(b"\xa4data")
    while i >= 0:
        out.append(i + 5 + {0xC4: 2, 0xC5: 3, 0xC6: 5}[payload[i + 5]])
        i = payload.find(b"\xa4data", i + 1)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeat", type=int, default=50, help="timed runs per operation (default 50)")
    p.add_argument("--case", choices=("update", "model"), action="append",
                   help="only this case (repeatable; default: both)")
    p.add_argument("--profile", action="store_true", help="also profile decode and time its NaN/Inf scan")
    args = p.parse_args()
    print(machine_line())
    cases = make_cases()
    for name in args.case or list(cases):
        case = cases[name]
        payload = wire.encode(case.msg)
        print_table(case, measure(case, args.repeat), len(payload))
        if args.profile:
            offsets = data_offsets(payload)
            print(f"array data at payload offsets {offsets} (mod 4: {[o % 4 for o in offsets]}; "
                  "0 would let a float32 view of the payload be aligned)")
            profile_decode(payload, case.expect)
            finite_check_breakdown(max(case.arrays.values(), key=lambda a: a.size), args.repeat)


if __name__ == "__main__":
    main()
