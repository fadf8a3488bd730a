"""``python -m aggregator`` is ``fedmqtt aggregator``."""

import sys

from .cli import main

sys.exit(main("aggregator", sys.argv[1:]))
