"""`fedmqtt sim --procs K`: the agents over K worker processes, over a real mosquitto.

The same federation as with one process, bit for bit; no worker outlives
its parent (stopped by a signal, or killed); a worker that dies is reported
with its exit code and fails the run instead of hanging it.
"""

from __future__ import annotations

import argparse
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from aggregator.argtypes import procs as procs_arg
from aggregator.config import AggregatorConfig, ModelConfig, RoundConfig, TrainingConfig
from aggregator.datasets import DataSpec, federated_digits
from aggregator.sim import exit_description, resolve_procs, shards

from .conftest import WAIT_S, offline_fedavg

FEDMQTT = str(Path(sys.executable).parent / "fedmqtt")
WORKER_STARTED = re.compile(r"worker (\d+)/(\d+) \(pid (\d+), agents ([\w.-]+)\) started")


def test_shards_are_contiguous_balanced_and_cover_every_agent_once():
    assert shards(10, 3) == [range(0, 4), range(4, 7), range(7, 10)]
    assert shards(3, 8) == [range(0, 1), range(1, 2), range(2, 3)]  # never an empty worker
    for n, k in [(1, 1), (7, 2), (100, 7), (50, 50)]:
        blocks = shards(n, k)
        assert [i for r in blocks for i in r] == list(range(n))
        assert max(map(len, blocks)) - min(map(len, blocks)) <= 1


def test_procs_values():
    assert procs_arg("auto") == 0 and procs_arg("0") == 0 and procs_arg("3") == 3
    for bad in ("-1", "two"):
        with pytest.raises(argparse.ArgumentTypeError):
            procs_arg(bad)
    assert resolve_procs(0, 1000) == len(os.sched_getaffinity(0))  # 0: one per core
    assert resolve_procs(8, 3) == 3 and resolve_procs(1, 10) == 1
    assert exit_description(-9) == "was killed by SIGKILL (exit code -9)"
    assert exit_description(3) == "exited with code 3"


def test_data_spec_builds_what_the_one_process_simulator_built():
    a = DataSpec(5, "digits", "dirichlet", 0.5, seed=4, holdout=0.2).build()
    b = federated_digits(5, "dirichlet", 0.5, 4, 0.2)
    for x, y in zip(a.agents, b.agents):
        np.testing.assert_array_equal(x.X_train, y.X_train)
        np.testing.assert_array_equal(x.y_holdout, y.y_holdout)


def digits_config(fed, broker_config, tmp_path, rounds, min_agents) -> AggregatorConfig:
    return AggregatorConfig(
        federation=fed,
        rounds=rounds,
        state_dir=str(tmp_path / f"state-{fed}"),
        model=ModelConfig(kind="softmax", n_features=64, n_outputs=10),
        training=TrainingConfig(epochs=2, batch_size=16, lr=0.1),
        round=RoundConfig(min_agents=min_agents, quorum=1, timeout=WAIT_S),
        broker=broker_config,
    )


@pytest.mark.broker
def test_procs_2_computes_the_model_of_procs_1_bit_for_bit(fed, broker, broker_config, tmp_path, start_aggregator):
    """A 2-round federation of 7 agents: `--procs 2` gives exactly the final model of `--procs 1`."""
    n, seed = 7, 4
    finals, cfgs = {}, {}
    for k in (1, 2):
        cfg = digits_config(f"{fed}-p{k}", broker_config, tmp_path, rounds=2, min_agents=n)
        ra = start_aggregator(cfg)
        proc = subprocess.run(
            [FEDMQTT, "sim", "--agents", str(n), "--procs", str(k), "--broker", broker.address,
             "--federation", cfg.federation, "--seed", str(seed), "--partition", "dirichlet", "--exit-when-done"],
            capture_output=True, text=True, timeout=120,
        )
        assert proc.returncode == 0, proc.stderr
        ra.wait_finished()
        assert [ra.rounds.get_nowait().summary.participants for _ in range(2)] == [n, n]
        assert not ra.coordinator.rejected
        if k == 2:
            assert f"{n} agents over 2 worker processes" in proc.stderr
            started = WORKER_STARTED.findall(proc.stderr)
            assert sorted((w, a) for w, _, _, a in started) == [("1", "agent-000..agent-003"),
                                                                ("2", "agent-004..agent-006")]
        finals[k], cfgs[k] = ra.coordinator.params, cfg
    assert finals[1].keys() == finals[2].keys()
    for key in finals[1]:
        assert finals[1][key].dtype == finals[2][key].dtype == np.float32
        assert np.array_equal(finals[1][key], finals[2][key]), f"{key} differs between --procs 1 and --procs 2"
    # and it is the federation computed offline with the simulator's data and seeds
    expected = offline_fedavg(federated_digits(n, "dirichlet", 0.5, seed).agents, cfgs[2], seed, 2)
    for key in expected:
        np.testing.assert_allclose(finals[2][key], expected[key], atol=1e-6, rtol=0)


class SimProcess:
    """`fedmqtt sim --procs K` as a subprocess, with its stderr read line by line."""

    def __init__(self, broker, fed: str, agents: int, procs: int, env: dict[str, str] | None = None) -> None:
        self.proc = subprocess.Popen(
            [FEDMQTT, "sim", "--agents", str(agents), "--procs", str(procs), "--broker", broker.address,
             "--federation", fed, "--partition", "iid"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env,
            start_new_session=True,  # its own process group, as a shell job: Ctrl-C is killpg(SIGINT)
        )
        self.lines: queue.Queue = queue.Queue()
        self.stderr: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.stderr.append(line)
            self.lines.put(line)

    def wait_for_workers(self, k: int) -> dict[int, int]:
        """Worker number -> pid, once all k have built their agents and started connecting them."""
        pids: dict[int, int] = {}
        connecting: set[str] = set()
        end = time.monotonic() + WAIT_S
        while len(pids) < k or len(connecting) < k:
            try:
                line = self.lines.get(timeout=max(0.01, end - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"workers did not start: {''.join(self.stderr)}") from None
            if m := WORKER_STARTED.search(line):
                pids[int(m[1])] = int(m[3])
            if m := re.search(r"\[worker (\d+)/\d+\] aggregator\.sim: \d+ agents built", line):
                connecting.add(m[1])
        for pid in pids.values():  # children of the command, not of anyone else
            assert parent_of(pid) == self.proc.pid
        return pids

    def wait(self, timeout: float = WAIT_S) -> int:
        try:
            return self.proc.wait(timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()

    def kill_all(self, pids) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        for pid in pids:
            if running(pid):
                os.kill(pid, signal.SIGKILL)


def _stat(pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()
    except FileNotFoundError:
        return None


def running(pid: int) -> bool:
    """The process exists and is not a zombie (an orphan's zombie waits for whoever reaps it)."""
    st = _stat(pid)
    return st is not None and st[0] not in ("Z", "X")


def parent_of(pid: int) -> int | None:
    st = _stat(pid)
    return int(st[1]) if st is not None else None


def wait_gone(pids, timeout: float) -> list[int]:
    """The pids still running after up to ``timeout`` s."""
    end = time.monotonic() + timeout
    while (left := [p for p in pids if running(p)]) and time.monotonic() < end:
        time.sleep(0.05)
    return left


@pytest.mark.broker
@pytest.mark.parametrize("how", ["SIGINT", "SIGTERM", "Ctrl-C", "SIGKILL"])
def test_no_worker_outlives_the_parent(fed, broker, how):
    """SIGINT/SIGTERM: the parent stops its workers and returns; SIGKILL: they see their pipe close and stop.

    Ctrl-C reaches the whole process group: the workers ignore it and the parent stops them, cleanly.
    """
    sim = SimProcess(broker, fed, agents=4, procs=2)
    pids: dict[int, int] = {}
    sig = signal.SIGINT if how == "Ctrl-C" else signal.Signals[how]
    try:
        pids = sim.wait_for_workers(2)
        assert all(running(p) for p in pids.values())
        if how == "Ctrl-C":
            os.killpg(sim.proc.pid, signal.SIGINT)
        else:
            sim.proc.send_signal(sig)
        rc = sim.wait()
        if sig == signal.SIGKILL:
            assert rc == -signal.SIGKILL
            # a worker notices within WORKER_POLL_S, then disconnects its agents (bounded by CLOSE_FLUSH_S)
            assert wait_gone(pids.values(), 10.0) == [], f"orphaned workers: {''.join(sim.stderr)}"
        else:
            assert rc == 0, "".join(sim.stderr)
            # the parent waited for them: none is left, not even as a zombie
            assert [p for p in pids.values() if _stat(p) is not None] == [], "".join(sim.stderr)
            assert "Traceback" not in "".join(sim.stderr)
    finally:
        sim.kill_all(pids.values())


@pytest.mark.broker
def test_a_killed_worker_is_reported_with_its_exit_code(fed, broker):
    sim = SimProcess(broker, fed, agents=4, procs=2)
    pids: dict[int, int] = {}
    try:
        pids = sim.wait_for_workers(2)
        os.kill(pids[1], signal.SIGKILL)
        rc = sim.wait(timeout=WAIT_S)  # reported, not hung
        err = "".join(sim.stderr)
        assert rc == 1, err
        assert (f"fedmqtt sim: error: worker 1/2 (pid {pids[1]}, agents agent-000..agent-001) "
                f"was killed by SIGKILL (exit code -9)") in err
        assert [p for p in pids.values() if _stat(p) is not None] == []  # the other one was stopped and reaped
    finally:
        sim.kill_all(pids.values())


@pytest.mark.broker
def test_data_that_cannot_be_built_fails_the_run_with_the_reason_before_any_worker_starts(fed, broker):
    proc = subprocess.run(
        [FEDMQTT, "sim", "--agents", "140", "--procs", "2", "--broker", broker.address, "--federation", fed,
         "--partition", "dirichlet", "--alpha", "0.01", "--exit-when-done"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert "fedmqtt sim: error: no Dirichlet" in proc.stderr and "started" not in proc.stderr
    assert "Dirichlet" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.broker
def test_workers_run_numpy_with_one_blas_thread_unless_the_user_chose(fed, broker):
    """Many small trainings per worker: BLAS threads would only fight the other workers for the cores."""
    env = {k: v for k, v in os.environ.items() if k not in ("OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")}
    env["OMP_NUM_THREADS"] = "3"  # the user's own setting is kept
    sim = SimProcess(broker, fed, agents=4, procs=2, env=env)
    pids: dict[int, int] = {}
    try:
        pids = sim.wait_for_workers(2)
        for pid in pids.values():
            with open(f"/proc/{pid}/environ", "rb") as fh:
                seen = dict(kv.split(b"=", 1) for kv in fh.read().split(b"\0") if b"=" in kv)
            assert (seen.get(b"OPENBLAS_NUM_THREADS"), seen.get(b"MKL_NUM_THREADS"), seen.get(b"OMP_NUM_THREADS")) \
                == (b"1", b"1", b"3")
    finally:
        sim.kill_all(pids.values())
