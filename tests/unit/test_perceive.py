import pytest

from denseforge.experts.base import clip_box
from denseforge.stages.perceive import iou, merge_detections, sanitize


def test_sanitize_clips_boxes_and_drops_invalid_ones():
    found = [{"label": "dog", "score": 0.9, "box": [-5, 2, 50, 300]},
             {"label": "cat", "score": 0.8, "box": [60, 10, 20, 40]},
             {"label": "void", "score": 0.7, "box": [200, 200, 300, 300]},
             {"label": "nan", "score": float("nan"), "box": [1, 1, 2, 2]}]
    clean = sanitize(found, "objects", 100, 80)
    assert [o["label"] for o in clean] == ["dog", "cat"]
    assert clean[0]["box"] == [0.0, 2.0, 50.0, 80.0] and clean[1]["box"] == [20.0, 10.0, 60.0, 40.0]
    with pytest.raises(ValueError):
        sanitize([{"label": "no score or box"}], "objects", 10, 10)
    with pytest.raises(TypeError):
        sanitize("not a list", "tags", 10, 10)
    assert sanitize([{"hue": 3}], "colors", 10, 10) == [{"hue": 3}]  # plugin kinds are free-form


def test_clip_box_and_iou():
    assert clip_box([1, 2, 3], 10, 10) is None
    assert clip_box([5, 5, 5, 9], 10, 10) is None
    assert iou([0, 0, 10, 10], [5, 0, 15, 10]) == pytest.approx(1 / 3)


def test_iou_voting_keeps_what_two_detectors_agree_on():
    a = [{"label": "dog", "score": 0.9, "box": [10, 10, 110, 110]}, {"label": "cat", "score": 0.8, "box": [0, 0, 20, 20]}]
    b = [{"label": "dog", "score": 0.6, "box": [12, 8, 112, 108]}, {"label": "dog", "score": 0.5, "box": [300, 300, 320, 320]}]
    agreed = merge_detections({"a": a, "b": b}, iou_threshold=0.65, min_votes=2)
    assert len(agreed) == 1 and agreed[0]["label"] == "dog" and agreed[0]["sources"] == ["a", "b"]
    assert agreed[0]["score"] == 0.9 and 10 < agreed[0]["box"][0] < 12
    union = merge_detections({"a": a, "b": b}, min_votes=1)
    assert sorted(o["label"] for o in union) == ["cat", "dog", "dog"]
    strict = merge_detections({"a": a, "b": b}, min_votes=1, thresholds={"b": 0.7})
    assert all(o["sources"] == ["a"] for o in strict)
