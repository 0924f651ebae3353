"""Dedup's merge and selection, partitioned so that no process holds every row's decision.

A row's home is the bucket of its own cluster; merge partition `home % partitions` holds every
row whose home maps to it, and the bucket tasks send each entry (a row's own, and its removed
border copies) to its row's partition. So a partition holds whole clusters (the balanced
selection is local) and every entry of its rows (the merge is local). Two things cross
partitions, in rounds of small tables: a dup_of chain that runs through another partition
(`chain_requests` → `chain_answers` → `chain_apply`), and the global cut of `target_total`
(`rank_counts`, `clusters_at`: the driver holds counts and one cluster id per cluster at most).
These are plain functions over files; `dedup_phase` runs them as Ray tasks."""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from upath import UPath

from denseforge.stages import dedup as dd
from denseforge.storage import read_parquet, write_table_atomic

# fmt: off
DECISION_SCHEMA = pa.schema([
    ("key", pa.string()), ("unit", pa.int64()), ("cluster", pa.int64()), ("distance", pa.float32()),
    ("rank", pa.int64()), ("reason", pa.string()), ("dup_of", pa.string()),
])
# fmt: on
FINAL_SCHEMA = DECISION_SCHEMA.append(pa.field("kept", pa.bool_()))
# a bucket's entries for one partition: a border row has one per cluster; home: the bucket of the
# row's own cluster, dup_home: that of the row it duplicates (-1: none, or an earlier run's image)
ENTRY_SCHEMA = DECISION_SCHEMA.append(pa.field("primary", pa.bool_()))
ENTRY_SCHEMA = ENTRY_SCHEMA.append(pa.field("home", pa.int64())).append(pa.field("dup_home", pa.int64()))
# a partition's rows once merged: where each dup_of lives, for the chain rounds
MERGED_SCHEMA = DECISION_SCHEMA.append(pa.field("dup_home", pa.int64()))

EARLIER = "#"  # an earlier run's image in this run's dedup is keyed "<run>#<key>" (run --against)


def partition_of(home: np.ndarray | int, partitions: int) -> Any:
    """The merge partition of a home bucket."""
    return home % partitions


def _strings(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """A string column with few distinct values (reasons) as an object array that shares one Python
    string per value, where `to_pylist` makes a string object for each of millions of entries."""
    values = pc.unique(column)
    return np.asarray(values.to_pylist(), dtype=object)[pc.index_in(column, value_set=values).to_numpy()]


def merge_partition(parts: list[UPath], out: UPath) -> None:
    """One decision per row of the partition from its entries (`dd.merge_entries`), sorted by key,
    each dup_of followed as far as the partition knows (`chain_apply` goes on across partitions).
    Every row has exactly one primary entry, so the primary entries' keys are the rows; rows are
    numbered in key order among every key the entries name (theirs, and the rows they duplicate),
    so that the merge's tie-break (the lowest dup_of) is the key order whatever the partition."""
    table = pa.concat_tables([read_parquet(p) for p in parts]) if parts else ENTRY_SCHEMA.empty_table()
    is_primary = table.column("primary")
    result = table.filter(is_primary).sort_by("key")
    keys = result.column("key").combine_chunks()
    dup_of = pc.drop_null(table.column("dup_of"))
    outside = pc.unique(dup_of.filter(pc.invert(pc.is_in(dup_of, value_set=keys))))
    outside = outside.combine_chunks() if isinstance(outside, pa.ChunkedArray) else outside
    earlier = pc.match_substring(outside, EARLIER)
    # an earlier run's images come after this run's rows: their copies name them last
    every = pa.concat_arrays(
        [pa.concat_arrays([keys, outside.filter(pc.invert(earlier))]).sort(), outside.filter(earlier)]
    )
    row = pc.index_in(table.column("key"), value_set=every).to_numpy()
    dup_row = pc.fill_null(pc.index_in(table.column("dup_of"), value_set=every), -1).to_numpy().astype(np.int64)
    home = np.full(len(every), -1, dtype=np.int64)
    home[row] = table.column("home").to_numpy()
    named = dup_row >= 0
    home[dup_row[named]] = table.column("dup_home").to_numpy()[named]
    entries = dd.DedupResult(_strings(table.column("reason")), dup_row, table.column("rank").to_numpy(), {})
    merged = dd.merge_entries(row.astype(np.int64), is_primary.to_numpy(), entries, len(every))
    mine = pc.index_in(keys, value_set=every).to_numpy()
    final = merged.dup_of[mine]
    columns = {
        "rank": pa.array(merged.rank[mine]),
        "reason": pa.array(merged.reason[mine], pa.string()),
        "dup_of": every.take(pa.array(final, mask=final < 0)),
        "dup_home": pa.array(np.where(final >= 0, home[np.maximum(final, 0)], -1)),
    }
    for name, column in columns.items():
        result = result.set_column(result.schema.get_field_index(name), name, column)
    write_table_atomic(out, result.select(MERGED_SCHEMA.names).cast(MERGED_SCHEMA))


def chain_requests(merged: UPath, partition: int, partitions: int) -> list[pa.Array]:
    """Per partition, the rows that this partition's removed rows name as their dup_of and that
    live there: a chain may go on through them (a border row kept in one cluster, removed in
    another)."""
    table = read_parquet(merged, columns=["dup_of", "dup_home"])
    where = partition_of(table.column("dup_home").to_numpy(), partitions)
    asked = (table.column("dup_home").to_numpy() >= 0) & (where != partition)
    out = []
    for other in range(partitions):
        named = table.column("dup_of").filter(pa.array(asked & (where == other)))
        out.append(pc.unique(named) if len(named) else pa.array([], pa.string()))
    return out


def chain_answers(merged: UPath, *requests: pa.Array) -> list[pa.Table]:
    """For each asking partition, the rows it asked about that are removed here, with the row each
    duplicates (key, dup_of, dup_home)."""
    table = read_parquet(merged, columns=["key", "dup_of", "dup_home"])
    removed = table.filter(pc.is_valid(table.column("dup_of")))
    return [removed.filter(pc.is_in(removed.column("key"), value_set=asked)) for asked in requests]


def chain_apply(merged: UPath, *answers: pa.Table) -> int:
    """Rows whose dup_of was removed in another partition point where that row points (then on
    through this partition's own removed rows). Returns how many rows changed: none, and every
    chain has ended."""
    found = pa.concat_tables(answers).combine_chunks() if answers else None
    if found is None or not found.num_rows:
        return 0
    table = read_parquet(merged).combine_chunks()
    pos = pc.index_in(table.column("dup_of"), value_set=found.column("key").chunk(0))
    changed = pc.sum(pc.is_valid(pos)).as_py() or 0
    dup_of = pc.coalesce(found.column("dup_of").take(pos), table.column("dup_of"))
    dup_home = pc.coalesce(found.column("dup_home").take(pos), table.column("dup_home"))
    keys = table.column("key").chunk(0)
    while True:  # on through this partition's own removed rows
        local = pc.index_in(dup_of, value_set=keys)
        onward = dup_of.take(local)
        if not pc.any(pc.is_valid(onward)).as_py():
            break
        dup_of, dup_home = pc.coalesce(onward, dup_of), pc.coalesce(dup_home.take(local), dup_home)
    table = table.set_column(table.schema.get_field_index("dup_of"), "dup_of", dup_of)
    table = table.set_column(table.schema.get_field_index("dup_home"), "dup_home", dup_home)
    write_table_atomic(merged, table)
    return changed


def _chosen(table: pa.Table, per_cluster: int | None) -> np.ndarray:
    """Kept rows that pass `per_cluster` (rank is unique inside a cluster among kept rows)."""
    kept = pc.equal(table.column("reason"), dd.KEPT).to_numpy(zero_copy_only=False)
    if per_cluster is not None:
        kept &= table.column("rank").to_numpy() < per_cluster
    return kept


def rank_counts(merged: UPath, per_cluster: int | None) -> np.ndarray:
    """How many chosen rows have each rank: the driver's view of `target_total`'s cut."""
    table = read_parquet(merged, columns=["reason", "rank"])
    return np.bincount(table.column("rank").to_numpy()[_chosen(table, per_cluster)])


def clusters_at(merged: UPath, rank: int, per_cluster: int | None) -> np.ndarray:
    """The clusters whose chosen row of rank `rank` is here (one per cluster at most), sorted."""
    table = read_parquet(merged, columns=["reason", "rank", "cluster"])
    at = _chosen(table, per_cluster) & (table.column("rank").to_numpy() == rank)
    return np.sort(table.column("cluster").to_numpy()[at])


def select_partition(merged: UPath, out: UPath, per_cluster: int | None, cut: tuple[int, int] | None) -> dict[str, Any]:
    """The partition's decisions with the balanced selection applied (`dd.select_balanced`'s rule:
    top `per_cluster` by rank, then everyone's best first, by cluster, up to the cut (last rank,
    last cluster at it) the driver found for `target_total`). Returns its counts by reason, and of
    rows removed as copies of earlier runs' images."""
    table = read_parquet(merged)
    reason = _strings(table.column("reason"))
    kept = reason == dd.KEPT
    chosen = _chosen(table, per_cluster)
    if cut is not None:
        rank, cluster = table.column("rank").to_numpy(), table.column("cluster").to_numpy()
        chosen &= (rank < cut[0]) | ((rank == cut[0]) & (cluster <= cut[1]))
    reason[kept & ~chosen] = dd.NOT_SELECTED
    table = table.set_column(table.schema.get_field_index("reason"), "reason", pa.array(reason, pa.string()))
    table = table.append_column("kept", pa.array(reason == dd.KEPT)).select(FINAL_SCHEMA.names).cast(FINAL_SCHEMA)
    write_table_atomic(out, table)
    values, counts = np.unique(reason[reason != dd.KEPT].astype(str), return_counts=True)
    of_earlier = pc.sum(pc.match_substring(pc.fill_null(table.column("dup_of"), ""), EARLIER)).as_py() or 0
    return {"reasons": {str(v): int(c) for v, c in zip(values, counts, strict=True)}, "of_earlier": int(of_earlier)}


def target_cut(counts: list[np.ndarray], target_total: int | None) -> tuple[int, int] | None:
    """The rank at which `target_total` is reached and how many rows of that rank it still takes
    (`None`: every chosen row fits)."""
    if target_total is None or not counts:
        return None
    total = np.zeros(max(len(c) for c in counts), dtype=np.int64)
    for c in counts:
        total[: len(c)] += c
    if total.sum() <= target_total:
        return None
    cum = np.cumsum(total)
    rank = int(np.searchsorted(cum, target_total))
    return rank, int(target_total - (cum[rank - 1] if rank else 0))
