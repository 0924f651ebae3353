"""The dedup phase on Ray: a global step that waits for every embedding and holds at scale: k-means is trained on a
bounded sample, units are assigned to clusters in parallel tasks that also shuffle rows into
buckets (whole coarse cells), and each bucket is deduplicated cluster by cluster in its own task.
Only key columns (no vectors) come back to the driver for the merge and the balanced selection;
the shuffle is scratch, cleared before a dedup starts and deleted bucket by bucket once decided.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from upath import UPath

from denseforge.pipeline.config import Config
from denseforge.pipeline.progress import Progress
from denseforge.pipeline.rundir import RunDir
from denseforge.stages import dedup as dd
from denseforge.stages.embed import embeddings_matrix, write_embeddings_file
from denseforge.storage import (
    ensure_dir,
    list_files,
    location,
    read_arrow,
    read_json,
    read_parquet,
    remove_tree,
    url,
    write_arrow_atomic,
    write_json_atomic,
    write_table_atomic,
)

# fmt: off
DECISION_SCHEMA = pa.schema([
    ("key", pa.string()), ("unit", pa.int64()), ("cluster", pa.int64()), ("distance", pa.float32()),
    ("rank", pa.int64()), ("reason", pa.string()), ("dup_of", pa.string()),
])
# fmt: on
# a bucket's decisions: one row per entry (a border row has one in each of its two clusters)
ENTRY_SCHEMA = DECISION_SCHEMA.append(pa.field("primary", pa.bool_()))


EARLIER = "#"  # an earlier run's image in this run's dedup is keyed "<run>#<key>" (run --against)


def earlier_files(rd: RunDir, runs: list[str], options: dict[str, Any]) -> tuple[list[UPath], list[int]]:
    """The written images of earlier runs (`run --against`) as embeddings files of this run's
    dedup, keyed `<run>#<key>` with unit -1; returns the files and their rows. The earlier runs
    are only read."""
    files, rows = [], []
    ensure_dir(rd.against)
    for i, source in enumerate(runs):
        earlier = RunDir(location(source, options))
        written = read_parquet(earlier.manifest, columns=["key"]).column("key")
        for file in list_files(earlier.embeddings, ".parquet"):
            if file.name.endswith(".rejects.parquet"):
                continue
            table = read_parquet(file).replace_schema_metadata(None)
            table = table.filter(pc.is_in(table.column("key"), value_set=written))
            if not table.num_rows:
                continue
            keys = pc.binary_join_element_wise(pa.scalar(url(earlier.root)), table.column("key"), EARLIER)
            table = table.set_column(table.schema.get_field_index("key"), "key", keys)
            units = pa.array(np.full(table.num_rows, -1), pa.int64())
            table = table.set_column(table.schema.get_field_index("unit"), "unit", units)
            target = rd.against / f"{i:03d}-{file.name}"
            write_embeddings_file(target, table)
            files.append(target)
            rows.append(table.num_rows)
    return files, rows


SAMPLE_SPREAD = 4  # the training sample reads this many times the files its fraction needs


def _train_sample(files: list[UPath], fraction: float, seed: int) -> np.ndarray:
    """About `fraction` of all rows, from a seeded random subset of the units' files (each row of a
    chosen file with probability fraction x files / chosen): at scale the sample is a few percent
    of the rows, and reading every file to keep so few of them was most of the training time."""
    chosen = len(files)
    if fraction * SAMPLE_SPREAD < 1:
        chosen = min(len(files), max(1, int(np.ceil(fraction * SAMPLE_SPREAD * len(files)))))
    picked = (
        sorted(np.random.default_rng(seed).choice(len(files), size=chosen, replace=False))
        if chosen < len(files)
        else range(len(files))
    )
    rate = fraction * len(files) / chosen
    parts = []
    for i in picked:
        x = embeddings_matrix(read_parquet(files[i], columns=["embedding"]))
        if len(x):
            pick = np.random.default_rng(seed + int(i)).random(len(x)) < rate
            parts.append(x[pick])
    return np.concatenate(parts) if parts else np.zeros((0, 0), np.float32)


def _train(
    files: list[UPath], k: int, fraction: float, seed: int, niter: int, mppc: int, use_gpu: bool | None
) -> dd.CentroidIndex:
    sample = _train_sample(files, fraction, seed)
    return dd.train_kmeans(
        sample, min(k, len(sample)), niter=niter, seed=seed, use_gpu=use_gpu, max_points_per_centroid=mppc
    )


ASSIGN_TASK_ROWS = 65_536  # an assignment task takes consecutive units up to about this many rows


def _assignment_tasks(files: list[UPath], rows: list[int]) -> list[list[UPath]]:
    """Consecutive units grouped into assignment tasks of about `ASSIGN_TASK_ROWS` rows: a task
    writes one file per bucket, so a bucket task opens one file per task, not one per unit."""
    tasks: list[list[UPath]] = []
    size = ASSIGN_TASK_ROWS
    for file, count in zip(files, rows, strict=True):
        if size >= ASSIGN_TASK_ROWS:
            tasks.append([])
            size = 0
        tasks[-1].append(file)
        size += count
    return tasks


def _assign_units(
    files: list[UPath], index: dd.CentroidIndex, rd: RunDir, buckets: int, border: float, border_clusters: int
) -> int:
    """Rows to the buckets of their clusters, a bucket holding whole coarse cells: a border row is
    also deduplicated in its border clusters (`dd.border_entries`, with its own centroid
    similarity, the keep priority). A row goes once to each bucket it has entries in, its clusters
    there as a list (`_bucket_entries`), so a border cluster in its own cell costs no second copy
    of its vector. One file per bucket,
    named after the first unit. Returns the bytes it wrote."""
    pieces: dict[int, list[pa.Table]] = {}
    for file in files:
        table = read_parquet(file).replace_schema_metadata(None)
        if table.num_rows == 0:
            continue
        labels, sims, extra = dd.assign_clusters(
            embeddings_matrix(table), index, border=border, border_clusters=border_clusters
        )
        rows, clusters, primary = dd.border_entries(np.arange(table.num_rows), labels, extra)
        bucket_of = index.cell_of(clusters) % buckets
        order = np.lexsort((np.arange(len(rows)), rows, bucket_of))  # by bucket, then row, its own cluster first
        rows, clusters, primary, bucket_of = rows[order], clusters[order], primary[order], bucket_of[order]
        cuts = np.flatnonzero(np.diff(bucket_of)) + 1
        for lo, hi in zip(np.r_[0, cuts], np.r_[cuts, len(rows)], strict=True):
            starts = np.r_[0, np.flatnonzero(np.diff(rows[lo:hi])) + 1]
            first = lo + starts
            pieces.setdefault(int(bucket_of[lo]), []).append(
                table.take(pa.array(rows[first]))
                .append_column(
                    "clusters",
                    pa.ListArray.from_arrays(pa.array(np.r_[starts, hi - lo], pa.int32()), pa.array(clusters[lo:hi])),
                )
                .append_column("centroid_sim", pa.array(sims[rows[first]]))
                .append_column("primary", pa.array(primary[first]))
            )
    written = 0
    for bucket, tables in pieces.items():
        target = rd.bucket(bucket) / f"{files[0].stem}.arrow"
        ensure_dir(target.parent)
        written += write_arrow_atomic(target, pa.concat_tables(tables))
    return written


def _bucket_entries(table: pa.Table) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(row, cluster, primary) per entry of a bucket's rows: each row's `clusters` list, whose first
    is the row's own cluster where `primary` says so."""
    clusters = table.column("clusters")
    lengths = pc.list_value_length(clusters).to_numpy()
    rows = np.repeat(np.arange(table.num_rows), lengths)
    primary = np.zeros(len(rows), dtype=bool)
    primary[np.r_[0, np.cumsum(lengths)[:-1]]] = table.column("primary").to_numpy(zero_copy_only=False)
    return rows, pc.list_flatten(clusters).to_numpy(), primary


def _fingerprints(table: pa.Table) -> np.ndarray | None:
    """The second witness of every row as an (n, 224) uint8 matrix (None for embeddings files
    written before fingerprints existed, or when both witness checks are off)."""
    if "fingerprint" not in table.column_names:
        return None
    return np.frombuffer(b"".join(table.column("fingerprint").to_pylist()), dtype=np.uint8).reshape(table.num_rows, -1)


def _dedup_bucket(bucket_path: UPath, out_file: UPath, cfg: dd.DedupConfig, select: dd.SelectConfig) -> dict[str, Any]:
    """Every entry of one bucket decided (`dd.dedup_entries`), written as columns: a bucket holds
    hundreds of thousands of entries at 10M rows, so no Python object per entry. Only the entries
    the merge reads are written: every primary entry, and the border copies that were removed (a
    kept border copy decides nothing), about one per row."""
    files = list_files(bucket_path, ".arrow")
    table = pa.concat_tables([read_arrow(f) for f in files], promote_options="default") if files else None
    if table is None or not table.num_rows:
        write_table_atomic(out_file, ENTRY_SCHEMA.empty_table())
        return {"entries": 0, "sweep_kept": {}}
    rows, cluster, primary = _bucket_entries(table)
    key = table.column("key").combine_chunks()
    earlier = pc.match_substring(key, EARLIER).to_numpy(zero_copy_only=False)
    sims = table.column("centroid_sim").to_numpy()
    width, height = table.column("width").to_numpy(), table.column("height").to_numpy()
    pre = dd.prefilter(width, height, select.min_short_edge, select.max_aspect_ratio)[rows]
    entries = np.flatnonzero(pre == dd.KEPT)
    columns = dd.Rows.of(
        key.to_pylist(),
        embeddings_matrix(table, dtype=None),
        table.column("sha256").to_pylist(),
        table.column("phash").to_numpy(),
        sims,
        width * height,
        _fingerprints(table),
        earlier if earlier.any() else None,
    )
    bf16 = dd.use_bf16(cfg.matmul, np.unique(cluster[entries], return_counts=True)[1])
    # an earlier run's rows count in no sweep or rank: they are decided elsewhere
    counted = primary[entries] & ~earlier[rows[entries]]
    result = dd.dedup_entries(rows[entries], cluster[entries], counted, columns, cfg, bf16)
    reason, dup_of, rank = pre, np.full(len(rows), -1), np.full(len(rows), -1)
    reason[entries], dup_of[entries], rank[entries] = result.reason, result.dup_of, result.rank
    out = pa.table(
        {
            "key": key.take(pa.array(rows)),
            "unit": table.column("unit").take(pa.array(rows)),
            "cluster": pa.array(cluster),
            "distance": pa.array(1 - sims[rows]),
            "rank": pa.array(rank),
            "reason": pa.array(reason, pa.string()),
            "dup_of": key.take(pa.array(dup_of, mask=dup_of < 0)),
            "primary": pa.array(primary),
        }
    ).cast(ENTRY_SCHEMA)
    write_table_atomic(out_file, out.filter(pa.array((primary | (reason != dd.KEPT)) & ~earlier[rows])))
    return {"entries": len(rows), "sweep_kept": {str(k): v for k, v in result.sweep_kept.items()}}


def _strings(column: pa.ChunkedArray) -> np.ndarray:
    """A string column with few distinct values (reasons) as an object array that shares one Python
    string per value, where `to_pylist` makes a string object for each of millions of entries."""
    values = pc.unique(column)
    return np.asarray(values.to_pylist(), dtype=object)[pc.index_in(column, value_set=values).to_numpy()]


def _merge_entries(table: pa.Table) -> pa.Table:
    """One decision per key from the buckets' entries (`dd.merge_entries`), on its primary row,
    sorted by key. Every row has exactly one primary entry, so the primary entries' keys are the
    rows (in key order, so that a row's index does not depend on the order the buckets' parts come
    in); the others find theirs by hash (`index_in`), not by Python objects."""
    is_primary = table.column("primary")
    primary = is_primary.to_numpy()
    result = table.filter(is_primary).drop_columns(["primary"]).sort_by("key")
    keys = result.column("key").combine_chunks()
    # an earlier run's images (run --against) are rows after this run's, kept, with no entries
    earlier = pc.unique(table.filter(pc.match_substring(pc.fill_null(table.column("dup_of"), ""), EARLIER))["dup_of"])
    every = pa.concat_arrays([keys, earlier.combine_chunks() if isinstance(earlier, pa.ChunkedArray) else earlier])
    row = pc.index_in(table.column("key"), value_set=keys).to_numpy()
    dup_row = pc.fill_null(pc.index_in(table.column("dup_of"), value_set=every), -1).to_numpy()
    entries = dd.DedupResult(
        _strings(table.column("reason")), dup_row.astype(np.int64), table.column("rank").to_numpy(), {}
    )
    merged = dd.merge_entries(row.astype(np.int64), primary, entries, len(every))
    n = len(keys)
    columns = {
        "reason": pa.array(merged.reason[:n], pa.string()),
        "rank": pa.array(merged.rank[:n]),
        "dup_of": every.take(pa.array(merged.dup_of[:n], mask=merged.dup_of[:n] < 0)),
    }
    for name, column in columns.items():
        result = result.set_column(result.schema.get_field_index(name), name, column)
    return result


def run_dedup(config: Config, rd: RunDir, plan_units: int, progress: Progress) -> dict[str, Any]:
    """Cluster, deduplicate and select; writes dedup/decisions.parquet and dedup/summary.json."""
    import ray

    out = rd.dedup
    summary_file = rd.dedup_summary
    if summary_file.exists():
        return read_json(summary_file)
    cfg, sel = config.dedup, config.select
    files = [rd.embeddings_file(u) for u in range(plan_units)]
    embedded = dict(rd.marker_counts("embed"))  # each unit's rows, from its marker: no request per file
    rows = [embedded[u]["embedded"] for u in range(plan_units)]
    n = sum(rows)
    k = dd.clusters_for(n, cfg.clusters, cfg.target_cluster_size)
    bar = progress.phase("dedup", total=4, unit="step")
    decisions = rd.decisions
    ensure_dir(out)
    sweep: Counter[float] = Counter()
    entries = shuffle_bytes = 0
    scratch = (rd.buckets, rd.bucket_parts, rd.against)
    for path in scratch:  # what an attempt cut short left behind would be read as entries of this one
        remove_tree(path)
    against = rd.read_state().get("against", [])
    earlier, earlier_rows = earlier_files(rd, against, config.storage.options) if n and against else ([], [])
    if earlier:
        progress.note(f"dedup: against {sum(earlier_rows)} kept images of {len(against)} earlier run(s)")
    if n:
        fraction = dd.train_points(n, k, cfg) / n
        train = ray.remote(num_gpus=cfg.num_gpus)(_train)
        index = ray.get(
            train.remote(
                files,
                k,
                fraction,
                config.run.seed,
                cfg.kmeans_iters,
                cfg.max_points_per_centroid,
                cfg.num_gpus > 0 or None,
            )
        )
        bar.update(1, clusters=len(index))
        buckets = min(cfg.buckets, index.cell_count)
        ref = ray.put(index)
        assign = ray.remote(_assign_units)
        shuffle_bytes = sum(
            ray.get(
                [
                    assign.remote(group, ref, rd, buckets, cfg.border, cfg.border_clusters)
                    for group in _assignment_tasks(files + earlier, rows + earlier_rows)
                ]
            )
        )
        bar.update(1)
        parts = [rd.bucket_part(b) for b in range(buckets)]
        ensure_dir(rd.bucket_parts)
        task = ray.remote(_dedup_bucket)
        running = {task.remote(rd.bucket(b), p, cfg, sel): b for b, p in enumerate(parts)}
        while running:
            (done,), _ = ray.wait(list(running))
            result = ray.get(done)
            sweep.update({float(e): v for e, v in result["sweep_kept"].items()})
            entries += result["entries"]
            # its rows are decided: their shuffled copies go while other buckets run (not all at the
            # end, outside the steps), and the disk peak falls
            remove_tree(rd.bucket(running.pop(done)))
        bar.update(1)
        table = _merge_entries(pa.concat_tables([read_parquet(p) for p in parts if p.exists()]))
        table = _select(table, sel.per_cluster, sel.target_total)
        kept = pc.equal(table.column("reason"), dd.KEPT)
        table = table.append_column("kept", kept)
        write_table_atomic(decisions, table)
        bar.update(1)
    else:
        write_table_atomic(decisions, DECISION_SCHEMA.append(pa.field("kept", pa.bool_())).empty_table())
        index = dd.CentroidIndex(np.zeros((0, 0)))
    bar.close()
    decided = read_parquet(decisions, columns=["reason", "dup_of"])
    counts = pc.value_counts(decided.column("reason")).to_pylist()
    reasons = {c["values"]: c["counts"] for c in counts if c["values"]}
    of_earlier = pc.sum(pc.match_substring(pc.fill_null(decided.column("dup_of"), ""), EARLIER)).as_py() or 0
    summary = {
        "embedded": n,
        "clusters": len(index),
        "entries": entries,
        "shuffle_bytes": shuffle_bytes,
        "epsilon": cfg.epsilon,
        "keep": cfg.keep,
        "removed_by_reason": dict(sorted(reasons.items())),
        "against": {"runs": against, "kept_images": sum(earlier_rows), "removed_as_their_copies": of_earlier},
        "epsilon_sweep": {str(e): sweep[e] for e in sorted(sweep)},
        "epsilon_sweep_note": "images each epsilon would keep after exact/perceptual dedup and prefilters",
    }
    for e in sorted(sweep):
        progress.note(f"epsilon sweep: epsilon={e:<5} keeps {sweep[e]} of {n} embedded images")
    if config.embed.weights == "random":
        progress.note("epsilon sweep: the embeddings come from random weights (embed.weights), so it means nothing")
    write_json_atomic(summary_file, summary)
    for path in scratch:  # the shuffle: ~3 copies of the embeddings, of no use once decided
        remove_tree(path)
    return summary


def _select(table: pa.Table, per_cluster: int | None, target_total: int | None) -> pa.Table:
    reason = _strings(table.column("reason"))
    kept = reason == dd.KEPT
    if (per_cluster is None and target_total is None) or not kept.any():
        return table
    idx = np.flatnonzero(kept)
    key_rank = None if target_total is None else pc.rank(table.column("key"), "ascending").to_numpy()[idx]
    chosen = dd.select_balanced(
        table.column("cluster").to_numpy()[idx],
        table.column("rank").to_numpy()[idx],
        key_rank,
        per_cluster,
        target_total,
    )
    reason[idx[~chosen]] = dd.NOT_SELECTED
    return table.set_column(table.schema.get_field_index("reason"), "reason", pa.array(reason, pa.string()))
