"""The ingest workers of ``[workers] spawn = true``: started, watched and restarted by the aggregator."""

from __future__ import annotations

import ctypes
import logging
import signal
import subprocess
import sys
import time

from edge_agent.mqtt import Loop

log = logging.getLogger(__name__)

# How often the children are checked. A dead worker's share of the updates
# queues in its broker session until it is back, so a second is soon enough.
CHECK_INTERVAL_S = 0.5
# Restart delay after a crash, doubled on each quick crash up to the maximum:
# a worker that cannot start (broker down) is not restarted in a tight loop.
RESTART_MIN_S = 0.5
RESTART_MAX_S = 30.0
# A worker that ran this long before dying starts again after RESTART_MIN_S.
STABLE_S = 60.0
# Exit code of a refusal that a restart cannot fix (config error, broker refused the login).
EXIT_CONFIG_ERROR = 2
STOP_TIMEOUT_S = 5.0


PR_SET_PDEATHSIG = 1  # linux/prctl.h


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when the aggregator dies, even by SIGKILL.

    Otherwise a killed aggregator would leave its workers running, and the
    restarted one would start a second set under the same client ids: the
    broker would hand each session back and forth between the two.
    """
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):  # not Linux: the workers outlive a killed aggregator
        pass


class WorkerSupervisor:
    """Runs ``fedmqtt worker <argv> --index i`` for i in 0..count-1 and keeps them running."""

    def __init__(self, loop: Loop, argv: list[str], count: int) -> None:
        self.loop = loop
        self.argv = list(argv)
        self.count = count
        self.procs: dict[int, subprocess.Popen] = {}
        self._started_at: dict[int, float] = {}
        self._delay: dict[int, float] = {i: RESTART_MIN_S for i in range(count)}
        self._due: dict[int, float] = {}
        self.given_up: set[int] = set()
        self.restarts = 0

    def command(self, index: int) -> list[str]:
        return [sys.executable, "-m", "fedmqtt", "worker", *self.argv, "--index", str(index)]

    def start(self) -> None:
        for i in range(self.count):
            self._spawn(i)
        self.loop.call_every(CHECK_INTERVAL_S, self._check)
        self.loop.at_shutdown(self.stop)

    def _spawn(self, i: int) -> None:
        self.procs[i] = subprocess.Popen(self.command(i), preexec_fn=_die_with_parent)
        self._started_at[i] = time.monotonic()
        log.info("ingest worker %d started (pid %d)", i, self.procs[i].pid)

    def _check(self) -> None:
        now = time.monotonic()
        for i in range(self.count):
            if i in self.given_up:
                continue
            p = self.procs.get(i)
            if p is not None and p.poll() is None:
                continue
            if p is not None:
                del self.procs[i]
                code = p.returncode
                if code == EXIT_CONFIG_ERROR:
                    self.given_up.add(i)
                    log.error("ingest worker %d exited with a configuration or broker refusal (exit 2): not "
                              "restarted; its log line above says what to fix", i)
                    continue
                lived = now - self._started_at[i]
                self._delay[i] = RESTART_MIN_S if lived >= STABLE_S else min(RESTART_MAX_S, self._delay[i] * 2)
                self._due[i] = now + self._delay[i]
                log.warning("ingest worker %d exited (code %s) after %.1f s; restarting in %.1f s", i, code, lived,
                            self._delay[i])
            if now >= self._due.get(i, 0.0):
                self._due.pop(i, None)
                self.restarts += 1
                self._spawn(i)

    def stop(self) -> None:
        """Stop every worker (SIGTERM, then SIGKILL after STOP_TIMEOUT_S)."""
        for p in self.procs.values():
            if p.poll() is None:
                p.terminate()
        deadline = time.monotonic() + STOP_TIMEOUT_S
        for p in self.procs.values():
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self.procs.clear()
