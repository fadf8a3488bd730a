"""``fedmqtt demo``: a whole federation on this machine, with a report a person can read.

A private mosquitto (unless ``--broker``), the aggregator service and N
simulated agents, each a real MQTT client, train on digits split across the
agents. Every round prints one line; the end prints the final accuracy next
to a centralized baseline, and writes the model, metrics.csv and
accuracy.png. This module is the command's front end, so it writes to the
stream it is given; the library code underneath only logs.
"""

from __future__ import annotations

import queue
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

import numpy as np

from edge_agent.config import BrokerConfig
from edge_agent.models import BuiltinModel
from edge_agent.mqtt import Loop
from edge_agent.training import train_local
from edge_agent.wire import TrainConfig

from . import checkpoint
from .broker import LocalBroker
from .config import (
    AggregatorConfig,
    FedBuffConfig,
    ModelConfig,
    PrivacyConfig,
    RoundConfig,
    SecAggConfig,
    SecurityConfig,
    TrainingConfig,
)
from .coordinator import RoundClosed, RoundSummary
from .datasets import DataSpec, federated_digits
from .metrics_log import write_csv
from .onnx_export import to_onnx_bytes
from .service import AggregatorService
from .sim import ProcessSimulation, Simulation, resolve_procs

# The demo's rounds take milliseconds; a round that is still open after this
# long means agents died, and the demo should say so rather than hang.
ROUND_TIMEOUT_S = 30.0
# Centralized baseline: the same SGD (batch, lr) on the pooled data for a
# fixed 100 epochs, by which softmax on digits has converged (0.958). Fixed
# rather than rounds x epochs so that a long demo does not spend minutes on it.
BASELINE_EPOCHS = 100
# Secure aggregation clamps each coordinate of an update to [-range, range]
# before quantizing it. Digits softmax deltas after 5 local epochs stay well
# inside 2 (largest seen: about 0.6), and 16 bits over [-2, 2] is a step of 6e-5.
SECAGG_DEMO_RANGE = 2.0
BASELINE_SEED = 0
# With agent worker processes, how often the demo looks for one that died while it waits for a round.
CHECK_EVERY_S = 0.5
# --procs auto: below this many agent trainings (agents x rounds) the agents stay on
# one thread here. A worker costs about 1 s of CPU to start (interpreter, numpy,
# scikit-learn and the digits split) while a default demo (10 x 20 = 200) computes
# its whole federation in about 1 s: with 2 workers it took 3.2-5.4 s, with one
# thread 1.9-4.3 s. Around 1000 the two break even, at 2000 workers win (measured
# on 2 cores: docs/benchmarks.md, "Simulator over processes").
AUTO_PROCS_MIN_WORK = 1000


def demo_procs(opts: "DemoOptions") -> int:
    """Agent worker processes: ``opts.procs``, or for 0 (auto) one per core when the run is long enough.

    Never more than the agents; 1 on a one-core machine. Whatever the
    count, the federation computes the same model.
    """
    if opts.procs:
        return resolve_procs(opts.procs, opts.agents)
    if opts.agents * opts.rounds < AUTO_PROCS_MIN_WORK:
        return 1
    return resolve_procs(0, opts.agents)


@dataclass
class DemoOptions:
    """Everything ``fedmqtt demo`` can be told."""

    model: str = "softmax"
    hidden: list[int] = field(default_factory=lambda: [64])
    agents: int = 10
    rounds: int = 20
    epochs: int = 5
    batch_size: int = 32
    lr: float = 0.1
    partition: str = "dirichlet"
    alpha: float = 0.5
    seed: int = 0
    out: str = "fedmqtt-out"
    broker: str | None = None
    federation: str = "demo"
    mode: str = "sync"
    buffer: int = 5
    dp: str = "off"  # off | central | local | distributed
    noise: float = 1.0
    clip: float = 1.0
    expected: int = 0  # DP: expected devices per round (0: half the agents)
    budget: float = 0.0
    adaptive_clip: bool = False
    secagg: str = "off"  # off | secagg | secagg+: the aggregator sees only the sum of the updates
    secagg_range: float = SECAGG_DEMO_RANGE
    # Agent worker processes (fedmqtt sim --procs): 1 = all agents on one thread of
    # this process; 0 = auto (demo_procs). The model is the same whatever it is.
    procs: int = 0


@dataclass
class DemoResult:
    """What the demo produced."""

    rounds: list[RoundSummary]
    final_accuracy: float
    baseline_accuracy: float
    seconds: float
    out: Path


def centralized_baseline(opts: DemoOptions, X: np.ndarray, y: np.ndarray, X_te: np.ndarray, y_te: np.ndarray) -> float:
    """Test accuracy of the same model trained on the pooled training data."""
    model = BuiltinModel(_model_config(opts).spec())
    params = model.init_params(opts.seed)
    cfg = TrainConfig(epochs=BASELINE_EPOCHS, batch_size=opts.batch_size, lr=opts.lr)
    params, _ = train_local(model, params, X, y, cfg, BASELINE_SEED)
    return model.evaluate(params, X_te, y_te)["accuracy"]


def _model_config(opts: DemoOptions) -> ModelConfig:
    hidden = list(opts.hidden) if opts.model == "mlp" else []
    return ModelConfig(kind=opts.model, n_features=64, n_outputs=10, hidden=hidden, seed=opts.seed)


def run_demo(opts: DemoOptions, out: TextIO = sys.stdout) -> DemoResult:
    """Run the demo end to end; raises on failure after stopping everything it started."""
    t0 = time.monotonic()
    data = federated_digits(opts.agents, opts.partition, opts.alpha, opts.seed)
    sizes = [a.num_samples for a in data.agents]
    out.write(
        f"digits: {sum(sizes)} training samples over {opts.agents} agents "
        f"({opts.partition}{f' alpha={opts.alpha}' if opts.partition == 'dirichlet' else ''}; "
        f"smallest {min(sizes)}, largest {max(sizes)}), {len(data.y_test)} central test samples\n"
    )
    procs = demo_procs(opts)

    broker: LocalBroker | None = None
    loops: list[Loop] = []
    sim: Simulation | None = None
    workers: ProcessSimulation | None = None
    check = None
    events: queue.Queue = queue.Queue()
    with tempfile.TemporaryDirectory(prefix="fedmqtt-demo-state-") as state_dir:
        try:
            if opts.broker:
                from edge_agent.config import parse_hostport

                host, port = parse_hostport(opts.broker)
            else:
                broker = LocalBroker().start()
                host, port = broker.host, broker.port
                out.write(f"broker: private mosquitto on {broker.address}\n")
            bcfg = BrokerConfig(host=host, port=port)
            if procs > 1:
                # Started first: they import and connect while the baseline trains here.
                spec = DataSpec(opts.agents, "digits", opts.partition, opts.alpha, seed=opts.seed)
                workers = ProcessSimulation(bcfg, opts.federation, spec, procs, seed=opts.seed)
                workers.start()
                check = lambda: workers.wait(0)  # noqa: E731 - raises WorkerError if one died
                out.write(f"agents: {opts.agents} over {procs} worker processes\n")
            baseline = centralized_baseline(opts, data.X_train_pooled, data.y_train_pooled, data.X_test, data.y_test)
            config = AggregatorConfig(
                federation=opts.federation,
                rounds=opts.rounds,
                state_dir=state_dir,
                model=_model_config(opts),
                training=TrainingConfig(epochs=opts.epochs, batch_size=opts.batch_size, lr=opts.lr),
                round=RoundConfig(min_agents=opts.agents, quorum=1, timeout=ROUND_TIMEOUT_S, seed=opts.seed,
                                  mode=opts.mode),
                fedbuff=FedBuffConfig(buffer=min(opts.buffer, opts.agents)),
                # The simulated agents are our own: no rate limit (an async
                # demo legitimately sends ~30 updates per agent per second).
                # Our private loopback broker is open by design: no warning about it.
                security=SecurityConfig(rate_limit=0.0, probe_open_broker=opts.broker is not None),
                privacy=PrivacyConfig(mode=opts.dp, noise_multiplier=opts.noise, clip=opts.clip,
                                      expected_per_round=opts.expected or max(1, opts.agents // 2),
                                      population=opts.agents, budget=opts.budget,
                                      adaptive_clip=opts.adaptive_clip),
                secagg=SecAggConfig(mode=opts.secagg, range=opts.secagg_range, stage_timeout=ROUND_TIMEOUT_S),
                broker=bcfg,
            )
            if opts.dp != "off" and opts.secagg == "off":
                # DP rounds select by Poisson sampling; quorum 1 and a short
                # deadline keep a round whose draw came up small moving.
                # (With secure aggregation every agent must be online before
                # a draw, or small draws would be charged and wasted.)
                config.round.min_agents = 1
            model = BuiltinModel(config.model.spec())
            agg_loop = Loop()
            loops.append(agg_loop)
            service = AggregatorService(
                config,
                agg_loop,
                evaluate=lambda p: model.evaluate(p, data.X_test, data.y_test),
                on_round=lambda a: events.put(a),
                on_finished=lambda f: events.put(("finished", f.round, f.reason)),
            )
            service.start()
            agg_loop.start(name="fedmqtt-aggregator")
            if workers is None:
                sim = Simulation(bcfg, opts.federation, data.agents, seed=opts.seed)
                loops.append(sim.loop)
                sim.start()
            summaries = _follow(events, opts.rounds, out, check)
            final = service.coordinator.params
        finally:
            if sim is not None:
                sim.stop()
            if workers is not None:
                workers.stop()
            for lp in loops:
                lp.stop()
                if lp.thread is not None:
                    lp.thread.join(timeout=10)
            if broker is not None:
                broker.close()

    result = DemoResult(
        rounds=summaries,
        final_accuracy=summaries[-1].metrics["test_accuracy"],
        baseline_accuracy=baseline,
        seconds=time.monotonic() - t0,
        out=Path(opts.out),
    )
    write_outputs(result, config, final)
    where = result.out.resolve()
    out.write(
        f"\nfinal global accuracy {result.final_accuracy:.4f}  |  centralized baseline {baseline:.4f}  "
        f"|  {result.seconds:.1f}s\noutput: {where}/ (model.npz, model.onnx, metrics.csv, accuracy.png)\n"
        f"run the ONNX model: {sys.executable} -c \"import onnxruntime as rt, numpy as np; "
        f"s = rt.InferenceSession('{where}/model.onnx'); "
        f"print(s.run(None, {{'input': np.zeros((1, 64), np.float32)}})[1])\"\n"
    )
    return result


def _follow(events: queue.Queue, rounds: int, out: TextIO, check=None) -> list[RoundSummary]:
    """Print one line per closed round until the federation finishes.

    ``check()``, called while waiting, raises if the agents cannot go on (a worker process died).
    """
    summaries: list[RoundSummary] = []
    tty = out.isatty()
    while True:
        deadline = time.monotonic() + ROUND_TIMEOUT_S * 2
        ev = None
        while ev is None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise RuntimeError(
                    f"no round closed in {ROUND_TIMEOUT_S * 2:.0f}s after round {len(summaries)}; the agents stalled"
                )
            try:
                ev = events.get(timeout=min(left, CHECK_EVERY_S) if check is not None else left)
            except queue.Empty:
                if check is not None:
                    check()
        if isinstance(ev, RoundClosed):
            s = ev.summary
            summaries.append(s)
            bar = _bar(s.round, rounds)
            line = (
                f"round {s.round:3d}/{rounds}  participants {s.participants:3d}  "
                f"accuracy {s.metrics.get('test_accuracy', float('nan')):.4f}  {s.seconds:6.2f}s"
                + (f"  epsilon {s.metrics['epsilon']:.3f}" if "epsilon" in s.metrics else "")
            )
            out.write(f"\r{' ' * 40}\r{line}\n{bar}" if tty else f"{line}\n")
            out.flush()
        elif isinstance(ev, tuple) and ev[0] == "finished":
            if tty:
                out.write("\n")
            if ev[2]:
                out.write(f"stopped early: {ev[2]}\n")
            return summaries


def _bar(done: int, total: int, width: int = 30) -> str:
    filled = int(width * done / max(total, 1))
    return f"[{'#' * filled}{'.' * (width - filled)}] {done}/{total}"


def write_outputs(result: DemoResult, config: AggregatorConfig, params: dict[str, np.ndarray]) -> None:
    """model.npz, model.onnx, metrics.csv and accuracy.png in the output directory."""
    out = result.out
    out.mkdir(parents=True, exist_ok=True)
    last = result.rounds[-1]
    checkpoint.save_model(
        out / "model.npz", config.model.spec().to_wire(), params,
        federation=config.federation, round=last.round, version=last.version,
    )
    checkpoint.atomic_write(
        out / "model.onnx",
        to_onnx_bytes(config.model.spec(), params, federation=config.federation, round=last.round,
                      version=last.version),
    )
    # The aggregator's own metrics.csv layout (one `seconds` column: the metric of that name is it).
    write_csv(out / "metrics.csv", result.rounds)
    plot_accuracy(out / "accuracy.png", result, run_label(config, result.rounds[-1].metrics))


def run_label(config: AggregatorConfig, last_metrics: dict[str, float]) -> str:
    """What the curve is, for the legend: rule, async, DP with its epsilon, secure aggregation."""
    parts = [f"federated ({STRATEGY_NAMES.get(config.strategy.name, config.strategy.name)}"]
    if config.round.mode == "async":
        parts.append("async, FedBuff")
    p = config.privacy
    if p.mode != "off":
        eps = last_metrics.get("epsilon")
        parts.append(f"{p.mode} DP z={p.noise_multiplier:g}" + (f", ε={eps:.2f}" if eps is not None else ""))
    if config.secagg.enabled:
        parts.append(config.secagg.mode)
    return ", ".join(parts) + ")"


# Legend names of the aggregation rules (docs/strategies.md).
STRATEGY_NAMES = {"fedavg": "FedAvg", "fedavg_unweighted": "FedAvg, unweighted", "fedprox": "FedProx",
                  "fedavgm": "FedAvgM", "fedadam": "FedAdam", "fedyogi": "FedYogi", "fedadagrad": "FedAdagrad",
                  "median": "median", "trimmed_mean": "trimmed mean", "krum": "Krum", "multi_krum": "Multi-Krum"}


def plot_accuracy(path: Path, result: DemoResult, label: str = "federated (FedAvg)") -> None:
    """Accuracy per round, with the centralized baseline as a horizontal line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=100)
    xs = [s.round for s in result.rounds]
    ax.plot(xs, [s.metrics["test_accuracy"] for s in result.rounds], marker="o", label=label)
    ax.axhline(result.baseline_accuracy, color="gray", linestyle="--", label="centralized baseline")
    ax.set_xlabel("round")
    ax.set_ylabel("test accuracy")
    ax.set_title("fedmqtt demo: digits")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
