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


def _assignment_tasks(files: list[UPath], rows: list[int]) -> list[list[UPath]]:
    """Consecutive units grouped into calls of about `ASSIGN_TASK_ROWS` rows."""
    tasks: list[list[UPath]] = []
    size = ASSIGN_TASK_ROWS
    for file, count in zip(files, rows, strict=True):
        if size >= ASSIGN_TASK_ROWS:
            tasks.append([])
            size = 0
        tasks[-1].append(file)
        size += count
    return tasks


def _assign_pieces(
    files: list[UPath], index: dd.CentroidIndex, buckets: int, border: float, border_clusters: int
) -> dict[int, pa.Table]:
    """Rows to the buckets of their clusters, a bucket holding whole coarse cells: a border row is
    also deduplicated in its border clusters (`dd.border_entries`, with its own centroid
    similarity, the keep priority). A row goes once to each bucket it has entries in, its clusters
    there as a list (`_bucket_entries`), so a border cluster in its own cell costs no second copy
    of its vector; `home` is the bucket of its own cluster (where its decision is merged)."""
    # one search for the whole call: at k = 10⁶ a unit file's rows put ~10 rows in each coarse
    # cell, a call's ~65 (FAISS multiplies a cell's rows as one matrix). An empty unit's file is
    # left out: its embedding column's type is not the fixed-size list of the others.
    tables = [read_parquet(file).replace_schema_metadata(None) for file in files]
    tables = [table for table in tables if table.num_rows]
    if not tables:
        return {}
    table = pa.concat_tables(tables, promote_options="default").combine_chunks()  # `take` on chunks is slow
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


def _assign_task(
    files: list[UPath], index: dd.CentroidIndex, buckets: int, border: float, border_clusters: int
) -> tuple:
    """An assignment call as a Ray task: the node it ran on (whose writer takes its rows) and its
    rows by bucket. The index comes from the node's object store, searched where it lies."""
    import ray

    return ray.get_runtime_context().get_node_id(), _assign_pieces(files, index, buckets, border, border_clusters)


class NodeWriter:
    """One per node: appends the rows of every assignment task that ran on the node to the node's
    one file of each bucket (per schema), so the shuffle makes nodes x buckets files, not
    tasks x buckets. The files are written on this node (beside the bucket on local disk, else in
    its scratch folder) and published whole by `finish`, as `<bucket>/<name>-<n>.arrow`; a writer
    that dies publishes nothing the bucket tasks read (`_Shuffle` names the finished ones)."""

    def __init__(self, rd: RunDir, name: str):
        self.rd, self.name = rd, name
        self.files: dict[tuple[int, pa.Schema], tuple[Path, UPath, Any, Any]] = {}
        self.staging = (
            None if is_local(rd.buckets) else Path(tempfile.mkdtemp(prefix=f"denseforge-{name}-", dir=scratch_dir()))
        )

    def append(self, pieces: dict[int, pa.Table]) -> int:
        """Appends one task's rows to this node's bucket files; returns how many."""
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
        for local, target, handle, writer in self.files.values():
            writer.close()
            handle.close()
            written += local.stat().st_size
            publish(local, target)
        self.files.clear()
        if self.staging is not None:
            shutil.rmtree(self.staging, ignore_errors=True)
        return written, files


WRITER_LOSSES = 3  # node writers lost (their node gone) before the dedup phase gives up


class _Shuffle:
    """The driver's side of the shuffle: assignment tasks (retried by Ray where a node is lost)
    hand their rows to the writer of the node they ran on; a writer lost with its node is
    replaced, and every task whose rows it held runs again. The writers start when it is made
    (before the index is trained: their start-up is not the shuffle's), the tasks in `run`."""

    def __init__(self, rd: RunDir):
        import ray

        self.rd = rd
        remote: Any = ray.remote  # a task of two returns, which Ray's annotations do not follow
        self.assign = remote(num_returns=2)(_assign_task)
        self.actor = remote(num_cpus=0)(NodeWriter)
        self.numbers = itertools.count()
        self.writers: dict[str, tuple[str | None, Any]] = {}  # name -> (node, handle)
        self.held: dict[str, list[int]] = {}  # writer -> the tasks whose rows it holds
        self.lost = self.written = self.files = 0
        self.finished: list[str] = []  # writers whose files are published: they take no more rows
        nodes = [n["NodeID"] for n in ray.nodes() if n.get("Alive") and n["Resources"].get("CPU", 0) > 0]
        for node in nodes or [None]:
            self._start(node)
        self.limit = 2 * max(1, int(ray.cluster_resources().get("CPU", 1)))

    def _start(self, node: str | None) -> None:
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        name = f"w{next(self.numbers):04d}"
        placed = {} if node is None else {"scheduling_strategy": NodeAffinitySchedulingStrategy(node, soft=True)}
        self.writers[name] = (node, self.actor.options(**placed).remote(self.rd, name))
        self.held[name] = []

    def _writer_for(self, node: str) -> str:
        """The open writer on `node`, or (none there now) the first open one."""
        open_ = sorted(name for name in self.writers if name not in self.finished)
        on_node = [name for name in open_ if self.writers[name][0] == node]
        return on_node[0] if on_node else open_[0]

    def _replace(self, name: str, queue: list[int]) -> None:
        """A writer's node is gone: the tasks whose rows it held go back in the queue."""
        self.lost += 1
        if self.lost > WRITER_LOSSES:
            raise RunFailedError(
                f"dedup lost {self.lost} shuffle writers (their Ray nodes); check the cluster's nodes, then "
                "`denseforge resume`"
            )
        queue[:0] = sorted(self.held.pop(name))
        self.writers.pop(name)
        self._start(None)

    def run(
        self, tasks: list[list[UPath]], index: Any, buckets: int, cfg: dd.DedupConfig
    ) -> tuple[int, int, list[str]]:
        """Every task's rows written; returns the bytes and files written and the names of the
        writers whose files count."""
        import ray
        from ray.exceptions import RayActorError

        args = (index, buckets, cfg.border, cfg.border_clusters)
        queue = list(range(len(tasks)))
        placing: dict[Any, tuple[int, Any]] = {}  # a task's node ref -> (task, its rows' ref)
        appending: dict[Any, tuple[str, int]] = {}  # a writer's ack -> (writer, task)
        while True:
            # tasks never wait for a busy writer; its backlog (rows in the object store) is bounded too
            while queue and len(placing) < self.limit and len(appending) < self.limit:
                task = queue.pop(0)
                node_ref, rows_ref = self.assign.remote(tasks[task], *args)
                placing[node_ref] = (task, rows_ref)
            if not placing and not appending:
                self._finish(queue)
                if not queue:
                    break
                continue
            (ready,), _ = ray.wait(list(placing) + list(appending))
            if ready in placing:
                task, rows_ref = placing.pop(ready)
                name = self._writer_for(ray.get(ready))
                appending[self.writers[name][1].append.remote(rows_ref)] = (name, task)
                self.held[name].append(task)
                continue
            name, task = appending.pop(ready)
            try:
                ray.get(ready)
            except RayActorError:
                if name in self.writers:
                    self._replace(name, queue)
        for _, handle in self.writers.values():
            ray.kill(handle)
        return self.written, self.files, self.finished

    def _finish(self, queue: list[int]) -> None:
        """Every open writer publishes its files; the tasks of one lost meanwhile go back in the
        queue, for its replacement."""
        import ray
        from ray.exceptions import RayActorError

        closing = [
            (name, handle.finish.remote()) for name, (_, handle) in self.writers.items() if name not in self.finished
        ]
        for name, ref in closing:
            try:
                size, count = ray.get(ref)
                self.written, self.files = self.written + size, self.files + count
                self.finished.append(name)
            except RayActorError:
                self._replace(name, queue)


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
    writers: list[str],
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
    nothing), about one per row. Only the files of `writers` (those that finished) are read."""
    files = [f for f in list_files(bucket_path, ".arrow") if f.name.rsplit("-", 1)[0] in writers]
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


PARTITION_ROWS = 4_000_000  # a merge partition holds about this many rows' decisions (~0.5 GB)


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
        shuffle = _Shuffle(rd)
        index = train_index(files, n, k, config.run.seed, cfg, cpus)
        clusters = len(index)
        bar.update(1, clusters=clusters)
        buckets = min(cfg.buckets, index.cell_count)
        ref = ray.put(index)
        del index  # the assignment tasks read it from their node's object store
        tasks = _assignment_tasks(files + earlier, rows + earlier_rows)
        shuffle_bytes, shuffle_files, writers = shuffle.run(tasks, ref, buckets, cfg)
        del ref
        bar.update(1)
        partitions = min(buckets, max(1, -(-(n + sum(earlier_rows)) // PARTITION_ROWS)))
        ensure_dir(rd.bucket_parts)
        task = ray.remote(_dedup_bucket)
        running = {
            task.remote(rd.bucket(b), writers, rd.bucket_parts, b, partitions, cfg, sel): b for b in range(buckets)
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
