"""The run directory: every path and completion marker of a run, and how far it got.

Nothing else computes a path inside a run directory: stages receive the paths they write.
The root is a local folder or an object-store prefix (`denseforge.storage`); every path here is
derived from it and carries its storage options. A unit is finished for a phase when its marker
exists (markers are written last); `pending(phase)` lists the others.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from upath import UPath

from denseforge import __version__
from denseforge.errors import RunDirError, StorageError
from denseforge.pipeline.config import Config, data_settings, dump_config, load_config
from denseforge.storage import (
    ensure_dir,
    is_local,
    list_files,
    location,
    read_json,
    read_json_many,
    remove,
    write_bytes,
    write_json_atomic,
)

# An object-store lock is a lease: its holder rewrites it every LEASE_RENEW_S; one not renewed for
# LEASE_EXPIRY_S belongs to a driver that died and may be taken over.
LEASE_RENEW_S = 20.0
LEASE_EXPIRY_S = 120.0


@dataclass(frozen=True)
class RunDir:
    """Paths of one run (docs/design.md, "Run directory layout")."""

    root: UPath

    def __init__(self, root: UPath | Path | str):
        object.__setattr__(self, "root", location(root))

    @property
    def config_file(self) -> UPath:
        return self.root / "config.yaml"

    @property
    def run_file(self) -> UPath:
        return self.root / "run.json"

    @property
    def units(self) -> UPath:
        return self.root / "input"

    @property
    def plan_file(self) -> UPath:
        return self.units / "PLANNED.json"

    @property
    def raw(self) -> UPath:
        return self.root / "raw"

    @property
    def shards(self) -> UPath:
        return self.root / "shards"

    @property
    def demo(self) -> UPath:
        return self.root / "demo"

    @property
    def manifest(self) -> UPath:
        return self.root / "manifest.parquet"

    @property
    def rejects(self) -> UPath:
        return self.root / "rejects.parquet"

    @property
    def stats(self) -> UPath:
        return self.root / "stats.json"

    @property
    def report(self) -> UPath:
        return self.root / "report.html"

    @property
    def card(self) -> UPath:
        """The dataset card: Hugging Face `datasets` loads the run directory through it."""
        return self.root / "README.md"

    @property
    def embeddings(self) -> UPath:
        return self.root / "embeddings"

    @property
    def dedup(self) -> UPath:
        return self.root / "dedup"

    @property
    def decisions(self) -> UPath:
        return self.dedup / "decisions.parquet"

    @property
    def dedup_summary(self) -> UPath:
        """Written last by dedup: its completion marker."""
        return self.dedup / "summary.json"

    @property
    def against(self) -> UPath:
        """The kept images of the runs given to `run --against`, as embeddings files (scratch)."""
        return self.dedup / "against"

    @property
    def buckets(self) -> UPath:
        return self.dedup / "buckets"

    def bucket(self, index: int) -> UPath:
        return self.buckets / f"{index:05d}"

    @property
    def bucket_parts(self) -> UPath:
        return self.dedup / "parts"

    @property
    def parts(self) -> UPath:
        return self.shards / "_parts"

    @property
    def cache(self) -> UPath:
        """The run's own cache of stage outputs (used unless `cache.path` names a shared one)."""
        return self.root / "cache"

    def cache_root(self, config: Config) -> UPath:
        """Where this run's cache of stage outputs is: `cache.path`, or the run's own folder."""
        return location(config.cache.path, config.storage.options) if config.cache.path else self.cache

    @property
    def lock_file(self) -> UPath:
        return self.root / "run.lock"

    @property
    def logs(self) -> UPath:
        return self.root / "logs"

    @property
    def log_file(self) -> UPath:
        return self.logs / "driver.log"

    # -- per unit ---------------------------------------------------------------------------

    @staticmethod
    def unit_name(unit: int) -> str:
        return f"{unit:07d}"

    @classmethod
    def unit_of(cls, path: UPath) -> int:
        """The unit a marker or per-unit file belongs to (its name starts with the unit's)."""
        return int(path.name[: len(cls.unit_name(0))])

    def unit_file(self, unit: int) -> UPath:
        return self.units / f"{self.unit_name(unit)}.arrow"

    def screened_file(self, unit: int) -> UPath:
        return self.units / f"{self.unit_name(unit)}.screened.parquet"

    def ingest_marker(self, unit: int) -> UPath:
        return self.raw / f"{self.unit_name(unit)}.ingested.json"

    def embeddings_file(self, unit: int) -> UPath:
        return self.embeddings / f"{self.unit_name(unit)}.parquet"

    def embed_rejects_file(self, unit: int) -> UPath:
        return self.embeddings / f"{self.unit_name(unit)}.rejects.parquet"

    def embed_marker(self, unit: int) -> UPath:
        return self.embeddings / f"{self.unit_name(unit)}.done.json"

    def shard_file(self, unit: int) -> UPath:
        return self.shards / f"{self.unit_name(unit)}.tar"

    def manifest_part(self, unit: int) -> UPath:
        return self.parts / f"{self.unit_name(unit)}.manifest.parquet"

    def rejects_part(self, unit: int) -> UPath:
        return self.parts / f"{self.unit_name(unit)}.rejects.parquet"

    def write_marker(self, unit: int) -> UPath:
        return self.shards / "_done" / f"{self.unit_name(unit)}.json"

    def marker(self, phase: Literal["ingest", "embed", "write"], unit: int) -> UPath:
        return {"ingest": self.ingest_marker, "embed": self.embed_marker, "write": self.write_marker}[phase](unit)

    def pending(self, phase: Literal["ingest", "embed", "write"], units: int) -> list[int]:
        """The units of `range(units)` that have no completion marker for `phase`."""
        done = {p.name for p in self.markers(phase)}
        return [u for u in range(units) if self.marker(phase, u).name not in done]

    def marker_counts(self, phase: Literal["ingest", "embed", "write"]) -> list[tuple[int, dict[str, Any]]]:
        """(unit, the counts its marker holds) for every finished unit of `phase`, in unit order,
        read in one batch."""
        markers = self.markers(phase)
        return list(zip(map(self.unit_of, markers), read_json_many(markers), strict=True))

    def markers(self, phase: Literal["ingest", "embed", "write"]) -> list[UPath]:
        """Every completion marker of `phase`, in unit order."""
        sample = self.marker(phase, 0)
        return list_files(sample.parent, sample.name[len(self.unit_name(0)) :])

    # -- lifecycle -------------------------------------------------------------------------

    def create(self, config: Config) -> None:
        """Start a new run here; refuses a directory that already holds one."""
        if self.run_file.exists():
            raise RunDirError(f"{self.root} already holds a run; continue it with `denseforge resume {self.root}`")
        if self.root.exists() and any(self.root.iterdir()):
            raise RunDirError(f"{self.root} exists and is not empty; choose another --out")
        ensure_dir(self.root)
        write_bytes(self.config_file, dump_config(config).encode())
        # the settings that decide what is written: a resume checks them (runner.resume)
        state = {"denseforge": __version__, "state": "running", "settings": data_settings(config)}
        write_json_atomic(self.run_file, state)

    def check_run(self) -> None:
        """Refuse a directory that does not hold a run (reads neither file)."""
        if not self.run_file.exists() or not self.config_file.exists():
            raise RunDirError(f"{self.root} is not a denseforge run directory (no run.json/config.yaml)")

    def load_config(self) -> Config:
        self.check_run()
        return load_config(self.config_file)

    @contextmanager
    def locked(self, command: str) -> Iterator[None]:
        """Hold the run's lock while a driver works here; a second driver is refused. On local disk
        an fcntl lock on run.lock (temporary files a killed writer left are swept once it is held);
        on an object store a lease (`_leased`)."""
        info = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "command": command,
            "since": time.strftime("%Y-%m-%dT%H:%M:%S"),
        }
        if not is_local(self.root):
            with self._leased(info):
                yield
            return
        ensure_dir(self.root)
        handle = open(str(self.lock_file), "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            raise RunDirError(
                f"{self.root} is in use by a running driver ({holder}); wait for it to finish "
                "or stop it first (`denseforge status` shows it)"
            ) from None
        try:
            handle.seek(0)
            handle.truncate()
            handle.write(json.dumps(info))
            handle.flush()
            for stale in Path(str(self.root)).rglob(".*.tmp"):
                stale.unlink(missing_ok=True)
            yield
        finally:
            handle.seek(0)
            handle.truncate()
            fcntl.flock(handle, fcntl.LOCK_UN)
            handle.close()

    @contextmanager
    def _leased(self, info: dict[str, Any]) -> Iterator[None]:
        """The object-store lock: run.lock created only if absent (an exclusive create: S3's
        `If-None-Match: *`, GCS's `ifGenerationMatch=0`), renewed by a thread every LEASE_RENEW_S
        and removed at the end. A lease not renewed for LEASE_EXPIRY_S is a dead driver's and is
        taken over, so a killed driver never blocks `resume` for longer than that."""
        token = uuid.uuid4().hex
        lease = {**info, "token": token}
        fs, key = self.lock_file.fs, self.lock_file.path
        for attempt in range(2):
            try:
                with fs.open(key, "xb") as handle:
                    handle.write(json.dumps({**lease, "renewed": time.time()}).encode())
                break
            except FileExistsError:
                holder = self.holder()
                if holder is not None or attempt:
                    raise RunDirError(
                        f"{self.root} is in use by a running driver ({json.dumps(holder)}); wait for it "
                        "to finish or stop it first (`denseforge status` shows it)"
                    ) from None
                remove(self.lock_file)  # an expired lease
        stop = threading.Event()

        def renew() -> None:
            while not stop.wait(LEASE_RENEW_S):
                try:
                    write_json_atomic(self.lock_file, {**lease, "renewed": time.time()})
                except Exception:  # noqa: BLE001 - a missed renewal is retried; expiry is 6 renewals away
                    pass

        thread = threading.Thread(target=renew, name="denseforge-lease", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join(timeout=5)
            try:
                if read_json(self.lock_file).get("token") == token:
                    remove(self.lock_file)
            except (OSError, StorageError):
                pass

    def holder(self) -> dict[str, Any] | None:
        """Who holds the lock now (host, pid, command, since), or None when no driver does."""
        if not self.lock_file.exists():
            return None
        if not is_local(self.root):
            try:
                lease = read_json(self.lock_file)
            except (OSError, StorageError):
                return None
            if time.time() - float(lease.get("renewed", 0)) > LEASE_EXPIRY_S:
                return None
            return {k: v for k, v in lease.items() if k not in ("token", "renewed")}
        with open(str(self.lock_file)) as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                text = handle.read().strip()
                return json.loads(text) if text else {"host": "?", "pid": "?"}
            fcntl.flock(handle, fcntl.LOCK_UN)
        return None

    def read_state(self) -> dict[str, Any]:
        return read_json(self.run_file)

    def update_state(self, **fields: Any) -> None:
        write_json_atomic(self.run_file, {**self.read_state(), **fields})
