"""``python -m edge_agent`` is ``fedmqtt agent``."""

import sys

from .cli import agent_command

sys.exit(agent_command(sys.argv[1:]))
