"""Atomic file writes: a temporary name in the same folder, then a rename."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq


def write_json_atomic(path: Path, payload: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(payload, indent=1, sort_keys=True, default=str))
    os.replace(tmp, path)


def write_table_atomic(path: Path, table: pa.Table) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    pq.write_table(table, tmp)
    os.replace(tmp, path)


def write_parquet_atomic(path: Path, rows: list[dict[str, Any]], schema: pa.Schema) -> None:
    write_table_atomic(path, pa.Table.from_pylist(rows, schema=schema))
