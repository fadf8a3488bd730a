"""ONNX export and inference: export cost and size, onnxruntime throughput, session creation.

Two models, float32 parameters from ``numpy.random.default_rng(0)``
(weights standard normal times sqrt(2 / fan_in), biases standard normal
times 0.01): the demo model ``ModelSpec("softmax", 64, 10)`` (650
parameters) and an MLP ``ModelSpec("mlp", 784, 10, (1024, 192))``
(1,002,570 parameters, 784 -> 1024 -> 192 -> 10 with ReLU).

1. Export: ``aggregator.onnx_export.to_onnx_bytes(spec, params,
   federation="bench", round=1, version="v")`` (builds the graph, runs
   ``onnx.checker.check_model(full_check=True)``, serializes). Baseline,
   same process: ``edge_agent.wire.encode`` of a ``ModelMsg`` with the same
   parameters, what the aggregator already pays to publish every round's
   model. For reference, ``check_model(full_check=True)`` alone on the
   built ``ModelProto``. Size baseline: the raw float32 parameter bytes
   (``num_params * 4``); the msgpack payload size is shown beside it.

2. Inference throughput in rows/s: ``session.run(None, {"input": X})``
   (both outputs, as ``serve-onnx`` asks for them) on an
   ``onnxruntime.InferenceSession(bytes, sess_options,
   providers=["CPUExecutionProvider"])`` whose ``intra_op_num_threads`` is
   set explicitly to ``os.cpu_count()`` (every other option default).
   Baseline, same process: the numpy model
   ``edge_agent.models.BuiltinModel(spec).predict_proba(params, X)``, on numpy's
   BLAS with its default threads. Batch 1: each timed block is 200
   single-row calls (rows pre-sliced, contiguous); batch 1000: each timed
   call is one 1000-row batch. The ONNX outputs are checked against the
   numpy model before anything is timed.

3. Session creation, the hot-swap cost in ``serve-onnx``:
   ``aggregator.serve_onnx.load_model(bytes)`` (default session options, as
   serve-onnx creates them), beside a bare
   ``InferenceSession(bytes, providers=["CPUExecutionProvider"])``. Each
   timed call also releases the session it made (as a swap releases the old
   one). Baseline, same process: ``wire.decode(payload, expect="model")``
   of the same model's msgpack payload, what a training device pays to take
   in a new global model.

Every figure is the best and the median of ``--repeat`` timed calls (or
blocks) after untimed warm-up calls, hot cache. Operations are timed one
after the other, never interleaved: both onnxruntime's and OpenBLAS's
worker threads spin for a while after a call, and on a 2-core machine
alternating them call by call halves both (measured while writing this).
A short pause before each operation lets the other library's threads go
idle. The minor page faults per call are printed beside the export and
session timings: whether glibc hands a 4 MB buffer back to the kernel
between calls depends on the heap's history, and re-faulting it can cost
several times the work itself (docs/benchmarks.md).

Run: ``.venv/bin/python bench/bench_onnx.py [--repeat N]``
"""

from __future__ import annotations

import argparse
import os
import resource
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import onnx
import onnxruntime as ort

from _common import Timing, machine_line, time_calls
from aggregator.onnx_export import to_onnx, to_onnx_bytes
from aggregator.serve_onnx import load_model
from edge_agent import wire
from edge_agent.models import BuiltinModel, Params
from edge_agent.spec import ModelSpec

SPECS: dict[str, ModelSpec] = {
    "softmax 64->10 (demo)": ModelSpec("softmax", 64, 10),
    "MLP 784->1024->192->10": ModelSpec("mlp", 784, 10, (1024, 192)),
}
B1_BLOCK = 200  # single-row calls per timed block at batch 1
BIG_BATCH = 1000
THREADS = os.cpu_count() or 1
SETTLE_S = 0.1  # pause before each operation, so the previous one's spinning threads go idle
EXPORT_INFO = {"federation": "bench", "round": 1, "version": "v"}


@dataclass
class Case:
    """One model: its spec, parameters, encodings, inference session and input rows."""

    name: str
    spec: ModelSpec
    params: Params
    onnx_bytes: bytes
    payload: bytes
    session: ort.InferenceSession
    rows: list[np.ndarray]  # B1_BLOCK single rows, each float32[1, n_features]
    batch: np.ndarray  # float32[BIG_BATCH, n_features]


def make_params(spec: ModelSpec, seed: int = 0) -> Params:
    """Seeded float32 parameters: He-scaled normal weights, small normal biases."""
    rng = np.random.default_rng(seed)
    out: Params = {}
    for name, shape in spec.param_shapes().items():
        scale = np.sqrt(2.0 / shape[0]) if name.startswith("W") else 0.01
        out[name] = rng.standard_normal(shape, dtype=np.float32) * np.float32(scale)
    return out


def session_options() -> ort.SessionOptions:
    """Default options, with the intra-op thread count set explicitly to the machine's core count."""
    so = ort.SessionOptions()
    so.intra_op_num_threads = THREADS
    return so


def make_case(name: str, spec: ModelSpec) -> Case:
    """Build everything one model needs, and check the ONNX model against the numpy one."""
    params = make_params(spec)
    data = to_onnx_bytes(spec, params, **EXPORT_INFO)
    payload = wire.encode(wire.ModelMsg("bench", 1, "v", spec, params))
    sess = ort.InferenceSession(data, session_options(), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(1).standard_normal((BIG_BATCH + B1_BLOCK, spec.n_features), dtype=np.float32)
    rows = [x[BIG_BATCH + i : BIG_BATCH + i + 1] for i in range(B1_BLOCK)]
    case = Case(name, spec, params, data, payload, sess, rows, x[:BIG_BATCH])
    check_outputs(case)
    return case


def check_outputs(case: Case) -> None:
    """Refuse to report figures for an ONNX model that disagrees with the numpy model."""
    model = BuiltinModel(case.spec)
    probs, labels = case.session.run(None, {"input": case.batch})
    if not np.allclose(probs, model.predict_proba(case.params, case.batch), rtol=1e-4, atol=1e-6):
        raise SystemExit(f"{case.name}: ONNX probabilities differ from the numpy model")
    if not np.array_equal(labels, model.predict(case.params, case.batch)):
        raise SystemExit(f"{case.name}: ONNX labels differ from the numpy model")
    if [r.shape for r in case.session.run(None, {"input": case.rows[0]})] != [(1, case.spec.n_outputs), (1,)]:
        raise SystemExit(f"{case.name}: unexpected output shapes at batch 1")


def timed(fn: Callable[[], object], repeat: int, warmup: int) -> tuple[Timing, float]:
    """``time_calls`` after a settling pause and ``warmup`` calls; also minor page faults per timed call."""
    time.sleep(SETTLE_S)
    for _ in range(warmup):
        fn()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    t = time_calls(fn, repeat, warmup=0)
    return t, (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / repeat


# -- 1. export ------------------------------------------------------------------


def bench_export(cases: list[Case], repeat: int) -> None:
    """Export time next to wire.encode of the same parameters; ONNX size next to the raw bytes."""
    print("\n1. Export: to_onnx_bytes (incl. onnx.checker full_check) vs wire.encode(ModelMsg) [baseline]")
    print(f"{'model':<24} {'params':>10} {'raw B [base]':>12} {'msgpack B':>11} {'ONNX B':>11} {'ONNX - raw':>10}")
    for c in cases:
        raw = c.spec.num_params() * 4
        print(
            f"{c.name:<24} {c.spec.num_params():>10,} {raw:>12,} {len(c.payload):>11,} {len(c.onnx_bytes):>11,} "
            f"{len(c.onnx_bytes) - raw:>10,}"
        )
    print(
        f"\n{'model':<24} {'operation':<44} {'best ms':>9} {'median ms':>10} {'x encode med':>13} {'faults/call':>12}"
    )
    for c in cases:
        msg = wire.ModelMsg("bench", 1, "v", c.spec, c.params)
        proto = to_onnx(c.spec, c.params, **EXPORT_INFO)
        rows = {
            "wire.encode(ModelMsg) [baseline]": lambda: wire.encode(msg),
            "to_onnx_bytes(spec, params, ...)": lambda: to_onnx_bytes(c.spec, c.params, **EXPORT_INFO),
            "(of which) check_model(full_check=True)": lambda: onnx.checker.check_model(proto, full_check=True),
        }
        base: Timing | None = None
        for name, fn in rows.items():
            t, faults = timed(fn, repeat, warmup=3)
            base = base or t
            print(
                f"{c.name:<24} {name:<44} {t.best * 1e3:>9.3f} {t.median * 1e3:>10.3f} "
                f"{t.median / base.median:>13.1f} {faults:>12,.0f}"
            )
    print(f"({repeat} timed calls per row after 3 warm-ups; faults = minor page faults per timed call)")


# -- 2. inference ---------------------------------------------------------------


def bench_inference(cases: list[Case], repeat: int) -> None:
    """Rows/s of onnxruntime next to the numpy model, batch 1 and batch BIG_BATCH."""
    print(
        f"\n2. Inference: onnxruntime session.run vs numpy BuiltinModel.predict_proba [baseline] "
        f"(ORT intra_op_num_threads={THREADS})"
    )
    print(
        f"{'model':<24} {'batch':>5} {'engine':<32} {'best rows/s':>12} {'median rows/s':>14} "
        f"{'median us/call':>15} {'x numpy (med)':>14}"
    )
    for c in cases:
        model = BuiltinModel(c.spec)
        sess, params, rows, batch = c.session, c.params, c.rows, c.batch

        def numpy_b1() -> None:
            for r in rows:
                model.predict_proba(params, r)

        def ort_b1() -> None:
            for r in rows:
                sess.run(None, {"input": r})

        runs: list[tuple[int, dict[str, Callable[[], object]]]] = [
            (1, {"numpy predict_proba [baseline]": numpy_b1, "onnxruntime session.run": ort_b1}),
            (
                BIG_BATCH,
                {
                    "numpy predict_proba [baseline]": lambda: model.predict_proba(params, batch),
                    "onnxruntime session.run": lambda: sess.run(None, {"input": batch}),
                },
            ),
        ]
        for batch_size, fns in runs:
            rows_per_call = B1_BLOCK if batch_size == 1 else batch_size
            calls = rows_per_call // batch_size
            base: Timing | None = None
            for engine, fn in fns.items():
                t, _ = timed(fn, repeat, warmup=3)
                base = base or t
                print(
                    f"{c.name:<24} {batch_size:>5} {engine:<32} {rows_per_call / t.best:>12,.0f} "
                    f"{rows_per_call / t.median:>14,.0f} {t.median / calls * 1e6:>15,.1f} "
                    f"{base.median / t.median:>14.2f}"
                )
    print(
        f"({repeat} timed blocks per row after 3 warm-ups: at batch 1 a block is {B1_BLOCK} single-row calls, "
        f"at batch {BIG_BATCH} one call; 'x numpy' > 1 means faster than numpy)"
    )


# -- 3. session creation -------------------------------------------------------


def bench_sessions(cases: list[Case], repeat: int) -> None:
    """load_model (serve-onnx hot swap) and a bare InferenceSession next to wire.decode of the same model."""
    print("\n3. Session creation (serve-onnx hot swap) vs wire.decode(payload, expect='model') [baseline]")
    print(
        f"{'model':<24} {'operation':<48} {'best ms':>9} {'median ms':>10} {'x decode med':>13} {'faults/call':>12}"
    )
    for c in cases:
        rows = {
            "wire.decode(payload, expect='model') [baseline]": lambda: wire.decode(c.payload, expect="model"),
            "InferenceSession(bytes) (default options)": lambda: ort.InferenceSession(
                c.onnx_bytes, providers=["CPUExecutionProvider"]
            ),
            "serve_onnx.load_model(bytes)": lambda: load_model(c.onnx_bytes),
        }
        base: Timing | None = None
        for name, fn in rows.items():
            t, faults = timed(fn, repeat, warmup=3)
            base = base or t
            print(
                f"{c.name:<24} {name:<48} {t.best * 1e3:>9.3f} {t.median * 1e3:>10.3f} "
                f"{t.median / base.median:>13.1f} {faults:>12,.0f}"
            )
    print(f"({repeat} timed calls per row after 3 warm-ups; each call creates and releases one session)")


def blas_line() -> str:
    """numpy's BLAS and, when threadpoolctl is installed, its thread count."""
    try:
        blas = np.show_config(mode="dicts")["Build Dependencies"]["blas"]["name"]
    except Exception:  # numpy < 1.26 has no mode="dicts"
        blas = "unknown"
    try:
        from threadpoolctl import threadpool_info
    except ImportError:
        return f"numpy BLAS: {blas}"
    pools = [f"{p['internal_api']} {p['num_threads']} threads" for p in threadpool_info() if p["user_api"] == "blas"]
    return f"numpy BLAS: {blas} ({', '.join(pools) or 'no BLAS pool found'})"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeat", type=int, default=20, help="timed calls (or blocks) per row (default 20)")
    args = p.parse_args()
    print(machine_line())
    print(f"onnx {onnx.__version__}, onnxruntime {ort.__version__} (CPUExecutionProvider)")
    print(f"onnxruntime intra_op_num_threads={THREADS} (set explicitly = os.cpu_count()); {blas_line()}")
    cases = [make_case(name, spec) for name, spec in SPECS.items()]
    bench_export(cases, args.repeat)
    bench_inference(cases, args.repeat)
    bench_sessions(cases, args.repeat)


if __name__ == "__main__":
    main()
