"""``python -m fedmqtt`` is the ``fedmqtt`` command."""

import sys

from .cli import main

sys.exit(main())
