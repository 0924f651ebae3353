"""`denseforge bench dedup`: planted near-duplicates in synthetic embeddings; precision, recall,
time and peak memory of our dedup, against a brute-force baseline at a size it can handle."""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from denseforge.pipeline.bench.memory import TreeMemory

def planted_embeddings(n: int, dim: int = 512, dup_fraction: float = 0.1, topics: int | None = None,
                       seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """n L2-normalised vectors: topic-structured originals (intra-topic cosine ~0.5) and planted
    near-copies (cosine ~0.98 to their original). Returns (vectors, group id per row)."""
    rng = np.random.default_rng(seed)
    copies = int(n * dup_fraction)
    originals = n - copies
    topics = topics or max(1, n // 200)
    centers = rng.standard_normal((topics, dim), dtype=np.float32)
    x = np.empty((n, dim), dtype=np.float32)
    for s in range(0, originals, 65536):
        e = min(originals, s + 65536)
        x[s:e] = centers[rng.integers(0, topics, e - s)] + rng.standard_normal((e - s, dim), dtype=np.float32)
    x[:originals] /= np.linalg.norm(x[:originals], axis=1, keepdims=True)
    group = np.empty(n, dtype=np.int64)
    group[:originals] = np.arange(originals)
    source = rng.integers(0, originals, copies)
    group[originals:] = source
    for s in range(0, copies, 65536):
        e = min(copies, s + 65536)
        noisy = x[source[s:e]] + rng.standard_normal((e - s, dim), dtype=np.float32) * (0.2 / np.sqrt(dim))
        x[originals + s:originals + e] = noisy / np.linalg.norm(noisy, axis=1, keepdims=True)
    perm = rng.permutation(n)
    return x[perm], group[perm]


def _score(reason: np.ndarray, dup_of: np.ndarray, group: np.ndarray) -> dict[str, float]:
    removed = np.flatnonzero(reason != "")
    true_pos = int((group[removed] == group[dup_of[removed]]).sum())
    planted = len(group) - len(np.unique(group))
    return {"removed": len(removed), "planted": planted,
            "precision": round(true_pos / max(len(removed), 1), 4), "recall": round(true_pos / max(planted, 1), 4)}


def _ours_dedup(x: np.ndarray, epsilon: float, cluster_size: int, seed: int) -> tuple[np.ndarray, np.ndarray, dict[str, float]]:
    """The dedup phase's steps in one process, with `DedupConfig`'s defaults: k-means on a bounded
    sample, assignment with border rows in two clusters, greedy removal per cluster, merge."""
    from denseforge.stages import dedup as dd

    cfg = dd.DedupConfig()
    n = len(x)
    times: dict[str, float] = {}
    start = time.perf_counter()
    k = dd.clusters_for(n, None, cluster_size)
    rng = np.random.default_rng(seed)
    points = dd.train_points(n, k, cfg)
    sample = x[np.sort(rng.choice(n, size=points, replace=False))]
    centroids = dd.train_kmeans(sample, k, niter=cfg.kmeans_iters, seed=seed,
                                max_points_per_centroid=cfg.max_points_per_centroid)
    del sample
    times["kmeans_train_s"] = time.perf_counter() - start
    start = time.perf_counter()
    labels, sims, second = dd.assign_clusters(x, centroids, border=cfg.border)
    times["assign_s"] = time.perf_counter() - start
    start = time.perf_counter()
    keys = np.char.zfill(np.arange(n).astype(str), 9)
    result = dd.dedup_all(labels, x, keys, keys, np.zeros(n, np.int64), sims, np.ones(n), second=second,
                          epsilon=epsilon, phash_max_distance=None, exact=False, policy=cfg.keep)
    times["dedup_s"] = time.perf_counter() - start
    times["clusters"] = k
    times["train_points"] = points
    times["border_share"] = float((second >= 0).mean())
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


def bench_dedup(sizes: tuple[int, ...] = (100_000, 1_000_000), dim: int = 512, epsilon: float = 0.05,
                cluster_size: int = 1000, baseline_n: int = 20_000, seed: int = 0) -> dict[str, Any]:
    """Wall time, peak RSS, precision/recall of planted duplicates, and speed-up against the naive
    baseline at the largest n it can do (`baseline_n`), measured in the same run."""
    results: dict[str, Any] = {"benchmark": "dedup", "dim": dim, "epsilon": epsilon, "cluster_size": cluster_size,
                               "faiss_gpu": _faiss_gpu(), "sizes": {}}
    for n in sizes:
        x, group = planted_embeddings(n, dim, seed=seed)
        with TreeMemory() as mem:
            start = time.perf_counter()
            reason, dup_of, times = _ours_dedup(x, epsilon, cluster_size, seed)
            wall = time.perf_counter() - start
        results["sizes"][str(n)] = {"seconds": round(wall, 2), "peak_rss_mib": round(mem.peak / 2**20, 1),
                                    "input_mib": round(x.nbytes / 2**20, 1),
                                    **{k: round(v, 3) for k, v in times.items()}, **_score(reason, dup_of, group)}
        del x, group
    if len(sizes) > 1:
        a, b = min(sizes), max(sizes)
        results["scaling"] = {"n_ratio": b / a, "time_ratio": round(results["sizes"][str(b)]["seconds"]
                                                                    / results["sizes"][str(a)]["seconds"], 2)}
    x, group = planted_embeddings(baseline_n, dim, seed=seed + 1)
    start = time.perf_counter()
    reason, dup_of = _naive_dedup(x, epsilon)
    naive_s = time.perf_counter() - start
    naive_score = _score(reason, dup_of, group)
    start = time.perf_counter()
    reason, dup_of, _ = _ours_dedup(x, epsilon, cluster_size, seed)
    ours_s = time.perf_counter() - start
    results["baseline"] = {"n": baseline_n, "method": "numpy global brute force (n x n) + greedy",
                           "naive_s": round(naive_s, 2), "ours_s": round(ours_s, 2),
                           "speedup": round(naive_s / ours_s, 1), "naive": naive_score,
                           "ours": _score(reason, dup_of, group)}
    return results


def _faiss_gpu() -> bool:
    from denseforge.stages.dedup import faiss_gpu_available

    return faiss_gpu_available()
