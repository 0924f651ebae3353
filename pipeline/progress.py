"""Progress on stderr: one bar per phase with running counts, notes, and the final summary."""

from __future__ import annotations

import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

from tqdm import tqdm
from upath import UPath

_OPEN: list[PhaseBar] = []
_LAST_UPDATE = [time.monotonic()]  # when a bar last moved: the node watch's measure of progress


def close_open_bars() -> None:
    """End every bar still drawing (a phase that failed), so an error starts on its own line."""
    for bar in list(_OPEN):
        bar.close()


class PhaseBar:
    """A tqdm bar over units that also shows counts (written, rejected, …)."""

    def __init__(self, name: str, total: int, done: int, unit: str):
        self.counts: Counter[str] = Counter()
        self._bar = tqdm(
            total=total,
            initial=done,
            desc=f"{name:>8}",
            unit=unit,
            file=sys.stderr,
            mininterval=1.0,
            dynamic_ncols=True,
            leave=True,
        )
        _OPEN.append(self)
        _LAST_UPDATE[0] = time.monotonic()

    def update(self, n: int = 1, **counts: int) -> None:
        self.counts.update(counts)
        self._bar.set_postfix(dict(self.counts), refresh=False)
        self._bar.update(n)
        _LAST_UPDATE[0] = time.monotonic()

    def close(self) -> None:
        self._bar.close()
        if self in _OPEN:
            _OPEN.remove(self)


class Progress:
    @property
    def last_update(self) -> float:
        """`time.monotonic()` when a phase last started or finished a unit."""
        return _LAST_UPDATE[0]

    def phase(self, name: str, total: int, done: int = 0, unit: str = "it") -> PhaseBar:
        return PhaseBar(name, total, done, unit)

    def note(self, message: str) -> None:
        print(f"denseforge: {message}", file=sys.stderr, flush=True)

    def warn(self, message: str) -> None:
        print(f"denseforge: warning: {message}", file=sys.stderr, flush=True)

    def summary(self, stats: dict[str, Any], root: UPath | Path, example: str | None = None) -> None:
        print(format_summary(stats, root, example), file=sys.stderr, flush=True)


def format_summary(stats: dict[str, Any], root: UPath | Path, example: str | None = None) -> str:
    """The end-of-run summary: the funnel with removals by reason, rejects by reason, every stage
    that failed on items (with its first error), and where to look: the report, and `show` with
    the key of a written sample (`example`)."""
    f = stats["funnel"]
    removed = ", ".join(f"{n} {r}" for r, n in sorted(f["removed_by_reason"].items(), key=lambda kv: -kv[1]))
    lines = [
        f"done: {f['input_rows']} input rows -> {f['written']} written, {f['rejected']} rejected, "
        f"{f['removed']} removed{f' ({removed})' if removed else ''} (balanced: {f['balanced']})"
    ]
    for reason, n in sorted(f["rejected_by_reason"].items(), key=lambda kv: -kv[1])[:10]:
        lines.append(f"  {n:>8}  {reason}")
    for name, c in stats.get("stages", {}).items():
        if c["failed_total"]:
            kinds = ", ".join(f"{k} {n}" for k, n in c["failed"].items())
            lines.append(
                f"stage {name}: failed on {c['failed_total']} of {c['items']} items ({kinds}); "
                f"first error: {c['first_error']}"
            )
    cache = stats.get("cache") or {}
    if cache.get("stages"):
        per_stage = ", ".join(f"{name} {c['hits']}/{c['hits'] + c['misses']}" for name, c in cache["stages"].items())
        corrupt = f"; {cache['corrupt']} corrupt entries recomputed" if cache["corrupt"] else ""
        lines.append(
            f"cache: {cache['hits']} of {cache['hits'] + cache['misses']} model outputs reused ({per_stage}){corrupt}"
        )
    source = cache.get("derived_from")
    if source:
        lines.append(f"derived from {source['run']}: reused its {', '.join(source['reused'])} (nothing downloaded)")
    if stats.get("storage", {}).get("retries"):
        lines.append(f"store: {stats['storage']['retries']} request(s) retried (throttling, dropped connections)")
    lines.append(f"shards, manifest.parquet, rejects.parquet, stats.json, report.html in {root}")
    lines.append(
        f"look at it: open {root}/report.html in a browser" + (f"; denseforge show {root} {example}" if example else "")
    )
    return "\n".join(lines)
