import hashlib
import io

import numpy as np
import pytest
from PIL import Image

from denseforge.pipeline.demo import PHOTOS, load_photo
from denseforge.stages import dedup as dd
from denseforge.stages.dedup import semantic
from denseforge.stages.embed import perceptual_hash
from denseforge.stages.image_normalize import ImageNormalizer

SEMANTIC_ONLY = dict(
    epsilon=0.05,
    phash_max_distance=None,
    witness_max_fine_distance=None,
    witness_max_colour_difference=None,
    exact=False,
    matmul="float32",
)


def rules(**settings) -> dd.DedupConfig:
    """Dedup's settings for a direct call: nothing swept unless asked (the config sweeps six epsilons)."""
    return dd.DedupConfig(**{"sweep": [], **settings})


def _unit(x):
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def naive_greedy(vectors, t, active=None):
    """Reference: visit rows in order, compare with every kept row."""
    n = len(vectors)
    active = np.ones(n, bool) if active is None else active
    dup, kept = np.full(n, -1), []
    for j in range(n):
        if not active[j]:
            continue
        sims = [(vectors[i] @ vectors[j], i) for i in kept]
        best = max(sims, default=(-np.inf, -1))
        if best[0] > t:
            dup[j] = best[1]
        else:
            kept.append(j)
    return dup


@pytest.fixture(scope="module")
def planted():
    rng = np.random.default_rng(0)
    base = _unit(rng.normal(size=(300, 32)))
    copies = _unit(base[:60] + rng.normal(scale=0.04, size=(60, 32)))  # cos ~0.97
    x = np.concatenate([base, copies])
    perm = rng.permutation(len(x))
    return x[perm]


@pytest.mark.parametrize("block", [7, 64, 1000])
def test_blocked_greedy_matches_the_naive_reference_across_block_boundaries(planted, block):
    thresholds = [0.9, 0.95, 0.5]
    got = dd.greedy_duplicates(planted, thresholds, block=block)
    for t, dup in zip(thresholds, got, strict=True):
        np.testing.assert_array_equal(dup, naive_greedy(planted, t))


@pytest.mark.parametrize("block", [7, 64, 1000])
def test_bf16_screened_greedy_decides_its_first_threshold_as_float32_does(planted, block):
    """bfloat16 products screen the pairs and every row near thresholds[0] is recomputed in float32:
    its decisions are the reference's; the others are estimates from bfloat16 similarities."""
    thresholds = [0.95, 0.9, 0.5]
    got = dd.greedy_duplicates(planted, thresholds, block=block, bf16=True)
    np.testing.assert_array_equal(got[0], naive_greedy(planted, 0.95))
    for t, dup in zip(thresholds[1:], got[1:], strict=True):  # estimates: at most a few rows either way
        assert abs(int((dup < 0).sum()) - int((naive_greedy(planted, t) < 0).sum())) <= 3


def test_bf16_screening_decides_pairs_near_the_threshold_in_float32():
    """200 pairs with cosines spread over 0.95 ± 0.01: the bfloat16 estimate (the same threshold
    asked for twice: the second is decided on bfloat16 alone) gets some wrong, the screened first
    one none."""
    rng = np.random.default_rng(1)
    base = _unit(rng.normal(size=(200, 256))).astype(np.float32)
    other = rng.normal(size=(200, 256))
    other = _unit(other - (other * base).sum(1, keepdims=True) * base)
    cos = rng.uniform(0.94, 0.96, size=(200, 1))
    x = np.concatenate([base, (cos * base + np.sqrt(1 - cos**2) * other)]).astype(np.float32)
    x = x[rng.permutation(len(x))]
    reference = naive_greedy(x, 0.95)
    screened, estimate = dd.greedy_duplicates(x, [0.95, 0.95], block=64, bf16=True)
    np.testing.assert_array_equal(screened, reference)
    assert (estimate != reference).any()


def test_bf16_products_run_beside_one_blas_thread(planted, monkeypatch):
    """numpy's BLAS threads spin between calls and starve torch's (300k rows in one process: 13.9 s
    against 1.6 s), so the float32 rechecks run on one BLAS thread while torch's products run;
    float32 alone keeps every BLAS thread."""
    from threadpoolctl import threadpool_info, threadpool_limits

    def blas_threads():
        return {i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"}

    seen = []
    products = semantic._bf16_products

    def watched(vectors):
        inner = products(vectors)
        return lambda *span: seen.append(blas_threads()) or inner(*span)

    monkeypatch.setattr(semantic, "_bf16_products", watched)
    with threadpool_limits(limits=2, user_api="blas"):
        dd.greedy_duplicates(planted, [0.95], block=64, bf16=True)
        assert seen and all(threads == {1} for threads in seen)
        assert blas_threads() == {2}  # restored


def test_bf16_products_multiply_padded_shapes_and_return_the_span_asked_for():
    """oneDNN's bfloat16 matmul is several times slower on shapes of its own, and a cluster's last
    step always has one: every product is computed on rows and columns rounded up to BF16_SHAPE."""
    from torch.overrides import TorchFunctionMode

    shapes = []

    class Shapes(TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            if getattr(func, "__name__", "") == "matmul":
                shapes.append((args[0].shape[0], args[1].shape[1]))
            return func(*args, **(kwargs or {}))

    rng = np.random.default_rng(2)
    x = _unit(rng.normal(size=(301, 40)))
    products = semantic._bf16_products(x)
    with Shapes():
        spans = [(0, 5, 0, 5), (128, 301, 0, 128), (256, 301, 100, 301), (300, 301, 0, 1)]
        got = [products(*span) for span in spans]
    assert shapes and all(r % dd.BF16_SHAPE == 0 and c % dd.BF16_SHAPE == 0 for r, c in shapes)
    for (s, e, c, ce), product in zip(spans, got, strict=True):
        assert product.shape == (e - s, ce - c) and product.dtype == np.float32
        np.testing.assert_allclose(product, x[s:e] @ x[c:ce].T, atol=dd.BF16_MARGIN)


def test_pairs_finds_what_nonzero_finds():
    rng = np.random.default_rng(3)
    for mask in (rng.random((7, 5)) > 0.7, np.zeros((4, 3), bool), (rng.random((9, 9)) > 0.5)[:6, 2:]):
        for got, want in zip(semantic._pairs(mask), np.nonzero(mask), strict=True):
            np.testing.assert_array_equal(got, want)


def test_keep_best_takes_each_rows_most_similar_col_and_the_lowest_on_a_tie():
    best = np.array([0.96, -np.inf, 0.99], dtype=np.float32)
    arg = np.array([4, -1, 8])
    rows, cols = np.array([0, 0, 1, 1, 1, 2]), np.array([9, 7, 6, 3, 5, 2])
    sims = np.array([0.97, 0.98, 0.97, 0.97, 0.96, 0.98], dtype=np.float32)
    semantic._keep_best(best, arg, rows, cols, sims)
    np.testing.assert_array_equal(arg, [7, 3, 8])  # row 2 keeps its better earlier col
    np.testing.assert_allclose(best, [0.98, 0.97, 0.99])


@pytest.mark.parametrize("bf16", [False, True])
def test_a_chain_of_rows_above_the_threshold_inside_one_step_is_decided_in_order(bf16):
    """Rows 10 degrees apart, threshold cos 15 degrees: each is above it only with its neighbours.
    Row 1 goes (row 0 stays), so row 2 stays, so row 3 goes, row 4 stays; rows 5 and 6, copies of
    row 4, both name row 4, the kept one, and not each other."""
    angles = np.radians([0, 10, 20, 30, 40, 40, 40])
    x = np.stack([np.cos(angles), np.sin(angles)], axis=1).astype(np.float32)
    got = dd.greedy_duplicates(x, [float(np.cos(np.radians(15)))], block=64, bf16=bf16)[0]
    np.testing.assert_array_equal(got, [-1, 0, -1, 2, -1, 4, 4])


def test_greedy_respects_inactive_rows(planted):
    active = np.ones(len(planted), bool)
    active[::3] = False
    got = dd.greedy_duplicates(planted, [0.9], block=50, active=active)[0]
    np.testing.assert_array_equal(got, naive_greedy(planted, 0.9, active))
    assert (got[~active] == -1).all()


def test_semantic_dedup_finds_planted_pairs():
    rng = np.random.default_rng(1)
    base = _unit(rng.normal(size=(200, 64)))
    copies = _unit(base[:50] + rng.normal(scale=0.02, size=(50, 64)))
    x = np.concatenate([base, copies])
    keys = [f"{i:05d}" for i in range(len(x))]
    res = dd.dedup_cluster(
        dd.Rows.of(keys, x, keys, np.arange(len(x)), np.zeros(len(x)), np.ones(len(x))),
        rules(epsilon=0.05, phash_max_distance=None, exact=True, keep="first_key", sweep=[0.01, 1.0]),
    )
    removed = np.flatnonzero(res.reason != "")
    assert sorted(removed) == list(range(200, 250))
    assert all(res.dup_of[i] == i - 200 for i in removed)
    assert res.sweep_kept[0.05] == 200 and res.sweep_kept[0.01] >= 200 and res.sweep_kept[1.0] < 150


def test_dup_of_points_at_the_item_that_stays():
    # a: kept; b: exact copy of c; c: semantic duplicate of a  ->  b.dup_of must be a
    x = _unit(np.array([[1, 0], [1, 0.05], [1, 0.05]], dtype=np.float32))
    res = dd.dedup_cluster(
        dd.Rows.of(["a", "b", "c"], x, ["s1", "s2", "s2"], [1, 2, 3], [0.9, 0.5, 0.8], np.ones(3)),
        rules(epsilon=0.1, phash_max_distance=None, keep="nearest_centroid"),
    )
    assert list(res.reason) == ["", "exact_duplicate", "semantic_duplicate"]
    assert list(res.dup_of) == [-1, 0, 0]
    assert list(res.rank) == [0, 3, 3]


@pytest.mark.parametrize(
    "policy, winner", [("nearest_centroid", 1), ("farthest_centroid", 0), ("largest_image", 2), ("first_key", 0)]
)
def test_keep_policies(policy, winner):
    x = _unit(np.ones((3, 4), dtype=np.float32))
    res = dd.dedup_cluster(
        dd.Rows.of(["k0", "k1", "k2"], x, ["a", "b", "c"], [0, 1 << 40, 7], [0.1, 0.9, 0.5], [10, 20, 30]),
        rules(epsilon=0.01, phash_max_distance=None, keep=policy),
    )
    assert [i for i in range(3) if res.reason[i] == ""] == [winner]


def _jpeg(img, **kw):
    out = io.BytesIO()
    img.convert("RGB").save(out, format="JPEG", **kw)
    return out.getvalue()


def test_planted_duplicates_among_real_photos_are_removed_and_distinct_photos_kept():
    normalizer = ImageNormalizer(image_size=256)
    entries = []  # (key, stored bytes, planted original key or None)
    for i, name in enumerate(PHOTOS):
        photo = load_photo(name)
        entries.append((f"{i}a-orig", _jpeg(photo, quality=92), None))
        if i % 2 == 0:
            entries.append((f"{i}b-copy", entries[-1][1], f"{i}a-orig"))
        if i % 3 == 0:
            entries.append((f"{i}c-reenc", _jpeg(photo, quality=60), f"{i}a-orig"))
        if i % 3 == 1:
            small = photo.resize((round(photo.width * 0.85), round(photo.height * 0.85)))
            entries.append((f"{i}d-resize", _jpeg(small, quality=85), f"{i}a-orig"))
    stored = [normalizer.normalize(b).data for _, b, _ in entries]
    keys = [k for k, _, _ in entries]
    sha = [hashlib.sha256(s).hexdigest() for s in stored]
    phash = np.array([perceptual_hash(Image.open(io.BytesIO(s)).convert("RGB")) for s in stored])
    sizes = np.array([Image.open(io.BytesIO(s)).size for s in stored])
    res = dd.dedup_cluster(
        dd.Rows.of(
            keys, np.zeros((len(keys), 1), np.float32), sha, phash, np.zeros(len(keys)), sizes[:, 0] * sizes[:, 1]
        ),
        rules(epsilon=None, phash_max_distance=4, keep="first_key"),
    )
    for j, (key, _, original) in enumerate(entries):
        if original is None:
            assert res.reason[j] == "", f"distinct photo {key} was removed"
        else:
            assert res.reason[j] in ("exact_duplicate", "near_duplicate"), key
            assert keys[res.dup_of[j]] == original
    assert {r for r in res.reason if r} == {"exact_duplicate", "near_duplicate"}


def test_kmeans_is_seeded_and_assignment_is_nearest():
    rng = np.random.default_rng(3)
    centers = _unit(rng.normal(size=(5, 16)))
    x = _unit(np.repeat(centers, 100, axis=0) + rng.normal(scale=0.05, size=(500, 16)))
    a = dd.train_kmeans(x, 5, seed=7, use_gpu=False)
    b = dd.train_kmeans(x, 5, seed=7, use_gpu=False)
    np.testing.assert_array_equal(a.centroids, b.centroids)
    assert a.coarse is None  # 5 clusters: flat
    labels, sims, extra = dd.assign_clusters(x, a, batch=64)
    np.testing.assert_array_equal(labels, np.argmax(x @ a.centroids.T, axis=1))
    assert len(set(labels[:100])) == 1 and len(set(labels)) == 5 and sims.min() > 0.8
    assert extra.shape == (500, 0)  # border 0: nearest only


def test_clusters_for():
    assert dd.clusters_for(0, None, 1000) == 0
    assert dd.clusters_for(10, None, 1000) == 1
    assert dd.clusters_for(1_000_000, None, 20) == 50_000
    assert dd.clusters_for(10, 50, 1000) == 10


def test_training_sample_is_bounded_but_never_below_39_points_per_centroid():
    cfg = dd.DedupConfig()
    assert dd.train_points(1000, 2, cfg) == 512  # k x 256
    assert dd.train_points(1_000_000, 1000, cfg) == 65_536  # the cap
    assert dd.train_points(100, 2, cfg) == 100  # all there is
    # densefusion.yaml's 50,000 clusters: the cap alone gave 1.3 points per centroid
    assert dd.train_points(10**8, 50_000, cfg) == 50_000 * 39
    assert dd.train_points(10**6, 50_000, cfg) == 10**6
    assert dd.train_points(10**8, 50_000, dd.DedupConfig(max_points_per_centroid=10)) == 500_000


def test_prefilter_and_balanced_selection():
    reason = dd.prefilter(np.array([500, 300, 2000, 448]), np.array([600, 900, 100, 448]), 448, 3.0)
    assert list(reason) == ["", "too_small", "too_small", ""]
    reason = dd.prefilter(np.array([1000, 500]), np.array([200, 500]), 0, 3.0)
    assert list(reason) == ["bad_aspect_ratio", ""]
    cluster = np.array([0, 0, 0, 1, 1, 2])
    rank = np.array([0, 1, 2, 0, 1, 0])
    keys = [f"k{i}" for i in range(6)]
    assert list(dd.select_balanced(cluster, rank, keys, 2, None)) == [1, 1, 0, 1, 1, 1]
    # target 4: every cluster's best first (k0, k3, k5), then the best second (k1 before k4 by cluster)
    assert list(dd.select_balanced(cluster, rank, keys, None, 4)) == [1, 1, 0, 1, 0, 1]


def test_dedup_all_works_cluster_by_cluster_and_skips_non_candidates():
    x = _unit(np.array([[1, 0], [1, 0.01], [0, 1], [0.01, 1], [1, 0.02]], dtype=np.float32))
    labels = np.array([0, 0, 1, 1, 1])  # row 4 is near row 0 but sits in another cluster
    keys = ["a", "b", "c", "d", "e"]
    candidates = np.array([True, True, True, False, True])
    res = dd.dedup_all(
        labels,
        dd.Rows.of(keys, x, keys, np.arange(5), np.zeros(5), np.ones(5)),
        rules(epsilon=0.01, phash_max_distance=None, keep="first_key", sweep=[0.01]),
        candidates=candidates,
    )
    assert list(res.reason) == ["", "semantic_duplicate", "", "", ""]
    assert list(res.dup_of) == [-1, 0, -1, -1, -1]
    assert res.rank[3] == -1 and res.sweep_kept == {0.01: 3}


def test_a_phash_match_needs_a_second_witness_no_false_merges_copies_still_caught():
    from denseforge.pipeline.bench.quality import dedup_set
    from denseforge.stages.embed import fingerprint

    distinct, copies = dedup_set()
    images, group = [], []
    for g, original in enumerate(distinct):
        for j, variant in enumerate(copies(original)):
            stored = Image.open(io.BytesIO(_jpeg(variant, quality=60 if j == 0 else 90))).convert("RGB")
            images.append(stored)
            group.append(g)
    n = len(images)
    keys = [f"{i:04d}" for i in range(n)]
    phash = np.array([perceptual_hash(im) for im in images])
    prints = np.stack([np.frombuffer(fingerprint(im), np.uint8) for im in images])
    cfg = rules(epsilon=None, phash_max_distance=6, keep="first_key")
    args = (keys, np.zeros((n, 1), np.float32), [str(i) for i in range(n)], phash, np.zeros(n), np.ones(n))
    alone = dd.dedup_cluster(dd.Rows.of(*args), cfg)
    witnessed = dd.dedup_cluster(dd.Rows.of(*args, prints), cfg)

    def false_merges(res):
        return [(keys[i], keys[res.dup_of[i]]) for i in range(n) if res.reason[i] and group[res.dup_of[i]] != group[i]]

    assert false_merges(alone), "the hard negatives must fool the pHash alone, or the test proves nothing"
    assert false_merges(witnessed) == []
    caught = sum(1 for i in range(n) if witnessed.reason[i])
    caught_alone = sum(1 for i in range(n) if alone.reason[i] and group[alone.dup_of[i]] == group[i])
    assert caught >= 0.95 * caught_alone and caught >= 0.7 * (n - len(distinct))  # copies the pHash sees stay caught


def test_hue_histogram_is_circular_and_soft():
    """Regression: hard bins put pure red (hue ~0 and ~1) and pure blue (hue 2/3, a bin edge) in
    different bins on JPEG noise, so a logo's copy failed the colour witness (L1 up to 1.6)."""

    def thumb(rgb):
        return np.array([rgb] * 64, dtype=np.uint8)

    red_low, red_high = dd.hue_histogram(thumb((250, 10, 12))), dd.hue_histogram(thumb((250, 12, 10)))
    assert float(np.abs(red_low - red_high).sum()) < 0.1  # hue 0.0013 and 0.9987: the same red
    blue_a, blue_b = dd.hue_histogram(thumb((30, 28, 200))), dd.hue_histogram(thumb((28, 30, 200)))
    assert float(np.abs(blue_a - blue_b).sum()) < 0.1  # either side of the 8/12 edge
    assert float(np.abs(red_low - blue_a).sum()) == pytest.approx(2.0)  # red and blue stay apart
    assert dd.hue_histogram(thumb((128, 128, 128))) is None


def test_every_copy_kind_passes_the_witness_and_no_look_alike_does():
    """Each copy of each hard negative (logo, sign, slide, photo) is witnessed against its original
    at the shipped defaults; no two distinct originals are."""
    from denseforge.pipeline.bench.quality import dedup_set
    from denseforge.stages.embed import fingerprint

    cfg = dd.DedupConfig()
    distinct, copies = dedup_set()
    prints = [
        [
            np.frombuffer(fingerprint(Image.open(io.BytesIO(_jpeg(c, quality=90))).convert("RGB")), np.uint8)
            for c in copies(im)[:4]
        ]
        for im in distinct
    ]
    for group in prints:
        assert all(
            dd.witnessed(group[0], p, cfg.witness_max_fine_distance, cfg.witness_max_colour_difference)
            for p in group[1:]
        )
    for a in range(len(prints)):
        for b in range(a + 1, len(prints)):
            pa, pb = (
                np.frombuffer(fingerprint(distinct[a]), np.uint8),
                np.frombuffer(fingerprint(distinct[b]), np.uint8),
            )
            same_bits = dd.phash_vectors(np.array([perceptual_hash(distinct[a]), perceptual_hash(distinct[b])]))
            close = float(same_bits[0] @ same_bits[1]) > 1.0 - 2.0 * (cfg.phash_max_distance + 0.5) / 64.0
            assert not (
                close and dd.witnessed(pa, pb, cfg.witness_max_fine_distance, cfg.witness_max_colour_difference)
            )


def test_border_rows_get_the_clusters_within_the_margin_at_most_border_clusters():
    centroids = np.array([[1, 0], [0, 1], [-1, 0]], dtype=np.float32)
    # sims to (c0, c1, c2): (0.719, 0.695, -0.719), (0.985, 0.174, -0.985), (0.643, 0.766, -0.643),
    # (-0.682, 0.731, 0.682)
    angles = np.deg2rad([44.0, 10.0, 50.0, 133.0])
    x = np.stack([np.cos(angles), np.sin(angles)], axis=1).astype(np.float32)
    labels, sims, extra = dd.assign_clusters(x, centroids, border=0.05)
    assert list(labels) == [0, 0, 1, 1] and extra.tolist() == [[1, -1], [-1, -1], [-1, -1], [2, -1]]
    np.testing.assert_allclose(
        sims, [np.cos(angles[0]), np.cos(angles[1]), np.sin(angles[2]), np.sin(angles[3])], atol=1e-6
    )
    assert dd.assign_clusters(x, centroids, border=0.13)[2].tolist() == [[1, -1], [-1, -1], [0, -1], [2, -1]]
    # 2.0: every centroid is within the border; border_clusters caps them
    assert dd.assign_clusters(x, centroids, border=2.0)[2].tolist() == [[1, 2], [1, 2], [0, 2], [2, 0]]
    assert dd.assign_clusters(x, centroids, border=2.0, border_clusters=1)[2].tolist() == [[1], [1], [0], [2]]
    assert dd.assign_clusters(x, centroids)[2].shape == (4, 0)  # border 0: nearest only


def test_border_entries_put_a_row_in_each_of_its_border_clusters():
    labels = np.array([0, 1, 2])
    extra = np.array([[1, 2], [-1, -1], [0, -1]])
    rows, clusters, primary = dd.border_entries(np.arange(3), labels, extra)
    assert rows.tolist() == [0, 1, 2, 0, 2, 0] and clusters.tolist() == [0, 1, 2, 1, 0, 2]
    assert primary.tolist() == [True, True, True, False, False, False]
    rows, clusters, primary = dd.border_entries(np.array([1, 2]), labels, extra)  # row 0 left out (prefilter)
    assert rows.tolist() == [1, 2, 2] and clusters.tolist() == [1, 2, 0] and primary.tolist() == [True, True, False]


def test_a_duplicate_split_by_a_cluster_boundary_is_found_through_the_border_row():
    x = _unit(np.array([[1, 0.97], [1, 1.0], [0, 1]], dtype=np.float32))  # rows 0 and 1: cosine 0.9998
    labels = np.array([0, 1, 1])
    keys = ["a", "b", "c"]
    cfg = rules(epsilon=0.01, phash_max_distance=None, keep="first_key", sweep=[0.01])
    rows = dd.Rows.of(keys, x, keys, np.arange(3), np.zeros(3), np.ones(3))
    alone = dd.dedup_all(labels, rows, cfg)
    assert list(alone.reason) == ["", "", ""]
    res = dd.dedup_all(labels, rows, cfg, extra=np.array([[1], [-1], [-1]]))
    assert list(res.reason) == ["", "semantic_duplicate", ""] and list(res.dup_of) == [-1, 0, -1]
    assert res.sweep_kept == {0.01: 2}  # the border copy of "a" is not counted twice
    assert list(res.rank) == [0, 3, 0]  # ranked in its own cluster, where the copy of "a" takes no place; removed: n


def test_merge_entries_follows_a_border_row_removed_elsewhere_to_what_stays():
    # rows: Y=0, X=1, Z=2. X is kept in cluster A (as a border copy) and removes Z there, but is
    # itself removed in its own cluster B as a duplicate of Y: Z must end up pointing at Y.
    rows = np.array([1, 0, 1, 2])
    primary = np.array([True, True, False, True])
    entries = dd.DedupResult(
        np.array([dd.SEMANTIC, "", "", dd.NEAR], dtype=object),
        np.array([0, -1, -1, 1]),
        np.array([1, 0, 0, 1]),
        {0.05: 2},
    )
    merged = dd.merge_entries(rows, primary, entries, 3)
    assert list(merged.reason) == ["", dd.SEMANTIC, dd.NEAR] and list(merged.dup_of) == [-1, 0, 0]
    assert list(merged.rank) == [0, 1, 1] and merged.sweep_kept == {0.05: 2}


def test_merge_entries_a_primary_removal_names_the_reason():
    rows, primary = np.array([1, 1, 0]), np.array([False, True, True])
    entries = dd.DedupResult(
        np.array([dd.SEMANTIC, dd.EXACT, ""], dtype=object), np.array([0, 0, -1]), np.array([3, 2, 0]), {}
    )
    merged = dd.merge_entries(rows, primary, entries, 2)
    assert list(merged.reason) == ["", dd.EXACT] and list(merged.dup_of) == [-1, 0] and list(merged.rank) == [0, 2]


def test_merge_entries_decides_the_same_whatever_order_the_entries_come_in():
    """Row 0 is kept in its own cluster and removed as a border copy in two others, of rows 2 and 1
    (the buckets' parts come in bucket order, which `dedup.buckets` changes): dup_of is row 1."""
    rows, primary = np.array([0, 1, 2, 0, 0]), np.array([True, True, True, False, False])
    entries = dd.DedupResult(
        np.array(["", "", "", dd.SEMANTIC, dd.SEMANTIC], dtype=object),
        np.array([-1, -1, -1, 2, 1]),
        np.array([0, 0, 0, 5, 5]),
        {},
    )
    for order in (np.arange(5), np.array([4, 3, 2, 1, 0]), np.array([1, 4, 0, 3, 2])):
        part = dd.DedupResult(entries.reason[order], entries.dup_of[order], entries.rank[order], {})
        merged = dd.merge_entries(rows[order], primary[order], part, 3)
        assert list(merged.reason) == [dd.SEMANTIC, "", ""] and list(merged.dup_of) == [1, -1, -1]


def _entry(key, cluster=1, reason="", dup_of=None, primary=True, rank=None, home=0, dup_home=-1, unit=0):
    """One entry of a bucket's part, as `_dedup_bucket` writes it."""
    rank = (0 if not reason else 9) if rank is None else rank
    return dict(
        key=key,
        unit=unit,
        cluster=cluster,
        distance=0.1,
        rank=rank,
        reason=reason,
        dup_of=dup_of,
        primary=primary,
        home=home,
        dup_home=dup_home if dup_of is not None else -1,
    )


def _merge(root, by_partition, sel=None):
    """The phase's merge and selection, in this process, over entries given per merge partition
    (and per bucket inside it); returns the decisions by key, in file order."""
    import pyarrow as pa

    from denseforge.pipeline.dedup_merge import ENTRY_SCHEMA
    from denseforge.pipeline.dedup_phase import _merge_and_select
    from denseforge.pipeline.rundir import RunDir
    from denseforge.storage import read_parquet, write_table_atomic

    rd = RunDir(root / "run")
    for p, buckets in enumerate(by_partition):
        for b, entries in enumerate(buckets):
            write_table_atomic(
                rd.bucket_parts / f"{p:05d}" / f"{b:05d}.parquet", pa.Table.from_pylist(entries, schema=ENTRY_SCHEMA)
            )
    counts = _merge_and_select(rd, len(by_partition), sel or dd.SelectConfig(), in_process=True)
    rows = read_parquet(rd.decisions).to_pylist()
    return {r["key"]: r for r in rows}, counts, [r["key"] for r in rows]


def test_bucket_entries_merge_into_one_decision_per_key_on_its_primary_row(tmp_path):
    """What the dedup phase does with its buckets' entries: key "x" is kept as a border copy in
    cluster 5 (removing "z") but removed in its own cluster 7 as a copy of "y"."""
    bucket_7 = [_entry("x", 7, dd.SEMANTIC, "y", rank=3), _entry("y", 7, rank=0)]
    bucket_5 = [_entry("x", 5, primary=False, rank=0), _entry("z", 5, dd.NEAR, "x", rank=2, unit=1)]
    merged, counts, _ = _merge(tmp_path, [[bucket_7, bucket_5]])
    assert set(merged) == {"x", "y", "z"} and "primary" not in merged["x"] and "dup_home" not in merged["x"]
    assert (merged["x"]["cluster"], merged["x"]["reason"], merged["x"]["dup_of"]) == (7, dd.SEMANTIC, "y")
    assert (merged["z"]["reason"], merged["z"]["dup_of"], merged["z"]["unit"]) == (dd.NEAR, "y", 1)
    assert (merged["y"]["reason"], merged["y"]["dup_of"], merged["y"]["rank"], merged["y"]["kept"]) == (
        "",
        None,
        0,
        True,
    )
    assert counts == {"reasons": {dd.SEMANTIC: 1, dd.NEAR: 1}, "of_earlier": 0, "rounds": 0}


def test_a_dup_of_chain_through_other_partitions_is_followed_to_what_stays(tmp_path):
    """Partition 0 holds "a" (a copy of "b"), partition 1 "b", kept in its own cluster but removed
    as a border copy of "c", partition 2 "c", removed in its own cluster as a copy of "d" (kept,
    also in partition 2): "a" and "b" end at "d", over two rounds of the chain exchange."""
    p0 = [[_entry("a", 1, dd.SEMANTIC, "b", home=0, dup_home=1)]]
    p1 = [[_entry("b", 1, home=1, rank=0)], [_entry("b", 2, dd.SEMANTIC, "c", primary=False, home=1, dup_home=2)]]
    p2 = [[_entry("c", 3, dd.EXACT, "d", home=2, dup_home=2), _entry("d", 3, home=2, rank=0)]]
    merged, counts, order = _merge(tmp_path, [p0, p1, p2])
    assert counts["rounds"] == 3  # two rounds move a chain on (a to c, b to d; then a to d), the third finds none
    assert {k: (r["reason"], r["dup_of"]) for k, r in merged.items()} == {
        "a": (dd.SEMANTIC, "d"),
        "b": (dd.SEMANTIC, "d"),
        "c": (dd.EXACT, "d"),
        "d": ("", None),
    }
    assert order == ["a", "b", "c", "d"]  # partition by partition, by key inside each
    one = _merge(tmp_path / "one", [[*p0, *p1, *p2]])[0]  # one partition: the same decisions
    assert {k: r["dup_of"] for k, r in one.items()} == {k: r["dup_of"] for k, r in merged.items()}


def test_the_partitioned_selection_chooses_what_select_balanced_chooses_on_all_rows(tmp_path):
    """per_cluster and target_total, cut from counts across partitions, against the one-process
    rule on every row: clusters 0-5 spread over three partitions, ranks 0..n-1 per cluster."""
    rng = np.random.default_rng(2)
    rows, by_partition = [], [[[]] for _ in range(3)]
    for cluster in range(6):
        for rank in range(int(rng.integers(1, 9))):
            key = f"c{cluster}-{rank}"
            rows.append((key, cluster, rank))
            by_partition[cluster % 3][0].append(_entry(key, cluster, rank=rank, home=cluster % 3))
    cluster, rank = np.array([r[1] for r in rows]), np.array([r[2] for r in rows])
    for per_cluster, target in [(3, None), (None, 11), (4, 9), (2, 100), (None, 1)]:
        sel = dd.SelectConfig(per_cluster=per_cluster, target_total=target)
        merged, counts, _ = _merge(tmp_path / f"{per_cluster}-{target}", by_partition, sel)
        want = dd.select_balanced(cluster, rank, [r[0] for r in rows], per_cluster, target)
        assert [merged[r[0]]["kept"] for r in rows] == list(want), (per_cluster, target)
        assert counts["reasons"].get(dd.NOT_SELECTED, 0) == int((~want).sum())


def test_the_training_sample_reads_a_seeded_subset_of_the_files(tmp_path):
    """At large N the sample needs a few % of the rows: it reads 4x that share of the units' files
    (not all of them), and small runs still sample every file."""
    import pyarrow.parquet as pq

    from denseforge.pipeline.dedup_phase import _sample_part, _sample_plan
    from denseforge.stages.embed import embedding_table

    files = []
    for u in range(40):
        x = np.full((100, 4), float(u), dtype=np.float32)  # a row says which file it came from
        files.append(str(tmp_path / f"{u}.parquet"))
        pq.write_table(embedding_table([f"{u}-{i}" for i in range(100)], [u] * 100, x, {}), files[-1])

    def sample(fraction, seed, coarse_rate=1.0):
        picked, rate = _sample_plan(files, fraction, seed)
        parts = [
            _sample_part([files[i] for i in picked[s : s + 3]], picked[s : s + 3], rate, seed, coarse_rate)
            for s in range(0, len(picked), 3)
        ]
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])

    x, coarse = sample(0.05, 3)
    assert len(set(x[:, 0])) == 8  # ceil(0.05 x 4 x 40) files
    assert 120 <= len(x) <= 280  # about 0.05 x 4,000 rows
    np.testing.assert_array_equal(x, sample(0.05, 3)[0])  # seeded
    np.testing.assert_array_equal(x, coarse)  # the coarse part of a sample: all of it at rate 1
    assert set(sample(0.05, 4)[0][:, 0]) != set(x[:, 0])
    assert len(set(sample(0.3, 3)[0][:, 0])) == 40  # 0.3 x 4 >= 1: every file
    assert 0 < len(sample(0.3, 3, coarse_rate=0.25)[1]) < 0.5 * len(sample(0.3, 3)[1])  # bounded coarse share


def test_the_phase_trains_the_index_in_parallel_tasks_as_train_kmeans_does_in_one_process(tmp_path):
    """Above `two_level_above` the coarse level trains on its share of the sample, then each
    coarse cell's fine level in its own task: as many centroids as asked, each inside the cell it
    was trained in, and the same assignment quality as the in-process hierarchy."""
    import pyarrow as pa
    import ray

    from denseforge.pipeline.dedup_phase import train_index
    from denseforge.stages.embed import embedding_table, write_embeddings_file

    rng = np.random.default_rng(1)
    x = _unit(rng.normal(size=(6000, 16)) + np.repeat(rng.normal(size=(30, 16)) * 3, 200, axis=0))
    files = []
    for u in range(6):
        files.append(tmp_path / f"{u:05d}.parquet")
        write_embeddings_file(
            files[-1],
            embedding_table(
                [str(i) for i in range(1000)],
                [u] * 1000,
                x[u * 1000 : (u + 1) * 1000],
                {"sha256": pa.array(["s"] * 1000)},
            ),
        )
    cfg = dd.DedupConfig(kmeans_iters=8)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        flat = train_index(files, len(x), 50, 0, cfg, cpus=2)
        two = train_index(files, len(x), 5000, 0, cfg, cpus=2)  # 71 coarse cells, 4 x 2 fine tasks
    finally:
        ray.shutdown()
    assert flat.coarse is None and len(flat) == 50
    assert two.coarse is not None and len(two.coarse) == len(two.cells) <= 71 and 4000 < len(two) <= 5000
    assert sorted(np.concatenate(two.cells)) == list(range(len(two)))
    labels, sims, _ = dd.assign_clusters(x, two)
    assert float(np.median(sims)) > 0.6  # rows sit close to a fine centroid
    assert np.isin(two.cell_of(labels), np.arange(len(two.coarse))).all()


def test_bucket_files_are_arrow_ipc_written_atomically_and_read_memory_mapped(tmp_path):
    from denseforge.stages.embed import embedding_table, embeddings_matrix
    from denseforge.storage import read_arrow, write_arrow_atomic

    x = np.random.default_rng(0).standard_normal((50, 8)).astype(np.float32)
    table = embedding_table([str(i) for i in range(50)], [3] * 50, x, {"phash": np.arange(50)}, dtype="float16")
    write_arrow_atomic(tmp_path / "00003.arrow", table)
    assert [p.name for p in tmp_path.iterdir()] == ["00003.arrow"]  # no temporary left behind
    back = read_arrow(tmp_path / "00003.arrow")
    assert back.equals(table) and np.abs(embeddings_matrix(back) - x).max() < 4e-3


def test_an_index_builds_its_search_once_and_pickles_without_it():
    """An index makes its search once and searches its centroids in place; a pickled index (into
    a Ray task) makes its own, with the same answers."""
    import pickle

    rng = np.random.default_rng(4)
    x = _unit(rng.normal(size=(300, 16)))
    for index in (dd.train_kmeans(x, 8, seed=0), dd.train_kmeans(x, 25, seed=0, two_level_above=4)):
        first = dd.assign_clusters(x, index, border=0.1)
        search = index.search
        again = dd.assign_clusters(x, index, border=0.1)
        assert index.search is search
        copy = pickle.loads(pickle.dumps(index))
        assert copy._search is None
        for a, b, c in zip(first, again, dd.assign_clusters(x, copy, border=0.1), strict=True):
            np.testing.assert_array_equal(a, b)
            np.testing.assert_array_equal(a, c)


def test_bench_assign_times_the_two_level_search_against_the_flat_one():
    from denseforge.pipeline.bench.dedup import bench_assign

    r = bench_assign(400, rows=3000, dim=512, baseline_rows=500)
    assert (r["clusters"], r["coarse_cells"], r["rows"]) == (400, 20, 3000)
    assert r["index_mib"] == round(400 * 512 * 4 / 2**20, 1)  # float32, searched in place
    assert r["baseline"]["same_nearest"] >= 0.9  # the nearest cell's nearest centroid is mostly the global nearest
    assert 1.0 < r["entries_per_row"] <= 5.0  # at most 2 border centroids + 2 border cells
    assert 0.1 < r["median_centroid_sim"] < 0.5 and r["rows_per_s"] > 0 and r["baseline"]["speedup"] > 0


def test_the_in_memory_bench_takes_the_config_and_screens_as_a_bucket_task_does():
    """`bench dedup --set dedup.matmul=...` reaches the in-memory run (it was float32 whatever was
    set); both products decide the same planted copies, and a key outside the config is an error."""
    from denseforge.errors import ConfigError
    from denseforge.pipeline.bench.dedup import Corpus, bench_dedup

    runs = {
        m: bench_dedup(sizes=(3000,), corpus=Corpus(dim=32), baseline_n=300, overrides=(f"dedup.matmul={m}",))
        for m in ("float32", "bfloat16")
    }
    for m, r in runs.items():
        assert r["sizes"]["3000"]["matmul"] == m and r["overrides"] == [f"dedup.matmul={m}"]
    a, b = (runs[m]["sizes"]["3000"] for m in ("float32", "bfloat16"))
    assert (a["removed"], a["recall"], a["precision"]) == (b["removed"], b["recall"], b["precision"])
    assert a["planted"] == 300 and a["recall"] >= 0.99
    with pytest.raises(ConfigError):
        bench_dedup(sizes=(3000,), corpus=Corpus(dim=32), baseline_n=300, overrides=("dedup.no_such_key=1",))


def test_a_task_screens_in_bf16_when_asked_or_when_its_clusters_pay_for_torch():
    small, large = np.full(10, 1000), np.full(100, 4000)  # Σ n²: 1e7 and 1.6e9
    assert not dd.use_bf16("float32", large) and dd.use_bf16("bfloat16", small)
    assert not dd.use_bf16("auto", small)
    assert dd.use_bf16("auto", large) == dd.bf16_native()


def test_entries_stored_as_float16_are_decided_as_their_float32_values(planted):
    """The dedup task keeps a bucket's vectors as stored (float16) and converts cluster by cluster."""
    half = planted.astype(np.float16)
    n = len(half)
    rows, labels, primary = np.arange(n), np.arange(n) % 3, np.ones(n, bool)
    keys = [f"k{i:03d}" for i in range(n)]
    cfg = rules(epsilon=0.1, phash_max_distance=None, exact=False, block_size=64)
    columns = (np.zeros(n, np.int64), np.zeros(n), np.ones(n))
    got = dd.dedup_entries(rows, labels, primary, dd.Rows.of(keys, half, keys, *columns), cfg)
    want = dd.dedup_entries(rows, labels, primary, dd.Rows.of(keys, half.astype(np.float32), keys, *columns), cfg)
    assert (got.reason == want.reason).all() and (got.dup_of == want.dup_of).all() and (got.reason != "").sum() > 0


def test_a_bucket_writes_its_rows_and_removed_border_copies_only(tmp_path):
    """A kept border copy decides nothing in the merge, so the bucket's part leaves it out (at 10M
    they were 3 of every 4.5 entries the driver read); a removed one names what removed it."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from denseforge.pipeline.dedup_phase import _dedup_bucket
    from denseforge.stages.embed import embedding_table
    from denseforge.storage import write_arrow_atomic

    a = np.zeros(8, np.float32)
    a[0] = 1.0
    b = a.copy()
    b[1] = 0.1  # cosine 0.995 to a
    c = np.zeros(8, np.float32)
    c[2] = 1.0
    x = _unit(np.stack([a, b, c, c + a * 0.001]))
    keys = ["a", "b", "c", "d"]  # b: a border copy removed as a copy of a; d: a kept border copy
    table = embedding_table(
        keys,
        [0, 0, 1, 1],
        x,
        {
            "sha256": pa.array(keys),
            "phash": pa.array([0] * 4),
            "width": pa.array([640] * 4),
            "height": pa.array([480] * 4),
        },
        dtype="float16",
    )
    table = (
        table.append_column("clusters", pa.array([[3], [3], [3], [5]]))
        .append_column("centroid_sim", pa.array([0.9, 0.8, 0.7, 0.1], pa.float32()))
        .append_column("primary", pa.array([True, False, True, False]))
        .append_column("home", pa.array([0, 1, 0, 3]))
    )
    (tmp_path / "bucket").mkdir()
    write_arrow_atomic(tmp_path / "bucket" / "s0001-0.arrow", table)
    write_arrow_atomic(tmp_path / "bucket" / "s0000-0.arrow", table)  # a lost shuffler's file: not read
    cfg = rules(**SEMANTIC_ONLY, block_size=16)
    result = _dedup_bucket(tmp_path / "bucket", ["s0001"], tmp_path / "parts", 0, 2, cfg, dd.SelectConfig())
    assert result["entries"] == 4
    assert sorted(p.name for p in (tmp_path / "parts").iterdir()) == ["00000", "00001"]  # partition: home % 2
    part = pq.read_table(tmp_path / "parts" / "00000" / "00000.parquet").to_pylist()
    assert [(r["key"], r["primary"], r["reason"], r["dup_of"], r["home"]) for r in part] == [
        ("a", True, "", None, 0),
        ("c", True, "", None, 0),
    ]
    part = pq.read_table(tmp_path / "parts" / "00001" / "00000.parquet").to_pylist()
    assert [(r["key"], r["primary"], r["reason"], r["dup_of"], r["dup_home"]) for r in part] == [
        ("b", False, dd.SEMANTIC, "a", 0)  # sent to its own row's partition, naming where "a" lives
    ]


def test_the_phase_decides_as_dedup_all_and_ships_a_row_once_per_bucket(tmp_path):
    """Assignment, bucket tasks and the merge give every key the decision `dd.dedup_all` gives in
    one process, on a two-level index whose border rows fall both inside their own coarse cell
    and in other cells; a row travels once to each bucket it has entries in (its in-cell border
    clusters ride in the same bucket row)."""
    import pyarrow as pa

    from denseforge.pipeline.dedup_phase import (
        NodeWriter,
        _assign_pieces,
        _bucket_entries,
        _dedup_bucket,
        _merge_and_select,
    )
    from denseforge.pipeline.rundir import RunDir
    from denseforge.stages.embed import embedding_table, embeddings_matrix, write_embeddings_file
    from denseforge.storage import read_arrow, read_parquet

    rng = np.random.default_rng(5)
    base = _unit(rng.normal(size=(400, 16)) + np.repeat(rng.normal(size=(8, 16)) * 2, 50, axis=0))
    x = np.concatenate([base, _unit(base[:80] + rng.normal(scale=0.03, size=(80, 16)))])
    x = x[rng.permutation(len(x))]
    keys = [f"{i:04d}" for i in range(len(x))]
    index = dd.train_kmeans(x, 25, niter=10, seed=0, two_level_above=4)  # 5 coarse cells
    assert index.coarse is not None
    rd = RunDir(tmp_path / "run")
    files = []
    for unit, lo in enumerate((0, 240)):
        files.append(tmp_path / f"{unit:05d}.parquet")
        part = slice(lo, lo + 240)
        write_embeddings_file(
            files[-1],
            embedding_table(
                keys[part],
                [unit] * 240,
                x[part],
                {
                    "sha256": pa.array(keys[part]),
                    "phash": pa.array([0] * 240),
                    "width": pa.array([640] * 240),
                    "height": pa.array([480] * 240),
                },
            ),
        )
    empty = tmp_path / "empty.parquet"  # a unit whose images all failed: its column type differs
    write_embeddings_file(empty, embedding_table([], [], np.zeros((0, 16), np.float32), {}))
    writer = NodeWriter(rd, "w0000")  # one node's: two tasks' rows, one file per bucket
    calls = ([files[0], empty], [files[1]])
    assert sum(writer.append(_assign_pieces(call, index, 3, 0.2, 2)) for call in calls) > len(x)
    written = writer.finish()
    assert written == (sum(f.stat().st_size for f in rd.buckets.rglob("*.arrow")), 3)
    assert not list(rd.buckets.rglob(".*"))  # no staging file left
    cfg = rules(**SEMANTIC_ONLY, block_size=64)
    in_cell_pairs = 0
    for b in range(3):
        assert [f.name for f in rd.bucket(b).iterdir()] == ["w0000-0.arrow"]
        t = read_arrow(rd.bucket(b) / "w0000-0.arrow")
        assert len(set(t.column("key").to_pylist())) == t.num_rows  # once per bucket
        in_cell_pairs += sum(len(c) > 1 for c in t.column("clusters").to_pylist())
        rows, clusters, _ = _bucket_entries(t)
        assert set(index.cell_of(clusters) % 3) == {b}
        _dedup_bucket(rd.bucket(b), ["w0000"], rd.bucket_parts, b, 2, cfg, dd.SelectConfig())
    assert in_cell_pairs > 0  # the case the list column is for occurs

    _merge_and_select(rd, 2, dd.SelectConfig(), in_process=True)
    merged = {r["key"]: r for r in read_parquet(rd.decisions).to_pylist()}
    xq = embeddings_matrix(embedding_table(keys, [0] * len(x), x, {}))  # the float16 vectors the phase stores
    labels, sims, extra = dd.assign_clusters(xq, index, border=0.2, border_clusters=2)
    ref = dd.dedup_all(
        labels,
        dd.Rows.of(keys, xq, keys, np.zeros(len(x), np.int64), sims, np.full(len(x), 640 * 480)),
        rules(epsilon=0.05, phash_max_distance=None, exact=False, block_size=64),
        extra=extra,
    )
    assert (ref.reason == dd.SEMANTIC).sum() >= 70 and (extra >= 0).any()
    assert [merged[k]["reason"] for k in keys] == list(ref.reason)
    assert [merged[k]["dup_of"] for k in keys] == [keys[d] if d >= 0 else None for d in ref.dup_of]
    assert [merged[k]["cluster"] for k in keys] == list(labels)


def _planted_units(tmp_path, units=2, rows=240):
    """Embeddings files of planted near-copies (their keys, vectors, the files)."""
    import pyarrow as pa

    from denseforge.stages.embed import embedding_table, write_embeddings_file

    rng = np.random.default_rng(5)
    n, copies = units * rows, units * rows // 6
    centres = rng.normal(size=(8, 16)) * 2
    base = _unit(rng.normal(size=(n - copies, 16)) + centres[rng.integers(0, 8, n - copies)])
    x = np.concatenate([base, _unit(base[:copies] + rng.normal(scale=0.03, size=(copies, 16)))])
    x = x[rng.permutation(len(x))]
    keys = [f"{i:04d}" for i in range(len(x))]
    files = []
    for unit in range(units):
        files.append(tmp_path / f"{unit:05d}.parquet")
        part = slice(unit * rows, (unit + 1) * rows)
        extra = {"sha256": pa.array(keys[part]), "phash": pa.array([0] * rows)}
        extra |= {"width": pa.array([640] * rows), "height": pa.array([480] * rows)}
        write_embeddings_file(files[-1], embedding_table(keys[part], [unit] * rows, x[part], extra))
    return keys, x, files


class _DiesOnce:
    """Stands in for `NodeWriter`: its first append anywhere kills its process, as a lost node would."""

    def __init__(self, rd, name):
        from denseforge.pipeline.dedup_phase import NodeWriter

        self.inner, self.marker = NodeWriter(rd, name), rd.root / "died"

    def append(self, pieces):
        import os

        if not self.marker.exists():
            self.marker.touch()
            os._exit(1)
        return self.inner.append(pieces)

    def finish(self):
        return self.inner.finish()


def test_a_lost_node_writer_is_replaced_and_every_task_it_held_runs_again(tmp_path, monkeypatch):
    """A node lost in the shuffle: the tasks whose rows its writer held run again for a new one,
    and the bucket tasks read only the files of writers that finished, so every row is in its
    buckets exactly once."""
    import ray

    from denseforge.pipeline import dedup_phase
    from denseforge.pipeline.rundir import RunDir
    from denseforge.storage import read_arrow

    keys, x, files = _planted_units(tmp_path, units=4, rows=100)
    index = dd.train_kmeans(x, 12, niter=5, seed=0)
    monkeypatch.setattr(dedup_phase, "ASSIGN_TASK_ROWS", 100)  # a task per unit
    tasks = dedup_phase._assignment_tasks(files, [100] * 4)
    rd = RunDir(tmp_path / "run")
    rd.root.mkdir()
    monkeypatch.setattr(dedup_phase, "NodeWriter", _DiesOnce)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        shuffle = dedup_phase._Shuffle(rd)
        written, count, names = shuffle.run(tasks, ray.put(index), 3, dd.DedupConfig(border=0.0))
    finally:
        ray.shutdown()
    assert (rd.root / "died").exists() and names == ["w0001"] and count == 3 and shuffle.lost == 1
    shipped = [k for f in rd.buckets.rglob("*.arrow") for k in read_arrow(f).column("key").to_pylist()]
    assert sorted(shipped) == sorted(keys)  # border 0: each row in exactly one bucket, none lost, none twice
    assert written == sum(f.stat().st_size for f in rd.buckets.rglob("*.arrow"))


def test_assignment_tasks_group_consecutive_units_to_about_the_task_size(monkeypatch):
    from denseforge.pipeline import dedup_phase

    monkeypatch.setattr(dedup_phase, "ASSIGN_TASK_ROWS", 25)
    files = [f"{u}.parquet" for u in range(6)]
    assert dedup_phase._assignment_tasks(files, [10, 10, 10, 0, 30, 5]) == [
        ["0.parquet", "1.parquet", "2.parquet"],
        ["3.parquet", "4.parquet"],
        ["5.parquet"],
    ]
    assert dedup_phase._assignment_tasks([], []) == []


ISOTROPIC_4000_256_SEED3 = "f570287487e5d4af"  # the generator's vectors before the corpus had kinds


def test_the_hierarchical_corpus_has_its_stated_cosines_and_the_isotropic_one_is_unchanged():
    from denseforge.pipeline.bench.dedup import Corpus, planted_embeddings

    flat = Corpus(dim=256, seed=3)
    x, group = planted_embeddings(4_000, flat)
    assert hashlib.sha256(x.tobytes()).hexdigest()[:16] == ISOTROPIC_4000_256_SEED3  # the figures stay comparable
    deep = Corpus("hierarchical", dim=256, seed=3, topics_per_broad=10)
    rng = np.random.default_rng(0)
    centres = deep.centres(rng, 200)
    assert np.allclose(np.linalg.norm(centres, axis=1), 16.0, atol=1e-3)  # norm sqrt(dim)
    unit = centres / 16.0
    cos = unit @ unit.T
    close = np.sort(cos, axis=1)[:, -2]  # each topic's nearest other topic: a sibling in its broad topic
    assert 0.5 < float(np.median(close)) < 0.8 and float(np.median(cos)) < 0.1  # siblings ~0.64, strangers ~0
    y, g = planted_embeddings(4_000, deep)
    copies = np.flatnonzero(np.bincount(g)[g] > 1)
    first = {}
    for i in copies:
        first.setdefault(g[i], i)
    pairs = [(i, first[g[i]]) for i in copies if first[g[i]] != i]
    assert 0.97 < float(np.median([y[a] @ y[b] for a, b in pairs])) < 0.99  # a copy to its original ~0.98
    assert deep.describe()["cosine"] == {"copy_to_original": 0.98, "original_to_topic": 0.71, "topic_to_broad": 0.8}


def test_an_earlier_runs_image_claims_first_and_a_new_copy_points_at_it():
    """run --against: whatever the keep policy says, the earlier run's image stays (it is written
    already) and the new copy is removed as its duplicate; ranks count only this run's rows."""
    x = _unit(np.array([[1, 0], [1, 0.01], [0, 1]], dtype=np.float32))
    rows = dd.Rows.of(
        ["old#k", "n1", "n2"],
        x,
        ["s0", "s1", "s2"],
        [0, 1 << 40, 7],
        [0.1, 0.9, 0.5],
        [10, 99, 30],
        earlier=np.array([True, False, False]),
    )
    res = dd.dedup_entries(
        np.arange(3),
        np.zeros(3, np.int64),
        np.array([False, True, True]),
        rows,
        rules(epsilon=0.05, phash_max_distance=None, keep="largest_image"),
    )
    assert list(res.reason) == ["", dd.SEMANTIC, ""] and list(res.dup_of) == [-1, 0, -1]
    assert res.rank[2] == 0  # the earlier image takes no rank of this run's
    alone = dd.Rows.of(rows.keys, rows.vectors, rows.sha256, rows.phash, rows.centroid_sim, rows.area)
    without = dd.dedup_cluster(alone, rules(epsilon=0.05, phash_max_distance=None, keep="largest_image"))
    assert list(without.reason) == [dd.SEMANTIC, "", ""]  # alone, the larger new image would have won


def test_a_copy_of_an_earlier_runs_image_keeps_its_dup_of_through_the_merge(tmp_path):
    old = "/runs/old#000000000003"
    entries = [
        _entry("a", 1, dd.EXACT, old),
        _entry("b", 1, dd.NEAR, "a", dup_home=0),  # a copy of a copy: followed to the earlier image
        _entry("c", 1),
        _entry("c", 2, dd.SEMANTIC, "/runs/old#000000000007", primary=False),  # removed as a border copy
    ]
    merged, counts, _ = _merge(tmp_path, [[entries]])
    assert {k: (r["reason"], r["dup_of"]) for k, r in merged.items()} == {
        "a": (dd.EXACT, old),
        "b": (dd.NEAR, old),
        "c": (dd.SEMANTIC, "/runs/old#000000000007"),
    }
    assert counts["of_earlier"] == 3
