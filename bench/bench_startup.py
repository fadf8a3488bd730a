"""Aggregator start-up: process start to systemd READY of a real ``fedmqtt aggregator``.

Measured: the wall time from ``subprocess.Popen`` of the ``fedmqtt``
console script (``fedmqtt aggregator --config FILE``) to the ``READY=1``
datagram it sends on ``$NOTIFY_SOCKET`` (a socket this script binds, as
systemd does for a ``Type=notify`` unit). READY=1 comes once the broker
accepted the aggregator and its start actions (the retained model and the
first task) were published. Then the process gets SIGTERM and must exit 0.

Three configurations, each a fresh state directory and federation on one
private mosquitto (``aggregator.broker.LocalBroker``), softmax 64->10,
``rounds = 0`` (run until stopped):

* ``dp+onnx off``: ``[onnx] every = 0``, ``[privacy] mode = "off"``
* ``onnx on``: ``[onnx] every = 1`` (the round-0 model is exported before READY)
* ``dp on``: ``[privacy] mode = "central"`` (dp-accounting RDP accountant)

Baseline, same run: ``python -c pass`` (interpreter start and exit) with the
same interpreter. A reference row times ``python -c "import aggregator.cli"``.
The cases alternate run by run (``_common.time_interleaved`` style) after one
warm-up run each.

Run: ``.venv/bin/python bench/bench_startup.py [--repeat 7]``
"""

from __future__ import annotations

import argparse
import itertools
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from aggregator.broker import LocalBroker  # noqa: E402

from _common import machine_line  # noqa: E402

CASES = {
    "dp+onnx off": {"onnx": "every = 0", "privacy": 'mode = "off"'},
    "onnx on": {"onnx": "every = 1", "privacy": 'mode = "off"'},
    "dp on": {"onnx": "every = 0",
              "privacy": 'mode = "central"\nnoise_multiplier = 1.0\npopulation = 100\nexpected_per_round = 10\nbudget = 8.0'},
}
READY_TIMEOUT_S = 60.0
_runs = itertools.count()


def fedmqtt_command() -> list[str]:
    script = Path(sys.executable).parent / "fedmqtt"
    return [str(script)] if script.exists() else [sys.executable, "-m", "fedmqtt"]


def write_config(tmp: Path, broker: LocalBroker, case: str) -> Path:
    n = next(_runs)
    fed = f"bench-start-{n}-{os.getpid()}"
    sections = CASES[case]
    path = tmp / f"{fed}.toml"
    path.write_text(
        f'federation = "{fed}"\nrounds = 0\nstate_dir = "{tmp / fed}"\n'
        '[model]\nkind = "softmax"\nn_features = 64\nn_outputs = 10\n'
        f'[onnx]\n{sections["onnx"]}\n'
        f'[privacy]\n{sections["privacy"]}\n'
        f'[broker]\nhost = "{broker.host}"\nport = {broker.port}\n'
    )
    return path


def time_to_ready(tmp: Path, broker: LocalBroker, case: str) -> float:
    """Seconds from Popen to READY=1 of one ``fedmqtt aggregator`` run."""
    config = write_config(tmp, broker, case)
    sock_path = tmp / "notify.sock"
    sock_path.unlink(missing_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("WATCHDOG_")}
    env["NOTIFY_SOCKET"] = str(sock_path)
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(sock_path))
        sock.settimeout(READY_TIMEOUT_S)
        t0 = time.perf_counter()
        proc = subprocess.Popen([*fedmqtt_command(), "aggregator", "--config", str(config)], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        try:
            while True:
                message = sock.recv(65536).decode()
                if "READY=1" in message.split("\n"):
                    elapsed = time.perf_counter() - t0
                    break
        finally:
            proc.send_signal(signal.SIGTERM)
            _, err = proc.communicate(timeout=30)
    if proc.returncode != 0:
        raise RuntimeError(f"{case}: fedmqtt aggregator exited {proc.returncode}: {err.decode()[-2000:]}")
    return elapsed


def time_python(code: str) -> float:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], check=True)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeat", type=int, default=7)
    a = ap.parse_args()
    print(machine_line())
    print(f"command: {' '.join(fedmqtt_command())} aggregator --config FILE; {a.repeat} runs each, interleaved")
    with LocalBroker() as broker, tempfile.TemporaryDirectory(prefix="bench-startup-") as d:
        tmp = Path(d)
        fns = {
            "python -c pass [baseline]": lambda: time_python("pass"),
            'python -c "import aggregator.cli" (reference)': lambda: time_python("import aggregator.cli"),
            **{f"fedmqtt aggregator, {case}": (lambda c=case: time_to_ready(tmp, broker, c)) for case in CASES},
        }
        for fn in fns.values():  # warm-up: page cache, .pyc files
            fn()
        samples: dict[str, list[float]] = {name: [] for name in fns}
        for _ in range(a.repeat):
            for name, fn in fns.items():
                samples[name].append(fn())
    base = min(samples["python -c pass [baseline]"])
    width = max(map(len, samples))
    print(f"\n{'to READY (or exit)':<{width}}  {'best s':>7}  {'median s':>8}  {'best - baseline':>15}")
    for name, s in samples.items():
        print(f"{name:<{width}}  {min(s):7.3f}  {statistics.median(s):8.3f}  {min(s) - base:15.3f}")


if __name__ == "__main__":
    main()
