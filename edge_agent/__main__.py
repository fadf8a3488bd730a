"""``python -m edge_agent`` is ``fedmqtt agent``."""

import sys

from .cli import main

sys.exit(main(["agent", *sys.argv[1:]]))
