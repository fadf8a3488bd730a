"""``fedmqtt demo``, ``fedmqtt aggregator`` and ``fedmqtt sim``."""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass, field
import signal
import sys
import threading

from edge_agent.cli import config_from_args, setup_logging, stop_on_signals
from edge_agent.config import BrokerConfig, ConfigError, add_flags, flag_overrides, load, parse_bool, parse_hostport
from edge_agent.data import DataError
from edge_agent.model_api import ModelError
from edge_agent.mqtt import Loop
from edge_agent.systemd import notify, start_watchdog

from .argtypes import listen_address, positive_float, positive_int, procs
from .broker import BrokerError
from .config import AggregatorConfig
from .datasets import DATASETS, DataSpec
from .partition import PARTITIONS, PartitionError

log = logging.getLogger(__name__)


def main(command: str, argv: list[str]) -> int:
    """Run one aggregator-side subcommand; user errors become one line and exit code 2."""
    try:
        commands = {"demo": demo_main, "aggregator": aggregator_main, "worker": worker_main, "sim": sim_main,
                    "export": export_main, "serve-onnx": serve_onnx_main, "status": status_main,
                    "dashboard": dashboard_main, "privacy": privacy_main, "provision": provision_main}
        return commands[command](argv)
    except ConfigError as exc:
        sys.stderr.write(f"fedmqtt {command}: config error: {exc}\n")
        return 2
    except ModelError as exc:
        sys.stderr.write(f"fedmqtt {command}: model error: {exc}\n")
        return 2
    except (BrokerError, DataError, PartitionError, ExportError, TimeoutError) as exc:
        sys.stderr.write(f"fedmqtt {command}: error: {exc}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write(f"fedmqtt {command}: interrupted\n")
        return 130


class ExportError(ValueError):
    """A model that cannot be exported, with the reason."""


@dataclass
class ClientSettings:
    """The broker settings of the client-only commands (status, serve-onnx): --broker-* flags."""

    broker: BrokerConfig = field(default_factory=BrokerConfig)


def _client_broker(p: argparse.ArgumentParser, argv: list[str]) -> tuple[argparse.Namespace, BrokerConfig]:
    """Parse argv with the --broker-* flags (TLS, credentials) and --broker HOST:PORT."""
    p.add_argument("--broker", metavar="HOST:PORT", help="shorthand for --broker-host and --broker-port")
    add_flags(p, ClientSettings)
    a = p.parse_args(argv)
    overrides = flag_overrides(a)
    if a.broker:
        host, port = parse_hostport(a.broker)
        overrides.update({"broker.host": host, "broker.port": str(port)})
    return a, load(ClientSettings, None, overrides).broker


def demo_main(argv: list[str]) -> int:
    """``fedmqtt demo``."""
    from .demo import DemoOptions, run_demo

    d = DemoOptions()
    p = argparse.ArgumentParser(prog="fedmqtt demo", description="Run a whole federation on this machine.")
    p.add_argument("--broker", metavar="HOST:PORT", help="use this broker instead of a private mosquitto")
    p.add_argument("--model", choices=("softmax", "mlp"), default=d.model)
    p.add_argument("--hidden", default="64", help="mlp hidden layer sizes, comma-separated (default 64)")
    p.add_argument("--agents", type=positive_int, default=d.agents)
    p.add_argument("--rounds", type=positive_int, default=d.rounds)
    p.add_argument("--epochs", type=positive_int, default=d.epochs, help="local epochs per round")
    p.add_argument("--batch-size", type=positive_int, default=d.batch_size)
    p.add_argument("--lr", type=positive_float, default=d.lr)
    p.add_argument("--partition", choices=PARTITIONS, default=d.partition)
    p.add_argument("--alpha", type=positive_float, default=d.alpha, help="Dirichlet concentration")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--mode", choices=("sync", "async"), default=d.mode,
                   help="sync rounds, or async FedBuff (applies every --buffer updates)")
    p.add_argument("--buffer", type=positive_int, default=d.buffer, help="FedBuff: updates per model version")
    p.add_argument("--dp", choices=("off", "central", "local", "distributed"), default=d.dp,
                   help="client-level differential privacy: who adds the noise")
    p.add_argument("--noise", type=positive_float, default=d.noise, help="DP noise multiplier z")
    p.add_argument("--clip", type=positive_float, default=d.clip, help="DP clip norm S")
    p.add_argument("--expected", type=int, default=d.expected, help="DP: expected agents per round (0: half)")
    p.add_argument("--budget", type=float, default=d.budget, help="DP: stop before epsilon would exceed this")
    p.add_argument("--adaptive-clip", action="store_true", help="DP: adapt the clip norm (Andrew et al. 2021)")
    p.add_argument("--secagg", choices=("off", "secagg", "secagg+"), default=d.secagg,
                   help="secure aggregation: the aggregator and the broker see only the sum of the updates")
    p.add_argument("--procs", type=procs, default=d.procs, metavar="K",
                   help="run the agents in K worker processes (as `fedmqtt sim --procs`; 1: on one thread of this "
                   "process; default 0 = auto, see README); the results are the same whatever K")
    p.add_argument("--out", default=d.out, help="output directory (default ./fedmqtt-out)")
    p.add_argument("-v", "--verbose", action="count", default=0)
    a = p.parse_args(argv)
    setup_logging(a.verbose)
    try:
        hidden = [int(h) for h in a.hidden.split(",") if h.strip()]
    except ValueError:
        p.error(f"--hidden: expected comma-separated integers, got {a.hidden!r}")
    opts = DemoOptions(
        model=a.model, hidden=hidden, agents=a.agents, rounds=a.rounds, epochs=a.epochs,
        batch_size=a.batch_size, lr=a.lr, partition=a.partition, alpha=a.alpha, seed=a.seed,
        out=a.out, broker=a.broker, mode=a.mode, buffer=a.buffer, dp=a.dp, noise=a.noise, clip=a.clip, secagg=a.secagg,
        expected=a.expected, budget=a.budget, adaptive_clip=a.adaptive_clip, procs=a.procs,
    )
    # systemd, `timeout` or a terminal closing send SIGTERM: clean up exactly as for Ctrl-C.
    signal.signal(signal.SIGTERM, _raise_interrupt)
    from .sim import WorkerError

    try:
        run_demo(opts)
    except WorkerError as exc:  # an agent worker process died (run_demo stopped the others)
        sys.stderr.write(f"fedmqtt demo: error: {exc}\n")
        return exc.exit_code
    return 0


def _raise_interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def aggregator_main(argv: list[str]) -> int:
    """``fedmqtt aggregator``: the service, in the foreground (systemd runs exactly this)."""
    from .coordinator import Finished, RoundClosed
    from .service import AggregatorService

    cfg = config_from_args(
        AggregatorConfig, "fedmqtt aggregator", "Run the aggregator service.", "deploy/aggregator.toml", argv
    )
    loop = Loop()
    where = f"federation {cfg.federation} on {cfg.broker.host}:{cfg.broker.port}"
    ready_sent = False

    # systemd (Type=notify): READY=1 once the broker accepted us with the
    # checkpoint and journal loaded, STATUS= per round, STOPPING=1 on the way out.
    def ready() -> None:
        nonlocal ready_sent
        if not ready_sent:
            ready_sent = True
            notify(f"READY=1\nSTATUS={where}: connected, round {service.coordinator.round}")

    def round_closed(ev: RoundClosed) -> None:
        s = ev.summary
        notify(f"STATUS={where}: round {s.round} closed with {s.participants} participants")

    def stop(finished: Finished | None = None) -> None:
        if finished is not None:
            # Connected, and nothing left to do (maybe from the start): still a
            # successful start. systemd counts an exit before READY=1 as a
            # failed start, and Restart=on-failure would then loop.
            ready()
        done = f"; finished after round {finished.round}" if finished is not None else ""
        notify(f"STOPPING=1\nSTATUS={where}: stopping{done}")
        loop.stop()

    if cfg.role == "site":
        # Local rounds below a cloud aggregator, through the site broker's bridge (deploy/scale.md).
        from .site import SiteAggregator

        service = SiteAggregator(cfg, loop, on_round=round_closed, on_finished=stop, on_ready=ready)
        where = f"site {cfg.site.id} of {where}"
    else:
        if cfg.role == "cloud":
            from .site import cloud_warnings

            for warning in cloud_warnings(cfg):
                log.warning("%s", warning)
        service = AggregatorService(cfg, loop, on_round=round_closed, on_finished=stop, on_ready=ready)
    service.start()
    if cfg.workers.count and cfg.workers.spawn:
        # The ingest workers on this machine, with this command's config and flags (deploy/scale.md).
        from .ingest.supervisor import WorkerSupervisor

        WorkerSupervisor(loop, argv, cfg.workers.count).start()
    notify(f"STATUS={where}: connecting to the broker")
    start_watchdog(loop)  # WATCHDOG=1 from this loop's timers, when the unit has WatchdogSec=
    stop_on_signals(stop)
    log.info("aggregator for federation %s on %s:%d, state in %s",
             cfg.federation, cfg.broker.host, cfg.broker.port, cfg.state_dir)
    loop.run()
    return _exit_status("aggregator", service.fatal)


def _exit_status(command: str, fatal: str | None) -> int:
    """A service's exit code: 0, or its fatal problem as one line (``broker: ...`` is a refusal)."""
    if fatal is None:
        return 0
    # A refusal by the broker is configuration (2: systemd does not restart); a disk error may pass (1).
    refused = fatal.startswith("broker: ")
    sys.stderr.write(f"fedmqtt {command}: {'config error' if refused else 'error'}: {fatal}\n")
    return 2 if refused else 1


def worker_main(argv: list[str]) -> int:
    """``fedmqtt worker --index I``: one ingest worker of ``[workers] count`` (same config as the aggregator)."""
    from .ingest.worker import IngestWorker

    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--index", type=int, default=None)
    known, rest = pre.parse_known_args(argv)
    cfg = config_from_args(AggregatorConfig, "fedmqtt worker", "Run one ingest worker (--index I, 0-based; the "
                           "other options are the aggregator's).", "deploy/aggregator.toml", rest)
    if known.index is None:
        raise ConfigError("--index: which worker this is (0 .. [workers] count - 1) is required")
    if not cfg.workers.count:
        raise ConfigError("workers.count: is 0 in this config: the aggregator reads the updates itself")
    if not 0 <= known.index < cfg.workers.count:
        raise ConfigError(f"--index: must be in 0..{cfg.workers.count - 1} ([workers] count), got {known.index}")
    loop = Loop()
    where = f"ingest worker {known.index} of federation {cfg.federation} on {cfg.broker.host}:{cfg.broker.port}"
    # systemd (Type=notify, deploy/systemd/fedmqtt-worker@.service): READY=1 once the broker accepted us.
    worker = IngestWorker(cfg, known.index, loop, on_ready=lambda: notify(f"READY=1\nSTATUS={where}: connected"))
    worker.start()
    start_watchdog(loop)

    def stop() -> None:
        notify(f"STOPPING=1\nSTATUS={where}: stopping")
        loop.stop()

    stop_on_signals(stop)
    log.info("%s, journal in %s", where, worker.journal_dir)
    loop.run()
    return _exit_status("worker", worker.fatal)


def sim_main(argv: list[str]) -> int:
    """``fedmqtt sim``: N simulated agents against a running broker, on one thread or over K processes."""
    from .sim import ProcessSimulation, Simulation, resolve_procs

    p = argparse.ArgumentParser(prog="fedmqtt sim", description="Run N simulated agents in one process, "
                                "or spread over worker processes (--procs).")
    p.add_argument("--federation", "--fed", default="demo")
    p.add_argument("--agents", type=positive_int, default=10)
    p.add_argument("--dataset", choices=DATASETS, default="digits")
    p.add_argument("--partition", choices=PARTITIONS, default="dirichlet", help="digits only")
    p.add_argument("--alpha", type=positive_float, default=0.5, help="Dirichlet α (digits) or Synthetic α")
    p.add_argument("--beta", type=float, default=0.5, help="Synthetic β")
    p.add_argument("--holdout", type=float, default=0.0, help="fraction each agent holds out for evaluation")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--exit-when-done", metavar="BOOL", nargs="?", const="true", default="false", type=parse_bool,
                   help="exit when the federation finishes (as on `fedmqtt agent`: bare, or true/false)")
    p.add_argument("--prefix", default="agent", help="agent ids are PREFIX-000, PREFIX-001, ...")
    p.add_argument("--train-delay", type=float, default=0.0, help="simulated compute seconds per training")
    p.add_argument("--procs", type=procs, default=1, metavar="K",
                   help="spread the agents over K worker processes, each with its own loop (0 or auto: one per "
                   "core; never more than --agents). Agent i gets the same data and seed whatever K, so the "
                   "federation computes the same model. Default 1: all agents on one thread of this process")
    p.add_argument("-v", "--verbose", action="count", default=1)
    a, broker = _client_broker(p, argv)  # --broker HOST:PORT and the --broker-* TLS and login flags
    setup_logging(a.verbose)
    spec = DataSpec(a.agents, a.dataset, a.partition, a.alpha, a.beta, a.seed, a.holdout)
    workers = resolve_procs(a.procs, a.agents)
    if workers > 1:
        return _sim_processes(ProcessSimulation(broker, a.federation, spec, workers, seed=a.seed, prefix=a.prefix,
                                                train_delay=a.train_delay, exit_when_done=a.exit_when_done))
    data = spec.build()
    sim = Simulation(broker, a.federation, data.agents, seed=a.seed, loop=Loop(),
                     prefix=a.prefix, train_delay=a.train_delay)
    stop_on_signals(sim.loop.stop)
    sim.start()
    try:
        while sim.loop.thread is not None and sim.loop.thread.is_alive():
            if a.exit_when_done and sim.finished.wait(0.5):
                break
            sim.loop.thread.join(0.5)
    finally:
        sim.stop()
    return 0


def _sim_processes(sims) -> int:
    """``fedmqtt sim --procs K``: supervise the workers; SIGINT/SIGTERM stop them all, a dead one fails the run."""
    from .sim import WorkerError

    stop = threading.Event()
    stop_on_signals(stop.set)
    log.info("%d agents over %d worker processes", sims.agents, sims.procs)
    try:
        sims.start()
        while not stop.is_set():
            if sims.wait(0.25) and sims.exit_when_done:
                break
    except WorkerError as exc:
        sys.stderr.write(f"fedmqtt sim: error: {exc}\n")
        return exc.exit_code
    finally:
        sims.stop()
    return 0


def export_main(argv: list[str]) -> int:
    """``fedmqtt export``: the ONNX model of any saved global model."""
    from edge_agent.spec import ModelSpec

    from .checkpoint import atomic_write, load_global_model
    from .onnx_export import to_onnx_bytes

    p = argparse.ArgumentParser(prog="fedmqtt export", description="Export a saved global model to ONNX.")
    p.add_argument("--checkpoint", required=True,
                   help="a state directory, its checkpoint.npz, or a model .npz (e.g. fedmqtt-out/model.npz)")
    p.add_argument("--out", required=True, help="the .onnx file to write")
    p.add_argument("--class-labels", default="", help="comma-separated class names for the metadata")
    a = p.parse_args(argv)
    try:
        spec_map, params, info = load_global_model(a.checkpoint)
        spec = ModelSpec.from_wire(spec_map)
    except ValueError as exc:
        raise ExportError(str(exc)) from None
    labels = [x.strip() for x in a.class_labels.split(",") if x.strip()] or None
    if labels is not None and len(labels) != spec.n_outputs:
        raise ExportError(f"--class-labels: {len(labels)} names for {spec.n_outputs} classes")
    data = to_onnx_bytes(spec, params, federation=info["federation"] or "unknown", round=info["round"],
                         version=info["version"] or "unknown", class_labels=labels)
    atomic_write(a.out, data)
    sys.stdout.write(f"wrote {a.out}: {spec.kind} model of round {info['round']} ({len(data)} bytes)\n")
    return 0


def serve_onnx_main(argv: list[str]) -> int:
    """``fedmqtt serve-onnx``: predictions from the current ONNX model, hot-swapped."""
    from .serve_http import MAX_BODY_BYTES, MAX_ROWS, PredictionServer, serve_http
    from .serve_onnx import OnnxFollower, serve

    p = argparse.ArgumentParser(
        prog="fedmqtt serve-onnx",
        description="Answer one CSV line per input row (round,label,probabilities... or round,prediction) "
        "with the federation's current ONNX model, swapped in as new rounds arrive; or, with --http, "
        "answer JSON requests over HTTP.",
        epilog=f"HTTP API (--http): POST /predict with {{\"rows\": [[x0, x1, ...], ...]}} (at most {MAX_ROWS} rows, "
        f"{MAX_BODY_BYTES // 2**20} MiB) answers {{\"round\", \"version\", \"labels\", \"probabilities\"}} "
        "(classifiers) or {\"round\", \"version\", \"predictions\"} (regression), all rows from one model; "
        "GET /model describes the model served; GET /health is 200 once predictions are served, 503 before. "
        "Errors are {\"error\": ...}; a bad row is named by its 0-based index in \"rows\".",
    )
    p.add_argument("--federation", "--fed", default="demo")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--input", default="-", help="CSV rows of features (default: stdin, answered line by line)")
    mode.add_argument("--http", type=listen_address, metavar="HOST:PORT",
                      help="serve a JSON HTTP API on this address instead, e.g. 127.0.0.1:8080 "
                      "(port 0: any free port; the address is printed on stderr)")
    p.add_argument("--serve-initial", action="store_true",
                   help="--http: also predict with the round-0 model (untrained, initial parameters); "
                   "by default /predict answers 503 until the first trained round arrives")
    p.add_argument("--wait", type=positive_float, default=60.0,
                   help="CSV mode: seconds to wait for a first model (--http answers 503 while waiting)")
    p.add_argument("--trusted-key", action="append", default=[], metavar="HEX",
                   help="serve only models signed by this Ed25519 public key (repeatable)")
    p.add_argument("-v", "--verbose", action="count", default=0)
    a, broker = _client_broker(p, argv)
    if a.serve_initial and a.http is None:
        p.error("--serve-initial applies to --http (the CSV mode answers from the first model it gets)")
    setup_logging(a.verbose)
    try:
        follower = OnnxFollower(broker, a.federation, trusted_keys=a.trusted_key)
    except (ValueError, RuntimeError) as exc:  # a malformed --trusted-key, cryptography missing
        raise ConfigError(str(exc)) from None
    if a.http is not None:
        try:
            server = PredictionServer(a.http, follower, serve_initial=a.serve_initial)
        except OSError as exc:  # address in use, not an address of this host...
            sys.stderr.write(f"fedmqtt serve-onnx: error: --http {a.http[0]}:{a.http[1]}: cannot listen: {exc}\n")
            return 2
        follower.start()
        # serve_forever runs on this thread: shutdown() must come from another one
        stop_on_signals(lambda: threading.Thread(target=server.shutdown, daemon=True).start())
        sys.stderr.write(f"fedmqtt serve-onnx: serving {server.url} (POST /predict, GET /model, GET /health)\n")
        sys.stderr.flush()
        try:
            serve_http(server)
        finally:
            follower.stop()
        return 0
    follower.start()
    try:
        if a.input == "-":
            errors = serve(follower, sys.stdin, sys.stdout, a.wait)
        else:
            with open(a.input) as fh:
                errors = serve(follower, fh, sys.stdout, a.wait)
    finally:
        follower.stop()
    return 1 if errors else 0


def status_main(argv: list[str]) -> int:
    """``fedmqtt status``: the fleet and the last rounds, from retained messages alone."""
    from .status import collect, render

    p = argparse.ArgumentParser(prog="fedmqtt status",
                                description="Show a federation's agents and last rounds from the broker's retained messages.")
    p.add_argument("--federation", "--fed", default="demo")
    a, broker = _client_broker(p, argv)
    view = collect(broker, a.federation)
    sys.stdout.write(render(view))
    # 1: the broker answered but holds nothing of this federation (a wrong name, or another broker)
    return 1 if view.model is None and view.task is None and not view.agents else 0


def privacy_main(argv: list[str]) -> int:
    """``fedmqtt privacy`` (dp-accounting and scipy load here, never for the other commands)."""
    from .privacy_cli import privacy_main as run

    return run(argv)


def provision_main(argv: list[str]) -> int:
    """``fedmqtt provision``."""
    from .provision import provision_main as run

    return run(argv)


def dashboard_main(argv: list[str]) -> int:
    """``fedmqtt dashboard``: a live web page of the fleet, from retained messages alone."""
    from .dashboard import DEFAULT_LISTEN, Dashboard, DashboardError

    p = argparse.ArgumentParser(prog="fedmqtt dashboard",
                                description="Serve a live web page of a federation's agents, rounds, accuracy "
                                "and privacy, read from the broker's retained messages (it never publishes).")
    p.add_argument("--federation", "--fed", default="demo")
    p.add_argument("--listen", type=listen_address, default=DEFAULT_LISTEN, metavar="HOST:PORT",
                   help=f"where to serve the page (default {DEFAULT_LISTEN}; port 0: any free port). The page "
                   "shows what the broker credentials can read: keep it on loopback unless that is public.")
    p.add_argument("--budget", type=positive_float, default=None,
                   help="DP: the privacy budget to draw against epsilon (it is not published on the broker)")
    p.add_argument("-v", "--verbose", action="count", default=0)
    a, broker = _client_broker(p, argv)
    setup_logging(a.verbose)
    try:
        dash = Dashboard(broker, a.federation, a.listen, budget=a.budget or 0.0)
    except DashboardError as exc:
        sys.stderr.write(f"fedmqtt dashboard: error: {exc}\n")
        return 2
    stop_on_signals(dash.loop.stop)
    sys.stdout.write(f"fedmqtt dashboard: federation {a.federation} on {dash.broker_name}, serving {dash.url}\n")
    sys.stdout.flush()
    dash.run()
    return 0
