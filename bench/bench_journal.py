"""Journal group commit: appends/s and fsyncs per round, one fsync per update vs one per group.

Two measurements, both modes in the same run, alternated trial by trial:

* **The journal alone**, on the disk of the temporary directory: one round
  of writes, the opening plus 100 update records carrying a real update
  payload (softmax 64 -> 10, 2,780 bytes: ``bench_rounds.update_payload``).
  Baseline: ``append(record)`` (write + fsync each, what the aggregator did
  before group commit). Against it: ``append(record, sync=False)`` and one
  ``sync()`` per group of 10 records and of 100 records (the bound,
  ``edge_agent.mqtt.MAX_ACK_BATCH``); the opening is synced alone, as the
  service does before it publishes the task. The journal is reset, untimed,
  between rounds.
* **End to end**, over a real private mosquitto (the repo's
  ``mosquitto.conf``): an ``AggregatorService`` and a ``Simulation`` of 100
  agents that do not train (``epochs = 0``: the protocol, where the journal
  weighs most), every agent selected every round, as ``bench_rounds.py``
  runs them; ``--rounds`` counted rounds after one warm-up round.
  Baseline: the same service with every journal append forced to fsync at
  once (``JournalFile.append`` patched to ``sync=True``), which is one fsync
  per update; acknowledgements are still sent at the end of each read pass.
  Per round: wall time (``RoundSummary.seconds``), journal appends and
  fsyncs, records per fsync, wall time inside journal fsyncs, and the
  aggregator loop thread's CPU time (``time.thread_time`` in ``on_round``,
  which runs on that thread).

``--contend`` repeats both under disk contention: a child process that
writes 1 MiB and fsyncs, in a loop, into a file in the same temporary
directory (the same file system), as another tenant's writes would.

Run: ``.venv/bin/python bench/bench_journal.py [--repeat 15] [--rounds 10] [--agents 100] [--contend]``
"""

from __future__ import annotations

import argparse
import logging
import os
import queue
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np

from _common import machine_line
from bench_rounds import MODEL, ROUND_TIMEOUT_S, STALL_S, UNTRAINED, WARMUP_ROUNDS, broker_version, update_payload
from aggregator.broker import LocalBroker
from aggregator.config import AggregatorConfig, RoundConfig, SecurityConfig
from aggregator.coordinator import RoundClosed
from aggregator.datasets import federated_digits
from aggregator.journal import JournalFile
from aggregator.service import AggregatorService
from aggregator.sim import Simulation
from edge_agent import mqtt
from edge_agent.config import BrokerConfig
from edge_agent.mqtt import Loop

# A group size between one and the bound, for the journal-alone rows.
SMALL_GROUP = 10

# --------------------------------------------------------------------------
# the journal alone


def journal_round(journal: JournalFile, opening: dict, updates: list[dict], group: int) -> None:
    """One round of records; ``group`` 0: one fsync per append (the baseline), else one sync() per ``group``."""
    if group == 0:
        journal.append(opening)
        for rec in updates:
            journal.append(rec)
        return
    journal.append(opening, sync=False)
    journal.sync()  # the opening goes out before its task is published
    for i, rec in enumerate(updates, 1):
        journal.append(rec, sync=False)
        if i % group == 0 or i == len(updates):
            journal.sync()


@dataclass
class DirectRow:
    label: str
    seconds: list[float]
    fsyncs: int  # per round

    @property
    def median(self) -> float:
        return statistics.median(self.seconds)


def measure_direct(n_updates: int, repeat: int) -> list[DirectRow]:
    payload = update_payload()
    opening = {"type": "open", "round": 1, "attempt": 0, "selected": [f"agent-{i:03d}" for i in range(n_updates)],
               "target": n_updates, "opened_at": time.time(), "deadline": None,
               "rng": np.random.default_rng(0).bit_generator.state}
    updates = [{"type": "update", "round": 1, "attempt": 0, "agent": f"agent-{i:03d}", "payload": payload,
                "at": time.time()} for i in range(n_updates)]
    modes = {0: "one fsync per append [baseline]", SMALL_GROUP: f"group commit, groups of {SMALL_GROUP}",
             mqtt.MAX_ACK_BATCH: f"group commit, groups of {mqtt.MAX_ACK_BATCH}"}
    rows = {g: DirectRow(label, [], 0) for g, label in modes.items()}
    with tempfile.TemporaryDirectory(prefix="fedmqtt-bench-journal-") as d:
        journal = JournalFile(d)
        for trial in range(repeat + 1):  # trial 0 is a warm-up
            for g, row in rows.items():
                journal.reset()
                before = journal.fsyncs
                t0 = time.perf_counter()
                journal_round(journal, opening, updates, g)
                dt = time.perf_counter() - t0
                if trial:
                    row.seconds.append(dt)
                    row.fsyncs = journal.fsyncs - before
        journal.close()
    return list(rows.values())


def print_direct(rows: list[DirectRow], n_updates: int, payload_len: int) -> None:
    n = n_updates + 1
    print(f"\nThe journal alone: one round = {n} appends (the opening + {n_updates} updates of {payload_len:,} "
          f"payload bytes), {len(rows[0].seconds)} trials, modes alternated")
    print(f"  {'mode':<44} {'fsyncs/round':>12} {'best ms':>8} {'median ms':>9} {'appends/s':>10} {'x baseline':>10}")
    base = rows[0].median
    for r in rows:
        print(f"  {r.label:<44} {r.fsyncs:>12} {min(r.seconds) * 1e3:>8.2f} {r.median * 1e3:>9.2f} "
              f"{n / r.median:>10,.0f} {base / r.median:>9.1f}x")


# --------------------------------------------------------------------------
# end to end


class Counters:
    """Journal appends and fsyncs (count, records covered, seconds) of every JournalFile in this process."""

    def __init__(self) -> None:
        self.appends = self.fsyncs = self.records = 0
        self.fsync_s = 0.0
        self.largest = 0

    def snapshot(self) -> tuple[int, int, int, float]:
        return self.appends, self.fsyncs, self.records, self.fsync_s


@contextmanager
def instrumented(group_commit: bool):
    """Count journal work; without ``group_commit`` every append fsyncs at once (the baseline)."""
    c = Counters()
    real_append, real_sync = JournalFile.append, JournalFile.sync

    def append(self, record, sync=True):
        c.appends += 1
        return real_append(self, record, sync if group_commit else True)

    def sync(self):
        pending = self.unsynced_records
        t0 = time.perf_counter()
        done = real_sync(self)
        if done:
            c.fsync_s += time.perf_counter() - t0
            c.fsyncs += 1
            c.records += pending
            c.largest = max(c.largest, pending)
        return done

    JournalFile.append, JournalFile.sync = append, sync
    try:
        yield c
    finally:
        JournalFile.append, JournalFile.sync = real_append, real_sync


@dataclass
class E2ERun:
    group_commit: bool
    seconds: list[float]  # RoundSummary.seconds
    appends: list[int]
    fsyncs: list[int]
    records: list[int]
    fsync_s: list[float]
    cpu: list[float]  # aggregator loop thread CPU s
    largest: int

    @property
    def label(self) -> str:
        return "group commit" if self.group_commit else "one fsync per update [baseline]"


def run_federation(broker: LocalBroker, data, rounds: int, group_commit: bool, tag: str) -> E2ERun:
    n = len(data.agents)
    fed = f"bench-journal-{n}a-{'gc' if group_commit else 'sync'}-{tag}-{os.getpid()}"
    bcfg = BrokerConfig(host=broker.host, port=broker.port)
    events: queue.Queue = queue.Queue()
    with tempfile.TemporaryDirectory(prefix="fedmqtt-bench-state-") as state_dir, instrumented(group_commit) as c:
        def on_round(ev: RoundClosed) -> None:  # on the aggregator's loop thread
            events.put((time.thread_time(), c.snapshot(), ev.summary))

        cfg = AggregatorConfig(federation=fed, rounds=rounds + WARMUP_ROUNDS, state_dir=state_dir, model=MODEL,
                               training=UNTRAINED, broker=bcfg, security=SecurityConfig(probe_open_broker=False),
                               round=RoundConfig(min_agents=n, agents_per_round=0, quorum=1,
                                                 timeout=ROUND_TIMEOUT_S))
        loop = Loop()
        service = AggregatorService(cfg, loop, on_round=on_round, on_finished=lambda r: events.put(None))
        sim = Simulation(bcfg, fed, data.agents, seed=0)
        closed = []
        service.start()
        loop.start(name="bench-aggregator")
        sim.start()
        try:
            while True:
                try:
                    ev = events.get(timeout=STALL_S)
                except queue.Empty:
                    raise SystemExit(f"{fed}: no round closed within {STALL_S:.0f}s "
                                     f"(rejected {dict(service.coordinator.rejected)})") from None
                if ev is None:
                    break
                closed.append(ev)
        finally:
            sim.stop()
            loop.stop()
            if loop.thread is not None:
                loop.thread.join(10)
        largest = c.largest
    parts = [ev[2].participants for ev in closed[WARMUP_ROUNDS:]]
    if any(p != n for p in parts):
        raise SystemExit(f"{fed}: participants {parts}, expected {n} in every round")
    pairs = list(zip(closed[WARMUP_ROUNDS - 1:], closed[WARMUP_ROUNDS:]))
    d = lambda i: [b[1][i] - a[1][i] for a, b in pairs]  # noqa: E731
    return E2ERun(group_commit, [b[2].seconds for _, b in pairs], d(0), d(1), d(2), d(3),
                  [b[0] - a[0] for a, b in pairs], largest)


def print_e2e(runs: list[E2ERun], n: int) -> None:
    print(f"\nEnd to end: {n} agents, epochs 0, {len(runs[0].seconds)} counted rounds per federation; medians over "
          "the rounds of all federations of a mode (federations alternated)")
    print(f"  {'mode':<36} {'s/round':>8} {'updates/s':>9} {'appends':>7} {'fsyncs':>6} {'rec/fsync':>9} "
          f"{'largest':>7} {'fsync ms':>8} {'fsync %':>7} {'agg CPU ms':>10}")
    for gc in (False, True):
        rs = [r for r in runs if r.group_commit == gc]
        med = lambda f: statistics.median(x for r in rs for x in f(r))  # noqa: E731
        s, fs = med(lambda r: r.seconds), med(lambda r: r.fsync_s)
        rec = sum(sum(r.records) for r in rs) / max(1, sum(sum(r.fsyncs) for r in rs))
        print(f"  {rs[0].label:<36} {s:>8.4f} {n / s:>9,.0f} {med(lambda r: r.appends):>7.0f} "
              f"{med(lambda r: r.fsyncs):>6.0f} {rec:>9.1f} {max(r.largest for r in rs):>7} {fs * 1e3:>8.2f} "
              f"{fs / s:>6.0%} {med(lambda r: r.cpu) * 1e3:>10.1f}")
    print("  (appends, fsyncs: journal, per round; rec/fsync: records made durable per fsync, mean; largest: most "
          "in one fsync; fsync ms: wall time in journal fsyncs per round, and its share of the round; agg CPU: "
          "aggregator loop thread CPU per round)")


# --------------------------------------------------------------------------


CONTENDER = """
import os, sys
buf = os.urandom(1 << 20)
fd = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
while True:
    os.pwrite(fd, buf, 0)
    os.fsync(fd)
"""


@contextmanager
def contention(enabled: bool):
    if not enabled:
        yield
        return
    with tempfile.TemporaryDirectory(prefix="fedmqtt-bench-contend-") as d:
        p = subprocess.Popen([sys.executable, "-c", CONTENDER, os.path.join(d, "noise")])
        time.sleep(0.5)
        try:
            yield
        finally:
            p.kill()
            p.wait()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeat", type=int, default=15, help="trials of the journal alone, per mode (default 15)")
    p.add_argument("--rounds", type=int, default=10, help="counted rounds per federation (default 10)")
    p.add_argument("--agents", type=int, default=100, help="agents (and updates per round; default 100)")
    p.add_argument("--federations", type=int, default=2, help="federations per mode, alternated (default 2)")
    p.add_argument("--contend", action="store_true", help="repeat everything while another process writes and fsyncs")
    args = p.parse_args()
    if min(args.repeat, args.rounds, args.agents, args.federations) < 1:
        p.error("--repeat, --rounds, --agents and --federations must be >= 1")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    print(machine_line())
    print(f"state directories in {tempfile.gettempdir()}")
    t0 = time.perf_counter()
    data = federated_digits(args.agents, "iid", 0.5, 0)
    payload_len = len(update_payload())
    with LocalBroker() as broker:
        print(f"broker: {broker_version(broker.binary)} on {broker.address}, repo mosquitto.conf")
        for contend in ([False, True] if args.contend else [False]):
            print(f"\n=== {'disk contended: another process writes 1 MiB + fsync in a loop' if contend else 'quiet disk'}")
            with contention(contend):
                print_direct(measure_direct(args.agents, args.repeat), args.agents, payload_len)
                runs = []
                for i in range(args.federations):
                    for gc in (False, True):
                        runs.append(run_federation(broker, data, args.rounds, gc, f"{int(contend)}{i}"))
                print_e2e(runs, args.agents)
    print(f"\ntotal {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
