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
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import Field, model_validator
from upath import UPath

from denseforge.plugin import Settings
from denseforge.stages.stage import Flow, Item, Rejection, Removal, Stage, StageRun, Verdict

KeepPolicy = Literal["nearest_centroid", "farthest_centroid", "largest_image", "first_key"]


class DedupConfig(Settings):
    """Exact, perceptual and semantic (SemDeDup) duplicates; needs embed.enabled."""

    enabled: bool = True
    exact: bool = True
    phash_max_distance: int | None = Field(
        12,
        ge=0,
        le=32,
        description="Hamming distance of the 64-bit pHashes (imagededup's default is 10); every "
        "match also needs the second witness below; null disables",
    )
    witness_max_fine_distance: int | None = Field(
        64, ge=0, le=256, description="a pHash match also needs the 256-bit pHashes this close; null: no witness"
    )
    witness_max_colour_difference: float | None = Field(
        0.6,
        ge=0,
        le=2,
        description="...and, when both have colour, their hue histograms this close (L1); null: no check",
    )
    epsilon: float | None = Field(0.05, gt=0, lt=2, description="duplicate when cosine > 1 - epsilon; null disables")
    sweep: list[float] = Field(default_factory=lambda: [0.01, 0.02, 0.05, 0.1, 0.2, 0.4])
    clusters: int | None = Field(None, ge=1, description="k for k-means; null derives it from N")
    target_cluster_size: int = Field(1000, ge=1)
    kmeans_iters: int = Field(
        10,
        ge=1,
        description="k-means iterations; border rows make up for the rougher centroids of few "
        "iterations (docs/benchmarks.md: bench dedup)",
    )
    max_points_per_centroid: int = Field(
        256, ge=1, description="k-means trains on at most k x this many points (FAISS default)"
    )
    max_train_points: int = Field(
        65536,
        ge=1,
        description="...and on at most this many: training costs points x k, "
        "so a fixed sample keeps it linear in N (border rows recover the recall)",
    )
    border: float = Field(
        0.05,
        ge=0,
        le=2,
        description="a row is also deduplicated in the clusters whose centroid is "
        "within this cosine of its nearest (see border_clusters); 0: nearest only. Exact and pHash "
        "copies are only compared inside a cluster too: at 0.02 the demo lost a pHash copy whose "
        "random-weight embedding sat 0.02-0.05 across a boundary",
    )
    border_clusters: int = Field(
        2,
        ge=0,
        le=8,
        description="at most this many such clusters per row (and as many "
        "coarse cells above 4,096 clusters): more finds more near-copies that straddle a border, "
        "at the cost of more entries per row (docs/benchmarks.md: bench dedup)",
    )
    keep: KeepPolicy = "nearest_centroid"
    block_size: int = Field(2048, ge=16)
    matmul: Literal["auto", "bfloat16", "float32"] = Field(
        "auto",
        description="bfloat16: similarities first in bfloat16 (torch), every row near 1 - epsilon "
        "recomputed in float32, so decisions are float32's; the sweep's other values are then counted on "
        "bfloat16 similarities (within ~0.012); auto: bfloat16 where the CPU has bfloat16 instructions and a "
        "task's clusters are large enough to pay for importing torch (see use_bf16)",
    )
    buckets: int = Field(16, ge=1, description="parallel dedup tasks (clusters are hashed into buckets)")
    num_gpus: float = Field(0.0, ge=0, description="GPUs for k-means training (faiss-gpu)")

    @model_validator(mode="after")
    def _sweep_in_range(self) -> DedupConfig:
        if any(not 0 < e < 2 for e in self.sweep):
            raise ValueError("dedup.sweep values must lie in (0, 2)")
        return self


class SelectConfig(Settings):
    """Prefilters and cluster-balanced selection (after dedup)."""

    min_short_edge: int = Field(0, ge=0, description="px, on the original image (DenseFusion: 448)")
    max_aspect_ratio: float | None = Field(None, ge=1)
    per_cluster: int | None = Field(None, ge=1, description="top n per cluster (DenseFusion: 20)")
    target_total: int | None = Field(None, ge=1, description="cluster-balanced down to this many")


KEPT = ""
EXACT, NEAR, SEMANTIC = "exact_duplicate", "near_duplicate", "semantic_duplicate"
TOO_SMALL, BAD_ASPECT, NOT_SELECTED = "too_small", "bad_aspect_ratio", "not_selected"


# -- clustering ------------------------------------------------------------------------------


def faiss_gpu_available() -> bool:
    """True when this process has faiss-gpu and a visible GPU (decided where the work runs)."""
    import faiss

    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def clusters_for(n: int, k: int | None, target_cluster_size: int) -> int:
    """k from config, or derived from n; never more clusters than points."""
    if n <= 0:
        return 0
    return max(1, min(n, k if k else round(n / target_cluster_size)))


MIN_POINTS_PER_CENTROID = (
    39  # FAISS's own floor: it warns below it, and such centroids are little more than sample points
)


def train_points(n: int, k: int, cfg: DedupConfig) -> int:
    """How many of n embeddings k-means trains k centroids on: k x `max_points_per_centroid`, at
    most `max_train_points`, but never fewer than 39 per centroid (k = 50,000 on the 65,536-point
    cap would make every centroid from one or two points)."""
    floor = k * min(MIN_POINTS_PER_CENTROID, cfg.max_points_per_centroid)
    return min(n, max(floor, min(k * cfg.max_points_per_centroid, cfg.max_train_points)))


def _flat_kmeans(sample: np.ndarray, k: int, niter: int, seed: int, use_gpu: bool, mppc: int) -> np.ndarray:
    import faiss

    km = faiss.Kmeans(
        sample.shape[1],
        k,
        niter=niter,
        seed=seed,
        spherical=True,
        gpu=use_gpu,
        max_points_per_centroid=mppc,
        verbose=False,
    )
    km.train(np.ascontiguousarray(sample, dtype=np.float32))
    if km.centroids is None:
        raise RuntimeError("faiss.Kmeans trained no centroids")
    return km.centroids.copy()


def train_kmeans(
    sample: np.ndarray,
    k: int,
    niter: int = 20,
    seed: int = 0,
    use_gpu: bool | None = None,
    max_points_per_centroid: int = 256,
    two_level_above: int = 4096,
) -> CentroidIndex:
    """Spherical k-means centroids (k, d), trained with FAISS on a sample of the embeddings.

    Above `two_level_above` clusters, training is hierarchical: sqrt(k) coarse centroids, then each
    coarse cell is split in proportion to its share of the sample. Cost grows as k^1.5 instead of
    k², which is what keeps 50,000 clusters trainable; the index keeps both levels, and assignment
    follows the same hierarchy (`assign_clusters`).
    """
    if use_gpu is None:
        use_gpu = faiss_gpu_available()
    k = min(k, len(sample))
    if k <= two_level_above:
        return CentroidIndex(_flat_kmeans(sample, k, niter, seed, bool(use_gpu), max_points_per_centroid))
    k1 = int(np.ceil(np.sqrt(k)))
    coarse = _flat_kmeans(sample, k1, niter, seed, bool(use_gpu), max_points_per_centroid)
    labels = assign_clusters(sample, coarse)[0]
    counts = np.bincount(labels, minlength=k1)
    share = np.maximum(1, np.floor(k * counts / counts.sum()).astype(int))
    share = np.minimum(share, np.maximum(counts, 1))
    fine, cells, filled, start = [], [], [], 0
    for c in range(k1):
        members = sample[labels == c]
        if len(members) == 0:
            continue
        fine.append(
            members
            if share[c] >= len(members)
            else _flat_kmeans(members, int(share[c]), niter, seed + c, bool(use_gpu), max_points_per_centroid)
        )
        cells.append(np.arange(start, start + len(fine[-1])))
        filled.append(c)
        start += len(fine[-1])
    centroids = np.concatenate(fine).astype(np.float32)
    centroids /= np.linalg.norm(centroids, axis=1, keepdims=True)
    return CentroidIndex(centroids, np.ascontiguousarray(coarse[filled]), cells)


@dataclass
class CentroidIndex:
    """The trained centroids (k, d); for a hierarchy, also its coarse centroids and, per coarse
    cell, the ids of the centroids trained inside it."""

    centroids: np.ndarray
    coarse: np.ndarray | None = None
    cells: list[np.ndarray] = field(default_factory=list)
    _search: Any = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # FAISS reads the vectors' bytes as float32: float64 centroids would be silently misread
        self.centroids = np.ascontiguousarray(self.centroids, dtype=np.float32)
        if self.coarse is not None:
            self.coarse = np.ascontiguousarray(self.coarse, dtype=np.float32)

    def __getstate__(self) -> dict[str, Any]:
        # FAISS indexes do not pickle: a Ray task that receives the index builds its own search
        return {**self.__dict__, "_search": None}

    @property
    def search(self) -> Any:
        """What `assign_clusters` searches (a FAISS flat index, or `_CellSearch` for a hierarchy),
        built on first use and kept: an assignment task calls it once per unit file, and at
        k = 10⁶ each build copies 2 GB."""
        if self._search is None:
            if self.coarse is None:
                import faiss

                self._search = faiss.IndexFlatIP(self.centroids.shape[1])
                self._search.add(self.centroids)
            else:
                self._search = _CellSearch(self)
        return self._search

    def __len__(self) -> int:
        return len(self.centroids)

    @property
    def cell_count(self) -> int:
        """Coarse cells; without a hierarchy every cluster is its own cell."""
        return len(self) if self.coarse is None else len(self.coarse)

    def cell_of(self, clusters: np.ndarray) -> np.ndarray:
        """The coarse cell of each of `clusters`."""
        if self.coarse is None:
            return clusters
        cell = np.empty(len(self), dtype=np.int64)
        for c, members in enumerate(self.cells):
            cell[members] = c
        return cell[clusters]


def _groups(values: np.ndarray) -> list[np.ndarray]:
    """The indices of each distinct value, in value order, each group in index order."""
    order = np.argsort(values, kind="stable")
    return np.split(order, np.flatnonzero(np.diff(values[order])) + 1) if len(order) else []


class _CellSearch:
    """Exact search inside given coarse cells: one FAISS flat index per cell, searched with all
    the rows that ask for that cell at once, so FAISS multiplies them as one matrix. (An IVF's
    `search_preassigned` scans cell by cell for each row without BLAS: at 10M rows it was half of
    an assignment task.) Together they hold k vectors."""

    def __init__(self, index: CentroidIndex):
        import faiss

        d = index.centroids.shape[1]
        if index.coarse is None:
            raise ValueError("a two-level index needs the coarse centroids of a hierarchy")
        self.coarse = faiss.IndexFlatIP(d)
        self.coarse.add(index.coarse)
        self.ids = index.cells
        self.flats = []
        for members in index.cells:
            flat = faiss.IndexFlatIP(d)
            flat.add(np.ascontiguousarray(index.centroids[members]))
            self.flats.append(flat)

    def search(self, x: np.ndarray, cells: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Each row's k nearest centroids inside its cell (`cells[i]`): similarities and global
        ids, -1 where the cell has fewer than k."""
        val = np.empty((len(x), k), dtype=np.float32)
        idx = np.empty((len(x), k), dtype=np.int64)
        for rows in _groups(cells):
            cell = int(cells[rows[0]])
            val[rows], local = self.flats[cell].search(np.ascontiguousarray(x[rows]), k)
            idx[rows] = np.where(local >= 0, self.ids[cell][np.maximum(local, 0)], -1)
        return val, idx


def assign_clusters(
    x: np.ndarray, index: np.ndarray | CentroidIndex, batch: int = 65536, border: float = 0.0, border_clusters: int = 2
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every row's cluster, its similarity to that centroid, and its border clusters ((n, m), -1
    padded; (n, 2m) for a hierarchy): up to m = `border_clusters` more centroids within `border`
    (cosine) of the nearest, where the row is deduplicated too, so that near-duplicates on either
    side of a boundary meet.

    A hierarchy is searched as it was trained: the nearest centroid inside the nearest coarse
    cell; border clusters are the next centroids of that cell within `border`, and the nearest
    centroid of each further coarse cell within `border` of the nearest cell. (Searching the union
    of a few cells instead gives two near-copies different answers whenever they probe different
    cells, and loses them.)"""
    index = index if isinstance(index, CentroidIndex) else CentroidIndex(index)
    m = border_clusters if border > 0 else 0
    labels = np.empty(len(x), dtype=np.int64)
    sims = np.empty(len(x), dtype=np.float32)
    extra = np.full((len(x), m if index.coarse is None else 2 * m), -1, dtype=np.int64)
    search = index.search
    for s in range(0, len(x), batch):
        xb = np.ascontiguousarray(x[s : s + batch], dtype=np.float32)
        if index.coarse is None:
            val, idx = search.search(xb, m + 1)  # fewer centroids than asked for: id -1
        else:
            cell_val, cell_idx = search.coarse.search(xb, m + 1)
            val, idx = search.search(xb, cell_idx[:, 0], m + 1)
            for r in range(1, m + 1):
                near = np.flatnonzero((cell_idx[:, r] >= 0) & (cell_val[:, 0] - cell_val[:, r] <= border))
                if near.size:
                    extra[s + near, m + r - 1] = search.search(xb[near], cell_idx[near, r], 1)[1][:, 0]
        labels[s : s + batch], sims[s : s + batch] = idx[:, 0], val[:, 0]
        extra[s : s + batch, :m] = np.where((idx[:, 1:] >= 0) & (val[:, :1] - val[:, 1:] <= border), idx[:, 1:], -1)
    return labels, sims, extra


# -- greedy removal inside one cluster -------------------------------------------------------


# Above the bfloat16 error of a dot product, relative to the vectors' norms: two input roundings
# and the output's (3 x 2^-8), and float32 accumulation over 512 dims (~2 x 3e-5).
BF16_MARGIN = 2.0**-6


def bf16_native() -> bool:
    """True where this process's CPU has bfloat16 dot-product instructions (decided where the work
    runs): there torch's bfloat16 matmul is several times faster than numpy's float32 one."""
    import torch

    return bool(
        getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)()
        or getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)()
    )


# Σ n² over a task's clusters that pays torch's import (~1 s, and ~1.2 GB RSS per worker: at 3M rows,
# Σ n² ≈ 1e8 per task, bfloat16 saved 2 s of 28 and cost 2.4 GB; at 10M, 3e9, it halves the step)
BF16_MIN_WORK = 3e8


def use_bf16(matmul: Literal["auto", "bfloat16", "float32"], cluster_sizes: np.ndarray) -> bool:
    """Whether a dedup task screens in bfloat16 (`DedupConfig.matmul`): auto does where the CPU
    has bfloat16 instructions and its clusters are big enough to pay for importing torch."""
    if matmul != "auto":
        return matmul == "bfloat16"
    return float(np.square(cluster_sizes, dtype=np.float64).sum()) >= BF16_MIN_WORK and bf16_native()


# bfloat16 products are computed on row and column counts rounded up to a multiple of this (zero
# rows pad the end): on other shapes oneDNN's matmul is several times slower, and a cluster's last
# step has a shape of its own
BF16_SHAPE = 128


def _bf16_products(vectors: np.ndarray) -> Callable[[int, int, int, int], np.ndarray]:
    """products(s, e, c, ce) = vectors[s:e] @ vectors[c:ce].T computed in bfloat16 (torch)."""
    import torch

    x = torch.zeros((len(vectors) + BF16_SHAPE, vectors.shape[1]), dtype=torch.bfloat16)
    x[: len(vectors)] = torch.from_numpy(np.ascontiguousarray(vectors, dtype=np.float32))

    def products(s: int, e: int, c: int, ce: int) -> np.ndarray:
        rows, cols = -(-(e - s) // BF16_SHAPE) * BF16_SHAPE, -(-(ce - c) // BF16_SHAPE) * BF16_SHAPE
        return (x[s : s + rows] @ x[c : c + cols].T)[: e - s, : ce - c].float().numpy()

    return products


def greedy_duplicates(
    vectors: np.ndarray,
    thresholds: Sequence[float],
    block: int = 2048,
    active: np.ndarray | None = None,
    bf16: bool = False,
) -> list[np.ndarray]:
    """For each threshold t: dup_of[i] = index of an earlier kept row with similarity > t, or -1.

    Rows are in priority order: row i is kept unless an earlier *kept* row is more similar than t.
    `active` rows (default all) take part; inactive rows are neither kept nor compared. Rows are
    decided `block // 4` at a time against every earlier row, in column blocks of `block`, so the
    products cover little more than the triangle each row needs; a threshold costs a pass only
    over the rows that have an earlier row above it. Memory is O(block²) whatever the number of rows.

    `bf16`: products are computed in bfloat16 first, and only the rows that have a product within
    BF16_MARGIN of thresholds[0] are recomputed in float32, so thresholds[0] is decided on float32
    similarities as without it; the other thresholds are decided on the bfloat16 ones (estimates,
    e.g. for a sweep). Float32 products of one pair differ by ~1e-7 between matrix shapes, so a pair
    that close to the threshold may fall either way, as it already may between block sizes.
    """
    active = np.ones(len(vectors), dtype=bool) if active is None else active
    if not (bf16 and len(vectors) and thresholds):
        return _greedy(vectors, thresholds, block, active, 0.0, None)
    margin = BF16_MARGIN * float(np.einsum("ij,ij->i", vectors, vectors).max())
    # numpy's BLAS threads spin between its calls and starve torch's: one BLAS thread while torch
    # computes the products
    with _blas_threads().limit(limits=1, user_api="blas"):
        return _greedy(vectors, thresholds, block, active, margin, _bf16_products(vectors))


@functools.cache
def _blas_threads():
    """This process's BLAS thread pools (threadpoolctl), found once: looking them up takes ~1 ms,
    more than a small cluster's products; limiting them then takes ~10 µs."""
    from threadpoolctl import ThreadpoolController

    return ThreadpoolController()


def _greedy(
    vectors: np.ndarray,
    thresholds: Sequence[float],
    block: int,
    active: np.ndarray,
    margin: float,
    products: Callable[[int, int, int, int], np.ndarray] | None,
) -> list[np.ndarray]:
    """`greedy_duplicates`' blocked loop; `products` (bfloat16, or None: float32) screens within
    `margin` of thresholds[0], and only the pairs screened in are recomputed in float32."""
    n = len(vectors)
    dups = [np.full(n, -1, dtype=np.int64) for _ in thresholds]
    kept = [active.copy() for _ in thresholds]
    step = max(1, block // 4)
    upper = _upper_triangle(step)
    for s in range(0, n, step):
        e = min(n, s + step)
        q = vectors[s:e]
        best = [np.full(e - s, -np.inf, dtype=np.float32) for _ in thresholds]
        arg = [np.full(e - s, -1, dtype=np.int64) for _ in thresholds]
        for c in range(0, s, block):  # earlier rows are decided: the most similar kept one above t
            ce = min(s, c + block)
            sims = q @ vectors[c:ce].T if products is None else products(s, e, c, ce)
            row_max = sims.max(axis=1)
            for ti, t in enumerate(thresholds):
                recheck = ti == 0 and products is not None
                screen = t - margin if recheck else t
                rows = np.flatnonzero(row_max > screen)
                if not rows.size:
                    continue
                r, col = _pairs(sims[rows] > screen)
                r, col = rows[r], c + col
                sim = np.einsum("ij,ij->i", q[r], vectors[col]) if recheck else sims[r, col - c]
                take = (sim > t) & kept[ti][col]
                _keep_best(best[ti], arg[ti], r[take], col[take], sim[take])
        estimate = q @ q.T if products is None else products(s, e, s, e)
        later = upper[: e - s, : e - s]
        for ti, t in enumerate(thresholds):
            inner = estimate
            if ti == 0 and products is not None:  # the in-step pairs near t, in float32
                i, j = _pairs((estimate > t - margin) & later)
                inner = estimate.copy()
                inner[i, j] = np.einsum("ij,ij->i", q[i], q[j])
            above = (inner > t) & later
            local_kept = active[s:e].copy()
            local = above.any(axis=0)
            # a row with no earlier row of this step above t is decided by the earlier steps alone
            alone = local_kept & ~local & (best[ti] > t)
            local_kept[alone] = False
            dups[ti][s:e][alone] = arg[ti][alone]
            _decide_in_step(
                np.flatnonzero(local_kept & local), above, inner, local_kept, best[ti], arg[ti], t, s, dups[ti][s:e]
            )
            kept[ti][s:e] = local_kept
    return dups


def _decide_in_step(
    pending: np.ndarray,
    above: np.ndarray,
    inner: np.ndarray,
    kept: np.ndarray,
    best: np.ndarray,
    arg: np.ndarray,
    t: float,
    offset: int,
    dup: np.ndarray,
) -> None:
    """Decide the `pending` rows of one step, those with an earlier row of the step above t, in
    place. A row whose earlier rows above t are all decided takes the most similar kept one (the
    lowest on a tie) unless the earlier steps' `best` is at least as similar; each round decides all
    such rows at once, so there are as many rounds as links in the longest chain of rows above t
    (not one Python iteration per row)."""
    if not pending.size:  # most steps: no row of the step is above t with an earlier one
        return
    sources = np.flatnonzero(above.any(axis=1))  # the rows above t with a later row
    while pending.size:
        waiting = above[np.ix_(pending, pending)].any(axis=0)
        ready = pending[~waiting]
        pairs = np.ix_(sources, ready)
        near = np.where(above[pairs] & kept[sources, None], inner[pairs], -np.inf)
        pick = near.argmax(axis=0)
        sim = near[pick, np.arange(len(ready))]
        local = sim > best[ready]
        removed = np.where(local, sim, best[ready]) > t
        kept[ready[removed]] = False
        dup[ready[removed]] = np.where(local, offset + sources[pick], arg[ready])[removed]
        pending = pending[waiting]


@functools.cache
def _upper_triangle(size: int) -> np.ndarray:
    """The (size, size) mask of pairs (i, j) with i < j; read-only, made once per size."""
    mask = np.triu(np.ones((size, size), dtype=bool), k=1)
    mask.flags.writeable = False
    return mask


def _pairs(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The (row, col) indices of a 2-D mask's True entries, as np.nonzero gives them, much faster
    where they are few."""
    return np.divmod(np.flatnonzero(mask), mask.shape[1])


def _keep_best(best: np.ndarray, arg: np.ndarray, rows: np.ndarray, cols: np.ndarray, sims: np.ndarray) -> None:
    """For each row among the (row, col, sim) pairs: its most similar col (the lowest on a tie)
    replaces best/arg where more similar, in place."""
    if not rows.size:
        return
    order = np.lexsort((cols, -sims, rows))
    first = order[np.r_[True, rows[order][1:] != rows[order][:-1]]]
    better = first[sims[first] > best[rows[first]]]
    best[rows[better]], arg[rows[better]] = sims[better], cols[better]


def confirmed_duplicates(
    vectors: np.ndarray,
    threshold: float,
    active: np.ndarray,
    confirm: Callable[[int, int], bool] | None = None,
    block: int = 2048,
) -> np.ndarray:
    """dup_of[i] = the most similar earlier kept row with similarity > threshold that `confirm(i, j)`
    accepts (any, without `confirm`), or -1 (i is kept). Every kept candidate in the radius is tried
    in order of similarity, so a rejected look-alike (another sign on the same background) does not
    hide the real original behind it. Only kept rows are candidates, so a thousand copies of one
    image cost one comparison each. Rows in priority order; O(block²) memory."""
    n = len(vectors)
    dup = np.full(n, -1, dtype=np.int64)
    kept = active.copy()
    for s in range(0, n, block):
        e = min(n, s + block)
        q = vectors[s:e]
        earlier: list[list[tuple[float, int]]] = [[] for _ in range(e - s)]
        for c in range(0, s, block):  # earlier blocks are decided: their kept rows are final
            ce = min(s, c + block)
            columns = c + np.flatnonzero(kept[c:ce])
            if columns.size:
                sims = q @ vectors[columns].T
                for r, col in zip(*_pairs(sims > threshold), strict=True):
                    earlier[r].append((-float(sims[r, col]), int(columns[col])))
        inner = q @ q.T
        for r in range(e - s):
            i = s + r
            if not kept[i]:
                continue
            local = np.flatnonzero((inner[r, :r] > threshold) & kept[s:i])
            for _, j in sorted(earlier[r] + [(-float(inner[r, k]), s + int(k)) for k in local]):
                if confirm is None or confirm(i, j):
                    dup[i], kept[i] = j, False
                    break
    return dup


def phash_vectors(phashes: np.ndarray) -> np.ndarray:
    """64-bit hashes as ±1/8 vectors: dot product = 1 - 2·hamming/64."""
    bits = (phashes.astype(np.int64).view(np.uint64)[:, None] >> np.arange(64, dtype=np.uint64)) & np.uint64(1)
    return (bits.astype(np.float32) * 2 - 1) / 8.0


@dataclass
class ClusterResult:
    """Per-row outcome for one cluster, in the caller's row order."""

    reason: np.ndarray  # object array: "" for kept, else a removal reason
    dup_of: np.ndarray  # int64 row index into the cluster, -1 if kept
    rank: np.ndarray  # keep-priority rank inside the cluster (0 = best)
    sweep_kept: dict[float, int] = field(default_factory=dict)


def priority_order(keys: Sequence[str], centroid_sim: np.ndarray, area: np.ndarray, policy: KeepPolicy) -> np.ndarray:
    """Row order in which items claim to be kept; ties broken by key for determinism."""
    keys_arr = np.asarray(keys)
    if policy == "nearest_centroid":
        return np.lexsort((keys_arr, -centroid_sim))
    if policy == "farthest_centroid":
        return np.lexsort((keys_arr, centroid_sim))
    if policy == "largest_image":
        return np.lexsort((keys_arr, -area))
    return np.argsort(keys_arr, kind="stable")


def hue_histogram(thumb: np.ndarray, bins: int = 12) -> np.ndarray | None:
    """Saturation-weighted hue histogram of an (n, 3) uint8 thumbnail, normalised to sum 1; None
    when the thumbnail has (almost) no colour."""
    rgb = thumb.astype(np.float32) / 255.0
    top, low = rgb.max(1), rgb.min(1)
    chroma = top - low
    weight = np.where(top > 0.1, chroma, 0.0)
    if weight.sum() < 0.05 * len(rgb):  # grey: no hue to compare
        return None
    r, g, b = rgb.T
    safe = np.maximum(chroma, 1e-6)
    hue = np.select([top == r, top == g], [((g - b) / safe) % 6, (b - r) / safe + 2], (r - g) / safe + 4) / 6
    # soft, circular binning: a hue splits between its two nearest bin centres, and red (hue ~0 and
    # ~1) is one colour; hard bins flipped pure red and pure blue between bins on JPEG noise
    pos = hue * bins - 0.5
    low = np.floor(pos)
    frac = pos - low
    low = low.astype(int) % bins
    hist = np.bincount(low, weights=weight * (1 - frac), minlength=bins) + np.bincount(
        (low + 1) % bins, weights=weight * frac, minlength=bins
    )
    return hist / hist.sum()


def witnessed(a: np.ndarray, b: np.ndarray, max_fine: int | None, max_colour: float | None) -> bool:
    """Does the second witness confirm a pHash match? Two fingerprints (see embed.fingerprint):
    the 256-bit pHashes within `max_fine` bits and, when both images have colour, their hue
    histograms within `max_colour` (L1, 0-2): a greyscale, faded or re-saturated copy keeps its
    hues; a red and a blue version of one logo do not."""
    if max_fine is not None and int(np.unpackbits(a[:32] ^ b[:32]).sum()) > max_fine:
        return False
    if max_colour is None:
        return True
    ha, hb = (hue_histogram(x[32:].reshape(-1, 3)) for x in (a, b))
    return ha is None or hb is None or float(np.abs(ha - hb).sum()) <= max_colour


def dedup_cluster(
    keys: Sequence[str],
    vectors: np.ndarray,
    sha256: Sequence[str],
    phash: np.ndarray,
    centroid_sim: np.ndarray,
    area: np.ndarray,
    *,
    epsilon: float | None,
    phash_max_distance: int | None,
    exact: bool = True,
    policy: KeepPolicy = "nearest_centroid",
    sweep: Sequence[float] = (),
    block: int = 2048,
    fingerprint: np.ndarray | None = None,
    witness_max_fine_distance: int | None = 64,
    witness_max_colour_difference: float | None = 0.6,
    counted: np.ndarray | None = None,
    bf16: bool = False,
) -> ClusterResult:
    """Exact, perceptual and semantic duplicates inside one cluster (see module doc). A pHash
    match alone is not evidence of a copy (two signs with different words on the same background
    hash 4 bits apart): with `fingerprint` rows, a second witness must confirm it. The sweep counts
    the kept rows among `counted` (default all: border copies from a neighbouring cluster are not).
    `bf16`: see `greedy_duplicates` (epsilon is its first threshold, decided on float32 similarities)."""
    n = len(keys)
    order = priority_order(keys, centroid_sim, area, policy)
    counted = np.ones(n, dtype=bool) if counted is None else counted[order]
    reason = np.full(n, KEPT, dtype=object)
    dup = np.full(n, -1, dtype=np.int64)  # in priority positions
    active = np.ones(n, dtype=bool)
    if exact:
        first: dict[str, int] = {}
        for pos, row in enumerate(order):
            holder = first.setdefault(sha256[row], pos)
            if holder != pos:
                reason[pos], dup[pos], active[pos] = EXACT, holder, False
    if phash_max_distance is not None:
        t = 1.0 - 2.0 * (phash_max_distance + 0.5) / 64.0
        confirm = None
        if fingerprint is not None:
            prints = fingerprint[order]

            def confirm(i: int, j: int) -> bool:
                return witnessed(prints[i], prints[j], witness_max_fine_distance, witness_max_colour_difference)

        near = confirmed_duplicates(phash_vectors(phash[order]), t, active, confirm, block)
        hit = near >= 0
        reason[hit], dup[hit], active[hit] = NEAR, near[hit], False
    sweep_kept: dict[float, int] = {}
    eps_list = ([epsilon] if epsilon is not None else []) + [e for e in sweep if e != epsilon]
    if eps_list:
        sem = greedy_duplicates(vectors[order], [1.0 - e for e in eps_list], block, active, bf16)
        for e, d in zip(eps_list, sem, strict=True):
            sweep_kept[e] = int((active & (d < 0) & counted).sum())
        if epsilon is not None:
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
    rows: np.ndarray,
    labels: np.ndarray,
    primary: np.ndarray,
    vectors: np.ndarray,
    keys: Sequence[str] | np.ndarray,
    sha256: Sequence[str] | np.ndarray,
    phash: np.ndarray,
    centroid_sim: np.ndarray,
    area: np.ndarray,
    fingerprint: np.ndarray | None = None,
    **options,
) -> DedupResult:
    """`dedup_cluster` over every cluster. An entry puts row `rows[e]` in cluster `labels[e]`; a
    border row has more, non-`primary` entries in its neighbouring clusters. Results are per
    entry, dup_of as row indices; `merge_entries` turns them into one decision per row. The keep
    priority uses each row's own (primary) centroid similarity in both clusters, so it is one order
    over all rows and a dup_of always points to a row of higher priority. `vectors` may be stored as
    float16: each cluster's rows are converted to float32 as it is deduplicated."""
    reason = np.full(len(rows), KEPT, dtype=object)
    dup_of = np.full(len(rows), -1, dtype=np.int64)
    rank = np.full(len(rows), -1, dtype=np.int64)
    sweep: dict[float, int] = {}
    keys_arr, sha_arr = np.asarray(keys), np.asarray(sha256)
    for group in _groups(labels):
        idx = rows[group]
        res = dedup_cluster(
            keys_arr[idx],
            vectors[idx].astype(np.float32, copy=False),
            sha_arr[idx],
            phash[idx],
            centroid_sim[idx],
            area[idx],
            fingerprint=None if fingerprint is None else fingerprint[idx],
            counted=primary[group],
            **options,
        )
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
    vectors: np.ndarray,
    keys: Sequence[str] | np.ndarray,
    sha256: Sequence[str] | np.ndarray,
    phash: np.ndarray,
    centroid_sim: np.ndarray,
    area: np.ndarray,
    candidates: np.ndarray | None = None,
    fingerprint: np.ndarray | None = None,
    extra: np.ndarray | None = None,
    **options,
) -> DedupResult:
    """Every row's decision: its nearest cluster, and for border rows (`extra` >= 0, see
    `assign_clusters`) its border clusters too. Rows outside `candidates` are left alone (reason ""
    and rank -1): the caller has already removed them (prefilters)."""
    n = len(labels)
    rows = np.arange(n) if candidates is None else np.flatnonzero(candidates)
    extra = np.full((n, 0), -1, dtype=np.int64) if extra is None else extra
    rows, entry_labels, primary = border_entries(rows, labels, extra)
    entries = dedup_entries(
        rows, entry_labels, primary, vectors, keys, sha256, phash, centroid_sim, area, fingerprint, **options
    )
    return merge_entries(rows, primary, entries, n)


# -- prefilters and selection ----------------------------------------------------------------


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


class DecisionStage(Stage):
    """Applies dedup's decisions: removed samples name what they duplicate, kept ones get their
    cluster, and images the embed pass failed on become reject rows with its reason."""

    name = "dedup"

    def __init__(self, decisions: UPath | Path, embed_rejects: Callable[[int], UPath]):
        super().__init__()
        self.decisions, self.embed_rejects = decisions, embed_rejects

    @classmethod
    def plan(cls, flow: Flow) -> list[StageRun]:
        return [StageRun.light(cls(flow.decisions, flow.embed_rejects))] if flow.config.dedup.enabled else []

    def _unit(self, unit: int) -> tuple[dict[str, dict[str, Any]], dict[str, dict[str, Any]]]:
        from denseforge.storage import read_parquet

        decided = {r["key"]: r for r in read_parquet(self.decisions, filters=[("unit", "=", unit)]).to_pylist()}
        failed_file = self.embed_rejects(unit)
        failed = {r["key"]: r for r in read_parquet(failed_file).to_pylist()} if failed_file.exists() else {}
        return decided, failed

    def process(self, batch: list[Item]) -> list[Verdict]:
        units = {unit: self._unit(unit) for unit in sorted({item.unit for item in batch})}
        verdicts: list[Verdict] = []
        for item in batch:
            decided, failed = units[item.unit]
            if item.key in failed:
                verdicts.append(Rejection(failed[item.key]["reason"], failed[item.key]["detail"], "embed"))
                continue
            decision = decided.get(item.key)
            if decision is None:
                raise LookupError(f"sample {item.key} has no dedup decision; delete {self.decisions.parent} and resume")
            if decision["reason"]:
                verdicts.append(Removal(decision["reason"], decision["dup_of"], decision["cluster"]))
            else:
                item.sample.cluster = decision["cluster"]
                verdicts.append(None)
        return verdicts
