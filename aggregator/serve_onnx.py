"""``fedmqtt serve-onnx``: predictions from the federation's current ONNX model.

For devices that only predict. Subscribes to the retained ``model/onnx``,
loads every new version into a fresh onnxruntime session and swaps it in
without stopping, and answers one CSV line of output per CSV line of input
(stdin or a file), naming the model round that answered. Only onnxruntime,
numpy and paho-mqtt are needed. :class:`OnnxFollower` is the one model holder:
the CSV mode here and the HTTP mode (``--http``, :mod:`aggregator.serve_http`)
both read their model from it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from collections import Counter
from dataclasses import dataclass
from typing import Iterable, Iterator, TextIO

import numpy as np

from edge_agent.config import BrokerConfig
from edge_agent.mqtt import Connection, Loop
from edge_agent.signing import SignatureError, Verifier
from edge_agent.topics import Topics
from edge_agent.wire import MAX_PAYLOAD_BYTES

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoadedModel:
    """One onnxruntime session and what its metadata says it is."""

    session: object
    round: int
    version: str
    classifier: bool
    n_features: int
    sha256: str = ""  # of the ONNX bytes this session was built from
    loaded_at: float = 0.0  # time.time() when the session was created
    outputs: tuple[str, ...] = ()
    class_labels: tuple[str, ...] = ()  # class names from the metadata (classifiers)


def load_model(data: bytes) -> LoadedModel:
    """An inference session from ONNX bytes; ValueError when they are not a usable fedmqtt model."""
    import onnxruntime as ort

    if len(data) > MAX_PAYLOAD_BYTES:
        raise ValueError(f"ONNX payload of {len(data)} bytes exceeds {MAX_PAYLOAD_BYTES}")
    try:
        sess = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own exception types for bad models
        raise ValueError(f"not a loadable ONNX model: {exc}") from None
    meta = sess.get_modelmeta().custom_metadata_map
    inputs = sess.get_inputs()
    outputs = [o.name for o in sess.get_outputs()]
    if len(inputs) != 1 or inputs[0].name != "input" or len(inputs[0].shape) != 2:
        raise ValueError("the model must have one input 'input' of shape [batch, features]")
    if outputs not in (["probabilities", "label"], ["prediction"]):
        raise ValueError(f"unexpected outputs {outputs}")
    try:
        return LoadedModel(sess, int(meta.get("round", "-1")), meta.get("model_version", ""),
                           outputs[0] == "probabilities", int(inputs[0].shape[1]),
                           sha256=hashlib.sha256(data).hexdigest(), loaded_at=time.time(), outputs=tuple(outputs),
                           class_labels=_class_labels(meta))
    except (TypeError, ValueError):
        raise ValueError("the model's metadata or input width is not what fedmqtt writes") from None


def _class_labels(meta: dict[str, str]) -> tuple[str, ...]:
    """The class names of the metadata; informative only, so a bad entry gives none rather than a refusal."""
    try:
        labels = json.loads(meta.get("class_labels", "[]"))
    except ValueError:
        return ()
    return tuple(str(x) for x in labels) if isinstance(labels, list) else ()


class OnnxFollower:
    """Keeps the newest ONNX model of a federation, hot-swapped as versions arrive."""

    def __init__(
        self, broker: BrokerConfig, federation: str, loop: Loop | None = None, trusted_keys: list[str] | None = None
    ) -> None:
        self.topics = Topics(federation)
        # With pinned keys only signed models are served (edge_agent.signing).
        if trusted_keys and not broker.mqtt5:
            # Signatures are MQTT 5 user properties: on 3.1.1 every model would be dropped unsigned.
            raise ValueError("--trusted-key: signatures travel as MQTT 5 user properties, which [broker] protocol "
                             "= \"3.1.1\" cannot carry (docs/PROTOCOL.md §1.1)")
        self.verifier = Verifier(trusted_keys) if trusted_keys else None
        self.loop = loop or Loop()
        self._model: LoadedModel | None = None
        self._changed = threading.Condition()
        self.rejected: Counter[str] = Counter()
        self.conn = Connection(self.loop, broker, client_id=f"fedmqtt-serve-{federation}-{id(self):x}", handler=self)

    def start(self) -> None:
        self.conn.open()
        self.loop.start(name="fedmqtt-serve-onnx")

    def stop(self) -> None:
        self.loop.stop()
        if self.loop.thread is not None:
            self.loop.thread.join(10)

    @property
    def model(self) -> LoadedModel | None:
        return self._model

    def wait_for_model(self, timeout: float) -> LoadedModel | None:
        """Block until a model is loaded (or the timeout passes)."""
        with self._changed:
            self._changed.wait_for(lambda: self._model is not None, timeout)
            return self._model

    # Handler protocol
    def subscriptions(self) -> list[str]:
        return [self.topics.model_onnx]

    def on_connected(self, conn: Connection) -> None:
        log.info("following %s", self.topics.model_onnx)

    def on_message(self, conn: Connection, topic: str, payload: bytes, props: dict[str, str]) -> None:
        if not payload:
            return
        if self.verifier is not None:
            try:
                self.verifier.verify(topic, payload, props)
            except SignatureError as exc:
                self.rejected[exc.reason] += 1
                log.warning("dropped ONNX model on %s: %s", topic, exc)
                return
        try:
            new = load_model(payload)
        except ValueError as exc:
            self.rejected["bad_onnx"] += 1
            log.warning("dropped ONNX model on %s: %s", topic, exc)
            return
        # A lower round than the one served means the federation restarted
        # (MQTT keeps the order of one topic): follow it, as the agents do.
        with self._changed:
            self._model = new  # one reference swap: requests in flight keep the old session
            self._changed.notify_all()
        log.info("serving ONNX model of round %d (version %s)", new.round, new.version)


def predict_rows(model: LoadedModel, rows: np.ndarray) -> list[str]:
    """CSV output lines for a batch of rows: round, then label and probabilities, or the prediction."""
    out = model.session.run(None, {"input": rows.astype(np.float32, copy=False)})
    if model.classifier:
        probs, labels = out
        return [f"{model.round},{int(lab)}," + ",".join(f"{p:.6f}" for p in pr) for lab, pr in zip(labels, probs)]
    return [f"{model.round},{float(v):.6g}" for v in out[0]]


def parse_rows(lines: Iterable[str]) -> Iterator[np.ndarray | str]:
    """Each non-empty input line as a float row, or an error text for a bad line."""
    for n, line in enumerate(lines, 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        try:
            yield np.array([float(x) for x in line.split(",")], dtype=np.float32)
        except ValueError:
            yield f"line {n}: not a row of numbers"


def serve(follower: OnnxFollower, lines: Iterable[str], out: TextIO, wait_s: float) -> int:
    """Answer every input line with the model current at that moment; return the number of errors."""
    errors = 0
    for row in parse_rows(lines):
        model = follower.wait_for_model(wait_s)
        if model is None:
            raise TimeoutError(f"no ONNX model arrived on {follower.topics.model_onnx} within {wait_s:.0f}s")
        if isinstance(row, str):
            out.write(f"error,{row}\n")
            errors += 1
        elif row.shape[0] != model.n_features:
            out.write(f"error,expected {model.n_features} values, got {row.shape[0]}\n")
            errors += 1
        else:
            out.write(predict_rows(model, row[None, :])[0] + "\n")
        out.flush()
    return errors
