"""A private mosquitto for the demo and the tests, started from the repo's mosquitto.conf.

The broker runs from a temporary copy of ``mosquitto.conf`` with the
listener moved to a free loopback port (``-p`` is ignored when the file has a
listener), persistence and log in the temporary directory, and ``user root``
when we are root (mosquitto otherwise drops to user ``mosquitto``, which
cannot write into a root-owned temporary directory).

Any other config file works too (``LocalBroker(conf=...)``): the tests run
the production config of deploy/mosquitto/ this way, with ``overrides``
pointing its TLS, password and ACL files at freshly provisioned ones.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Mapping

REPO_CONF = Path(__file__).resolve().parents[1] / "mosquitto.conf"
# Debian installs mosquitto and nats-server in /usr/sbin, which is not on a normal user's PATH.
SEARCH_DIRS = ("/usr/sbin", "/usr/local/sbin")
# How long a starting broker may take to accept connections. It takes
# milliseconds; seconds only on a badly overloaded machine.
START_TIMEOUT_S = 10.0
STOP_TIMEOUT_S = 5.0


class BrokerError(RuntimeError):
    """The local broker could not be started; the message says why and what to do."""


def find_binary(name: str) -> str | None:
    """Path of an executable on PATH or in SEARCH_DIRS (sbin, often not on a user's PATH), or None."""
    path = shutil.which(name)
    if path:
        return path
    for d in SEARCH_DIRS:
        candidate = Path(d) / name
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return None


def find_mosquitto() -> str:
    """Path of the mosquitto binary, or a BrokerError that says how to install it."""
    path = find_binary("mosquitto")
    if path:
        return path
    raise BrokerError(
        "mosquitto is not installed. `make demo` / `make test` install it with apt-get; "
        "by hand: apt-get install mosquitto (or pass --broker HOST:PORT to use another broker)"
    )


# Options render_config always sets itself (or drops, for pid_file and user).
_RENDERED = ("persistence_location", "log_dest", "pid_file", "user")


def file_tail(path: Path, chars: int = 2000) -> str:
    """The last ``chars`` characters of a broker's log file ("" when it cannot be read), for error messages."""
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return ""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def render_config(
    template: str, port: int, workdir: Path, overrides: Mapping[str, str | None] | None = None, extra: str = ""
) -> str:
    """The private copy of the config: our port, our data dir, our log, root if needed.

    Only the ``listener`` line itself is rewritten; the lines after it that
    configure the listener (a TLS listener's ``cafile``, ``certfile``,
    ``keyfile``, ``require_certificate``...) are kept as they are, so the
    template should have one listener (two would get the same port).
    ``overrides`` maps an option to its new value: every line setting that
    option is replaced in place (``None`` deletes it), and an option the
    template lacks is appended (after the last listener, so a listener
    option applies to it). ``extra`` is appended verbatim at the very end: a
    section whose options repeat or are positional, such as a bridge
    (``connection ...`` then its ``address`` and ``topic`` lines).
    """
    overrides = dict(overrides or {})
    for key in overrides:
        if key in _RENDERED or key == "listener" or not key or any(c.isspace() for c in key):
            raise ValueError(f"render_config: cannot override {key!r}")
    out = []
    done: set[str] = set()
    for line in template.splitlines():
        word = line.split("#", 1)[0].split()
        key = word[0] if word else ""
        if key == "listener":
            out.append(f"listener {port} 127.0.0.1")
        elif key in _RENDERED:
            continue
        elif key in overrides:
            if overrides[key] is not None and key not in done:
                out.append(f"{key} {overrides[key]}")
            done.add(key)
        else:
            out.append(line)
    out.extend(f"{k} {v}" for k, v in overrides.items() if k not in done and v is not None)
    out.append(f"persistence_location {workdir / 'data'}/")
    out.append(f"log_dest file {workdir / 'mosquitto.log'}")
    if os.geteuid() == 0:
        out.append("user root")
    if extra:
        out.append(extra.rstrip("\n"))
    return "\n".join(out) + "\n"


class LocalBroker:
    """A mosquitto on 127.0.0.1:<free port>, stopped on exit (also on Ctrl-C)."""

    def __init__(
        self,
        conf: str | Path = REPO_CONF,
        workdir: str | Path | None = None,
        overrides: Mapping[str, str | None] | None = None,
        extra: str = "",
    ) -> None:
        self.conf = Path(conf)
        self.overrides = dict(overrides or {})  # see render_config
        self.extra = extra  # appended verbatim (e.g. a bridge section), see render_config
        if not self.conf.is_file():
            raise BrokerError(f"{self.conf}: broker config not found (run from a fedmqtt checkout or pass --broker)")
        self._tmp = None if workdir else tempfile.TemporaryDirectory(prefix="fedmqtt-broker-")
        self.workdir = Path(workdir) if workdir else Path(self._tmp.name)
        (self.workdir / "data").mkdir(parents=True, exist_ok=True)
        self.binary = find_mosquitto()
        self.host = "127.0.0.1"
        self.port = 0
        self.proc: subprocess.Popen | None = None

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def log_path(self) -> Path:
        return self.workdir / "mosquitto.log"

    def start(self, port: int | None = None) -> "LocalBroker":
        """Start the broker (on ``port``, or the previous one, or a free one)."""
        self.port = port or self.port or free_port()
        conf = self.workdir / "mosquitto.conf"
        conf.write_text(render_config(self.conf.read_text(), self.port, self.workdir, self.overrides,
                                       self.extra))
        self.proc = subprocess.Popen(
            [self.binary, "-c", str(conf)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            start_new_session=True,  # Ctrl-C in the terminal is ours to handle, not mosquitto's
        )
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode(errors="replace") if self.proc.stderr else ""
                raise BrokerError(f"mosquitto exited with {self.proc.returncode}: {err.strip()} {self._log_tail()}")
            try:
                with socket.create_connection((self.host, self.port), timeout=0.2):
                    return self
            except OSError:
                time.sleep(0.02)
        self.stop()
        raise BrokerError(f"mosquitto did not accept connections on {self.address} within {START_TIMEOUT_S}s")

    def stop(self) -> None:
        """Stop with SIGTERM (mosquitto saves its persistence file), SIGKILL if it hangs."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        if self.proc.stderr:
            self.proc.stderr.close()

    def kill(self) -> None:
        """Stop hard (SIGKILL), as a crash would."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def _log_tail(self) -> str:
        return file_tail(self.log_path)

    def close(self) -> None:
        self.stop()
        if self._tmp is not None:
            self._tmp.cleanup()

    def __enter__(self) -> "LocalBroker":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()
