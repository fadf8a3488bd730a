"""Round cost from 100 to 10,000 simulated devices against one mosquitto, and the broker-only floor.

One federation per N (default 100, 1,000, 10,000), each in a fresh private
mosquitto (the repo's mosquitto.conf on a free loopback port, plus
``sys_interval 1`` so $SYS byte counters are fresh), with:

* ``fedmqtt aggregator`` (a TOML written here): MLP 60 -> 141 -> 10
  (ReLU; 10,021 parameters, 40 KB as float32), E = 1 local epoch, batch 32,
  lr 0.01, FedAvg, ``[round] min_agents = N``; selection: every online agent
  every round (``agents_per_round = 0``), or ``--fraction F`` of them
  (over-selected 1.3x, as shipped); shipped defaults otherwise (journal,
  checkpoint and ONNX export every round).
* ``fedmqtt sim --procs K --dataset synthetic`` (K = the core count, or
  ``--procs``): N agents, each its own MQTT connection, on K worker
  processes with one selector loop each; data FedProx Synthetic(0.5, 0.5),
  60 features, n_k = int(lognormal(4, 2)) + 50 capped at 20,000, each
  device keeping 10% to evaluate the global model on.
* a monitor connection in this process subscribed to the retained
  ``model`` and ``task``, to agent-000's ``update`` topic and to
  ``$SYS/broker/bytes/#`` (its own share of the traffic: one more receiver
  of model and task).

The first round (connections, first model) is a warm-up; ``--rounds``
rounds are counted. Per N:

* **s/round**: median ``RoundSummary.seconds`` (the aggregator's clock: a
  round opens when the previous closes and closes on its last awaited
  update), from the checkpoint history.
* **CPU s per agent per round**: CPU of the sim processes (workers and
  parent, from /proc) over the counted rounds / (N x rounds). Also the
  aggregator's and the broker's CPU per round.
* **bytes per device per round**: payloads as measured by the monitor:
  down = model + task, up = one update; "wire" adds the MQTT framing
  (PUBLISH header, topic, packet id; PUBACK). Cross-check: the broker's
  $SYS bytes received + sent over the counted rounds / N / rounds (that
  counts the aggregator's side of every update too).
* **memory**: RSS of the agents (all sim processes), the aggregator and the
  broker: peak, and per agent.
* **linearity**: a least-squares line s/round = a + b N through the
  points, and each point's distance from it; also seconds per agent.

``--floor``: the same bytes through the same mosquitto with no FL logic, at
N = 100 (``--floor-agents``): N plain paho clients (the project's selector
``Loop``/``Connection`` adapter, nothing else) over the same K processes;
a coordinator here publishes, per round, a retained QoS 1 message of the
model's size and one of the task's size (as measured in the fedmqtt run of
that N), each client answers with one QoS 1 message of the update's size
on its own topic as soon as it has both, and the round ends with the N-th
answer. Printed next to the fedmqtt round of the same N, with the ratio.

Every process is capped with ``ulimit -v`` (``--as-limit-gib``) and the
run is stopped if the sum of RSS passes ``--rss-limit-gib``.

Run: ``.venv/bin/python bench/bench_scale.py [--agents 100 1000 10000] [--rounds 3] [--procs K] [--fraction F] [--floor] [--floor-only]``
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import queue
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from _common import machine_line
from _procs import GiB, MiB, TreeSampler, fmt_mib, kill_tree, limit_address_space, raise_nofile
from aggregator import checkpoint
from aggregator.broker import LocalBroker
from edge_agent.config import BrokerConfig
from edge_agent.mqtt import PUBLISH_OVERHEAD, Connection, Loop, Publish

REPO = Path(__file__).resolve().parents[1]
HIDDEN = 141
N_FEATURES = 60
EPOCHS, BATCH, LR = 1, 32, 0.01
PUBACK = 4  # bytes of a QoS 1 PUBACK (v5, reason code omitted)
WARMUP = 1


def n_params(hidden: int = HIDDEN) -> int:
    return N_FEATURES * hidden + hidden + hidden * 10 + 10


# --------------------------------------------------------------------------
# a monitor of one federation's traffic


class Monitor:
    """Payload sizes of model, task and one agent's update per round, and the broker's $SYS byte counters."""

    def __init__(self, fed: str, agent: str = "agent-000") -> None:
        self.p = f"fl/{fed}"
        self.agent_topic = f"{self.p}/update/{agent}"
        self.sizes: dict[str, list[int]] = {"model": [], "task": [], "update": []}
        self.sys: dict[str, list[tuple[float, int]]] = {"received": [], "sent": []}
        self.got = 0

    def subscriptions(self) -> list[str]:
        return [f"{self.p}/model", f"{self.p}/task", self.agent_topic, "$SYS/broker/bytes/#"]

    def on_connected(self, conn: Connection) -> None:
        pass

    def on_message(self, conn, topic: str, payload: bytes, props) -> None:
        self.got += 1
        if topic.startswith("$SYS/broker/bytes/"):
            kind = topic.rsplit("/", 1)[1]
            if kind in self.sys:
                self.sys[kind].append((time.time(), int(payload)))
        elif topic == f"{self.p}/model":
            self.sizes["model"].append(len(payload))
        elif topic == f"{self.p}/task":
            self.sizes["task"].append(len(payload))
        elif topic == self.agent_topic:
            self.sizes["update"].append(len(payload))

    def sys_between(self, t0: float, t1: float) -> int | None:
        """Broker bytes received + sent between t0 and t1 (the $SYS samples nearest inside the window)."""
        total = 0
        for series in self.sys.values():
            inside = [(t, v) for t, v in series if t0 <= t <= t1]
            if len(inside) < 2:
                return None
            (ta, va), (tb, vb) = inside[0], inside[-1]
            total += (vb - va) / max(tb - ta, 1e-9) * (t1 - t0)  # rate over the samples, times the window
        return int(total)


def wire_bytes(topic: str, payload: int) -> int:
    return payload + len(topic.encode()) + PUBLISH_OVERHEAD


# --------------------------------------------------------------------------
# one fedmqtt federation of N devices


@dataclass
class ScaleRun:
    agents: int
    procs: int
    selected: list[int]
    seconds: list[float]
    startup: float
    cpu_agents: float  # CPU s of the sim processes per round
    cpu_aggregator: float
    cpu_broker: float
    rss_peak: dict[str, int]
    rss_mean: dict[str, float]
    sizes: dict[str, int]
    sys_bytes_round: int | None
    rejected: str = ""
    notes: list[str] = field(default_factory=list)

    @property
    def s_round(self) -> float:
        return statistics.median(self.seconds)


def classify(pid: int, cmd: str) -> str:
    if "mosquitto" in cmd:
        return "broker"
    if "fedmqtt aggregator" in cmd:
        return "aggregator"
    if "spawn_main" in cmd or "resource_tracker" in cmd or "fedmqtt sim" in cmd:
        return "agents"
    return "other"


def run_scale(n: int, procs: int, rounds: int, fraction: float, work: Path, as_gib: float, limit: int,
              timeout: float, epochs: int = EPOCHS) -> ScaleRun:
    fed = f"bench-scale-{n}-{os.getpid()}"
    state = work / f"state-{n}"
    sampler = TreeSampler(classify, interval=0.5, limit_bytes=limit).start()
    broker = LocalBroker(workdir=work / f"broker-{n}", overrides={"sys_interval": "1"}).start()
    mon = Monitor(fed)
    loop = Loop()
    mconn = Connection(loop, BrokerConfig(host=broker.host, port=broker.port), f"bench-monitor-{os.getpid()}", mon)
    mconn.open()
    loop.start(name="bench-monitor")
    sel = f"fraction = {fraction}" if fraction else "agents_per_round = 0"
    conf = work / f"agg-{n}.toml"
    conf.write_text(f"""
federation = "{fed}"
rounds = {rounds + WARMUP}
state_dir = "{state}"
[model]
kind = "mlp"
n_features = {N_FEATURES}
n_outputs = 10
hidden = [{HIDDEN}]
[training]
epochs = {epochs}
batch_size = {BATCH}
lr = {LR}
[round]
min_agents = {n}
{sel}
timeout = {timeout}
[broker]
host = "{broker.host}"
port = {broker.port}
""")
    fedmqtt = str(REPO / ".venv" / "bin" / "fedmqtt")
    ps: list[subprocess.Popen] = []
    t0 = time.time()
    try:
        agg = subprocess.Popen([fedmqtt, "aggregator", "--config", str(conf)], stdout=subprocess.DEVNULL,
                               stderr=open(work / f"aggregator-{n}.log", "w"), preexec_fn=limit_address_space(as_gib))
        ps.append(agg)
        sim = subprocess.Popen([fedmqtt, "sim", "--federation", fed, "--agents", str(n), "--dataset", "synthetic",
                                "--alpha", "0.5", "--beta", "0.5", "--seed", "0", "--procs", str(procs),
                                "--exit-when-done", "--broker", broker.address],
                               stdout=subprocess.DEVNULL, stderr=open(work / f"sim-{n}.log", "w"),
                               preexec_fn=limit_address_space(as_gib))
        ps.append(sim)
        deadline = time.monotonic() + timeout * (rounds + WARMUP) + 600
        while agg.poll() is None:
            if sampler.over_limit or time.monotonic() > deadline or sim.poll() not in (None, 0):
                why = ("the sum of RSS passed the limit" if sampler.over_limit else
                       "timeout" if time.monotonic() > deadline else f"sim exited {sim.returncode}")
                kill_tree([p.pid for p in ps])
                raise RuntimeError(f"{n} agents: stopped ({why}); logs in {work}")
            time.sleep(0.2)
        end = time.monotonic() + 60
        while sim.poll() is None and time.monotonic() < end:
            time.sleep(0.2)
    finally:
        kill_tree([p.pid for p in ps if p.poll() is None])
        loop.stop()
        if loop.thread is not None:
            loop.thread.join(10)
        broker.close()
        sampler.stop()
    if agg.returncode != 0:
        raise RuntimeError(f"{n} agents: aggregator exit {agg.returncode}; see {work}/aggregator-{n}.log")
    hist = checkpoint.load(state)["history"]
    counted = [h for h in hist if h["round"] > WARMUP]
    w0, w1 = counted[0]["opened_at"], counted[-1]["closed_at"]
    k = len(counted)
    roles = ("agents", "aggregator", "broker")
    sizes = {name: (statistics.median(v) if v else 0) for name, v in mon.sizes.items()}
    sysb = mon.sys_between(w0, w1)
    return ScaleRun(
        agents=n, procs=procs, selected=[h["selected"] for h in counted], seconds=[h["closed_at"] - h["opened_at"] for h in counted],
        startup=hist[0]["opened_at"] - t0,
        cpu_agents=sampler.cpu_between("agents", w0, w1) / k,
        cpu_aggregator=sampler.cpu_between("aggregator", w0, w1) / k,
        cpu_broker=sampler.cpu_between("broker", w0, w1) / k,
        rss_peak={r: sampler.peak_role(r) for r in roles},
        rss_mean={r: sampler.mean_rss_between(r, w0, w1) for r in roles},
        sizes={k2: int(v) for k2, v in sizes.items()},
        sys_bytes_round=None if sysb is None else sysb // k,
        notes=[f"participants {[h['participants'] for h in counted]}"]
        if any(h["participants"] != h["selected"] for h in counted) else [],
    )


# --------------------------------------------------------------------------
# the broker-only floor


class FloorClient:
    """One device of the floor: answers model + task of round r with one update-sized message."""

    def __init__(self, fed: str, cid: str, update_size: int, stop: threading.Event, loop: Loop) -> None:
        self.fed, self.cid, self.stop, self.loop = fed, cid, stop, loop
        self.filler = os.urandom(max(0, update_size - 9))
        self.seen: dict[int, set[str]] = {}

    def subscriptions(self) -> list[str]:
        return [f"fl/{self.fed}/model", f"fl/{self.fed}/task"]

    def on_connected(self, conn: Connection) -> None:
        conn.publish(Publish(f"fl/{self.fed}/hello/{self.cid}", b"hi", qos=1))

    def on_message(self, conn: Connection, topic: str, payload: bytes, props) -> None:
        if payload[:4] == b"STOP":
            self.stop.set()
            return
        r = int(payload[1:9])
        kinds = self.seen.setdefault(r, set())
        kinds.add(topic.rsplit("/", 1)[1])
        if len(kinds) == 2:
            del self.seen[r]
            conn.publish(Publish(f"fl/{self.fed}/update/{self.cid}", b"R%08d" % r + self.filler, qos=1))


def floor_worker(host: str, port: int, fed: str, ids: list[str], update_size: int) -> None:
    loop = Loop()
    stop = threading.Event()
    b = BrokerConfig(host=host, port=port)
    for cid in ids:
        Connection(loop, b, cid, FloorClient(fed, cid, update_size, stop, loop)).open()
    loop.start(name="floor")
    while not stop.wait(0.2):
        pass
    time.sleep(0.5)
    loop.stop()
    if loop.thread is not None:
        loop.thread.join(10)


class FloorCoordinator:
    def __init__(self, fed: str, n: int, rounds: int, model: int, task: int) -> None:
        self.fed, self.n, self.rounds = fed, n, rounds
        self.model, self.task = os.urandom(max(0, model - 9)), os.urandom(max(0, task - 9))
        self.hellos: set[str] = set()
        self.round = 0
        self.got = 0
        self.t_open = 0.0
        self.seconds: list[float] = []
        self.opened_wall: list[float] = []
        self.done = threading.Event()
        self.conn: Connection | None = None

    def subscriptions(self) -> list[str]:
        return [f"fl/{self.fed}/hello/+", f"fl/{self.fed}/update/+"]

    def on_connected(self, conn: Connection) -> None:
        self.conn = conn

    def _open(self) -> None:
        self.round += 1
        self.got = 0
        self.t_open = time.perf_counter()
        self.opened_wall.append(time.time())
        tag = b"R%08d" % self.round
        self.conn.publish(Publish(f"fl/{self.fed}/model", tag + self.model, qos=1, retain=True))
        self.conn.publish(Publish(f"fl/{self.fed}/task", tag + self.task, qos=1, retain=True))

    def on_message(self, conn: Connection, topic: str, payload: bytes, props) -> None:
        if "/hello/" in topic:
            self.hellos.add(topic.rsplit("/", 1)[1])
            if len(self.hellos) == self.n and self.round == 0:
                self._open()
            return
        if int(payload[1:9]) != self.round:
            return
        self.got += 1
        if self.got == self.n:
            self.seconds.append(time.perf_counter() - self.t_open)
            self.opened_wall.append(time.time())
            if self.round >= self.rounds:
                conn.publish(Publish(f"fl/{self.fed}/task", b"STOP", qos=1, retain=True))
                self.done.set()
            else:
                self._open()


@dataclass
class FloorRun:
    agents: int
    seconds: list[float]
    cpu_clients: float
    cpu_broker: float

    @property
    def s_round(self) -> float:
        return statistics.median(self.seconds)


def floor_classify(pid: int, cmd: str) -> str:
    if "mosquitto" in cmd:
        return "broker"
    return "clients"


def run_floor(n: int, procs: int, rounds: int, sizes: dict[str, int], work: Path, limit: int) -> FloorRun:
    from aggregator.sim import shards

    fed = f"bench-floor-{n}-{os.getpid()}"
    sampler = TreeSampler(floor_classify, interval=0.2, limit_bytes=limit).start()
    broker = LocalBroker(workdir=work / f"floor-broker-{n}").start()
    coord = FloorCoordinator(fed, n, rounds + WARMUP, sizes["model"], sizes["task"])
    loop = Loop()
    Connection(loop, BrokerConfig(host=broker.host, port=broker.port), f"floor-coordinator-{os.getpid()}", coord).open()
    loop.start(name="floor-coordinator")
    ctx = multiprocessing.get_context("spawn")
    ids = [f"floor-{i:05d}" for i in range(n)]
    workers = [ctx.Process(target=floor_worker, args=(broker.host, broker.port, fed, [ids[i] for i in block],
                                                      sizes["update"]), daemon=True)
               for block in shards(n, procs)]
    try:
        for w in workers:
            w.start()
        if not coord.done.wait(600):
            raise RuntimeError(f"floor {n}: rounds did not finish ({len(coord.hellos)} hellos, round {coord.round})")
        for w in workers:
            w.join(20)
    finally:
        for w in workers:
            if w.is_alive():
                w.kill()
        loop.stop()
        if loop.thread is not None:
            loop.thread.join(10)
        broker.close()
        sampler.stop()
    w0, w1 = coord.opened_wall[WARMUP], coord.opened_wall[-1]
    k = len(coord.seconds) - WARMUP
    return FloorRun(n, coord.seconds[WARMUP:], sampler.cpu_between("clients", w0, w1) / k,
                    sampler.cpu_between("broker", w0, w1) / k)


# --------------------------------------------------------------------------
# output


def print_scale(runs: list[ScaleRun], fraction: float) -> None:
    print(f"\n{'N':>6} {'selected':>8} {'s/round':>8} {'best':>7} {'s/agent':>9} {'start-up s':>10} "
          f"{'agent CPU ms/agent/round':>24} {'aggr CPU s/rnd':>14} {'broker CPU s/rnd':>16}")
    for r in runs:
        print(f"{r.agents:>6,} {statistics.median(r.selected):>8,.0f} {r.s_round:>8.3f} {min(r.seconds):>7.3f} "
              f"{r.s_round / r.agents * 1e3:>7.3f}ms {r.startup:>10.1f} "
              f"{r.cpu_agents / r.agents * 1e3:>24.3f} {r.cpu_aggregator:>14.3f} {r.cpu_broker:>16.3f}"
              + (f"  [{'; '.join(r.notes)}]" if r.notes else ""))
    print(f"\n{'N':>6} {'model B':>8} {'task B':>8} {'update B':>9} {'down/dev B':>10} {'up/dev B':>9} "
          f"{'wire/dev B':>10} {'$SYS in+out/N B':>15}")
    for r in runs:
        s = r.sizes
        down = s["model"] + s["task"]
        wire = (wire_bytes("fl/x/model", s["model"]) + wire_bytes("fl/x/task", s["task"])
                + wire_bytes("fl/x/update/agent-000", s["update"]) + 3 * PUBACK)
        sysb = f"{r.sys_bytes_round / r.agents:>15,.0f}" if r.sys_bytes_round else f"{'n/a':>15}"
        print(f"{r.agents:>6,} {s['model']:>8,} {s['task']:>8,} {s['update']:>9,} {down:>10,} {s['update']:>9,} "
              f"{wire:>10,} {sysb}")
    print(f"\n{'N':>6} {'agents RSS MiB':>14} {'per agent KiB':>13} {'aggregator MiB':>14} {'broker MiB':>10}   (peak; mean over the counted rounds)")
    for r in runs:
        p, m = r.rss_peak, r.rss_mean
        print(f"{r.agents:>6,} {fmt_mib(p['agents']):>14} {m['agents'] / r.agents / 1024:>13,.0f} "
              f"{fmt_mib(p['aggregator']):>14} {fmt_mib(p['broker']):>10}   "
              f"(mean {fmt_mib(m['agents'])} / {fmt_mib(m['aggregator'])} / {fmt_mib(m['broker'])})")
    sel = f"a fraction {fraction} of the online agents (x1.3 over-selection)" if fraction else "every agent every round"
    print(f"(selection: {sel}; {len(runs[0].seconds)} counted rounds after {WARMUP} warm-up; s/round: median "
          "RoundSummary.seconds; CPU from /proc over the counted rounds; down = model + task payloads, up = one "
          "update; wire adds MQTT framing and PUBACKs; $SYS: broker bytes received + sent per round / N)")
    if len(runs) >= 2:
        xs = [r.agents for r in runs]
        ys = [r.s_round for r in runs]
        mx, my = statistics.fmean(xs), statistics.fmean(ys)
        b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sum((x - mx) ** 2 for x in xs)
        a = my - b * mx
        print(f"\nlinear fit s/round = {a:.4f} + {b * 1e3:.4f} ms x N")
        for x, y in zip(xs, ys):
            fit = a + b * x
            print(f"  N = {x:>6,}: measured {y:.3f} s, line {fit:.3f} s, {(y - fit) / fit:+.1%} from the line; "
                  f"{y / x * 1e3:.3f} ms per agent")
        first = runs[0]
        for r in runs[1:]:
            grow = r.agents / first.agents
            print(f"  x{grow:,.0f} agents (N = {first.agents:,} -> {r.agents:,}): s/round x{r.s_round / first.s_round:.1f}, "
                  f"task bytes x{r.sizes['task'] / max(first.sizes['task'], 1):.1f}, "
                  f"agent CPU per agent x{(r.cpu_agents / r.agents) / (first.cpu_agents / first.agents):.2f}")


def print_floor(fl: FloorRun, fm: ScaleRun | None) -> None:
    print(f"\nbroker-only floor, N = {fl.agents}: {fl.s_round:.4f} s/round (median of {len(fl.seconds)}, best "
          f"{min(fl.seconds):.4f}); client CPU {fl.cpu_clients:.3f} s/round, broker CPU {fl.cpu_broker:.3f} s/round")
    if fm is not None:
        print(f"fedmqtt round, N = {fm.agents}: {fm.s_round:.4f} s/round (best {min(fm.seconds):.4f}); "
              f"ratio fedmqtt / floor = {fm.s_round / fl.s_round:.1f}x (median), {min(fm.seconds) / min(fl.seconds):.1f}x (best)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--agents", type=int, nargs="+", default=[100, 1000, 10000])
    p.add_argument("--rounds", type=int, default=3, help="counted rounds per N, after 1 warm-up (default 3)")
    p.add_argument("--procs", type=int, default=0, help="sim worker processes (default 0: one per core)")
    p.add_argument("--fraction", type=float, default=0.0, help="select this fraction per round (default 0: all)")
    p.add_argument("--epochs", type=int, default=EPOCHS,
                   help=f"local epochs (default {EPOCHS}; 0: protocol only, each agent sends a zero delta at once)")
    p.add_argument("--timeout", type=float, default=600.0, help="round deadline, s (default 600)")
    p.add_argument("--floor", action="store_true", help="also the broker-only floor at --floor-agents")
    p.add_argument("--floor-only", action="store_true", help="only the floor (and the fedmqtt round it is compared with)")
    p.add_argument("--floor-agents", type=int, default=100)
    p.add_argument("--floor-rounds", type=int, default=10)
    p.add_argument("--as-limit-gib", type=float, default=8.0, help="ulimit -v of every process (GiB, 0: none)")
    p.add_argument("--rss-limit-gib", type=float, default=16.0, help="stop a run whose sum of RSS passes this")
    a = p.parse_args()
    procs = a.procs or (os.cpu_count() or 1)
    limit = int(a.rss_limit_gib * GiB)
    nofile = raise_nofile()
    import aggregator

    print(machine_line())
    print(f"fedmqtt code measured: {Path(aggregator.__file__).parents[1]}; open files limit {nofile}; "
          f"model MLP {N_FEATURES}->{HIDDEN}->10 = {n_params():,} parameters, E = {a.epochs}; sim --procs {procs}")
    agents = [a.floor_agents] if a.floor_only else a.agents
    if max(agents) + 100 > nofile:
        print(f"WARNING: {max(agents):,} connections need more than the open-files limit {nofile}")
    work = Path(tempfile.mkdtemp(prefix="fedmqtt-bench-scale-"))
    t_all = time.perf_counter()
    runs: list[ScaleRun] = []
    for n in agents:
        try:
            r = run_scale(n, procs, a.rounds, a.fraction, work, a.as_limit_gib, limit, a.timeout, a.epochs)
        except RuntimeError as exc:
            print(f"N = {n:,}: not measured: {exc}", flush=True)
            continue
        runs.append(r)
        print(f"N = {n:,}: {r.s_round:.3f} s/round {r.seconds}, start-up {r.startup:.1f} s", flush=True)
    if runs:
        print_scale(runs, a.fraction)
    if a.floor or a.floor_only:
        fm = next((r for r in runs if r.agents == a.floor_agents), None)
        if fm is None:
            print(f"\nfloor: no fedmqtt run at N = {a.floor_agents} to take the sizes from")
        else:
            fl = run_floor(a.floor_agents, procs, a.floor_rounds, fm.sizes, work, limit)
            print(f"\nfloor payloads (from the fedmqtt run): model {fm.sizes['model']:,} B and task "
                  f"{fm.sizes['task']:,} B retained to all, one {fm.sizes['update']:,} B answer per client")
            print_floor(fl, fm)
    print(f"\nlogs: {work}\ntotal {time.perf_counter() - t_all:.0f} s")


if __name__ == "__main__":
    main()
