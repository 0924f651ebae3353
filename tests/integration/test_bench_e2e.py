"""`denseforge bench e2e` on a handful of photos: the real run, timed and sampled per phase."""

from __future__ import annotations

import json

import pytest

from ..conftest import run_cli

pytestmark = pytest.mark.slow


def test_bench_e2e_reports_every_phase_of_a_balanced_run(tmp_path):
    out = tmp_path / "e2e.json"
    proc = run_cli("bench", "e2e", "--images", "6", "--json", str(out), timeout=600)
    r = json.loads(out.read_text())
    assert json.loads(proc.stdout) == r  # stdout is the JSON alone
    assert r["funnel"]["input_rows"] == 6 and r["funnel"]["balanced"]
    assert r["funnel"]["written"] + r["funnel"]["rejected"] + r["funnel"]["removed"] == 6
    assert {"ray_init", "setup", "ingest", "embed", "dedup", "process"} <= set(r["phases"])
    assert all(r["phases"][p]["seconds"] > 0 for p in ("setup", "ingest", "embed", "process"))
    assert all(p["cpu_s"] >= 0 and p["cpu_efficiency"] >= 0 for p in r["phases"].values())
    assert r["cpu_s"] >= r["phases"]["process"]["cpu_s"] > 0 and r["peak_rss_mib"] > 100
    assert r["experts"] == ["rapidocr", "tagger", "yolox"]


def test_bench_dedup_pipeline_runs_the_ray_dedup_phase_on_float16_unit_files():
    """The out-of-core path at a size a test affords: every planted copy found, nothing else."""
    from denseforge.pipeline.bench.dedup import bench_dedup_pipeline

    r = bench_dedup_pipeline(20_000, dim=64, unit_rows=5_000, buckets=4)
    assert (r["units"], r["clusters"], r["planted"]) == (4, 20, 2_000)
    assert 20_000 * 64 * 2 < r["embeddings_mib"] * 2**20 < 20_000 * 64 * 4  # float16 vectors (+ keys, hashes)
    assert r["precision"] == 1.0 and r["recall"] >= 0.99
    assert 1.0 < r["entries_per_row"] <= 3.0  # border rows are deduplicated in at most 2 more clusters
    steps = {"train", "assign_and_shuffle", "bucket_dedup", "merge_and_select"}
    assert set(r["steps_s"]) == steps and r["peak_rss_mib"] > 0
    assert set(r["step_peak_rss_mib"]) == steps and max(r["step_peak_rss_mib"].values()) <= r["peak_rss_mib"]
