"""The run directory: where every phase reads and writes, and how far a run got."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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

    def unit_file(self, unit: int) -> Path:
        return self.units / f"{unit:07d}.arrow"

    def screened_file(self, unit: int) -> Path:
        return self.units / f"{unit:07d}.screened.parquet"

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

    def read_state(self) -> dict[str, Any]:
        return json.loads(self.run_file.read_text())

    def update_state(self, **fields: Any) -> None:
        write_json_atomic(self.run_file, {**self.read_state(), **fields})
