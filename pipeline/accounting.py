"""Accounting: what each stage did to each row (`TraceEntry`, carried in the row's trace) and
the per-stage totals made from them (`StageCounts`: unit markers, stats.json, status, the error
budget and the report all read these)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import ClassVar, TypedDict


class NodeCounts(TypedDict):
    items: int
    busy_s: float


class StageCounts(TypedDict):
    """One stage's totals: items it saw, failures by exception type (`first_error`: the first
    message), rejects by reason, removals, busy seconds, items and busy seconds per Ray node, and
    the stage's own counters (e.g. an expert's clipped boxes)."""

    items: int
    failed: dict[str, int]
    rejected: dict[str, int]
    removed: int
    busy_s: float
    first_error: str | None
    counters: dict[str, int]
    nodes: dict[str, NodeCounts]


def new_counts() -> StageCounts:
    return StageCounts(items=0, failed={}, rejected={}, removed=0, busy_s=0.0, first_error=None, counters={}, nodes={})


@dataclass
class TraceEntry:
    """How one stage ended for one row: its share of the batch's busy seconds, the node it ran on,
    and failed (exception type and message), rejected (reason) or removed (reason), with the
    stage's counters. Stored in the row's trace with one-letter keys (every row carries one per
    stage: `JSON_KEYS`)."""

    busy_s: float
    node: str = "?"
    failed: str | None = None
    message: str | None = None
    rejected: str | None = None
    removed: str | None = None
    counters: dict[str, int] = field(default_factory=dict)

    JSON_KEYS: ClassVar[dict[str, str]] = {
        "busy_s": "s",
        "node": "n",
        "failed": "f",
        "message": "m",
        "rejected": "r",
        "removed": "d",
        "counters": "c",
    }

    def to_json(self) -> dict[str, object]:
        out: dict[str, object] = {"s": self.busy_s, "n": self.node}
        for name in ("failed", "message", "rejected", "removed"):
            if (value := getattr(self, name)) is not None:
                out[self.JSON_KEYS[name]] = value
        if self.counters:
            out["c"] = self.counters
        return out

    @classmethod
    def from_json(cls, data: dict[str, object]) -> TraceEntry:
        return cls(**{name: data[short] for name, short in cls.JSON_KEYS.items() if short in data})  # type: ignore[arg-type]


def count_traces(traces: Sequence[str | None]) -> dict[str, StageCounts]:
    """Per stage, the totals of the rows' trace entries (see `StageCounts`)."""
    out: dict[str, StageCounts] = {}
    for raw in traces:
        for stage, data in (json.loads(raw) if raw else {}).items():
            entry = TraceEntry.from_json(data)
            c = out.setdefault(stage, new_counts())
            c["items"] += 1
            c["busy_s"] += entry.busy_s
            node = c["nodes"].setdefault(entry.node, NodeCounts(items=0, busy_s=0.0))
            node["items"] += 1
            node["busy_s"] += entry.busy_s
            if entry.failed is not None:
                c["failed"][entry.failed] = c["failed"].get(entry.failed, 0) + 1
                c["first_error"] = c["first_error"] or entry.message
            if entry.rejected is not None:
                c["rejected"][entry.rejected] = c["rejected"].get(entry.rejected, 0) + 1
            if entry.removed is not None:
                c["removed"] += 1
            for name, n in entry.counters.items():
                c["counters"][name] = c["counters"].get(name, 0) + n
    for c in out.values():
        c["busy_s"] = round(c["busy_s"], 4)
        for node in c["nodes"].values():
            node["busy_s"] = round(node["busy_s"], 4)
    return out


def merge_counts(total: dict[str, StageCounts], part: dict[str, StageCounts]) -> None:
    """Add one unit's per-stage counts into a running total (in place)."""
    for stage, c in part.items():
        t = total.setdefault(stage, new_counts())
        t["items"] += c["items"]
        t["removed"] += c["removed"]
        t["busy_s"] = round(t["busy_s"] + c["busy_s"], 4)
        t["first_error"] = t["first_error"] or c["first_error"]
        for into, more in (
            (t["failed"], c.get("failed", {})),
            (t["rejected"], c.get("rejected", {})),
            (t["counters"], c.get("counters", {})),
        ):
            for k, n in more.items():
                into[k] = into.get(k, 0) + n
        for name, counts in c.get("nodes", {}).items():  # markers written before per-node counts have none
            node = t["nodes"].setdefault(name, NodeCounts(items=0, busy_s=0.0))
            node["items"] += counts["items"]
            node["busy_s"] = round(node["busy_s"] + counts["busy_s"], 4)


def failures(c: StageCounts) -> int:
    return sum(c["failed"].values())
