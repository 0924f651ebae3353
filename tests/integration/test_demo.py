"""The shipped demo (`denseforge run demo`): real detections, grounded in template captions."""

from __future__ import annotations

import json

import pytest
import webdataset as wds

from ..conftest import run_cli

pytestmark = pytest.mark.slow


def test_the_demo_captions_what_yolox_really_saw(tmp_path):
    out = tmp_path / "demo"
    proc = run_cli("run", "demo", "--out", str(out))
    assert "33 input rows" in proc.stderr and "balanced: True" in proc.stderr
    samples = {}
    for shard in sorted((out / "shards").glob("*.tar")):
        for s in wds.WebDataset(str(shard), shardshuffle=False):
            meta = json.loads(s["json"])
            samples[meta["url"].rsplit("/", 1)[-1]] = meta
    for name, label in (("astronaut_0.jpg", "person"), ("coffee_0.jpg", "cup"), ("chelsea_0.jpg", "cat")):
        meta = samples[name]
        assert label in {o["label"] for o in meta["experts"]["objects"]}
        assert any(g["phrase"] == label and g["source"].startswith("objects/") for g in meta["grounding"]), meta
        assert "tags" not in meta["experts"] and "excluded" in meta["provenance"]["experts"]["tagger"]
        assert meta["provenance"]["experts"]["yolox"]["weights"].startswith("pretrained (YOLOX-Nano")
    assert "DENSEFORGE" in samples["sign.png"]["caption"]
