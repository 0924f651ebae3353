import json

import pytest

from denseforge.stages import export as ex
from denseforge.stages.dialects import dialect
from denseforge.stages.ground import ground_mentions
from denseforge.stages.sample import Sample

from ..conftest import blank_sample


def street(third: str = "car", phrase: str = "a red car") -> Sample:
    """Two dogs, a third object and a STOP sign on a 640 x 480 image, grounded."""
    s = Sample(
        key="000000000007",
        width=640,
        height=480,
        sha256="0" * 64,
        experts={
            "objects": [
                {"label": "dog", "score": 0.9, "box": [10.0, 20.0, 330.0, 400.0]},
                {"label": "dog", "score": 0.8, "box": [400.0, 100.0, 600.0, 300.0]},
                {"label": third, "score": 0.7, "box": [0.0, 300.0, 640.0, 480.0]},
            ],
            "ocr": [{"text": "STOP", "score": 0.99, "box": [500.0, 10.0, 600.0, 60.0], "polygon": []}],
        },
    )
    s.caption = f"Two dogs run past {phrase} under a sign reading STOP."
    s.grounding = ground_mentions(s.caption, s.experts)
    return s


@pytest.fixture
def sample():
    return street()


def test_qwen_vl_round_trip(sample):
    qwen = dialect("qwen-vl")
    text = ex.grounded_text(sample, qwen)
    assert text.startswith("Two <ref>dogs</ref><box>(16,42),(516,833)</box><box>(625,208),(938,625)</box> run")
    plain, refs = qwen.parse(text)
    assert plain == sample.caption
    assert [r.phrase for r in refs] == ["dogs", "car", "STOP"]
    back = [qwen.decode(b, 640, 480) for r in refs for b in r.boxes]
    originals = [o["box"] for o in sample.experts["objects"]] + [sample.experts["ocr"][0]["box"]]
    for box, orig in zip(back, originals, strict=True):
        assert all(
            abs(v - o) <= 0.5 * (640 if k % 2 == 0 else 480) / 1000 + 1e-9
            for k, (v, o) in enumerate(zip(box, orig, strict=True))
        )


def test_kosmos2_round_trip_within_a_bin(sample):
    kosmos = dialect("kosmos2")
    text = ex.grounded_text(sample, kosmos)
    assert "<phrase>dogs</phrase><object><patch_index_" in text and "</delimiter_of_multi_objects/>" in text
    plain, refs = kosmos.parse(text)
    assert plain == sample.caption and [r.phrase for r in refs] == ["dogs", "car", "STOP"]
    car = kosmos.decode(refs[1].boxes[0], 640, 480)
    orig = sample.experts["objects"][2]["box"]
    assert all(abs(a - b) <= 640 / 32 for a, b in zip(car, orig, strict=True))


def test_llava_record(sample):
    record = ex.llava_record(sample, "images/x.jpg")
    assert record["conversations"][0]["value"].startswith("<image>\n")
    assert record["conversations"][1] == {"from": "gpt", "value": sample.caption}
    json.dumps(record)


def test_coco_loads_in_pycocotools(sample, tmp_path):
    pycocotools = pytest.importorskip("pycocotools.coco")
    data = ex.coco_dataset([(sample, "images/a.jpg")])
    path = tmp_path / "coco.json"
    path.write_text(json.dumps(data))
    coco = pycocotools.COCO(str(path))
    dogs = coco.getCatIds(catNms=["dog"])
    anns = coco.loadAnns(coco.getAnnIds(imgIds=[1], catIds=dogs))
    back = sorted([a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2], a["bbox"][1] + a["bbox"][3]] for a in anns)
    assert back == sorted(o["box"] for o in sample.experts["objects"] if o["label"] == "dog")
    assert data["captions"][0]["caption"] == sample.caption


def test_refcoco_refs_tie_phrases_to_object_boxes(sample):
    refs = list(ex.refcoco_refs([(sample, "images/a.jpg")]))
    assert [r["sentences"][0]["sent"] for r in refs] == ["dogs", "dogs", "car"]
    for r in refs:
        x, y, w, h = r["bbox"]
        assert sample.caption[r["span"][0] : r["span"][1]] == r["sentences"][0]["sent"]
        assert [x, y, x + w, y + h] in [o["box"] for o in sample.experts["objects"]]


def test_exported_coordinates_carry_no_float_noise():
    from denseforge.stages.export import coco_dataset, refcoco_refs
    from denseforge.stages.sample import Grounding

    box = [12.3, 0.1, 329.2, 25.7]  # 329.2 - 12.3 = 316.90000000000003 in floats
    sample = blank_sample(
        width=400,
        height=300,
        caption="a dog",
        experts={"objects": [{"label": "dog", "score": 0.9, "box": box}]},
        grounding=[Grounding(phrase="dog", span=(2, 5), box=box, source="objects/0")],
    )
    [ann] = coco_dataset([(sample, "k.jpg")])["annotations"]
    [ref] = list(refcoco_refs([(sample, "k.jpg")]))
    assert ann["bbox"] == ref["bbox"] == [12.3, 0.1, 316.9, 25.6] and ann["area"] == round(316.9 * 25.6, 2)
    assert all(len(repr(v).split(".")[-1]) <= 2 for v in ann["bbox"] + ref["bbox"])


def test_coco_export_keeps_cocos_own_category_ids():
    from denseforge.stages.export import coco_dataset
    from denseforge.stages.sample import Sample

    objects = [
        {"label": label, "score": 0.9, "box": [0, 0, 5, 5]} for label in ("cup", "person", "toothbrush", "llama", "dog")
    ]
    data = coco_dataset([(Sample(key="k", width=10, height=10, sha256="0", experts={"objects": objects}), "k.jpg")])
    assert {c["name"]: c["id"] for c in data["categories"]} == {
        "person": 1,
        "dog": 18,
        "cup": 47,
        "toothbrush": 90,
        "llama": 91,
    }
    assert [a["category_id"] for a in data["annotations"]] == [47, 1, 90, 91, 18]


def test_coco_ids_are_cocos_80_of_90_with_its_ten_gaps():
    """COCO 2017 numbers its 80 categories 1..90 and leaves out exactly these ten ids."""
    ids = ex.COCO_IDS
    assert len(ids) == 80 and list(ids) == sorted(set(ids)) and ids[0] == 1 and ids[-1] == 90
    assert set(range(1, 91)) - set(ids) == {12, 26, 29, 30, 45, 66, 68, 69, 71, 83}
    names = ex.coco_category_ids()
    assert (names["person"], names["traffic light"], names["stop sign"], names["backpack"], names["hair drier"]) == (
        1,
        10,
        13,
        27,
        89,
    )


def _grounded(caption, spans):
    from denseforge.stages.sample import Grounding

    s = Sample(key="k", width=1000, height=1000, sha256="0", caption=caption)
    s.grounding = [
        Grounding(phrase=caption[a:b], span=(a, b), box=[a, 0, b, 10], source=f"objects/{i}")
        for i, (a, b) in enumerate(spans)
    ]
    return s


def test_marked_spans_at_the_start_side_by_side_and_overlapping():
    qwen = dialect("qwen-vl")
    # a span at 0, one that starts where the last ended, one inside it (dropped), one overlapping its end (dropped)
    s = _grounded("Dogs cats run", [(0, 4), (4, 9), (5, 9), (7, 13)])
    assert ex.grounded_text(s, qwen) == (
        "<ref>Dogs</ref><box>(0,0),(4,10)</box><ref> cats</ref><box>(4,0),(9,10)</box> run"
    )
    # the same span twice: one phrase with both boxes
    s = _grounded("Dogs run", [(0, 4), (0, 4)])
    assert ex.grounded_text(s, qwen) == "<ref>Dogs</ref><box>(0,0),(4,10)</box><box>(0,0),(4,10)</box> run"


def test_a_sample_without_a_caption_exports_no_caption_turn_and_empty_text():
    s = Sample(key="k", width=10, height=10, sha256="0", caption=None)
    assert ex.grounded_text(s, dialect("qwen-vl")) == ""
    assert ex.turns(s, dialect("qwen-vl"), ["caption", "refer"]) == []
    assert ex.llava_record(s, "k.jpg")["conversations"][1] == {"from": "gpt", "value": ""}
    turn = ex.Turn("refer", "p", "a")
    assert (turn.refs, turn.boxes()) == ([], [])


def test_kvg_entities_skip_ocr_and_the_bare_label_with_determiners_and_plurals():
    from denseforge.stages.sample import Grounding

    s = blank_sample(
        caption="STOP: the hot dogs and a Chicago hot dog",
        experts={
            "objects": [
                {"label": "hot dog", "score": 0.9, "box": [0, 0, 5, 5]},
                {"label": "hot dog", "score": 0.9, "box": [5, 5, 9, 9]},
            ],
            "ocr": [{"text": "STOP", "score": 1.0, "box": [9, 9, 10, 10]}],
        },
    )
    s.grounding = [
        Grounding(phrase="STOP", span=(0, 4), box=[9, 9, 10, 10], source="ocr/0"),
        Grounding(phrase="the hot dogs", span=(6, 18), box=[0, 0, 5, 5], source="objects/0"),
        Grounding(phrase="Chicago hot dog", span=(25, 40), box=[5, 5, 9, 9], source="objects/1"),
    ]
    assert ex.kvg_entities(s) == [("Chicago hot dog", [[5, 5, 9, 9]])]


def test_xywh_rounds_every_coordinate_to_a_hundredth():
    assert ex.xywh([1.234, 5.678, 10.111, 20.999]) == [1.23, 5.68, 8.88, 15.32]


def test_llava_record_is_exactly_llavas_layout():
    s = Sample(key="k7", width=10, height=10, sha256="0", caption="A dog.")
    assert ex.llava_record(s, "images/k7.jpg") == {
        "id": "k7",
        "image": "images/k7.jpg",
        "conversations": [
            {"from": "human", "value": "<image>\nDescribe this image in detail."},
            {"from": "gpt", "value": "A dog."},
        ],
    }


def test_coco_dataset_and_refcoco_refs_exactly_on_two_images():
    from denseforge.stages.sample import Grounding

    a = blank_sample(
        key="ka",
        width=40,
        height=30,
        caption="A dog and STOP.",
        experts={
            "objects": [{"label": "dog", "score": 0.5, "box": [1, 2, 11, 22]}],
            "ocr": [{"text": "STOP", "score": 1.0, "box": [20, 2, 30, 8]}],
        },
        grounding=[
            Grounding(phrase="dog", span=(2, 5), box=[1, 2, 11, 22], source="objects/0"),
            Grounding(phrase="STOP", span=(10, 14), box=[20, 2, 30, 8], source="ocr/0"),
        ],
    )
    b = blank_sample(
        key="kb",
        width=20,
        height=10,
        caption=None,
        experts={"objects": [{"label": "dog", "score": 0.7, "box": [0, 0, 4, 5]}]},
        grounding=[Grounding(phrase="dog", span=(0, 3), box=[0, 0, 4, 5], source="objects/0")],
    )
    data = ex.coco_dataset([(a, "a.jpg"), (b, "b.jpg")])
    assert data == {
        "info": {"description": "exported by denseforge"},
        "images": [
            {"id": 1, "file_name": "a.jpg", "width": 40, "height": 30, "denseforge_key": "ka"},
            {"id": 2, "file_name": "b.jpg", "width": 20, "height": 10, "denseforge_key": "kb"},
        ],
        "annotations": [
            {
                "id": 1,
                "image_id": 1,
                "category_id": 18,
                "bbox": [1, 2, 10, 20],
                "area": 200,
                "iscrowd": 0,
                "score": 0.5,
            },
            {"id": 2, "image_id": 2, "category_id": 18, "bbox": [0, 0, 4, 5], "area": 20, "iscrowd": 0, "score": 0.7},
        ],
        "categories": [{"id": 18, "name": "dog"}],
        "captions": [{"id": 1, "image_id": 1, "caption": "A dog and STOP."}],
    }
    fields = ("ref_id", "image", "key", "bbox", "sentences", "span", "source")
    dog = [{"sent": "dog"}]
    assert list(ex.refcoco_refs([(a, "a.jpg"), (b, "b.jpg")])) == [
        dict(zip(fields, (1, "a.jpg", "ka", [1, 2, 10, 20], dog, [2, 5], "objects/0"), strict=True)),
        dict(zip(fields, (2, "b.jpg", "kb", [0, 0, 4, 5], dog, [0, 3], "objects/0"), strict=True)),
    ]


def test_coco_area_is_rounded_to_a_hundredth_too():
    s = blank_sample(
        width=40,
        height=30,
        experts={"objects": [{"label": "dog", "score": 0.5, "box": [1.234, 5.678, 10.111, 20.999]}]},
    )
    [ann] = ex.coco_dataset([(s, "k.jpg")])["annotations"]
    assert (ann["bbox"], ann["area"]) == ([1.23, 5.68, 8.88, 15.32], 136.04)  # 8.88 x 15.32 = 136.0416


def test_refcoco_skips_an_ocr_grounding_and_goes_on_to_the_objects_after_it():
    from denseforge.stages.sample import Grounding

    s = blank_sample(
        width=40,
        height=30,
        caption="STOP by a dog",
        grounding=[
            Grounding(phrase="STOP", span=(0, 4), box=[0, 0, 4, 4], source="ocr/0"),
            Grounding(phrase="dog", span=(10, 13), box=[5, 5, 9, 9], source="objects/0"),
        ],
    )
    assert [r["sentences"] for r in ex.refcoco_refs([(s, "k.jpg")])] == [[{"sent": "dog"}]]
