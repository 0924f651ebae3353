"""Read the input (LAION-style table, image folder, or webdataset shards) into work units.

A work unit is one input shard of at most `samples_per_shard` rows: an Arrow IPC file that
img2dataset's downloader reads, plus a parquet of the rows screened out before download. Rows
stream through; the table is never held in memory. Every row gets a stable key from its position
in the input, so reruns give the same keys.
"""

from __future__ import annotations

import csv
import glob
import json
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
from upath import UPath

from denseforge.errors import InputError
from denseforge.stages.sample import Reject, make_key
from denseforge.stages.url_screen import ALLOWED_SCHEMES, screen_url
from denseforge.storage import (
    child,
    describe_store_error,
    ensure_dir,
    location,
    open_binary,
    read_text_file,
    write_arrow_atomic,
    write_parquet_atomic,
)

TABLE_SUFFIXES = {
    ".parquet": "parquet",
    ".pq": "parquet",
    ".csv": "csv",
    ".tsv": "csv",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "jsonl",
}
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"}
UNIT_SCHEMA = pa.schema(
    [("url", pa.string()), ("caption", pa.string()), ("df_key", pa.string()), ("df_source", pa.string())]
)


@dataclass
class InputRow:
    """One input row; `problem` (and its `reason`) is set when the row itself is unusable."""

    url: Any = None
    caption: Any = None
    source: dict[str, Any] = field(default_factory=dict)
    problem: str | None = None
    reason: str = "malformed_row"


def expand_paths(path: str, suffixes: set[str] | dict[str, str], options: dict[str, Any] | None = None) -> list[UPath]:
    """A file, a directory (its matching files) or a glob, local or in an object store, sorted for
    stable keys. A store is listed page by page (fsspec), never assumed to list what has no marker."""
    if "://" in path and not path.startswith("file://"):
        return _expand_remote(location(path, options), path, suffixes)
    if any(ch in path for ch in "*?["):
        found = [Path(p) for p in glob.glob(path, recursive=True)]
    elif os.path.isdir(path):
        found = [p for p in Path(path).rglob("*") if p.is_file()]
    elif os.path.isfile(path):
        return [location(path)]
    else:
        raise InputError(f"input.path {path!r} does not exist")
    files = sorted(p for p in found if p.suffix.lower() in suffixes and p.is_file())
    if not files:
        raise InputError(f"input.path {path!r} holds no files ending in {', '.join(sorted(suffixes))}")
    return [location(p) for p in files]


def _expand_remote(where: UPath, path: str, suffixes: set[str] | dict[str, str]) -> list[UPath]:
    fs = where.fs
    try:
        if any(ch in where.path for ch in "*?["):
            found = fs.glob(where.path)
        elif fs.isfile(where.path):
            return [where]
        elif fs.isdir(where.path):
            found = fs.find(where.path)
        else:
            raise InputError(f"input.path {path!r} does not exist")
    except InputError:
        raise
    except Exception as exc:  # noqa: BLE001 - a missing bucket, wrong credentials, an unreachable store
        raise InputError(f"input.path {path}: {describe_store_error(exc)}") from None
    files = sorted(f for f in found if os.path.splitext(f)[1].lower() in suffixes)
    if not files:
        raise InputError(f"input.path {path!r} holds no files ending in {', '.join(sorted(suffixes))}")
    return [child(where, f) for f in files]


def table_format(path: UPath, configured: str) -> str:
    if configured != "auto":
        return configured
    try:
        return TABLE_SUFFIXES[path.suffix.lower()]
    except KeyError:
        raise InputError(f"cannot tell the format of {path}; set input.format to parquet, csv or jsonl") from None


def _pick(record: dict[str, Any], url_col: str, caption_col: str | None, keep: list[str] | None) -> InputRow:
    extras = {k: v for k, v in record.items() if k not in (url_col, caption_col)}
    if keep is not None:
        extras = {k: extras.get(k) for k in keep}
    return InputRow(record.get(url_col), record.get(caption_col) if caption_col else None, extras)


def _check_columns(path: UPath | Path, columns: list[str], url_col: str, caption_col: str | None) -> None:
    missing = [c for c in (url_col, caption_col) if c and c not in columns]
    if missing:
        raise InputError(
            f"{path}: column(s) {', '.join(map(repr, missing))} not found (input.url_col / input.caption_col); "
            f"the table has: {', '.join(columns[:30])}"
        )


def _parquet_rows(path: UPath, url_col, caption_col, keep) -> Iterator[InputRow]:
    try:
        pf = pq.ParquetFile(open_binary(path))
    except Exception as exc:  # noqa: BLE001 - pyarrow raises several types for a bad file
        raise InputError(f"{path} is not a readable parquet file: {exc}") from None
    names = pf.schema_arrow.names
    _check_columns(path, names, url_col, caption_col)
    wanted = None if keep is None else [c for c in names if c in {url_col, caption_col, *keep}]
    start = 0
    for batch in pf.iter_batches(batch_size=8192, columns=wanted):
        try:
            records = batch.to_pylist()
        except UnicodeDecodeError:  # invalid UTF-8 in a string column: find the rows, keep the rest
            records = []
            for i in range(batch.num_rows):
                try:
                    records.append(batch.slice(i, 1).to_pylist()[0])
                except UnicodeDecodeError as exc:
                    records.append(
                        InputRow(problem=f"row {start + i}: invalid UTF-8 ({exc.reason})", reason="invalid_text")
                    )
        for record in records:
            yield record if isinstance(record, InputRow) else _pick(record, url_col, caption_col, keep)
        start += batch.num_rows


def _csv_rows(path: UPath, url_col, caption_col, keep) -> Iterator[InputRow]:
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
    delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
    with read_text_file(path) as fh:
        reader = csv.reader(fh, delimiter=delimiter)
        try:
            header = next(reader)
        except StopIteration:
            raise InputError(f"{path} is empty: expected a header row") from None
        _check_columns(path, header, url_col, caption_col)
        while True:
            try:
                cells = next(reader)
            except StopIteration:
                return
            except csv.Error as exc:
                yield InputRow(problem=f"line {reader.line_num}: {exc}")
                continue
            if not cells:
                continue
            if len(cells) != len(header):
                yield InputRow(problem=f"line {reader.line_num}: {len(cells)} fields, header has {len(header)}")
                continue
            yield _pick(dict(zip(header, cells, strict=True)), url_col, caption_col, keep)


def _jsonl_rows(path: UPath, url_col, caption_col, keep) -> Iterator[InputRow]:
    with read_text_file(path) as fh:
        for number, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as exc:
                yield InputRow(problem=f"line {number}: not JSON ({exc.msg})")
                continue
            if not isinstance(record, dict):
                yield InputRow(problem=f"line {number}: a JSON {type(record).__name__}, expected an object")
                continue
            yield _pick(record, url_col, caption_col, keep)


_READERS = {"parquet": _parquet_rows, "csv": _csv_rows, "jsonl": _jsonl_rows}


def table_suffixes(fmt: str) -> set[str]:
    """The file endings of a table `input.format` (every table's with auto)."""
    return set(TABLE_SUFFIXES) if fmt == "auto" else {s for s, f in TABLE_SUFFIXES.items() if f == fmt}


def iter_table_rows(
    path: str,
    fmt: str,
    url_col: str,
    caption_col: str | None,
    keep: list[str] | None,
    options: dict[str, Any] | None = None,
) -> Iterator[InputRow]:
    """Rows of every table under `path`, in sorted file order."""
    files = expand_paths(path, table_suffixes(fmt), options)
    for file in files:
        yield from _READERS[table_format(file, fmt)](file, url_col, caption_col, keep)


def iter_folder_rows(path: str, follow_symlinks: bool = False) -> Iterator[InputRow]:
    """Images of a local folder as file:// rows; a same-named .txt beside an image is its caption.
    A link that leads out of the folder is refused unless `follow_symlinks`."""
    if "://" in path and not path.startswith("file://"):
        raise InputError(
            f"input.path {path}: input.kind folder reads a folder on this machine; for images in an "
            "object store use a table of their URLs (input.kind table) or webdataset shards"
        )
    root = Path(path).resolve()
    for file in (Path(str(p)) for p in expand_paths(path, IMAGE_SUFFIXES)):
        target = file.resolve()
        if not follow_symlinks and root not in (target, *target.parents):
            yield InputRow(
                source={"path": str(file)},
                reason="outside_folder",
                problem=f"{file.name} links outside the input folder (input.follow_symlinks allows it)",
            )
            continue
        sidecar = file.with_suffix(".txt")
        caption = sidecar.read_text(errors="replace").strip() if sidecar.is_file() else None
        yield InputRow(target.as_uri(), caption, {"path": str(file)})


def _invalid_text(row: InputRow) -> str | None:
    """Why a row's text cannot be stored as UTF-8 (a lone surrogate from JSON, a file name that is
    not UTF-8), or None."""
    for name, value in (
        ("url", row.url),
        ("caption", row.caption),
        ("source", json.dumps(row.source, default=str, ensure_ascii=False)),
    ):
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError as exc:
                return f"the {name} is not valid text ({exc.reason} at position {exc.start})"
    return None


def _cell(value: Any) -> str | None:
    if value is None or (isinstance(value, float) and value != value):
        return None
    return value if isinstance(value, str) else str(value)


@dataclass
class UnitPlan:
    """What partitioning wrote: the number of rows and units."""

    rows: int = 0
    units: int = 0
    screened_out: int = 0


def write_units(
    rows: Iterator[InputRow], unit_dir: UPath, samples_per_shard: int, allow_private: bool, allow_files: bool = False
) -> UnitPlan:
    """Screen rows and write them as img2dataset input shards (`NNNNNNN.arrow`) + screen rejects."""
    ensure_dir(unit_dir)
    schemes = ALLOWED_SCHEMES + (("file",) if allow_files else ())
    plan = UnitPlan()
    batch: list[dict[str, Any]] = []
    rejects: list[dict[str, Any]] = []

    def flush() -> None:
        unit = plan.units
        write_arrow_atomic(unit_dir / f"{unit:07d}.arrow", pa.Table.from_pylist(batch, schema=UNIT_SCHEMA))
        write_rejects(rejects, unit_dir / f"{unit:07d}.screened.parquet")
        plan.units += 1
        batch.clear()
        rejects.clear()

    for row in rows:
        key = make_key(plan.units, plan.rows - plan.units * samples_per_shard)
        plan.rows += 1
        invalid = None if row.problem is not None else _invalid_text(row)
        if row.problem is not None:
            problem: Reject | None = Reject(key=key, stage="input", reason=row.reason, detail=row.problem, url=None)
        elif invalid is not None:
            problem = Reject(key=key, stage="input", reason="invalid_text", detail=invalid, url=None)
        else:
            verdict = screen_url(row.url, allow_private, schemes)
            problem = (
                None
                if verdict is None
                else Reject(key=key, stage="input", reason=verdict.reason, detail=verdict.detail, url=_cell(row.url))
            )
        if problem is not None:
            rejects.append(problem.model_dump())
            plan.screened_out += 1
        else:
            batch.append(
                {
                    "url": row.url.strip(),
                    "caption": _cell(row.caption),
                    "df_key": key,
                    "df_source": json.dumps(row.source, default=str, ensure_ascii=False),
                }
            )
        if plan.rows % samples_per_shard == 0:
            flush()
    if plan.rows % samples_per_shard:
        flush()
    return plan


# fmt: off
REJECT_SCHEMA = pa.schema([
    ("key", pa.string()), ("stage", pa.string()), ("reason", pa.string()), ("detail", pa.string()),
    ("url", pa.string()),
])
# fmt: on


def write_rejects(rows: list[dict[str, Any]], path: UPath) -> None:
    """Write reject rows atomically."""
    write_parquet_atomic(path, rows, REJECT_SCHEMA)
