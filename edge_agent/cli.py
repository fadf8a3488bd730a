"""The ``fedmqtt`` command.

``fedmqtt agent`` is served from this package alone, so a device never
imports the aggregator or its extras; the other subcommands are handed to
:mod:`aggregator.cli`, imported only when asked for.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys

from typing import TypeVar

from . import __version__
from .config import ConfigError, add_flags, flag_overrides, load, parse_hostport

T = TypeVar("T")

USAGE = """usage: fedmqtt {demo,aggregator,agent,sim,status,privacy,export,serve-onnx,provision} ...

  demo        run a whole federation on this machine (private broker, aggregator, 10 agents)
  aggregator  run the aggregator service (--config aggregator.toml)
  agent       run one edge agent (--config agent.toml)
  sim         run N simulated agents in one process against a broker
  status      show a federation's agents and last rounds from the broker's retained messages
  privacy     plan differential privacy: epsilon for a population, sample size, rounds and noise
  export      write the ONNX model of a checkpoint or a saved model (.npz)
  serve-onnx  answer predictions from the federation's current ONNX model (hot-swapped)
  provision   create the CA, certificates, MQTT passwords, ACL and signing key of a secured federation

`fedmqtt COMMAND --help` for the options of each.
"""

AGGREGATOR_COMMANDS = ("demo", "aggregator", "sim", "status", "privacy", "export", "serve-onnx", "provision")


def setup_logging(verbosity: int) -> None:
    """Log to stderr; -v for info, -vv for debug."""
    level = logging.WARNING - 10 * verbosity
    logging.basicConfig(level=max(level, logging.DEBUG), format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def stop_on_signals(stop) -> None:
    """Call ``stop()`` on SIGTERM and SIGINT (systemd stop, Ctrl-C)."""
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop())


def config_from_args(cls: type[T], prog: str, description: str, example: str, argv: list[str]) -> T:
    """Parse ``--config FILE``, ``--broker HOST:PORT``, ``-v`` and a flag per config key; load ``cls``.

    The one path from a command line to a config object, for every service command.
    """
    p = argparse.ArgumentParser(prog=prog, description=description)
    p.add_argument("--config", help=f"TOML config file (see {example})")
    p.add_argument("--broker", metavar="HOST:PORT", help="shorthand for --broker-host and --broker-port")
    p.add_argument("-v", "--verbose", action="count", default=1, help="more log output (-vv for debug)")
    add_flags(p, cls)
    args = p.parse_args(argv)
    setup_logging(args.verbose)
    overrides = flag_overrides(args)
    if args.broker:
        host, port = parse_hostport(args.broker)
        overrides.update({"broker.host": host, "broker.port": str(port)})
    return load(cls, args.config, overrides)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``fedmqtt`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        sys.stdout.write(USAGE)
        return 0
    if argv[0] == "--version":
        sys.stdout.write(f"fedmqtt {__version__}\n")
        return 0
    command, rest = argv[0], argv[1:]
    try:
        if command == "agent":
            return agent_main(rest)
        if command in AGGREGATOR_COMMANDS:
            from aggregator.cli import main as aggregator_cli

            return aggregator_cli(command, rest)
    except ConfigError as exc:
        sys.stderr.write(f"fedmqtt {command}: config error: {exc}\n")
        return 2
    sys.stderr.write(f"fedmqtt: unknown command {command!r}\n{USAGE}")
    return 2


def secagg_identity(cfg) -> tuple[object | None, object | None]:
    """(DeviceIdentity, PeerVerifier) of a provisioned device, or (None, None).

    Provisioned means the broker section names a client certificate, its key
    and the CA. A device without the ``cryptography`` package cannot take part
    in secure aggregation at all, so it needs neither.
    """
    b = cfg.broker
    if not (cfg.security.sign_secagg_keys and b.cert_file and b.key_file and b.ca_file):
        return None, None
    try:
        from .secagg.identity import DeviceIdentity, PeerVerifier
    except ImportError:
        return None, None
    identity = DeviceIdentity(b.cert_file, b.key_file)
    if identity.common_name != cfg.agent_id:
        raise ValueError(f"{b.cert_file} is the certificate of {identity.common_name!r}, not of agent "
                         f"{cfg.agent_id!r}: peers would refuse its keys")
    return identity, PeerVerifier(b.ca_file, cfg.federation)


def agent_main(argv: list[str]) -> int:
    """``fedmqtt agent``: one device."""
    from .agent import AgentCore, AgentRunner
    from .agent_config import AgentConfig
    from .agent_store import AgentStore
    from .data import DataError, load as load_data, split_holdout
    from .mqtt import Loop
    from .systemd import notify, start_watchdog

    cfg = config_from_args(AgentConfig, "fedmqtt agent", "Run one edge agent.", "deploy/agent.toml", argv)
    try:
        X, y = load_data(cfg.data, cfg.label_column)
    except DataError as exc:
        sys.stderr.write(f"fedmqtt agent: data error: {exc}\n")
        return 2
    data = split_holdout(X, y, cfg.holdout, cfg.seed)
    loop = Loop()
    verifier = None
    if cfg.security.trusted_keys:
        from .signing import Verifier

        try:
            verifier = Verifier(cfg.security.trusted_keys)
        except RuntimeError as exc:
            sys.stderr.write(f"fedmqtt agent: {exc}\n")
            return 2
    else:
        logging.getLogger("fedmqtt.agent").warning(
            "no [security] trusted_keys: models and tasks are accepted unsigned (development only)")
    try:
        identity, peer_verifier = secagg_identity(cfg)
    except (OSError, ValueError) as exc:
        sys.stderr.write(f"fedmqtt agent: broker.cert_file/key_file: cannot sign secure-aggregation keys: {exc}\n")
        return 2
    core = AgentCore(agent_id=cfg.agent_id, fed=cfg.federation, data=data, seed=cfg.seed, verifier=verifier,
                     private=cfg.hide_sample_count, secagg_identity=identity, secagg_verifier=peer_verifier)
    where = f"agent {cfg.agent_id} of federation {cfg.federation} on {cfg.broker.host}:{cfg.broker.port}"

    # systemd (Type=notify): READY=1 once the broker accepted us, STOPPING=1 on the way out.
    def connected(_runner) -> None:
        notify(f"READY=1\nSTATUS={where}: connected")

    def stop(*_) -> None:
        notify(f"STOPPING=1\nSTATUS={where}: stopping")
        loop.stop()

    runner = AgentRunner(
        loop,
        core,
        cfg.broker,
        on_done=stop if cfg.exit_when_done else None,
        store=AgentStore(cfg.state_dir) if cfg.state_dir else None,
        eligibility=cfg.eligibility,
        on_connect=connected,
    )
    runner.start()
    notify(f"STATUS={where}: connecting to the broker")
    start_watchdog(loop)  # WATCHDOG=1 from this loop's timers, when the unit has WatchdogSec=
    stop_on_signals(stop)
    logging.getLogger("fedmqtt.agent").info(
        "agent %s: %d training and %d holdout samples, broker %s:%d",
        cfg.agent_id, data.num_samples, len(data.X_holdout), cfg.broker.host, cfg.broker.port,
    )
    loop.run()
    return 0
