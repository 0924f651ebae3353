"""Spherical k-means with FAISS (flat, or two-level above `two_level_above` clusters) and the
assignment of rows to their nearest centroid and border clusters."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from denseforge.stages.dedup.config import DedupConfig


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


TWO_LEVEL_ABOVE = 4096  # above this many clusters, k-means and the index are two-level


def flat_kmeans(sample: np.ndarray, k: int, niter: int, seed: int, use_gpu: bool, mppc: int) -> np.ndarray:
    """k spherical k-means centroids of `sample` (FAISS; at most `mppc` points per centroid)."""
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


def fine_shares(counts: np.ndarray, k: int) -> np.ndarray:
    """How many of the k fine centroids each coarse cell trains: its share of the sample's rows
    (`counts` per cell), at least one, at most its rows."""
    share = np.maximum(1, np.floor(k * counts / max(1, counts.sum())).astype(int))
    return np.minimum(share, np.maximum(counts, 1))


def train_cell(members: np.ndarray, share: int, niter: int, seed: int, use_gpu: bool | None, mppc: int) -> np.ndarray:
    """One coarse cell's fine centroids, from the sample's rows in it (the rows themselves when
    it has no more rows than centroids)."""
    if share >= len(members):
        return np.ascontiguousarray(members, dtype=np.float32)
    return flat_kmeans(members, share, niter, seed, bool(use_gpu), mppc)


def train_kmeans(
    sample: np.ndarray,
    k: int,
    niter: int = 20,
    seed: int = 0,
    use_gpu: bool | None = None,
    max_points_per_centroid: int = 256,
    two_level_above: int = TWO_LEVEL_ABOVE,
) -> CentroidIndex:
    """Spherical k-means centroids (k, d), trained with FAISS on a sample of the embeddings.

    Above `two_level_above` clusters, training is hierarchical: sqrt(k) coarse centroids, then each
    coarse cell is split in proportion to its share of the sample. Cost grows as k^1.5 instead of
    k², which is what keeps 50,000 clusters trainable; the index keeps both levels, and assignment
    follows the same hierarchy (`assign_clusters`). The run's dedup phase trains the same way in
    parallel tasks (`dedup_phase.train_index`)."""
    if use_gpu is None:
        use_gpu = faiss_gpu_available()
    k = min(k, len(sample))
    if k <= two_level_above:
        return CentroidIndex(flat_kmeans(sample, k, niter, seed, bool(use_gpu), max_points_per_centroid))
    coarse = flat_kmeans(sample, int(np.ceil(np.sqrt(k))), niter, seed, bool(use_gpu), max_points_per_centroid)
    labels = assign_clusters(sample, coarse)[0]
    counts = np.bincount(labels, minlength=len(coarse))
    shares = fine_shares(counts, k)
    fine = {
        c: train_cell(sample[labels == c], int(shares[c]), niter, seed + c, use_gpu, max_points_per_centroid)
        for c in range(len(coarse))
        if counts[c]
    }
    return CentroidIndex.of_cells(coarse, fine)


@dataclass
class CentroidIndex:
    """The trained centroids (k, d); for a hierarchy, also its coarse centroids and, per coarse
    cell, the ids of the centroids trained inside it."""

    centroids: np.ndarray
    coarse: np.ndarray | None = None
    cells: list[np.ndarray] = field(default_factory=list)
    _search: Any = field(default=None, init=False, repr=False, compare=False)

    @classmethod
    def of_cells(cls, coarse: np.ndarray, fine: dict[int, np.ndarray]) -> CentroidIndex:
        """A two-level index from the coarse centroids and each non-empty cell's fine centroids."""
        cells, start = [], 0
        for c in sorted(fine):
            cells.append(np.arange(start, start + len(fine[c])))
            start += len(fine[c])
        centroids = np.concatenate([fine[c] for c in sorted(fine)]).astype(np.float32)
        centroids /= np.linalg.norm(centroids, axis=1, keepdims=True)
        return cls(centroids, np.ascontiguousarray(coarse[sorted(fine)]), cells)

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
        """What `assign_clusters` searches (`_FlatSearch`, or `_CellSearch` for a hierarchy), made
        on first use and kept. Both search the centroids where they lie, without copying them: in
        a Ray task they are read-only views of the node's object store, one copy per node however
        many processes search it (a FAISS index copies them: 2 GB at k = 10⁶, per process)."""
        if self._search is None:
            self._search = _FlatSearch(self.centroids) if self.coarse is None else _CellSearch(self)
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


class _FlatSearch:
    """Exact inner-product search over rows of centroids, in place (`faiss.knn`: the BLAS product
    a FAISS flat index runs, without an index that copies the vectors)."""

    def __init__(self, vectors: np.ndarray):
        self.vectors = vectors

    def search(self, x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Each row's k nearest: similarities and ids, -1 beyond the vectors there are."""
        import faiss

        if len(self.vectors) == 0:
            return np.full((len(x), k), np.finfo(np.float32).min), np.full((len(x), k), -1, np.int64)
        return faiss.knn(np.ascontiguousarray(x, dtype=np.float32), self.vectors, k, metric=faiss.METRIC_INNER_PRODUCT)


class _CellSearch:
    """Exact search inside given coarse cells, each cell's centroids searched with all the rows
    that ask for that cell at once, so FAISS multiplies them as one matrix. (An IVF's
    `search_preassigned` scans cell by cell for each row without BLAS, a large share of an
    assignment task.) A cell's centroids are one slice of the index (`of_cells` trains them so)."""

    def __init__(self, index: CentroidIndex):
        if index.coarse is None:
            raise ValueError("a two-level index needs the coarse centroids of a hierarchy")
        self.coarse = _FlatSearch(index.coarse)
        self.ids = index.cells
        self.flats = [_FlatSearch(index.centroids[_rows(members)]) for members in index.cells]

    def search(self, x: np.ndarray, cells: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Each row's k nearest centroids inside its cell (`cells[i]`): similarities and global
        ids, -1 where the cell has fewer than k."""
        val = np.empty((len(x), k), dtype=np.float32)
        idx = np.empty((len(x), k), dtype=np.int64)
        for rows in _groups(cells):
            cell = int(cells[rows[0]])
            val[rows], local = self.flats[cell].search(x[rows], k)
            idx[rows] = np.where(local >= 0, self.ids[cell][np.maximum(local, 0)], -1)
        return val, idx


def _rows(members: np.ndarray) -> slice | np.ndarray:
    """A cell's centroid ids as a slice where they are consecutive (a view, no copy)."""
    if len(members) and members[-1] - members[0] == len(members) - 1 and (np.diff(members) == 1).all():
        return slice(int(members[0]), int(members[-1]) + 1)
    return members


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
