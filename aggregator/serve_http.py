"""``fedmqtt serve-onnx --http HOST:PORT``: the federation's current ONNX model behind a JSON HTTP API.

Standard library only (``http.server.ThreadingHTTPServer``); the model comes
from the same :class:`~aggregator.serve_onnx.OnnxFollower` as the CSV mode,
so broker, TLS, login and ``--trusted-key`` pinning work the same way.

- ``POST /predict`` with ``{"rows": [[x0, x1, ...], ...]}`` answers
  ``{"round", "version", "labels", "probabilities"}`` (classifiers) or
  ``{"round", "version", "predictions"}`` (regression). The whole batch is
  answered by the session current when the request started, so a hot swap
  never mixes two models within one response.
- ``GET /model``: round, version, sha256, n_features, outputs, loaded_at...
- ``GET /health``: 200 once predictions are served, 503 before.

Every error is ``{"error": "..."}`` with its status code (bad rows also carry
``"row"``, numbered from 0 as their index in ``rows``, and ``"column"``);
tracebacks stay in the server's log.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import socket
import socketserver
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

import numpy as np

from .serve_onnx import LoadedModel, OnnxFollower

log = logging.getLogger(__name__)

# At most this many rows in one POST /predict (413 beyond): one request then
# costs one session.run of a bounded batch, and a client wanting more splits
# its batch instead of holding a worker (and a core of a small device) for long.
MAX_ROWS = 1000

# Largest accepted request body (413 beyond). 8 MiB holds MAX_ROWS rows of
# ~400 features written at full float64 precision (~20 characters a number),
# while json.loads of the worst case (8 MiB of "0.5,") stays at ~2M floats,
# some 64 MB of Python objects: bounded on a device without swap.
MAX_BODY_BYTES = 8 * 1024 * 1024

# A refused body up to this size is read and discarded before the error is
# sent, so the client sees the status instead of a connection reset (closing
# a socket with unread data makes the kernel answer with RST). Larger bodies:
# the connection is just closed.
MAX_DRAIN_BYTES = 8 * MAX_BODY_BYTES

# Requests parsed and predicted at once (2-core devices: more only thrash),
# and how long a request waits for a slot before a 503.
MAX_CONCURRENT = 4
BUSY_WAIT_S = 10.0

# Socket timeout of a connection: a client that sends nothing for this long
# (idle keep-alive, stalled upload) is disconnected.
REQUEST_TIMEOUT_S = 30.0

_F32_MAX = float(np.finfo(np.float32).max)
ROUTES = {"/predict": "POST", "/model": "GET", "/health": "GET"}
RETRY_AFTER_S = "5"


class RequestError(Exception):
    """An answer other than 200: status, message and extra JSON fields."""

    def __init__(self, code: int, message: str, /, *, close: bool = False, headers: tuple = (), **fields: Any) -> None:
        super().__init__(message)
        self.status, self.message, self.close, self.headers, self.fields = code, message, close, headers, fields


def _iso(t: float) -> str:
    return _dt.datetime.fromtimestamp(t, _dt.timezone.utc).isoformat(timespec="seconds")


def rows_to_batch(rows: Any, n_features: int) -> np.ndarray:
    """The float32 batch of a JSON ``rows`` value; RequestError naming the first bad row (0-based) and column."""
    if not isinstance(rows, list):
        raise RequestError(400, '"rows" must be a list of rows, each a list of numbers')
    if not rows:
        raise RequestError(400, '"rows" is empty: send at least one row')
    if len(rows) > MAX_ROWS:
        raise RequestError(413, f"{len(rows)} rows in one request; the limit is {MAX_ROWS}: split the batch",
                           limit=MAX_ROWS)
    for i, row in enumerate(rows):
        if not isinstance(row, list):
            raise RequestError(400, f"row {i}: expected a list of {n_features} numbers, got {type(row).__name__}",
                               row=i)
        if len(row) != n_features:
            raise RequestError(400, f"row {i}: expected {n_features} features, got {len(row)}", row=i)
        for j, x in enumerate(row):
            if type(x) is not float and type(x) is not int:  # bool is an int subclass: refused too
                raise RequestError(400, f"row {i}, column {j}: {json.dumps(x)[:40]} is not a number",
                                   row=i, column=j)
    try:
        batch = np.array(rows, dtype=np.float64)
    except OverflowError:  # an integer too large for a float
        batch = None
    with np.errstate(over="ignore", invalid="ignore"):
        X = None if batch is None else batch.astype(np.float32)
    if X is not None and np.isfinite(X).all():
        return X
    for i, row in enumerate(rows):  # rare: find the culprit
        for j, x in enumerate(row):
            try:
                v = float(x)
            except OverflowError:
                v = float("inf")
            if v != v:
                what = "NaN is not a number"
            elif abs(v) > _F32_MAX:
                what = f"{json.dumps(x)[:40]} is outside the float32 range"
            else:
                continue
            raise RequestError(400, f"row {i}, column {j}: {what}", row=i, column=j)
    raise AssertionError("unreachable: a non-finite cell was not found")


class PredictionServer(ThreadingHTTPServer):
    """A ThreadingHTTPServer answering from one OnnxFollower."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int], follower: OnnxFollower, serve_initial: bool = False) -> None:
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, _Handler)
        self.follower = follower
        self.serve_initial = serve_initial
        self.slots = threading.BoundedSemaphore(MAX_CONCURRENT)

    def server_bind(self) -> None:
        # HTTPServer.server_bind also resolves socket.getfqdn(host), which can
        # hang for seconds without DNS; the name is only used in CGI variables.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = str(self.server_address[0]), int(self.server_address[1])

    @property
    def url(self) -> str:
        host, port = self.server_address[:2]
        return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"

    def refusal(self, model: LoadedModel | None) -> str | None:
        """Why predictions are not served now (None: they are)."""
        if model is None:
            return (f"no model yet: waiting for the retained ONNX model on {self.follower.topics.model_onnx}"
                    + (" (only models signed by a trusted key are accepted)" if self.follower.verifier else ""))
        if model.round == 0 and not self.serve_initial:
            return ("the current model is round 0, the untrained initial model; predictions start with the "
                    "first trained round (start serve-onnx with --serve-initial to serve it anyway)")
        return None


class _Handler(BaseHTTPRequestHandler):
    server: PredictionServer
    protocol_version = "HTTP/1.1"  # keep-alive: every answer carries a Content-Length
    server_version = "fedmqtt-serve-onnx"
    timeout = REQUEST_TIMEOUT_S
    _body_done = False

    # --- dispatch
    def do_GET(self) -> None:
        self._dispatch()

    do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = do_HEAD = do_GET

    def _dispatch(self) -> None:
        self._body_done = False
        try:
            path = urlsplit(self.path).path
            method = ROUTES.get(path)
            if method is None:
                raise RequestError(404, f"no such path {path!r}; the API is POST /predict, GET /model, GET /health")
            if self.command != method:
                raise RequestError(405, f"{self.command} is not allowed on {path}: use {method}",
                                   headers=(("Allow", method),))
            status, payload = {"/predict": self._predict, "/model": self._model, "/health": self._health}[path]()
            self._send_json(status, payload)
        except RequestError as exc:
            self._send_error(exc)
        except TimeoutError:
            log.info("%s: timed out reading the request", self.address_string())
            self._send_error(RequestError(408, "timed out reading the request body", close=True))
        except (ConnectionError, OSError) as exc:
            log.info("%s: connection lost: %s", self.address_string(), exc)
            self.close_connection = True
        except Exception:
            log.exception("%s %s failed", self.command, self.path)
            self._send_error(RequestError(500, "internal error (the server logged the details)"))

    # --- endpoints
    def _predict(self) -> tuple[int, dict]:
        model = self.server.follower.model  # this one session answers the whole batch
        why = self.server.refusal(model)
        if why is not None:
            raise RequestError(503, why, headers=(("Retry-After", RETRY_AFTER_S),),
                               round=None if model is None else model.round)
        body = self._read_body()
        if not self.server.slots.acquire(timeout=BUSY_WAIT_S):
            raise RequestError(503, f"busy: {MAX_CONCURRENT} requests are being answered, retry",
                               headers=(("Retry-After", "1"),))
        try:
            try:
                doc = json.loads(body)
            except (ValueError, RecursionError) as exc:  # JSONDecodeError, bad UTF-8, absurd nesting
                raise RequestError(400, f"the body is not valid JSON: {exc}"[:300]) from None
            if not isinstance(doc, dict) or "rows" not in doc:
                raise RequestError(400, 'expected a JSON object {"rows": [[x0, x1, ...], ...]}')
            X = rows_to_batch(doc["rows"], model.n_features)
            del doc
            out = model.session.run(None, {"input": X})
        finally:
            self.server.slots.release()
        if not all(np.isfinite(o).all() for o in out):
            raise RequestError(500, f"the model of round {model.round} gave non-finite outputs", round=model.round)
        answer: dict[str, Any] = {"round": model.round, "version": model.version}
        if model.classifier:
            probs, labels = out
            answer["labels"] = labels.tolist()
            answer["probabilities"] = probs.tolist()
        else:
            answer["predictions"] = out[0].tolist()
        return 200, answer

    def _model(self) -> tuple[int, dict]:
        m = self.server.follower.model
        if m is None:
            raise RequestError(503, self.server.refusal(m), headers=(("Retry-After", RETRY_AFTER_S),))
        return 200, {
            "federation": self.server.follower.topics.fed,
            "round": m.round, "version": m.version, "sha256": m.sha256,
            "kind": "classifier" if m.classifier else "regression",
            "n_features": m.n_features, "outputs": list(m.outputs), "class_labels": list(m.class_labels),
            "loaded_at": _iso(m.loaded_at), "serving": self.server.refusal(m) is None,
        }

    def _health(self) -> tuple[int, dict]:
        m = self.server.follower.model
        why = self.server.refusal(m)
        state = {"round": None if m is None else m.round, "version": None if m is None else m.version,
                 "rejected": dict(self.server.follower.rejected)}
        if why is not None:
            raise RequestError(503, why, headers=(("Retry-After", RETRY_AFTER_S),), status="unavailable", **state)
        return 200, {"status": "ok", **state}

    # --- bodies
    def _content_length(self) -> int | None:
        """The declared body length (None: no body); RequestError for what cannot be read safely."""
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            raise RequestError(411, "chunked bodies are not supported: send a Content-Length", close=True)
        text = self.headers.get("Content-Length")
        if text is None:
            return None
        if not text.strip().isdigit():
            raise RequestError(400, f"bad Content-Length {text[:40]!r}", close=True)
        return int(text)

    def _read_body(self) -> bytes:
        n = self._content_length()
        if n is None:
            raise RequestError(411, "POST /predict needs a Content-Length header")
        if n > MAX_BODY_BYTES:
            raise RequestError(413, f"the body is {n} bytes; the limit is {MAX_BODY_BYTES} "
                               f"(and {MAX_ROWS} rows): split the batch", limit=MAX_BODY_BYTES)
        data = self.rfile.read(n)
        self._body_done = True
        if len(data) < n:
            raise RequestError(400, f"the body ended after {len(data)} of {n} bytes", close=True)
        return data

    def _discard_body(self) -> bool:
        """Read and drop an unread body before an error answer; False when the connection must close."""
        if self._body_done:
            return True
        self._body_done = True
        try:
            n = self._content_length()
        except RequestError:
            return False
        if n is None or n == 0:
            return True
        if n > MAX_DRAIN_BYTES:
            return False
        try:
            while n > 0:
                chunk = self.rfile.read(min(n, 65536))
                if not chunk:
                    return False
                n -= len(chunk)
        except OSError:
            return False
        return True

    def handle_expect_100(self) -> bool:
        """Refuse an oversized body before the client sends it (``Expect: 100-continue``)."""
        text = self.headers.get("Content-Length", "")
        if text.strip().isdigit() and int(text) > MAX_BODY_BYTES:
            self._body_done = True  # not sent yet: nothing to drain
            self._send_error(RequestError(413, f"the body is {int(text)} bytes; the limit is {MAX_BODY_BYTES}",
                                          close=True, limit=MAX_BODY_BYTES))
            return False
        return super().handle_expect_100()

    # --- answers
    def _send_error(self, exc: RequestError) -> None:
        if exc.status == 500:  # 503 (no model yet, busy) is expected, not worth a warning
            log.warning("%s %s -> %d: %s", self.command, self.path, exc.status, exc.message)
        else:
            log.info("%s %s -> %d: %s", self.command, self.path, exc.status, exc.message)
        if exc.close or not self._discard_body():
            self.close_connection = True
        self._send_json(exc.status, {"error": exc.message, **exc.fields}, exc.headers)

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """http.server's own errors (bad request line, unknown method, huge headers) as JSON too."""
        self.close_connection = True
        self._body_done = True
        try:
            phrase = HTTPStatus(code).phrase
        except ValueError:
            phrase = "error"
        self._send_json(code, {"error": message or phrase})

    def _send_json(self, status: int, payload: dict, headers: tuple = ()) -> None:
        body = json.dumps(payload, allow_nan=False).encode() + b"\n"
        try:
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            for k, v in headers:
                self.send_header(k, v)
            if self.close_connection:
                self.send_header("Connection", "close")
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)
        except OSError as exc:  # the client went away
            log.info("%s: could not send the answer: %s", self.address_string(), exc)
            self.close_connection = True

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - http.server's signature
        log.debug("%s %s", self.address_string(), format % args)


def serve_http(server: PredictionServer) -> None:
    """Answer requests until ``server.shutdown()`` (from another thread)."""
    try:
        server.serve_forever(poll_interval=0.5)
    finally:
        server.server_close()
