"""The embed phase on Ray: a Ray Data stream of units through the embed stage (the one adapter,
its own GPUs/CPUs); per unit a parquet of vectors and hashes under `embeddings/`, the images it
failed on, and a completion marker with the unit's counts, so resume skips finished units.
"""

from __future__ import annotations

import json
import pickle

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from denseforge.pipeline.accounting import count_traces
from denseforge.pipeline.adapter import Step, add_stages
from denseforge.pipeline.config import Config
from denseforge.pipeline.flow import embed_stages
from denseforge.pipeline.progress import Progress
from denseforge.pipeline.ray_session import one_off
from denseforge.pipeline.rundir import RunDir
from denseforge.stages.embed import embedding_table, pixel_spec, write_embeddings_file
from denseforge.stages.read_input import write_rejects
from denseforge.stages.sample import Reject, Sample
from denseforge.storage import ensure_dir, store_retries, write_json_atomic


def write_embeddings(batch: pa.Table, rd: RunDir, instances: set[str], storage_dtype: str) -> pa.Table:
    """The embed pass's sink: per unit, the vectors and hashes of every embedded image, the
    images it failed on (relayed as rejects by the dedup stage), then the unit's marker."""
    out = []
    for unit in sorted(set(batch.column("unit").to_pylist())):
        rows = batch.filter(pc.equal(batch.column("unit"), unit)).to_pylist()
        embedded = [r for r in rows if r["sample"]]
        failed = [
            Reject.model_validate_json(r["reject"])
            for r in rows
            if r["reject"] and instances & set(json.loads(r["trace"] or "{}"))
        ]
        samples = [Sample.model_validate_json(r["sample"]) for r in embedded]
        outputs = [pickle.loads(r["outputs"]) for r in embedded]
        vectors = np.stack([o["embedding"] for o in outputs]) if outputs else np.zeros((0, 0), np.float32)
        table = embedding_table(
            [s.key for s in samples],
            [unit] * len(samples),
            vectors,
            {
                "sha256": pa.array([s.sha256 for s in samples], pa.string()),
                "phash": pa.array([o["phash"] for o in outputs], pa.int64()),
                "fingerprint": pa.array([o["fingerprint"] for o in outputs], pa.binary()),
                "width": pa.array([s.original_width or s.width for s in samples], pa.int64()),
                "height": pa.array([s.original_height or s.height for s in samples], pa.int64()),
            },
            dtype=storage_dtype,
        )
        provenance = outputs[0]["provenance"] if outputs else None
        ensure_dir(rd.embeddings)
        write_rejects([r.model_dump() for r in failed], rd.embed_rejects_file(unit))
        write_embeddings_file(
            rd.embeddings_file(unit), table.replace_schema_metadata({"provenance": json.dumps(provenance)})
        )
        counts = {
            "unit": unit,
            "embedded": len(samples),
            "failed": len(failed),
            "stages": count_traces([r["trace"] for r in rows]),
            "store_retries": store_retries(),
        }
        write_json_atomic(rd.embed_marker(unit), counts)
        out.append({"unit": unit, "counts": json.dumps(counts)})
    return pa.Table.from_pylist(out, schema=pa.schema([("unit", pa.int64()), ("counts", pa.string())]))


def run_embed(config: Config, rd: RunDir, plan_units: int, progress: Progress, load_units, budget) -> int:
    """Embed every unit that has no embed marker yet; counts go to the error budget as units
    finish. Returns how many units it embedded."""
    import ray

    pending = rd.pending("embed", plan_units)
    bar = progress.phase("embed", total=plan_units, done=plan_units - len(pending), unit="unit")
    if pending:
        ds = ray.data.from_items([{"unit": u} for u in pending], override_num_blocks=len(pending))
        spec = None
        if config.embed.feeders() != 0:  # resolved in a worker: the driver does not import torch
            spec = ray.get(one_off(pixel_spec, num_cpus=0).remote(config.embed))  # it imports torch
        runs = embed_stages(config, spec)
        ds = add_stages(
            ds,
            runs,
            load=Step(load_units, {"rd": rd, "kind": config.input.kind}),
            sink=Step(
                write_embeddings,
                {"rd": rd, "instances": {r.instance for r in runs}, "storage_dtype": config.embed.storage_dtype},
            ),
        )
        for result in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
            for row in result.to_pylist():
                counts = json.loads(row["counts"])
                bar.update(1, images=counts["embedded"], failed=counts["failed"])
                budget.add(counts["stages"])
    bar.close()
    return len(pending)


# -- dedup ------------------------------------------------------------------------------------
