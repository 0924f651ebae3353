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
PLUGIN = Path(__file__).resolve().parents[1] / "plugins" / "denseforge-colors"


@pytest.fixture(scope="module")
def colors_plugin(tmp_path_factory):
    import shutil

    source = tmp_path_factory.mktemp("plugin") / PLUGIN.name  # build outside the source tree
    shutil.copytree(PLUGIN, source)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run(pip + ["install", "--no-deps", "--no-build-isolation", str(source)], check=True, timeout=300)
    yield
    subprocess.run(pip + ["uninstall", "-y", "denseforge-colors"], check=True, timeout=300)


def test_the_plugin_is_discovered_and_passes_the_contract(colors_plugin):
    listing = run_cli("experts").stdout
    assert "colors" in listing and "denseforge-colors" in listing
    code = "from denseforge_colors import DominantColorExpert as E; from denseforge.experts import check_expert; " \
           "print(check_expert(E)[0])"
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
        classes_from: tags, text_model: df-tiny-clip-512, text_weights: random}}, resources: {{num_cpus: 0.25}}}}
    - {{plugin: colors, options: {{fail_below_px: 64}}, resources: {{num_cpus: 0.25}}}}
    - {{plugin: rapidocr, resources: {{num_cpus: 0.5}}}}
    - {{plugin: clip-tags, name: tagger, options: {{model: df-tiny-clip, weights: random, top_k: 3, threshold: 0.0}},
        resources: {{num_cpus: 0.25}}}}
""")
    out = tmp_path / "run"
    proc = run_cli("run", str(cfg), "--out", str(out), "--dry-run")
    assert "# experts, in order: colors, rapidocr, tagger, world" in proc.stdout
    run_cli("run", str(cfg), "--out", str(out))
    f = json.loads((out / "stats.json").read_text())["funnel"]
    assert (f["input_rows"], f["written"], f["rejected"]) == (5, 5, 0)
    samples = {Path(json.loads(s["json"])["source"]["path"]).stem: json.loads(s["json"])
               for s in wds.WebDataset(str(out / "shards" / "0000000.tar"), shardshuffle=False)}
    for name, sample in samples.items():
        assert set(sample["provenance"]["experts"]) == {"world", "colors", "rapidocr", "tagger"}
        assert len(sample["experts"]["tags"]) == 3
        assert all(o["label"] in {t["label"] for t in sample["experts"]["tags"]} for o in sample["experts"]["objects"])
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
    run_cli("run", str(cfg), "--out", str(out2), "--set", "perceive.on_error=reject",
            "--set", "perceive.experts=[{plugin: colors, options: {fail_below_px: 64}}]")
    rejects = pq.read_table(out2 / "rejects.parquet").to_pylist()
    assert [(r["stage"], r["reason"]) for r in rejects] == [("perceive", "expert_error")]
    assert "too small" in rejects[0]["detail"]
