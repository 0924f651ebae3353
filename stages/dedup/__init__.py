"""dedup/select: exact, perceptual and semantic (SemDeDup) duplicates, then balanced selection.

The recipe (DenseFusion-1M): keep short edge >= 448 px, spherical k-means of CLIP features into
many clusters, remove near-duplicates inside each cluster at threshold epsilon (an item is a
duplicate when its cosine similarity to an item already kept exceeds 1 - epsilon), then keep the
top n per cluster. Everything here is numpy/FAISS over arrays; the pipeline decides where it runs.
`DecisionStage` applies the finished decisions to each unit's samples.

Inside a cluster, items are visited in keep-priority order (`KeepPolicy`); exact copies (same
sha256), then perceptual near-copies (pHash Hamming distance), then semantic duplicates are
removed greedily against the items kept so far, in bounded-memory blocks. Identical and
re-encoded images embed almost identically, so they share a cluster and the per-cluster pass
finds them.

The package: `config` (settings, reasons), `clusters` (k-means, assignment), `semantic`
(SemDeDup), `perceptual` (pHash), `decide` (per-cluster decisions and their merge), `select`
(prefilters, balanced selection), `stage` (`DecisionStage`)."""

from __future__ import annotations

from denseforge.stages.dedup.clusters import (
    MIN_POINTS_PER_CENTROID,
    TWO_LEVEL_ABOVE,
    CentroidIndex,
    assign_clusters,
    clusters_for,
    faiss_gpu_available,
    fine_shares,
    flat_kmeans,
    train_cell,
    train_kmeans,
    train_points,
)
from denseforge.stages.dedup.config import (
    BAD_ASPECT,
    EXACT,
    KEPT,
    NEAR,
    NOT_SELECTED,
    SEMANTIC,
    TOO_SMALL,
    DedupConfig,
    KeepPolicy,
    SelectConfig,
)
from denseforge.stages.dedup.decide import (
    ClusterResult,
    DedupResult,
    Rows,
    border_entries,
    dedup_all,
    dedup_cluster,
    dedup_entries,
    follow_to_kept,
    merge_entries,
    priority_order,
)
from denseforge.stages.dedup.perceptual import hue_histogram, phash_vectors, witnessed
from denseforge.stages.dedup.select import prefilter, select_balanced
from denseforge.stages.dedup.semantic import (
    BF16_MARGIN,
    BF16_MIN_WORK,
    BF16_SHAPE,
    bf16_native,
    confirmed_duplicates,
    greedy_duplicates,
    use_bf16,
)
from denseforge.stages.dedup.stage import DecisionStage

__all__ = [
    "TWO_LEVEL_ABOVE",
    "fine_shares",
    "flat_kmeans",
    "train_cell",
    "Rows",
    "BAD_ASPECT",
    "BF16_MARGIN",
    "BF16_MIN_WORK",
    "BF16_SHAPE",
    "CentroidIndex",
    "ClusterResult",
    "DecisionStage",
    "DedupConfig",
    "DedupResult",
    "EXACT",
    "KEPT",
    "KeepPolicy",
    "MIN_POINTS_PER_CENTROID",
    "NEAR",
    "NOT_SELECTED",
    "SEMANTIC",
    "SelectConfig",
    "TOO_SMALL",
    "assign_clusters",
    "bf16_native",
    "border_entries",
    "clusters_for",
    "confirmed_duplicates",
    "dedup_all",
    "dedup_cluster",
    "dedup_entries",
    "faiss_gpu_available",
    "follow_to_kept",
    "greedy_duplicates",
    "hue_histogram",
    "merge_entries",
    "phash_vectors",
    "prefilter",
    "priority_order",
    "select_balanced",
    "train_kmeans",
    "train_points",
    "use_bf16",
    "witnessed",
]
