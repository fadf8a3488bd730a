"""Log lines for dropped messages that a flood cannot multiply.

Every dropped message is still counted exactly (the callers' counters);
only the log is thinned: at most :data:`LOG_BURST` lines per reason per
:data:`LOG_WINDOW_S`, then one line saying how many more were dropped
for that reason. Seen without it: a flood of garbage grew the log 100×.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Callable

# Enough lines to see what a problem looks like, few enough that a flood of
# thousands a second costs a line a minute.
LOG_BURST = 5
LOG_WINDOW_S = 60.0


@dataclass
class _Window:
    start: float
    logged: int = 0
    suppressed: int = 0


class RejectionLog:
    """``log(reason, detail)``: a WARNING line unless this reason already had its burst in this window."""

    def __init__(self, logger: logging.Logger, what: str = "dropped", burst: int = LOG_BURST,
                 window_s: float = LOG_WINDOW_S, clock: Callable[[], float] = time.monotonic) -> None:
        self.logger = logger
        self.what = what
        self.burst = burst
        self.window_s = window_s
        self.clock = clock
        self._windows: dict[str, _Window] = {}

    def log(self, reason: str, detail: str, prefix: str = "") -> None:
        now = self.clock()
        w = self._windows.get(reason)
        if w is None or now - w.start >= self.window_s:
            if w is not None and w.suppressed:
                self.logger.warning("%s%d more %s (%s) in %.0f s were not logged", prefix, w.suppressed, self.what,
                                    reason, now - w.start)
            w = self._windows[reason] = _Window(now)
        if w.logged < self.burst:
            w.logged += 1
            last = " (further ones for this reason are counted, not logged, for a while)" if w.logged == self.burst else ""
            self.logger.warning("%s%s (%s): %s%s", prefix, self.what, reason, detail, last)
        else:
            w.suppressed += 1
