"""The round journal: what happened since the last checkpoint, durable before it is acknowledged.

One file, ``journal.bin`` in the state directory: a sequence of records, each
a 4-byte big-endian length and a msgpack map (round openings with their
selection and RNG state, accepted update payloads, abandons). Every record
is written to the OS and fsynced before the aggregator acknowledges the MQTT
message that caused it, so anything the broker considers delivered survives
a crash. Group commit: ``append(record, sync=False)`` writes without fsync
and :meth:`JournalFile.sync` then makes every record written so far durable
with one fsync; the service acknowledges a batch of messages only after it.
A checkpoint makes the journal's content redundant; it is then reset.
A torn tail (a crash in the middle of an append, or a power cut that kept
only part of the records written since the last fsync) is ignored on load:
the records before it are used, nothing after it. Nothing in a torn tail
was acknowledged, so the broker delivers those messages again.
"""

from __future__ import annotations

import json
import logging
import os
import struct
from pathlib import Path
from typing import Any

import msgpack

from edge_agent.chunking import MAX_TOTAL_BYTES

from .checkpoint import atomic_write

log = logging.getLogger(__name__)

JOURNAL_NAME = "journal.bin"
_LEN = struct.Struct(">I")
# A record holds at most one update payload (one packet, or a chunked update of
# at most one model, edge_agent.chunking.MAX_TOTAL_BYTES) plus a little
# metadata; anything longer is corruption, not data.
MAX_RECORD_BYTES = MAX_TOTAL_BYTES + 1024 * 1024


class JournalFile:
    """Append-only journal; records are durable once :meth:`sync` (or ``append(sync=True)``) returned."""

    def __init__(self, state_dir: str | Path, name: str = JOURNAL_NAME) -> None:
        self.path = Path(state_dir) / name
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = None
        # Bytes in the file: where the next record starts (read() takes these offsets).
        self.size = self.path.stat().st_size if self.path.exists() else 0
        # Bytes written to the OS since the last fsync (group commit: not yet durable).
        self.unsynced_bytes = 0
        self.unsynced_records = 0
        self.fsyncs = 0  # fsyncs done since this object was made (benchmarks, tests)
        # A write or fsync that failed: the file's state is unknown (Linux may drop the
        # dirty pages of a failed fsync and report the next one as a success), so
        # nothing is ever reported durable again by this object.
        self.failed: OSError | None = None

    def load(self) -> list[dict[str, Any]]:
        """Every complete record, oldest first."""
        return [rec for _, rec in self.load_with_offsets()]

    def load_with_offsets(self) -> list[tuple[int, dict[str, Any]]]:
        """Every complete record with the offset :meth:`read` takes, oldest first."""
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
            records.append((pos, rec))
            pos += _LEN.size + n
        if pos != len(data):
            # Cut the torn tail off now: records appended after it would otherwise
            # sit behind bytes load() cannot get past, and be lost at the next load.
            log.warning("%s: dropped %d bytes of a torn last record", self.path, len(data) - pos)
            with open(self.path, "r+b") as fh:
                fh.truncate(pos)
                fh.flush()
                os.fsync(fh.fileno())
        self.size = pos
        return records

    def read(self, offset: int) -> dict[str, Any]:
        """The record that starts at byte ``offset`` (as :attr:`size` was before its append)."""
        with open(self.path, "rb") as fh:
            fh.seek(offset)
            (n,) = _LEN.unpack(fh.read(_LEN.size))
            if n > MAX_RECORD_BYTES:
                raise ValueError(f"{self.path}: no record at offset {offset}")
            return msgpack.unpackb(fh.read(n), raw=False)

    def append(self, record: dict[str, Any], sync: bool = True) -> int:
        """Write one record (to the OS, so a killed process loses none of it); returns its size in bytes.

        With ``sync`` (the default) it is durable on return. With ``sync=False``
        it is durable only after the next :meth:`sync`: nothing that depends on
        it may be acknowledged or published before that.
        """
        if self.failed is not None:
            raise self.failed
        if "rng" in record:  # PCG64 state holds 128-bit integers: msgpack has none, JSON does
            record = {**record, "rng": json.dumps(record["rng"])}
        body = msgpack.packb(record, use_bin_type=True)
        frame = len(body) + _LEN.size
        try:
            if self._fh is None:
                self._fh = open(self.path, "ab")
            # Two writes, not one joined frame: a chunked update is model-sized, and
            # joining would copy it once more (a torn tail is cut on load either way).
            self._fh.write(_LEN.pack(len(body)))
            self._fh.write(body)
            self._fh.flush()
        except OSError as exc:
            self.failed = exc
            raise
        self.unsynced_bytes += frame
        self.unsynced_records += 1
        self.size += frame
        if sync:
            self.sync()
        return frame

    def sync(self) -> bool:
        """Make every record written so far durable (one fsync); False when there was nothing to do."""
        if self.failed is not None:
            raise self.failed
        if not self.unsynced_records:
            return False
        try:
            os.fsync(self._fh.fileno())
        except OSError as exc:
            self.failed = exc
            raise
        self.fsyncs += 1
        self.unsynced_bytes = self.unsynced_records = 0
        return True

    def reset(self) -> None:
        """Start an empty journal (after a checkpoint made its content redundant)."""
        self._close_file()
        atomic_write(self.path, b"")
        self.size = 0
        # Records written and not yet fsynced are covered by the checkpoint now.
        self.unsynced_bytes = self.unsynced_records = 0

    def close(self) -> None:
        """Make what was written durable (unless a write failed), then close the file."""
        try:
            if self.failed is None and self._fh is not None:
                self.sync()
        finally:
            self._close_file()

    def _close_file(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None
