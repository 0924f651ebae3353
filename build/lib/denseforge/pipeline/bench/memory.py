"""Peak memory of a benchmark: the summed RSS of this process and all its descendants (Ray's
own processes included), sampled in a thread."""

from __future__ import annotations

import threading
from pathlib import Path

def process_table() -> dict[int, tuple[int, int]]:
    """pid -> (parent pid, RSS bytes) for every process visible in /proc."""
    import os

    page = os.sysconf("SC_PAGE_SIZE")
    table = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        table[int(stat.parent.name)] = (int(fields[1]), int(fields[21]) * page)
    return table


def descendants(pid: int, table: dict[int, tuple[int, int]] | None = None) -> list[int]:
    """Every process below `pid` (children, grandchildren, …)."""
    children: dict[int, list[int]] = {}
    for child, (parent, _) in (table or process_table()).items():
        children.setdefault(parent, []).append(child)
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


class TreeMemory:
    """Peak summed RSS (bytes) of a process and its descendants, sampled from /proc."""

    def __init__(self, interval_s: float = 0.1):
        self.interval_s, self.peak = interval_s, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    @staticmethod
    def current() -> int:
        import os

        table = process_table()
        me = os.getpid()
        return table[me][1] + sum(table[pid][1] for pid in descendants(me, table) if pid in table)

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.current())
            self._stop.wait(self.interval_s)

    def __enter__(self) -> "TreeMemory":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
