"""Every row's decision: per cluster (exact copies, perceptual, semantic), merged over the
clusters a border row is in, `dup_of` followed to the row that stays."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from denseforge.stages.dedup.clusters import _groups
from denseforge.stages.dedup.config import EXACT, KEPT, NEAR, SEMANTIC, DedupConfig, KeepPolicy
from denseforge.stages.dedup.perceptual import phash_vectors, witnessed
from denseforge.stages.dedup.semantic import confirmed_duplicates, greedy_duplicates


@dataclass
class ClusterResult:
    """Per-row outcome for one cluster, in the caller's row order."""

    reason: np.ndarray  # object array: "" for kept, else a removal reason
    dup_of: np.ndarray  # int64 row index into the cluster, -1 if kept
    rank: np.ndarray  # keep-priority rank inside the cluster (0 = best)
    sweep_kept: dict[float, int] = field(default_factory=dict)


def priority_order(
    keys: Sequence[str] | np.ndarray, centroid_sim: np.ndarray, area: np.ndarray, policy: KeepPolicy
) -> np.ndarray:
    """Row order in which items claim to be kept; ties broken by key for determinism."""
    keys_arr = np.asarray(keys)
    if policy == "nearest_centroid":
        return np.lexsort((keys_arr, -centroid_sim))
    if policy == "farthest_centroid":
        return np.lexsort((keys_arr, centroid_sim))
    if policy == "largest_image":
        return np.lexsort((keys_arr, -area))
    return np.argsort(keys_arr, kind="stable")


@dataclass(frozen=True)
class Rows:
    """The columns dedup decides rows by, one entry per row: key, embedding (float32, or float16 as
    stored: converted cluster by cluster), sha256, 64-bit pHash, cosine to its centroid (the keep
    priority), image area, and optionally the witness fingerprint (see `witnessed`) and which rows
    are kept images of earlier runs (`run --against`: they claim first, and are never decided)."""

    keys: np.ndarray
    vectors: np.ndarray
    sha256: np.ndarray
    phash: np.ndarray
    centroid_sim: np.ndarray
    area: np.ndarray
    fingerprint: np.ndarray | None = None
    earlier: np.ndarray | None = None

    @classmethod
    def of(
        cls,
        keys: Sequence[str] | np.ndarray,
        vectors: np.ndarray,
        sha256: Sequence[str] | np.ndarray,
        phash: Sequence[int] | np.ndarray,
        centroid_sim: Sequence[float] | np.ndarray,
        area: Sequence[float] | np.ndarray,
        fingerprint: np.ndarray | None = None,
        earlier: np.ndarray | None = None,
    ) -> Rows:
        return cls(
            np.asarray(keys),
            vectors,
            np.asarray(sha256),
            np.asarray(phash),
            np.asarray(centroid_sim),
            np.asarray(area),
            fingerprint,
            earlier,
        )

    def __len__(self) -> int:
        return len(self.keys)

    def take(self, idx: np.ndarray) -> Rows:
        """The rows at `idx`, their vectors as float32."""
        return Rows(
            self.keys[idx],
            self.vectors[idx].astype(np.float32, copy=False),
            self.sha256[idx],
            self.phash[idx],
            self.centroid_sim[idx],
            self.area[idx],
            None if self.fingerprint is None else self.fingerprint[idx],
            None if self.earlier is None else self.earlier[idx],
        )


def dedup_cluster(
    rows: Rows, cfg: DedupConfig, *, counted: np.ndarray | None = None, bf16: bool = False
) -> ClusterResult:
    """Exact, perceptual and semantic duplicates inside one cluster (see the package doc), by the
    rules of `cfg` (epsilon and its sweep, phash_max_distance with its witnesses, exact, keep,
    block_size). A pHash match alone is not evidence of a copy (two signs with different words on
    the same background hash 4 bits apart): with a `fingerprint` column, a second witness must
    confirm it. The sweep counts the kept rows among `counted` (default all: border copies from a
    neighbouring cluster are not). `bf16`: see `greedy_duplicates` (epsilon is its first
    threshold, decided on float32 similarities)."""
    n = len(rows)
    order = priority_order(rows.keys, rows.centroid_sim, rows.area, cfg.keep)
    if rows.earlier is not None:  # an earlier run's image claims first: a new row is its copy, never the reverse
        order = order[np.argsort(~rows.earlier[order], kind="stable")]
    counted = np.ones(n, dtype=bool) if counted is None else counted[order]
    reason = np.full(n, KEPT, dtype=object)
    dup = np.full(n, -1, dtype=np.int64)  # in priority positions
    active = np.ones(n, dtype=bool)
    if cfg.exact:
        first: dict[str, int] = {}
        for pos, row in enumerate(order):
            holder = first.setdefault(rows.sha256[row], pos)
            if holder != pos:
                reason[pos], dup[pos], active[pos] = EXACT, holder, False
    if cfg.phash_max_distance is not None:
        t = 1.0 - 2.0 * (cfg.phash_max_distance + 0.5) / 64.0
        confirm = None
        if rows.fingerprint is not None:
            prints = rows.fingerprint[order]

            def confirm(i: int, j: int) -> bool:
                return witnessed(prints[i], prints[j], cfg.witness_max_fine_distance, cfg.witness_max_colour_difference)

        near = confirmed_duplicates(phash_vectors(rows.phash[order]), t, active, confirm, cfg.block_size)
        hit = near >= 0
        reason[hit], dup[hit], active[hit] = NEAR, near[hit], False
    sweep_kept: dict[float, int] = {}
    eps_list = ([cfg.epsilon] if cfg.epsilon is not None else []) + [e for e in cfg.sweep if e != cfg.epsilon]
    if eps_list:
        sem = greedy_duplicates(rows.vectors[order], [1.0 - e for e in eps_list], cfg.block_size, active, bf16)
        for e, d in zip(eps_list, sem, strict=True):
            sweep_kept[e] = int((active & (d < 0) & counted).sum())
        if cfg.epsilon is not None:
            hit = sem[0] >= 0
            reason[hit], dup[hit] = SEMANTIC, sem[0][hit]
    else:
        sweep_kept = {}
    follow_to_kept(dup)
    out_reason = np.empty(n, dtype=object)
    out_dup = np.full(n, -1, dtype=np.int64)
    rank = np.empty(n, dtype=np.int64)
    out_reason[order] = reason
    out_dup[order] = np.where(dup >= 0, order[np.maximum(dup, 0)], -1)
    kept_positions = np.flatnonzero((reason == KEPT) & counted)  # a border copy ranks in its own cluster
    rank[order] = n  # removed items rank last
    rank[order[kept_positions]] = np.arange(len(kept_positions))
    return ClusterResult(out_reason, out_dup, rank, sweep_kept)


@dataclass
class DedupResult:
    """Per-row (or per-entry) outcome: reason ("" kept), dup_of row index (-1), rank in cluster."""

    reason: np.ndarray
    dup_of: np.ndarray
    rank: np.ndarray
    sweep_kept: dict[float, int]


def border_entries(
    rows: np.ndarray, labels: np.ndarray, extra: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(row, cluster, primary) per entry: every row in its own cluster, then each border row again
    in each of its border clusters (`extra` >= 0, see `assign_clusters`)."""
    more = [(rows[extra[rows, j] >= 0], j) for j in range(extra.shape[1])]
    return (
        np.concatenate([rows] + [r for r, _ in more]),
        np.concatenate([labels[rows]] + [extra[r, j] for r, j in more]),
        np.arange(len(rows) + sum(len(r) for r, _ in more)) < len(rows),
    )


def dedup_entries(
    entries: np.ndarray, labels: np.ndarray, primary: np.ndarray, rows: Rows, cfg: DedupConfig, bf16: bool = False
) -> DedupResult:
    """`dedup_cluster` over every cluster. Entry `e` puts row `entries[e]` of `rows` in cluster
    `labels[e]`; a border row has more, non-`primary` entries in its neighbouring clusters. Results
    are per entry, dup_of as row indices; `merge_entries` turns them into one decision per row. The
    keep priority uses each row's own (primary) centroid similarity in both clusters, so it is one
    order over all rows and a dup_of always points to a row of higher priority."""
    reason = np.full(len(entries), KEPT, dtype=object)
    dup_of = np.full(len(entries), -1, dtype=np.int64)
    rank = np.full(len(entries), -1, dtype=np.int64)
    sweep: dict[float, int] = {}
    for group in _groups(labels):
        idx = entries[group]
        res = dedup_cluster(rows.take(idx), cfg, counted=primary[group], bf16=bf16)
        reason[group], rank[group] = res.reason, res.rank
        dup_of[group] = np.where(res.dup_of >= 0, idx[np.maximum(res.dup_of, 0)], -1)
        for e, kept in res.sweep_kept.items():
            sweep[e] = sweep.get(e, 0) + kept
    return DedupResult(reason, dup_of, rank, sweep)


def follow_to_kept(dup_of: np.ndarray) -> None:
    """Point every duplicate (dup_of >= 0) at the end of its chain, the row that stays, in place.
    dup_of points to higher priority, so chains end; each pass halves every chain left."""
    while True:
        hop = (dup_of >= 0) & (dup_of[np.maximum(dup_of, 0)] >= 0)
        if not hop.any():
            return
        dup_of[hop] = dup_of[dup_of[hop]]


def merge_entries(rows: np.ndarray, primary: np.ndarray, entries: DedupResult, n: int) -> DedupResult:
    """One decision per row from its entries: removed where any entry removed it (the primary
    entry's reason first; among border copies removed in several clusters, the lowest dup_of row,
    so the decision does not depend on the order entries come in), ranked by its primary entry;
    then every dup_of is followed to the row that finally stays (a border row kept in one cluster
    may have been removed in the other)."""
    reason = np.full(n, KEPT, dtype=object)
    dup_of = np.full(n, -1, dtype=np.int64)
    rank = np.full(n, -1, dtype=np.int64)
    for part in (~primary, primary):  # primary entries written last: their removal wins
        removed = np.flatnonzero(part & (entries.reason != KEPT))
        codes = np.unique(entries.reason[removed], return_inverse=True)[1]
        removed = removed[np.lexsort((codes, entries.dup_of[removed], rows[removed]))]
        removed = removed[np.r_[True, np.diff(rows[removed]) != 0]] if removed.size else removed
        reason[rows[removed]], dup_of[rows[removed]] = entries.reason[removed], entries.dup_of[removed]
    rank[rows[primary]] = entries.rank[primary]
    follow_to_kept(dup_of)
    return DedupResult(reason, dup_of, rank, entries.sweep_kept)


def dedup_all(
    labels: np.ndarray,
    rows: Rows,
    cfg: DedupConfig,
    *,
    candidates: np.ndarray | None = None,
    extra: np.ndarray | None = None,
    bf16: bool = False,
) -> DedupResult:
    """Every row's decision: its nearest cluster, and for border rows (`extra` >= 0, see
    `assign_clusters`) its border clusters too. Rows outside `candidates` are left alone (reason ""
    and rank -1): the caller has already removed them (prefilters)."""
    n = len(labels)
    chosen = np.arange(n) if candidates is None else np.flatnonzero(candidates)
    extra = np.full((n, 0), -1, dtype=np.int64) if extra is None else extra
    entries, entry_labels, primary = border_entries(chosen, labels, extra)
    return merge_entries(entries, primary, dedup_entries(entries, entry_labels, primary, rows, cfg, bf16), n)
