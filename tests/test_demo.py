"""`fedmqtt demo` as a test: fewer rounds, same code path, outputs checked."""

from __future__ import annotations

import csv
import io
import json
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from aggregator.demo import DemoOptions, demo_procs, run_demo
from aggregator.sim import available_cpus

pytestmark = pytest.mark.broker

FEDMQTT = str(Path(sys.executable).parent / "fedmqtt")


def test_demo_runs_and_writes_its_outputs(tmp_path):
    out = io.StringIO()
    result = run_demo(DemoOptions(rounds=4, out=str(tmp_path / "out")), out)
    text = out.getvalue()
    assert "private mosquitto on 127.0.0.1:" in text
    assert [s.round for s in result.rounds] == [1, 2, 3, 4]
    assert all(s.participants == 10 for s in result.rounds)
    # digits softmax FedAvg is at ~0.89 after 4 rounds (0.928 after 20)
    assert result.final_accuracy > 0.85
    assert 0.93 < result.baseline_accuracy < 0.99
    assert f"final global accuracy {result.final_accuracy:.4f}" in text
    with (tmp_path / "out" / "metrics.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert [int(r["round"]) for r in rows] == [1, 2, 3, 4]
    assert float(rows[-1]["test_accuracy"]) == pytest.approx(result.final_accuracy, abs=1e-6)
    header = (tmp_path / "out" / "metrics.csv").read_text().splitlines()[0].split(",")
    assert len(header) == len(set(header)), header  # `seconds` once (it is also a round metric)
    assert header[:6] == ["round", "attempt", "participants", "selected", "seconds", "version"]
    png = (tmp_path / "out" / "accuracy.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 5000
    with np.load(tmp_path / "out" / "model.npz", allow_pickle=False) as f:
        meta = json.loads(bytes(f["spec"]).decode())
        assert f["W0"].shape == (64, 10) and meta["spec"]["kind"] == "softmax" and meta["round"] == 4
        params = {"W0": f["W0"], "b0": f["b0"]}
    # model.onnx is the same model: identical labels on the test digits
    import onnxruntime as ort

    from aggregator.datasets import load_digits_split
    from edge_agent.models import BuiltinModel
    from edge_agent.spec import ModelSpec

    X_test = load_digits_split(0)[2]
    sess = ort.InferenceSession(str(tmp_path / "out" / "model.onnx"), providers=["CPUExecutionProvider"])
    labels = sess.run(None, {"input": X_test})[1]
    np.testing.assert_array_equal(labels, BuiltinModel(ModelSpec("softmax", 64, 10)).predict(params, X_test))
    assert "run the ONNX model:" in text


def test_demo_defaults_give_0_9278_and_agent_processes_give_the_same_model(tmp_path):
    """The full default demo (20 rounds), then the same with its agents in 2 worker processes."""
    assert demo_procs(DemoOptions()) == 1  # auto: 10 agents x 20 rounds is too little work for workers
    results, params = {}, {}
    for procs in (0, 2):
        out = io.StringIO()
        results[procs] = run_demo(DemoOptions(out=str(tmp_path / f"p{procs}"), procs=procs), out)
        assert ("agents: 10 over 2 worker processes" in out.getvalue()) == (procs == 2)
        with np.load(tmp_path / f"p{procs}" / "model.npz", allow_pickle=False) as f:
            params[procs] = {k: f[k] for k in ("W0", "b0")}
    assert f"{results[0].final_accuracy:.4f}" == "0.9278"
    assert [s.metrics["test_accuracy"] for s in results[2].rounds] == [s.metrics["test_accuracy"]
                                                                       for s in results[0].rounds]
    assert all(s.participants == 10 for s in results[2].rounds)
    for k in params[0]:
        assert np.array_equal(params[0][k], params[2][k]), k


def test_demo_procs_auto_uses_the_cores_only_for_long_runs():
    cores = available_cpus()
    assert demo_procs(DemoOptions(agents=50, rounds=40)) == min(cores, 50)
    assert demo_procs(DemoOptions(agents=10, rounds=20)) == 1
    assert demo_procs(DemoOptions(agents=3, rounds=20, procs=8)) == 3  # never more workers than agents
    assert demo_procs(DemoOptions(agents=10, rounds=20, procs=1)) == 1


def test_demo_with_mlp_and_shards_on_an_external_broker(tmp_path, broker):
    out = io.StringIO()
    result = run_demo(
        DemoOptions(model="mlp", hidden=[32], agents=5, rounds=2, partition="shards",
                    out=str(tmp_path / "o"), broker=broker.address, federation="demo-mlp"),
        out,
    )
    assert "private mosquitto" not in out.getvalue()
    assert [s.participants for s in result.rounds] == [5, 5]
    with np.load(tmp_path / "o" / "model.npz", allow_pickle=False) as f:
        assert f["W0"].shape == (64, 32) and f["W1"].shape == (32, 10)


def _port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupting_the_demo_stops_its_broker(tmp_path, sig):
    proc = subprocess.Popen(
        [FEDMQTT, "demo", "--rounds", "2000", "--out", str(tmp_path / "o")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        port = None
        for line in proc.stdout:
            if "private mosquitto on" in line:
                port = int(line.rsplit(":", 1)[1])
            if line.startswith("round"):
                break
        assert port is not None and _port_open(port)
        # 10 agents x 2000 rounds: auto runs the agents in worker processes (on more than one core)
        children = _children(proc.pid)
        assert len(children) >= (3 if available_cpus() > 1 else 1), children  # mosquitto (+ workers)
        proc.send_signal(sig)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130
    assert "interrupted" in proc.stderr.read() if proc.stderr else False
    end = time.monotonic() + 5
    while _port_open(port) and time.monotonic() < end:
        time.sleep(0.05)
    assert not _port_open(port), "the private broker is still running after the demo was interrupted"
    while (left := [c for c in children if _alive(c)]) and time.monotonic() < end:
        time.sleep(0.05)
    assert left == [], "processes of the demo outlived it"


def _children(pid: int) -> list[int]:
    out = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        out += [int(c) for c in (task / "children").read_text().split()]
    return out


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state not in ("Z", "X")


def test_demo_refuses_bad_options_with_a_message(tmp_path):
    proc = subprocess.run([FEDMQTT, "demo", "--agents", "0"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "--agents" in proc.stderr and "Traceback" not in proc.stderr
    proc = subprocess.run([FEDMQTT, "demo", "--partition", "dirichlet", "--alpha", "0.01", "--agents", "140",
                           "--out", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Dirichlet" in proc.stderr and "Traceback" not in proc.stderr
