"""Readable round metrics: ``metrics.csv`` and the JSON copy of the ``metrics`` message.

``metrics.csv`` has one row per closed round: the columns :data:`FIXED_COLUMNS`,
then the round metrics (``RoundSummary.metrics``) in name order, minus any
name that is already a fixed column (the coordinator also keeps ``seconds``
among the metrics). The aggregator service appends to ``state_dir/metrics.csv``
as rounds close (:class:`MetricsCsv`); ``fedmqtt demo`` writes the whole file
at the end of its run (:func:`write_csv`). Both give the same file for the
same rounds.

:func:`metrics_json` turns the msgpack ``metrics`` payload into the JSON
published, retained, on ``fl/<fed>/metrics/json`` (docs/PROTOCOL.md §3.7).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
from pathlib import Path
from typing import Any, Iterable, Sequence

from edge_agent import wire
from edge_agent.files import atomic_write

from .coordinator import RoundSummary

log = logging.getLogger(__name__)

CSV_NAME = "metrics.csv"
FIXED_COLUMNS = ("round", "attempt", "participants", "selected", "seconds", "version")


def metric_names(summaries: Iterable[RoundSummary]) -> list[str]:
    """The metric columns of these rounds: every metric name, in order, that is not a fixed column."""
    return sorted({k for s in summaries for k in s.metrics} - set(FIXED_COLUMNS))


def _number(v: float) -> str:
    return format(float(v), ".10g")


def csv_row(s: RoundSummary, names: Sequence[str]) -> list[str]:
    """One round's row under ``FIXED_COLUMNS + names`` (a metric the round lacks is empty)."""
    return [str(s.round), str(s.attempt), str(s.participants), str(s.selected), f"{s.seconds:.4f}", s.version,
            *(_number(s.metrics[n]) if n in s.metrics else "" for n in names)]


def csv_text(summaries: Sequence[RoundSummary]) -> str:
    """The whole metrics.csv of these rounds."""
    names = metric_names(summaries)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow([*FIXED_COLUMNS, *names])
    for s in summaries:
        w.writerow(csv_row(s, names))
    return buf.getvalue()


def write_csv(path: str | Path, summaries: Sequence[RoundSummary]) -> None:
    """Write metrics.csv of these rounds at once (atomically)."""
    atomic_write(path, csv_text(summaries))


class MetricsCsv:
    """``metrics.csv`` in the aggregator's state directory, one row appended per closed round.

    The header is written once. A restarted aggregator reads the header and
    the last round back and keeps appending (rounds the file already has are
    skipped, rounds the checkpoint's history has and the file lacks are
    written first). A round that brings a metric name the header does not
    have rewrites the file once with the wider header (atomically). A torn
    last line (a crash mid-write) is cut off on start. Rows are flushed,
    not fsynced: the checkpoint is what is durable, and rows a crash loses
    are written again from its history at the next start (no fsync of its
    own on the round-close path).
    """

    def __init__(self, path: str | Path, current_round: int | None = None) -> None:
        self.path = Path(path)
        self.names: list[str] | None = None  # metric columns of the header; None: no file yet
        self.last_round = 0
        self._rewrite_needed = False  # the file has another layout: rewrite it with the next round
        self._load()
        if current_round is not None and self.last_round > current_round:
            # Rows of rounds the state does not have: the federation was reset
            # on this state directory (checkpoint deleted). Keep the old file aside.
            old = self.path.with_name(f"{self.path.stem}-before-reset-{self.last_round}{self.path.suffix}")
            log.warning("%s ends at round %d but the state is at round %d: moved it to %s",
                        self.path, self.last_round, current_round, old.name)
            os.replace(self.path, old)
            self.names, self.last_round = None, 0

    def _load(self) -> None:
        if not self.path.exists():
            return
        data = self.path.read_bytes()
        if data and not data.endswith(b"\n"):
            cut = data.rfind(b"\n") + 1
            log.warning("%s: dropping a torn last line (%d bytes)", self.path, len(data) - cut)
            with self.path.open("r+b") as fh:
                fh.truncate(cut)
            data = data[:cut]
        rows = list(csv.reader(io.StringIO(data.decode("utf-8", errors="replace"))))
        if not rows:
            return
        header = rows[0]
        if tuple(header[:len(FIXED_COLUMNS)]) != FIXED_COLUMNS:
            self.names = []  # another layout (an older writer): rewritten in this one with the next round
            self._rewrite_needed = True
        else:
            self.names = header[len(FIXED_COLUMNS):]
        for row in reversed(rows[1:]):
            if row and row[0].strip().isdigit():
                self.last_round = int(row[0])
                break

    def append(self, history: Sequence[RoundSummary]) -> int:
        """Write the rounds of ``history`` (oldest first) after the last one in the file; returns rows written.

        Errors (a full disk) are logged and the rows retried with the next round.
        """
        new: list[RoundSummary] = []
        for s in reversed(history):
            if s.round <= self.last_round:
                break
            new.append(s)
        if not new:
            return 0
        new.reverse()
        try:
            names = metric_names(new)
            if self.names is None:
                self.names = names
                self._write(new, header=True)
            elif self._rewrite_needed or not set(names) <= set(self.names):
                self._rewrite(new)
            else:
                self._write(new, header=False)
        except OSError as exc:
            log.error("cannot write %s (rounds %d-%d stay unwritten for now): %s",
                      self.path, new[0].round, new[-1].round, exc)
            return 0
        self.last_round = new[-1].round
        return len(new)

    def _write(self, rows: Sequence[RoundSummary], header: bool) -> None:
        assert self.names is not None
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", newline="") as fh:
            w = csv.writer(fh, lineterminator="\n")
            if header:
                w.writerow([*FIXED_COLUMNS, *self.names])
            for s in rows:
                w.writerow(csv_row(s, self.names))

    def _rewrite(self, rows: Sequence[RoundSummary]) -> None:
        """The file again with a header that also has the new metric names."""
        with self.path.open(newline="") as fh:
            old = list(csv.DictReader(fh))
        old_names = {k for r in old for k in r if k is not None} - set(FIXED_COLUMNS)
        self.names = sorted(old_names | set(metric_names(rows)))
        buf = io.StringIO()
        w = csv.DictWriter(buf, [*FIXED_COLUMNS, *self.names], restval="", extrasaction="ignore",
                           lineterminator="\n")
        w.writeheader()
        w.writerows(old)
        plain = csv.writer(buf, lineterminator="\n")
        for s in rows:
            plain.writerow(csv_row(s, self.names))
        atomic_write(self.path, buf.getvalue())
        self._rewrite_needed = False


# -- the JSON copy of the metrics message --------------------------------------------------


def json_safe(obj: Any) -> Any:
    """``obj`` with NaN and infinities as None (JSON has no such numbers)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if isinstance(obj, (bytes, bytearray, memoryview)):
        return bytes(obj).hex()  # no metrics field is binary; never fail the mirror over one
    return obj


def metrics_json(payload: bytes) -> bytes:
    """The JSON copy of a msgpack ``metrics`` payload: the same map, key for key (NaN and infinities: null)."""
    return json.dumps(json_safe(wire.unpack(payload)), allow_nan=False, ensure_ascii=False).encode()
