"""The round journal: what happened since the last checkpoint, durable before it is acknowledged.

One file, ``journal.bin`` in the state directory: a sequence of records, each
a 4-byte big-endian length and a msgpack map (round openings with their
selection and RNG state, accepted update payloads, abandons). Every append
is flushed and fsynced before the aggregator acknowledges the MQTT message
that caused it, so anything the broker considers delivered survives a crash.
A checkpoint makes the journal's content redundant; it is then reset.
A torn last record (a crash in the middle of an append) is ignored on load.
"""

from __future__ import annotations

import json
import logging
import os
import struct
from pathlib import Path
from typing import Any

import msgpack

from .checkpoint import atomic_write

log = logging.getLogger(__name__)

JOURNAL_NAME = "journal.bin"
_LEN = struct.Struct(">I")
# A record holds at most one update payload (the codec caps those at 32 MiB)
# plus a little metadata; anything longer is corruption, not data.
MAX_RECORD_BYTES = 33 * 1024 * 1024


class JournalFile:
    """Append-only journal with fsync on every record."""

    def __init__(self, state_dir: str | Path) -> None:
        self.path = Path(state_dir) / JOURNAL_NAME
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = None

    def load(self) -> list[dict[str, Any]]:
        """Every complete record, oldest first."""
        if not self.path.exists():
            return []
        data = self.path.read_bytes()
        records, pos = [], 0
        while pos + _LEN.size <= len(data):
            (n,) = _LEN.unpack_from(data, pos)
            if n > MAX_RECORD_BYTES or pos + _LEN.size + n > len(data):
                break
            body = data[pos + _LEN.size : pos + _LEN.size + n]
            try:
                rec = msgpack.unpackb(body, raw=False)
            except Exception:  # a torn or corrupt record: stop here
                break
            if "rng" in rec:
                rec["rng"] = json.loads(rec["rng"])
            records.append(rec)
            pos += _LEN.size + n
        if pos != len(data):
            log.warning("%s: ignored %d bytes of a torn last record", self.path, len(data) - pos)
        return records

    def append(self, record: dict[str, Any]) -> None:
        """Write one record and make it durable."""
        if "rng" in record:  # PCG64 state holds 128-bit integers: msgpack has none, JSON does
            record = {**record, "rng": json.dumps(record["rng"])}
        body = msgpack.packb(record, use_bin_type=True)
        if self._fh is None:
            self._fh = open(self.path, "ab")
        self._fh.write(_LEN.pack(len(body)) + body)
        self._fh.flush()
        os.fsync(self._fh.fileno())

    def reset(self) -> None:
        """Start an empty journal (after a checkpoint made its content redundant)."""
        self.close()
        atomic_write(self.path, b"")

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None
