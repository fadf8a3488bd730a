"""Ingest throughput of 1M-parameter updates: the flat aggregator vs 1, 2 and 4 ingest workers.

What is measured: how fast one aggregator host takes in a round of
single-packet updates of a 1,000,010-parameter model (``[model] kind =
"softmax", n_features = 100000, n_outputs = 10``: W0 100000x10 + b0 10
float32, about 4 MB per update) with ``[workers] count = N, spawn = true``
for N = 1, 2, 4 (the broker splits ``$share/<group>/fl/<fed>/update/+``
between N ``fedmqtt worker`` processes, each decoding, checking, claiming,
journaling and summing its share; aggregator/ingest/worker.py), against
the flat aggregator (N = 0: it reads every update itself), the baseline,
measured in the same run.

Per configuration: a fresh private mosquitto (aggregator.broker.LocalBroker,
the repo's mosquitto.conf: max_packet_size 32 MiB, so an update is one
packet) and a fresh state_dir; ``python -m fedmqtt aggregator --config
<toml>`` as a real subprocess with ``[onnx] every = 0`` (the export would
dominate with this model), no test_data, ``[round] min_agents = K,
agents_per_round = K, quorum = K, timeout = 600``, ``rounds = R``,
``[security] probe_open_broker = false``, shipped defaults otherwise
(FedAvg, journal and checkpoint every round). The bench process plays K
fake agents (they do not train): K retained online statuses (capabilities
["softmax"], eligible), published once every worker's retained status
says online (the coordinator opens a round as soon as one worker is
online, and the first rounds would otherwise go to the first worker that
connected), then per round it waits for the retained task of that round in
state "open", pre-encodes the K updates (``wire.UpdateMsg`` on the task's
base, num_samples uniform in 20..400 from the same seed in every
configuration, agent i re-encoding the (i mod 8)-th of 8 sets of small
random float32 deltas built once) and, from the first publish, sends
them at QoS 1 from ``--publishers`` paho clients (MQTT 5, in-flight window
64), and stops the clock when the retained ``metrics`` message of that
round arrives (which the aggregator publishes after folding, checkpointing
and publishing the new model). updates/s = K / that time, MB/s = update
bytes / that time; the median over the R rounds is the figure, every round
is printed too (none dropped). Peak RSS is the largest sampled sum over the
aggregator and its workers (/proc, every 0.2 s, bench/_procs.py); CPU is
theirs (and the broker's) per round, from the same samples. As a check,
each configuration's final model (its checkpoint) is compared with the
flat aggregator's: the same updates, so the same model up to float32
rounding of the workers' partial means.

Broker-only floor, same run: the same K payloads (same sizes, same
publishers, same client settings) through a fresh mosquitto of the same
config to one plain paho subscriber (QoS 1, MQTT 5, its own process, acks
every message, counts them): first publish to its K-th message, R times.
That is the ceiling the broker and this publisher allow one reader on this
machine, with no decoding, journaling or summing; with N workers the broker
writes to N sockets read by N processes, so a configuration can pass it.

A round's K updates are all in flight at once (a burst, as when a fleet's
devices finish training together); a configuration whose round is
abandoned or stalls is reported INCOMPLETE with the aggregator's log tail,
and broker lines saying it dropped messages for a client are printed
(``--keep DIR`` keeps the logs, broker and state directories). This is how
two defects of the first worker were found: a deadlock (a worker held each
update's ack until its grant, which filled its 32-message window and kept
the grants out) and lost updates (with that window, a burst of more than
~64 updates of 4 MB waited in the broker's per-client queue, which
mosquitto caps at max_queued_bytes, and was dropped there).

Everything (broker, publishers, aggregator, workers) shares this machine's
cores: with 2 cores more workers than cores compete with the broker and the
publishers, so read the ratios, and the floor, not the absolute figures.

Run::

    ulimit -v 16000000; timeout 900 .venv/bin/python bench/bench_workers.py [--workers 0,1,2,4] [--updates 64] [--rounds 3] [--params 100000]

Quick check: ``.venv/bin/python bench/bench_workers.py --params 1000 --updates 16 --rounds 2``.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import queue
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
import paho.mqtt.client as paho  # noqa: E402
from paho.mqtt.enums import CallbackAPIVersion  # noqa: E402
from paho.mqtt.subscribeoptions import SubscribeOptions  # noqa: E402

from _common import machine_line  # noqa: E402
from _procs import TreeSampler, cmdline, fmt_mib, kill_tree  # noqa: E402
from aggregator.broker import LocalBroker  # noqa: E402
from aggregator import checkpoint  # noqa: E402
from aggregator.ingest import wire as iw  # noqa: E402
from edge_agent import wire  # noqa: E402
from edge_agent.spec import ModelSpec  # noqa: E402
from edge_agent.topics import Topics  # noqa: E402

# paho's default in-flight window is 20 QoS 1 messages per client; a round's
# updates are all queued at once, so let them all go.
INFLIGHT = 64
CONNECT_TIMEOUT_S = 30.0
# How long the aggregator may take to exit after its last round before it is killed.
EXIT_WAIT_S = 30.0
SAMPLE_INTERVAL_S = 0.2
N_OUTPUTS = 10
AGG_ROLES = {"aggregator", "worker"}
# Distinct delta sets the fake agents send (agent i: set i mod this).
DELTA_VARIANTS = 8


# --------------------------------------------------------------------------
# MQTT clients of the bench process


def _client(cid: str) -> paho.Client:
    c = paho.Client(CallbackAPIVersion.VERSION2, client_id=cid, protocol=paho.MQTTv5)
    c.max_inflight_messages_set(INFLIGHT)
    c.max_queued_messages_set(0)  # unbounded: a whole round is queued up front
    return c


def _connect(c: paho.Client, port: int, subs: list[str] = ()) -> paho.Client:
    """Connect (clean start), start its network thread, subscribe to ``subs`` at QoS 1; wait for it all."""
    ready = threading.Event()

    def on_connect(client, _u, _flags, rc, _props) -> None:
        if rc.is_failure:
            return
        if subs:
            client.subscribe([(s, SubscribeOptions(qos=1)) for s in subs])
        else:
            ready.set()

    c.on_connect = on_connect
    c.on_subscribe = lambda *_a: ready.set()
    c.connect("127.0.0.1", port, clean_start=True)
    c.loop_start()
    if not ready.wait(CONNECT_TIMEOUT_S):
        c.loop_stop()
        raise RuntimeError(f"no CONNACK/SUBACK from 127.0.0.1:{port} within {CONNECT_TIMEOUT_S:g} s")
    return c


def _close(clients: list[paho.Client]) -> None:
    for c in clients:
        try:
            c.disconnect()
            c.loop_stop()
        except Exception:  # noqa: BLE001 - cleanup of a client that may never have connected
            pass


class Observer:
    """The retained task and metrics of one federation, as they come (times from ``time.perf_counter``)."""

    def __init__(self, fed: str, port: int) -> None:
        self.fed = fed
        self.topics = Topics(fed)
        self.cond = threading.Condition()
        self.task: wire.TaskMsg | None = None
        self.metrics: dict[int, tuple[float, wire.MetricsMsg]] = {}
        self.errors: list[str] = []
        self.ingest = iw.IngestTopics(self.topics)
        self.ingest_status = f"{self.ingest.base}/+/status"
        self.workers_online: set[int] = set()
        self.client = _client(f"bench-observer-{os.getpid()}")
        self.client.on_message = self._on_message
        _connect(self.client, port, [self.topics.task, self.topics.metrics, self.ingest_status])

    def _on_message(self, _c, _u, m) -> None:
        t = time.perf_counter()
        if not m.payload:
            return
        try:
            if m.topic == self.topics.task:
                task = wire.decode(m.payload, expect="task", fed=self.fed)
                with self.cond:
                    self.task = task
                    self.cond.notify_all()
            elif self.ingest.parse(m.topic)[0] == "status":
                st = wire.decode(m.payload, expect="status", fed=self.fed)
                worker = self.ingest.parse(m.topic)[1]
                with self.cond:
                    (self.workers_online.add if st.state == "online" else self.workers_online.discard)(worker)
                    self.cond.notify_all()
            elif m.topic == self.topics.metrics:
                msg = wire.decode(m.payload, expect="metrics", fed=self.fed)
                with self.cond:
                    self.metrics.setdefault(msg.round, (t, msg))
                    self.cond.notify_all()
        except wire.WireError as exc:
            self.errors.append(f"{m.topic}: {exc}")

    def wait(self, pred, until: float) -> bool:
        """Wait for ``pred()`` (called under the lock) until monotonic time ``until``."""
        with self.cond:
            while not pred():
                left = until - time.monotonic()
                if left <= 0:
                    return False
                self.cond.wait(min(left, 1.0))
            return True

    def close(self) -> None:
        _close([self.client])


def publish_round(pubs: list[paho.Client], payloads: list[tuple[str, bytes]]) -> list[paho.MQTTMessageInfo]:
    """Queue every payload at QoS 1, spread round-robin over the publishers (their threads send them)."""
    return [pubs[i % len(pubs)].publish(topic, body, qos=1) for i, (topic, body) in enumerate(payloads)]


def wait_acked(infos: list[paho.MQTTMessageInfo], until: float) -> bool:
    for info in infos:
        left = until - time.monotonic()
        if left <= 0:
            return False
        try:
            info.wait_for_publish(left)
        except (RuntimeError, ValueError):
            return False
        if not info.is_published():
            return False
    return True


# --------------------------------------------------------------------------
# the fake agents' updates


def make_deltas(n_features: int, seed: int = 0, variants: int = DELTA_VARIANTS) -> list[dict[str, np.ndarray]]:
    """A few sets of small random float32 deltas of the softmax spec's shapes, built once.

    Agent i sends set i mod ``variants`` (re-encoded per agent): distinct enough
    that the final models of the configurations can be compared.
    """
    rng = np.random.default_rng(seed)
    shapes = ModelSpec("softmax", n_features, N_OUTPUTS).param_shapes()
    return [{k: (rng.standard_normal(s, dtype=np.float32) * np.float32(1e-3)) for k, s in shapes.items()}
            for _ in range(variants)]


def encode_round(fed: str, rnd: int, base: str, agents: list[str], deltas: list[dict[str, np.ndarray]],
                 rng: np.random.Generator, topic_of) -> list[tuple[str, bytes]]:
    out = []
    for i, agent in enumerate(agents):
        msg = wire.UpdateMsg(fed=fed, round=rnd, agent=agent, base=base, num_samples=int(rng.integers(20, 401)),
                             delta=deltas[i % len(deltas)], metrics={"train_loss": float(rng.uniform(0.1, 2.0))})
        out.append((topic_of(agent), wire.encode(msg)))
    return out


# --------------------------------------------------------------------------
# results


@dataclass
class Result:
    name: str
    workers: int | None  # None: the broker-only floor
    seconds: list[float] = field(default_factory=list)  # per round, first publish -> metrics (or K-th message)
    nbytes: list[int] = field(default_factory=list)  # update bytes per round
    agg_seconds: list[float] = field(default_factory=list)  # the aggregator's own round time (open -> close)
    participants: list[int] = field(default_factory=list)
    cpu_agg: list[float] = field(default_factory=list)  # CPU s of aggregator + workers per round
    cpu_broker: list[float] = field(default_factory=list)
    peak_rss: int = 0  # aggregator + workers
    peak_by_role: dict[str, int] = field(default_factory=dict)
    peak_broker: int = 0
    startup: float = 0.0  # aggregator start -> round 1 open
    workers_up: float = 0.0  # aggregator start -> every worker's retained status online
    rejected: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    log_lines: list[str] = field(default_factory=list)  # WARNING/ERROR lines of aggregator + workers
    incomplete: str = ""
    max_one_worker: int = 0  # the largest RSS any one worker reached
    final: dict[str, np.ndarray] | None = None  # the final global model (checkpoint)

    def ups(self, k: int) -> float:
        return k / statistics.median(self.seconds) if self.seconds else float("nan")

    def mbps(self) -> float:
        if not self.seconds:
            return float("nan")
        return statistics.median(b / s for b, s in zip(self.nbytes, self.seconds)) / 1e6


class Classify:
    """Roles for TreeSampler. A worker between fork and exec still shows the aggregator's command line, and
    TreeSampler keeps the first role it is told: only the pid we started is "aggregator"; a process with
    that command line and another pid is "other" (asked again on the next sample)."""

    def __init__(self) -> None:
        self.aggregator_pid = -1

    def __call__(self, pid: int, cmd: str) -> str:
        if "mosquitto" in cmd:
            return "broker"
        if pid == self.aggregator_pid:
            return "aggregator"
        if "fedmqtt worker" in cmd:
            return "worker"
        return "other"


def write_config(path: Path, fed: str, port: int, state: Path, n_features: int, k: int, rounds: int,
                 workers: int) -> None:
    path.write_text(f"""federation = "{fed}"
rounds = {rounds}
state_dir = "{state}"
test_data = ""
[model]
kind = "softmax"
n_features = {n_features}
n_outputs = {N_OUTPUTS}
[training]
epochs = 1
batch_size = 32
lr = 0.1
[round]
min_agents = {k}
agents_per_round = {k}
quorum = {k}
timeout = 600.0
[onnx]
every = 0
[security]
probe_open_broker = false
[workers]
count = {workers}
spawn = true
[broker]
host = "127.0.0.1"
port = {port}
""")


def _log_problems(path: Path, limit: int = 8) -> list[str]:
    try:
        lines = path.read_text(errors="replace").splitlines()
    except OSError:
        return []
    bad = [ln for ln in lines if " WARNING " in ln or " ERROR " in ln or "Traceback" in ln or "error:" in ln]
    return bad[:limit] + ([f"... and {len(bad) - limit} more"] if len(bad) > limit else [])


def _broker_problems(path: Path) -> list[str]:
    try:
        return [ln for ln in path.read_text(errors="replace").splitlines() if "dropped" in ln or "rror" in ln][:5]
    except OSError:
        return []


def _tail(path: Path, n: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


# --------------------------------------------------------------------------
# one configuration: the aggregator with N workers (0: flat)


def run_workers(n_workers: int, a: argparse.Namespace, deltas: list[dict[str, np.ndarray]], work: Path) -> Result:
    name = "flat (workers = 0)" if n_workers == 0 else f"{n_workers} worker{'s' if n_workers > 1 else ''}"
    res = Result(name, n_workers)
    k, rounds = a.updates, a.rounds
    fed = f"benchw{n_workers}"
    topics = Topics(fed)
    agents = [f"agent-{i:03d}" for i in range(k)]
    rng = np.random.default_rng(1000)  # the same sample counts in every configuration: the same final model
    cdir = work / f"workers-{n_workers}"
    cdir.mkdir()
    conf, log_path = cdir / "aggregator.toml", cdir / "aggregator.log"
    deadline = time.monotonic() + a.timeout
    roles = Classify()
    sampler = TreeSampler(roles, interval=SAMPLE_INTERVAL_S).start()
    broker = LocalBroker(workdir=cdir / "broker")
    agg: subprocess.Popen | None = None
    observer: Observer | None = None
    pubs: list[paho.Client] = []
    windows: list[tuple[float, float]] = []
    try:
        broker.start()
        write_config(conf, fed, broker.port, cdir / "state", a.params, k, rounds, n_workers)
        observer = Observer(fed, broker.port)
        pubs = [_connect(_client(f"bench-pub-{i}-{os.getpid()}"), broker.port) for i in range(a.publishers)]
        t_start = time.monotonic()
        with open(log_path, "wb") as logf:
            agg = subprocess.Popen([sys.executable, "-m", "fedmqtt", "aggregator", "--config", str(conf)],
                                   cwd=REPO, stdout=logf, stderr=subprocess.STDOUT, start_new_session=True)
        roles.aggregator_pid = agg.pid
        # The coordinator opens a round as soon as one worker is online: the agents come online only when
        # all N are, so that every round is split over N workers.
        ok = observer.wait(lambda: len(observer.workers_online) >= n_workers or agg.poll() is not None, deadline)
        if agg.poll() is not None:
            raise RuntimeError(f"the aggregator exited with {agg.returncode} before its workers were online")
        if not ok:
            raise RuntimeError(f"workers online {sorted(observer.workers_online)} of {n_workers} in time")
        res.workers_up = time.monotonic() - t_start
        statuses = [pubs[0].publish(topics.status(ag), wire.encode(wire.StatusMsg(
            fed=fed, round=0, agent=ag, state="online", num_samples=200, capabilities=["softmax"],
            software="bench_workers", eligible=True)), qos=1, retain=True) for ag in agents]
        if not wait_acked(statuses, deadline):
            raise RuntimeError("the agents' statuses were not acknowledged")
        for rnd in range(1, rounds + 1):
            ok = observer.wait(lambda: (observer.task is not None and observer.task.round == rnd
                                        and observer.task.state == "open") or agg.poll() is not None, deadline)
            if agg.poll() is not None:
                raise RuntimeError(f"the aggregator exited with {agg.returncode} before round {rnd} opened")
            if not ok:
                raise RuntimeError(f"round {rnd} did not open within the {a.timeout:g} s of this configuration")
            if rnd == 1:
                res.startup = time.monotonic() - t_start
            task = observer.task
            payloads = encode_round(fed, rnd, task.base, agents, deltas, rng, topics.update)
            nbytes = sum(len(p) for _, p in payloads)
            w0 = time.time()
            t0 = time.perf_counter()
            infos = publish_round(pubs, payloads)
            # A new attempt of this round means the aggregator abandoned the one these updates were for
            # (the fake agents do not send again): stop here rather than wait for the timeout.
            observer.wait(lambda: rnd in observer.metrics or agg.poll() is not None
                          or (observer.task.round, observer.task.attempt) != (rnd, task.attempt), deadline)
            if rnd not in observer.metrics:
                now = observer.task
                why = (f"the aggregator exited with {agg.returncode}" if agg.poll() is not None else
                       f"the aggregator abandoned attempt {task.attempt} and opened attempt {now.attempt}"
                       if (now.round, now.attempt) != (rnd, task.attempt) else "timeout")
                raise RuntimeError(f"round {rnd}: no metrics ({why}) after {time.perf_counter() - t0:.1f} s")
            t1, m = observer.metrics[rnd]
            windows.append((w0, time.time()))
            res.seconds.append(t1 - t0)
            res.nbytes.append(nbytes)
            res.agg_seconds.append(float(m.metrics.get("seconds", float("nan"))))
            res.participants.append(m.participants)
            res.rejected = {kk[len("rejected_"):]: v for kk, v in m.metrics.items() if kk.startswith("rejected_")}
            if not wait_acked(infos, deadline):
                res.notes.append(f"round {rnd}: not every update was acknowledged by the broker")
            del payloads, infos
        try:
            agg.wait(max(1.0, min(EXIT_WAIT_S, deadline - time.monotonic())))
            if agg.returncode != 0:
                res.notes.append(f"the aggregator exited with {agg.returncode} after its last round")
        except subprocess.TimeoutExpired:
            res.notes.append(f"the aggregator had not exited {EXIT_WAIT_S:g} s after its last round (killed)")
    except Exception as exc:  # noqa: BLE001 - reported as an incomplete configuration, the others still run
        res.incomplete = str(exc)
    finally:
        if agg is not None and agg.poll() is None:
            kill_tree([agg.pid])
        sampler.stop()
        # Workers of an aggregator that died are no longer our descendants: end the ones of this config by pid.
        for pid in sampler.role_pids("worker"):
            if str(conf) in cmdline(pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
        if observer is not None:
            res.notes += observer.errors[:3]
            observer.close()
        _close(pubs)
        broker.close()
    res.peak_rss, res.peak_by_role = sampler.peak_total(AGG_ROLES)
    res.peak_broker = sampler.peak_role("broker")
    for w0, w1 in windows:
        res.cpu_agg.append(sum(sampler.cpu_between(r, w0, w1) for r in AGG_ROLES))
        res.cpu_broker.append(sampler.cpu_between("broker", w0, w1))
    res.max_one_worker = sampler.max_rss_of_one("worker")
    res.log_lines = _log_problems(log_path)
    # mosquitto drops what a client's queue cannot hold (max_queued_bytes / max_queued_messages): lost updates.
    res.log_lines += [f"broker: {ln}" for ln in _broker_problems(broker.log_path)]
    if not res.incomplete:
        try:
            state = checkpoint.load(cdir / "state")
            res.final = dict(state["params"]) if state else None
        except (OSError, ValueError) as exc:
            res.notes.append(f"cannot read the final checkpoint: {exc}")
    if res.incomplete:
        res.notes.append(f"aggregator log tail ({log_path}):\n{_tail(log_path)}")
    bad = [p for p in res.participants if p != k]
    if bad:
        res.notes.append(f"participants per round {res.participants}, expected {k}")
    return res


# --------------------------------------------------------------------------
# the broker-only floor


def floor_subscriber(port: int, k: int, ready, stop, out) -> None:
    """A plain QoS 1 subscriber (paho acks each message after on_message): (count, time) every k messages."""
    count = [0]

    def on_message(_c, _u, _m) -> None:
        count[0] += 1
        if count[0] % k == 0:
            out.put((count[0], time.perf_counter()))

    c = _client(f"bench-floor-sub-{os.getpid()}")
    c.on_message = on_message
    _connect(c, port, ["bench/update/+"])
    ready.set()
    stop.wait(3600)
    _close([c])


def run_floor(a: argparse.Namespace, deltas: list[dict[str, np.ndarray]], work: Path) -> Result:
    res = Result("broker only (floor)", None)
    k = a.updates
    agents = [f"agent-{i:03d}" for i in range(k)]
    rng = np.random.default_rng(999)
    deadline = time.monotonic() + a.timeout
    ctx = multiprocessing.get_context("spawn")
    ready, stop, out = ctx.Event(), ctx.Event(), ctx.Queue()
    sampler = TreeSampler(Classify(), interval=SAMPLE_INTERVAL_S).start()
    broker = LocalBroker(workdir=work / "floor-broker")
    sub = None
    pubs: list[paho.Client] = []
    windows: list[tuple[float, float]] = []
    try:
        broker.start()
        sub = ctx.Process(target=floor_subscriber, args=(broker.port, k, ready, stop, out), daemon=True)
        sub.start()
        if not ready.wait(60):
            raise RuntimeError("the floor subscriber did not subscribe")
        pubs = [_connect(_client(f"bench-pub-{i}-{os.getpid()}"), broker.port) for i in range(a.publishers)]
        for rnd in range(1, a.rounds + 1):
            payloads = encode_round("benchfloor", rnd, "floor", agents, deltas, rng, lambda ag: f"bench/update/{ag}")
            nbytes = sum(len(p) for _, p in payloads)
            w0 = time.time()
            t0 = time.perf_counter()
            infos = publish_round(pubs, payloads)
            try:
                count, t1 = out.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                raise RuntimeError(f"repetition {rnd}: the subscriber did not get {k} messages in time") from None
            if count != rnd * k:
                res.notes.append(f"repetition {rnd}: subscriber count {count}, expected {rnd * k}")
            windows.append((w0, time.time()))
            res.seconds.append(t1 - t0)
            res.nbytes.append(nbytes)
            if not wait_acked(infos, deadline):
                res.notes.append(f"repetition {rnd}: not every message was acknowledged by the broker")
            del payloads, infos
    except Exception as exc:  # noqa: BLE001
        res.incomplete = str(exc)
    finally:
        stop.set()
        _close(pubs)
        if sub is not None:
            sub.join(10)
            if sub.is_alive():
                kill_tree([sub.pid])
        sampler.stop()
        broker.close()
    res.peak_broker = sampler.peak_role("broker")
    for w0, w1 in windows:
        res.cpu_broker.append(sampler.cpu_between("broker", w0, w1))
    return res


# --------------------------------------------------------------------------


def _cfg_list(text: str) -> list[int]:
    out = [int(x) for x in text.split(",") if x.strip()]
    if not out or any(n < 0 or n > 64 for n in out):
        raise argparse.ArgumentTypeError(f"expected a comma-separated list of worker counts in 0..64, got {text!r}")
    return out


def print_table(results: list[Result], a: argparse.Namespace) -> None:
    k = a.updates
    flat = next((r for r in results if r.workers == 0 and r.seconds and not r.incomplete), None)
    base = flat.ups(k) if flat else float("nan")
    head = (f"{'configuration':<22} {'updates/s':>9} {'MB/s':>7} {'x flat':>6} {'peak RSS agg+wk MiB':>19} "
            f"{'CPU s/rnd agg+wk':>16} {'broker':>6}  per-round s (first publish -> metrics)")
    print(head)
    print("-" * len(head))
    for r in results:
        ups = r.ups(k)
        ratio = ups / base if base == base and r.seconds else float("nan")
        rss = fmt_mib(r.peak_rss) if r.workers is not None else "-"
        cpu = f"{statistics.mean(r.cpu_agg):.2f}" if r.cpu_agg else "-"
        cpub = f"{statistics.mean(r.cpu_broker):.2f}" if r.cpu_broker else "-"
        rounds = " ".join(f"{s:.2f}" for s in r.seconds) or "-"
        mark = "  INCOMPLETE" if r.incomplete else ""
        print(f"{r.name:<22} {ups:>9.1f} {r.mbps():>7.0f} {ratio:>6.2f} {rss:>19} {cpu:>16} {cpub:>6}  "
              f"{rounds}{mark}")
    print()
    print("details:")
    for r in results:
        print(f"  {r.name}:")
        if r.incomplete:
            print(f"    INCOMPLETE: {r.incomplete}")
        if r.workers is not None:
            roles = ", ".join(f"{role} {fmt_mib(v)}" for role, v in sorted(r.peak_by_role.items()) if role in AGG_ROLES)
            agg_s = " ".join(f"{s:.2f}" for s in r.agg_seconds) or "-"
            up = (f"aggregator start -> all {r.workers} workers online {r.workers_up:.1f} s (the agents' statuses "
                  "are published then), " if r.workers else "aggregator start -> ")
            print(f"    {up}round 1 open {r.startup:.1f} s; the aggregator's own round time (open -> close) {agg_s} s")
            one = f" (largest one worker {fmt_mib(r.max_one_worker)} MiB)" if r.workers else ""
            print(f"    participants per round {r.participants}; peak RSS at the peak sample: {roles or '-'} MiB{one}; "
                  f"broker peak {fmt_mib(r.peak_broker)} MiB")
            if r.workers and flat is not None and flat.final is not None and r.final is not None:
                diff = max(float(np.max(np.abs(r.final[n].astype(np.float64) - flat.final[n]))) for n in flat.final)
                scale = max(float(np.max(np.abs(flat.final[n]))) for n in flat.final)
                print(f"    final model vs flat's (same updates, same sample counts): max |diff| {diff:.3g} "
                      f"(max |param| {scale:.3g})")
            if r.rejected:
                print(f"    rejected (cumulative, last metrics): {r.rejected}")
        else:
            print(f"    broker peak {fmt_mib(r.peak_broker)} MiB")
        for n in r.notes:
            print("    note: " + n.replace("\n", "\n      "))
        for ln in r.log_lines:
            print(f"    log: {ln}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workers", type=_cfg_list, default=[0, 1, 2, 4],
                    help="worker counts to run, comma-separated (0: the flat aggregator, the baseline)")
    ap.add_argument("--updates", type=int, default=64, help="K: agents, and updates per round")
    ap.add_argument("--rounds", type=int, default=3, help="R: rounds per configuration (median reported)")
    ap.add_argument("--params", type=int, default=100_000,
                    help="n_features of the softmax model (x 10 outputs + 10 biases parameters)")
    ap.add_argument("--publishers", type=int, default=2, help="paho clients the updates are spread over")
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds one configuration may take")
    ap.add_argument("--no-floor", action="store_true", help="skip the broker-only floor")
    ap.add_argument("--keep", metavar="DIR", default="",
                    help="keep the logs, configs and state here (a new directory; default: a temporary one, removed)")
    a = ap.parse_args()
    if a.updates < 1 or a.rounds < 1 or a.params < 1 or a.publishers < 1:
        ap.error("--updates, --rounds, --params and --publishers must be >= 1")

    def on_term(signum, _frame):
        raise SystemExit(128 + signum)  # run every finally: (processes killed, brokers stopped)

    signal.signal(signal.SIGTERM, on_term)
    t_begin = time.monotonic()
    print(machine_line())
    print("command: " + shlex.join([os.path.relpath(sys.executable, os.getcwd())
                                     if sys.executable.startswith(os.getcwd()) else sys.executable, *sys.argv]))
    n_params = a.params * N_OUTPUTS + N_OUTPUTS
    deltas = make_deltas(a.params)
    one = len(wire.encode(wire.UpdateMsg("benchw0", 1, "agent-000", "0" * 16, 100, deltas[0])))
    print(f"model softmax {a.params}x{N_OUTPUTS} + {N_OUTPUTS}: {n_params:,} float32 params, update payload "
          f"{one / 1e6:.2f} MB; K = {a.updates} updates/round, R = {a.rounds} rounds, {a.publishers} paho "
          f"publisher(s), QoS 1, MQTT 5, in-flight {INFLIGHT}")
    results: list[Result] = []
    if a.keep:
        Path(a.keep).mkdir(parents=True)
    with tempfile.TemporaryDirectory(prefix="bench-workers-") as tmp:
        work = Path(a.keep) if a.keep else Path(tmp)
        try:
            if not a.no_floor:
                results.append(run_floor(a, deltas, work))
                print(f"  done: {results[-1].name} ({time.monotonic() - t_begin:.0f} s)", flush=True)
            for n in a.workers:
                results.append(run_workers(n, a, deltas, work))
                print(f"  done: {results[-1].name} ({time.monotonic() - t_begin:.0f} s)", flush=True)
        except KeyboardInterrupt:
            print("interrupted: the configurations done so far:")
        print()
        print(f"ingest of {a.updates} updates of {one / 1e6:.2f} MB per round, median of {a.rounds} rounds "
              f"(updates/s = K / (first publish -> the round's metrics message); floor: -> the subscriber's K-th)")
        print_table(results, a)
    print(f"\nelapsed {time.monotonic() - t_begin:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
