"""Writing and publishing the ONNX export of each global model.

Every ``onnx.every`` closed rounds the aggregator writes ``model-r<round>.onnx``
and ``latest.onnx`` into its state directory (atomically) and publishes the
ONNX bytes, retained, on ``fl/<fed>/model/onnx``. The payload is the plain
ONNX file, so any runtime (or ``mosquitto_sub``) can use it as it is; the
round, version and SHA-256 travel beside it as MQTT v5 user properties and
inside the model as ``metadata_props`` (with ``[broker] protocol = "3.1.1"``,
which has no properties, only inside the model).
"""

from __future__ import annotations

import hashlib
import logging
import re
from pathlib import Path
from typing import Mapping

import numpy as np

from edge_agent.mqtt import Publish
from edge_agent.topics import Topics

from .checkpoint import atomic_write
from .config import AggregatorConfig

log = logging.getLogger(__name__)

CONTENT_TYPE = "application/onnx"
LATEST = "latest.onnx"
_ROUND_FILE = re.compile(r"^model-r(\d+)\.onnx$")


class OnnxPublisher:
    """Exports global models for one federation (import fails early if onnx is missing)."""

    def __init__(self, config: AggregatorConfig) -> None:
        try:
            from . import onnx_export
        except ImportError as exc:
            raise RuntimeError(
                f"ONNX export needs the onnx package ({exc}); pip install 'fedmqtt[aggregator]' "
                "or set [onnx] every = 0"
            ) from None
        self._export = onnx_export
        self.config = config
        self.dir = Path(config.state_dir)
        self.topic = Topics(config.federation).model_onnx
        self.last: Publish | None = None

    def due(self, round_number: int) -> bool:
        """Whether the model of this round is exported (every N rounds; always round 0's)."""
        every = self.config.onnx.every
        return every > 0 and round_number % every == 0

    def export(self, round_number: int, version: str, params: Mapping[str, np.ndarray]) -> Publish:
        """Write the files and return the retained publish of the bytes."""
        data = self._export.model_to_onnx_bytes(
            self.config.model.build(),
            params,
            federation=self.config.federation,
            round=round_number,
            version=version,
            class_labels=list(self.config.onnx.class_labels) or None,
        )
        atomic_write(self.dir / f"model-r{round_number}.onnx", data)
        atomic_write(self.dir / LATEST, data)
        self._prune()
        sha = hashlib.sha256(data).hexdigest()
        log.info("round %d: ONNX model written (%d bytes, sha256 %s)", round_number, len(data), sha[:16])
        # MQTT 3.1.1 ([broker] protocol) has no properties: the payload is the same file, whose
        # metadata_props hold federation, round and version; a reader hashes the bytes itself.
        mqtt5 = self.config.broker.mqtt5
        self.last = Publish(
            self.topic,
            data,
            qos=1,
            retain=True,
            user_properties=(
                ("fed", self.config.federation),
                ("round", str(round_number)),
                ("version", version),
                ("sha256", sha),
            ) if mqtt5 else (),
            content_type=CONTENT_TYPE if mqtt5 else "",
        )
        return self.last

    def _prune(self) -> None:
        keep = self.config.onnx.keep
        if not keep:
            return
        files = sorted(
            (int(m.group(1)), p) for p in self.dir.iterdir() if (m := _ROUND_FILE.match(p.name))
        )
        for _, p in files[:-keep]:
            p.unlink(missing_ok=True)
