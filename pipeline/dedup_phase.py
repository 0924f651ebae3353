"""The dedup phase on Ray: a global step that waits for every embedding and holds at scale, with
nothing on the driver but counts and the index. k-means is trained on a bounded sample read by
parallel tasks (above `two_level_above` clusters the fine level per coarse cell, in parallel
tasks); one shuffler actor per node holds the index once and appends every row it assigns to that
node's file of each bucket (buckets hold whole coarse cells); each bucket is deduplicated cluster
by cluster in its own task, which sends its entries to the merge partitions of their rows
(`dedup_merge`); the partitions merge, follow dup_of chains across one another and select.
The shuffle is scratch, cleared before a dedup starts and deleted bucket by bucket once decided.
"""

from __future__ import annotations

import itertools
import shutil
import tempfile
import threading
from collections import Counter
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from upath import UPath

from denseforge.errors import RunFailedError
from denseforge.pipeline.config import Config
from denseforge.pipeline.dedup_merge import (
    EARLIER,
    ENTRY_SCHEMA,
    FINAL_SCHEMA,
    chain_answers,
    chain_apply,
    chain_requests,
    clusters_at,
    merge_partition,
    partition_of,
    rank_counts,
    select_partition,
    target_cut,
)
from denseforge.pipeline.progress import Progress
from denseforge.pipeline.rundir import RunDir
from denseforge.stages import dedup as dd
from denseforge.stages.embed import embeddings_matrix, write_embeddings_file
from denseforge.storage import (
    ensure_dir,
    is_local,
    list_files,
    location,
    parquet_writer,
    publish,
    read_arrow,
    read_json,
    read_parquet,
    remove_tree,
    scratch_dir,
    url,
    write_json_atomic,
    write_table_atomic,
)


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
SAMPLE_TASK_FILES = 16  # a sampling task reads at most this many files


def _sample_plan(files: list[UPath], fraction: float, seed: int) -> tuple[list[int], float]:
    """Which files the training sample reads (a seeded random subset) and at what rate it keeps
    their rows (about `fraction` of all rows): at scale the sample is a few percent of the rows,
    and reading every file to keep so few of them was most of the training time."""
    chosen = len(files)
    if fraction * SAMPLE_SPREAD < 1:
        chosen = min(len(files), max(1, int(np.ceil(fraction * SAMPLE_SPREAD * len(files)))))
    picked = (
        sorted(int(i) for i in np.random.default_rng(seed).choice(len(files), size=chosen, replace=False))
        if chosen < len(files)
        else list(range(len(files)))
    )
    return picked, fraction * len(files) / max(chosen, 1)


def _sample_part(files: list[UPath], picked: list[int], rate: float, seed: int, coarse_rate: float) -> tuple:
    """The sample's rows from some of its files (each row with probability `rate`, seeded by its
    file), and the part of them (`coarse_rate`) the coarse level trains on."""
    parts = []
    for i, file in zip(picked, files, strict=True):
        x = embeddings_matrix(read_parquet(file, columns=["embedding"]), dtype=None)  # as stored: float16 halves it
        if len(x):
            parts.append(x[np.random.default_rng(seed + i).random(len(x)) < rate])
    sample = np.concatenate(parts) if parts else np.zeros((0, 0), np.float32)
    return sample, sample[np.random.default_rng(seed + len(picked)).random(len(sample)) < coarse_rate]


def _concat(parts: tuple[np.ndarray, ...]) -> np.ndarray:
    parts = tuple(p for p in parts if p.size)
    return np.concatenate(parts) if parts else np.zeros((0, 0), np.float32)


def _train_flat(k: int, niter: int, seed: int, use_gpu: bool | None, mppc: int, *parts: np.ndarray) -> dd.CentroidIndex:
    """k centroids in one task (flat below `two_level_above`) on the whole sample."""
    sample = _concat(parts)
    return dd.train_kmeans(
        sample, min(k, len(sample)), niter=niter, seed=seed, use_gpu=use_gpu, max_points_per_centroid=mppc
    )


def _train_coarse(k: int, niter: int, seed: int, use_gpu: bool | None, mppc: int, *parts: np.ndarray) -> np.ndarray:
    """The coarse level, on its bounded part of the sample."""
    sample = _concat(parts)
    return dd.flat_kmeans(sample, min(k, len(sample)), niter, seed, bool(use_gpu), mppc)


def _route(part: np.ndarray, coarse: np.ndarray, groups: int) -> list[Any]:
    """A sample part's rows by coarse cell: their count per cell, then per fine-training task
    (cell % groups) its rows and their cells."""
    cells = dd.assign_clusters(part, coarse)[0] if len(part) else np.zeros(0, np.int64)
    out: list[Any] = [np.bincount(cells, minlength=len(coarse))]
    for g in range(groups):
        mine = cells % groups == g
        out.append((cells[mine], part[mine]))
    return out


def _train_cells(
    cells: list[int], shares: list[int], niter: int, seed: int, use_gpu: bool | None, mppc: int, *routed: tuple
) -> list[tuple[int, np.ndarray]]:
    """The fine centroids of some coarse cells, each trained on the sample's rows in that cell."""
    labels = np.concatenate([r[0] for r in routed]) if routed else np.zeros(0, np.int64)
    x = _concat(tuple(r[1] for r in routed))
    return [
        (c, dd.train_cell(x[labels == c], share, niter, seed + c, use_gpu, mppc))
        for c, share in zip(cells, shares, strict=True)
    ]


def train_index(files: list[UPath], n: int, k: int, seed: int, cfg: dd.DedupConfig, cpus: int) -> dd.CentroidIndex:
    """The centroid index, trained on about `dd.train_points` rows sampled by parallel tasks;
    above `two_level_above` clusters the coarse level first (on its bounded share of the sample),
    then the fine level of each coarse cell in parallel tasks on the sample's rows of the cell."""
    import ray

    fraction = dd.train_points(n, k, cfg) / n
    picked, rate = _sample_plan(files, fraction, seed)
    two_level = k > dd.TWO_LEVEL_ABOVE
    coarse_k = int(np.ceil(np.sqrt(k))) if two_level else 0
    coarse_rate = min(1.0, coarse_k * cfg.max_points_per_centroid / max(1.0, fraction * n))
    use_gpu = cfg.num_gpus > 0 or None
    remote: Any = ray.remote  # tasks of several returns, which Ray's annotations do not follow
    sample = remote(num_returns=2)(_sample_part)
    parts = [
        sample.remote([files[i] for i in chunk], chunk, rate, seed, coarse_rate)
        for chunk in (picked[s : s + SAMPLE_TASK_FILES] for s in range(0, len(picked), SAMPLE_TASK_FILES))
    ]
    niter, mppc = cfg.kmeans_iters, cfg.max_points_per_centroid
    if not two_level:
        flat = remote(num_gpus=cfg.num_gpus)(_train_flat)
        return ray.get(flat.remote(k, niter, seed, use_gpu, mppc, *(p[0] for p in parts)))
    coarse = ray.get(
        remote(num_gpus=cfg.num_gpus)(_train_coarse).remote(
            coarse_k, niter, seed, use_gpu, mppc, *(p[1] for p in parts)
        )
    )
    groups = max(1, min(len(coarse), 4 * cpus))
    route = remote(num_returns=groups + 1)(_route)
    routed = [route.remote(p[0], coarse, groups) for p in parts]
    counts = np.sum(ray.get([r[0] for r in routed]), axis=0)
    shares = dd.fine_shares(counts, k)
    fine = remote(num_gpus=cfg.num_gpus / groups)(_train_cells)
    tasks = []
    for g in range(groups):
        cells = [c for c in range(g, len(coarse), groups) if counts[c]]
        if cells:
            tasks.append(
                fine.remote(
                    cells, [int(shares[c]) for c in cells], niter, seed, use_gpu, mppc, *(r[g + 1] for r in routed)
                )
            )
    trained = dict(pair for done in ray.get(tasks) for pair in done)
    return dd.CentroidIndex.of_cells(coarse, trained)


ASSIGN_TASK_ROWS = 65_536  # an assignment call takes consecutive units up to about this many rows


def _assignment_tasks(files: list[UPath], rows: list[int]) -> list[list[tuple[int, UPath]]]:
    """Consecutive units (with their place in the run's order) grouped into calls of about
    `ASSIGN_TASK_ROWS` rows."""
    tasks: list[list[tuple[int, UPath]]] = []
    size = ASSIGN_TASK_ROWS
    for i, (file, count) in enumerate(zip(files, rows, strict=True)):
        if size >= ASSIGN_TASK_ROWS:
            tasks.append([])
            size = 0
        tasks[-1].append((i, file))
        size += count
    return tasks


def _assign_pieces(
    files: list[tuple[int, UPath]], index: dd.CentroidIndex, buckets: int, border: float, border_clusters: int
) -> dict[int, pa.Table]:
    """Rows to the buckets of their clusters, a bucket holding whole coarse cells: a border row is
    also deduplicated in its border clusters (`dd.border_entries`, with its own centroid
    similarity, the keep priority). A row goes once to each bucket it has entries in, its clusters
    there as a list (`_bucket_entries`), so a border cluster in its own cell costs no second copy
    of its vector; `home` is the bucket of its own cluster (where its decision is merged)."""
    # one search for the whole call: at k = 10⁶ a unit file's rows put ~10 rows in each coarse
    # cell, a call's ~65 (FAISS multiplies a cell's rows as one matrix). An empty unit's file is
    # left out: its embedding column's type is not the fixed-size list of the others.
    tables = [read_parquet(file).replace_schema_metadata(None) for _, file in files]
    tables = [table for table in tables if table.num_rows]
    if not tables:
        return {}
    table = pa.concat_tables(tables, promote_options="default")
    labels, sims, extra = dd.assign_clusters(
        embeddings_matrix(table), index, border=border, border_clusters=border_clusters
    )
    home = index.cell_of(labels) % buckets
    rows, clusters, primary = dd.border_entries(np.arange(table.num_rows), labels, extra)
    bucket_of = index.cell_of(clusters) % buckets
    order = np.lexsort((np.arange(len(rows)), rows, bucket_of))  # by bucket, then row, its own cluster first
    rows, clusters, primary, bucket_of = rows[order], clusters[order], primary[order], bucket_of[order]
    cuts = np.flatnonzero(np.diff(bucket_of)) + 1
    pieces: dict[int, pa.Table] = {}
    for lo, hi in zip(np.r_[0, cuts], np.r_[cuts, len(rows)], strict=True):
        starts = np.r_[0, np.flatnonzero(np.diff(rows[lo:hi])) + 1]
        first = lo + starts
        pieces[int(bucket_of[lo])] = (
            table.take(pa.array(rows[first]))
            .append_column(
                "clusters",
                pa.ListArray.from_arrays(pa.array(np.r_[starts, hi - lo], pa.int32()), pa.array(clusters[lo:hi])),
            )
            .append_column("centroid_sim", pa.array(sims[rows[first]]))
            .append_column("primary", pa.array(primary[first]))
            .append_column("home", pa.array(home[rows[first]]))
        )
    return pieces


class Shuffler:
    """One per node: the index, built once and searched by every assignment on the node (at
    k = 10⁶ a copy is 2 GB), and one file per bucket (per schema) that all of them append to, so
    the shuffle makes nodes x buckets files, not tasks x buckets. The files are written on this
    node (beside the bucket on local disk, else in its scratch folder) and published whole by
    `finish`, as `<bucket>/<name>-<n>.arrow`; a shuffler that dies publishes nothing the bucket
    tasks read (`dedup_phase` names the finished ones)."""

    def __init__(
        self, index: dd.CentroidIndex, rd: RunDir, buckets: int, border: float, border_clusters: int, name: str
    ):
        import faiss

        faiss.omp_set_num_threads(1)  # each concurrent call is one core's work
        self.index, self.rd, self.buckets, self.name = index, rd, buckets, name
        self.border, self.border_clusters = border, border_clusters
        _ = self.index.search  # built once, here, before calls come
        self.lock = threading.Lock()
        self.files: dict[tuple[int, pa.Schema], tuple[Path, UPath, Any, Any]] = {}
        self.staging = (
            None if is_local(rd.buckets) else Path(tempfile.mkdtemp(prefix=f"denseforge-{name}-", dir=scratch_dir()))
        )

    def assign(self, files: list[tuple[int, UPath]]) -> int:
        """Assigns the rows of `files` and appends them to this node's bucket files; returns rows."""
        pieces = _assign_pieces(files, self.index, self.buckets, self.border, self.border_clusters)
        with self.lock:
            for bucket, table in pieces.items():
                self._writer(bucket, table.schema).write_table(table)
        return sum(table.num_rows for table in pieces.values())

    def _writer(self, bucket: int, schema: pa.Schema) -> Any:
        if (bucket, schema) not in self.files:
            number = sum(b == bucket for b, _ in self.files)  # another schema (an earlier run's files)
            target = self.rd.bucket(bucket) / f"{self.name}-{number}.arrow"
            local = (
                Path(str(target.parent)) / f".{target.name}.tmp"
                if self.staging is None
                else self.staging / f"{bucket:05d}-{target.name}"
            )
            local.parent.mkdir(parents=True, exist_ok=True)
            handle = open(local, "wb")  # noqa: SIM115 - open until `finish`
            self.files[(bucket, schema)] = (local, target, handle, pa.ipc.new_file(handle, schema))
        return self.files[(bucket, schema)][3]

    def finish(self) -> tuple[int, int]:
        """Closes and publishes this node's bucket files; returns their bytes and number."""
        written, files = 0, len(self.files)
        with self.lock:
            for local, target, handle, writer in self.files.values():
                writer.close()
                handle.close()
                written += local.stat().st_size
                publish(local, target)
            self.files.clear()
        if self.staging is not None:
            shutil.rmtree(self.staging, ignore_errors=True)
        return written, files


SHUFFLER_LOSSES = 3  # shufflers lost (their node gone) before the dedup phase gives up


def _shuffle(
    tasks: list[list[tuple[int, UPath]]], index: Any, rd: RunDir, buckets: int, cfg: dd.DedupConfig
) -> tuple[int, int, list[str]]:
    """Every assignment call run on the shufflers, one per node with CPUs, each fed calls as it
    finishes them; a shuffler lost with its node is replaced and all of its calls are made again.
    Returns the bytes and files written and the names of the shufflers whose files count."""
    import ray
    from ray.exceptions import RayActorError
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    actor = ray.remote(Shuffler)
    nodes = [(n["NodeID"], int(n["Resources"].get("CPU", 0))) for n in ray.nodes() if n.get("Alive")]
    nodes = [(node, cpus) for node, cpus in nodes if cpus > 0] or [(None, 1)]
    shufflers: dict[str, Any] = {}
    slots: dict[str, int] = {}
    given: dict[str, list[int]] = {}
    numbers = itertools.count()

    def start(node: str | None, cpus: int) -> None:
        name = f"s{next(numbers):04d}"
        placed = {} if node is None else {"scheduling_strategy": NodeAffinitySchedulingStrategy(node, soft=False)}
        # one CPU reserved (a node busy elsewhere still gets its shuffler), one call per CPU at once
        shufflers[name] = actor.options(num_cpus=1, max_concurrency=cpus, **placed).remote(
            index, rd, buckets, cfg.border, cfg.border_clusters, name
        )
        slots[name], given[name] = cpus, []

    for node, cpus in nodes:
        start(node, cpus)
    queue, lost, written, published = list(range(len(tasks))), 0, 0, 0
    running: dict[Any, tuple[str, int]] = {}
    finished: list[str] = []
    while queue or running or len(finished) < len(shufflers):
        for name in list(shufflers):
            busy = sum(n == name for n, _ in running.values())
            while queue and busy < slots[name] + 1:
                task = queue.pop(0)
                running[shufflers[name].assign.remote(tasks[task])] = (name, task)
                given[name].append(task)
                busy += 1
        if not running:
            done = [(name, shufflers[name].finish.remote()) for name in shufflers if name not in finished]
            for name, ref in done:
                try:
                    size, count = ray.get(ref)
                    written, published = written + size, published + count
                    finished.append(name)
                except RayActorError:
                    lost = _replace(name, shufflers, slots, given, queue, finished, lost, start)
            continue
        (ref,), _ = ray.wait(list(running))
        name, task = running.pop(ref)
        try:
            ray.get(ref)
        except RayActorError:
            lost = _replace(name, shufflers, slots, given, queue, finished, lost, start)
            for other in [r for r, (n, _) in running.items() if n == name]:
                running.pop(other)
    for handle in shufflers.values():
        ray.kill(handle)
    return written, published, finished


def _replace(name, shufflers, slots, given, queue, finished, lost, start) -> int:
    """A shuffler's node is gone: its calls go back in the queue for a new one, placed anywhere."""
    lost += 1
    if lost > SHUFFLER_LOSSES:
        raise RunFailedError(
            f"dedup lost {lost} shufflers (their Ray nodes); check the cluster's nodes, then `denseforge resume`"
        )
    queue[:0] = sorted(given.pop(name))
    cpus = slots.pop(name)
    shufflers.pop(name)
    start(None, cpus)
    return lost


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


def _dedup_bucket(
    bucket_path: UPath,
    shufflers: list[str],
    parts: UPath,
    bucket: int,
    partitions: int,
    cfg: dd.DedupConfig,
    select: dd.SelectConfig,
) -> dict[str, Any]:
    """Every entry of one bucket decided (`dd.dedup_entries`), as columns: a bucket holds hundreds
    of thousands of entries at 10M rows, so no Python object per entry. Only the entries the merge
    reads are written, each to its row's merge partition (`parts/<partition>/<bucket>.parquet`):
    every primary entry, and the border copies that were removed (a kept border copy decides
    nothing), about one per row. Only the files of `shufflers` (those that finished) are read."""
    files = [f for f in list_files(bucket_path, ".arrow") if f.name.rsplit("-", 1)[0] in shufflers]
    table = pa.concat_tables([read_arrow(f) for f in files], promote_options="default") if files else None
    if table is None or not table.num_rows:
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
    home = table.column("home").to_numpy()
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
            "home": pa.array(home[rows]),
            "dup_home": pa.array(
                np.where((dup_of >= 0) & ~earlier[np.maximum(dup_of, 0)], home[np.maximum(dup_of, 0)], -1)
            ),
        }
    ).cast(ENTRY_SCHEMA)
    out = out.filter(pa.array((primary | (reason != dd.KEPT)) & ~earlier[rows]))
    where = partition_of(out.column("home").to_numpy(), partitions)
    for partition in np.unique(where):
        write_table_atomic(
            parts / f"{partition:05d}" / f"{bucket:05d}.parquet", out.filter(pa.array(where == partition))
        )
    return {"entries": len(rows), "sweep_kept": {str(k): v for k, v in result.sweep_kept.items()}}


BUCKETS_PER_PARTITION = 8  # merge partitions: one per this many buckets


def _merge_and_select(rd: RunDir, partitions: int, sel: dd.SelectConfig, in_process: bool = False) -> dict[str, Any]:
    """The partitions merged (`merge_partition`), their dup_of chains followed across partitions
    in rounds until none changes, the selection cut found from counts and applied, and the
    partitions' decisions streamed into one file, partition by partition. Returns the counts by
    reason and of copies of earlier runs' images. Each step is a Ray task per partition, or, with
    `in_process`, a call here (tests)."""
    if in_process:

        def task(fn: Any, returns: int = 1) -> Any:
            return SimpleNamespace(remote=fn)

        def get(refs: Any) -> Any:
            return refs
    else:
        import ray

        def task(fn: Any, returns: int = 1) -> Any:
            return ray.remote(num_returns=returns)(fn)

        def get(refs: Any) -> Any:
            return ray.get(refs)

    merge, ask, answer, apply = (
        task(merge_partition),
        task(chain_requests, partitions),
        task(chain_answers, partitions),
        task(chain_apply),
    )
    merged = [rd.bucket_parts / f"merged-{p:05d}.parquet" for p in range(partitions)]
    get([merge.remote(list_files(rd.bucket_parts / f"{p:05d}", ".parquet"), merged[p]) for p in range(partitions)])
    rounds = 0
    while partitions > 1:
        rounds += 1
        asked = [ask.remote(m, p, partitions) for p, m in enumerate(merged)]
        answers = [answer.remote(m, *(refs[p] for refs in asked)) for p, m in enumerate(merged)]
        if not sum(get([apply.remote(m, *(a[p] for a in answers)) for p, m in enumerate(merged)])):
            break
    counts = get([task(rank_counts).remote(m, sel.per_cluster) for m in merged])
    cut = target_cut(counts, sel.target_total)
    if cut is not None:
        at = np.sort(np.concatenate(get([task(clusters_at).remote(m, cut[0], sel.per_cluster) for m in merged])))
        cut = (cut[0], int(at[cut[1] - 1]))
    finals = [rd.bucket_parts / f"final-{p:05d}.parquet" for p in range(partitions)]
    done = get([task(select_partition).remote(m, f, sel.per_cluster, cut) for m, f in zip(merged, finals, strict=True)])
    with parquet_writer(rd.decisions, FINAL_SCHEMA) as writer:
        for final in finals:
            writer.write_table(read_parquet(final))
    reasons: Counter[str] = Counter()
    for part in done:
        reasons.update(part["reasons"])
    return {"reasons": dict(reasons), "of_earlier": sum(part["of_earlier"] for part in done), "rounds": rounds}


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
    ensure_dir(out)
    sweep: Counter[float] = Counter()
    entries = shuffle_bytes = shuffle_files = partitions = clusters = 0
    decided: dict[str, Any] = {"reasons": {}, "of_earlier": 0}
    scratch = (rd.buckets, rd.bucket_parts, rd.against)
    for path in scratch:  # what an attempt cut short left behind would be read as entries of this one
        remove_tree(path)
    against = rd.read_state().get("against", [])
    earlier, earlier_rows = earlier_files(rd, against, config.storage.options) if n and against else ([], [])
    if earlier:
        progress.note(f"dedup: against {sum(earlier_rows)} kept images of {len(against)} earlier run(s)")
    if n:
        cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
        index = train_index(files, n, k, config.run.seed, cfg, cpus)
        clusters = len(index)
        bar.update(1, clusters=clusters)
        buckets = min(cfg.buckets, index.cell_count)
        ref = ray.put(index)
        del index  # the shufflers and nothing else hold it from here
        shuffle_bytes, shuffle_files, shufflers = _shuffle(
            _assignment_tasks(files + earlier, rows + earlier_rows), ref, rd, buckets, cfg
        )
        del ref
        bar.update(1)
        partitions = max(1, -(-buckets // BUCKETS_PER_PARTITION))
        ensure_dir(rd.bucket_parts)
        task = ray.remote(_dedup_bucket)
        running = {
            task.remote(rd.bucket(b), shufflers, rd.bucket_parts, b, partitions, cfg, sel): b for b in range(buckets)
        }
        while running:
            (done,), _ = ray.wait(list(running))
            result = ray.get(done)
            sweep.update({float(e): v for e, v in result["sweep_kept"].items()})
            entries += result["entries"]
            # its rows are decided: their shuffled copies go while other buckets run (not all at the
            # end, outside the steps), and the disk peak falls
            remove_tree(rd.bucket(running.pop(done)))
        bar.update(1)
        decided = _merge_and_select(rd, partitions, sel)
        bar.update(1)
    else:
        write_table_atomic(rd.decisions, FINAL_SCHEMA.empty_table())
    bar.close()
    summary = {
        "embedded": n,
        "clusters": clusters,
        "entries": entries,
        "shuffle_bytes": shuffle_bytes,
        "shuffle_files": shuffle_files,
        "merge_partitions": partitions,
        "chain_rounds": decided.get("rounds", 0),
        "epsilon": cfg.epsilon,
        "keep": cfg.keep,
        "removed_by_reason": dict(sorted(decided["reasons"].items())),
        "against": {
            "runs": against,
            "kept_images": sum(earlier_rows),
            "removed_as_their_copies": decided["of_earlier"],
        },
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
