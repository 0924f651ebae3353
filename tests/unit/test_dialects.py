"""Every model's box convention, checked by round trip (our box -> dialect text -> parsed back ->
pixels, within half a unit of the dialect) and against independently computed values: the
Qwen2.5-VL sizes against the processor's own `smart_resize`, LLaVA-1.5's square padding by hand,
the framework layouts field by field against their documented examples."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from denseforge.errors import ConfigError
from denseforge.pipeline.export_run import ExportSpec, _absent_entity, check_records
from denseforge.stages import export as ex
from denseforge.stages.dialects import DIALECTS, Placeholders, Qwen25VL, dialect
from denseforge.stages.sample import Grounding, Region, Sample

from .test_export import street

ALL = sorted(DIALECTS)


def _one_box(box, width, height, phrase="thing") -> Sample:
    caption = f"a {phrase} here"
    return Sample(
        key="k",
        width=width,
        height=height,
        sha256="0",
        caption=caption,
        experts={"objects": [{"label": phrase, "score": 0.9, "box": box}]},
        grounding=[Grounding(phrase=phrase, span=(2, 2 + len(phrase)), box=box, source="objects/0")],
    )


def _within_half_a_unit(d, box, back, width, height):
    """Every coordinate within half a unit, but one Qwen2.5-VL clamped to side - 1 (within one)."""
    ux, uy = d.unit(width, height)
    assert len(back) == len(box) == 4, back  # zip below would accept a box that lost coordinates
    clamped = d.decode([v - 1 for v in d.resized(width, height)] * 2, width, height) if d.name == "qwen2.5-vl" else []
    return all(
        abs(a - b) <= (1.0 if clamped and abs(b - clamped[i]) < 1e-6 else 0.5) * (ux if i % 2 == 0 else uy) + 1e-6
        for i, (a, b) in enumerate(zip(box, back, strict=True))
    )


def _round_trip(name, box, width, height):
    d = dialect(name)
    sample = _one_box(box, width, height)
    plain, refs = d.parse(ex.grounded_text(sample, d))
    assert plain == sample.caption
    # llava-1.5 delimits no phrase; florence-2's phrase is the text since the last box ("a thing")
    assert [r.phrase for r in refs] == [{"llava-1.5": None, "florence-2": "a thing"}.get(name, "thing")]
    [values] = refs[0].boxes
    return d, d.decode(values, width, height)


EDGES = [  # (box, width, height): whole image, edges, sub-unit boxes, non-square, smart_resize changing the aspect
    ([0.0, 0.0, 640.0, 480.0], 640, 480),
    ([0.0, 0.0, 0.4, 0.4], 640, 480),
    ([639.6, 479.7, 640.0, 480.0], 640, 480),
    ([100.2, 3.0, 100.5, 3.2], 5000, 37),
    ([1.0, 1000.0, 49.0, 1999.5], 50, 2000),
    ([13.0, 7.0, 91.0, 55.0], 97, 61),
    ([2.0, 2.0, 3.0, 3.0], 20, 20),  # smaller than min_pixels: Qwen2.5-VL upsizes
    ([0.0, 10.0, 7999.0, 3999.0], 8000, 4000),  # larger than max_pixels: Qwen2.5-VL downsizes
]


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("box,width,height", EDGES)
def test_round_trip_at_edges_sub_unit_boxes_and_odd_shapes(name, box, width, height):
    d, back = _round_trip(name, box, width, height)
    if name == "kosmos2":  # patches cover the box, by less than a patch
        pw, ph = width / 32, height / 32
        assert (
            back[0] <= box[0] + 1e-6
            and back[1] <= box[1] + 1e-6
            and back[2] >= box[2] - 1e-6
            and back[3] >= box[3] - 1e-6
        )
        assert box[0] - back[0] < pw + 1e-6 and back[2] - box[2] < pw + 1e-6
        assert box[1] - back[1] < ph + 1e-6 and back[3] - box[3] < ph + 1e-6
    else:
        assert _within_half_a_unit(d, box, back, width, height), (box, back)


rel_boxes = st.tuples(st.floats(0, 1), st.floats(0, 1), st.floats(0, 1), st.floats(0, 1)).filter(
    lambda b: b[0] < b[2] and b[1] < b[3]
)
sizes = st.tuples(st.integers(16, 5000), st.integers(16, 5000)).filter(lambda s: max(s) / min(s) < 200)


@pytest.mark.parametrize("name", [n for n in ALL if n != "kosmos2"])  # kosmos2's covering property: test_properties
@given(rel=rel_boxes, size=sizes)
@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture]
)
def test_round_trip_lands_within_half_a_unit(name, rel, size):
    w, h = size
    box = [rel[0] * w, rel[1] * h, rel[2] * w, rel[3] * h]
    d, back = _round_trip(name, box, w, h)
    assert _within_half_a_unit(d, box, back, w, h)


@given(
    size=st.tuples(st.integers(1, 9000), st.integers(1, 9000)).filter(lambda s: max(s) / min(s) <= 200),
    bounds=st.sampled_from([(None, None), (256 * 28 * 28, 1280 * 28 * 28), (3136, 589824), (100_000, 200_000)]),
)
@settings(max_examples=400, deadline=None)
def test_qwen25_sizes_equal_the_processors_smart_resize(size, bounds):
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

    w, h = size
    d = dialect("qwen2.5-vl", *bounds)
    expected_h, expected_w = smart_resize(h, w, factor=28, min_pixels=d.min_pixels, max_pixels=d.max_pixels)
    assert d.resized(w, h) == (expected_w, expected_h)


def test_qwen25_defaults_are_the_released_processors():
    assert (Qwen25VL().min_pixels, Qwen25VL().max_pixels) == (3136, 12845056)


def test_qwen25_coordinates_are_pixels_of_the_resized_image():
    # 640 x 480 -> smart_resize 644 x 476 (23 and 17 patches of 28); x scales by 644/640, y by 476/480
    d = dialect("qwen2.5-vl")
    assert d.resized(640, 480) == (644, 476)
    assert d.encode([10.0, 20.0, 330.0, 400.0], 640, 480) == [10, 20, 332, 397]  # 332.06, 396.67
    # a smaller max_pixels shrinks the frame: 640 x 480 with max 200,000 px: beta = sqrt(307200 / 200000)
    # = 1.2394; 640 / beta = 516.4 -> 18 x 28 = 504; 480 / beta = 387.3 -> 13 x 28 = 364
    small = dialect("qwen2.5-vl", max_pixels=200_000)
    assert small.resized(640, 480) == (504, 364)
    assert small.encode([10.0, 20.0, 330.0, 400.0], 640, 480) == [8, 15, 260, 303]  # 7.875, 15.17, 259.9, 303.3


def test_relative_dialects_are_thousandths_of_the_image():
    for name in ("qwen-vl", "qwen2-vl", "qwen3-vl"):
        assert dialect(name).encode([10.0, 20.0, 330.0, 400.0], 640, 480) == [16, 42, 516, 833], name
    # InternVL's own conversion truncates: int(x / w * 1000) of 15.6, 41.7, 515.6, 833.3
    assert dialect("internvl").encode([10.0, 20.0, 330.0, 400.0], 640, 480) == [15, 41, 515, 833]
    assert dialect("internvl").encode([0.0, 0.0, 640.0, 480.0], 640, 480) == [0, 0, 1000, 1000]


def test_qwen25_clamps_to_side_minus_one_as_its_own_conversion_does():
    """Qwen's convert_to_qwen25vl_format: round(x * new_w / w), then min(.., new_w - 1)."""
    d = dialect("qwen2.5-vl")  # 640 x 480 -> 644 x 476
    assert d.encode([0.0, 0.0, 640.0, 480.0], 640, 480) == [0, 0, 643, 475]
    assert d.encode([639.6, 479.7, 640.0, 480.0], 640, 480) == [643, 475, 643, 475]


def test_llava15_pads_the_shorter_side_to_a_centred_square():
    d = dialect("llava-1.5")
    # 640 x 480: side 640, 80 px above and below; y 20 -> (20 + 80) / 640 = 0.156 -> 0.16
    assert d.encode([10.0, 20.0, 330.0, 400.0], 640, 480) == [0.02, 0.16, 0.52, 0.75]
    # 300 x 600 (tall): side 600, 150 px left and right; x 0 -> 0.25, x 300 -> 0.75
    assert d.encode([0.0, 0.0, 300.0, 600.0], 300, 600) == [0.25, 0.0, 0.75, 1.0]
    assert d.box_text([0.25, 0.0, 0.75, 1.0]) == "[0.25, 0.00, 0.75, 1.00]"


def test_florence2_floors_into_1000_bins_and_reads_bin_centres():
    d = dialect("florence-2")
    assert d.encode([10.0, 20.0, 640.0, 480.0], 640, 480) == [15, 41, 999, 999]  # 15.6, 41.7, clamped
    assert d.decode([15, 41, 999, 999], 640, 480) == pytest.approx([9.92, 19.92, 639.68, 479.76])


def test_internvl_parses_several_boxes_of_one_phrase():
    d = dialect("internvl")
    plain, [ref] = d.parse("two <ref>dogs</ref><box>[[1, 2, 3, 4], [5, 6, 7, 8]]</box> play")
    assert plain == "two dogs play" and ref.phrase == "dogs" and ref.boxes == [[1, 2, 3, 4], [5, 6, 7, 8]]


@pytest.fixture
def sample():
    s = street("rocket", "a Falcon 9 rocket")
    s.regions = [Region(box=[10.0, 20.0, 330.0, 400.0], caption="a brown dog on grass")]
    return s


@pytest.mark.parametrize("name", ALL)
def test_every_task_reads_back_to_its_boxes(name, sample):
    d = dialect(name)
    turns = ex.turns(sample, d, ex.TASKS, absent="Eiffel Tower")
    assert [t.task for t in turns] == ["caption", "refer", "refer", "refer", "region", "kvg", "kvg"]
    for turn in turns:
        back = [d.decode(v, 640, 480) for v in d.parse_boxes(turn.prompt) + d.parse_boxes(turn.answer)]
        assert len(back) == len(turn.boxes()), (turn.task, turn.prompt, turn.answer)
        for box, b in zip(turn.boxes(), back, strict=True):
            assert len(b) == 4, (turn.task, b)
            if name == "kosmos2":
                unit = d.unit(640, 480)
                assert all(abs(x - y) <= unit[i % 2] + 1e-6 for i, (x, y) in enumerate(zip(box, b, strict=True)))
            else:
                assert _within_half_a_unit(d, box, b, 640, 480), (turn.task, box, b)
    region = turns[4]
    assert region.answer == "a brown dog on grass" and region.boxes() == [[10.0, 20.0, 330.0, 400.0]]
    assert turns[-1].answer == "There is no Eiffel Tower in the image." and turns[-1].boxes() == []


def test_qwen25_grounding_answers_are_json_bbox_2d(sample):
    turns = ex.turns(sample, dialect("qwen2.5-vl"), ["refer"])
    dogs = turns[0].answer
    assert dogs.startswith("```json\n[\n") and dogs.endswith("\n]\n```")
    items = json.loads(dogs.removeprefix("```json").removesuffix("```"))
    assert items == [
        {"bbox_2d": [10, 20, 332, 397], "label": "dogs"},
        {"bbox_2d": [403, 99, 604, 298], "label": "dogs"},
    ]


def test_kvg_asks_for_fine_grained_names_only(sample):
    assert [p for p, _ in ex.kvg_entities(sample)] == ["Falcon 9 rocket"]  # not "dogs" (the label), not OCR
    recent = ["Golden Retriever", "Falcon 9 rocket", "red London bus"]
    assert _absent_entity(recent, sample) == "red London bus"
    sample.caption += " A red London bus waits."
    assert (
        _absent_entity(recent, sample) == "Golden Retriever"
    )  # the rocket is here; dogs are, retrievers' words are not labels


def test_ms_swift_layout_matches_its_documented_grounding_example(sample):
    """ms-swift's grounding records: `messages` with `<ref-object>`/`<bbox>`, `images`, and
    `objects` {ref, bbox, bbox_type: real, image_id} — one ref per `<ref-object>`, one bbox per `<bbox>`."""
    d = Placeholders()
    for i, turn in enumerate(ex.turns(sample, d, ex.TASKS, absent="Eiffel Tower")):
        rec = ex.record("ms-swift", sample, "images/a.jpg", turn, i)
        assert set(rec) == {"id", "messages", "images", "objects"} and rec["images"] == ["images/a.jpg"]
        user, assistant = rec["messages"]
        assert user["role"] == "user" and user["content"].startswith("<image>") and assistant["role"] == "assistant"
        objects = rec["objects"]
        assert set(objects) == {"ref", "bbox", "bbox_type", "image_id"} and objects["bbox_type"] == "real"
        text = user["content"] + assistant["content"]
        assert text.count("<ref-object>") == len(objects["ref"]) and text.count("<bbox>") == len(objects["bbox"])
        assert objects["image_id"] == [0] * len(objects["bbox"])
        assert objects["bbox"] == [[round(v, 2) for v in b] for b in turn.boxes()]
    caption = ex.record("ms-swift", sample, "images/a.jpg", ex.turns(sample, d, ["caption"])[0], 0)
    assert caption["messages"][1]["content"] == (
        "Two <ref-object><bbox><bbox> run past a <ref-object><bbox> under a sign reading <ref-object><bbox>."
    )
    assert caption["objects"]["ref"] == ["dogs", "Falcon 9 rocket", "STOP"]
    odd = ex.Turn("refer", "p", "a", [("cup", [[10.123, 20.456, 30.789, 40.001]])])
    assert ex.record("ms-swift", sample, "i.jpg", odd, 0)["objects"]["bbox"] == [[10.12, 20.46, 30.79, 40.0]]


def test_llama_factory_layout_and_dataset_info(sample):
    turn = ex.turns(sample, dialect("qwen2-vl"), ["refer"])[0]
    rec = ex.record("llama-factory", sample, "images/a.jpg", turn, 0)
    assert rec["messages"] == [
        {"role": "user", "content": "<image>" + turn.prompt},
        {"role": "assistant", "content": turn.answer},
    ]
    assert rec["images"] == ["images/a.jpg"]
    info = ex.llama_factory_info("denseforge_qwen2-vl", "qwen2-vl.llama-factory.jsonl")["denseforge_qwen2-vl"]
    assert info["file_name"] == "qwen2-vl.llama-factory.jsonl"
    assert info["formatting"] == "sharegpt" and info["columns"] == {"messages": "messages", "images": "images"}
    assert info["tags"] == {
        "role_tag": "role",
        "content_tag": "content",
        "user_tag": "user",
        "assistant_tag": "assistant",
    }
    assert ex.record_text("llama-factory", rec) == (turn.prompt, turn.answer)


def test_sharegpt_layout_is_llava_and_internvl_conversations(sample):
    turn = ex.turns(sample, dialect("internvl"), ["caption"])[0]
    rec = ex.record("sharegpt", sample, "images/a.jpg", turn, 0)
    assert rec["id"] == "000000000007-caption-0" and (rec["width"], rec["height"]) == (640, 480)
    assert sorted(rec) == ["conversations", "height", "id", "image", "width"] and rec["image"] == "images/a.jpg"
    assert rec["conversations"][0] == {"from": "human", "value": "<image>\n" + turn.prompt}
    assert rec["conversations"][1] == {"from": "gpt", "value": turn.answer}
    assert ex.record_text("sharegpt", rec) == (turn.prompt, turn.answer)


def test_check_flags_a_convention_that_does_not_read_back(sample, tmp_path):
    """Write Qwen3-VL numbers (0-1000) and read them as Qwen2.5-VL (resized pixels): the check
    must see it; the right reading passes."""
    (tmp_path / "images").mkdir()
    Image.new("RGB", (640, 480), "grey").save(tmp_path / "images" / "a.jpg")
    wrong, right = ExportSpec("qwen3-vl"), ExportSpec("qwen2.5-vl")
    turns = ex.turns(sample, wrong.dialect(), ["refer"])
    target = tmp_path / "data.jsonl"
    target.write_text(
        "".join(json.dumps(ex.record("sharegpt", sample, "images/a.jpg", t, i)) + "\n" for i, t in enumerate(turns))
    )
    kept = [(sample, "images/a.jpg", t) for t in turns]
    assert all(r["ok"] for r in check_records(wrong, wrong.dialect(), target, kept, tmp_path))
    flagged = check_records(right, right.dialect(), target, kept, tmp_path)
    assert not any(r["ok"] for r in flagged[:2])  # the dogs and the rocket land elsewhere
    assert (tmp_path / flagged[0]["picture"]).exists()
    assert Image.open(tmp_path / flagged[0]["picture"]).size == (640 * 2 + 8, 480)


def test_check_reads_the_first_records_and_flags_one_that_lost_its_boxes(sample, tmp_path):
    """Regression: `--check N` on a longer file, and a record with fewer boxes than it was made from,
    raised instead of being checked (zip(strict=True))."""
    (tmp_path / "images").mkdir()
    Image.new("RGB", (640, 480), "grey").save(tmp_path / "images" / "a.jpg")
    spec = ExportSpec("qwen2.5-vl")
    turns = ex.turns(sample, spec.dialect(), ["refer"])
    assert len(turns) >= 2
    records = [ex.record("sharegpt", sample, "images/a.jpg", t, i) for i, t in enumerate(turns)]
    records[0]["conversations"][1]["value"] = "nothing to see"  # its boxes are gone
    target = tmp_path / "data.jsonl"
    target.write_text("".join(json.dumps(r) + "\n" for r in records))
    checked = check_records(spec, spec.dialect(), target, [(sample, "images/a.jpg", turns[0])], tmp_path)
    assert len(checked) == 1 and not checked[0]["ok"]


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"format": "qwen5"}, "--format qwen5: choose from"),
        ({"format": "coco", "layout": "ms-swift"}, "--layout applies to the model dialects"),
        ({"format": "internvl", "layout": "axolotl"}, "--layout axolotl: choose from"),
        ({"format": "internvl", "tasks": ("caption", "vqa")}, "--task vqa: choose from caption, refer, region, kvg"),
        ({"format": "internvl", "tasks": ()}, "--task (none)"),
    ],
)
def test_bad_export_options_say_what_to_choose(kwargs, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        ExportSpec(**kwargs)


def test_every_dialects_records_are_exactly_the_reviewed_ones(sample):
    """Every prompt and answer of every task in every dialect, for one sample, as reviewed by eye
    against each model's documented format (tests/unit/dialect_records.json). A change of wording
    or convention shows here; regenerate the file only after checking the new text."""
    from pathlib import Path

    expected = json.loads((Path(__file__).parent / "dialect_records.json").read_text(encoding="utf-8"))
    for name in [*ALL, "ms-swift"]:
        d = Placeholders() if name == "ms-swift" else dialect(name)
        got = [[t.task, t.prompt, t.answer] for t in ex.turns(sample, d, ex.TASKS, absent="Eiffel Tower")]
        assert got == expected[name], name


def test_units_are_the_pixels_one_step_of_each_dialect_spans():
    """The check's tolerance is half of these, so they are asserted exactly (640 x 480 image)."""
    expected = {
        "qwen-vl": (0.64, 0.48),
        "qwen2-vl": (0.64, 0.48),
        "qwen3-vl": (0.64, 0.48),
        "internvl": (0.64, 0.48),
        "florence-2": (0.64, 0.48),
        "qwen2.5-vl": (640 / 644, 480 / 476),
        "llava-1.5": (6.4, 6.4),
        "kosmos2": (40.0, 30.0),
    }  # Kosmos-2: two patches, since its read-back covers the box by up to one
    for name, (ux, uy) in expected.items():
        assert dialect(name).unit(640, 480) == pytest.approx((ux, uy)), name


def test_json_answers_keep_unicode_and_group_boxes_of_one_label():
    d = dialect("qwen3-vl")
    answer = d.answer("Café Zoë sign", [[1, 2, 3, 4], [5, 6, 7, 8]])
    assert "Café Zoë sign" in answer  # not \\u00e9: the label reads as written
    _, refs = d.parse(answer + " and " + d.answer("dog", [[9, 9, 10, 10]]).replace("```json", "").replace("```", ""))
    assert refs[0].phrase == "Café Zoë sign" and refs[0].boxes == [[1, 2, 3, 4], [5, 6, 7, 8]]
    _, [one, other] = d.parse(
        "```json\n"
        + json.dumps([{"bbox_2d": [1, 1, 2, 2], "label": "a"}, {"bbox_2d": [3, 3, 4, 4], "label": "b"}])
        + "\n```"
    )
    assert (one.phrase, one.boxes, other.phrase, other.boxes) == ("a", [[1, 1, 2, 2]], "b", [[3, 3, 4, 4]])


def test_qwen25_refuses_the_aspect_ratios_the_processor_refuses():
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

    d = dialect("qwen2.5-vl")
    assert d.resized(2000, 10) == tuple(reversed(smart_resize(10, 2000)))  # exactly 200: allowed by both
    for w, h in ((2010, 10), (10, 2010)):
        with pytest.raises(ValueError):
            smart_resize(h, w)
        with pytest.raises(ValueError, match="aspect ratio 201 exceeds the processor's 200"):
            d.resized(w, h)
