"""fedmqtt edge agent: everything a device runs (numpy, msgpack and paho-mqtt only)."""

__version__ = "0.1.0"
