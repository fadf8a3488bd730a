"""The experiment harness: a whole federation in one process, on the real code path.

:func:`run_federation` drives the real :class:`~aggregator.coordinator.Coordinator`
(built with ``make_strategy(config.strategy)`` and a central-test-set
evaluator) and one real :class:`~edge_agent.agent.AgentCore` per simulated
device, without a broker: every message is the encoded wire payload the
broker would carry, delivered by an in-memory "bus" in the order the
coordinator emits it.

- Each agent announces itself with its own ``status`` payload
  (``core.status("online")``) on its status topic; the coordinator opens
  round 1 once ``min_agents`` are online.
- ``model`` and ``task`` publishes go to every agent through
  ``core.receive(topic, payload)``; a selected agent answers with a
  ``Train`` action, and ``core.train(round, attempt)`` returns the ``update``
  publish, whose payload goes to ``coordinator.receive(topic, payload, now)``.
- What agents publish (updates, and any status) is queued and delivered to
  the coordinator in order; the agents' persistence actions (trained
  rounds, outbox) have nothing to do in memory and are ignored.
- Time is a fake clock: it advances one "second" per local training; when
  nothing is left to deliver and a round is still open, the clock jumps to
  the round's deadline and ``coordinator.tick(now)`` closes it (quorum) or
  abandons it. Nothing sleeps.

Agents get the ids and training seeds :class:`aggregator.sim.Simulation`
gives them (``agent-000``..., ``agent_seed(seed, i)``), so an in-process run
replays the run over a real broker (exp1 checks this).

Two optional hooks change what agents do, and nothing else:

- :class:`Attack`: the listed agents' update payloads are decoded with
  ``edge_agent.wire.decode``, the delta is replaced (sign flip ``-Δ``,
  scaling ``c·Δ``, or both ``-c·Δ``) and the message re-encoded; the coordinator sees a
  well-formed update, as it would from a compromised device.
- :class:`Stragglers`: each round a fraction of the *selected* agents are
  stragglers (FedProx reference code: ``round(k·(1-p))`` of the k selected
  keep the full E epochs, the rest draw ``epochs ~ U{1, ..., E-1}``). In
  mode ``"partial"`` (FedProx) a straggler gets the task with its smaller
  ``epochs`` (the task payload is decoded, ``config.epochs`` changed,
  re-encoded) and its partial work is aggregated. In mode ``"drop"``
  (FedAvg in the paper) stragglers miss the deadline: their training is
  run only after the clock passed the deadline, by which time the
  coordinator closed the round with the updates it had (``quorum``), so
  the agent sees the round moved on and sends nothing.
"""

from __future__ import annotations

import csv
import dataclasses
import datetime as _dt
import os
import platform
import subprocess
import sys
import time
from collections import Counter, deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from aggregator.config import AggregatorConfig, ModelConfig, RoundConfig, StrategyConfig, TrainingConfig
from aggregator.coordinator import Coordinator, Finished, RoundAbandoned, RoundClosed, SaveCheckpoint
from aggregator.datasets import FederatedData, federated_digits, load_digits_split
from aggregator.partition import PartitionError, dirichlet
from aggregator.sim import agent_ids, agent_seed
from aggregator.strategies import STRATEGIES, make_strategy
from edge_agent import wire
from edge_agent.agent import AgentCore, Train
from edge_agent.data import LocalData, split_holdout
from edge_agent.models import BuiltinModel
from edge_agent.mqtt import Publish
from edge_agent.topics import Topics
from edge_agent.training import train_local

REPO = Path(__file__).resolve().parents[2]
RESULTS = REPO / "docs" / "results"

# Every rule the aggregation helper ships (issue 5), in the order the
# results tables list them. Rules not (yet) in aggregator.strategies are
# reported as unavailable rather than failing a whole grid.
ALL_RULES = (
    "fedavg", "fedavg_unweighted", "fedprox", "fedavgm", "fedadam", "fedyogi", "fedadagrad",
    "median", "trimmed_mean", "krum", "multi_krum",
)
# Rules that keep every update of a round and so need max_updates >= the
# number of agents per round (otherwise the coordinator answers round_full).
BUFFERING_RULES = ("median", "trimmed_mean", "krum", "multi_krum")


def available_rules() -> tuple[str, ...]:
    return tuple(r for r in ALL_RULES if r in STRATEGIES)


def strategy_config(name: str, max_updates: int | None = None, **overrides: Any) -> StrategyConfig:
    """StrategyConfig for ``name`` with its defaults, plus ``overrides`` (only fields that exist)."""
    fields = set(StrategyConfig.__dataclass_fields__)
    kw: dict[str, Any] = {"name": name}
    if max_updates is not None and "max_updates" in fields:
        kw["max_updates"] = max_updates
    for k, v in overrides.items():
        if k not in fields:
            raise ValueError(f"StrategyConfig has no field {k!r} (has {sorted(fields)})")
        kw[k] = v
    return StrategyConfig(**kw)


# --------------------------------------------------------------------------
# data


def digits_federation(n_agents: int, partition: str, alpha: float, seed: int = 0) -> tuple[FederatedData, str]:
    """``federated_digits`` as the demo builds it, or a documented fallback.

    Returns the data and a note. A Dirichlet split that cannot give every
    agent >= 10 samples (aggregator.partition raises PartitionError after
    bounded retries, e.g. alpha=0.1 over 50 agents) is redrawn with the same
    generator law and the largest minimum in (5, 2, 1) that works; the note
    says which, and results mark the run.
    """
    try:
        return federated_digits(n_agents, partition, alpha, seed), ""
    except PartitionError as exc:
        if partition != "dirichlet":
            raise
        first = str(exc)
    X_tr, y_tr, X_te, y_te = load_digits_split(seed)
    for min_samples in (5, 2, 1):
        try:
            parts = dirichlet(y_tr, n_agents, alpha, np.random.default_rng(seed), min_samples=min_samples)
        except PartitionError:
            continue
        agents = [split_holdout(X_tr[idx], y_tr[idx], 0.0, seed + k) for k, idx in enumerate(parts)]
        note = f"min_samples={min_samples} (>=10 impossible: {first})"
        return FederatedData(agents, X_te, y_te, X_tr.shape[1], 10), note
    raise PartitionError(first)


# --------------------------------------------------------------------------
# behaviour hooks


ATTACK_KINDS = ("sign_flip", "scale", "flip_scale")


@dataclass(frozen=True)
class Attack:
    """Model poisoning by the agents in ``agents``.

    ``sign_flip`` sends -Δ, ``scale`` sends factor·Δ, ``flip_scale`` sends
    -factor·Δ (both at once).
    """

    kind: str  # "sign_flip" | "scale" | "flip_scale"
    agents: frozenset[str]
    factor: float = 10.0

    def __post_init__(self) -> None:
        if self.kind not in ATTACK_KINDS:
            raise ValueError(f"unknown attack {self.kind!r}")

    def apply(self, agent: str, payload: bytes) -> bytes:
        if agent not in self.agents:
            return payload
        msg = wire.decode(payload, expect="update")
        assert isinstance(msg, wire.UpdateMsg)
        c = np.float32({"sign_flip": -1.0, "scale": self.factor, "flip_scale": -self.factor}[self.kind])
        msg.delta = {k: (c * v).astype(np.float32) for k, v in msg.delta.items()}
        return wire.encode(msg)


def pick_attackers(ids: Sequence[str], fraction: float, seed: int) -> frozenset[str]:
    """A seeded ``round(fraction * n)``-agent subset (the same for every rule compared)."""
    k = int(round(fraction * len(ids)))
    rng = np.random.default_rng([seed, 0xA77AC])
    return frozenset(ids[i] for i in sorted(rng.choice(len(ids), size=k, replace=False)))


@dataclass(frozen=True)
class Stragglers:
    """Systems heterogeneity as in the FedProx paper (see the module docstring)."""

    fraction: float  # of the selected agents, per round
    mode: str  # "partial" (FedProx: keep partial work) | "drop" (FedAvg: stragglers miss the deadline)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.mode not in ("partial", "drop"):
            raise ValueError(f"unknown straggler mode {self.mode!r}")

    def draw(self, task: wire.TaskMsg, selected: Iterable[str]) -> dict[str, int]:
        """Straggler -> epochs it manages, for one round/attempt of these selected agents; the same draw in either mode."""
        sel = sorted(selected)
        E = task.config.epochs
        n_active = int(round(len(sel) * (1.0 - self.fraction)))
        rng = np.random.default_rng([self.seed, task.round, task.attempt])
        active = set(rng.choice(len(sel), size=n_active, replace=False).tolist())
        return {a: int(rng.integers(1, E)) if E > 1 else 1 for i, a in enumerate(sel) if i not in active}


# --------------------------------------------------------------------------
# the run


@dataclass
class RoundRecord:
    round: int
    attempt: int
    selected: int
    participants: int
    test_accuracy: float
    test_loss: float
    agent_train_loss: float  # sample-weighted mean of the agents' reported local train_loss
    global_train_loss: float  # the new global model on the pooled training data (nan if not asked)
    global_train_accuracy: float
    stragglers: int
    wall_seconds: float


@dataclass
class RunResult:
    rounds: list[RoundRecord]
    rejected: dict[str, int]  # the coordinator's dropped messages, by reason
    agent_rejected: dict[str, int]  # the agents' dropped messages, by reason (summed)
    abandoned: int
    wall_seconds: float
    params: dict[str, np.ndarray]


class Stall(RuntimeError):
    """The federation stopped making progress (a harness or coordinator bug)."""


def run_federation(
    config: AggregatorConfig,
    datas: Sequence[LocalData],
    X_test: np.ndarray,
    y_test: np.ndarray,
    *,
    seed: int = 0,
    attack: Attack | None = None,
    stragglers: Stragglers | None = None,
    train_eval: tuple[np.ndarray, np.ndarray] | None = None,
    on_round: Callable[[RoundRecord], None] | None = None,
) -> RunResult:
    """Run ``config.rounds`` rounds of the real coordinator with real agent cores (see module doc)."""
    if not config.rounds:
        raise ValueError("run_federation needs a finite number of rounds")
    model = BuiltinModel(config.model.spec())
    coord = Coordinator(
        config, make_strategy(config.strategy), evaluate=lambda p: model.evaluate(p, X_test, y_test)
    )
    fed = config.federation
    topics = Topics(fed)
    ids = agent_ids(len(datas))
    cores = [AgentCore(agent_id=a, fed=fed, data=d, seed=agent_seed(seed, i)) for i, (a, d) in enumerate(zip(ids, datas))]

    now = 0.0
    pending: deque[tuple[AgentCore, Train]] = deque()  # Train actions, in the order agents asked
    late: list[tuple[AgentCore, Train]] = []  # dropped stragglers: trained only after the deadline
    inbox: deque[tuple[str, bytes]] = deque()  # agent -> aggregator messages not yet delivered
    straggling: dict[str, int] = {}  # this attempt's stragglers -> epochs
    notified: dict[tuple[int, int], list[str]] = {}  # (round, attempt) -> agents given a `selected` notice
    records: list[RoundRecord] = []
    abandoned = 0
    t_round = time.perf_counter()
    t0 = t_round

    def to_agents(pub: Publish) -> None:
        nonlocal straggling
        kind, addressee = topics.parse(pub.topic)
        if kind == "selected":  # the notice that one agent is selected (published before the task)
            n = wire.decode(pub.payload, expect="selected", fed=fed)
            notified.setdefault((n.round, n.attempt), []).append(addressee)
        if kind in ("inbox", "selected"):  # one agent's messages
            for core in cores:
                if core.agent_id == addressee:
                    from_agent(core, core.receive(pub.topic, pub.payload))
            return
        if kind not in ("model", "task"):
            return  # metrics / onnx: nobody in the simulation listens
        payload = pub.payload
        per_agent: dict[str, bytes] = {}
        if kind == "task" and stragglers is not None:
            try:
                task = wire.decode(payload, expect="task", fed=fed)
            except wire.WireError:
                task = None  # the agents will drop it too (and count it)
            straggling = (stragglers.draw(task, notified.get((task.round, task.attempt), ()))
                          if isinstance(task, wire.TaskMsg) and task.state == "open" else {})
            if stragglers.mode == "partial":
                for a, epochs in straggling.items():
                    t = wire.decode(payload, expect="task", fed=fed)
                    t.config.epochs = epochs
                    per_agent[a] = wire.encode(t)
        for core in cores:
            from_agent(core, core.receive(pub.topic, per_agent.get(core.agent_id, payload)))

    def from_agent(core: AgentCore, actions: Iterable[Any]) -> None:
        for act in actions:
            if isinstance(act, Train):
                pending.append((core, act))
            elif isinstance(act, Publish):
                # an update (or status) for the aggregator, delivered in order after what is being handled
                kind, _ = topics.parse(act.topic)
                payload = attack.apply(core.agent_id, act.payload) if attack and kind == "update" else act.payload
                inbox.append((act.topic, payload))
            # Done, and the agent's persistence actions (SaveTrained, PutOutbox,
            # DropOutbox): nothing to do in memory.

    def handle(actions: Iterable[Any]) -> None:
        nonlocal abandoned, t_round
        for a in actions:
            if isinstance(a, Publish):
                to_agents(a)
            elif isinstance(a, RoundClosed):
                s = a.summary
                gl, ga = float("nan"), float("nan")
                if train_eval is not None:
                    ev = model.evaluate(coord.params, *train_eval)
                    gl, ga = ev["loss"], ev.get("accuracy", float("nan"))
                now_t = time.perf_counter()
                rec = RoundRecord(
                    round=s.round, attempt=s.attempt, selected=s.selected, participants=s.participants,
                    test_accuracy=s.metrics.get("test_accuracy", float("nan")),
                    test_loss=s.metrics.get("test_loss", float("nan")),
                    agent_train_loss=s.metrics.get("train_loss", float("nan")),
                    global_train_loss=gl, global_train_accuracy=ga,
                    stragglers=len(straggling), wall_seconds=now_t - t_round,
                )
                t_round = now_t
                records.append(rec)
                if on_round is not None:
                    on_round(rec)
            elif isinstance(a, RoundAbandoned):
                abandoned += 1
            elif isinstance(a, (SaveCheckpoint, Finished)):
                pass  # in memory: nothing to make durable; finished is read from coord

    handle(coord.start(now))
    for core in cores:
        st = core.status("online")
        inbox.append((st.topic, st.payload))

    idle_ticks = 0
    while not coord.finished:
        if inbox:
            topic, payload = inbox.popleft()
            handle(coord.receive(topic, payload, now))
            continue
        if pending:
            core, act = pending.popleft()
            if stragglers is not None and stragglers.mode == "drop" and core.agent_id in straggling \
                    and coord.open is not None and coord.open.round == act.round:
                late.append((core, act))
                continue
            now += 1.0  # one "second" per training: deadlines are never reached by agents that report
            from_agent(core, core.train(act.round, act.attempt))
            idle_ticks = 0
            continue
        # Nothing left that reports in time: let the deadline pass.
        now = max(now + 1.0, coord.open.deadline if coord.open is not None else now + 1.0)
        handle(coord.tick(now))
        if late:
            # The dropped stragglers finish now; the round they trained for has moved on
            # (AgentCore.train skips it and sends nothing).
            for core, act in late:
                from_agent(core, core.train(act.round, act.attempt))
            late.clear()
        idle_ticks += 1
        if idle_ticks > 3:
            raise Stall(f"no progress at round {coord.round}: open={coord.open}, rejected={dict(coord.rejected)}")

    return RunResult(
        rounds=records, rejected=dict(coord.rejected),
        agent_rejected=dict(sum((c.rejected for c in cores), Counter())), abandoned=abandoned,
        wall_seconds=time.perf_counter() - t0, params=coord.params,
    )


def make_config(
    *,
    federation: str = "exp",
    rounds: int,
    model: ModelConfig,
    training: TrainingConfig,
    n_agents: int,
    agents_per_round: int = 0,
    quorum: int = 1,
    timeout: float = 600.0,
    strategy: StrategyConfig,
    seed: int = 0,
) -> AggregatorConfig:
    """The AggregatorConfig of an experiment: all agents must be online before round 1."""
    cfg = AggregatorConfig(
        federation=federation,
        rounds=rounds,
        state_dir="unused-in-process",
        model=model,
        training=training,
        round=round_config(min_agents=n_agents, agents_per_round=agents_per_round, quorum=quorum,
                           timeout=timeout, seed=seed),
        strategy=strategy,
    )
    cfg.onnx.every = 0
    problems = cfg.problems() + [(f"strategy.{k}", v) for k, v in cfg.strategy.problems()] \
        + [(f"round.{k}", v) for k, v in cfg.round.problems()] + [(f"training.{k}", v) for k, v in cfg.training.problems()]
    if problems:
        raise ValueError(f"invalid experiment config: {problems}")
    return cfg


def round_config(**kw: Any) -> RoundConfig:
    """RoundConfig that selects exactly ``agents_per_round`` (no over-selection, if the field exists).

    The experiments reproduce papers that select k devices and wait for
    them; the coordinator's over-selection (select 1.3k, close at k) is a
    deployment feature that would change which updates are averaged.
    """
    if "over_select" in RoundConfig.__dataclass_fields__:
        kw.setdefault("over_select", 1.0)
    return RoundConfig(**kw)


def centralized_baseline(
    model_cfg: ModelConfig, X: np.ndarray, y: np.ndarray, X_te: np.ndarray, y_te: np.ndarray,
    *, epochs: int, batch_size: int, lr: float, seed: int = 0,
) -> dict[str, float]:
    """The same SGD (batch, lr, initial model) on the pooled training data (as aggregator.demo does)."""
    model = BuiltinModel(model_cfg.spec())
    params = model.init_params(model_cfg.seed)
    params, _ = train_local(model, params, X, y, wire.TrainConfig(epochs, batch_size, lr), seed)
    return model.evaluate(params, X_te, y_te)


# --------------------------------------------------------------------------
# running many, writing results


def parallel_map(fn: Callable[[Any], Any], jobs: Sequence[Any], workers: int) -> list[Any]:
    """``[fn(j) for j in jobs]`` in ``workers`` forked processes (1: in this process), order kept."""
    if workers <= 1 or len(jobs) <= 1:
        return [fn(j) for j in jobs]
    import multiprocessing as mp

    ctx = mp.get_context("fork")
    with ctx.Pool(workers, initializer=_single_threaded) as pool:
        return pool.map(fn, jobs, chunksize=1)


def _single_threaded() -> None:
    # Tiny matrices: BLAS threads only fight the other worker for the cores.
    try:
        from threadpoolctl import threadpool_limits

        threadpool_limits(1)
    except ImportError:
        pass


def write_csv(path: Path, rows: Sequence[Mapping[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    names: list[str] = []
    for r in rows:
        for k in r:
            if k not in names:
                names.append(k)
    with path.open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=names)
        w.writeheader()
        for r in rows:
            w.writerow({k: _fmt(v) for k, v in r.items()})


def _fmt(v: Any) -> Any:
    if isinstance(v, float):
        return "" if v != v else f"{v:.6f}"
    return v


def machine_info() -> dict[str, str]:
    """Where and when a result was produced, for the results page."""
    import numpy

    try:
        commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        commit += " (+ uncommitted changes)" if dirty else ""
    except (OSError, subprocess.SubprocessError):
        commit = "unknown"
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "date_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": commit,
        "python": platform.python_version(),
        "numpy": numpy.__version__,
        "cpus": str(os.cpu_count()),
        "cpu": cpu,
        "platform": f"{platform.machine()} {platform.system()} {platform.release()}",
    }


def write_run_info(out: Path, argv: Sequence[str], seconds: float, extra: Mapping[str, Any] | None = None) -> None:
    """``run.txt`` beside the results: command, machine, date, wall time."""
    info = machine_info()
    lines = [f"command: {' '.join(argv)}", f"wall_seconds: {seconds:.1f}"]
    lines += [f"{k}: {v}" for k, v in info.items()]
    lines += [f"{k}: {v}" for k, v in (extra or {}).items()]
    (out / "run.txt").write_text("\n".join(lines) + "\n")


def command_line() -> list[str]:
    """The command as a user would type it, relative to the repository."""
    exe = sys.executable
    if Path(exe).absolute().is_relative_to(REPO):
        exe = os.path.relpath(Path(exe).absolute(), REPO)
    script = sys.argv[0]
    try:
        script = os.path.relpath(Path(script).resolve(), REPO)
    except ValueError:
        pass
    return [exe, script, *sys.argv[1:]]


def plt_module():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


RULE_STYLE = {
    "fedavg": dict(color="#1f77b4", linewidth=2.2),
    "fedavg_unweighted": dict(color="#aec7e8", linestyle="--"),
    "fedprox": dict(color="#ff7f0e"),
    "fedavgm": dict(color="#2ca02c"),
    "fedadam": dict(color="#d62728"),
    "fedyogi": dict(color="#9467bd"),
    "fedadagrad": dict(color="#8c564b"),
    "median": dict(color="#e377c2"),
    "trimmed_mean": dict(color="#7f7f7f"),
    "krum": dict(color="#bcbd22"),
    "multi_krum": dict(color="#17becf"),
}


# --------------------------------------------------------------------------
# the same federation over a real broker


def run_over_broker(
    config: AggregatorConfig,
    datas: Sequence[LocalData],
    X_test: np.ndarray,
    y_test: np.ndarray,
    *,
    seed: int = 0,
    round_timeout_s: float = 60.0,
) -> tuple[list[Any], dict[str, np.ndarray], float]:
    """``config.rounds`` rounds over a private mosquitto: AggregatorService + Simulation, as ``fedmqtt demo``.

    Returns the coordinator's RoundSummary list, the final global model and
    the wall time. Needs mosquitto installed (aggregator.broker.LocalBroker
    says how otherwise).
    """
    import queue
    import tempfile

    from aggregator.broker import LocalBroker
    from aggregator.service import AggregatorService
    from aggregator.sim import Simulation
    from edge_agent.config import BrokerConfig
    from edge_agent.mqtt import Loop

    model = BuiltinModel(config.model.spec())
    events: queue.Queue = queue.Queue()
    summaries: list[Any] = []
    params: dict[str, np.ndarray] = {}
    t0 = time.perf_counter()
    with LocalBroker() as broker, tempfile.TemporaryDirectory(prefix="fedmqtt-exp-state-") as state_dir:
        bcfg = BrokerConfig(host=broker.host, port=broker.port)
        cfg = dataclasses.replace(config, state_dir=state_dir, broker=bcfg)
        agg_loop = Loop()
        sim: Simulation | None = None
        try:
            service = AggregatorService(
                cfg, agg_loop,
                evaluate=lambda p: model.evaluate(p, X_test, y_test),
                on_round=lambda a: events.put(a),
                on_finished=lambda r: events.put(("finished", r)),
            )
            service.start()
            agg_loop.start(name="exp-aggregator")
            sim = Simulation(bcfg, cfg.federation, list(datas), seed=seed)
            sim.start()
            while True:
                ev = events.get(timeout=round_timeout_s)
                if isinstance(ev, RoundClosed):
                    summaries.append(ev.summary)
                elif isinstance(ev, tuple) and ev[0] == "finished":
                    params = {k: v.copy() for k, v in service.coordinator.params.items()}
                    break
        finally:
            if sim is not None:
                sim.stop()
            agg_loop.stop()
            if agg_loop.thread is not None:
                agg_loop.thread.join(timeout=10)
    return summaries, params, time.perf_counter() - t0
