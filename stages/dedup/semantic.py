"""SemDeDup inside one cluster: rows visited in keep-priority order, each removed when it is
within the threshold of a row already kept; bounded-memory blocks, bfloat16 screening where the
CPU has it (every candidate confirmed in float32)."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Literal

import numpy as np

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


# Σ n² over a task's clusters that pays torch's import (a second and over a GB of RSS per worker):
# below it float32 is cheaper overall (figures: docs/benchmarks.md)
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
