"""Round overhead: wall time of a round of 100 agents that do not train, next to one where they do.

Measured, over a real private mosquitto started in this run
(``aggregator.broker.LocalBroker``, the repo's ``mosquitto.conf``): an
``AggregatorService`` on its own ``Loop`` thread and a ``Simulation`` of N
agents (each a real MQTT client, all on one more ``Loop`` thread), as
``fedmqtt demo`` runs them. Model softmax 64 -> 10 (650 parameters); data
``federated_digits(N, "iid", 0.5, 0)`` (no holdout, so agents do not
evaluate); every agent selected every round (``min_agents = N``,
``agents_per_round = 0``, ``quorum = 1``, deadline 120 s, so a round closes
when the N-th update arrives); FedAvg; every other setting the default,
including the ONNX export of every round's model (``[onnx] every = 1``).
Each federation gets a fresh federation id and a fresh temporary
``state_dir`` and runs ``--rounds`` + 1 rounds; the first (connections,
first model) is a warm-up and is not counted.

A round's time is ``RoundSummary.seconds`` (closed_at - opened_at, the
aggregator's clock). A round opens at the instant the previous one closes,
so this is the round-to-round cycle: the close of the previous round
(checkpoint, journal reset, ONNX files, publishes of model, metrics and
task), N agents decoding model and task and training, N updates decoded,
journaled (one fsync each) and folded. As a check, the gaps between
``on_round`` callbacks are also timed with ``time.perf_counter``.

Baseline, same run: the same federation with ``epochs = 0`` (each agent
sends an all-zero delta at once: the protocol without training), next to
``epochs = 5, batch_size = 32, lr = 0.1`` (the demo's training). The
difference is what training adds; zero-epoch time / trained time is the
share of a round that is protocol. Rows for ``--agents`` 100 and 10.

Where the time goes (skipped with ``--no-breakdown``), same run:

* CPU seconds per round of this process (aggregator and agents share one
  interpreter) and of mosquitto: a round much longer than its CPU time
  is waiting, not computing.
* The aggregator's durable writes of one round, done directly on the same
  disk without MQTT: N + 1 ``JournalFile.append`` (N updates carrying a
  real update payload, plus the round's opening; one fsync each),
  ``checkpoint.save`` + ``JournalFile.reset`` and ``OnnxPublisher.export``.
* The same federations again with Nagle's algorithm off on every socket
  (a second private mosquitto with ``set_tcp_nodelay true``, and
  ``TCP_NODELAY`` set on each client socket as it opens): a diagnostic of
  what TCP small-packet delays cost, not how fedmqtt runs today.

Everything runs in one interpreter on one machine, so the agents' work
(decode, train, encode) shares the CPU and the GIL with the aggregator's;
on real devices it would run in parallel.

``--procs 1 2``: every federation once per value, one after the other in
the same run: 1 is the ``Simulation`` above; K > 1 is a
``ProcessSimulation`` (``fedmqtt sim --procs K``): the N agents over K
worker processes, each with its own Loop, the aggregator still here. Their
start-up falls in the warm-up round. "CPU s/round" then adds the workers'
CPU (from /proc). Agents compute the same updates whatever K, so the rows
differ only in time. The TCP_NODELAY diagnostic runs with --procs 1 only.

Run: ``.venv/bin/python bench/bench_rounds.py [--rounds 10] [--agents 100 10] [--procs 1 2] [--no-breakdown]``
"""

from __future__ import annotations

import argparse
import logging
import os
import queue
import socket
import statistics
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from _common import Timing, machine_line, time_calls
from aggregator import checkpoint
from aggregator.broker import REPO_CONF, LocalBroker
from aggregator.config import AggregatorConfig, ModelConfig, RoundConfig, TrainingConfig
from aggregator.coordinator import RoundClosed
from aggregator.datasets import DataSpec, FederatedData, federated_digits
from aggregator.journal import JournalFile
from aggregator.onnx_publish import OnnxPublisher
from aggregator.service import AggregatorService
from aggregator.sim import ProcessSimulation, Simulation
from edge_agent import wire
from edge_agent.config import BrokerConfig
from edge_agent.models import BuiltinModel
from edge_agent.mqtt import Connection, Loop

MODEL = ModelConfig(kind="softmax", n_features=64, n_outputs=10)
TRAINED = TrainingConfig(epochs=5, batch_size=32, lr=0.1)
UNTRAINED = TrainingConfig(epochs=0, batch_size=32, lr=0.1)
WARMUP_ROUNDS = 1
# Deadline of a round: far beyond any round here, so rounds close on the
# N-th update, never at the deadline.
ROUND_TIMEOUT_S = 120.0
# A round that has not closed after this long means the federation stalled.
STALL_S = 60.0


@dataclass
class FedRun:
    """The counted rounds of one federation."""

    agents: int
    epochs: int
    nodelay: bool
    procs: int
    seconds: list[float]  # RoundSummary.seconds
    gaps: list[float]  # perf_counter between on_round callbacks, same rounds
    cpu_self: float  # CPU s of this process per round (median of the per-round deltas)
    cpu_broker: float  # CPU s of mosquitto per round (mean; /proc has 10 ms ticks)
    participants: list[int]
    rejected: dict[str, int]
    snapshot: dict

    @property
    def timing(self) -> Timing:
        return Timing(min(self.seconds), statistics.median(self.seconds), len(self.seconds))

    @property
    def label(self) -> str:
        return "TCP_NODELAY" if self.nodelay else "default"

    @property
    def key(self) -> tuple[int, bool, int]:
        return self.agents, self.nodelay, self.procs


def proc_cpu_seconds(pid: int) -> float:
    """utime + stime of another process, from /proc/<pid>/stat."""
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def set_nodelay(conn: Connection) -> None:
    """Set TCP_NODELAY on this connection's socket whenever paho opens one (diagnostic only)."""
    inner = conn.client.on_socket_open

    def on_socket_open(client, userdata, sock) -> None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        inner(client, userdata, sock)

    conn.client.on_socket_open = on_socket_open


def run_federation(
    broker: LocalBroker, data: FederatedData, training: TrainingConfig, rounds: int, nodelay: bool = False,
    procs: int = 1,
) -> FedRun:
    """Run rounds + WARMUP_ROUNDS rounds of one federation; return the counted ones.

    ``procs`` > 1: the agents in that many worker processes, built from the
    DataSpec of ``federated_digits(n, "iid", 0.5, 0)`` (the same data).
    """
    n = len(data.agents)
    fed = f"bench-rounds-{n}a-e{training.epochs}{'-nd' if nodelay else ''}-p{procs}-{os.getpid()}"
    bcfg = BrokerConfig(host=broker.host, port=broker.port)
    assert broker.proc is not None
    assert not (nodelay and procs > 1), "the TCP_NODELAY diagnostic sets sockets of this process only"
    broker_pid = broker.proc.pid
    events: queue.Queue = queue.Queue()
    worker_pids: list[int] = []

    def cpu_self() -> float:
        """CPU s of this process plus its agent workers."""
        return time.process_time() + sum(proc_cpu_seconds(pid) for pid in worker_pids)

    def on_round(ev: RoundClosed) -> None:
        events.put((time.perf_counter(), cpu_self(), proc_cpu_seconds(broker_pid), ev.summary))

    with tempfile.TemporaryDirectory(prefix="fedmqtt-bench-state-") as state_dir:
        cfg = AggregatorConfig(
            federation=fed,
            rounds=rounds + WARMUP_ROUNDS,
            state_dir=state_dir,
            model=MODEL,
            training=training,
            round=RoundConfig(min_agents=n, agents_per_round=0, quorum=1, timeout=ROUND_TIMEOUT_S),
            broker=bcfg,
        )
        agg_loop = Loop()
        service = AggregatorService(cfg, agg_loop, on_round=on_round, on_finished=lambda r: events.put(None))
        sim: Simulation | ProcessSimulation
        if procs > 1:
            sim = ProcessSimulation(bcfg, fed, DataSpec(n, "digits", "iid", 0.5, seed=0), procs, seed=0)
        else:
            sim = Simulation(bcfg, fed, data.agents, seed=0)
        if nodelay:
            for conn in [service.conn, *(r.conn for r in sim.runners)]:
                set_nodelay(conn)
        closed = []
        service.start()
        agg_loop.start(name="bench-aggregator")
        sim.start()
        if isinstance(sim, ProcessSimulation):
            worker_pids.extend(w.process.pid for w in sim.workers)
        try:
            while (ev := _next_event(events, fed, len(closed), service, sim)) is not None:
                closed.append(ev)
        finally:
            sim.stop()
            agg_loop.stop()
            if agg_loop.thread is not None:
                agg_loop.thread.join(10)
        snapshot = service.coordinator.snapshot()
    prev, counted = closed[WARMUP_ROUNDS - 1], closed[WARMUP_ROUNDS:]
    pairs = list(zip([prev, *counted], counted))
    return FedRun(
        agents=n,
        epochs=training.epochs,
        nodelay=nodelay,
        procs=procs,
        seconds=[ev[3].seconds for ev in counted],
        gaps=[b[0] - a[0] for a, b in pairs],
        cpu_self=statistics.median(b[1] - a[1] for a, b in pairs),
        cpu_broker=(counted[-1][2] - prev[2]) / len(counted),
        participants=[ev[3].participants for ev in counted],
        rejected=dict(service.coordinator.rejected),
        snapshot=snapshot,
    )


def _next_event(events: queue.Queue, fed: str, closed: int, service: AggregatorService, sim):
    end = time.monotonic() + STALL_S
    while time.monotonic() < end:
        try:
            return events.get(timeout=0.5)
        except queue.Empty:
            if isinstance(sim, ProcessSimulation):
                sim.wait(0)  # a dead worker raises WorkerError: no point waiting for the stall
    raise SystemExit(
        f"{fed}: no round closed within {STALL_S:.0f}s after round {closed} "
        f"(rejected: {dict(service.coordinator.rejected)})"
    )


def check_run(run: FedRun) -> None:
    """Refuse to report a federation where not every agent took part in every counted round."""
    if any(p != run.agents for p in run.participants) or run.rejected:
        raise SystemExit(
            f"{run.agents} agents, epochs {run.epochs} ({run.label}, procs {run.procs}): "
            f"participants {run.participants}, "
            f"rejected {run.rejected}"
        )


def run_all(broker: LocalBroker, datas: dict[int, FederatedData], rounds: int, nodelay: bool,
            procs: tuple[int, ...] = (1,)) -> list[FedRun]:
    runs = []
    for data in datas.values():
        for training in (UNTRAINED, TRAINED):
            for k in procs:  # back to back, so the --procs values of one row see the same machine
                run = run_federation(broker, data, training, rounds, nodelay, k)
                check_run(run)
                runs.append(run)
    return runs


def broker_version(binary: str) -> str:
    """First line of ``mosquitto -h`` ("mosquitto version 2.0.x")."""
    out = subprocess.run([binary, "-h"], capture_output=True, text=True, timeout=10)
    return (out.stdout or out.stderr).splitlines()[0].strip()


# --------------------------------------------------------------------------
# durable writes of one round, done directly


def update_payload(seed: int = 0) -> bytes:
    """An encoded update of the benchmark's model (random delta), as an agent sends it."""
    params = BuiltinModel(MODEL.spec()).init_params(seed)
    rng = np.random.default_rng(seed)
    delta = {k: rng.standard_normal(v.shape, dtype=np.float32) * np.float32(0.01) for k, v in params.items()}
    return wire.encode(wire.UpdateMsg("bench", 1, "agent-000", "0123456789abcdef", 14, delta, {"train_loss": 0.5}))


def measure_disk(n_agents: int, snapshot: dict, payload: bytes, repeat: int = 5) -> dict[str, Timing]:
    """Time the aggregator's durable writes of one round on this disk (no MQTT)."""
    with tempfile.TemporaryDirectory(prefix="fedmqtt-bench-disk-") as d:
        journal = JournalFile(d)
        opening = {"type": "open", "round": 1, "attempt": 0, "selected": [f"agent-{i:03d}" for i in range(n_agents)],
                   "target": n_agents, "opened_at": time.time(), "deadline": None,
                   "rng": np.random.default_rng(0).bit_generator.state}

        def journal_round() -> None:
            journal.append(opening)
            for i in range(n_agents):
                journal.append({"type": "update", "round": 1, "attempt": 0, "agent": f"agent-{i:03d}",
                                "payload": payload, "at": time.time()})

        def close_round() -> None:
            checkpoint.save(d, snapshot)
            journal.reset()

        onnx = OnnxPublisher(AggregatorConfig(federation="bench", state_dir=d, model=MODEL))
        params = snapshot["params"]
        version = wire.params_version(params)
        rows = {
            f"{n_agents + 1} x JournalFile.append": time_calls(journal_round, repeat, warmup=1),
            "checkpoint.save + JournalFile.reset": time_calls(close_round, repeat * 4),
            "OnnxPublisher.export (2 atomic files)": time_calls(lambda: onnx.export(1, version, params), repeat * 4),
        }
        journal.close()
    return rows


# --------------------------------------------------------------------------
# output


def fmt_s(x: float) -> str:
    return f"{x:.4f}"


def print_rounds(runs: list[FedRun]) -> None:
    """One row per federation."""
    print(f"{'agents':>6} {'epochs':>6} {'procs':>5} {'sockets':<12} {'best s/round':>12} {'median s/round':>14} "
          f"{'rounds/s':>9} {'CPU s/round':>11} {'broker CPU':>10}")
    for r in runs:
        t = r.timing
        print(f"{r.agents:>6} {r.epochs:>6} {r.procs:>5} {r.label:<12} {fmt_s(t.best):>12} {fmt_s(t.median):>14} "
              f"{1 / t.median:>9.2f} {fmt_s(r.cpu_self):>11} {fmt_s(r.cpu_broker):>10}")
    worst = max(abs(statistics.median(r.gaps) / r.timing.median - 1) for r in runs)
    print(f"({runs[0].timing.runs} counted rounds per row after {WARMUP_ROUNDS} warm-up round. s/round: "
          f"RoundSummary.seconds; the on_round gaps agree within {worst:.1%} (medians). rounds/s = 1 / median. "
          "CPU s/round: this process (aggregator + agents) plus the agent workers (procs > 1), median; "
          "broker CPU: mosquitto, mean)")


def print_procs(runs: list[FedRun]) -> None:
    """Per agent count and epochs: each --procs value against --procs 1 of the same run."""
    for r in runs:
        same = (r.agents, r.epochs, r.nodelay, 1)
        base = next((b for b in runs if (b.agents, b.epochs, b.nodelay, b.procs) == same), None)
        if r.procs == 1 or base is None:
            continue
        print(f"{r.agents:>4} agents, epochs {r.epochs}, {r.label}: --procs {r.procs} {r.timing.median:.4f} s/round "
              f"against --procs 1 {base.timing.median:.4f} (median): x{base.timing.median / r.timing.median:.2f} "
              f"the rounds per second; best x{base.timing.best / r.timing.best:.2f}")


def print_differences(runs: list[FedRun]) -> None:
    """Per agent count, socket setting and procs: what training adds, and the protocol share."""
    keys = dict.fromkeys(r.key for r in runs)
    for key in keys:
        by = {r.epochs: r for r in runs if r.key == key}
        if 0 not in by or TRAINED.epochs not in by:
            continue
        base, trained = by[0].timing, by[TRAINED.epochs].timing
        n, procs = key[0], key[2]
        print(f"{n:>4} agents, {by[0].label:<11}, procs {procs}: "
              f"training adds {trained.median - base.median:+.4f} s (median), "
              f"{trained.best - base.best:+.4f} s (best); zero-epoch / trained round = "
              f"{base.median / trained.median:.0%} (median), {base.best / trained.best:.0%} (best)")


def print_disk(n_agents: int, rows: dict[str, Timing], zero_epoch: Timing) -> None:
    print(f"\nDurable writes of one {n_agents}-agent round, done directly on the same disk (no MQTT):")
    for name, t in rows.items():
        print(f"  {name:<40} best {t.best * 1e3:>7.2f} ms  median {t.median * 1e3:>7.2f} ms  ({t.runs} runs)")
    journal = next(iter(rows.values()))
    print(f"  {'  of which one append (write + fsync)':<40} best {journal.best / (n_agents + 1) * 1e3:>7.3f} ms  "
          f"median {journal.median / (n_agents + 1) * 1e3:>7.3f} ms")
    best, median = sum(t.best for t in rows.values()), sum(t.median for t in rows.values())
    print(f"  {'sum':<40} best {best * 1e3:>7.2f} ms  median {median * 1e3:>7.2f} ms  "
          f"= {median / zero_epoch.median:.0%} of the zero-epoch round ({zero_epoch.median * 1e3:.1f} ms median)")


def nodelay_conf(workdir: Path) -> Path:
    """The repo's mosquitto.conf plus ``set_tcp_nodelay true``."""
    conf = workdir / "mosquitto-nodelay.conf"
    conf.write_text(REPO_CONF.read_text() + "\n# bench_rounds.py diagnostic\nset_tcp_nodelay true\n")
    return conf


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=10, help="counted rounds per federation (default 10)")
    p.add_argument("--agents", type=int, nargs="+", default=[100, 10], help="agent counts (default: 100 10)")
    p.add_argument("--procs", type=int, nargs="+", default=[1],
                   help="agent worker processes, each value in turn (default: 1, all agents on one thread here)")
    p.add_argument("--no-breakdown", action="store_true", help="skip the disk timings and the TCP_NODELAY runs")
    args = p.parse_args()
    if args.rounds < 1 or min(args.agents) < 1 or min(args.procs) < 1:
        p.error("--rounds, every --agents count and every --procs value must be >= 1")
    if 1 not in args.procs and not args.no_breakdown:
        p.error("the breakdown compares with --procs 1: add 1 to --procs, or pass --no-breakdown")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    print(machine_line())
    t0 = time.perf_counter()
    datas = {n: federated_digits(n, "iid", 0.5, 0) for n in args.agents}
    for n, data in datas.items():
        sizes = [a.num_samples for a in data.agents]
        print(f"{n} agents: digits iid, {sum(sizes)} training samples, {min(sizes)}-{max(sizes)} per agent")
    with LocalBroker() as broker:
        print(f"broker: {broker_version(broker.binary)} on {broker.address}, repo mosquitto.conf")
        runs = run_all(broker, datas, args.rounds, nodelay=False, procs=tuple(args.procs))
    if not args.no_breakdown:
        with tempfile.TemporaryDirectory(prefix="fedmqtt-bench-conf-") as d, \
                LocalBroker(conf=nodelay_conf(Path(d))) as broker:
            runs += run_all(broker, datas, args.rounds, nodelay=True)
    print()
    print_rounds(runs)
    print()
    print_differences(runs)
    if len(args.procs) > 1:
        print()
        print_procs(runs)
    if not args.no_breakdown:
        payload = update_payload()
        for n in args.agents:
            base = next(r for r in runs if (r.agents, r.epochs, r.nodelay, r.procs) == (n, 0, False, 1))
            print_disk(n, measure_disk(n, base.snapshot, payload), base.timing)
        print(f"  (journaled update payload: {len(payload):,} bytes, a softmax 64->10 update)")
    print(f"\ntotal {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
