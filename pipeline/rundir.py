"""The run directory: every path and completion marker of a run, and how far it got.

Nothing else computes a path inside a run directory: stages receive the paths they write.
A unit is finished for a phase when its marker exists; `pending(phase)` lists the others.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from denseforge import __version__
from denseforge.errors import RunDirError
from denseforge.pipeline.config import Config, dump_config, load_config
from denseforge.stages.files import write_json_atomic


@dataclass(frozen=True)
class RunDir:
    """Paths of one run; see DESIGN.md for the layout."""

    root: Path

    @property
    def config_file(self) -> Path:
        return self.root / "config.yaml"

    @property
    def run_file(self) -> Path:
        return self.root / "run.json"

    @property
    def units(self) -> Path:
        return self.root / "input"

    @property
    def plan_file(self) -> Path:
        return self.units / "PLANNED.json"

    @property
    def raw(self) -> Path:
        return self.root / "raw"

    @property
    def shards(self) -> Path:
        return self.root / "shards"

    @property
    def demo(self) -> Path:
        return self.root / "demo"

    @property
    def manifest(self) -> Path:
        return self.root / "manifest.parquet"

    @property
    def rejects(self) -> Path:
        return self.root / "rejects.parquet"

    @property
    def stats(self) -> Path:
        return self.root / "stats.json"

    @property
    def report(self) -> Path:
        return self.root / "report.html"

    @property
    def card(self) -> Path:
        """The dataset card: Hugging Face `datasets` loads the run directory through it."""
        return self.root / "README.md"

    @property
    def embeddings(self) -> Path:
        return self.root / "embeddings"

    @property
    def dedup(self) -> Path:
        return self.root / "dedup"

    @property
    def decisions(self) -> Path:
        return self.dedup / "decisions.parquet"

    @property
    def dedup_summary(self) -> Path:
        """Written last by dedup: its completion marker."""
        return self.dedup / "summary.json"

    @property
    def buckets(self) -> Path:
        return self.dedup / "buckets"

    def bucket(self, index: int) -> Path:
        return self.buckets / f"{index:05d}"

    @property
    def bucket_parts(self) -> Path:
        return self.dedup / "parts"

    def bucket_part(self, index: int) -> Path:
        return self.bucket_parts / f"{index:05d}.parquet"

    @property
    def parts(self) -> Path:
        return self.shards / "_parts"

    @property
    def lock_file(self) -> Path:
        return self.root / "run.lock"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def log_file(self) -> Path:
        return self.logs / "driver.log"

    # -- per unit ---------------------------------------------------------------------------

    @staticmethod
    def unit_name(unit: int) -> str:
        return f"{unit:07d}"

    def unit_file(self, unit: int) -> Path:
        return self.units / f"{self.unit_name(unit)}.arrow"

    def screened_file(self, unit: int) -> Path:
        return self.units / f"{self.unit_name(unit)}.screened.parquet"

    def ingest_marker(self, unit: int) -> Path:
        return self.raw / f"{self.unit_name(unit)}.ingested.json"

    def embeddings_file(self, unit: int) -> Path:
        return self.embeddings / f"{self.unit_name(unit)}.parquet"

    def embed_rejects_file(self, unit: int) -> Path:
        return self.embeddings / f"{self.unit_name(unit)}.rejects.parquet"

    def embed_marker(self, unit: int) -> Path:
        return self.embeddings / f"{self.unit_name(unit)}.done.json"

    def shard_file(self, unit: int) -> Path:
        return self.shards / f"{self.unit_name(unit)}.tar"

    def manifest_part(self, unit: int) -> Path:
        return self.parts / f"{self.unit_name(unit)}.manifest.parquet"

    def rejects_part(self, unit: int) -> Path:
        return self.parts / f"{self.unit_name(unit)}.rejects.parquet"

    def write_marker(self, unit: int) -> Path:
        return self.shards / "_done" / f"{self.unit_name(unit)}.json"

    def marker(self, phase: Literal["ingest", "embed", "write"], unit: int) -> Path:
        return {"ingest": self.ingest_marker, "embed": self.embed_marker, "write": self.write_marker}[phase](unit)

    def pending(self, phase: Literal["ingest", "embed", "write"], units: int) -> list[int]:
        """The units of `range(units)` that have no completion marker for `phase`."""
        return [u for u in range(units) if not self.marker(phase, u).exists()]

    def markers(self, phase: Literal["ingest", "embed", "write"]) -> list[Path]:
        """Every completion marker of `phase`, in unit order."""
        sample = self.marker(phase, 0)
        return sorted(sample.parent.glob("*" + sample.name[len(self.unit_name(0)):])) if sample.parent.exists() else []

    # -- lifecycle -------------------------------------------------------------------------

    def create(self, config: Config) -> None:
        """Start a new run here; refuses a directory that already holds one."""
        if self.run_file.exists():
            raise RunDirError(f"{self.root} already holds a run; continue it with `denseforge resume {self.root}`")
        if self.root.exists() and any(self.root.iterdir()):
            raise RunDirError(f"{self.root} exists and is not empty; choose another --out")
        self.root.mkdir(parents=True, exist_ok=True)
        self.config_file.write_text(dump_config(config))
        write_json_atomic(self.run_file, {"denseforge": __version__, "state": "running"})

    def load_config(self) -> Config:
        if not self.run_file.exists() or not self.config_file.exists():
            raise RunDirError(f"{self.root} is not a denseforge run directory (no run.json/config.yaml)")
        return load_config(self.config_file)

    @contextmanager
    def locked(self, command: str) -> Iterator[None]:
        """Hold the run's lock (an fcntl lock on run.lock, with this driver's host and pid in it)
        while a driver works here; a second driver is refused. Temporary files left by a killed
        writer are swept once the lock is held."""
        self.root.mkdir(parents=True, exist_ok=True)
        handle = open(self.lock_file, "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            raise RunDirError(f"{self.root} is in use by a running driver ({holder}); wait for it to finish "
                              "or stop it first (`denseforge status` shows it)") from None
        try:
            handle.seek(0)
            handle.truncate()
            handle.write(json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "command": command,
                                     "since": time.strftime("%Y-%m-%dT%H:%M:%S")}))
            handle.flush()
            for stale in self.root.rglob(".*.tmp"):
                stale.unlink(missing_ok=True)
            yield
        finally:
            handle.seek(0)
            handle.truncate()
            fcntl.flock(handle, fcntl.LOCK_UN)
            handle.close()

    def holder(self) -> dict[str, Any] | None:
        """Who holds the lock now (host, pid, command, since), or None when no driver does."""
        if not self.lock_file.exists():
            return None
        with open(self.lock_file) as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                text = handle.read().strip()
                return json.loads(text) if text else {"host": "?", "pid": "?"}
            fcntl.flock(handle, fcntl.LOCK_UN)
        return None

    def read_state(self) -> dict[str, Any]:
        return json.loads(self.run_file.read_text())

    def update_state(self, **fields: Any) -> None:
        write_json_atomic(self.run_file, {**self.read_state(), **fields})
