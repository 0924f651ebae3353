"""Prefilters and cluster-balanced selection after dedup."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from denseforge.stages.dedup.config import BAD_ASPECT, KEPT, TOO_SMALL


def prefilter(width: np.ndarray, height: np.ndarray, min_short_edge: int, max_aspect_ratio: float | None) -> np.ndarray:
    """Removal reason per row for the size/shape prefilters ("" = passes)."""
    reason = np.full(len(width), KEPT, dtype=object)
    short, long = np.minimum(width, height), np.maximum(width, height)
    if max_aspect_ratio is not None:
        reason[long > max_aspect_ratio * np.maximum(short, 1)] = BAD_ASPECT
    reason[short < min_short_edge] = TOO_SMALL
    return reason


def select_balanced(
    cluster: np.ndarray,
    rank: np.ndarray,
    keys: Sequence[str] | np.ndarray | None,
    per_cluster: int | None,
    target_total: int | None,
) -> np.ndarray:
    """Which kept rows survive selection: top `per_cluster` per cluster by rank, then, to reach
    `target_total`, round-robin over clusters (everyone's best first, then second best, …) with
    ties broken by key. `keys` may be anything that sorts as the keys do (their ranks), and is
    only read when `target_total` is set."""
    chosen = np.ones(len(rank), dtype=bool)
    if per_cluster is not None:
        chosen &= rank < per_cluster
    if target_total is not None and chosen.sum() > target_total:
        idx = np.flatnonzero(chosen)
        order = np.lexsort((np.asarray(keys)[idx], cluster[idx], rank[idx]))
        keep = np.zeros(len(rank), dtype=bool)
        keep[idx[order[:target_total]]] = True
        chosen = keep
    return chosen
