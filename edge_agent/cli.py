"""``fedmqtt agent``, and the command-line plumbing every subcommand shares.

The ``fedmqtt`` dispatcher itself lives in :mod:`fedmqtt.cli`; ``fedmqtt
agent`` is served from this package alone, so a device never imports the
aggregator or its extras.
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
from typing import TypeVar

from .agent_config import AgentConfig
from .api import secagg_identity  # noqa: F401 - imported from here by earlier code and tests
from .config import ConfigError, add_flags, flag_overrides, load, parse_hostport
from .data import DataError
from .model_api import ModelError

T = TypeVar("T")


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


def agent_command(argv: list[str]) -> int:
    """``fedmqtt agent`` with its errors as one line and exit code 2 (``python -m edge_agent`` too)."""
    try:
        return agent_main(argv)
    except (ConfigError, DataError, ModelError) as exc:
        kind = {ConfigError: "config error", DataError: "data error"}.get(type(exc), "model error")
        sys.stderr.write(f"fedmqtt agent: {kind}: {exc}\n")
        return 2


def agent_main(argv: list[str]) -> int:
    """``fedmqtt agent``: one device, configured by agent.toml and flags (see :class:`edge_agent.api.Agent`)."""
    from .api import Agent
    from .systemd import notify, start_watchdog

    cfg = config_from_args(AgentConfig, "fedmqtt agent", "Run one edge agent.", "deploy/agent.toml", argv)
    where = f"agent {cfg.agent_id} of federation {cfg.federation} on {cfg.broker.host}:{cfg.broker.port}"

    # systemd (Type=notify): READY=1 once the broker accepted us, STOPPING=1 on the way out.
    def connected(_agent) -> None:
        notify(f"READY=1\nSTATUS={where}: connected")

    agent = Agent(cfg, on_connect=connected)

    def stop(*_) -> None:
        notify(f"STOPPING=1\nSTATUS={where}: stopping")
        agent.loop.stop()

    notify(f"STATUS={where}: connecting to the broker")
    start_watchdog(agent.loop)  # WATCHDOG=1 from this loop's timers, when the unit has WatchdogSec=
    stop_on_signals(stop)
    agent.run()
    return 0
