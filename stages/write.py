"""write: one unit's rows to a webdataset shard, a manifest part and a rejects part, atomically.

Each file appears whole or not at all (`storage.writing`: a rename on local disk, one upload on an
object store); the unit's completion marker is written last, so a unit is either complete or
redone from scratch on resume — never half-counted.
"""

from __future__ import annotations

import io
import json
import tarfile
from collections import Counter
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
from upath import UPath

from denseforge.stages.card import encode_type, json_type
from denseforge.stages.read_input import write_rejects
from denseforge.stages.sample import Reject, Sample, safe_member_key
from denseforge.storage import ensure_dir, remove, store_retries, write_json_atomic, write_parquet_atomic, writing

# fmt: off
MANIFEST_SCHEMA = pa.schema([
    ("key", pa.string()), ("shard", pa.string()), ("url", pa.string()), ("width", pa.int32()),
    ("height", pa.int32()), ("sha256", pa.string()), ("cluster", pa.int64()), ("scores", pa.string()),
])
# fmt: on


@dataclass(frozen=True)
class UnitFiles:
    """Where one unit's output goes (the run directory decides)."""

    shard: UPath
    manifest: UPath
    rejects: UPath
    marker: UPath


def read_member(tar: tarfile.TarFile, member: str | tarfile.TarInfo) -> bytes:
    """A regular file of a shard; a shard whose member is a link or a folder is not ours."""
    handle = tar.extractfile(member)
    if handle is None:
        raise tarfile.ReadError(f"{member} is not a regular file in the shard")
    return handle.read()


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mode = 0o444
    info.mtime = 0  # reproducible archives: same input, same bytes
    info.uname = info.gname = "denseforge"
    tar.addfile(info, io.BytesIO(data))


def write_unit(
    unit: int,
    files: UnitFiles,
    samples: list[tuple[Sample, bytes]],
    rejects: list[Reject],
    removed: list[dict[str, Any]],
    stages: dict[str, Any],
) -> dict[str, Any]:
    """Write one unit's samples (a shard + manifest part) and rejects (a part); returns the unit's
    counts, saved last as its completion marker with the per-stage counts and the structure of its
    samples' JSON (the dataset card's features are their union).

    Removed rows (duplicates, not selected) are only counted here: `dedup/decisions.parquet`
    lists them.
    """
    for folder in {files.shard.parent, files.manifest.parent, files.rejects.parent, files.marker.parent}:
        ensure_dir(folder)
    manifest: list[dict[str, Any]] = []
    if samples:  # streamed into the shard: on an object store a multipart upload, not a copy in memory
        with writing(files.shard) as handle, tarfile.open(fileobj=handle, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for sample, image in sorted(samples, key=lambda pair: pair[0].key):
                stem = safe_member_key(sample.key)
                _add_member(tar, f"{stem}.jpg", image)
                if sample.caption is not None:
                    _add_member(tar, f"{stem}.txt", sample.caption.encode("utf-8"))
                _add_member(tar, f"{stem}.json", sample.model_dump_json().encode("utf-8"))
                manifest.append(
                    {
                        "key": sample.key,
                        "shard": files.shard.name,
                        "url": sample.url,
                        "width": sample.width,
                        "height": sample.height,
                        "sha256": sample.sha256,
                        "cluster": sample.cluster,
                        "scores": json.dumps(sample.qa.scores if sample.qa else {}),
                    }
                )
    else:
        remove(files.shard)
    rejects = sorted(rejects, key=lambda r: r.key)
    write_rejects([r.model_dump() for r in rejects], files.rejects)
    write_parquet_atomic(files.manifest, manifest, MANIFEST_SCHEMA)
    shape = json_type(json.loads(sample.model_dump_json()) for sample, _ in samples)
    counts = {
        "unit": unit,
        "rows": len(samples) + len(rejects) + len(removed),
        "written": len(manifest),
        "json_type": encode_type(shape),
        "rejected": len(rejects),
        "removed": len(removed),
        "reasons": dict(sorted(Counter(f"{r.stage}/{r.reason}" for r in rejects).items())),
        "removed_reasons": dict(sorted(Counter(f"{r['stage']}/{r['reason']}" for r in removed).items())),
        "stages": stages,
        "store_retries": store_retries(),
    }
    write_json_atomic(files.marker, counts)
    return counts
