"""The cache of stage outputs: what a model stage did to a sample, kept by content and reused.

An entry is keyed by the stage (its instance name and a hash of its fingerprint: class, settings
that decide its output, model identity) and by the hash of what it read (`Stage.cache_key`: the
record as the stage saw it, or less, e.g. an expert's image and the kinds it consumes). It holds
the stage's verdict (passed, or rejected with a reason), the change it made to the record (a patch
of set and deleted JSON paths) and its counters, under a SHA-256 of that content: an entry that
fails the check is recomputed and counted, never used. Entries are written whole or not at all
(`storage.writing`), and two writers of one key write the same content, so runs may share a cache
at the same time. Exceptions are never cached: a failure is tried again.

Layout: `<cache>/<instance>-<fingerprint hash>/<key[:2]>/<key>.json`, with `stage.json` beside
the entries saying which stage and settings they belong to (read by `denseforge cache du`).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from upath import UPath

from denseforge.errors import StorageError
from denseforge.stages.sample import Sample, safe_member_key
from denseforge.stages.stage import Item, Rejection, StageRun, Verdict
from denseforge.storage import is_local, read_bytes, remove, write_bytes

HIT, MISS, CORRUPT = "cache_hits", "cache_misses", "cache_corrupt"


def diff(before: Any, after: Any, path: tuple[str, ...] = ()) -> dict[str, list[Any]]:
    """The change from `before` to `after` (JSON values) as paths set and paths deleted; dicts
    are compared key by key, anything else replaced whole."""
    out: dict[str, list[Any]] = {"set": [], "del": []}
    if isinstance(before, dict) and isinstance(after, dict):
        for key in after:
            if key not in before:
                out["set"].append([[*path, key], after[key]])
            elif before[key] != after[key]:
                inner = diff(before[key], after[key], (*path, key))
                out["set"] += inner["set"]
                out["del"] += inner["del"]
        out["del"] += [[*path, key] for key in before if key not in after]
    elif before != after:
        out["set"].append([list(path), after])
    return out


def patch(record: dict[str, Any], change: dict[str, list[Any]]) -> dict[str, Any]:
    """`record` with `change` applied (in place; returned)."""
    for path in change["del"]:
        parent = record
        for key in path[:-1]:
            parent = parent[key]
        parent.pop(path[-1], None)
    for path, value in change["set"]:
        if not path:
            return value
        parent = record
        for key in path[:-1]:
            parent = parent.setdefault(key, {})
        parent[path[-1]] = value
    return record


def _checksum(payload: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


@dataclass
class OutputCache:
    """A run's cache: entries are written to `root` and looked up there, then in `also` (the cache
    of the run a derived run comes from, read only). `origin` names this run: an output taken from
    an entry another run made says so in the sample's provenance (`provenance.cache`); this run's
    own entries (a resume) leave no mark, so a resumed run writes the same bytes."""

    root: UPath
    origin: str
    also: tuple[UPath, ...] = ()
    _folders: dict[str, str] = field(default_factory=dict, repr=False)

    def has_entries(self, run: StageRun) -> bool:
        """Whether any layer holds entries of this stage with its current fingerprint."""
        name = self.folder_name(run)
        return any((root / name).exists() for root in (self.root, *self.also))

    @staticmethod
    def folder_name(run: StageRun) -> str:
        digest = hashlib.sha256(run.stage.fingerprint().encode()).hexdigest()[:12]
        return f"{safe_member_key(run.instance)}-{digest}"

    def folder(self, run: StageRun) -> str:
        """The stage's folder name; its stage.json is written on first use."""
        if run.instance not in self._folders:
            name = self.folder_name(run)
            about = self.root / name / "stage.json"
            if not about.exists():
                about_stage = {"stage": run.instance, "fingerprint": run.stage.fingerprint()}
                write_bytes(about, json.dumps(about_stage, indent=1).encode())
            self._folders[run.instance] = name
        return self._folders[run.instance]

    def _read(self, folder: str, key: str) -> tuple[dict[str, Any] | None, bool]:
        """The entry's payload (None: none anywhere) and whether a corrupt copy was met."""
        corrupt = False
        for root in (self.root, *self.also):
            path = root / folder / key[:2] / f"{key}.json"
            try:
                entry = json.loads(read_bytes(path))
                payload = entry["payload"]
                if entry["sum"] == _checksum(payload):
                    if is_local(path) and root == self.root:  # pruning keeps what is used
                        os.utime(str(path))
                    return payload, corrupt
            except FileNotFoundError:
                continue
            except (ValueError, KeyError, TypeError, OSError):
                pass
            corrupt = True
        return None, corrupt

    def verdicts(
        self, run: StageRun, items: list[Item], compute: Callable[[list[Item]], list[Verdict]]
    ) -> list[Verdict]:
        """The stage's verdicts on `items`: taken from the cache where an entry matches (the record
        patched, the counters restored), computed for the rest and stored."""
        folder = self.folder(run)
        keys = [run.stage.cache_key(item) for item in items]
        out: list[Verdict | None] = [None] * len(items)
        todo: list[int] = []
        for i, (item, key) in enumerate(zip(items, keys, strict=True)):
            payload, corrupt = self._read(folder, key)
            if corrupt:
                item.counts[CORRUPT] = 1
            if payload is None:
                todo.append(i)
                continue
            record = patch(item.sample.model_dump(mode="json"), payload["patch"])
            if payload["origin"] != self.origin:
                record["provenance"].setdefault("cache", {})[run.instance] = payload["origin"]
            item.sample = Sample.model_validate(record)
            item.counts.update(payload["counts"], **{HIT: 1})
            verdict = payload["verdict"]
            out[i] = None if verdict is None else Rejection(verdict["reason"], verdict["detail"], verdict["stage"])
        if not todo:
            return out
        pending = [items[i] for i in todo]
        before = [
            (item.sample.model_dump(mode="json"), {k: id(v) for k, v in item.outputs.items()}) for item in pending
        ]
        computed = compute(pending)
        for i, item, (record, outputs), verdict in zip(todo, pending, before, computed, strict=True):
            out[i] = verdict
            counts = {k: v for k, v in item.counts.items() if k != CORRUPT}
            item.counts[MISS] = 1
            if isinstance(verdict, Rejection):
                kept: dict[str, Any] | None = {
                    "reason": verdict.reason,
                    "detail": verdict.detail,
                    "stage": verdict.stage,
                }
            elif verdict is None:
                kept = None
            else:  # a failure is tried again next time; a removal depends on more than this item
                continue
            if {k: id(v) for k, v in item.outputs.items()} != outputs:
                continue  # it handed on something other than the record: not cacheable
            payload = {
                "origin": self.origin,
                "verdict": kept,
                "patch": diff(record, item.sample.model_dump(mode="json")),
                "counts": counts,
            }
            path = self.root / folder / keys[i][:2] / f"{keys[i]}.json"
            write_bytes(path, json.dumps({"sum": _checksum(payload), "payload": payload}).encode())
        return out


# -- du and prune ------------------------------------------------------------------------------


@dataclass
class Entry:
    path: UPath
    size: int
    mtime: float


def entries(root: UPath) -> Iterator[tuple[str, Entry]]:
    """(stage folder, entry) for every entry under `root`."""
    if not root.exists():
        return
    for folder in sorted(root.iterdir()):
        if not folder.is_dir():
            continue
        for shard in folder.iterdir():
            if not shard.is_dir():
                continue
            for path in shard.iterdir():
                if path.name.endswith(".json") and not path.name.startswith("."):
                    info = path.stat()
                    yield folder.name, Entry(path, info.st_size, info.st_mtime)


def usage(root: UPath) -> list[dict[str, Any]]:
    """Per stage folder: its stage, entries and bytes."""
    found: dict[str, dict[str, Any]] = {}
    for folder, entry in entries(root):
        row = found.setdefault(folder, {"folder": folder, "stage": _stage_of(root / folder), "entries": 0, "bytes": 0})
        row["entries"] += 1
        row["bytes"] += entry.size
    return list(found.values())


def _stage_of(folder: UPath) -> str:
    try:
        return json.loads(read_bytes(folder / "stage.json"))["stage"]
    except (OSError, ValueError, KeyError):
        return folder.name.rsplit("-", 1)[0]


def prune(root: UPath, max_bytes: int | None = None, stage: str | None = None) -> tuple[int, int]:
    """Delete entries: every one of `stage` (if given), then the least recently used until the
    rest fit in `max_bytes`. Returns (entries, bytes) deleted."""
    kept: list[Entry] = []
    deleted = [0, 0]

    def delete(entry: Entry) -> None:
        try:
            remove(entry.path)
        except FileNotFoundError:  # another prune (or run) got there first
            return
        deleted[0] += 1
        deleted[1] += entry.size

    for folder, entry in entries(root):
        if stage is not None and _stage_of(root / folder) == stage:
            delete(entry)
        else:
            kept.append(entry)
    if max_bytes is not None:
        total = sum(e.size for e in kept)
        for entry in sorted(kept, key=lambda e: e.mtime):
            if total <= max_bytes:
                break
            delete(entry)
            total -= entry.size
    return deleted[0], deleted[1]


def check_root(root: UPath) -> UPath:
    """A cache folder given on the command line: it must exist (a run's `cache/` or `cache.path`)."""
    if not root.exists():
        raise StorageError(f"{root}: no cache there (a run's cache is its cache/ folder, or the config's cache.path)")
    return root
