"""Wire codec throughput: encode and decode of an update carrying 4 MiB of float32.

Measured: ``edge_agent.wire.encode`` of an ``UpdateMsg`` whose delta is
``{"W0": float32[1024, 1024]}`` (1,048,576 values, 4,194,304 bytes), and
``edge_agent.wire.decode(payload, expect="update")`` of its payload (no
spec, so names and shapes are not checked against a model; every other
check runs, including the NaN/Inf scan).

Baseline, same process: ``bytes(memoryview(arr))``, one copy of the same
array into a new bytes object, the least any encoder that returns
``bytes`` must do. For reference the table also shows raw
``msgpack.packb``/``msgpack.unpackb`` of the same map, i.e. the codec
minus fedmqtt's own work.

Throughput is array bytes (4,194,304) per second in MB/s (1 MB = 10**6
bytes) for every row, so the rows compare directly. Hot cache: the array
and the payload are reused across runs (4 MiB fits the L3 of most CPUs).

Run: ``.venv/bin/python bench/bench_codec.py [--repeat N] [--profile]``
"""

from __future__ import annotations

import argparse
import cProfile
import math
import pstats
from typing import Callable

import msgpack
import numpy as np

from _common import Timing, machine_line, time_calls
from edge_agent import wire

SHAPE = (1024, 1024)


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


def check_round_trip(msg: wire.UpdateMsg, payload: bytes) -> None:
    """Refuse to report figures for a codec that does not round-trip."""
    back = wire.decode(payload, expect="update")
    if not isinstance(back, wire.UpdateMsg) or not np.array_equal(back.delta["W0"], msg.delta["W0"]):
        raise SystemExit("decode(encode(msg)) does not give the message back")


def measure(msg: wire.UpdateMsg, repeat: int) -> dict[str, Timing]:
    """Time the baseline copy, raw msgpack, and the fedmqtt codec."""
    arr = msg.delta["W0"]
    payload = wire.encode(msg)
    check_round_trip(msg, payload)
    wire_map = msgpack.unpackb(payload, raw=False)
    wire_map["delta"]["W0"]["data"] = memoryview(arr.reshape(-1).view(np.uint8))
    return {
        "memory copy bytes(memoryview(arr)) [baseline]": time_calls(lambda: bytes(memoryview(arr)), repeat),
        "msgpack.packb (same map, raw)": time_calls(lambda: msgpack.packb(wire_map, use_bin_type=True), repeat),
        "msgpack.unpackb (same payload, raw)": time_calls(lambda: msgpack.unpackb(payload, raw=False), repeat),
        "wire.encode(UpdateMsg)": time_calls(lambda: wire.encode(msg), repeat),
        'wire.decode(payload, expect="update")': time_calls(
            lambda: wire.decode(payload, expect="update"), repeat
        ),
    }


def print_table(results: dict[str, Timing], nbytes: int, payload_bytes: int) -> None:
    """Operation, MB/s (best and median), median ratio to the memory copy."""
    base = next(iter(results.values()))
    print(f"array: float32{list(SHAPE)} = {nbytes:,} bytes; payload {payload_bytes:,} bytes")
    print(f"{'operation':<48} {'best MB/s':>10} {'median MB/s':>12} {'median us':>10} {'x copy time':>12}")
    for name, t in results.items():
        print(
            f"{name:<48} {nbytes / t.best / 1e6:>10,.0f} {nbytes / t.median / 1e6:>12,.0f} "
            f"{t.median * 1e6:>10,.0f} {t.median / base.median:>12.2f}"
        )
    print(f"({base.runs} timed runs per row after 3 warm-up calls; 'x copy time' = median time / copy median time)")


def profile_decode(payload: bytes, calls: int = 50) -> None:
    """cProfile of repeated decodes: where the decode time goes."""
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(calls):
        wire.decode(payload, expect="update")
    prof.disable()
    print(f"\ncProfile of {calls} decodes (tottime, top 8):")
    pstats.Stats(prof).sort_stats("tottime").print_stats(8)


def finite_check_breakdown(arr: np.ndarray, repeat: int) -> None:
    """Time the NaN/Inf scan decode runs (wire._all_finite) next to exact alternatives."""
    nbytes = arr.nbytes
    rows: dict[str, Callable[[], object]] = {}
    all_finite = getattr(wire, "_all_finite", None)  # private: may be renamed
    if all_finite is not None:
        rows["wire._all_finite(arr) (min/max)"] = lambda: all_finite(arr)
    rows |= {
        "np.isfinite(arr).all() (1 MiB bool temporary)": lambda: bool(np.isfinite(arr).all()),
        "isfinite(arr.max()) and isfinite(arr.min())": lambda: math.isfinite(arr.max()) and math.isfinite(arr.min()),
    }
    print("\nNaN/Inf scan of the same array:")
    for name, fn in rows.items():
        t = time_calls(fn, repeat)
        print(f"  {name:<48} median {t.median * 1e6:>6,.0f} us  ({nbytes / t.median / 1e6:>8,.0f} MB/s)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeat", type=int, default=50, help="timed runs per operation (default 50)")
    p.add_argument("--profile", action="store_true", help="also profile decode and time its NaN/Inf scan")
    args = p.parse_args()
    print(machine_line())
    msg = make_message()
    payload = wire.encode(msg)
    print_table(measure(msg, args.repeat), msg.delta["W0"].nbytes, len(payload))
    if args.profile:
        profile_decode(payload)
        finite_check_breakdown(msg.delta["W0"], args.repeat)


if __name__ == "__main__":
    main()
