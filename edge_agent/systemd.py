"""systemd service notifications (``sd_notify``), by hand, without a dependency.

A ``Type=notify`` unit starts us with ``$NOTIFY_SOCKET`` naming an
``AF_UNIX`` datagram socket (a path, or ``@name`` in the abstract namespace);
each notification is one datagram of newline-separated ``KEY=value`` lines:
``READY=1`` when the service is up, ``STATUS=...`` for ``systemctl status``,
``WATCHDOG=1`` at least every ``$WATCHDOG_USEC`` microseconds, and
``STOPPING=1`` when it begins to shut down (sd_notify(3)). Outside systemd
the variable is unset and every call is a no-op returning False, so the same
code runs from a terminal, a test or a unit.

Both services use it (the aggregator imports it from here, since a device
must never import the aggregator package).
"""

from __future__ import annotations

import logging
import os
import socket
from typing import Callable, Protocol

log = logging.getLogger(__name__)


def notify(message: str) -> bool:
    """Send one notification to the service manager; True if it was sent.

    False when ``$NOTIFY_SOCKET`` is unset (not under ``Type=notify``), names
    an address family this helper does not speak, or the send failed (logged;
    a lost notification must never take the service down).
    """
    address = os.environ.get("NOTIFY_SOCKET", "")
    if not address:
        return False
    if address[0] == "@":
        address = "\0" + address[1:]  # abstract namespace
    elif address[0] != "/":
        log.warning("NOTIFY_SOCKET=%r is neither a path nor an abstract name; not notifying", address)
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:  # not inheritable (PEP 446)
            sock.settimeout(5.0)  # never hang the service's loop on a stuck manager
            sock.connect(address)
            sock.sendall(message.encode("utf-8"))
    except OSError as exc:
        log.warning("systemd notification %r not sent: %s", message.split("\n", 1)[0], exc)
        return False
    return True


def watchdog_interval() -> float | None:
    """The watchdog timeout in seconds from ``$WATCHDOG_USEC``, or None when there is none for us.

    None when the variable is unset, not a positive integer, or when
    ``$WATCHDOG_PID`` is set to another process (the variables were inherited
    by a child of the service). Ping at half this interval (sd_watchdog_enabled(3)).
    """
    usec = os.environ.get("WATCHDOG_USEC", "")
    pid = os.environ.get("WATCHDOG_PID", "")
    if pid:
        try:
            if int(pid) != os.getpid():
                return None
        except ValueError:
            return None
    try:
        value = int(usec)
    except ValueError:
        return None
    return value / 1_000_000 if value > 0 else None


class _Scheduler(Protocol):
    def call_every(self, interval: float, fn: Callable[[], None]) -> None: ...


def start_watchdog(loop: _Scheduler) -> float | None:
    """Send ``WATCHDOG=1`` from ``loop`` every half watchdog interval; returns the interval used.

    The pings come from the loop's own timers, so a loop that hangs (or a job
    that runs longer than the watchdog timeout) stops them and systemd
    restarts the service. Nothing is scheduled without a watchdog.
    """
    timeout = watchdog_interval()
    if timeout is None:
        return None
    interval = timeout / 2
    loop.call_every(interval, lambda: notify("WATCHDOG=1"))
    notify("WATCHDOG=1")
    return interval
