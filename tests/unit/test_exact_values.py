"""Exact values where they can be reasoned out by hand: each test here kills a bug a mutation probe
planted and the looser tests let through (boundaries, weighted means, bins, which views, padding)."""

from __future__ import annotations

import io

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from denseforge.stages import dedup as dd
from denseforge.stages import export as ex
from denseforge.stages.dialects import Kosmos2
from denseforge.stages.ground import DETERMINERS, ground_mentions
from denseforge.stages.image_normalize import ImageNormalizer, ImageRejected
from denseforge.stages.perceive import merge_detections
from denseforge.stages.qa import QaConfig, assess
from denseforge.stages.regions import select_views
from denseforge.stages.sample import Grounding, Sample

from ..conftest import blank_sample


def _phash_pair(distance: int) -> np.ndarray:
    a = 0x0F0F_0F0F_0F0F_0F0F
    b = a ^ ((1 << distance) - 1)  # flip the lowest `distance` bits
    return np.array([a, b], dtype=np.uint64).astype(np.int64)


@pytest.mark.parametrize("distance, removed", [(3, True), (4, True), (5, False)])
def test_phash_threshold_is_inclusive_and_one_bit_more_is_distinct(distance, removed):
    res = dd.dedup_cluster(
        dd.Rows.of(
            ["a", "b"], np.zeros((2, 1), np.float32), ["x", "y"], _phash_pair(distance), np.zeros(2), np.ones(2)
        ),
        dd.DedupConfig(epsilon=None, phash_max_distance=4, keep="first_key", sweep=[]),
    )
    assert (res.reason[1] == dd.NEAR) is removed and res.reason[0] == dd.KEPT
    assert res.dup_of[1] == (0 if removed else -1)


def test_qa_reasons_each_fire_on_their_own_and_box_validity_is_a_share():
    s = blank_sample(experts={"objects": [{"label": "dog", "score": 1, "box": [0, 0, 9, 9]}]})
    s.caption = "a dog a dog a dog a dog a dog a dog"
    s.grounding = [
        Grounding(phrase="dog", span=(2, 5), box=[0, 0, 9, 9], source="objects/0"),
        Grounding(phrase="dog", span=(8, 11), box=[0, 0, 200, 9], source="objects/0"),  # outside
        Grounding(phrase="cat", span=(14, 17), box=[0, 0, 9, 9], source="objects/0"),  # wrong span
        Grounding(phrase="dog", span=(20, 23), box=[0, 0, 9, 9], source="objects/0"),
    ]
    report = assess(s, QaConfig(min_words=1, max_words=10, max_repetition=0.3))
    assert report.scores["box_validity"] == 0.5 and report.scores["words"] == 12.0
    assert report.reasons == ["too_long", "repetitive", "invalid_boxes"]
    assert report.scores["repetition"] == round(1 - 2 / 10, 4)  # 10 trigrams, 2 distinct


def test_our_own_pixel_limit_rejects_before_pillows():
    buf = io.BytesIO()
    Image.new("RGB", (100, 100), "red").save(buf, format="PNG")
    with pytest.raises(ImageRejected) as err:
        ImageNormalizer(max_image_pixels=9_999).normalize(buf.getvalue())  # Pillow's own limit is ~89M
    assert (
        err.value.reason == "decompression_bomb"
        and "100x100 = 10000 px exceeds ingest.max_image_pixels=9999" in err.value.detail
    )
    assert ImageNormalizer(max_image_pixels=10_000).normalize(buf.getvalue()).width == 100  # the limit itself passes


def test_kosmos_bins_on_both_axes_and_for_a_box_smaller_than_a_bin():
    # 640 x 480, 32 bins: a bin is 20 px wide and 15 px high
    s = blank_sample(
        width=640,
        height=480,
        caption="a dot here",
        grounding=[Grounding(phrase="dot", span=(2, 5), box=[45.0, 31.0, 52.0, 40.0], source="objects/0")],
    )
    kosmos = Kosmos2()
    text = ex.grounded_text(s, kosmos)
    # x 45..52 -> columns 2..2; y 31..40 -> rows 2..2: both corners in patch 2*32+2 = 66
    assert "<patch_index_0066><patch_index_0066>" in text
    _, [ref] = kosmos.parse(text)
    assert ref.phrase == "dot" and kosmos.decode(ref.boxes[0], 640, 480) == [40.0, 30.0, 60.0, 45.0]
    s.grounding = [Grounding(phrase="dot", span=(2, 5), box=[0.0, 0.0, 640.0, 480.0], source="objects/0")]
    assert "<patch_index_0000><patch_index_1023>" in ex.grounded_text(
        s, kosmos
    )  # the end bin of the edge is 31, not 32


def test_iou_voting_box_is_the_score_weighted_mean():
    a = {
        "det1": [{"label": "dog", "score": 0.9, "box": [10, 10, 110, 110]}],
        "det2": [{"label": "dog", "score": 0.3, "box": [14, 6, 114, 106]}],
    }
    [merged] = merge_detections(a, iou_threshold=0.65, min_votes=2)
    # (0.9 * 10 + 0.3 * 14) / 1.2 = 11.0, (0.9 * 10 + 0.3 * 6) / 1.2 = 9.0, ...
    assert merged["box"] == [11.0, 9.0, 111.0, 109.0] and merged["score"] == 0.9
    assert merged["sources"] == ["det1", "det2"]


def test_dynrefer_prefers_views_that_add_content_per_unit_of_context():
    # a flat grey image with detail only far from the region: only wide views change the pHash
    rng = np.random.default_rng(0)
    pixels = np.full((200, 200, 3), 128, np.uint8)
    pixels[:, 150:] = rng.integers(0, 255, (200, 50, 3), dtype=np.uint8)
    image = Image.fromarray(pixels)
    views = select_views(image, [40, 80, 80, 120], views=3)
    assert views.ts[0] == 0.0 and len(views.ts) == 3
    # views narrower than t = 0.5 stay inside the flat part (pHash distance 0): never chosen
    assert all(t >= 0.5 for t in views.ts[1:]), views.ts


@given(st.text(min_size=0, max_size=40), st.sampled_from(["stop", "STOP", "İstanbul", "straße", "ǅ"]))
@settings(max_examples=300, deadline=None)
def test_ocr_grounding_spans_lie_in_the_caption_and_match_the_text(prefix, word):
    caption = f"{prefix} sign reads {word.upper() if word.isascii() else word}"
    grounding = ground_mentions(caption, {"ocr": [{"text": word, "score": 1.0, "box": [0, 0, 1, 1]}]})
    for g in grounding:
        assert 0 <= g.span[0] < g.span[1] <= len(caption)
        assert caption[g.span[0] : g.span[1]] == g.phrase
        assert g.phrase.casefold() == word.casefold() or g.phrase.lower() == word.lower()


def test_the_istanbul_case_from_the_fuzzer():
    [g] = ground_mentions("İstanbul sign reads STOP", {"ocr": [{"text": "stop", "score": 1.0, "box": [0, 0, 1, 1]}]})
    assert (g.phrase, g.span) == ("STOP", (20, 24))


def _hierarchy_by_hand(x, index, border, m):
    """What `assign_clusters` must return for a hierarchy, by brute force: the nearest centroid of
    the nearest coarse cell, that cell's next centroids within the border, and the nearest
    centroid of each further cell within the border of the nearest cell."""
    labels, sims, extra = [], [], []
    for row in x:
        cells = np.argsort(-(index.coarse @ row), kind="stable")[: m + 1]
        cell_sims = index.coarse[cells] @ row
        members = index.cells[cells[0]]
        order = members[np.argsort(-(index.centroids[members] @ row), kind="stable")]
        best = float(index.centroids[order[0]] @ row)
        inner = [int(c) for c in order[1 : m + 1] if best - index.centroids[c] @ row <= border]
        outer = [
            int(index.cells[c][np.argmax(index.centroids[index.cells[c]] @ row)]) if cell_sims[0] - s <= border else -1
            for c, s in zip(cells[1:], cell_sims[1:], strict=True)
        ]
        labels.append(int(order[0]))
        sims.append(best)
        extra.append(inner + [-1] * (m - len(inner)) + outer + [-1] * (m - len(outer)))
    return np.array(labels), np.array(sims), np.array(extra)


def test_large_k_paths_hierarchical_training_and_two_level_assignment():
    rng = np.random.default_rng(1)
    centers = rng.normal(size=(40, 32)).astype(np.float32)
    x = centers[rng.integers(0, 40, 3000)] + 0.05 * rng.normal(size=(3000, 32)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    flat = dd.train_kmeans(x, 40, seed=0, two_level_above=10**9)
    tree = dd.train_kmeans(x, 40, seed=0, two_level_above=16)  # the path k > 4,096 takes
    assert flat.centroids.shape == (40, 32) and flat.coarse is None
    assert 36 <= len(tree) <= 40  # cells split in proportion, floors lose a few
    assert len(tree.coarse) == len(tree.cells) == 7  # ceil(sqrt(40))
    assert sorted(np.concatenate(tree.cells)) == list(range(len(tree)))
    for border, m in ((0.0, 2), (0.1, 2), (0.3, 1), (2.0, 3)):
        labels, sims, extra = dd.assign_clusters(x[:400], tree, batch=128, border=border, border_clusters=m)
        want_labels, want_sims, want_extra = _hierarchy_by_hand(x[:400], tree, border, m if border else 0)
        np.testing.assert_array_equal(labels, want_labels)
        np.testing.assert_allclose(sims, want_sims, atol=1e-5)
        np.testing.assert_array_equal(extra, want_extra)
    # planted copies land in one cluster whichever path trained it
    copies = x[:50] + 1e-4
    labels, _, _ = dd.assign_clusters(
        np.concatenate([x[:50], copies / np.linalg.norm(copies, axis=1, keepdims=True)]), tree
    )
    assert (labels[:50] == labels[50:]).all()


def test_two_level_assignment_finds_the_nearest_when_centroids_nest():
    """Four orthogonal directions with four centroids around each: the coarse level finds the
    direction, the search inside it the nearest centroid, as the flat search does."""
    rng = np.random.default_rng(2)
    fine = np.eye(32, dtype=np.float32)[:4].repeat(4, axis=0) + 0.08 * rng.normal(size=(16, 32)).astype(np.float32)
    fine /= np.linalg.norm(fine, axis=1, keepdims=True)
    x = fine[rng.integers(0, 16, 2000)] + 0.02 * rng.normal(size=(2000, 32)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    index = dd.CentroidIndex(fine, np.eye(32, dtype=np.float32)[:4], [np.arange(c * 4, c * 4 + 4) for c in range(4)])
    np.testing.assert_array_equal(dd.assign_clusters(x, index)[0], np.argmax(x @ fine.T, axis=1))
    # regression: float64 centroids were handed to FAISS as raw bytes and read as float32 garbage
    wide = dd.CentroidIndex(fine.astype(np.float64), np.eye(32)[:4], index.cells)
    labels, sims, _ = dd.assign_clusters(x, wide)
    np.testing.assert_array_equal(labels, np.argmax(x @ fine.T, axis=1))
    assert 0.9 < np.median(sims) <= 1.0


def test_two_level_dedup_keeps_the_recall_of_flat_assignment():
    """Regression: above 4,096 clusters, rows were assigned to the best centroid among the 8
    nearest coarse cells; two near-copies probing different cells got different clusters and
    planted-copy recall fell to 0.92 at 10M (0.991 here). Searched as trained, cell by cell with
    border cells, it keeps the flat path's recall."""
    from denseforge.pipeline.bench.dedup import Corpus, _score, planted_embeddings

    x, group = planted_embeddings(50_000, Corpus(seed=1), topics=1000)
    keys = np.char.zfill(np.arange(len(x)).astype(str), 9)
    recall = {}
    for path, above in (("flat", 10**9), ("two-level", 100)):  # 1,000 clusters: 32 coarse cells
        index = dd.train_kmeans(x, 1000, niter=10, seed=0, two_level_above=above, use_gpu=False)
        labels, sims, extra = dd.assign_clusters(x, index, border=0.02, border_clusters=2)
        res = dd.dedup_all(
            labels,
            dd.Rows.of(keys, x, keys, np.zeros(len(x), np.int64), sims, np.ones(len(x))),
            dd.DedupConfig(epsilon=0.05, phash_max_distance=None, exact=False, sweep=[]),
            extra=extra,
        )
        score = _score(res.reason, res.dup_of, group)
        assert score["precision"] == 1.0
        recall[path] = score["recall"]
    assert recall["two-level"] >= 0.998 and recall["flat"] >= 0.998, recall


def _captioned(caption: str, **experts) -> Sample:
    s = Sample(key="k", width=100, height=100, sha256="0", experts=experts)
    s.caption = caption
    return s


def test_qa_word_limits_are_inclusive_at_both_ends():
    five = _captioned("one two three four five")
    assert "too_short" not in assess(five, QaConfig(min_words=5)).reasons
    assert assess(five, QaConfig(min_words=6)).reasons == ["too_short"]
    assert "too_long" not in assess(five, QaConfig(max_words=5)).reasons
    assert assess(five, QaConfig(max_words=4)).reasons == ["too_long"]


def test_qa_hallucination_ocr_fidelity_and_clip_gates_at_their_thresholds():
    # "dog" and "car" claimed, only the dog seen (as a tag): hallucination 1/2
    s = _captioned("a dog and a car", tags=[{"label": "dog", "score": 0.9}])
    report = assess(s, QaConfig(min_words=1, max_hallucination=0.5))
    assert report.scores["hallucination"] == 0.5 and "hallucination" not in report.reasons
    assert "hallucination" in assess(s, QaConfig(min_words=1, max_hallucination=0.49)).reasons
    # an OCR line seen counts as evidence too ("STOP sign" names no COCO noun, "stop sign" is one)
    seen_by_ocr = _captioned("a stop sign", ocr=[{"text": "stop sign", "score": 0.9, "box": [0, 0, 1, 1]}])
    assert assess(seen_by_ocr, QaConfig(min_words=1)).scores["hallucination"] == 0.0
    # OCR fidelity: confident lines (score >= ocr_min_score, 2+ characters) reproduced in the caption
    ocr = [
        {"text": "OPEN", "score": 0.9, "box": [0, 0, 1, 1]},
        {"text": "EXIT", "score": 0.8, "box": [0, 0, 1, 1]},
        {"text": "faint", "score": 0.79, "box": [0, 0, 1, 1]},
        {"text": "x", "score": 1.0, "box": [0, 0, 1, 1]},
    ]
    s = _captioned("a sign that reads open", ocr=ocr)
    report = assess(s, QaConfig(min_words=1, min_ocr_fidelity=0.5, ocr_min_score=0.8))
    assert report.scores["ocr_fidelity"] == 0.5 and "ocr_missing" not in report.reasons
    assert "ocr_missing" in assess(s, QaConfig(min_words=1, min_ocr_fidelity=0.51, ocr_min_score=0.8)).reasons
    # CLIP: reject strictly below the threshold; no threshold, no reason
    s = _captioned("a dog", tags=[{"label": "dog", "score": 0.9}])
    assert "low_clip_score" not in assess(s, QaConfig(min_words=1, min_clip_score=0.2), clip_score=0.2).reasons
    assert "low_clip_score" in assess(s, QaConfig(min_words=1, min_clip_score=0.2), clip_score=0.19).reasons
    assert assess(s, QaConfig(min_words=1), clip_score=-0.9).reasons == []


def test_qa_stage_reads_the_earlier_stages_notes_and_rejects_with_the_first_reason():
    import json

    from denseforge.stages.qa import QaStage
    from denseforge.stages.stage import Item, Rejection

    ok = Item(0, _captioned("a long enough caption here"), b"")
    ok.sample.provenance = {"qa": {"clip": {"score": 0.3}}, "captioner": {"truncated": False}}
    cut = Item(0, _captioned("a"), b"")
    cut.sample.provenance = {"captioner": {"truncated": True}}
    verdicts = QaStage(QaConfig(min_words=2)).process([ok, cut])
    assert verdicts[0] is None and ok.sample.qa.scores["clip"] == 0.3 and ok.sample.qa.passed
    assert isinstance(verdicts[1], Rejection) and verdicts[1].reason == "too_short"
    assert json.loads(verdicts[1].detail)["reasons"] == ["too_short", "truncated_caption"]


@pytest.mark.parametrize(
    "noun, expected",
    [
        ("person", "people"),
        ("man", "men"),
        ("woman", "women"),
        ("child", "children"),
        ("mouse", "mice"),
        ("knife", "knives"),
        ("sheep", "sheep"),
        ("fish", "fish"),
        ("bus", "buses"),
        ("glass", "glasses"),
        ("skis", "skis"),
        ("scissors", "scissors"),
        ("tv", "tvs"),
        ("wine glass", "wine glasses"),
        ("box", "boxes"),
        ("bench", "benches"),
        ("brush", "brushes"),
        ("quiz", "quizes"),
        ("berry", "berries"),
        ("toy", "toys"),
        ("cat", "cats"),
        ("hot dog", "hot dogs"),
    ],
)
def test_plural_forms(noun, expected):
    from denseforge.stages.ground import plural

    assert plural(noun) == expected


@pytest.mark.parametrize("word", sorted(DETERMINERS))
def test_a_capitalised_determiner_is_not_part_of_the_proper_name(word):
    caption = f"{word.capitalize()} Golden Retriever sleeps."
    experts = {"objects": [{"label": "dog", "score": 0.9, "box": [0, 0, 5, 5]}]}
    [g] = ground_mentions(caption, experts, {"golden retriever": "dog"})
    assert g.phrase == "Golden Retriever" and caption[g.span[0] : g.span[1]] == g.phrase


def test_a_capitalised_word_that_is_not_a_determiner_stays_in_the_phrase():
    [g] = ground_mentions(
        "Falcon 9 rocket on the pad.", {"objects": [{"label": "rocket", "score": 0.9, "box": [0, 0, 5, 5]}]}
    )
    assert g.phrase == "Falcon 9 rocket"


def test_a_singular_mention_ties_to_the_largest_box_first():
    boxes = [[0, 0, 2, 2], [0, 0, 9, 9], [0, 0, 5, 5]]
    experts = {"objects": [{"label": "dog", "score": 0.9, "box": b} for b in boxes]}
    grounding = ground_mentions("a dog, a dog and a dog", experts)
    assert [g.source for g in grounding] == ["objects/1", "objects/2", "objects/0"]  # by area, largest first


def test_ocr_text_without_its_spaces_still_grounds_and_counts():
    """Regression: PP-OCR recognisers may drop spaces (PP-OCRv4: "OPEN24HOURS"); a caption that writes the sign
    as it looks ("Open 24 Hours") was an OCR miss for QA and got no OCR grounding."""
    from denseforge.stages.qa import QaConfig, assess

    experts = {"ocr": [{"text": "OPEN24HOURS", "score": 0.99, "box": [10.0, 10.0, 90.0, 30.0], "polygon": []}]}
    caption = "A shop sign says Open 24 Hours in red."
    [g] = ground_mentions(caption, experts)
    assert g.phrase == "Open 24 Hours" and caption[g.span[0] : g.span[1]] == g.phrase and g.source == "ocr/0"
    sample = Sample(key="k", width=100, height=100, sha256="0", caption=caption, experts=experts, grounding=[g])
    assert assess(sample, QaConfig(min_words=1)).scores["ocr_fidelity"] == 1.0
    sample.caption = "A shop sign says Open 42 Hours in red."
    assert assess(sample, QaConfig(min_words=1)).scores["ocr_fidelity"] == 0.0
