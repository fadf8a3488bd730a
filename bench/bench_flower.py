"""fedmqtt beside Flower 1.42 (legacy gRPC) on the same job: s/round, start-up, peak memory, final accuracy.

The job, identical on both sides: digits (sklearn, X/16, 80/20 stratified
split seed 0), softmax regression 64 -> 10 (650 parameters, zero init),
Dirichlet(α = 0.5) partition over N agents built once here with the
project's partition code (``federated_digits(N, "dirichlet", 0.5, 0)``),
E = 5 local epochs, batch 32, lr 0.1, every agent in every round, FedAvg
weighted by sample count, 20 rounds, accuracy of the final global model on
the same central test set (the 20% split). One process per agent on both
sides, all on this machine:

* **fedmqtt**: a private mosquitto (the repo's mosquitto.conf on a free
  loopback port), ``fedmqtt aggregator`` (a TOML written here: the job
  above, ``[round] min_agents = N``, ``test_data`` = the test split, every
  other setting the shipped default: checkpoint every round, journal,
  ONNX export every round) and ``fedmqtt sim --procs N`` (N worker
  processes, one agent each, plus the supervising parent). Agent i trains
  on shard i with seed i.
* **Flower**: ``bench/flower_app.py`` in a separate virtualenv
  (``.bench-venv``, created here if missing, git-ignored: flwr==1.42.0,
  numpy, py-spy): ``flwr.server.start_server`` with ``FedAvg`` (fraction_fit
  1, no federated evaluation, central ``evaluate_fn`` on the test split,
  ``initial_parameters`` zeros) and N ``flwr.client.start_client``
  processes, client i loading shard i from an .npz written here and
  training with ``bench/_softmax_np.py``, which is checked here, before any
  run, to give the same parameters as fedmqtt's agent bit for bit.

Per run:

* **s/round**: median over rounds 2..R of the round-to-round cycle. fedmqtt:
  ``RoundSummary.seconds`` from the aggregator's checkpoint history (a
  round opens at the instant the previous one closes; closes when the N-th
  update is accepted). Flower: from the server's log, round r lasts from its
  fit instructions being ready (every client sampled) to round r+1's (the
  last round: to its aggregated fit results). Both include the aggregation
  and the central evaluation of the previous model.
* **start-up**: launch of the first process (fedmqtt: the broker; Flower:
  the server) to round 1 opening (wall clock).
* **peak memory**: the largest sum of RSS over every process of the side
  (fedmqtt: broker, aggregator, sim parent and workers; Flower: server and
  clients), sampled from /proc every 0.2 s. Shared pages count once per
  process.
* **CPU s/round**: CPU of every process of the side over the counted rounds.
* **final accuracy**: the global model after round R on the test split.

3 alternating repetitions (fedmqtt, Flower, fedmqtt, ...) per N; the table
shows medians and the ratio fedmqtt / Flower. ``--profile``: afterwards,
one more run per side at the largest N with py-spy (from .bench-venv)
sampling the aggregator and one agent worker, the Flower server and one
client; prints where their time goes.

Never Flower's Deployment runtime (SuperLink/SuperNode) or Ray simulation.

Run: ``.venv/bin/python bench/bench_flower.py [--agents 10 50] [--repeat 3] [--rounds 20] [--quick] [--profile]``
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from _common import machine_line
from _procs import GiB, TreeSampler, fmt_mib, kill_tree, limit_address_space
import _softmax_np
from aggregator import checkpoint
from aggregator.broker import LocalBroker, free_port
from aggregator.datasets import federated_digits
from aggregator.sim import agent_seed
from edge_agent.model_api import TrainData
from edge_agent.models import BuiltinModel
from edge_agent.spec import ModelSpec
from edge_agent.training import round_seed
from edge_agent.wire import TrainConfig

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "bench"
BENCH_VENV = REPO / ".bench-venv"
FLWR_VERSION = "1.42.0"
VENV_PACKAGES = [f"flwr=={FLWR_VERSION}", "numpy", "py-spy"]
EPOCHS, BATCH, LR, ALPHA = 5, 32, 0.1, 0.5
RUN_TIMEOUT_S = 900.0


# --------------------------------------------------------------------------
# the bench virtualenv


def ensure_bench_venv(venv: Path) -> Path:
    """The bench venv's python, creating the venv with flwr==1.42.0 if missing (never the project's venv)."""
    py = venv / "bin" / "python"
    probe = [str(py), "-c", "import flwr, numpy; print(flwr.__version__)"]
    if py.exists():
        out = subprocess.run(probe, capture_output=True, text=True)
        if out.returncode == 0 and out.stdout.strip() == FLWR_VERSION:
            return py
    print(f"creating {venv} with {' '.join(VENV_PACKAGES)} ...", flush=True)
    base = getattr(sys, "_base_executable", "") or shutil.which("python3") or "python3"
    subprocess.run([base, "-m", "venv", str(venv)], check=True)
    subprocess.run([str(venv / "bin" / "pip"), "install", "-q", *VENV_PACKAGES], check=True)
    out = subprocess.run(probe, capture_output=True, text=True, check=True)
    if out.stdout.strip() != FLWR_VERSION:
        raise SystemExit(f"{venv}: flwr {out.stdout.strip()} installed, expected {FLWR_VERSION}")
    return py


# --------------------------------------------------------------------------
# the shared data and the training check


def export_shards(n: int, out: Path) -> dict:
    """Write agent-XXX.npz (each agent's shard, as fedmqtt sim builds it) and test.npz; return sizes."""
    data = federated_digits(n, "dirichlet", ALPHA, 0)
    out.mkdir(parents=True, exist_ok=True)
    for i, a in enumerate(data.agents):
        np.savez(out / f"agent-{i:03d}.npz", X=a.X_train, y=a.y_train)
    np.savez(out / "test.npz", X=data.X_test, y=data.y_test)
    sizes = [a.num_samples for a in data.agents]
    return {"train": sum(sizes), "min": min(sizes), "max": max(sizes), "test": len(data.y_test), "data": data}


def check_same_training(data, agents: int = 3) -> float:
    """Max |difference| between fedmqtt's agent training and _softmax_np.fit (rounds 1 and 2, a few agents)."""
    model = BuiltinModel(ModelSpec("softmax", 64, 10))
    worst = 0.0
    for i in range(min(agents, len(data.agents))):
        a = data.agents[i]
        params = model.init_params(0)
        mine = _softmax_np.init_params()
        for r in (1, 2):
            ref, _ = model.fit(params, TrainData(a.X_train, a.y_train, a.num_samples),
                               TrainConfig(epochs=EPOCHS, batch_size=BATCH, lr=LR), round_seed(agent_seed(0, i), r))
            got, _ = _softmax_np.fit(mine, a.X_train, a.y_train, EPOCHS, BATCH, LR, agent_seed(0, i), r)
            worst = max(worst, float(np.abs(ref["W0"] - got[0]).max()), float(np.abs(ref["b0"] - got[1]).max()))
            params, mine = ref, got
    return worst


# --------------------------------------------------------------------------
# one run of one side


@dataclass
class Run:
    side: str  # "fedmqtt" | "flower"
    agents: int
    rep: int
    seconds: list[float]  # rounds 2..R
    startup: float
    peak_rss: int
    peak_parts: dict[str, int]
    cpu_per_round: float
    cpu_parts: dict[str, float]
    accuracy: float
    participants: list[int]
    total_s: float
    notes: list[str] = field(default_factory=list)

    @property
    def s_round(self) -> float:
        return statistics.median(self.seconds)


def classify(pid: int, cmd: str) -> str:
    if "mosquitto" in cmd:
        return "broker"
    if "fedmqtt aggregator" in cmd:
        return "aggregator"
    if "spawn_main" in cmd:
        return "agent"  # a fedmqtt sim worker process (one agent each here)
    if "resource_tracker" in cmd or "fedmqtt sim" in cmd:
        return "sim parent"
    if "flower_app.py server" in cmd:
        return "flower server"
    if "flower_app.py client" in cmd:
        return "flower client"
    if "py-spy" in cmd:
        return "profiler"
    return "other"


SIDE_ROLES = {
    "fedmqtt": {"broker", "aggregator", "agent", "sim parent"},
    "flower": {"flower server", "flower client"},
}


def _wait(procs: list[subprocess.Popen], deadline: float, sampler: TreeSampler, what: str) -> None:
    for p in procs:
        while p.poll() is None:
            if time.monotonic() > deadline or sampler.over_limit:
                kill_tree([q.pid for q in procs])
                why = "the sum of RSS passed the limit" if sampler.over_limit else "timeout"
                raise SystemExit(f"{what}: stopped ({why})")
            time.sleep(0.1)


def _profiler(pyspy: Path | None, pid: int, out: Path, rate: int) -> subprocess.Popen | None:
    if pyspy is None:
        return None
    return subprocess.Popen([str(pyspy), "record", "-p", str(pid), "-r", str(rate), "--idle", "--nonblocking",
                             "-f", "raw", "-o", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def run_fedmqtt(n: int, rounds: int, data_dir: Path, work: Path, rep: int, as_gib: float, limit: int,
                pyspy: Path | None = None, prof_dir: Path | None = None, onnx_every: int = 1) -> Run:
    fed = f"bench-flower-{n}a-r{rep}-{os.getpid()}"
    state = work / f"fm-{n}-{rep}-state"
    sampler = TreeSampler(classify, interval=0.2, limit_bytes=limit).start()
    t0 = time.time()
    broker = LocalBroker(workdir=work / f"fm-{n}-{rep}-broker").start()
    conf = work / f"fm-{n}-{rep}.toml"
    conf.write_text(f"""
federation = "{fed}"
rounds = {rounds}
state_dir = "{state}"
test_data = "{data_dir / 'test.npz'}"
[model]
kind = "softmax"
n_features = 64
n_outputs = 10
[training]
epochs = {EPOCHS}
batch_size = {BATCH}
lr = {LR}
[round]
min_agents = {n}
agents_per_round = 0
timeout = 300.0
[onnx]
every = {onnx_every}
[broker]
host = "{broker.host}"
port = {broker.port}
""")
    fedmqtt = str(REPO / ".venv" / "bin" / "fedmqtt")
    logs = work / f"fm-{n}-{rep}"
    procs: list[subprocess.Popen] = []
    profs: list[subprocess.Popen] = []
    try:
        agg = subprocess.Popen([fedmqtt, "aggregator", "--config", str(conf)], stdout=subprocess.DEVNULL,
                               stderr=open(f"{logs}-aggregator.log", "w"), preexec_fn=limit_address_space(as_gib))
        procs.append(agg)
        sim = subprocess.Popen([fedmqtt, "sim", "--federation", fed, "--agents", str(n), "--dataset", "digits",
                                "--partition", "dirichlet", "--alpha", str(ALPHA), "--seed", "0", "--procs", str(n),
                                "--exit-when-done", "--broker", broker.address],
                               stdout=subprocess.DEVNULL, stderr=open(f"{logs}-sim.log", "w"),
                               preexec_fn=limit_address_space(as_gib))
        procs.append(sim)
        if pyspy is not None and prof_dir is not None:
            profs.append(_profiler(pyspy, agg.pid, prof_dir / f"fedmqtt-aggregator-{n}.txt", 100))
            worker = _first_role(sampler, "agent", 120)
            if worker:
                profs.append(_profiler(pyspy, worker, prof_dir / f"fedmqtt-agent-{n}.txt", 100))
        _wait(procs, time.monotonic() + RUN_TIMEOUT_S, sampler, f"fedmqtt {n} agents")
    finally:
        kill_tree([p.pid for p in procs if p.poll() is None])
        broker.close()
        for p in profs:
            if p is not None:
                p.wait(30)
        sampler.stop()
    total = time.time() - t0
    if agg.returncode != 0 or sim.returncode != 0:
        raise SystemExit(f"fedmqtt {n} agents: aggregator exit {agg.returncode}, sim exit {sim.returncode}; "
                         f"see {logs}-*.log")
    hist = checkpoint.load(state)["history"]
    counted = [h for h in hist if h["round"] >= 2]
    w0, w1 = counted[0]["opened_at"], counted[-1]["closed_at"]
    roles = SIDE_ROLES["fedmqtt"]
    peak, parts = sampler.peak_total(roles)
    cpu_parts = {r: sampler.cpu_between(r, w0, w1) / len(counted) for r in roles}
    return Run("fedmqtt", n, rep, [h["closed_at"] - h["opened_at"] for h in counted], hist[0]["opened_at"] - t0,
               peak, parts, sum(cpu_parts.values()), cpu_parts, hist[-1]["metrics"]["test_accuracy"],
               [h["participants"] for h in hist], total)


def _first_role(sampler: TreeSampler, role: str, timeout: float) -> int | None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        pids = sampler.role_pids(role)
        if pids:
            return min(pids)
        time.sleep(0.2)
    return None


def _wait_port(port: int, proc: subprocess.Popen, timeout: float) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end and proc.poll() is None:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"the Flower server did not listen on {port} (exit {proc.poll()})")


def run_flower(py: Path, n: int, rounds: int, data_dir: Path, work: Path, rep: int, as_gib: float, limit: int,
               pyspy: Path | None = None, prof_dir: Path | None = None) -> Run:
    port = free_port()
    out = work / f"fl-{n}-{rep}.json"
    logs = work / f"fl-{n}-{rep}"
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "PYTHONPATH": str(BENCH)}
    app = str(BENCH / "flower_app.py")
    sampler = TreeSampler(classify, interval=0.2, limit_bytes=limit).start()
    procs: list[subprocess.Popen] = []
    profs: list[subprocess.Popen] = []
    t0 = time.time()
    try:
        server = subprocess.Popen([str(py), app, "server", "--port", str(port), "--agents", str(n), "--rounds",
                                   str(rounds), "--epochs", str(EPOCHS), "--batch-size", str(BATCH), "--lr", str(LR),
                                   "--data", str(data_dir), "--out", str(out)], env=env, stdout=subprocess.DEVNULL,
                                  stderr=open(f"{logs}-server.log", "w"), preexec_fn=limit_address_space(as_gib))
        procs.append(server)
        _wait_port(port, server, 120)
        clog = open(f"{logs}-clients.log", "w")
        for i in range(n):
            procs.append(subprocess.Popen([str(py), app, "client", "--port", str(port), "--index", str(i), "--data",
                                           str(data_dir)], env=env, stdout=subprocess.DEVNULL, stderr=clog,
                                          preexec_fn=limit_address_space(as_gib)))
        if pyspy is not None and prof_dir is not None:
            profs.append(_profiler(pyspy, server.pid, prof_dir / f"flower-server-{n}.txt", 100))
            profs.append(_profiler(pyspy, procs[1].pid, prof_dir / f"flower-client-{n}.txt", 100))
        _wait([server], time.monotonic() + RUN_TIMEOUT_S, sampler, f"Flower {n} clients")
        end = time.monotonic() + 30
        while any(p.poll() is None for p in procs) and time.monotonic() < end:
            time.sleep(0.1)
    finally:
        kill_tree([p.pid for p in procs if p.poll() is None])
        for p in profs:
            if p is not None:
                p.wait(30)
        sampler.stop()
    total = time.time() - t0
    if server.returncode != 0 or not out.exists():
        raise SystemExit(f"Flower {n} clients: server exit {server.returncode}; see {logs}-server.log")
    log = json.loads(out.read_text())
    opened = {int(k): v for k, v in log["opened"].items()}
    fit_done = {int(k): v for k, v in log["fit_done"].items()}
    seconds = [(opened[r + 1] if r < rounds else fit_done[r]) - opened[r] for r in range(2, rounds + 1)]
    w0, w1 = opened[2], fit_done[rounds]
    roles = SIDE_ROLES["flower"]
    peak, parts = sampler.peak_total(roles)
    cpu_parts = {r: sampler.cpu_between(r, w0, w1) / (rounds - 1) for r in roles}
    notes = []
    stuck = sum(1 for p in procs[1:] if p.returncode not in (0, None) and p.returncode != -9)
    if stuck:
        notes.append(f"{stuck} clients exited non-zero")
    return Run("flower", n, rep, seconds, opened[1] - t0, peak, parts, sum(cpu_parts.values()), cpu_parts,
               log["accuracy"][str(rounds)], [log["participants"][str(r)] for r in range(1, rounds + 1)], total, notes)


# --------------------------------------------------------------------------
# profiles


_LINE = re.compile(r":\d+\)$")


def summarise_profile(path: Path, top: int = 14) -> list[str]:
    """Inclusive and self shares of the functions in a py-spy raw (collapsed) profile."""
    if not path.exists():
        return [f"  ({path.name}: no profile written)"]
    incl: Counter = Counter()
    own: Counter = Counter()
    total = idle = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        c = int(count)
        frames = [_LINE.sub(")", f) for f in stack.split(";")[1:]]  # drop the thread label
        frames = [f for f in frames if not f.startswith("process ")]
        total += c
        leaf = frames[-1].split(" ")[0].rsplit(".", 1)[-1] if frames else ""
        if re.fullmatch(r"select|poll|_poll|wait|wait_for|epoll|recv|recv_into|_recv|sleep|acquire|get"
                        r"|_poll_connectivity|channel_spin", leaf):
            idle += c
            continue  # the rest of the summary is about the time spent working
        for f in set(frames):
            incl[f] += c
        if frames:
            own[frames[-1]] += c
    if not total:
        return [f"  ({path.name}: empty)"]
    busy = total - idle
    out = [f"  {path.name}: {total} samples (100 Hz, every thread, idle included); in a blocking wait "
           f"(select/poll/recv/lock/sleep): {idle / total:.0%}; shares below are of the {busy} busy samples"]
    total = max(busy, 1)
    skip = ("<module>", "run_module", "_run_code", "_run_module_as_main", "main (", "run (threading",
            "_bootstrap", "spawn_main", "_main (multiprocessing")
    shown = 0
    for f, c in incl.most_common():
        if any(f.startswith(s) or s in f for s in skip):
            continue
        out.append(f"    {c / total:6.1%} incl  {own[f] / total:6.1%} self  {f}")
        shown += 1
        if shown >= top:
            break
    return out


# --------------------------------------------------------------------------
# output


def med(xs):
    return statistics.median(xs)


def print_runs(runs: list[Run]) -> None:
    print(f"{'side':<8} {'N':>3} {'rep':>3} {'s/round':>8} {'best':>7} {'start-up s':>10} {'peak RSS MiB':>12} "
          f"{'CPU s/round':>11} {'accuracy':>8} {'wall s':>7}  parts of the peak (MiB)")
    for r in runs:
        parts = ", ".join(f"{k} {fmt_mib(v)}" for k, v in sorted(r.peak_parts.items()) if v)
        print(f"{r.side:<8} {r.agents:>3} {r.rep:>3} {r.s_round:>8.3f} {min(r.seconds):>7.3f} {r.startup:>10.1f} "
              f"{fmt_mib(r.peak_rss):>12} {r.cpu_per_round:>11.3f} {r.accuracy:>8.4f} {r.total_s:>7.1f}  {parts}"
              + (f"  [{'; '.join(r.notes)}]" if r.notes else ""))


def print_summary(runs: list[Run]) -> None:
    print(f"\n{'N':>3} {'metric':<26} {'fedmqtt':>10} {'Flower':>10} {'fedmqtt/Flower':>15}")
    for n in sorted({r.agents for r in runs}):
        fm = [r for r in runs if r.agents == n and r.side == "fedmqtt"]
        fl = [r for r in runs if r.agents == n and r.side == "flower"]
        if not fm or not fl:
            continue
        rows = [
            ("s/round (median)", med([r.s_round for r in fm]), med([r.s_round for r in fl]), "{:.3f}"),
            ("start-up s", med([r.startup for r in fm]), med([r.startup for r in fl]), "{:.1f}"),
            ("peak sum of RSS MiB", med([r.peak_rss for r in fm]) / 2**20, med([r.peak_rss for r in fl]) / 2**20,
             "{:,.0f}"),
            ("CPU s/round (all procs)", med([r.cpu_per_round for r in fm]), med([r.cpu_per_round for r in fl]),
             "{:.3f}"),
            ("final accuracy", med([r.accuracy for r in fm]), med([r.accuracy for r in fl]), "{:.4f}"),
        ]
        for name, a, b, f in rows:
            print(f"{n:>3} {name:<26} {f.format(a):>10} {f.format(b):>10} {(a / b if b else float('nan')):>15.2f}")
        print(f"{n:>3} {'(fedmqtt RSS without broker)':<26} "
              f"{med([r.peak_rss - r.peak_parts.get('broker', 0) for r in fm]) / 2**20:>10,.0f}")
        print(f"{n:>3} {'CPU s/round by part':<26} fedmqtt: " + ", ".join(
            f"{k} {med([r.cpu_parts[k] for r in fm]):.3f}" for k in sorted(SIDE_ROLES['fedmqtt']))
              + "; Flower: " + ", ".join(f"{k} {med([r.cpu_parts[k] for r in fl]):.3f}"
                                          for k in sorted(SIDE_ROLES['flower'])))
    print("(medians over the repetitions; s/round: median of rounds 2..R of each run; ratio < 1: fedmqtt lower)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--agents", type=int, nargs="+", default=[10, 50], help="agent counts (default 10 50)")
    p.add_argument("--repeat", type=int, default=3, help="alternating repetitions per side (default 3)")
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--onnx-every", type=int, default=1,
                   help="fedmqtt's [onnx] every (default 1, the shipped default; 0: no ONNX export, which Flower "
                        "does not make either)")
    p.add_argument("--blas-threads", type=int, default=1,
                   help="OPENBLAS/MKL/OMP_NUM_THREADS of every process on both sides (default 1, what `fedmqtt sim` "
                        "gives its workers; 0: the library default on both sides)")
    p.add_argument("--quick", action="store_true", help="N = 10 only, 1 repetition, 5 rounds (a smoke run)")
    p.add_argument("--profile", action="store_true",
                   help="then one py-spy-profiled run per side at the largest N (not in the table)")
    p.add_argument("--as-limit-gib", type=float, default=4.0, help="ulimit -v of every process (GiB, 0: none)")
    p.add_argument("--rss-limit-gib", type=float, default=16.0, help="stop a run whose sum of RSS passes this")
    p.add_argument("--venv", default=str(BENCH_VENV), help="the Flower virtualenv (created if missing)")
    p.add_argument("--keep", action="store_true", help="keep the work directory (logs, shards, profiles)")
    a = p.parse_args()
    if a.blas_threads > 0:
        # The same on both sides (inherited by every process started from here), so that
        # the comparison is of the frameworks, not of how many BLAS threads each lets
        # numpy start for the same tiny matrices.
        for k in ("OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "OMP_NUM_THREADS"):
            os.environ[k] = str(a.blas_threads)
    if a.quick:
        a.agents, a.repeat, a.rounds = [10], 1, 5
    if a.rounds < 3:
        p.error("--rounds must be >= 3 (rounds 2..R are counted)")
    limit = int(a.rss_limit_gib * GiB)
    print(machine_line())
    py = ensure_bench_venv(Path(a.venv))
    pyspy = Path(a.venv) / "bin" / "py-spy"
    import aggregator

    print(f"fedmqtt code measured: {Path(aggregator.__file__).parents[1]} (set PYTHONPATH to measure another copy)")
    print(f"Flower: flwr {FLWR_VERSION} in {a.venv} (legacy start_server / start_client, gRPC bidi)")
    print(f"BLAS threads per process, both sides: {a.blas_threads or 'library default'}; fedmqtt [onnx] every = "
          f"{a.onnx_every}")
    work = Path(tempfile.mkdtemp(prefix="fedmqtt-bench-flower-"))
    t_all = time.perf_counter()
    runs: list[Run] = []
    try:
        for n in a.agents:
            d = work / f"data-{n}"
            info = export_shards(n, d)
            diff = check_same_training(info["data"])
            print(f"\nN = {n}: digits Dirichlet({ALPHA}), {info['train']} training samples, {info['min']}-{info['max']} "
                  f"per agent, {info['test']} test; fedmqtt agent vs _softmax_np training, max |diff| = {diff:.3g}",
                  flush=True)
            if diff != 0.0:
                print("  WARNING: the two trainings differ; the sides do not compute the same job")
            for rep in range(1, a.repeat + 1):
                for side in ("fedmqtt", "flower"):
                    if side == "fedmqtt":
                        r = run_fedmqtt(n, a.rounds, d, work, rep, a.as_limit_gib, limit, onnx_every=a.onnx_every)
                    else:
                        r = run_flower(py, n, a.rounds, d, work, rep, a.as_limit_gib, limit)
                    if any(x != n for x in r.participants):
                        r.notes.append(f"participants {r.participants}")
                    runs.append(r)
                    print(f"  {side:<8} rep {rep}: {r.s_round:.3f} s/round, start-up {r.startup:.1f} s, peak RSS "
                          f"{fmt_mib(r.peak_rss)} MiB, accuracy {r.accuracy:.4f} ({r.total_s:.0f} s)", flush=True)
        print()
        print_runs(runs)
        print_summary(runs)
        if a.profile:
            n = max(a.agents)
            prof = work / "profiles"
            prof.mkdir()
            d = work / f"data-{n}"
            print(f"\nProfiles at N = {n} (py-spy record --idle -r 100 --nonblocking; runs not in the table):")
            r1 = run_fedmqtt(n, a.rounds, d, work, 99, a.as_limit_gib, limit, pyspy, prof, onnx_every=a.onnx_every)
            r2 = run_flower(py, n, a.rounds, d, work, 99, a.as_limit_gib, limit, pyspy, prof)
            print(f"  (profiled runs: fedmqtt {r1.s_round:.3f} s/round, Flower {r2.s_round:.3f} s/round)")
            for name in (f"fedmqtt-aggregator-{n}.txt", f"fedmqtt-agent-{n}.txt", f"flower-server-{n}.txt",
                         f"flower-client-{n}.txt"):
                print("\n".join(summarise_profile(prof / name)))
    finally:
        if a.keep:
            print(f"\nwork directory kept: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    print(f"\ntotal {time.perf_counter() - t_all:.0f} s")


if __name__ == "__main__":
    main()
