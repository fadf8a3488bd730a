"""argparse value types shared by the fedmqtt subcommands: each says what is wrong with the text."""

from __future__ import annotations

import argparse
import math


def _integer(text: str, expected: str = "an integer") -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None


def positive_int(text: str) -> int:
    """An integer >= 1."""
    value = _integer(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def positive_float(text: str) -> float:
    """A finite number > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not (value > 0 and math.isfinite(value)):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


def probability(text: str) -> float:
    """A number strictly between 0 and 1."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1), got {text}")
    return value


def procs(text: str) -> int:
    """A process count: an integer >= 0, or ``auto`` (= 0: one per core)."""
    if text.strip().lower() == "auto":
        return 0
    value = _integer(text, "an integer or 'auto'")
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0 (0 or auto: one per core), got {value}")
    return value


def parse_listen(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[v6addr]:PORT`` for IPv6) of a listening socket; ValueError saying what is wrong.

    Port 0 asks the system for a free port (the service logs which).
    """
    host, sep, port = text.rpartition(":")
    if "://" in text or "/" in text:
        raise ValueError(f"expected HOST:PORT without a scheme or path, got {text!r}")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"expected HOST:PORT with a port in 0..65535 (e.g. 127.0.0.1:9108), got {text!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    elif ":" in host:
        raise ValueError(f"an IPv6 address needs brackets ([::1]:9108), got {text!r}")
    if not host or any(c.isspace() for c in host):
        raise ValueError(f"expected HOST:PORT, got {text!r}")
    return host, int(port)


def listen_address(text: str) -> tuple[str, int]:
    """``parse_listen`` as an argparse type (``--http``, ``--listen``)."""
    try:
        return parse_listen(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
