"""systemd integration: sd_notify by hand, what the real services tell systemd, the unit files.

No systemd is needed to run these: a test binds the AF_UNIX datagram socket
that ``$NOTIFY_SOCKET`` names, the way the service manager does, and reads
what ``fedmqtt aggregator`` and ``fedmqtt agent`` send to it. The unit files
are checked with ``systemd-analyze`` when it is installed, and their
``ExecStart=`` flags against the real command-line parser always.
``MemoryDenyWriteExecute=`` is checked by running a signed round with ONNX
export under the same seccomp rules systemd installs for it.
"""

from __future__ import annotations

import os
import platform
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import uuid
from pathlib import Path

import numpy as np
import pytest

from edge_agent import systemd, wire
from edge_agent.topics import Topics

from .conftest import WAIT_S

ROOT = Path(__file__).resolve().parent.parent
UNIT_DIR = ROOT / "deploy" / "systemd"
UNITS = sorted(UNIT_DIR.glob("*.service"))
FEDMQTT = str(Path(sys.executable).parent / "fedmqtt")
INSTALLED_FEDMQTT = "/opt/fedmqtt/venv/bin/fedmqtt"


# --------------------------------------------------------------------------
# a stand-in for the service manager's end of $NOTIFY_SOCKET


class NotifyListener:
    """A bound AF_UNIX datagram socket; every datagram is one notification."""

    def __init__(self, address: str) -> None:
        """``address``: a path, or ``@name`` for the abstract namespace (as in $NOTIFY_SOCKET)."""
        self.env_value = address
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind("\0" + address[1:] if address.startswith("@") else address)
        self.received: list[str] = []

    def collect(self, seconds: float) -> list[str]:
        """Every notification arriving within ``seconds``."""
        out: list[str] = []
        end = time.monotonic() + seconds
        while (left := end - time.monotonic()) > 0:
            if select.select([self.sock], [], [], left)[0]:
                msg = self.sock.recv(4096).decode()
                self.received.append(msg)
                out.append(msg)
        return out

    def wait_for(self, line: str, timeout: float = WAIT_S) -> str:
        """The first notification with ``line`` (e.g. ``READY=1``) among its lines."""
        end = time.monotonic() + timeout
        while (left := end - time.monotonic()) > 0:
            if not select.select([self.sock], [], [], left)[0]:
                break
            msg = self.sock.recv(4096).decode()
            self.received.append(msg)
            if line in msg.split("\n"):
                return msg
        raise AssertionError(f"no {line} within {timeout}s; received {self.received}")

    def close(self) -> None:
        self.sock.close()


def lines(messages: list[str]) -> list[str]:
    return [ln for m in messages for ln in m.split("\n")]


@pytest.fixture
def short_dir():
    """A directory whose socket paths fit sun_path (108 bytes) whatever pytest's tmp_path is."""
    d = tempfile.mkdtemp(prefix="sd-", dir="/tmp")
    yield Path(d)
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def path_listener(short_dir):
    listener = NotifyListener(str(short_dir / "notify"))
    yield listener
    listener.close()


@pytest.fixture
def abstract_listener():
    listener = NotifyListener(f"@fedmqtt-test-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    yield listener
    listener.close()


# --------------------------------------------------------------------------
# (a) notify() and watchdog_interval()


def test_notify_without_notify_socket_is_a_no_op(monkeypatch):
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert systemd.notify("READY=1") is False


def test_notify_sends_one_datagram_to_a_socket_path(monkeypatch, path_listener):
    monkeypatch.setenv("NOTIFY_SOCKET", path_listener.env_value)
    assert systemd.notify("READY=1\nSTATUS=connected") is True
    assert path_listener.collect(0.2) == ["READY=1\nSTATUS=connected"]


def test_notify_sends_to_the_abstract_namespace(monkeypatch, abstract_listener):
    monkeypatch.setenv("NOTIFY_SOCKET", abstract_listener.env_value)
    assert systemd.notify("WATCHDOG=1") is True
    assert systemd.notify("STOPPING=1") is True
    assert abstract_listener.collect(0.2) == ["WATCHDOG=1", "STOPPING=1"]


def test_notify_failures_return_false_and_never_raise(monkeypatch, short_dir, caplog):
    monkeypatch.setenv("NOTIFY_SOCKET", str(short_dir / "nobody-listens"))
    assert systemd.notify("READY=1") is False
    monkeypatch.setenv("NOTIFY_SOCKET", "@fedmqtt-test-no-such-abstract-socket")
    assert systemd.notify("READY=1") is False
    monkeypatch.setenv("NOTIFY_SOCKET", "vsock:2:1234")  # newer systemd; not spoken here
    assert systemd.notify("READY=1") is False
    assert "not sent" in caplog.text and "neither a path nor an abstract name" in caplog.text


@pytest.mark.parametrize(
    "usec,pid,expected",
    [
        (None, None, None),
        ("400000", None, 0.4),
        ("30000000", "self", 30.0),
        ("400000", "other", None),  # inherited by a child of the service: not ours to ping
        ("400000", "garbage", None),
        ("0", None, None),
        ("-5", None, None),
        ("", None, None),
        ("abc", None, None),
    ],
)
def test_watchdog_interval(monkeypatch, usec, pid, expected):
    for name, value in (("WATCHDOG_USEC", usec), ("WATCHDOG_PID", pid)):
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            value = {"self": str(os.getpid()), "other": str(os.getpid() + 1)}.get(value, value)
            monkeypatch.setenv(name, value)
    assert systemd.watchdog_interval() == expected


def test_start_watchdog_pings_at_half_the_interval(monkeypatch, abstract_listener):
    class FakeLoop:
        def __init__(self) -> None:
            self.jobs: list = []

        def call_every(self, interval, fn) -> None:
            self.jobs.append((interval, fn))

    loop = FakeLoop()
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    assert systemd.start_watchdog(loop) is None and loop.jobs == []
    monkeypatch.setenv("NOTIFY_SOCKET", abstract_listener.env_value)
    monkeypatch.setenv("WATCHDOG_USEC", "30000000")
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    assert systemd.start_watchdog(loop) == 15.0
    [(interval, ping)] = loop.jobs
    assert interval == 15.0
    ping()
    assert abstract_listener.collect(0.2) == ["WATCHDOG=1", "WATCHDOG=1"]  # one at once, one from the timer


# --------------------------------------------------------------------------
# (b), (c) the real services


class GatedProxy:
    """A TCP relay to the broker that holds every connection until :meth:`open`.

    While closed, a client's TCP connection is up but its MQTT CONNECT gets
    no CONNACK: the service is running, not yet connected to the broker.
    """

    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self._open = threading.Event()
        self._stop = threading.Event()
        self.accepted = threading.Event()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.listener.settimeout(0.1)
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._accept, daemon=True).start()

    def open(self) -> None:
        self._open.set()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.accepted.set()
            threading.Thread(target=self._relay, args=(client,), daemon=True).start()

    def _relay(self, client: socket.socket) -> None:
        with client:
            while not self._open.wait(0.05):
                if self._stop.is_set():
                    return
            with socket.create_connection(self.target) as upstream:
                peer = {client: upstream, upstream: client}
                while not self._stop.is_set():
                    for s in select.select(list(peer), [], [], 0.1)[0]:
                        try:
                            data = s.recv(65536)
                            if not data:
                                return
                            peer[s].sendall(data)
                        except OSError:
                            return

    def close(self) -> None:
        self._stop.set()
        self.listener.close()


def _env(listener: NotifyListener, watchdog_usec: str = "400000") -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")}
    env.update(NOTIFY_SOCKET=listener.env_value, WATCHDOG_USEC=watchdog_usec)
    return env


def _stop(proc: subprocess.Popen, listener: NotifyListener) -> str:
    """SIGTERM, as systemctl stop sends it: STOPPING=1, then exit 0. Returns the output."""
    proc.send_signal(signal.SIGTERM)
    stopping = listener.wait_for("STOPPING=1")
    assert "STATUS=" in stopping
    out, _ = proc.communicate(timeout=WAIT_S)
    assert proc.returncode == 0, out
    return out


@pytest.mark.broker
def test_aggregator_is_ready_only_once_connected_then_pings_and_stops(fed, broker, tmp_path, raw_client,
                                                                      path_listener):
    toml = tmp_path / "aggregator.toml"
    toml.write_text(
        f'federation = "{fed}"\nrounds = 0\nstate_dir = "{tmp_path / "state"}"\n'
        "[round]\nmin_agents = 1000\n"  # no round ever opens: the service just waits
        "[onnx]\nevery = 0\n"
    )
    watcher = raw_client()
    watcher.subscribe(Topics(fed).model)
    proxy = GatedProxy(broker.host, broker.port)
    proc = subprocess.Popen([FEDMQTT, "aggregator", "--config", str(toml), "--broker", f"127.0.0.1:{proxy.port}"],
                            env=_env(path_listener), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        # Running and talking TCP, but the broker has not accepted it: alive, not ready.
        assert proxy.accepted.wait(WAIT_S), "the aggregator never tried to reach the broker"
        held = lines(path_listener.collect(1.5))
        assert "READY=1" not in held, held
        assert held.count("WATCHDOG=1") >= 3, held  # every 0.2 s from the loop
        assert any(ln.startswith("STATUS=") and "connecting to the broker" in ln for ln in held), held

        proxy.open()
        ready = path_listener.wait_for("READY=1")
        assert f"STATUS=federation {fed} on 127.0.0.1:{proxy.port}: connected, round 0" in ready.split("\n")
        # It really is on the broker: its retained model is there.
        payload, _ = watcher.wait_for(Topics(fed).model)
        assert wire.decode(payload, expect="model").round == 0

        after = lines(path_listener.collect(1.2))
        assert after.count("WATCHDOG=1") >= 3, after
        _stop(proc, path_listener)
        assert lines(path_listener.received).count("READY=1") == 1
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proxy.close()


@pytest.mark.broker
def test_aggregator_with_nothing_left_to_do_starts_then_stops_cleanly(fed, broker, tmp_path, path_listener):
    """Resumed at its last round: READY=1 then STOPPING=1 and exit 0.

    An exit 0 before READY=1 would be a failed start to systemd, and
    Restart=on-failure would start a finished federation over and over.
    """
    from aggregator import checkpoint
    from aggregator.config import AggregatorConfig
    from aggregator.coordinator import Coordinator
    from aggregator.strategies import make_strategy

    cfg = AggregatorConfig(federation=fed, rounds=1, state_dir=str(tmp_path / "state"))
    state = Coordinator(cfg, make_strategy(cfg.strategy)).snapshot()
    state["round"] = 1
    checkpoint.save(cfg.state_dir, state)
    toml = tmp_path / "aggregator.toml"
    toml.write_text(f'federation = "{fed}"\nrounds = 1\nstate_dir = "{cfg.state_dir}"\n[onnx]\nevery = 0\n')
    proc = subprocess.run([FEDMQTT, "aggregator", "--config", str(toml), "--broker", broker.address],
                          env=_env(path_listener), capture_output=True, text=True, timeout=WAIT_S)
    assert proc.returncode == 0, proc.stderr
    got = [ln for ln in lines(path_listener.collect(0.2)) if ln in ("READY=1", "STOPPING=1")]
    assert got == ["READY=1", "STOPPING=1"], path_listener.received


@pytest.mark.broker
def test_agent_is_ready_once_connected_then_pings_and_stops(fed, broker, tmp_path, raw_client, abstract_listener):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "data.npz", X=rng.random((30, 64), dtype=np.float32), y=np.arange(30) % 10)
    status_topic = Topics(fed).status("sd-agent")
    watcher = raw_client()
    watcher.subscribe(status_topic)
    proc = subprocess.Popen(
        [FEDMQTT, "agent", "--federation", fed, "--agent-id", "sd-agent", "--data", str(tmp_path / "data.npz"),
         "--state-dir", str(tmp_path / "agent-state"), "--broker", broker.address],
        env=_env(abstract_listener), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        ready = abstract_listener.wait_for("READY=1")
        assert f"STATUS=agent sd-agent of federation {fed} on {broker.address}: connected" in ready.split("\n")
        status = wire.decode(watcher.wait_for(status_topic)[0], expect="status")
        assert status.state == "online"
        pings = lines(abstract_listener.collect(1.2))
        assert pings.count("WATCHDOG=1") >= 3, pings
        _stop(proc, abstract_listener)
        # The clean stop still tells the fleet it left.
        assert wire.decode(watcher.wait_for(status_topic)[0], expect="status").state == "offline"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# --------------------------------------------------------------------------
# (d) the unit files


def parse_unit(path: Path) -> dict[str, list[str]]:
    """``Section.Key`` -> values, in order (continuation lines joined, comments dropped)."""
    out: dict[str, list[str]] = {}
    section = ""
    pending = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line[0] in "#;"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line, pending = pending + line, ""
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        out.setdefault(f"{section}.{key.strip()}", []).append(value.strip())
    return out


def test_the_three_units_exist():
    assert [u.name for u in UNITS] == ["fedmqtt-agent.service", "fedmqtt-aggregator.service",
                                       "fedmqtt-worker@.service"]


@pytest.mark.parametrize("unit", UNITS, ids=lambda p: p.name)
def test_unit_is_a_notify_service_with_a_watchdog_that_restarts_on_failure_only(unit):
    u = parse_unit(unit)
    assert u["Service.Type"] == ["notify"] and u["Service.NotifyAccess"] == ["main"]
    assert int(u["Service.WatchdogSec"][0]) >= 30
    assert u["Service.Restart"] == ["on-failure"]  # exit 0 = done or stopped: no restart
    assert u["Service.RestartPreventExitStatus"] == ["2"]  # a config error: restarting cannot help
    assert u["Service.MemoryDenyWriteExecute"] == ["yes"]
    assert u["Service.SystemCallFilter"][0] == "@system-service"
    assert u["Service.RestrictAddressFamilies"] == ["AF_UNIX AF_INET AF_INET6"]
    assert u["Install.WantedBy"] == ["multi-user.target"]


@pytest.mark.parametrize("unit", UNITS, ids=lambda p: p.name)
def test_unit_execstart_is_accepted_by_the_real_command_line(unit, tmp_path):
    """Every flag in ExecStart= is a real config key, and each credential it reads is loaded."""
    from edge_agent.cli import config_from_args

    u = parse_unit(unit)
    [execstart] = u["Service.ExecStart"]
    binary, command, *args = execstart.split()
    assert binary == INSTALLED_FEDMQTT and command in ("aggregator", "agent", "worker")
    if command == "worker":
        # The template's instance name is the worker's index; the rest is the aggregator's command line.
        assert args[:2] == ["--index", "%i"]
        args = args[2:]
    # Credentials used must be exactly those loaded (and each loaded one is used).
    used = set(re.findall(r"\$\{CREDENTIALS_DIRECTORY\}/([\w.-]+)", execstart))
    loaded = {v.split(":", 1)[0] for v in u["Service.LoadCredential"]}
    assert used == loaded and used
    assert all(v.split(":", 1)[1].startswith("/etc/fedmqtt/") for v in u["Service.LoadCredential"])
    # StateDirectory= is what --state-dir (a worker: its journal's --workers-state-dir) gets.
    state_flag = "--workers-state-dir" if command == "worker" else "--state-dir"
    assert state_flag in args and args[args.index(state_flag) + 1] == "${STATE_DIRECTORY}"
    state, creds = tmp_path / "state", tmp_path / "creds"
    creds.mkdir()
    for name in used:
        (creds / name).write_text("secret\n")
    example = ROOT / "deploy" / ("agent.toml" if command == "agent" else "aggregator.toml")
    argv = [a.replace("${STATE_DIRECTORY}", str(state)).replace("${CREDENTIALS_DIRECTORY}", str(creds)) for a in args]
    argv[argv.index("--config") + 1] = str(example)
    # What the provisioned config adds (TLS with a client certificate), which the key file needs.
    argv += ["--broker-tls", "true", "--broker-cert-file", str(tmp_path / "client.crt")]
    if command == "worker":
        # What a worker's config has besides: its login ([workers] username; the password is the credential).
        argv += ["--workers-count", "2", "--workers-username", "ingest"]
    if command == "agent":
        from edge_agent.agent_config import AgentConfig as cls
    else:
        from aggregator.config import AggregatorConfig as cls
    cfg = config_from_args(cls, f"fedmqtt {command}", "", "", argv)
    if command == "worker":
        from aggregator.ingest.worker import worker_broker, worker_state_dir

        assert worker_state_dir(cfg, 1) == state / "worker-1"
        assert worker_broker(cfg, 1).username == "ingest-1"
        assert worker_broker(cfg, 1).password_file == str(creds / "ingest-password")
        assert cfg.broker.key_file == str(creds / "client-key")
        return
    assert cfg.state_dir == str(state)
    assert cfg.broker.password_file == str(creds / "broker-password")
    assert cfg.broker.key_file == str(creds / "client-key")
    if command == "aggregator":
        assert cfg.security.signing_key == str(creds / "signing-key")


def test_aggregator_unit_loads_the_files_provisioning_writes():
    """`fedmqtt provision init --aggregator-dir /etc/fedmqtt` names exactly the files the unit loads."""
    from aggregator.provision import AGGREGATOR_USER, Files

    f = Files(Path("/etc/fedmqtt"))
    loaded = dict(v.split(":", 1) for v in parse_unit(UNIT_DIR / "fedmqtt-aggregator.service")["Service.LoadCredential"])
    assert loaded == {
        "broker-password": str(f.client(AGGREGATOR_USER, "password")),
        "client-key": str(f.client(AGGREGATOR_USER, "key")),
        "signing-key": str(f.signing_key),
    }


def _units_runnable_here(tmp_path: Path) -> list[str]:
    """Copies of the units whose ExecStart= names this venv's fedmqtt (verify checks the binary exists)."""
    out = []
    for unit in UNITS:
        # Same name (verify derives the unit name from it); a template as its instance 0.
        copy = tmp_path / unit.name.replace("@.", "@0.")
        copy.write_text(unit.read_text().replace(INSTALLED_FEDMQTT, FEDMQTT))
        out.append(str(copy))
    return out


needs_systemd_analyze = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None,
    reason="systemd-analyze not installed (Debian package 'systemd'); unit files not verified",
)


@needs_systemd_analyze
def test_systemd_analyze_verify_accepts_the_units(tmp_path):
    units = _units_runnable_here(tmp_path)
    proc = subprocess.run(["systemd-analyze", "verify", *units], capture_output=True, text=True, timeout=60)
    # verify exits 0 even for unknown keys and unparsable values: it only warns. Any word about our files fails.
    ours = [ln for ln in (proc.stdout + proc.stderr).splitlines() if "fedmqtt" in ln]
    assert proc.returncode == 0 and ours == [], proc.stdout + proc.stderr


@needs_systemd_analyze
def test_systemd_analyze_verify_would_catch_a_broken_unit(tmp_path):
    """The check above is not vacuous: a misspelt key and a bad value are reported."""
    units = _units_runnable_here(tmp_path)
    broken = Path(units[0])
    broken.write_text(broken.read_text().replace("WatchdogSec=", "WatchdogSec=soon\nWatchDogSec="))
    proc = subprocess.run(["systemd-analyze", "verify", str(broken)], capture_output=True, text=True, timeout=60)
    out = proc.stdout + proc.stderr
    assert "WatchDogSec" in out and "soon" in out, out


@needs_systemd_analyze
def test_systemd_analyze_security_rates_the_units_ok(tmp_path):
    units = _units_runnable_here(tmp_path)
    proc = subprocess.run(["systemd-analyze", "security", "--offline=yes", "--threshold=20", *units],
                          capture_output=True, text=True, timeout=60)
    if "--offline" in proc.stderr and "unrecognized" in proc.stderr:
        pytest.skip("systemd-analyze security --offline needs systemd >= 250")
    levels = re.findall(r"Overall exposure level for (\S+): ([\d.]+)", proc.stdout)
    assert len(levels) == len(UNITS) and proc.returncode == 0, proc.stdout + proc.stderr
    assert all(float(level) <= 2.0 for _, level in levels), levels


# --------------------------------------------------------------------------
# MemoryDenyWriteExecute=yes: a real signed round with ONNX export under its seccomp rules

# systemd's seccomp_memory_deny_write_execute() on x86-64, as a classic BPF
# program: EPERM for mmap with PROT_WRITE|PROT_EXEC, mprotect/pkey_mprotect
# adding PROT_EXEC, shmat with SHM_EXEC. The launcher installs it and execs
# the command, which inherits it (as a unit's ExecStart= does).
MDWE_LAUNCHER = textwrap.dedent(
    """
    import ctypes, os, sys

    class Insn(ctypes.Structure):
        _fields_ = [("code", ctypes.c_ushort), ("jt", ctypes.c_ubyte), ("jf", ctypes.c_ubyte), ("k", ctypes.c_uint32)]

    class Prog(ctypes.Structure):
        _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(Insn))]

    LD, JEQ, AND, RET = 0x20, 0x15, 0x54, 0x06
    ALLOW, EPERM, PROT = 0x7FFF0000, 0x00050001, 16 + 8 * 2
    insns = [
        (LD, 0, 0, 4), (JEQ, 1, 0, 0xC000003E), (RET, 0, 0, ALLOW),        # 0-2 x86-64 only
        (LD, 0, 0, 0),                                                      # 3 syscall number
        (JEQ, 4, 0, 9), (JEQ, 6, 0, 10), (JEQ, 5, 0, 329), (JEQ, 7, 0, 30), # 4-7 mmap mprotect pkey_mprotect shmat
        (RET, 0, 0, ALLOW),                                                 # 8
        (LD, 0, 0, PROT), (AND, 0, 0, 6), (JEQ, 6, 7, 6),                   # 9-11 mmap: W and X
        (LD, 0, 0, PROT), (AND, 0, 0, 4), (JEQ, 3, 4, 4),                   # 12-14 mprotect: X
        (LD, 0, 0, PROT), (AND, 0, 0, 0o100000), (JEQ, 0, 1, 0o100000),     # 15-17 shmat: SHM_EXEC
        (RET, 0, 0, EPERM), (RET, 0, 0, ALLOW),                             # 18-19
    ]
    arr = (Insn * len(insns))(*[Insn(*i) for i in insns])
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(38, 1, 0, 0, 0) or libc.prctl(22, 2, ctypes.byref(Prog(len(insns), arr)), 0, 0):
        sys.exit(f"seccomp: {os.strerror(ctypes.get_errno())}")
    os.execv(sys.argv[1], sys.argv[1:])
    """
)

PROBE = (
    "import mmap\n"
    "try:\n"
    "    mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)\n"
    "    print('allowed')\n"
    "except OSError as e:\n"
    "    print('refused', e.errno)\n"
)


@pytest.mark.broker
@pytest.mark.skipif(sys.platform != "linux" or platform.machine() != "x86_64",
                    reason="the seccomp program here is written for x86-64 Linux")
def test_memory_deny_write_execute_leaves_a_signed_round_with_onnx_working(fed, broker, tmp_path):
    pytest.importorskip("onnx")
    pytest.importorskip("cryptography")
    from aggregator import checkpoint
    from aggregator.provision import signing_keypair

    launcher = tmp_path / "mdwe.py"
    launcher.write_text(MDWE_LAUNCHER)

    def under_mdwe(*argv: str) -> list[str]:
        return [sys.executable, str(launcher), *argv]

    probe = subprocess.run(under_mdwe(sys.executable, "-c", PROBE), capture_output=True, text=True, timeout=60)
    if probe.returncode != 0:
        pytest.skip(f"cannot install a seccomp filter here: {probe.stderr.strip()}")
    assert probe.stdout.split() == ["refused", "1"], "the filter does not refuse W+X memory: the test would prove nothing"

    pem, public = signing_keypair()
    (tmp_path / "signing.key").write_bytes(pem)
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "data.npz", X=rng.random((40, 64), dtype=np.float32), y=np.arange(40) % 10)
    state = tmp_path / "state"
    (tmp_path / "aggregator.toml").write_text(
        f'federation = "{fed}"\nrounds = 1\nstate_dir = "{state}"\n'
        "[round]\nmin_agents = 1\ntimeout = 30.0\n"
        "[onnx]\nevery = 1\n"
        f'[security]\nsigning_key = "{tmp_path / "signing.key"}"\n'
    )
    (tmp_path / "agent.toml").write_text(
        f'federation = "{fed}"\nagent_id = "mdwe"\ndata = "{tmp_path / "data.npz"}"\n'
        f'exit_when_done = true\nstate_dir = "{tmp_path / "agent-state"}"\n'
        f'[security]\ntrusted_keys = ["{public}"]\n'
    )
    agg = subprocess.Popen(under_mdwe(FEDMQTT, "aggregator", "--config", str(tmp_path / "aggregator.toml"),
                                      "--broker", broker.address),
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    agent = subprocess.Popen(under_mdwe(FEDMQTT, "agent", "--config", str(tmp_path / "agent.toml"),
                                        "--broker", broker.address),
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        out, _ = agg.communicate(timeout=60)
        assert agg.returncode == 0, out
        aout, _ = agent.communicate(timeout=30)
        assert agent.returncode == 0, aout
    finally:
        for p in (agg, agent):
            if p.poll() is None:
                p.kill()
                p.wait()
    # The agent pins the key, so it trained only because the signatures verified.
    assert [h["participants"] for h in checkpoint.load(state)["history"]] == [1]
    assert (state / "latest.onnx").stat().st_size > 0
