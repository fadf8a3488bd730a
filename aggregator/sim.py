"""Many simulated agents, each a real MQTT client: on one thread, or over K processes.

Every agent is a normal :class:`~edge_agent.agent.AgentCore` behind a normal
:class:`~edge_agent.agent.AgentRunner`: the only thing simulated is the
device. All the connections of a :class:`Simulation` share one
:class:`~edge_agent.mqtt.Loop`, so 100 agents cost one thread and 100
sockets, not 100 threads.

One thread trains one agent at a time. :class:`ProcessSimulation`
(``fedmqtt sim --procs K``) runs K worker processes, each a
:class:`Simulation` of a contiguous block of the agents with its own Loop.
Workers are started with "spawn" (never fork: the parent has threads and
sockets). The parent builds the federation's data once from a
:class:`~aggregator.datasets.DataSpec` and hands each worker its agents'
part (a worker then imports neither scikit-learn nor the rest of the data);
agent i keeps its id, data and seed (:func:`agent_seed`), so the federation
computes exactly what one process computes. Every update still goes through
the broker. Apart from that build the parent only supervises: it stops the workers on request (its own
SIGINT/SIGTERM), reports a worker that dies with its exit code, and a worker
whose parent is gone (its pipe closes, even after SIGKILL) stops by itself.
"""

from __future__ import annotations

import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, replace
from typing import Sequence

from edge_agent.agent import AgentCore, AgentRunner
from edge_agent.config import BrokerConfig
from edge_agent.data import LocalData
from edge_agent.mqtt import Loop

from .datasets import DataSpec

log = logging.getLogger(__name__)

# Start method of the worker processes: a fresh interpreter each. (fork would
# copy a parent with threads, sockets and locks mid-use; forkserver would save
# little: a worker's start-up is its imports, which spawn runs in parallel.)
START_METHOD = "spawn"
# How often a worker looks at its pipe from the parent (a stop, or the parent gone).
WORKER_POLL_S = 0.1
# How long stop() waits for the workers to disconnect their agents before SIGTERM, then SIGKILL.
STOP_GRACE_S = 10.0
KILL_GRACE_S = 2.0
# Environment variables that set the thread count of numpy's BLAS (OpenBLAS,
# MKL, and OpenMP builds), read when numpy is imported. A worker trains its
# agents one after another on one thread, with matrices of a few thousand
# elements: BLAS threads there only fight the other workers for the cores
# (measured on 2 cores under load: 31 ms per 5-epoch digits training with the
# default threads, 0.8 ms with one). A value the user set is kept.
BLAS_THREAD_VARS = ("OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "OMP_NUM_THREADS")


def agent_id(index: int, prefix: str = "agent") -> str:
    """The id of simulated agent ``index``: agent-000, agent-001, ..."""
    return f"{prefix}-{index:03d}"


def agent_ids(n: int, prefix: str = "agent") -> list[str]:
    """The ids the simulator gives its agents: agent-000, agent-001, ..."""
    return [agent_id(i, prefix) for i in range(n)]


def agent_seed(seed: int, index: int) -> int:
    """Training seed of simulated agent ``index`` (so offline replays can match it)."""
    return seed * 100_003 + index


class Simulation:
    """N agents over one broker, driven by one Loop."""

    def __init__(
        self,
        broker: BrokerConfig,
        federation: str,
        datas: list[LocalData],
        seed: int = 0,
        prefix: str = "agent",
        loop: Loop | None = None,
        train_delay: float = 0.0,
        indices: Sequence[int] | None = None,
    ) -> None:
        """``indices``: the agent numbers of ``datas`` (default 0..N-1), which give their ids and seeds."""
        indices = range(len(datas)) if indices is None else indices
        if len(indices) != len(datas):
            raise ValueError(f"{len(datas)} data sets for {len(indices)} agent indices")
        self.loop = loop or Loop()
        self.finished = threading.Event()
        self._done: set[str] = set()
        self.runners = [
            AgentRunner(
                self.loop,
                AgentCore(agent_id=agent_id(i, prefix), fed=federation, data=d, seed=agent_seed(seed, i)),
                broker,
                on_done=self._agent_done,
                train_delay=train_delay,
            )
            for i, d in zip(indices, datas)
        ]

    def _agent_done(self, runner: AgentRunner) -> None:
        self._done.add(runner.core.agent_id)
        if len(self._done) == len(self.runners):
            self.finished.set()

    def start(self) -> None:
        """Connect every agent and run the loop in a background thread."""
        for r in self.runners:
            r.start()
        self.loop.start(name="fedmqtt-sim")

    def stop(self) -> None:
        """Disconnect every agent and end the loop thread."""
        self.loop.stop()
        if self.loop.thread is not None:
            self.loop.thread.join(timeout=10)


# --------------------------------------------------------------------------
# the agents over several processes (fedmqtt sim --procs K)


def available_cpus() -> int:
    """The cores this process may run on (its CPU affinity, else os.cpu_count())."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def resolve_procs(procs: int, agents: int) -> int:
    """Worker count for ``--procs``: 0 is one per core; never more workers than agents."""
    if procs < 0:
        raise ValueError(f"procs must be >= 0, got {procs}")
    return max(1, min(procs or available_cpus(), agents))


def shards(n: int, k: int) -> list[range]:
    """The agent indices of ``k`` workers: contiguous blocks whose sizes differ by at most one."""
    k = max(1, min(k, n))
    q, r = divmod(n, k)
    out, start = [], 0
    for w in range(k):
        size = q + (w < r)
        out.append(range(start, start + size))
        start += size
    return out


class WorkerError(RuntimeError):
    """A worker process failed: it died, or could not build or connect its agents.

    ``exit_code`` is what the command should exit with: 2 when the worker
    reported a configuration or data error (as the one-process path does), else 1.
    """

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


@dataclass(frozen=True)
class WorkerArgs:
    """Everything a worker needs, pickled to it at start: settings, and its own agents' data."""

    number: int  # 1-based, for messages
    of: int
    broker: BrokerConfig
    federation: str
    data: DataSpec
    indices: range
    seed: int
    prefix: str
    train_delay: float
    exit_when_done: bool
    log_level: int
    # This worker's agents' data, built once by the parent (ProcessSimulation.start):
    # K workers building the whole federation each cost K imports of
    # scikit-learn and K builds (at one process per agent, most of the start-up).
    datas: tuple[LocalData, ...] = ()


def _send(conn, msg: object) -> None:
    try:
        conn.send(msg)
    except OSError:  # the parent is gone: nobody to tell
        pass


def worker_main(args: WorkerArgs, conn) -> None:
    """A worker process: build its agents' data, run their Simulation until told to stop.

    Messages to the parent: ("started",), ("done",) once every agent saw the
    federation finish, ("error", exit_code, text) before exiting because of a
    failure. From the parent: "stop". EOF on the pipe (the parent died, even
    by SIGKILL) stops the worker too: no orphans.
    """
    # Ctrl-C reaches the whole process group: the parent alone decides, and
    # tells us. (It blocked SIGINT around our start, so none came before this.)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    logging.basicConfig(level=args.log_level,
                        format=f"%(asctime)s %(levelname)s [worker {args.number}/{args.of}] %(name)s: %(message)s")
    from edge_agent.config import ConfigError
    from edge_agent.data import DataError

    from .partition import PartitionError

    t0 = time.monotonic()
    try:
        datas = list(args.datas)
        sim = Simulation(args.broker, args.federation, datas, seed=args.seed, prefix=args.prefix,
                         train_delay=args.train_delay, indices=args.indices)
    except (ConfigError, DataError, PartitionError, ValueError) as exc:
        kind = "config error" if isinstance(exc, ConfigError) else "error"
        _send(conn, ("error", 2, f"{kind}: {exc}"))
        sys.exit(2)
    sim.start()
    log.info("%d agents built in %.2f s; connecting", len(sim.runners), time.monotonic() - t0)
    _send(conn, ("started",))
    code, reported = 0, False
    try:
        while True:
            if conn.poll(WORKER_POLL_S):
                try:
                    msg = conn.recv()
                except EOFError:
                    log.warning("the parent process is gone: stopping %d agents", len(sim.runners))
                    break
                if msg == "stop":
                    break
            if sim.finished.is_set() and not reported:
                reported = True
                _send(conn, ("done",))
                if args.exit_when_done:
                    break
            if sim.loop.thread is None or not sim.loop.thread.is_alive():
                # An agent's connection failed for good (refused login...) and stopped the loop.
                fatal = next((r.conn.fatal for r in sim.runners if r.conn.fatal), None)
                _send(conn, ("error", 2, f"broker: {fatal}") if fatal else ("error", 1, "the agents' loop stopped"))
                code = 2 if fatal else 1
                break
    finally:
        sim.stop()
    sys.exit(code)


@dataclass
class _Worker:
    args: WorkerArgs
    process: multiprocessing.process.BaseProcess
    conn: multiprocessing.connection.Connection
    started: bool = False
    done: bool = False
    exited: bool = False
    error: tuple[int, str] | None = None

    def describe(self, prefix: str) -> str:
        r = self.args.indices
        agents = agent_id(r[0], prefix) + (f"..{agent_id(r[-1], prefix)}" if len(r) > 1 else "")
        return f"worker {self.args.number}/{self.args.of} (pid {self.process.pid}, agents {agents})"


def exit_description(code: int | None) -> str:
    """'exited with code 3', 'was killed by SIGKILL (exit code -9)'."""
    if code is not None and code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"was killed by {name} (exit code {code})"
    return f"exited with code {code}"


class ProcessSimulation:
    """The agents of a :class:`Simulation` spread over ``procs`` worker processes.

    Agent i is the same as in one process: id ``agent_id(i)``, seed
    ``agent_seed(seed, i)``, its part of ``data.build()``. Call :meth:`start`,
    then :meth:`wait` repeatedly (it raises :class:`WorkerError` when a worker
    fails), and :meth:`stop` in a ``finally``. As for any "spawn" start, a
    worker imports the program's main module: a script must start the
    simulation under ``if __name__ == "__main__":``.
    """

    def __init__(
        self,
        broker: BrokerConfig,
        federation: str,
        data: DataSpec,
        procs: int,
        seed: int = 0,
        prefix: str = "agent",
        train_delay: float = 0.0,
        exit_when_done: bool = False,
        log_level: int | None = None,
    ) -> None:
        self.prefix = prefix
        self.exit_when_done = exit_when_done
        blocks = shards(data.agents, procs)
        level = logging.getLogger().getEffectiveLevel() if log_level is None else log_level
        self._args = [
            WorkerArgs(k + 1, len(blocks), broker, federation, data, r, seed, prefix, train_delay,
                       exit_when_done, level)
            for k, r in enumerate(blocks)
        ]
        self.workers: list[_Worker] = []
        self._stopping = False

    @property
    def procs(self) -> int:
        return len(self._args)

    @property
    def agents(self) -> int:
        return sum(len(a.indices) for a in self._args)

    @property
    def finished(self) -> bool:
        """Every worker reported that all its agents saw the federation finish."""
        return bool(self.workers) and all(w.done for w in self.workers)

    def start(self) -> None:
        """Build the federation's data once, then start every worker with its part (they connect in parallel).

        Raises :class:`WorkerError` (exit code 2) when the data cannot be built
        (a bad partition, say), before any worker is started.
        """
        from edge_agent.config import ConfigError
        from edge_agent.data import DataError

        from .partition import PartitionError

        t0 = time.monotonic()
        try:
            built = self._args[0].data.build().agents if self._args else []
        except (ConfigError, DataError, PartitionError, ValueError) as exc:
            raise WorkerError(f"config error: {exc}" if isinstance(exc, ConfigError) else str(exc), 2) from None
        self._args = [replace(a, datas=tuple(built[i] for i in a.indices)) for a in self._args]
        del built
        log.info("data of %d agents built in %.2f s", self.agents, time.monotonic() - t0)
        ctx = multiprocessing.get_context(START_METHOD)
        unset = [k for k in BLAS_THREAD_VARS if k not in os.environ]
        os.environ.update({k: "1" for k in unset})  # inherited by the spawned interpreters
        try:
            self._spawn(ctx)
        finally:
            for k in unset:
                os.environ.pop(k, None)

    def _spawn(self, ctx) -> None:
        for args in self._args:
            parent_end, child_end = ctx.Pipe()
            proc = ctx.Process(target=worker_main, args=(args, child_end), name=f"fedmqtt-sim-{args.number}",
                               daemon=True)  # daemon: multiprocessing's atexit ends it if we crash
            # SIGINT blocked across the spawn: a new worker ignores Ctrl-C from its
            # first instruction (the mask is inherited through exec).
            old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
            try:
                proc.start()
            finally:
                signal.pthread_sigmask(signal.SIG_SETMASK, old)
            child_end.close()
            w = _Worker(args, proc, parent_end)
            self.workers.append(w)
            log.info("%s started", w.describe(self.prefix))

    def _drain(self, w: _Worker) -> None:
        try:
            while not w.conn.closed and w.conn.poll(0):
                msg = w.conn.recv()
                if msg[0] == "started":
                    w.started = True
                elif msg[0] == "done":
                    w.done = True
                elif msg[0] == "error":
                    w.error = (msg[1], msg[2])
        except (EOFError, OSError):
            w.conn.close()

    def wait(self, timeout: float) -> bool:
        """Handle what the workers said or did for up to ``timeout`` s; True once the run is over.

        Over means: every worker reported the federation finished and, with
        ``exit_when_done``, exited. Raises :class:`WorkerError` (the run is
        broken; call :meth:`stop`) when a worker exits otherwise, or reports an error.
        """
        watch = [w.conn for w in self.workers if not w.conn.closed]
        watch += [w.process.sentinel for w in self.workers if not w.exited]
        if watch:
            multiprocessing.connection.wait(watch, timeout)
        for w in self.workers:
            self._drain(w)
            if not w.exited and w.process.exitcode is not None:
                w.exited = True
                self._drain(w)
                code = w.process.exitcode
                if self._stopping or (code == 0 and w.done and self.exit_when_done):
                    continue
                why = f": {w.error[1]}" if w.error else ""
                raise WorkerError(f"{w.describe(self.prefix)} {exit_description(code)}{why}",
                                  w.error[0] if w.error else 1)
        return self.finished and (not self.exit_when_done or all(w.exited for w in self.workers))

    def stop(self, timeout: float = STOP_GRACE_S) -> None:
        """Stop every worker: ask (agents disconnect cleanly), then SIGTERM, then SIGKILL. Idempotent."""
        self._stopping = True
        alive = [w for w in self.workers if w.process.exitcode is None]
        for w in alive:
            if not w.conn.closed:
                _send(w.conn, "stop")
        deadline = time.monotonic() + timeout
        for w in alive:
            w.process.join(max(0.0, deadline - time.monotonic()))
        for escalate in ("terminate", "kill"):
            late = [w for w in alive if w.process.exitcode is None]
            if not late:
                break
            for w in late:
                log.warning("%s did not stop in time: %s", w.describe(self.prefix), escalate)
                getattr(w.process, escalate)()
            for w in late:
                w.process.join(KILL_GRACE_S)
        for w in self.workers:
            w.exited = w.exited or w.process.exitcode is not None
            if not w.conn.closed:
                w.conn.close()
