import pytest

from denseforge.experts.base import clip_box
from denseforge.stages.perceive import iou, merge_detections, sanitize


def test_sanitize_clips_boxes_and_drops_invalid_ones():
    found = [
        {"label": "dog", "score": 0.9, "box": [-5, 2, 50, 300]},
        {"label": "cat", "score": 0.8, "box": [60, 10, 20, 40]},
        {"label": "void", "score": 0.7, "box": [200, 200, 300, 300]},
        {"label": "nan", "score": float("nan"), "box": [1, 1, 2, 2]},
    ]
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
    a = [
        {"label": "dog", "score": 0.9, "box": [10, 10, 110, 110]},
        {"label": "cat", "score": 0.8, "box": [0, 0, 20, 20]},
    ]
    b = [
        {"label": "dog", "score": 0.6, "box": [12, 8, 112, 108]},
        {"label": "dog", "score": 0.5, "box": [300, 300, 320, 320]},
    ]
    agreed = merge_detections({"a": a, "b": b}, iou_threshold=0.65, min_votes=2)
    assert len(agreed) == 1 and agreed[0]["label"] == "dog" and agreed[0]["sources"] == ["a", "b"]
    assert agreed[0]["score"] == 0.9 and 10 < agreed[0]["box"][0] < 12
    union = merge_detections({"a": a, "b": b}, min_votes=1)
    assert sorted(o["label"] for o in union) == ["cat", "dog", "dog"]
    strict = merge_detections({"a": a, "b": b}, min_votes=1, thresholds={"b": 0.7})
    assert all(o["sources"] == ["a"] for o in strict)


def test_perceive_settings_defaults_and_bounds_are_the_documented_ones():
    from pydantic import ValidationError

    from denseforge.stages.perceive import ExpertSpec, PerceiveConfig

    spec = ExpertSpec(plugin="yolox")
    assert (spec.name, spec.options, spec.resources, spec.score_threshold, spec.max_error_rate, spec.instance) == (
        None,
        {},
        {},
        0.0,
        0.05,
        "yolox",
    )
    assert ExpertSpec(plugin="yolox", name="det").instance == "det"
    for key, good in [
        ("score_threshold", 0.0),
        ("score_threshold", 1.0),
        ("max_error_rate", 0.0),
        ("max_error_rate", 1.0),
        ("max_error_rate", None),
    ]:
        assert getattr(ExpertSpec(plugin="p", **{key: good}), key) == good
    for key, bad in [
        ("score_threshold", -0.01),
        ("score_threshold", 1.01),
        ("max_error_rate", -0.01),
        ("max_error_rate", 1.01),
    ]:
        with pytest.raises(ValidationError):
            ExpertSpec(plugin="p", **{key: bad})
    cfg = PerceiveConfig()
    assert (cfg.enabled, cfg.experts, cfg.on_error, cfg.merge_iou, cfg.merge_min_votes) == (False, [], "keep", 0.65, 1)
    assert (
        PerceiveConfig(merge_iou=1.0).merge_iou,
        PerceiveConfig(on_error="reject").on_error,
        PerceiveConfig(on_error="keep").on_error,
        PerceiveConfig(merge_min_votes=1).merge_min_votes,
    ) == (1.0, "reject", "keep", 1)
    for key, bad in [("merge_iou", 0.0), ("merge_iou", 1.01), ("merge_min_votes", 0), ("on_error", "drop")]:
        with pytest.raises(ValidationError):
            PerceiveConfig(**{key: bad})
    with pytest.raises(
        ValidationError, match=r"Value error, perceive.experts: instance names must be unique, repeated: a, b \["
    ):
        PerceiveConfig(experts=[{"plugin": "a"}, {"plugin": "b"}, {"plugin": "x", "name": "a"}, {"plugin": "b"}])
    with pytest.raises(
        ValidationError, match=r"Value error, perceive.enabled needs at least one entry in perceive.experts \["
    ):
        PerceiveConfig(enabled=True)
    assert PerceiveConfig(enabled=False, experts=[]).experts == []


def test_sanitize_counts_what_it_clips_and_drops_and_keeps_extra_keys():
    counts = {"boxes_clipped": 1, "boxes_dropped": 2, "dropped_nonfinite_score": 3}
    clean = sanitize(
        [
            {"label": "dog", "score": 1, "box": [-5, 2, 50, 300], "track": 7},
            {"label": "gone", "score": 0.5, "box": [200, 200, 300, 300]},
            {"label": "inf", "score": float("inf"), "box": [1, 1, 2, 2]},
            {"label": "ok", "score": 0.5, "box": [1, 1, 2, 2]},
            {"label": "nobox", "score": 0.25},
            {"label": "fine", "score": 0.5, "box": [1.234, 1, 2, 2]},
        ],
        "tags",
        100,
        80,
        counts,
    )
    assert clean == [
        {"label": "dog", "score": 1.0, "box": [0.0, 2.0, 50.0, 80.0], "track": 7},
        {"label": "ok", "score": 0.5, "box": [1.0, 1.0, 2.0, 2.0]},
        {"label": "nobox", "score": 0.25},
        {"label": "fine", "score": 0.5, "box": [1.23, 1.0, 2.0, 2.0]},
    ]  # rounded, not clipped
    assert type(clean[0]["score"]) is float
    assert counts == {"boxes_clipped": 2, "boxes_dropped": 3, "dropped_nonfinite_score": 4}
    assert sanitize([{"label": "a", "score": 0.5, "box": [1, 1, 2, 2]}], "objects", 10, 10) == [
        {"label": "a", "score": 0.5, "box": [1.0, 1.0, 2.0, 2.0]}
    ]  # no counts dict: fine
    with pytest.raises(TypeError, match=r"^an observation is a str, expected a dict$"):
        sanitize(["x"], "tags", 10, 10)
    with pytest.raises(TypeError, match=r"^expected a list of observations, got str$"):
        sanitize("x", "tags", 10, 10)


def test_iou_exact_values():
    assert iou([0, 0, 10, 10], [0, 0, 10, 10]) == 1.0
    assert iou([0, 0, 10, 10], [10, 0, 20, 10]) == 0.0  # touching edges
    assert iou([0, 0, 10, 10], [0, 0, 10, 5]) == 0.5
    assert iou([0, 0, 10, 10], [5, 5, 15, 15]) == 25 / 175
    assert iou([2, 2, 2, 2], [2, 2, 2, 2]) == 0.0  # no area at all
    assert iou([0, 0, 10, 10], [0, 20, 10, 30]) == 0.0  # apart on y only
    assert iou([0, 0, 0.5, 0.5], [0, 0, 0.5, 0.5]) == 1.0  # smaller than a pixel


def test_iou_voting_at_its_threshold_same_label_only_one_box_per_expert():
    a = [{"label": "dog", "score": 0.9, "box": [0, 0, 10, 10]}, {"label": "dog", "score": 0.8, "box": [0, 0, 10, 6]}]
    b = [{"label": "dog", "score": 0.6, "box": [0, 0, 10, 5]}, {"label": "cat", "score": 0.7, "box": [0, 0, 10, 10]}]
    at = merge_detections({"a": a, "b": b}, iou_threshold=0.5, min_votes=1)
    # a's first dog takes b's dog (IoU exactly 0.5) but not a's own second dog; the cat stays apart
    assert [(o["label"], o["score"], o["sources"]) for o in at] == [
        ("dog", 0.9, ["a", "b"]),
        ("dog", 0.8, ["a"]),
        ("cat", 0.7, ["b"]),
    ]
    assert at[0]["box"] == [0.0, 0.0, 10.0, round((0.9 * 10 + 0.6 * 5) / 1.5, 2)]
    above = merge_detections({"a": a, "b": b}, iou_threshold=0.51, min_votes=1)
    assert [(o["label"], o["sources"]) for o in above] == [("dog", ["a"]), ("dog", ["a", "b"]), ("cat", ["b"])]
    assert above[1]["box"] == [0.0, 0.0, 10.0, round((0.8 * 6 + 0.6 * 5) / 1.4, 2)]  # IoU 50/60 with a's second
    assert merge_detections({"a": a, "b": b}, iou_threshold=0.5, min_votes=2) == [at[0]]
    # a lone box that fails the vote does not end the voting; the better-scored expert leads its group
    lone = [
        {"label": "cat", "score": 0.95, "box": [50, 50, 60, 60]},
        {"label": "dog", "score": 0.3, "box": [0, 0, 10, 10]},
    ]
    [dog] = merge_detections({"a": lone, "b": [{"label": "dog", "score": 0.6, "box": [0, 0, 10, 10]}]}, min_votes=2)
    assert (dog["score"], dog["sources"]) == (0.6, ["a", "b"])
    # a box exactly at its expert's threshold counts
    assert [o["label"] for o in merge_detections({"a": lone}, thresholds={"a": 0.3})] == ["cat", "dog"]


def test_observations_by_kind_folds_staged_outputs_into_their_kind():
    from denseforge.stages.perceive import observations_by_kind

    assert observations_by_kind({"objects@a": [1], "tags": [3], "objects@b": [2]}) == {"objects": [1, 2], "tags": [3]}


def test_circular_consumes_is_a_config_error_naming_the_experts(monkeypatch):
    from denseforge.errors import ConfigError
    from denseforge.experts.base import Expert
    from denseforge.pipeline.config import parse_config
    from denseforge.stages import perceive

    class Eggs(Expert):
        name, kind, consumes = "eggs", "eggs", ("hens",)

        def __call__(self, batch):
            return [[] for _ in batch]

    class Hens(Eggs):
        name, kind, consumes = "hens", "hens", ("eggs",)

    class Farm(Eggs):
        name, kind, consumes = "farm", "eggs", ()

    class Cook(Eggs):
        name, kind, consumes = "cook", "meals", ("eggs", "hens", "salt")

    monkeypatch.setattr(perceive, "load_expert_class", {"eggs": Eggs, "hens": Hens, "farm": Farm, "cook": Cook}.get)
    two = parse_config(
        {"input": {"path": "x"}, "perceive": {"enabled": True, "experts": [{"plugin": "hens"}, {"plugin": "farm"}]}}
    )
    assert [spec.instance for spec, _, _ in perceive.plan_experts(two.perceive)] == ["farm", "hens"]
    lacking = parse_config({"input": {"path": "x"}, "perceive": {"enabled": True, "experts": [{"plugin": "cook"}]}})
    with pytest.raises(
        ConfigError, match=r"^perceive.experts: cook consumes eggs, hens, salt, which no configured expert produces$"
    ):
        perceive.plan_experts(lacking.perceive)
    cfg = parse_config(
        {"input": {"path": "x"}, "perceive": {"enabled": True, "experts": [{"plugin": "eggs"}, {"plugin": "hens"}]}}
    )
    with pytest.raises(ConfigError, match=r"^perceive.experts: circular consumes between eggs, hens$"):
        perceive.plan_experts(cfg.perceive)
    grouped = parse_config(
        {
            "input": {"path": "x"},
            "perceive": {
                "enabled": True,
                "experts": [
                    {"plugin": "eggs", "group": "coop"},
                    {"plugin": "hens", "group": "coop"},
                    {"plugin": "farm"},
                ],
            },
        }
    )
    with pytest.raises(ConfigError, match=r"^perceive.experts: circular consumes between eggs, hens$"):
        perceive.plan_experts(grouped.perceive)  # inside one group too


def _items(n, size=(40, 30)):
    import io

    from PIL import Image

    from denseforge.stages.sample import Sample
    from denseforge.stages.stage import Item

    out = io.BytesIO()
    Image.new("RGB", size, "white").save(out, format="PNG")
    return [Item(0, Sample(key=f"k{i}", width=size[0], height=size[1], sha256="0"), out.getvalue()) for i in range(n)]


def test_expert_stage_stages_output_under_kind_at_instance_and_refuses_a_wrong_length():
    from denseforge.experts.base import Expert
    from denseforge.stages.perceive import ExpertStage
    from denseforge.stages.stage import Resources

    class Boxer(Expert):
        name, kind = "boxer", "objects"
        reply = None
        seen: list = []

        def __call__(self, batch):
            self.seen = [item.observations for item in batch]
            return (
                self.reply
                if self.reply is not None
                else [[{"label": "dog", "score": 0.5, "box": [1, 1, 50, 50]}] for _ in batch]
            )

    stage = ExpertStage(Boxer(), "det")
    assert (stage.name, stage.staged, stage.expert.resources) == ("det", "objects@det", Boxer.default_resources)
    assert ExpertStage.error_reason == "expert_error"
    assert ExpertStage(Boxer(), "d2", Resources(num_cpus=3)).expert.resources.num_cpus == 3
    stage.setup()
    items = _items(2)
    items[1].sample.experts = {"tags@t": [{"label": "cat", "score": 0.9}], "tags@u": [{"label": "pet", "score": 0.8}]}
    assert stage.process(items) == [None, None]
    assert stage.expert.seen == [{}, {"tags": [{"label": "cat", "score": 0.9}, {"label": "pet", "score": 0.8}]}]
    assert items[0].sample.experts == {"objects@det": [{"label": "dog", "score": 0.5, "box": [1.0, 1.0, 40.0, 30.0]}]}
    assert items[0].counts == {"boxes_clipped": 1} and items[0].sample.provenance["experts"] == {
        "det": {"plugin": "boxer"}
    }
    stage.expert.reply = [[]]
    with pytest.raises(TypeError, match=r"^expert det returned list of length 1 for 2 images$"):
        stage.process(_items(2))
    stage.expert.reply = "nope"
    with pytest.raises(TypeError, match=r"^expert det returned str of length \? for 2 images$"):
        stage.process(_items(2))
    stage.expert.reply = [[{"label": "x"}], []]
    verdicts = stage.process(_items(2))
    assert (
        isinstance(verdicts[0], TypeError) and str(verdicts[0]).startswith("invalid output: ") and verdicts[1] is None
    )


def test_merge_applies_each_instances_threshold_and_names_sources_only_when_several_share_a_kind():
    from denseforge.stages.perceive import MergeStage, PerceiveConfig

    cfg = PerceiveConfig(experts=[{"plugin": "a", "score_threshold": 0.5}, {"plugin": "b"}, {"plugin": "c"}])
    items = _items(1)
    items[0].sample.experts = {
        "tags@a": [{"label": "x", "score": 0.4}, {"label": "y", "score": 0.5}],
        "tags@b": [{"label": "z", "score": 0.1}],
        "ocr@c": [{"text": "hi", "score": 0.9}],
        "tags@r": [{"label": "noise", "score": 0.9}],
    }
    assert (MergeStage.name, MergeStage.Options) == ("merge", PerceiveConfig)
    assert MergeStage(cfg, untrained=frozenset({"r"})).process(items) == [None]
    assert items[0].sample.experts == {
        "tags": [{"label": "y", "score": 0.5, "source": "a"}, {"label": "z", "score": 0.1, "source": "b"}],
        "ocr": [{"text": "hi", "score": 0.9}],
    }
    assert items[0].sample.provenance["experts"]["r"] == {
        "excluded": "random weights: 1 observation(s) kept out of the evidence"
    }


def test_merge_votes_when_two_detectors_saw_objects_and_passes_one_detector_through():
    from denseforge.stages.perceive import MergeStage, PerceiveConfig

    dog = {"label": "dog", "score": 0.8, "box": [0.0, 0.0, 10.0, 10.0]}
    items = _items(2)
    items[0].sample.experts = {"objects@a": [dog], "objects@b": [{**dog, "score": 0.4}]}
    items[1].sample.experts = {"objects@a": [dog]}
    MergeStage(PerceiveConfig(merge_min_votes=2)).process(items)
    assert items[0].sample.experts == {"objects": [{**dog, "sources": ["a", "b"]}]}
    assert items[1].sample.experts == {"objects": [dog]}  # one detector: its boxes as they are


def test_the_ocr_gate_keeps_misreads_of_text_free_photos_out_of_the_evidence():
    """Regression: the demo's coffee photo read "8" (0.60, a box over ~80 % of the image) and the
    astronaut "K" (0.74); both reached the caption as visible text."""
    from denseforge.stages.perceive import MergeStage, PerceiveConfig

    items = _items(1)
    w, h = items[0].sample.width, items[0].sample.height
    lines = [
        {"text": "8", "score": 0.60, "box": [0.05 * w, 0, 0.9 * w, h]},  # low score
        {"text": "K", "score": 0.74, "box": [0, 0, 0.05 * w, 0.06 * h]},  # low score
        {"text": "字", "score": 0.9, "box": [0, 0, 0.05 * w, 0.05 * h]},  # one character, not sure enough
        {"text": "OK", "score": 0.99, "box": [0, 0, 0.8 * w, 0.5 * h]},  # two letters over 40 % of the image
        {"text": "8", "score": 0.98, "box": [0, 0, 0.05 * w, 0.05 * h]},  # a confident small digit: kept
        {"text": "Open 24 hours", "score": 0.99, "box": [0, 0, 0.9 * w, 0.5 * h]},  # a real sign: kept
    ]
    items[0].sample.experts = {"ocr": lines}
    assert MergeStage(PerceiveConfig(experts=[{"plugin": "rapidocr"}])).process(items) == [None]
    assert [line["text"] for line in items[0].sample.experts["ocr"]] == ["8", "Open 24 hours"]
    assert items[0].counts == {"ocr_low_score": 2, "ocr_single_char": 1, "ocr_implausible_box": 1}
    loose = PerceiveConfig(experts=[{"plugin": "rapidocr"}], ocr_gate={"min_score": 0.5, "short_max_area": 1})
    items = _items(1)
    items[0].sample.experts = {"ocr": lines[:2]}
    MergeStage(loose).process(items)  # configurable: one character still needs 0.95
    assert items[0].sample.experts["ocr"] == [] and items[0].counts == {"ocr_single_char": 2}
