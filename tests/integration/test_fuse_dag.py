"""fuse → ground → qa in the real DAG, against an OpenAI-compatible server on loopback."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import webdataset as wds

from denseforge.pipeline.chat_stub import StubChatServer

from ..conftest import run_cli
from ..unit.test_experts import render_text

pytestmark = pytest.mark.slow


@pytest.fixture
def chat_url():
    with StubChatServer() as url:
        yield url


def test_openai_captions_are_written_grounded_and_checked(tmp_path, photo_dir, chat_url):
    folder = tmp_path / "images"
    folder.mkdir()
    (folder / "coffee.jpg").write_bytes((photo_dir / "coffee.jpg").read_bytes())
    render_text([("STOP", (200, 60), 64)], size=(640, 240))[0].save(folder / "sign.png")
    (folder / "sign.txt").write_text("LONG caption please")  # the stub server answers with finish_reason=length
    for name, marker in (("bad1", "NOCHOICES"), ("bad2", "NOTJSON"), ("bad3", "EMPTYBODY")):  # broken replies
        (folder / f"{name}.jpg").write_bytes((photo_dir / "chelsea.jpg").read_bytes())
        (folder / f"{name}.txt").write_text(marker)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"""
ray: {{num_cpus: 2}}
input: {{kind: folder, path: {folder}}}
embed: {{enabled: false}}
dedup: {{enabled: false}}
perceive:
  enabled: true
  experts: [{{plugin: rapidocr, resources: {{num_cpus: 0.5}}}}]
fuse:
  enabled: true
  backend: openai
  openai: {{base_url: "{chat_url}", model: tiny-vlm, max_retries: 1, timeout_s: 10}}
qa: {{enabled: true, min_words: 3, min_ocr_fidelity: 0.0, max_hallucination: 1.0,
      clip: {{model: df-tiny-clip, weights: random}}, min_clip_score: -1.0}}
""")
    out = tmp_path / "run"
    proc = run_cli("run", str(cfg), "--out", str(out))
    stats = json.loads((out / "stats.json").read_text())
    f = stats["funnel"]
    assert (f["input_rows"], f["written"], f["rejected"]) == (5, 1, 4)
    assert f["rejected_by_reason"] == {"qa/truncated_caption": 1, "fuse/captioner_error": 3}
    assert stats["stages"]["fuse"]["items"] == 5 and stats["stages"]["fuse"]["failed_total"] == 3
    assert "stage fuse: failed on 3 of 5 items" in proc.stderr
    [sample] = list(wds.WebDataset(str(out / "shards" / "0000000.tar"), shardshuffle=False))
    meta = json.loads(sample["json"])
    assert sample["txt"].decode() == meta["caption"] == "Two dogs and a car."
    assert meta["provenance"]["captioner"]["model"] == "tiny-vlm-served"
    assert meta["qa"]["passed"] and "hallucination" in meta["qa"]["scores"]
    assert meta["qa"]["scores"]["hallucination"] == 1.0  # "dogs" and "car": no expert saw either
    assert -1.0 <= meta["qa"]["scores"]["clip"] <= 1.0
    assert "random weights" in meta["provenance"]["qa"]["clip"]["weights"]
    rejects = pq.read_table(out / "rejects.parquet").to_pylist()
    [reject] = [r for r in rejects if r["stage"] == "qa"]
    assert "truncated_caption" in reject["detail"]
    assert all(r["detail"] for r in rejects if r["stage"] == "fuse")  # each broken reply says what was wrong

    # show: the written sample renders; the rejected one says why it is not there
    png = Path(run_cli("show", str(out), meta["key"]).stdout.strip())
    from PIL import Image

    assert Image.open(png).width == 900
    missing = run_cli("show", str(out), reject["key"], check=False)
    assert missing.returncode == 2 and "rejected at qa: truncated_caption" in missing.stderr

    # export: every format reads back the written sample
    llava = json.loads(Path(run_cli("export", str(out), "--format", "llava").stdout.strip()).read_text())
    assert [r["conversations"][1]["value"] for r in llava] == ["Two dogs and a car."]
    assert (out / "export" / "llava" / llava[0]["image"]).stat().st_size > 0
    for fmt in ("coco", "refcoco"):
        assert Path(run_cli("export", str(out), "--format", fmt).stdout.strip()).exists()
    done = run_cli("export", str(out), "--format", "internvl", "--check", "1")  # no boxes here: the caption alone
    assert "check: 1 of 1 records read back" in done.stderr


def test_the_paths_no_other_test_runs_inside_a_run(tmp_path, photo_dir, chat_url):
    """Markup grounding, region captions, two detectors that must agree (merge_min_votes), and
    cluster-balanced selection, together in one real run."""
    folder = tmp_path / "images"
    folder.mkdir()
    for name in ("astronaut", "coffee", "chelsea", "rocket"):
        (folder / f"{name}.jpg").write_bytes((photo_dir / f"{name}.jpg").read_bytes())
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"""
ray: {{num_cpus: 2}}
input: {{kind: folder, path: {folder}}}
embed: {{model: df-tiny-clip, weights: random}}
dedup: {{epsilon: null, clusters: 2}}
select: {{per_cluster: 2, target_total: 3}}
perceive:
  enabled: true
  merge_min_votes: 2
  experts:
    - {{plugin: yolox, name: strict, options: {{score_threshold: 0.5}}, resources: {{num_cpus: 0.25}}}}
    - {{plugin: yolox, name: loose, options: {{score_threshold: 0.3}}, resources: {{num_cpus: 0.25}}}}
fuse:
  enabled: true
  backend: openai
  region_top_k: 1
  openai: {{base_url: "{chat_url}", model: tiny-vlm, max_retries: 1, timeout_s: 10}}
ground: {{mode: markup}}
qa: {{enabled: true, min_words: 1, max_hallucination: 1.0, min_ocr_fidelity: 0.0}}
""")
    out = tmp_path / "run"
    run_cli("run", str(cfg), "--out", str(out))
    stats = json.loads((out / "stats.json").read_text())
    f = stats["funnel"]
    assert f["written"] == 3 and f["removed_by_reason"] == {"dedup/not_selected": 1}  # target_total: 3 of 4
    samples = [
        json.loads(s["json"])
        for shard in sorted((out / "shards").glob("*.tar"))
        for s in wds.WebDataset(str(shard), shardshuffle=False)
    ]
    with_objects = [s for s in samples if s["experts"].get("objects")]
    assert with_objects, "YOLOX finds the person, the cup, the cat"
    for s in with_objects:
        # both detectors agreed on every kept box (votes from two instances)
        assert all(o["sources"] == ["loose", "strict"] for o in s["experts"]["objects"])
        assert len(s["regions"]) == 1 and s["regions"][0]["caption"] == "Two dogs and a car."
    # markup mode: the model was asked for <ref> tags; the stub answers without them, so no grounding
    assert all(s["grounding"] == [] and s["caption"] == "Two dogs and a car." for s in samples)
    assert all(s["provenance"]["captioner"]["model"] == "tiny-vlm-served" for s in samples)
