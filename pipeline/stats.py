"""Finalize a run: merge per-unit parts into manifest/rejects, write stats.json and report.html.

The funnel must balance: input rows = written + rejected + removed. A run whose sums do not add up
fails loudly; that is a bug, never a rounding matter.
"""

from __future__ import annotations

import json
import platform
from collections import Counter
from importlib import metadata
from typing import Any

import pyarrow as pa
from upath import UPath

from denseforge import __version__
from denseforge.errors import DenseforgeError, RunFailedError
from denseforge.pipeline.accounting import StageCounts, failures, merge_counts
from denseforge.pipeline.cache import CORRUPT, HIT, MISS
from denseforge.pipeline.config import Config
from denseforge.pipeline.flow import untrained_models
from denseforge.pipeline.report import render_report
from denseforge.pipeline.rundir import RunDir
from denseforge.stages.card import dataset_card, decode_type, merge_types
from denseforge.stages.read_input import REJECT_SCHEMA
from denseforge.stages.write import MANIFEST_SCHEMA
from denseforge.storage import list_files, parquet_writer, read_json, read_parquet, write_bytes


def _merge(parts: list[UPath], target: UPath, schema, metadata: dict[str, str] | None = None) -> int:
    """Concatenate parquet parts in order, streaming (one part in memory at a time)."""
    rows = 0
    with parquet_writer(target, schema.with_metadata(metadata) if metadata else schema) as writer:
        for part in parts:
            table = read_parquet(part, schema=schema)
            if metadata:
                table = table.replace_schema_metadata(metadata)
            rows += table.num_rows
            writer.write_table(table)
    return rows


def versions() -> dict[str, str]:
    out = {"python": platform.python_version(), "denseforge": __version__}
    for dist in ("ray", "img2dataset", "pillow", "pyarrow", "webdataset"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return out


def stage_counts(rd: RunDir) -> dict[str, dict[str, Any]]:
    """Per stage (and expert instance): items, failures by type, rejects by reason, removals and
    busy seconds, summed over the embed and write markers of every finished unit."""
    totals: dict[str, StageCounts] = {}
    for phase in ("embed", "write"):
        for _, counts in rd.marker_counts(phase):
            merge_counts(totals, counts.get("stages", {}))
    return {
        stage: {
            **c,
            "failed_total": failures(c),
            "items_per_busy_s": round(c["items"] / c["busy_s"], 2) if c["busy_s"] > 0 else None,
        }
        for stage, c in totals.items()
    }


def run_lineage(state: dict[str, Any]) -> dict[str, Any]:
    """Where a run's data comes from besides its input: the run it was derived from (`--from`)
    and the earlier runs its input was deduplicated against (`--against`); in the manifest's
    metadata (`denseforge.lineage`) and stats.json. `state`: the run's run.json."""
    derived = state.get("derived_from") or {}
    return {"derived_from": derived.get("run"), "against": state.get("against", [])}


def cache_counts(stages: dict[str, dict[str, Any]], derived_from: dict[str, Any] | None) -> dict[str, Any]:
    """The cache of stage outputs: per cached stage its hits, misses (outputs computed) and
    corrupt entries met (recomputed), their totals, and the run this one was derived from."""
    by_stage = {
        name: {
            "hits": c["counters"].get(HIT, 0),
            "misses": c["counters"].get(MISS, 0),
            "corrupt": c["counters"].get(CORRUPT, 0),
        }
        for name, c in stages.items()
        if HIT in c["counters"] or MISS in c["counters"]
    }
    totals = {k: sum(s[k] for s in by_stage.values()) for k in ("hits", "misses", "corrupt")}
    return {**totals, "stages": by_stage, "derived_from": derived_from}


def finalize_run(
    rd: RunDir, config: Config, planned_rows: int | None, timings: dict[str, float], complete: bool = True
) -> dict[str, Any]:
    """Merge parts, compute the funnel and per-stage counts, write report.html; returns the stats
    dict. An incomplete run (one that failed) gets the same files without the balance check."""
    done = rd.marker_counts("write")
    stages = stage_counts(rd)
    state = rd.read_state() if rd.run_file.exists() else {}
    lineage = {"denseforge.lineage": json.dumps(run_lineage(state), sort_keys=True)}
    written = _merge([rd.manifest_part(unit) for unit, _ in done], rd.manifest, MANIFEST_SCHEMA, lineage)
    rejected = _merge([rd.rejects_part(unit) for unit, _ in done], rd.rejects, REJECT_SCHEMA)
    by_reason: Counter[str] = Counter()
    by_stage: Counter[str] = Counter()
    removed_by: Counter[str] = Counter()
    unit_rows = removed = unit_retries = 0
    sample_type = pa.null()
    for _, counts in done:
        if "json_type" in counts:
            sample_type = merge_types(sample_type, decode_type(counts["json_type"]))
        unit_rows += counts["rows"]
        unit_retries += counts.get("store_retries", 0)
        removed += counts.get("removed", 0)
        removed_by.update(counts.get("removed_reasons", {}))
        for reason, n in counts["reasons"].items():
            by_reason[reason] += n
            by_stage[reason.split("/", 1)[0]] += n
    input_rows = planned_rows if planned_rows is not None else unit_rows
    embedded = [counts for _, counts in rd.marker_counts("embed")]
    balanced = input_rows == written + rejected + removed == unit_rows
    ingest = [counts for _, counts in rd.marker_counts("ingest")]
    ingest_s = timings.get("ingest_s", 0.0)
    failed_units = sum(1 for m in ingest if m.get("failed"))
    untrained = untrained_models(config)
    funnel = {
        "input_rows": input_rows,
        "written": written,
        "rejected": rejected,
        "removed": removed,
        "balanced": balanced,
        "rejected_by_stage": dict(sorted(by_stage.items())),
        "rejected_by_reason": dict(sorted(by_reason.items())),
        "removed_by_reason": dict(sorted(removed_by.items())),
    }
    stats = {
        "funnel": funnel,
        "complete": complete,
        "units": len(done),
        "stages": stages,
        "dedup": read_json(rd.dedup_summary) if rd.dedup_summary.exists() else None,
        "ingest": {
            "downloaded": sum(m.get("successes", 0) for m in ingest),
            "failed_to_download": sum(m.get("failed_to_download", 0) for m in ingest),
            "failed_to_resize": sum(m.get("failed_to_resize", 0) for m in ingest),
            "failed_units": failed_units,
            "images_per_s_this_session": (sum(m.get("successes", 0) for m in ingest) / ingest_s)
            if ingest_s > 0.5
            else None,
        },
        "storage": {
            "url": str(rd.root),
            "retries": sum(m.get("store_retries", 0) for m in (*ingest, *embedded)) + unit_retries,
        },
        "timings": {k: round(v, 3) for k, v in timings.items()},
        "versions": versions(),
        "run": {"name": config.run.name, "seed": config.run.seed},
        "untrained": untrained,
        "cache": cache_counts(stages, state.get("derived_from")),
        "lineage": run_lineage(state),
    }
    write_bytes(rd.report, render_report(rd, stats).encode())
    shard_names = [shard.name for shard in list_files(rd.shards, ".tar")]
    outcome = "complete" if complete else "failed"
    card = dataset_card(sample_type, config.run.name, funnel, shard_names, outcome, failed_units, untrained)
    write_bytes(rd.card, card.encode())
    if complete and not balanced:
        raise DenseforgeError(
            f"the funnel does not balance: {input_rows} input rows vs {written} written + {rejected} rejected + "
            f"{removed} removed ({unit_rows} rows seen by the writer); stats.json and rejects.parquet hold the detail"
        )
    if complete and input_rows and not written:
        common = ", ".join(f"{reason} {n}" for reason, n in by_reason.most_common(3))
        raise RunFailedError(
            f"the run wrote nothing: all {input_rows} input rows were rejected or removed (most often: {common}); "
            "rejects.parquet has each row's stage and reason"
        )
    return stats
