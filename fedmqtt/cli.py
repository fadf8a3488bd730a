"""The ``fedmqtt`` command: one dispatcher for every subcommand.

``fedmqtt agent`` goes to :mod:`edge_agent.cli` and imports nothing of the
aggregator; every other subcommand goes to :mod:`aggregator.cli`, imported
only when asked for. Errors a user can fix are one line and exit code 2.
"""

from __future__ import annotations

import sys

from edge_agent import __version__

USAGE = """usage: fedmqtt {demo,aggregator,worker,agent,sim,status,dashboard,privacy,export,serve-onnx,provision} ...

  demo        run a whole federation on this machine (private broker, aggregator, 10 agents)
  aggregator  run the aggregator service (--config aggregator.toml)
  worker      run one ingest worker of an aggregator with [workers] count > 0 (--index I)
  agent       run one edge agent (--config agent.toml)
  sim         run N simulated agents in one process against a broker
  status      show a federation's agents and last rounds from the broker's retained messages
  dashboard   serve a live web page of the fleet, its rounds, accuracy and privacy (retained messages)
  privacy     plan differential privacy: epsilon for a population, sample size, rounds and noise
  export      write the ONNX model of a checkpoint or a saved model (.npz)
  serve-onnx  answer predictions from the federation's current ONNX model (hot-swapped): CSV, or JSON over HTTP
  provision   create the CA, certificates, MQTT passwords, ACL and signing key of a secured federation

`fedmqtt COMMAND --help` for the options of each.
"""

AGGREGATOR_COMMANDS = ("demo", "aggregator", "worker", "sim", "status", "dashboard", "privacy", "export", "serve-onnx",
                       "provision")


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``fedmqtt`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv:
        sys.stderr.write(USAGE)
        return 2  # a command is required, as for any CLI with subcommands
    if argv[0] in ("-h", "--help"):
        sys.stdout.write(USAGE)
        return 0
    if argv[0] == "--version":
        sys.stdout.write(f"fedmqtt {__version__}\n")
        return 0
    command, rest = argv[0], argv[1:]
    if command == "agent":
        from edge_agent.cli import agent_command

        return agent_command(rest)
    if command in AGGREGATOR_COMMANDS:
        from aggregator.cli import main as aggregator_cli

        return aggregator_cli(command, rest)
    sys.stderr.write(f"fedmqtt: unknown command {command!r}\n{USAGE}")
    return 2
