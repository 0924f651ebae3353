"""Peak memory and CPU time of a benchmark: the summed RSS and CPU seconds of this process and
all its descendants (Ray's own processes included), sampled from /proc in a thread."""

from __future__ import annotations

import bisect
import threading
import time
from pathlib import Path


def process_table() -> dict[int, tuple[int, int, int]]:
    """pid -> (parent pid, RSS bytes, CPU clock ticks, user + system) for every process visible in
    /proc. Reaped children's ticks are left out: the sampler has counted them as processes."""
    import os

    page = os.sysconf("SC_PAGE_SIZE")
    table = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        table[int(stat.parent.name)] = (int(fields[1]), int(fields[21]) * page, int(fields[11]) + int(fields[12]))
    return table


def descendants(pid: int, table: dict[int, tuple[int, int, int]] | None = None) -> list[int]:
    """Every process below `pid` (children, grandchildren, …)."""
    children: dict[int, list[int]] = {}
    for child, (parent, *_) in (table or process_table()).items():
        children.setdefault(parent, []).append(child)
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


PSS_EVERY = 50  # samples between two readings of PSS: a reading walks every page each process maps


def _pss(pid: int) -> int:
    """A process's proportional set size (bytes): pages it shares with others (Ray's object store)
    count in part, so a tree's PSS sums to the memory it really holds, where RSS counts a shared
    page in every process that maps it."""
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class TreeMemory:
    """Peak summed RSS (bytes) of a process and its descendants (and their summed PSS,
    `peak_pss`), and their CPU seconds over time (`cpu_between`, `peak_between`): each process
    counts with the most CPU it was seen to have used, so one that exits keeps its share (what it
    did after the last sample, < `interval_s`, is missed)."""

    def __init__(self, interval_s: float = 0.1):
        import os

        self.interval_s, self.peak, self.peak_pss = interval_s, 0, 0
        self._ticks = os.sysconf("SC_CLK_TCK")
        self._cpu: dict[int, int] = {}
        self.samples: list[tuple[float, float, int]] = []  # (perf_counter, CPU seconds so far, summed RSS)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _take(self) -> None:
        import os

        table = process_table()
        me = os.getpid()
        tree = [me] + [pid for pid in descendants(me, table) if pid in table]
        rss = sum(table[pid][1] for pid in tree)
        self.peak = max(self.peak, rss)
        if len(self.samples) % PSS_EVERY == 0:  # PSS walks every mapped page: not at every sample
            self.peak_pss = max(self.peak_pss, sum(_pss(pid) for pid in tree))
        for pid in tree:
            self._cpu[pid] = max(self._cpu.get(pid, 0), table[pid][2])
        self.samples.append((time.perf_counter(), sum(self._cpu.values()) / self._ticks, rss))

    def _sample(self) -> None:
        while not self._stop.is_set():
            self._take()
            self._stop.wait(self.interval_s)

    def cpu_between(self, start: float, end: float) -> float:
        """CPU seconds the tree used between two perf_counter times (nearest samples)."""
        return self.samples[self._at(end)][1] - self.samples[self._at(start)][1]

    def peak_between(self, start: float, end: float) -> int:
        """Peak summed RSS (bytes) seen between two perf_counter times (nearest samples)."""
        return max(rss for _, _, rss in self.samples[self._at(start) : self._at(end) + 1])

    def _at(self, moment: float) -> int:
        """Index of the first sample at or after `moment` (the last one if none is)."""
        i = bisect.bisect_left(self.samples, moment, key=lambda sample: sample[0])
        return min(max(i, 0), len(self.samples) - 1)

    def __enter__(self) -> TreeMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._take()
