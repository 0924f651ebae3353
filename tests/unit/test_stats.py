"""finalize_run, the summary and the report, on a run directory built by hand (no Ray)."""

from __future__ import annotations

import json

import pytest

from denseforge.errors import DenseforgeError
from denseforge.pipeline.config import parse_config
from denseforge.pipeline.progress import format_summary
from denseforge.pipeline.rundir import RunDir
from denseforge.pipeline.stats import finalize_run
from denseforge.stages.sample import Reject, Sample
from denseforge.stages.write import UnitFiles, write_unit

from ..conftest import blank_sample

STAGE = {
    "items": 4,
    "failed": {"ValueError": 1},
    "rejected": {"too_short": 1},
    "removed": 0,
    "busy_s": 2.0,
    "first_error": "ValueError: boom",
}


def _run_dir(tmp_path) -> RunDir:
    rd = RunDir(tmp_path)
    files = UnitFiles(rd.shard_file(0), rd.manifest_part(0), rd.rejects_part(0), rd.write_marker(0))
    sample = Sample(key="000000000000", width=4, height=4, sha256="0")
    removed = [
        {"key": "000000000002", "stage": "dedup", "reason": "too_small", "dup_of": None, "cluster": 0},
        {"key": "000000000003", "stage": "dedup", "reason": "not_selected", "dup_of": None, "cluster": 0},
    ]
    write_unit(
        0,
        files,
        [(sample, b"\xff\xd8")],
        [Reject(key="000000000001", stage="qa", reason="too_short")],
        removed,
        {"qa": STAGE},
    )
    rd.embeddings.mkdir()
    rd.embed_marker(0).write_text(json.dumps({"stages": {"embed": {**STAGE, "failed": {}, "rejected": {}}}}))
    return rd


def test_the_summary_and_report_say_removed_with_the_reasons_not_duplicates(tmp_path):
    rd = _run_dir(tmp_path)
    stats = finalize_run(rd, parse_config({"input": {"path": "x"}}), 4, {"ingest_s": 1.0})
    f = stats["funnel"]
    assert (f["input_rows"], f["written"], f["rejected"], f["removed"], f["balanced"]) == (4, 1, 1, 2, True)
    text = format_summary(stats, rd.root, "000000000000")
    assert (
        text.splitlines()[-1]
        == f"look at it: open {rd.root}/report.html in a browser; denseforge show {rd.root} 000000000000"
    )
    assert "2 removed (1 dedup/not_selected, 1 dedup/too_small)" in text and "duplicates" not in text
    assert "stage qa: failed on 1 of 4 items (ValueError 1); first error: ValueError: boom" in text
    assert "stage embed" not in text  # no failures, no line
    report = rd.report.read_text()
    assert "removed as duplicates" not in report and "dedup/too_small" in report
    assert stats["stages"]["qa"]["failed_total"] == 1 and stats["stages"]["embed"]["items"] == 4
    assert stats["stages"]["qa"]["items_per_busy_s"] == 2.0


def test_a_funnel_that_does_not_balance_fails_the_run(tmp_path):
    rd = _run_dir(tmp_path)
    with pytest.raises(DenseforgeError, match="the funnel does not balance: 5 input rows vs 1 written"):
        finalize_run(rd, parse_config({"input": {"path": "x"}}), 5, {})
    partial = finalize_run(rd, parse_config({"input": {"path": "x"}}), 5, {}, complete=False)
    assert partial["complete"] is False and partial["funnel"]["balanced"] is False


def test_hugging_face_datasets_loads_a_run_whose_samples_differ_in_shape(tmp_path, monkeypatch):
    """The first samples have no grounding, an empty source and no plugin kind; later ones have all
    three: `datasets` inferring from the first samples failed on this; the card's features load it."""
    datasets = pytest.importorskip("datasets")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    from denseforge.stages.sample import Grounding

    rd = RunDir(tmp_path / "run")
    from PIL import Image

    from ..conftest import jpeg_bytes

    image = jpeg_bytes(Image.new("RGB", (8, 6), "red"))
    plain = [
        (Sample(key=f"00000000000{i}", width=8, height=6, sha256="0", caption="a red square"), image) for i in range(3)
    ]
    rich = blank_sample(
        key="000000100000",
        width=8,
        height=6,
        caption="a dog",
        source={"license": "cc-by"},
        experts={"objects": [{"label": "dog", "score": 0.5, "box": [0, 0, 4, 4]}], "colors": [{"label": "red"}]},
        grounding=[Grounding(phrase="dog", span=(2, 5), box=[0, 0, 4, 4], source="objects/0")],
    )
    for unit, samples in ((0, plain), (1, [(rich, image)])):
        files = UnitFiles(rd.shard_file(unit), rd.manifest_part(unit), rd.rejects_part(unit), rd.write_marker(unit))
        write_unit(unit, files, samples, [], [], {})
    finalize_run(rd, parse_config({"input": {"path": "x"}}), 4, {})
    ds = datasets.load_dataset(str(rd.root), split="train", cache_dir=str(tmp_path / "cache"))
    rows = {r["__key__"]: r for r in ds}
    assert len(rows) == 4 and rows["000000000000"]["json"]["grounding"] == []
    assert rows["000000100000"]["json"]["grounding"][0]["phrase"] == "dog"
    assert rows["000000100000"]["json"]["experts"]["colors"] == [{"label": "red"}]
    assert rows["000000000001"]["json"]["experts"]["colors"] is None  # a key a sample lacks loads as None
    assert rows["000000100000"]["jpg"].size == (8, 6) and rows["000000100000"]["txt"] == "a dog"


def test_the_report_escapes_everything_that_comes_from_the_data(tmp_path):
    from PIL import Image

    from denseforge.stages.sample import Grounding

    from ..conftest import jpeg_bytes

    hostile = '<script>alert(1)</script>"><img src=x onerror=alert(2)>'
    rd = RunDir(tmp_path)
    caption = f"a dog {hostile}"
    sample = blank_sample(
        key="000000000000",
        width=40,
        height=30,
        url=f"http://x/{hostile}",
        alt_text=hostile,
        caption=caption,
        experts={
            "objects": [{"label": hostile, "score": 0.9, "box": [1, 1, 20, 20]}],
            "ocr": [{"text": hostile, "score": 0.9, "box": [2, 2, 9, 9], "polygon": []}],
            "tags": [{"label": hostile, "score": 0.5}],
        },
        grounding=[Grounding(phrase="dog", span=(2, 5), box=[1, 1, 20, 20], source="objects/0")],
        provenance={"note": hostile},
    )
    files = UnitFiles(rd.shard_file(0), rd.manifest_part(0), rd.rejects_part(0), rd.write_marker(0))
    write_unit(
        0,
        files,
        [(sample, jpeg_bytes(Image.new("RGB", (40, 30), "blue")))],
        [Reject(key="000000000001", stage="ingest", reason="http_404", detail=hostile, url=hostile)],
        [],
        {},
    )
    finalize_run(rd, parse_config({"input": {"path": "x"}}), 2, {})
    page = rd.report.read_text()
    assert "<script>" not in page and "onerror=alert" not in page.replace("onerror=alert(2)&gt;", "")
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert '<mark style="background:' in page and ">dog</mark>" in page  # the grounded phrase, highlighted
    assert page.count('src="data:image/jpeg;base64,') == 1  # inlined: nothing is fetched at view time
    assert 'src="http' not in page and "<link" not in page


def test_a_list_with_no_common_type_is_written_and_typed_as_strings(tmp_path):
    """Regression: `provenance.ground.synonyms` held `["sports ball", 0.74]`; Arrow cannot type a
    list of a string and a float, so the dataset card's type inference raised inside write_unit
    and stopped the whole run at unit 80 of 100 (bench e2e, 1,000 photos)."""
    import pyarrow as pa
    from PIL import Image

    from denseforge.stages.card import json_type, value_type

    from ..conftest import jpeg_bytes

    rd = RunDir(tmp_path)
    sample = blank_sample(
        key="000000000000",
        width=4,
        height=4,
        caption="a ball",
        experts={"tags": [{"label": "ball", "score": 0.9, "extra": ["sports ball", 0.74]}]},
        provenance={"plugin": {"pair": ["cup", 1, True]}},
    )
    files = UnitFiles(rd.shard_file(0), rd.manifest_part(0), rd.rejects_part(0), rd.write_marker(0))
    counts = write_unit(0, files, [(sample, jpeg_bytes(Image.new("RGB", (4, 4), "blue")))], [], [], {})
    assert counts["written"] == 1 and rd.write_marker(0).exists()
    assert value_type({"pair": ["cup", 1, True]}) == pa.struct([("pair", pa.list_(pa.string()))])
    well_typed = {"a": [1, 2.5], "b": {"c": [{"d": "x"}, {"d": None}]}, "e": [], "f": True, "g": None}
    assert value_type(well_typed) == pa.array([well_typed]).type  # as Arrow infers it, where it can
    assert json_type([{"a": 1}, {"a": 0.5, "b": "x"}]) == pa.struct([("a", pa.float64()), ("b", pa.string())])


def test_the_cards_shard_pattern_is_the_real_range_or_a_glob():
    import pyarrow as pa

    from denseforge.stages.card import dataset_card, shard_pattern

    assert shard_pattern(["0000001.tar", "0000000.tar", "0000002.tar"]) == "{0000000..0000002}.tar"
    assert shard_pattern(["0000003.tar"]) == "0000003.tar"
    assert shard_pattern(["0000000.tar", "0000002.tar"]) is None and shard_pattern([]) is None
    funnel = {"input_rows": 3, "written": 2, "rejected": 1, "removed": 0}
    gap = dataset_card(pa.null(), "r", funnel, ["0000000.tar", "0000002.tar"])
    assert 'sorted(glob.glob("path/to/this/run/shards/*.tar"))' in gap and "WARNING" not in gap
    failed = dataset_card(pa.null(), "r", funnel, ["0000000.tar"], state="failed")
    assert "WARNING: this run did not complete (failed)" in failed and "- incomplete-run" in failed
    partial = dataset_card(pa.null(), "r", funnel, ["0000000.tar"], failed_units=2)
    assert "2 input unit(s) failed to download" in partial and "- failed-units" in partial
