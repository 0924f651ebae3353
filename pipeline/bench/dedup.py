"""`denseforge bench dedup`: planted near-duplicates in synthetic embeddings; precision, recall,
time and peak memory of our dedup, against a brute-force baseline at a size it can handle."""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from itertools import pairwise
from typing import TYPE_CHECKING, Any, Literal, cast

import numpy as np

from denseforge.pipeline.bench.memory import TreeMemory

if TYPE_CHECKING:
    from denseforge.pipeline.progress import Progress
    from denseforge.stages.dedup import DedupConfig


@dataclass(frozen=True)
class Corpus:
    """A planted-duplicate embedding corpus. `isotropic`: topic centres drawn independently (the
    worst case for a two-level index: its coarse cells mean nothing). `hierarchical`: topics inside
    broad topics, as real CLIP embeddings are (what two-level indexes rely on). Stated cosines
    (in high dimension): a copy to its original ~0.98, an original to its topic centre ~0.71, a
    hierarchical topic to its broad topic `topic_to_broad`."""

    kind: Literal["isotropic", "hierarchical"] = "isotropic"
    dim: int = 512
    seed: int = 0
    dup_fraction: float = 0.1
    rows_per_topic: int = 200
    topics_per_broad: int = 50
    topic_to_broad: float = 0.8

    def describe(self) -> dict[str, Any]:
        """The corpus's parameters, for the bench's JSON."""
        out: dict[str, Any] = {
            "corpus": self.kind,
            "dim": self.dim,
            "seed": self.seed,
            "dup_fraction": self.dup_fraction,
            "rows_per_topic": self.rows_per_topic,
            "cosine": {"copy_to_original": 0.98, "original_to_topic": 0.71},
        }
        if self.kind == "hierarchical":
            out["topics_per_broad"] = self.topics_per_broad
            out["cosine"]["topic_to_broad"] = self.topic_to_broad
        return out

    def centres(self, rng: np.random.Generator, topics: int) -> np.ndarray:
        """`topics` topic centres of norm ~sqrt(dim)."""
        if self.kind == "isotropic":
            return rng.standard_normal((topics, self.dim), dtype=np.float32)
        broad = rng.standard_normal((max(1, -(-topics // self.topics_per_broad)), self.dim), dtype=np.float32)
        spread = float(np.sqrt(1 / self.topic_to_broad**2 - 1))
        fine = (
            broad[rng.integers(0, len(broad), topics)]
            + rng.standard_normal((topics, self.dim), dtype=np.float32) * spread
        )
        return _unit(fine) * np.float32(np.sqrt(self.dim))


def planted_embeddings(n: int, corpus: Corpus = Corpus(), topics: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """n L2-normalised vectors of `corpus`: originals around its topic centres and planted
    near-copies. Returns (vectors, group id per row)."""
    rng = np.random.default_rng(corpus.seed)
    copies = int(n * corpus.dup_fraction)
    originals = n - copies
    centers = corpus.centres(rng, topics or max(1, n // corpus.rows_per_topic))
    x = np.empty((n, corpus.dim), dtype=np.float32)
    for s in range(0, originals, 65536):
        x[s : min(originals, s + 65536)] = _originals(rng, centers, min(originals, s + 65536) - s)
    group = np.empty(n, dtype=np.int64)
    group[:originals] = np.arange(originals)
    source = rng.integers(0, originals, copies)
    group[originals:] = source
    for s in range(0, copies, 65536):
        e = min(copies, s + 65536)
        x[originals + s : originals + e] = _near_copies(rng, x[source[s:e]])
    perm = rng.permutation(n)
    return x[perm], group[perm]


def _originals(rng: np.random.Generator, centers: np.ndarray, count: int) -> np.ndarray:
    """`count` L2-normalised rows around random topic centres (cosine ~0.71 to their centre)."""
    return _unit(
        centers[rng.integers(0, len(centers), count)] + rng.standard_normal((count, centers.shape[1]), dtype=np.float32)
    )


def _near_copies(rng: np.random.Generator, sources: np.ndarray) -> np.ndarray:
    """A near-copy of each source row (cosine ~0.98)."""
    return _unit(sources + rng.standard_normal(sources.shape, dtype=np.float32) * (0.2 / np.sqrt(sources.shape[1])))


def _score(reason: np.ndarray, dup_of: np.ndarray, group: np.ndarray) -> dict[str, float]:
    removed = np.flatnonzero(reason != "")
    true_pos = int((group[removed] == group[dup_of[removed]]).sum())
    planted = len(group) - len(np.unique(group))
    return {
        "removed": len(removed),
        "planted": planted,
        "precision": round(true_pos / max(len(removed), 1), 4),
        "recall": round(true_pos / max(planted, 1), 4),
    }


def _ours_dedup(
    x: np.ndarray, cfg: DedupConfig, cluster_size: int, seed: int
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """The dedup phase's steps in one process, with `cfg`: k-means on a bounded sample, assignment
    with border rows in two clusters, greedy removal per cluster, merge. `cfg.matmul` decides the
    bfloat16 screening as it does for a bucket task (`use_bf16`, on the clusters' sizes); where it
    picks bfloat16, importing torch is inside dedup_s."""
    from denseforge.stages import dedup as dd

    n = len(x)
    times: dict[str, Any] = {}
    start = time.perf_counter()
    k = dd.clusters_for(n, None, cluster_size)
    rng = np.random.default_rng(seed)
    points = dd.train_points(n, k, cfg)
    sample = x[np.sort(rng.choice(n, size=points, replace=False))]
    index = dd.train_kmeans(
        sample, k, niter=cfg.kmeans_iters, seed=seed, max_points_per_centroid=cfg.max_points_per_centroid
    )
    del sample
    times["kmeans_train_s"] = time.perf_counter() - start
    start = time.perf_counter()
    labels, sims, extra = dd.assign_clusters(x, index, border=cfg.border, border_clusters=cfg.border_clusters)
    times["assign_s"] = time.perf_counter() - start
    start = time.perf_counter()
    bf16 = dd.use_bf16(cfg.matmul, np.bincount(np.concatenate([labels, extra[extra >= 0]])))
    keys = np.char.zfill(np.arange(n).astype(str), 9)
    semantic_only = cfg.model_copy(update={"phash_max_distance": None, "exact": False, "sweep": []})
    rows = dd.Rows.of(keys, x, keys, np.zeros(n, np.int64), sims, np.ones(n))
    result = dd.dedup_all(labels, rows, semantic_only, extra=extra, bf16=bf16)
    times["dedup_s"] = time.perf_counter() - start
    times["matmul"] = "bfloat16" if bf16 else "float32"
    times["clusters"] = k
    times["train_points"] = points
    times["entries_per_row"] = 1 + float((extra >= 0).sum() / n)
    return result.reason, result.dup_of, times


def _naive_dedup(x: np.ndarray, epsilon: float) -> tuple[np.ndarray, np.ndarray]:
    """The baseline: global brute force, the full n x n similarity matrix, greedy in key order."""
    sims = x @ x.T
    n = len(x)
    reason = np.full(n, "", dtype=object)
    dup_of = np.full(n, -1, dtype=np.int64)
    kept = np.zeros(n, dtype=bool)
    for j in range(n):
        column = np.where(kept[:j], sims[:j, j], -np.inf)
        i = int(np.argmax(column)) if j else -1
        if j and column[i] > 1 - epsilon:
            reason[j], dup_of[j] = "semantic_duplicate", i
        else:
            kept[j] = True
    return reason, dup_of


def bench_dedup(
    sizes: tuple[int, ...] = (100_000, 1_000_000),
    corpus: Corpus = Corpus(),
    epsilon: float = 0.05,
    cluster_size: int = 1000,
    baseline_n: int = 20_000,
    pipeline: int = 0,
    assign: int = 0,
    overrides: tuple[str, ...] = (),
    against: int = 0,
) -> dict[str, Any]:
    """Wall time, peak RSS, precision/recall of planted duplicates, and speed-up against the naive
    baseline at the largest n it can do (`baseline_n`), measured in the same run. `pipeline` > 0:
    the run's own dedup phase on that many embeddings on disk instead (`bench_dedup_pipeline`);
    `assign` > 0: assignment of `sizes[0]` rows to that many centroids (`bench_assign`).
    `overrides` (`--set key=value`) change the config of either dedup, e.g. dedup.matmul=float32."""
    if pipeline and against:
        return bench_dedup_against(pipeline, against, corpus, epsilon, overrides=overrides)
    if pipeline:
        return bench_dedup_pipeline(pipeline, corpus, epsilon, overrides=overrides)
    if assign:
        return bench_assign(assign, sizes[0], corpus.dim, seed=corpus.seed)
    from denseforge.pipeline.config import apply_overrides, parse_config

    raw = {"input": {"kind": "table", "path": "unused.parquet"}, "dedup": {"epsilon": epsilon}}
    cfg = parse_config(apply_overrides(raw, list(overrides))).dedup
    results: dict[str, Any] = {
        "benchmark": "dedup",
        **corpus.describe(),
        "epsilon": cfg.epsilon,
        "cluster_size": cluster_size,
        "overrides": list(overrides),
        "faiss_gpu": _faiss_gpu(),
        "sizes": {},
    }
    for n in sizes:
        x, group = planted_embeddings(n, corpus)
        with TreeMemory() as mem:
            start = time.perf_counter()
            reason, dup_of, times = _ours_dedup(x, cfg, cluster_size, corpus.seed)
            wall = time.perf_counter() - start
        results["sizes"][str(n)] = {
            "seconds": round(wall, 2),
            "peak_rss_mib": round(mem.peak / 2**20, 1),
            "input_mib": round(x.nbytes / 2**20, 1),
            **{k: round(v, 3) if isinstance(v, float) else v for k, v in times.items()},
            **_score(reason, dup_of, group),
        }
        del x, group
    if len(sizes) > 1:
        a, b = min(sizes), max(sizes)
        results["scaling"] = {
            "n_ratio": b / a,
            "time_ratio": round(results["sizes"][str(b)]["seconds"] / results["sizes"][str(a)]["seconds"], 2),
        }
    x, group = planted_embeddings(baseline_n, replace(corpus, seed=corpus.seed + 1))
    start = time.perf_counter()
    reason, dup_of = _naive_dedup(x, epsilon)
    naive_s = time.perf_counter() - start
    naive_score = _score(reason, dup_of, group)
    start = time.perf_counter()
    reason, dup_of, _ = _ours_dedup(x, cfg, cluster_size, corpus.seed)
    ours_s = time.perf_counter() - start
    results["baseline"] = {
        "n": baseline_n,
        "method": "numpy global brute force (n x n) + greedy",
        "naive_s": round(naive_s, 2),
        "ours_s": round(ours_s, 2),
        "speedup": round(naive_s / ours_s, 1),
        "naive": naive_score,
        "ours": _score(reason, dup_of, group),
    }
    return results


def _faiss_gpu() -> bool:
    from denseforge.stages.dedup import faiss_gpu_available

    return faiss_gpu_available()


def write_planted_units(rd, n: int, corpus: Corpus, unit_rows: int) -> np.ndarray:
    """n planted embeddings written as the embed pass writes them (one float16 embeddings file per
    unit of `unit_rows`; each unit's near-copies are of its own originals), streaming: memory holds
    one unit, each with its completion marker. Returns the group id of every row (rows are keyed by
    their index)."""
    rng = np.random.default_rng(corpus.seed)
    centers = corpus.centres(rng, max(1, n // corpus.rows_per_topic))
    group = np.empty(n, dtype=np.int64)
    rd.embeddings.mkdir(parents=True, exist_ok=True)
    for unit, start in enumerate(range(0, n, unit_rows)):
        rows = min(unit_rows, n - start)
        originals = rows - int(rows * corpus.dup_fraction)
        x = np.empty((rows, corpus.dim), dtype=np.float32)
        x[:originals] = _originals(rng, centers, originals)
        source = rng.integers(0, originals, rows - originals)
        x[originals:] = _near_copies(rng, x[source])
        group[start : start + originals] = np.arange(start, start + originals)
        group[start + originals : start + rows] = start + source
        _write_unit(rd, unit, start, x)
    return group


def _write_unit(rd, unit: int, start: int, x: np.ndarray) -> None:
    """Rows `x` as unit `unit`'s float16 embeddings file and its marker, keyed by their index from
    `start`; the sha256 column is the key (no exact copies), pHash 0 (no perceptual check)."""
    import pyarrow as pa

    from denseforge.stages.embed import embedding_table, write_embeddings_file
    from denseforge.storage import write_json_atomic

    rows = len(x)
    keys = [f"{i:012d}" for i in range(start, start + rows)]
    extra = {
        "sha256": pa.array(keys),
        "phash": pa.array(np.zeros(rows, dtype=np.int64)),
        "width": pa.array(np.full(rows, 640)),
        "height": pa.array(np.full(rows, 480)),
    }
    write_embeddings_file(rd.embeddings_file(unit), embedding_table(keys, [unit] * rows, x, extra, dtype="float16"))
    write_json_atomic(rd.embed_marker(unit), {"unit": unit, "embedded": rows, "failed": 0, "stages": {}})


def _pipeline_config(cores: int, epsilon: float, overrides: tuple[str, ...]):
    """The config of the dedup phase benches: float16 embeddings, semantic dedup only."""
    from denseforge.pipeline.config import apply_overrides, parse_config

    raw = {
        "input": {"kind": "table", "path": "unused.parquet"},
        "ray": {"num_cpus": cores},
        "embed": {"storage_dtype": "float16"},
        "dedup": {"epsilon": epsilon, "exact": False, "phash_max_distance": None, "sweep": []},
    }
    return parse_config(apply_overrides(raw, list(overrides)))


CROSS_FRACTION = 0.1  # bench dedup --against: the share of the new rows that copy an earlier run's images
UNIT_ROWS = 10_000  # the dedup benches' rows per unit file


def bench_dedup_against(
    n: int, earlier: int, corpus: Corpus = Corpus(), epsilon: float = 0.05, overrides: tuple[str, ...] = ()
) -> dict[str, Any]:
    """`run --against` measured: an earlier run that wrote `earlier` planted originals, and a new
    input of n rows of which `CROSS_FRACTION` are near-copies of the earlier run's images and
    `corpus.dup_fraction` near-copies of its own originals. The run's dedup phase on the new input
    alone, then against the earlier run, one after the other in one Ray session: the time ratio,
    and precision and recall of every planted copy (cross-run copies apart)."""
    import os
    import tempfile
    from pathlib import Path

    import pyarrow as pa
    import pyarrow.parquet as pq
    import ray

    from denseforge.pipeline.dedup_phase import EARLIER
    from denseforge.pipeline.ray_session import start_ray
    from denseforge.pipeline.rundir import RunDir
    from denseforge.storage import write_table_atomic

    cores = os.cpu_count() or 1
    rng = np.random.default_rng(corpus.seed)
    centers = corpus.centres(rng, max(1, (n + earlier) // corpus.rows_per_topic))
    with tempfile.TemporaryDirectory(prefix="denseforge-bench-") as tmp:
        root = Path(tmp)
        config = _pipeline_config(cores, epsilon, overrides)
        old = RunDir(root / "earlier")
        old.create(config)
        old_x = np.empty((earlier, corpus.dim), dtype=np.float32)
        for unit, start in enumerate(range(0, earlier, UNIT_ROWS)):
            old_x[start : start + UNIT_ROWS] = _originals(rng, centers, min(UNIT_ROWS, earlier - start))
            _write_unit(old, unit, start, old_x[start : start + UNIT_ROWS])
        keys = pa.array([f"{i:012d}" for i in range(earlier)])
        write_table_atomic(old.manifest, pa.table({"key": keys}))
        old.update_state(state="complete")
        # the new input: its originals, near-copies of them, near-copies of the earlier run's images
        cross, own = int(n * CROSS_FRACTION), int(n * corpus.dup_fraction)
        originals = n - cross - own
        x = np.empty((n, corpus.dim), dtype=np.float32)
        x[:originals] = _originals(rng, centers, originals)
        source = rng.integers(0, originals, own)
        x[originals : originals + own] = _near_copies(rng, x[source])
        earlier_source = rng.integers(0, earlier, cross)
        x[originals + own :] = _near_copies(rng, old_x[earlier_source])
        group = np.r_[earlier + np.arange(originals), earlier + source, earlier_source]
        perm = rng.permutation(n)
        x, group = x[perm], group[perm]
        del old_x
        results: dict[str, Any] = {}
        start_ray(config.ray, None)
        try:
            for name, against in (("alone", []), ("against", [str(old.root)])):
                rd = RunDir(root / name)
                rd.create(config)
                rd.update_state(against=against)
                for unit, start in enumerate(range(0, n, UNIT_ROWS)):
                    _write_unit(rd, unit, start, x[start : start + UNIT_ROWS])
                summary, wall, mem, _ = _timed_dedup(config, rd, -(-n // UNIT_ROWS))
                table = pq.read_table(rd.decisions, columns=["key", "reason", "dup_of"])
                row = np.asarray(table.column("key").to_pylist(), dtype=np.int64)
                reason = np.empty(n, dtype=object)
                reason[row] = table.column("reason").to_pylist()
                found = np.full(n, -1, dtype=np.int64)  # the group of what each removed row names
                names = table.column("dup_of").to_pylist()
                found[row] = [
                    -1 if d is None else int(d.rsplit(EARLIER, 1)[1]) if EARLIER in d else group[int(d)] for d in names
                ]
                removed = reason != ""
                is_cross = group < earlier
                true = removed & (found == group)
                # the copies: every row of a cross-run group, all but one row of a new original's group
                copies = {"all": is_cross.sum() + (~is_cross).sum() - len(np.unique(group[~is_cross]))}
                copies["cross_run"] = is_cross.sum()
                found_copies = {"all": true.sum(), "cross_run": (true & is_cross).sum()}
                results[name] = {
                    "seconds": round(wall, 2),
                    "peak_rss_mib": round(mem.peak / 2**20, 1),
                    "clusters": summary["clusters"],
                    "removed": int(removed.sum()),
                    "precision": round(true.sum() / max(removed.sum(), 1), 4),
                    **{
                        f"recall_{what}": round(found_copies[what] / max(count, 1), 4) for what, count in copies.items()
                    },
                    "against": summary["against"],
                }
        finally:
            ray.shutdown()
    return {
        "benchmark": "dedup-against",
        "n": n,
        "earlier": earlier,
        "cross_fraction": CROSS_FRACTION,
        **corpus.describe(),
        "epsilon": epsilon,
        "overrides": list(overrides),
        "cores": cores,
        **results,
        "against_over_alone": round(results["against"]["seconds"] / results["alone"]["seconds"], 3),
        "goal": {"against_over_alone": 1.2, "precision": 1.0, "recall_cross_run": 0.99},
        "note": "alone: the new input's dedup phase by itself, where cross-run copies cannot be found "
        "(its recall_all counts them as missed); against: the same input against the earlier run",
    }


def bench_dedup_pipeline(
    n: int,
    corpus: Corpus = Corpus(),
    epsilon: float = 0.05,
    unit_rows: int = UNIT_ROWS,
    buckets: int = 64,
    overrides: tuple[str, ...] = (),
) -> dict[str, Any]:
    """The run's own dedup phase (`run_dedup`: k-means on a sample, assignment and the bucket
    shuffle in Ray tasks, per-bucket dedup tasks, the merge and selection on the driver) on n
    planted embeddings stored as float16 unit files: wall time, peak RSS of the process tree,
    disk used, precision and recall. Out of core by construction: no step holds all vectors.
    `overrides` (`--set key=value`) change its config, e.g. dedup.matmul=float32."""
    import os
    import tempfile
    from pathlib import Path

    import pyarrow.parquet as pq
    import ray

    from denseforge.pipeline.ray_session import start_ray
    from denseforge.pipeline.rundir import RunDir
    from denseforge.stages.dedup import bf16_native

    cores = os.cpu_count() or 1
    with tempfile.TemporaryDirectory(prefix="denseforge-bench-") as tmp:
        root = Path(tmp)
        config = _pipeline_config(cores, epsilon, (f"dedup.buckets={buckets}", *overrides))
        rd = RunDir(root / "run")
        rd.create(config)
        start = time.perf_counter()
        group = write_planted_units(rd, n, corpus, unit_rows)
        generate_s = time.perf_counter() - start
        units = -(-n // unit_rows)
        embeddings_mib = sum(f.stat().st_size for f in rd.embeddings.glob("*.parquet")) / 2**20
        start_ray(config.ray, None)
        try:
            summary, wall, mem, progress = _timed_dedup(config, rd, units)
        finally:
            ray.shutdown()
        table = pq.read_table(rd.decisions, columns=["key", "reason", "dup_of"])
        row = np.asarray(table.column("key").to_pylist(), dtype=np.int64)
        reason = np.empty(n, dtype=object)
        reason[row] = table.column("reason").to_pylist()
        dup_of = np.full(n, -1, dtype=np.int64)
        dup_of[row] = [int(d) if d is not None else -1 for d in table.column("dup_of").to_pylist()]
    marks = [progress.start, *progress.marks]
    names = ("train", "assign_and_shuffle", "bucket_dedup", "merge_and_select")
    return {
        "benchmark": "dedup-pipeline",
        "n": n,
        **corpus.describe(),
        "epsilon": epsilon,
        "overrides": list(overrides),
        "matmul": config.dedup.matmul,
        "cpu_bf16": bf16_native(),
        "cores": cores,
        "storage": "float16 parquet, one file per unit",
        "units": units,
        "unit_rows": unit_rows,
        "buckets": buckets,
        "clusters": summary["clusters"],
        "generate_s": round(generate_s, 1),
        "seconds": round(wall, 1),
        "steps_s": {name: round(b - a, 1) for name, (a, b) in zip(names, pairwise(marks), strict=True)},
        "peak_rss_mib": round(mem.peak / 2**20, 1),
        "peak_pss_mib": round(mem.peak_pss / 2**20, 1),
        "step_peak_rss_mib": {
            name: round(mem.peak_between(a, b) / 2**20, 1) for name, (a, b) in zip(names, pairwise(marks), strict=True)
        },
        "embeddings_mib": round(embeddings_mib, 1),
        "shuffle_mib": round(summary["shuffle_bytes"] / 2**20, 1),
        "shuffle_files": summary["shuffle_files"],
        "merge_partitions": summary["merge_partitions"],
        "chain_rounds": summary["chain_rounds"],
        "index_mib": round(summary["clusters"] * corpus.dim * 4 / 2**20, 1),
        "entries_per_row": round(summary["entries"] / n, 3),
        **_score(reason, dup_of, group),
    }


def _timed_dedup(config, rd, units: int) -> tuple[dict[str, Any], float, TreeMemory, _StepTimes]:
    """The run's dedup phase on `rd` (Ray started): its summary, seconds, memory and step times."""
    from denseforge.pipeline.dedup_phase import run_dedup

    progress = _StepTimes()
    with TreeMemory() as mem:
        progress.start = time.perf_counter()
        summary = run_dedup(config, rd, units, cast("Progress", progress))  # the same calls, timed
        wall = time.perf_counter() - progress.start
    return summary, wall, mem, progress


class _StepTimes:
    """Stands in for the run's progress display and notes when each dedup step ends."""

    def __init__(self):
        self.start = 0.0
        self.marks: list[float] = []

    def phase(self, name: str, total: int, done: int = 0, unit: str = "it") -> _StepTimes:
        return self

    def update(self, n: int = 1, **postfix: Any) -> None:
        self.marks.append(time.perf_counter())

    def close(self) -> None:
        pass

    def note(self, message: str) -> None:
        pass


def bench_assign(
    k: int, rows: int = 100_000, dim: int = 512, baseline_rows: int = 1_000, seed: int = 0
) -> dict[str, Any]:
    """Assignment alone against a two-level index of k centroids (sqrt(k) coarse cells), the
    index a run of ~1,000 x k embeddings trains: one node's share of a cluster-scale run, timed on
    `rows` rows drawn around the centroids (similarity ~0.25 to their nearest, about the planted
    corpus's, so border rows occur as there). Baseline in the same run: FAISS's exact flat search
    over all k on `baseline_rows` rows (speed-up and how often both pick the same centroid)."""
    import faiss

    from denseforge.stages import dedup as dd

    rng = np.random.default_rng(seed)
    cells = int(np.ceil(np.sqrt(k)))
    per = -(-k // cells)
    coarse = _unit(rng.standard_normal((cells, dim), dtype=np.float32))
    spread = dim**-0.5  # a Python float keeps the arrays float32 (a numpy float64 would widen them)
    fine = np.concatenate(
        [_unit(coarse[c] + rng.standard_normal((per, dim), dtype=np.float32) * spread) for c in range(cells)]
    )
    index = dd.CentroidIndex(fine, coarse, [np.arange(c * per, (c + 1) * per) for c in range(cells)])
    x = _unit(
        fine[rng.integers(0, len(fine), rows)] + rng.standard_normal((rows, dim), dtype=np.float32) * (4 * spread)
    )
    cfg = dd.DedupConfig()
    with TreeMemory() as mem:
        start = time.perf_counter()
        labels, sims, extra = dd.assign_clusters(
            x, index, batch=10_000, border=cfg.border, border_clusters=cfg.border_clusters
        )
        seconds = time.perf_counter() - start
    flat = faiss.IndexFlatIP(dim)
    flat.add(fine)
    start = time.perf_counter()
    _, exact = flat.search(x[:baseline_rows], 1)
    flat_s = time.perf_counter() - start
    per_row, flat_per_row = seconds / rows, flat_s / baseline_rows
    return {
        "benchmark": "dedup-assign",
        "clusters": len(fine),
        "coarse_cells": cells,
        "rows": rows,
        "dim": dim,
        "seconds": round(seconds, 2),
        "rows_per_s": round(rows / seconds),
        "entries_per_row": round(1 + float((extra >= 0).sum()) / rows, 3),
        "median_centroid_sim": round(float(np.median(sims)), 3),
        "peak_rss_mib": round(mem.peak / 2**20, 1),
        "index_mib": round(fine.nbytes / 2**20, 1),
        "baseline": {
            "method": "FAISS flat exact search over all centroids",
            "rows": baseline_rows,
            "seconds": round(flat_s, 2),
            "speedup": round(flat_per_row / per_row, 1),
            "same_nearest": round(float((exact[:, 0] == labels[:baseline_rows]).mean()), 4),
        },
    }


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)
