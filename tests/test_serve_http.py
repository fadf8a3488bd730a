"""``fedmqtt serve-onnx --http``: the JSON HTTP API over the real test broker, against real federations."""

from __future__ import annotations

import datetime as dt
import hashlib
import http.client
import json
import queue
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from aggregator.datasets import federated_digits
from aggregator.serve_http import MAX_BODY_BYTES, MAX_ROWS, PredictionServer, rows_to_batch, serve_http
from aggregator.serve_onnx import OnnxFollower
from aggregator.sim import Simulation
from edge_agent import wire
from edge_agent.models import BuiltinModel
from edge_agent.topics import Topics

from .conftest import WAIT_S
from .test_integration import digits_config
from .test_onnx import Device, onnx_config


def call(url: str, method: str = "GET", body: bytes | None = None, headers: dict | None = None):
    """(status, JSON answer, headers) of one request; HTTP errors are answers too."""
    req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=WAIT_S) as r:
            return r.status, json.loads(r.read()), r.headers
    except urllib.error.HTTPError as e:
        with e:
            return e.code, json.loads(e.read()), e.headers


def predict(base: str, rows, raw: bytes | None = None):
    body = raw if raw is not None else json.dumps({"rows": rows}).encode()
    return call(base + "/predict", "POST", body, {"Content-Type": "application/json"})


def wait_until(what: str, check, timeout: float = WAIT_S):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        got = check()
        if got:
            return got
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def model_messages(client, topic: str) -> dict[int, wire.ModelMsg]:
    """Every model message the raw client collected so far, by round."""
    out = {}
    while True:
        try:
            t, payload, _ = client.messages.get_nowait()
        except queue.Empty:
            return out
        if t == topic and payload:
            m = wire.decode(payload, expect="model")
            out[m.round] = m


@pytest.fixture
def http_server():
    """PredictionServers on free loopback ports, in threads; stopped after the test."""
    servers: list[tuple[PredictionServer, threading.Thread]] = []

    def start(follower, **kw) -> str:
        server = PredictionServer(("127.0.0.1", 0), follower, **kw)
        t = threading.Thread(target=serve_http, args=(server,), daemon=True)
        t.start()
        servers.append((server, t))
        return server.url

    yield start
    for server, t in servers:
        server.shutdown()
        t.join(10)


@pytest.mark.broker
def test_http_predictions_equal_the_numpy_model_and_follow_hot_swaps(
    fed, broker, broker_config, tmp_path, start_aggregator, raw_client
):
    """A digits federation of 5 simulated agents; serve-onnx --http as a user runs it, in its own process."""
    topics = Topics(fed)
    data = federated_digits(5, "iid", 0.5, 3)
    cfg = digits_config(fed, broker_config, tmp_path, rounds=2, min_agents=5)
    spec = cfg.model.spec()
    numpy_model = BuiltinModel(spec)
    watcher = raw_client()
    watcher.subscribe(topics.model)
    ra = start_aggregator(cfg)
    proc = subprocess.Popen(
        [sys.executable, "-m", "fedmqtt", "serve-onnx", "--http", "127.0.0.1:0",
         "--broker", broker.address, "--federation", fed],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    stderr: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [stderr.put(line) for line in proc.stderr], daemon=True).start()
    sim = Simulation(broker_config, fed, data.agents, seed=3, train_delay=1.0)  # ~1 s a round: swaps are seen
    try:
        lines: list[str] = []
        while not (m := re.search(r"serving (http://127\.0\.0\.1:\d+)", lines[-1] if lines else "")):
            lines.append(stderr.get(timeout=WAIT_S))
        base = m.group(1)
        # Round 0 is published at once; no agent yet, so it is the untrained initial model.
        status, info, _ = wait_until("the round-0 model", lambda: (r := call(base + "/model"))[0] == 200 and r)
        assert info["round"] == 0 and info["serving"] is False
        status, answer, headers = call(base + "/health")
        assert status == 503 and answer["status"] == "unavailable" and answer["round"] == 0
        assert "untrained" in answer["error"] and headers["Retry-After"]
        X = data.X_test[:40].astype(np.float32)
        status, answer, _ = predict(base, X.tolist())
        assert status == 503 and answer["round"] == 0
        assert "first trained round" in answer["error"] and "--serve-initial" in answer["error"]

        sim.start()
        answers: dict[int, dict] = {}
        end = time.monotonic() + 2 * WAIT_S
        while 2 not in answers and time.monotonic() < end:
            status, answer, _ = predict(base, X.tolist())
            if status == 200:
                answers.setdefault(answer["round"], answer)
            else:
                assert status == 503 and answer["round"] == 0, answer
            time.sleep(0.02)
        assert set(answers) == {1, 2}, f"rounds answered: {sorted(answers)}"  # the hot swap 1 -> 2 was seen
        ra.wait_finished()
        published: dict[int, wire.ModelMsg] = {}
        wait_until("the round-2 model message", lambda: published.update(model_messages(watcher, topics.model))
                   or 2 in published)
        for r, answer in answers.items():
            params = published[r].params
            assert answer["version"] == published[r].version
            assert answer["labels"] == numpy_model.predict(params, X).tolist()
            np.testing.assert_allclose(answer["probabilities"], numpy_model.predict_proba(params, X), atol=1e-5)
            assert len(answer["labels"]) == len(X) and "predictions" not in answer
        assert answers[1]["version"] != answers[2]["version"]

        status, info, _ = call(base + "/model")
        assert status == 200 and info["round"] == 2 and info["version"] == published[2].version
        assert info["sha256"] == hashlib.sha256((tmp_path / "state" / "model-r2.onnx").read_bytes()).hexdigest()
        assert info["n_features"] == 64 and info["kind"] == "classifier" and info["serving"] is True
        assert info["outputs"] == ["probabilities", "label"] and info["class_labels"] == [str(c) for c in range(10)]
        assert info["federation"] == fed
        loaded = dt.datetime.fromisoformat(info["loaded_at"])
        assert abs((dt.datetime.now(dt.timezone.utc) - loaded).total_seconds()) < 120
        status, answer, _ = call(base + "/health")
        assert status == 200 and answer["status"] == "ok" and answer["round"] == 2

        proc.send_signal(signal.SIGTERM)  # systemd's stop: a clean exit
        assert proc.wait(timeout=WAIT_S) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        sim.stop()


@pytest.mark.broker
def test_http_errors_limits_and_the_initial_model(fed, broker_config, tmp_path, start_aggregator, raw_client,
                                                  http_server):
    """Linear regression y = w*x + b moved by one scripted device; two servers share one model holder."""
    ra = start_aggregator(onnx_config(fed, broker_config, tmp_path, rounds=1))
    follower = OnnxFollower(broker_config, fed)
    follower.start()
    try:
        base = http_server(follower)
        initial = http_server(follower, serve_initial=True)
        wait_until("the round-0 model", lambda: call(base + "/model")[0] == 200)
        status, answer, _ = predict(base, [[2.0]])
        assert status == 503 and "untrained" in answer["error"]
        status, answer, _ = predict(initial, [[2.0]])  # --serve-initial: round 0 (all zeros) predicts 0
        assert status == 200 and answer["round"] == 0 and answer["predictions"] == [0.0]
        assert call(initial + "/health")[0] == 200

        dev = Device(raw_client, fed)
        dev.send(1.0, 2.0, (0.0, 0.0))  # round 1: y = x + 2
        wait_until("round 1", lambda: (r := call(base + "/health"))[0] == 200 and r[1]["round"] == 1)
        dev.leave()
        ra.wait_finished()
        status, answer, _ = predict(base, [[2.0], [3.5], [-1]])
        assert status == 200, answer
        assert answer["round"] == 1 and answer["predictions"] == [4.0, 5.5, 1.0] and "labels" not in answer
        status, info, _ = call(base + "/model")
        assert info["kind"] == "regression" and info["outputs"] == ["prediction"] and info["n_features"] == 1

        def bad(rows=None, raw=None, status=400):
            got, answer, headers = predict(base, rows, raw)
            assert got == status, answer
            assert set(answer) >= {"error"} and "Traceback" not in answer["error"]
            assert headers["Content-Type"] == "application/json"
            return answer

        # rows are numbered from 0, as their index in "rows"
        a = bad([[1.0], [2.0, 3.0]])
        assert a["error"] == "row 1: expected 1 features, got 2" and a["row"] == 1
        a = bad([[1.0], [2.0], ["seven"]])
        assert a["error"] == 'row 2, column 0: "seven" is not a number' and (a["row"], a["column"]) == (2, 0)
        a = bad(raw=b'{"rows": [[1.0], [NaN]]}')
        assert a["error"] == "row 1, column 0: NaN is not a number" and a["row"] == 1
        a = bad(raw=b'{"rows": [[1.0], [2], [-Infinity]]}')
        assert a["error"].startswith("row 2, column 0:") and "float32 range" in a["error"]
        assert "float32 range" in bad([[1e39]])["error"]
        assert "float32 range" in bad(raw=b'{"rows": [[' + b"9" * 400 + b"]]}")["error"]
        assert "not a number" in bad([[1.0], [True]])["error"]
        assert "not a number" in bad([[None]])["error"]
        assert bad([[1.0], 2.0])["error"] == "row 1: expected a list of 1 numbers, got float"
        assert "empty" in bad([])["error"]
        assert "must be a list" in bad(raw=b'{"rows": 5}')["error"]
        assert "not valid JSON" in bad(raw=b'{"rows": [[1.0]')["error"]
        assert "not valid JSON" in bad(raw=b"\xff\xfe\x00garbage")["error"]
        assert "not valid JSON" in bad(raw=b"[" * 100_000)["error"]
        assert "JSON object" in bad(raw=b"[[1.0]]")["error"]
        assert "JSON object" in bad(raw=b'{"inputs": [[1.0]]}')["error"]
        a = bad([[1.0]] * (MAX_ROWS + 1), status=413)
        assert f"the limit is {MAX_ROWS}" in a["error"] and a["limit"] == MAX_ROWS
        a = bad(raw=b" " * (MAX_BODY_BYTES + 1), status=413)
        assert f"the limit is {MAX_BODY_BYTES}" in a["error"]
        assert predict(base, [[1.0]] * MAX_ROWS)[0] == 200  # the limit itself is fine

        status, a, _ = call(base + "/nowhere")
        assert status == 404 and "/nowhere" in a["error"] and "POST /predict" in a["error"]
        assert call(base + "/nowhere", "POST", b'{"rows": [[1]]}')[0] == 404
        status, a, headers = call(base + "/predict")
        assert status == 405 and a["error"] == "GET is not allowed on /predict: use POST" and headers["Allow"] == "POST"
        status, a, headers = call(base + "/model", "POST", b"{}")
        assert status == 405 and headers["Allow"] == "GET"
        assert call(base + "/health", "DELETE")[0] == 405

        host, port = base.removeprefix("http://").split(":")
        conn = http.client.HTTPConnection(host, int(port), timeout=WAIT_S)
        try:  # one keep-alive connection: errors do not break it, the refused body was read
            for body, expect in ((b'{"rows": [[1, 2]]}', 400), (b'{"rows": [[1]]}', 200), (b"{", 400),
                                 (b'{"rows": [[0.5]]}', 200)):
                conn.request("POST", "/predict", body)
                r = conn.getresponse()
                answer = json.loads(r.read())
                assert r.status == expect, answer
            assert answer["predictions"] == [2.5]
            conn.putrequest("POST", "/predict")  # no Content-Length
            conn.endheaders()
            r = conn.getresponse()
            assert r.status == 411 and "Content-Length" in json.loads(r.read())["error"]
        finally:
            conn.close()
        conn = http.client.HTTPConnection(host, int(port), timeout=WAIT_S)
        try:  # Expect: 100-continue with a huge body: refused before it is sent
            conn.putrequest("POST", "/predict")
            conn.putheader("Content-Length", str(10 * MAX_BODY_BYTES))
            conn.putheader("Expect", "100-continue")
            conn.endheaders()
            r = conn.getresponse()
            assert r.status == 413 and "limit" in json.loads(r.read())["error"]
        finally:
            conn.close()
    finally:
        follower.stop()


@pytest.mark.broker
def test_http_honours_pinned_keys(fed, broker_config, tmp_path, start_aggregator, raw_client, http_server):
    """An unsigned federation and a pinned key: nothing is served, and /health says why."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key = Ed25519PrivateKey.generate().public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw).hex()
    watcher = raw_client()
    watcher.subscribe(Topics(fed).model_onnx)
    start_aggregator(onnx_config(fed, broker_config, tmp_path, rounds=1))
    watcher.wait_for(Topics(fed).model_onnx)  # the round-0 model is on the broker, unsigned
    follower = OnnxFollower(broker_config, fed, trusted_keys=[key])
    follower.start()
    try:
        base = http_server(follower, serve_initial=True)
        wait_until("the unsigned model to be dropped", lambda: follower.rejected["unsigned"] >= 1)
        status, answer, _ = call(base + "/health")
        assert status == 503 and answer["round"] is None and answer["rejected"].get("unsigned", 0) >= 1
        assert "no model yet" in answer["error"] and "trusted key" in answer["error"]
        assert call(base + "/model")[0] == 503
        status, answer, _ = predict(base, [[1.0]])
        assert status == 503 and "no model yet" in answer["error"]
    finally:
        follower.stop()


class _BrokenSession:
    def run(self, *_):
        raise RuntimeError("onnxruntime exploded")


class _FakeFollower:
    """A model holder without a broker, for the internal-error path."""

    def __init__(self, model) -> None:
        self.model, self.verifier, self.rejected, self.topics = model, None, {}, Topics("fake")


def test_http_internal_errors_are_json_and_logged(http_server, caplog):
    from aggregator.serve_onnx import LoadedModel

    base = http_server(_FakeFollower(LoadedModel(_BrokenSession(), 3, "v3", False, 2)))
    with caplog.at_level("ERROR", logger="aggregator.serve_http"):
        status, answer, _ = predict(base, [[1.0, 2.0]])
    assert status == 500 and answer == {"error": "internal error (the server logged the details)"}
    assert "onnxruntime exploded" in caplog.text


def test_rows_to_batch_is_float32_in_order():
    X = rows_to_batch([[1, 2.5], [-3, 1e-3]], 2)
    assert X.dtype == np.float32 and X.tolist() == [[1.0, 2.5], [-3.0, np.float32(1e-3).item()]]
