"""fedmqtt aggregator: round coordination, strategies, checkpoints and the MQTT service."""

from edge_agent import __version__

__all__ = ["__version__"]
