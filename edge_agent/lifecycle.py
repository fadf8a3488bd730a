"""The run/start/wait/stop life of a service on a Loop: what fedmqtt.Agent and fedmqtt.Aggregator share."""

from __future__ import annotations

import threading
import time

from .config import ConfigError
from .mqtt import Loop


# How often wait() looks whether stop() was called meanwhile (a waiter must not
# hang on a service stopped from another thread).
WAIT_SLICE_S = 0.1


class LoopService:
    """A service driven by a :class:`Loop`: :meth:`run` in the foreground, or :meth:`start` / :meth:`wait` /
    :meth:`stop` on a background thread (also as a context manager).

    Subclasses call ``_init_loop`` in their constructor, implement ``_begin`` (connect) and set
    ``finished`` when there is nothing more to do; ``fatal`` is why the broker refused the service
    for good, if it did.
    """

    loop: Loop
    finished: threading.Event
    fatal: str | None
    thread_name: str = "fedmqtt"

    def _init_loop(self, loop: Loop | None) -> None:
        self.loop = loop or Loop()
        self._own_loop = loop is None  # a caller's shared loop is theirs to run and stop
        self.finished = threading.Event()
        self.fatal = None
        self._started = False
        self._stopped = threading.Event()  # stop() was called: wait() returns, start() is refused

    def _begin(self) -> None:
        raise NotImplementedError

    def run(self) -> None:
        """Serve in this thread until :meth:`stop`, or until there is nothing more to do."""
        self._start_once()
        self.loop.run()
        self._raise_fatal()

    def start(self):
        """Serve on a background thread; returns self."""
        self._start_once()
        if self._own_loop:
            self.loop.start(name=self.thread_name)
        return self

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until the federation is done; False on timeout or when stopped first.

        Raises ConfigError if the broker refused us.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self.finished.is_set() and not self._stopped.is_set():
            left = WAIT_SLICE_S if deadline is None else min(WAIT_SLICE_S, deadline - time.monotonic())
            if left <= 0:
                break
            self.finished.wait(left)
        self._raise_fatal()
        return self.finished.is_set()

    def stop(self) -> None:
        """Disconnect and stop the loop, if it is this service's own."""
        self._stopped.set()
        if self._own_loop:
            self.loop.stop()
            if self.loop.thread is not None and self.loop.thread is not threading.current_thread():
                self.loop.thread.join(10)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _start_once(self) -> None:
        if self._started or self._stopped.is_set():
            raise RuntimeError(f"this {type(self).__name__} was already started or stopped; make a new one")
        self._started = True
        self._begin()

    def _raise_fatal(self) -> None:
        if self.fatal is not None:
            raise ConfigError(self.fatal)

    def _failed(self, problem: str) -> None:
        """Stopped for good (``problem`` says why, e.g. "broker: ..."): remember it, wake waiters, stop."""
        self.fatal = problem
        self.finished.set()
        if self._own_loop:
            self.loop.stop()
