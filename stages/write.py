"""write: one unit's rows to a webdataset shard, a manifest part and a rejects part, atomically.

Each file is written under a temporary name and renamed; the unit's completion marker is written
last, so a unit is either complete or redone from scratch on resume — never half-counted.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from collections import Counter
from pathlib import Path
from typing import Any

import pyarrow as pa

from denseforge.stages.files import write_json_atomic, write_parquet_atomic
from denseforge.stages.read_input import write_rejects
from denseforge.stages.sample import Reject, Sample, safe_member_key

MANIFEST_SCHEMA = pa.schema([
    ("key", pa.string()), ("shard", pa.string()), ("url", pa.string()), ("width", pa.int32()),
    ("height", pa.int32()), ("sha256", pa.string()), ("cluster", pa.int64()), ("scores", pa.string()),
])


def done_marker(shards_dir: Path, unit: int) -> Path:
    return shards_dir / "_done" / f"{unit:07d}.json"


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o444
    info.mtime = 0  # reproducible archives: same input, same bytes
    info.uname = info.gname = "denseforge"
    tar.addfile(info, io.BytesIO(data))


def write_unit(unit: int, rows: list[dict[str, Any]], shards_dir: Path) -> dict[str, Any]:
    """Write all rows of one unit; returns the unit's counts (also saved as its marker).

    Rows removed by dedup/select are only counted here: `dedup/decisions.parquet` lists them.
    """
    shard_name = f"{unit:07d}.tar"
    parts_dir = shards_dir / "_parts"
    parts_dir.mkdir(parents=True, exist_ok=True)
    (shards_dir / "_done").mkdir(exist_ok=True)
    rows = sorted(rows, key=lambda r: r["key"])
    manifest: list[dict[str, Any]] = []
    rejects: list[dict[str, Any]] = []
    reasons: Counter[str] = Counter()
    removed: Counter[str] = Counter()
    tmp_tar = shards_dir / f".{shard_name}.tmp"  # dot-prefixed: never matched by *.tar
    with tarfile.open(tmp_tar, "w", format=tarfile.USTAR_FORMAT) as tar:
        for row in rows:
            if row.get("removed") is not None:
                gone = json.loads(row["removed"])
                removed[f"{gone['stage']}/{gone['reason']}"] += 1
                continue
            if row["reject"] is not None:
                reject = Reject.model_validate_json(row["reject"])
                rejects.append(reject.model_dump())
                reasons[f"{reject.stage}/{reject.reason}"] += 1
                continue
            sample = Sample.model_validate_json(row["sample"])
            stem = safe_member_key(sample.key)
            _add_member(tar, f"{stem}.jpg", row["image"])
            if sample.caption is not None:
                _add_member(tar, f"{stem}.txt", sample.caption.encode("utf-8"))
            _add_member(tar, f"{stem}.json", sample.model_dump_json().encode("utf-8"))
            manifest.append({
                "key": sample.key, "shard": shard_name, "url": sample.url, "width": sample.width,
                "height": sample.height, "sha256": sample.sha256, "cluster": sample.cluster,
                "scores": json.dumps(sample.qa.scores if sample.qa else {}),
            })
    if manifest:
        os.replace(tmp_tar, shards_dir / shard_name)
    else:
        tmp_tar.unlink()
        (shards_dir / shard_name).unlink(missing_ok=True)
    write_rejects(rejects, parts_dir / f"{unit:07d}.rejects.parquet")
    write_parquet_atomic(parts_dir / f"{unit:07d}.manifest.parquet", manifest, MANIFEST_SCHEMA)
    counts = {"unit": unit, "rows": len(rows), "written": len(manifest), "rejected": len(rejects),
              "removed": sum(removed.values()), "reasons": dict(sorted(reasons.items())),
              "removed_reasons": dict(sorted(removed.items()))}
    write_json_atomic(done_marker(shards_dir, unit), counts)
    return counts
