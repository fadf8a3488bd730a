"""Process-tree measurements for the multi-process benchmarks (bench_flower.py, bench_scale.py).

Everything is read from /proc: RSS from ``/proc/<pid>/statm``, CPU from
``/proc/<pid>/stat`` (utime + stime, 10 ms ticks). A :class:`TreeSampler`
thread walks the descendants of this process every ``interval`` seconds,
sums their RSS (the "sum of RSS" of a run: shared pages count once per
process, so it overstates what the machine really spends) and keeps, per
role, the peak and a CPU timeline. It kills the whole tree when the sum
passes ``limit_bytes`` (a run that nears the machine's memory is stopped,
not the machine).

Benchmarks print figures; nothing here asserts a timing.
"""

from __future__ import annotations

import bisect
import os
import resource
import signal
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

PAGE = os.sysconf("SC_PAGE_SIZE")
TICK = os.sysconf("SC_CLK_TCK")
GiB = 1024 ** 3
MiB = 1024 ** 2


def _read_stat(pid: int) -> tuple[int, float] | None:
    """(ppid, CPU seconds) of a process, or None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            fields = fh.read().rsplit(b")", 1)[1].split()
    except OSError:
        return None
    return int(fields[1]), (int(fields[11]) + int(fields[12])) / TICK


def rss_bytes(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/statm", "rb") as fh:
            return int(fh.read().split()[1]) * PAGE
    except (OSError, IndexError, ValueError):
        return 0


def cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return fh.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def descendants(root: int) -> dict[int, float]:
    """{pid: CPU seconds} of every live descendant of ``root`` (not root itself)."""
    parent: dict[int, int] = {}
    cpu: dict[int, float] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        st = _read_stat(int(name))
        if st is not None:
            parent[int(name)], cpu[int(name)] = st
    children: dict[int, list[int]] = {}
    for pid, ppid in parent.items():
        children.setdefault(ppid, []).append(pid)
    out: dict[int, float] = {}
    todo = list(children.get(root, ()))
    while todo:
        pid = todo.pop()
        out[pid] = cpu[pid]
        todo.extend(children.get(pid, ()))
    return out


@dataclass
class Sample:
    t: float  # time.time()
    rss: dict[str, int]  # role -> summed RSS bytes
    cpu: dict[str, float]  # role -> cumulative CPU seconds of every process of that role seen so far
    procs: dict[str, int]  # role -> live process count


@dataclass
class TreeSampler:
    """Sample the RSS and CPU of this process's descendants, grouped by ``classify(pid, cmdline)``."""

    classify: Callable[[int, str], str]
    interval: float = 0.2
    limit_bytes: int = 16 * GiB
    samples: list[Sample] = field(default_factory=list)
    over_limit: bool = False
    _roles: dict[int, str] = field(default_factory=dict)
    _cpu_last: dict[int, float] = field(default_factory=dict)
    _rss_max: dict[int, int] = field(default_factory=dict)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> "TreeSampler":
        self._thread = threading.Thread(target=self._run, name="tree-sampler", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        self.sample()  # a last one

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def sample(self) -> Sample:
        live = descendants(os.getpid())
        rss: dict[str, int] = {}
        procs: dict[str, int] = {}
        for pid, c in live.items():
            role = self._roles.get(pid)
            if role is None:
                role = self.classify(pid, cmdline(pid))
                if role != "other":  # a child between fork and exec still shows our own command line: ask again
                    self._roles[pid] = role
            self._cpu_last[pid] = c
            r = rss_bytes(pid)
            self._rss_max[pid] = max(self._rss_max.get(pid, 0), r)
            rss[role] = rss.get(role, 0) + r
            procs[role] = procs.get(role, 0) + 1
        cpu: dict[str, float] = {}
        for pid, c in self._cpu_last.items():
            role = self._roles.get(pid, "other")
            cpu[role] = cpu.get(role, 0.0) + c
        s = Sample(time.time(), rss, cpu, procs)
        self.samples.append(s)
        if sum(rss.values()) > self.limit_bytes and not self.over_limit:
            self.over_limit = True
            for pid in live:
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
        return s

    # -- results --------------------------------------------------------------

    def peak_total(self, roles: set[str] | None = None) -> tuple[int, dict[str, int]]:
        """(largest summed RSS over the chosen roles, the per-role RSS of that sample)."""
        best, at = 0, {}
        for s in self.samples:
            tot = sum(v for k, v in s.rss.items() if roles is None or k in roles)
            if tot > best:
                best, at = tot, s.rss
        return best, dict(at)

    def peak_role(self, role: str) -> int:
        return max((s.rss.get(role, 0) for s in self.samples), default=0)

    def max_rss_of_one(self, role: str) -> int:
        """Largest RSS any single process of ``role`` reached."""
        return max((r for pid, r in self._rss_max.items() if self._roles.get(pid) == role), default=0)

    def role_pids(self, role: str) -> list[int]:
        return [pid for pid, r in self._roles.items() if r == role]

    def cpu_between(self, role: str, t0: float, t1: float) -> float:
        """CPU seconds of ``role`` between wall-clock t0 and t1, linearly interpolated between samples.

        /proc counts 10 ms ticks and samples come every ``interval``: a window
        of a few samples is approximate.
        """
        ts = [s.t for s in self.samples]
        if not ts:
            return 0.0

        def at(t: float) -> float:
            i = bisect.bisect_left(ts, t)
            if i <= 0:
                return self.samples[0].cpu.get(role, 0.0)
            if i >= len(ts):
                return self.samples[-1].cpu.get(role, 0.0)
            a, b = self.samples[i - 1], self.samples[i]
            ca, cb = a.cpu.get(role, 0.0), b.cpu.get(role, 0.0)
            return ca + (cb - ca) * (t - a.t) / max(b.t - a.t, 1e-9)

        return at(t1) - at(t0)

    def mean_rss_between(self, role: str, t0: float, t1: float) -> float:
        vals = [s.rss.get(role, 0) for s in self.samples if t0 <= s.t <= t1]
        return sum(vals) / len(vals) if vals else 0.0


def limit_address_space(gib: float) -> Callable[[], None]:
    """A ``preexec_fn`` that caps a child's address space (``ulimit -v``) at ``gib`` GiB (0: no cap)."""

    def apply() -> None:
        if gib > 0:
            n = int(gib * GiB)
            resource.setrlimit(resource.RLIMIT_AS, (n, n))

    return apply


def raise_nofile() -> int:
    """Raise this process's soft open-files limit to its hard limit (children inherit it); return it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def kill_tree(pids: list[int]) -> None:
    """SIGKILL these processes and their descendants (processes this benchmark started)."""
    for pid in pids:
        try:
            os.killpg(os.getpgid(pid), 0)
        except OSError:
            pass
    me = os.getpid()
    for pid in list(descendants(me)):
        if any(_is_below(pid, root) for root in pids):
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


def _is_below(pid: int, root: int) -> bool:
    seen = 0
    while pid > 1 and seen < 64:
        if pid == root:
            return True
        st = _read_stat(pid)
        if st is None:
            return False
        pid = st[0]
        seen += 1
    return False


def fmt_mib(b: float) -> str:
    return f"{b / MiB:,.0f}"
