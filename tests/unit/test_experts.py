import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFont

from denseforge.errors import ConfigError, ModelLoadError
from denseforge.experts import ContractError, Expert, ExpertInput, check_expert
from denseforge.experts.clip_tags import ClipTagExpert, read_vocabulary
from denseforge.experts.contract import sample_images
from denseforge.experts.ocr import PaddleOcrExpert, RapidOcrExpert, join_words
from denseforge.experts.yolo import YoloExpert
from denseforge.pipeline.config import parse_config
from denseforge.pipeline.demo import load_photo
from denseforge.pipeline.flow import describe_plugins
from denseforge.stages.perceive import iou, load_expert_class, plan_experts

TINY_TAGS = {"model": "df-tiny-clip", "weights": "random", "threshold": 0.0, "device": "cpu"}


def render_text(lines, size=(640, 240), scale=1.0):
    """An image with text drawn at known places, and the drawn boxes (after an optional resize)."""
    img = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(img)
    boxes = []
    for text, xy, px in lines:
        font = ImageFont.load_default(size=px)
        draw.text(xy, text, fill="black", font=font)
        boxes.append([v * scale for v in draw.textbbox(xy, text, font=font)])
    if scale != 1.0:
        img = img.resize((round(size[0] * scale), round(size[1] * scale)), Image.Resampling.LANCZOS)
    return img, boxes


@pytest.fixture(scope="module")
def ocr():
    expert = RapidOcrExpert()
    expert.setup()
    return expert


@pytest.mark.parametrize(
    "lines, scale",
    [
        ([("DENSEFORGE", (30, 40), 48)], 1.0),
        ([("Hello world", (20, 20), 32), ("Line 2: 1234", (40, 140), 40)], 1.0),
        ([("small print", (10, 10), 22)], 1.0),
        ([("RESIZED TEXT", (30, 60), 56)], 0.6),
    ],
)
def test_rapidocr_reads_rendered_text_where_it_was_drawn(ocr, lines, scale):
    img, boxes = render_text(lines, scale=scale)
    [found] = ocr([ExpertInput("k", img)])
    assert len(found) == len(lines)
    for (text, _, _), box in zip(lines, boxes, strict=True):
        match = max(found, key=lambda o: iou(o["box"], box))
        assert match["text"].replace(" ", "") == text.replace(" ", "")
        assert iou(match["box"], box) >= 0.5 and match["score"] > 0.8 and len(match["polygon"]) == 4


def test_rapidocr_reads_a_spaced_line_as_one_line_with_its_spaces(ocr):
    """Regression: PP-OCRv4 read "OPEN 24 HOURS" as "OPEN24HOURS"; PP-OCRv6 reads the spaces but
    boxes a monospace line word by word, so the words are joined back into the line."""
    img = Image.new("RGB", (640, 160), "white")
    font = ImageFont.truetype(str(_mono_font()), 48) if _mono_font() else ImageFont.load_default(size=48)
    ImageDraw.Draw(img).text((30, 50), "Exit 12 East", fill="black", font=font)
    truth = ImageDraw.Draw(img).textbbox((30, 50), "Exit 12 East", font=font)
    [found] = ocr([ExpertInput("k", img)])
    assert [line["text"] for line in found] == ["Exit 12 East"]
    assert iou(found[0]["box"], list(truth)) >= 0.5


def _mono_font():
    from pathlib import Path

    fonts = sorted(Path("/usr/share/fonts").rglob("DejaVuSansMono.ttf")) if Path("/usr/share/fonts").exists() else []
    return fonts[0] if fonts else None


def _word(text, x0, x1, y0=10.0, y1=30.0, score=0.9):
    return {"text": text, "score": score, "box": [x0, y0, x1, y1], "polygon": [[x0, y0], [x1, y0], [x1, y1], [x0, y1]]}


def test_join_words_joins_words_of_one_line_left_to_right():
    # height 20: gaps of 24 (1.2 heights) and -10 (margins overlapping by half a height) join
    joined = join_words([_word("c", 104, 130, score=0.7), _word("a", 0, 40), _word("b", 64, 80, y0=11, y1=31)], 1.2)
    assert joined == [
        {"text": "a b c", "score": 0.7, "box": [0, 10, 130, 31], "polygon": [[0, 10], [130, 10], [130, 30], [0, 30]]}
    ]
    assert join_words([_word("a", 0, 40), _word("b", 30, 80)], 1.2)[0]["text"] == "a b"


@pytest.mark.parametrize(
    "second",
    [
        _word("far", 64.1, 90),  # gap 24.1 > 1.2 x 20
        _word("below", 0, 40, y0=19, y1=39),  # vertical overlap 11 < 0.6 x 20
        _word("inside", 29, 60),  # overlaps the first by 11 > half a height
    ],
)
def test_join_words_keeps_apart_what_is_not_one_line(second):
    found = join_words([_word("a", 0, 40), second], 1.2)
    assert sorted(line["text"] for line in found) == sorted(["a", second["text"]])


def test_join_words_with_zero_gap_keeps_the_detector_boxes():
    words = [_word("a", 0, 40), _word("b", 44, 80)]
    assert join_words(words, 0) == words


def test_rapidocr_missing_model_fails_at_setup(monkeypatch):
    import rapidocr.main

    def missing(cfg):
        raise FileNotFoundError("ch_PP-OCRv6_det_small.onnx")

    monkeypatch.setattr(rapidocr.main, "TextDetector", missing)
    with pytest.raises(ModelLoadError, match="could not load its bundled PP-OCR models"):
        RapidOcrExpert().setup()


def test_builtins_pass_the_contract_checker():
    photos = [load_photo(n).convert("RGB").resize((160, 120)) for n in ("coffee", "chelsea")]
    check_expert(RapidOcrExpert(), [render_text([("CONTRACT", (20, 20), 40)])[0], photos[0]])
    tags = check_expert(ClipTagExpert(TINY_TAGS), photos)
    assert all(len(t) == 5 for t in tags)
    check_expert(YoloExpert({"model": "yolov8n.pt", "weights": "random", "conf": 0.0, "device": "cpu"}), photos)
    world = YoloExpert(
        {
            "model": "yolov8s-worldv2.pt",
            "weights": "random",
            "conf": 0.0,
            "device": "cpu",
            "classes_from": "tags",
            "text_model": "df-tiny-clip-512",
            "text_weights": "random",
        }
    )
    observations = [{"tags": [{"label": "cat", "score": 0.9}, {"label": "cup", "score": 0.5}]}, {"tags": []}]
    found = check_expert(world, photos, observations)
    assert found[1] == []  # no tags, no open-vocabulary query
    assert {o["label"] for o in found[0]} <= {"cat", "cup"}
    assert world.provenance()["vocabulary"] == "tags of the same image"


def test_contract_checker_names_violations():
    class Broken(Expert):
        name, kind = "broken", "objects"

        def __call__(self, batch):
            return [[{"label": "x", "score": 2.0, "box": [0, 0, 10_000, 5]}] for _ in batch][:-1]

    with pytest.raises(ContractError, match="one list per image"):
        check_expert(Broken)

    class Outside(Broken):
        def __call__(self, batch):
            return [[{"label": "x", "score": float(np.random.rand()), "box": [5, 5, 1, 9999]}] for _ in batch]

    with pytest.raises(ContractError) as err:
        check_expert(Outside)
    assert "outside" in str(err.value) and "repeat call" in str(err.value)


def test_the_checker_uses_real_photos_and_says_what_it_checked():
    class Center(Expert):
        name, kind = "center", "objects"

        def __call__(self, batch):
            return [
                [
                    {"label": "thing", "score": 0.5, "box": [w / 4, h / 4, 3 * w / 4, 3 * h / 4]}
                    for w, h in [item.image.size]
                ]
                for item in batch
            ]

    found = check_expert(Center)
    assert found.summary == "check_expert(center): 3 images, 3 observations checked (3 with boxes)"
    sizes = {(320, 320), (400, 266), (451, 300)}
    assert {(round(o["box"][2] * 4 / 3), round(o["box"][3] * 4 / 3)) for f in found for o in f} == sizes
    assert all(np.asarray(photo).std() > 30 for photo in sample_images())  # photos, not noise


def test_paddleocr_absent_is_a_clear_error():
    try:
        import paddleocr  # noqa: F401
    except ImportError:
        with pytest.raises(Exception, match="pip install paddleocr"):
            PaddleOcrExpert().setup()
    else:
        pytest.skip("paddleocr is installed here")


def test_registry_lists_builtins_and_rejects_unknown_names():
    names = {row["name"]: row for row in describe_plugins()}
    assert {"yolo", "rapidocr", "paddleocr", "clip-tags"} <= set(names)
    assert names["clip-tags"]["kind"] == "tags" and names["yolo"]["package"] == "denseforge"
    assert load_expert_class("rapidocr") is RapidOcrExpert
    with pytest.raises(ConfigError, match="no expert plugin named 'nope'.*installed: "):
        load_expert_class("nope")


def test_vocabulary_ships_and_bad_paths_are_config_errors(tmp_path):
    tags = read_vocabulary("builtin:common")
    assert "person" in tags and "street" in tags and len(tags) == len(set(tags)) > 100
    with pytest.raises(ConfigError, match="cannot be read"):
        read_vocabulary(str(tmp_path / "missing.txt"))


def _perceive(*experts):
    return parse_config({"input": {"path": "x"}, "perceive": {"enabled": True, "experts": list(experts)}}).perceive


def test_experts_are_ordered_after_what_they_consume():
    order = plan_experts(
        _perceive(
            {"plugin": "yolo", "name": "world", "options": {"model": "yolov8s-worldv2.pt", "classes_from": "tags"}},
            {"plugin": "rapidocr"},
            {"plugin": "clip-tags", "options": {"model": "df-tiny-clip"}},
        )
    )
    assert [spec.instance for spec, _, _ in order] == ["rapidocr", "clip-tags", "world"]


def test_the_experts_of_a_group_sit_together_producers_first():
    """A group's experts run in one worker, one after another, so they must be next to each other
    in the flow; inside the group the producer still comes before its consumer."""
    world = {
        "plugin": "yolo",
        "name": "world",
        "group": "torch",
        "options": {"model": "yolov8s-worldv2.pt", "classes_from": "tags"},
    }
    tagger = {"plugin": "clip-tags", "name": "tagger", "group": "torch", "options": {"model": "df-tiny-clip"}}
    order = plan_experts(_perceive(world, {"plugin": "rapidocr"}, {"plugin": "yolox"}, tagger))
    assert [(spec.instance, spec.group) for spec, _, _ in order] == [
        ("tagger", "torch"),
        ("world", "torch"),
        ("rapidocr", None),
        ("yolox", None),
    ]
    with pytest.raises(ConfigError, match="String should have at least 1 character"):
        _perceive({**tagger, "group": ""})


def test_a_group_needs_one_pool_size_and_its_stages_side_by_side(monkeypatch, tmp_path):
    """Plugin stages join a group as experts do; the flow is checked as a whole: one pool size per
    group, and nothing of another worker between its stages."""
    from denseforge.pipeline import flow
    from denseforge.pipeline.adapter import chains
    from denseforge.pipeline.rundir import RunDir
    from denseforge.stages.stage import Stage

    class Gate(Stage):
        name = "gate"

        def process(self, batch):
            return [None] * len(batch)

    real = flow.load_plugin
    monkeypatch.setattr(
        flow, "load_plugin", lambda group, name, base: Gate if name == "gate" else real(group, name, base)
    )
    tagger = {
        "plugin": "clip-tags",
        "name": "tagger",
        "group": "light",
        "options": {"model": "df-tiny-clip"},
        "resources": {"concurrency": 1},
    }
    yolox = {"plugin": "yolox", "group": "light"}

    def flow_of(experts, stages):
        config = parse_config(
            {
                "input": {"path": "x"},
                "dedup": {"enabled": False},
                "perceive": {"enabled": True, "experts": experts},
                "stages": stages,
            }
        )
        return flow.build_stages(config, RunDir(tmp_path / "run"))

    gate = {"plugin": "gate", "after": "yolox", "group": "light", "resources": {"concurrency": 1}}
    assert [[r.instance for r in c] for c in chains(flow_of([tagger, yolox], [gate]))] == [
        ["tagger", "yolox", "gate"],
        ["merge"],
    ]
    with pytest.raises(
        ConfigError,
        match=r"^group light: its stages share one worker pool, so their resources.concurrency "
        r"and max_concurrency must be equal \(tagger: 1/None, yolox: 1/None, gate: 2/None\)$",
    ):
        flow_of([tagger, yolox], [{**gate, "resources": {"concurrency": 2}}])
    with pytest.raises(
        ConfigError,
        match=r"^group light: its stages must be next to each other in the flow, but merge "
        r"run\(s\) between them; move them \(stages\[\].after\)$",
    ):
        flow_of([tagger, yolox], [{**gate, "after": "merge"}])


def test_expert_config_errors_name_the_key():
    with pytest.raises(ConfigError, match=r"perceive.experts\[0\].options.conf"):
        plan_experts(_perceive({"plugin": "yolo", "options": {"conf": 3}}))
    with pytest.raises(ConfigError, match=r"perceive.experts\[1\].resources.batch_size"):
        plan_experts(_perceive({"plugin": "rapidocr"}, {"plugin": "clip-tags", "resources": {"batch_size": 0}}))
    with pytest.raises(ConfigError, match="consumes tags, which no configured expert produces"):
        plan_experts(_perceive({"plugin": "yolo", "options": {"classes_from": "tags"}}))
    with pytest.raises(ConfigError, match="must be unique"):
        _perceive({"plugin": "rapidocr"}, {"plugin": "rapidocr"})


def test_a_pool_that_may_grow_needs_a_starting_size_at_or_below_its_bound():
    ((_, _, grows),) = plan_experts(
        _perceive({"plugin": "rapidocr", "resources": {"concurrency": 1, "max_concurrency": 3}})
    )
    assert (grows.concurrency, grows.max_concurrency) == (1, 3)
    with pytest.raises(
        ConfigError,
        match=r"^perceive.experts\[0\].resources: Value error, max_concurrency \(1\) is below concurrency \(2\)",
    ):
        plan_experts(_perceive({"plugin": "rapidocr", "resources": {"concurrency": 2, "max_concurrency": 1}}))
    with pytest.raises(ConfigError, match="max_concurrency sizes a worker pool; it needs concurrency"):
        plan_experts(_perceive({"plugin": "rapidocr", "resources": {"concurrency": None, "max_concurrency": 2}}))


def test_yolox_decode_against_a_hand_computed_anchor():
    from denseforge.experts.yolox import decode

    raw = np.zeros((3549, 85), np.float32)
    # anchor 2704 is the first of stride 16 (52 x 52 stride-8 cells come first): grid (0, 0)
    # anchor 2704 + 26 * 3 + 5 is stride 16, row 3, column 5
    raw[2704 + 26 * 3 + 5, :4] = [0.5, 0.25, np.log(2.0), np.log(4.0)]
    out = decode(raw, 416)
    assert out.shape == (3549, 85)
    np.testing.assert_allclose(out[2704 + 26 * 3 + 5, :4], [(5 + 0.5) * 16, (3 + 0.25) * 16, 2 * 16, 4 * 16])
    np.testing.assert_allclose(out[3548, :4], [12 * 32, 12 * 32, 32, 32])  # last stride-32 cell, zero offsets


def _iou(a, b):
    from denseforge.stages.perceive import iou

    return iou(a, b)


def test_yolox_nano_finds_what_it_should_where_it_should():
    from denseforge.experts.yolox import YoloxExpert

    expert = YoloxExpert()
    checked = check_expert(expert)  # real photos; the boxes get checked
    assert checked.boxes >= 3
    # boxes verified by eye on a rendering of these photos
    expected = {
        "astronaut": ("person", [11, 20, 369, 507]),
        "coffee": ("cup", [162, 16, 421, 295]),
        "chelsea": ("cat", [0, 0, 449, 300]),
    }
    for name, (label, box) in expected.items():
        found = expert([ExpertInput(name, load_photo(name).convert("RGB"))])[0]
        best = max(found, key=lambda o: o["score"])
        assert best["label"] == label and best["score"] > 0.5 and _iou(best["box"], box) > 0.9, (name, found)
    assert expert.provenance()["weights"].startswith("pretrained (YOLOX-Nano")
    assert not expert.untrained()


@pytest.mark.parametrize(
    "cpus,threads", [(0.25, 1), (0.5, 1), (1.0, 1), (1.75, 2)]
)  # RapidOCR ignores more than the cores
def test_onnx_experts_run_as_many_threads_as_cpus_they_were_given(cpus, threads):
    """ONNX Runtime takes every core unless told: three OCR actors on a 2-core node each ran two
    threads. Each session now runs the worker's CPUs, rounded (Ray's OMP_NUM_THREADS truncates)."""
    from denseforge.experts.ocr import RapidOcrExpert
    from denseforge.experts.yolox import YoloxExpert
    from denseforge.stages.stage import Resources

    assert Resources(num_cpus=cpus).threads == threads
    for expert in (RapidOcrExpert(), YoloxExpert()):
        expert.resources = Resources(num_cpus=cpus)
        expert.setup()
        session = expert.engine.text_det.session.session if isinstance(expert, RapidOcrExpert) else expert.session
        assert session.get_session_options().intra_op_num_threads == threads


def test_rapidocr_given_a_gpu_falls_back_to_the_cpu_where_onnxruntime_has_no_cuda():
    from denseforge.stages.stage import Resources

    expert = RapidOcrExpert()
    expert.resources = Resources(num_cpus=1, num_gpus=0.5)
    expert.setup()
    assert expert.engine.text_det.session.session.get_providers() == ["CPUExecutionProvider"]
    img, _ = render_text([("GPU", (20, 20), 48)])
    assert [line["text"] for line in expert([ExpertInput("k", img)])[0]] == ["GPU"]


def test_rapidocr_scales_the_detector_input_as_configured():
    """PaddleOCR's 960/max by default (rapidocr's own 736/min upsized every photo: 2.6x slower for
    the same text read); both are options."""
    default = RapidOcrExpert()
    default.setup()
    assert (default.engine.text_det.limit_side_len, default.engine.text_det.limit_type) == (960, "max")
    upsizing = RapidOcrExpert({"limit_side_len": 736, "limit_type": "min"})
    upsizing.setup()
    assert (upsizing.engine.text_det.limit_side_len, upsizing.engine.text_det.limit_type) == (736, "min")
    img, _ = render_text([("small print", (10, 10), 22)])
    assert [ln["text"] for ln in default([ExpertInput("k", img)])[0]] == ["small print"]
