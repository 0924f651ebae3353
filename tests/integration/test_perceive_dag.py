"""Experts in the real DAG: built-ins plus a third-party plugin package installed by the test."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import webdataset as wds
from PIL import Image

from ..conftest import run_cli
from ..unit.test_experts import render_text

pytestmark = pytest.mark.slow


def test_the_plugin_is_discovered_and_passes_the_contract(colors_plugin):
    listing = run_cli("experts").stdout
    assert "colors" in listing and "denseforge-colors" in listing
    assert "min-caption-words" in listing and "stage" in listing
    code = (
        "from denseforge_colors import DominantColorExpert as E; from denseforge.experts import check_expert; "
        "print(check_expert(E)[0])"
    )
    assert "label" in subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout


def test_experts_and_plugin_run_in_the_dag(colors_plugin, tmp_path, photo_dir):
    folder = tmp_path / "images"
    folder.mkdir()
    for name in ("astronaut", "coffee", "chelsea"):
        (folder / f"{name}.jpg").write_bytes((photo_dir / f"{name}.jpg").read_bytes())
    sign, boxes = render_text([("OPEN 24 HOURS", (40, 60), 56)], size=(640, 240))
    sign.save(folder / "sign.png")
    Image.new("RGB", (40, 40), "red").save(folder / "tiny.png")  # the plugin raises on it
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"""
ray: {{num_cpus: 2}}
input: {{kind: folder, path: {folder}}}
ingest: {{image_size: 512}}
embed: {{enabled: false}}
dedup: {{enabled: false}}
perceive:
  enabled: true
  on_error: keep
  experts:
    - {{plugin: yolo, name: world, options: {{model: yolov8s-worldv2.pt, weights: random, conf: 0.0, device: cpu,
        classes_from: tags, text_model: df-tiny-clip-512, text_weights: random}}, resources: {{num_cpus: 0.25}},
        group: torch}}
    - {{plugin: colors, options: {{fail_below_px: 64}}, resources: {{num_cpus: 0.25}}}}
    - {{plugin: rapidocr, resources: {{num_cpus: 0.5}}}}
    - {{plugin: clip-tags, name: tagger, options: {{model: df-tiny-clip, weights: random, top_k: 3, threshold: 0.0}},
        resources: {{num_cpus: 0.25}}, group: torch}}
""")
    out = tmp_path / "run"
    proc = run_cli("run", str(cfg), "--out", str(out), "--dry-run")
    # the two torch experts share one worker (the tagger first: the detector is queried with its tags)
    assert "# stages, in order: tagger + world (group torch: one worker), colors, rapidocr, merge" in proc.stdout
    proc = run_cli("run", str(cfg), "--out", str(out))
    stats = json.loads((out / "stats.json").read_text())
    f = stats["funnel"]
    assert (f["input_rows"], f["written"], f["rejected"]) == (5, 5, 0)
    # one image failed in one expert: the run passes, and the failure is counted everywhere
    colors = stats["stages"]["colors"]
    assert (colors["items"], colors["failed"], colors["failed_total"]) == (5, {"ValueError": 1}, 1)
    assert "too small" in colors["first_error"] and stats["stages"]["world"]["failed_total"] == 0
    assert "stage colors: failed on 1 of 5 items (ValueError 1)" in proc.stderr
    assert "<td>colors</td><td>5</td><td>1</td>" in (out / "report.html").read_text()
    status = run_cli("status", str(out)).stdout
    assert "stage colors: 5 items, failed 1 (ValueError 1)" in status and ": complete" in status
    samples = {
        Path(json.loads(s["json"])["source"]["path"]).stem: json.loads(s["json"])
        for s in wds.WebDataset(str(out / "shards" / "0000000.tar"), shardshuffle=False)
    }
    for name, sample in samples.items():
        failed = {"colors"} if name == "tiny" else set()  # an expert that failed on an image says so in errors
        assert set(sample["provenance"]["experts"]) == {"world", "colors", "rapidocr", "tagger"} - failed
        # random-weight experts feed their consumers (the tag-queried detector) but never the evidence
        assert "tags" not in sample["experts"] and "objects" not in sample["experts"]
        assert (
            sample["provenance"]["experts"]["tagger"]["excluded"]
            == "random weights: 3 observation(s) kept out of the evidence"
        )
        assert "random weights" in sample["provenance"]["experts"]["world"]["excluded"]
        if name != "tiny":
            assert sample["experts"]["colors"] and not sample["errors"]
    assert "too small" in samples["tiny"]["errors"]["colors"] and "colors" not in samples["tiny"]["experts"]
    [line] = samples["sign"]["experts"]["ocr"]
    assert line["text"].replace(" ", "") == "OPEN24HOURS" and len(line["polygon"]) == 4
    w, h = samples["sign"]["width"], samples["sign"]["height"]
    assert all(0 <= v <= (w if i % 2 == 0 else h) for i, v in enumerate(line["box"]))
    assert pq.read_table(out / "manifest.parquet").num_rows == 5

    # the reject policy turns the same expert failure into a reject row with its reason
    out2 = tmp_path / "run2"
    run_cli(
        "run",
        str(cfg),
        "--out",
        str(out2),
        "--set",
        "perceive.on_error=reject",
        "--set",
        "perceive.experts=[{plugin: colors, options: {fail_below_px: 64}}]",
    )
    rejects = pq.read_table(out2 / "rejects.parquet").to_pylist()
    assert [(r["stage"], r["reason"]) for r in rejects] == [("colors", "expert_error")]
    assert "too small" in rejects[0]["detail"]


def _folder(tmp_path, photo_dir, names=("astronaut", "coffee", "chelsea")):
    folder = tmp_path / "images"
    folder.mkdir()
    for name in names:
        (folder / f"{name}.jpg").write_bytes((photo_dir / f"{name}.jpg").read_bytes())
    return folder


def test_a_dead_expert_fails_the_run_in_one_line(colors_plugin, tmp_path, photo_dir):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"""
ray: {{num_cpus: 2}}
input: {{kind: folder, path: {_folder(tmp_path, photo_dir)}}}
embed: {{enabled: false}}
dedup: {{enabled: false}}
perceive: {{enabled: true, experts: [{{plugin: colors, options: {{fail_below_px: 100000}}}}]}}
output: {{samples_per_shard: 2}}
""")
    out = tmp_path / "run"
    proc = run_cli("run", str(cfg), "--out", str(out), check=False)
    assert proc.returncode == 1, proc.stderr
    [line] = [x for x in proc.stderr.splitlines() if x.startswith("denseforge: error:")]
    assert (
        line.startswith(
            "denseforge: error: stage 'colors' failed on every item it was given (3); first error: ValueError: image "
        )
        and "Traceback" not in proc.stderr
    )
    status = run_cli("status", str(out)).stdout
    assert ": failed" in status and "reason: stage 'colors' failed on every item" in status
    js = json.loads(run_cli("status", str(out), "--json").stdout)
    assert js["state"] == "failed" and js["driver"]["alive"] is False and js["stages"]["colors"]["failed_total"] == 3
    assert js["phases"]["write"]["units_total"] == 2 and js["reason"].startswith("stage 'colors' failed")
    watched = run_cli("status", str(out), "--watch", "0.1", "--json").stdout.splitlines()
    assert len(watched) == 1 and json.loads(watched[0])["state"] == "failed"  # no driver: one look, then done
    stats = json.loads((out / "stats.json").read_text())  # a failed run still writes what it has
    assert stats["complete"] is False and stats["stages"]["colors"]["failed"] == {"ValueError": 3}
    assert not list((out / "shards" / "_done").glob("*.json"))  # units written while it failed are redone
    card = (out / "README.md").read_text()  # the card says it first, and tags it
    assert "WARNING: this run did not complete (failed)" in card and "- incomplete-run" in card
    refused = run_cli("export", str(out), "--format", "qwen2.5-vl", "--check", "5", check=False)
    assert refused.returncode != 0 and not (out / "export").exists(), refused.stderr
    assert f"{out} is failed: stage 'colors' failed on every item" in refused.stderr
    assert "--allow-incomplete" in refused.stderr and "Traceback" not in refused.stderr
    run_cli("export", str(out), "--format", "llava", "--allow-incomplete")
    record = json.loads((out / "export" / "llava" / "export.json").read_text())
    assert (record["state"], record["allow_incomplete"], record["file"]) == ("failed", True, "llava.json")
    for bad in ("-1", "0", "x"):  # a period that is not one is refused, not a traceback or no watch at all
        proc = run_cli("status", str(out), "--watch", bad, check=False)
        assert proc.returncode == 2 and "is not a number of seconds above 0" in proc.stderr, proc.stderr
    reader = subprocess.Popen(  # `status DIR | head -0`: the reader goes away before the output comes
        [sys.executable, "-m", "denseforge.pipeline.cli", "status", str(out)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    reader.stdout.close()
    assert reader.wait(timeout=120) == 141 and reader.stderr.read() == b""


def test_a_failing_setup_stops_the_run_before_any_download(tmp_path, photo_dir):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"""
ray: {{num_cpus: 2}}
input: {{kind: folder, path: {_folder(tmp_path, photo_dir)}}}
embed: {{enabled: false}}
dedup: {{enabled: false}}
perceive: {{enabled: true, experts: [{{plugin: yolo, options: {{model: {tmp_path}/missing.pt}}}}]}}
""")
    out = tmp_path / "run"
    proc = run_cli("run", str(cfg), "--out", str(out), check=False)
    assert proc.returncode == 2, proc.stderr
    [line] = [x for x in proc.stderr.splitlines() if x.startswith("denseforge: error:")]
    assert line.startswith("denseforge: error: setup of stage 'yolo' failed: ModelLoadError: yolo: cannot load")
    assert "Traceback" not in proc.stderr and "RayTaskError" not in proc.stderr
    assert not (out / "raw").exists() and not (out / "input").exists()  # nothing read, nothing downloaded
    assert "Traceback" in (out / "logs" / "driver.log").read_text()
    status = run_cli("status", str(out)).stdout
    assert ": failed" in status and "setup of stage 'yolo' failed" in status


def test_a_plugin_stage_joins_the_flow_through_its_entry_point(colors_plugin, tmp_path, photo_dir):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"""
ray: {{num_cpus: 2}}
input: {{kind: folder, path: {_folder(tmp_path, photo_dir)}}}
embed: {{enabled: false}}
dedup: {{enabled: false}}
perceive: {{enabled: true, experts: [{{plugin: colors}}]}}
fuse: {{enabled: true, backend: template}}
qa: {{enabled: true, min_words: 1}}
stages: [{{plugin: min-caption-words, name: gate, after: ground, options: {{min_words: 3}}}}]
""")
    out = tmp_path / "run"
    assert (
        "# stages, in order: colors, merge, fuse, ground, gate, qa"
        in run_cli("run", str(cfg), "--out", str(out), "--dry-run").stdout
    )
    proc = run_cli("run", str(cfg), "--out", str(out), check=False)
    # the template caption of an image no expert described is "An image." (2 words): the gate rejects
    # every one, and a run that wrote nothing fails, naming why
    assert proc.returncode == 1 and "the run wrote nothing: all 3 input rows" in proc.stderr, proc.stderr
    stats = json.loads((out / "stats.json").read_text())
    assert stats["funnel"]["rejected_by_reason"] == {"gate/caption_too_short": 3}
    assert stats["stages"]["gate"]["rejected"] == {"caption_too_short": 3} and "qa" not in stats["stages"]
    rejects = pq.read_table(out / "rejects.parquet").to_pylist()
    assert {(r["stage"], r["detail"]) for r in rejects} == {("gate", "2 < 3 words")}
