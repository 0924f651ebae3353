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
    from denseforge.pipeline.bench.dedup import Corpus, bench_dedup_pipeline

    r = bench_dedup_pipeline(20_000, Corpus(dim=64), unit_rows=5_000, buckets=4)
    assert (r["units"], r["clusters"], r["planted"]) == (4, 20, 2_000)
    assert 20_000 * 64 * 2 < r["embeddings_mib"] * 2**20 < 20_000 * 64 * 4  # float16 vectors (+ keys, hashes)
    assert r["precision"] == 1.0 and r["recall"] >= 0.99
    assert 1.0 < r["entries_per_row"] <= 3.0  # border rows are deduplicated in at most 2 more clusters
    steps = {"train", "assign_and_shuffle", "bucket_dedup", "merge_and_select"}
    assert set(r["steps_s"]) == steps and r["peak_rss_mib"] > 0
    assert set(r["step_peak_rss_mib"]) == steps and max(r["step_peak_rss_mib"].values()) <= r["peak_rss_mib"]


def test_the_dedup_phase_at_scale_shape_one_file_per_node_and_bucket_and_partitioned_merge(monkeypatch):
    """The 10⁹ path's shape at a test's size: a two-level index trained per coarse cell in tasks,
    one writer on this one node (a file per bucket, however many assignment tasks), the merge in
    four partitions (of 5,000 rows here, of millions in a run) that follow dup_of chains across
    each other; every planted copy found."""
    from denseforge.pipeline import dedup_phase
    from denseforge.pipeline.bench.dedup import Corpus, bench_dedup_pipeline

    monkeypatch.setattr(dedup_phase, "PARTITION_ROWS", 5_000)

    r = bench_dedup_pipeline(
        20_000, Corpus("hierarchical", dim=64), unit_rows=1_000, buckets=16, overrides=("dedup.clusters=5000",)
    )
    assert r["units"] == 20 and 4_096 < r["clusters"] <= 5_000  # two levels: ~71 cells
    assert r["shuffle_files"] == 16 and r["merge_partitions"] == 4 and r["chain_rounds"] >= 1
    assert r["precision"] == 1.0 and r["recall"] >= 0.99


def test_bench_derive_measures_the_derived_runs_against_their_originals(tmp_path):
    out = tmp_path / "derive.json"
    run_cli("bench", "derive", "--images", "6", "--json", str(out), timeout=900)
    r = json.loads(out.read_text())
    assert set(r["process_s"]) == {"original", "qa_changed", "without_expert", "expert_added", "expert_alone"}
    qa = r["cache"]["qa_changed"]
    assert qa and all(s["misses"] == 0 and s["hits"] > 0 for s in qa.values())  # no model called
    added = r["cache"]["expert_added"]
    assert added["rapidocr"]["hits"] == 0 and added["yolox"]["misses"] == added["tagger"]["misses"] == 0
    assert r["qa_changed_vs_original"] < 1 and r["expert_added_vs_expert_alone"] > 0


def test_bench_plan_projects_a_run_from_its_pilots_and_then_measures_it(tmp_path):
    out = tmp_path / "plan.json"
    run_cli("bench", "plan", "--images", "24", "--pilot", "12", "--json", str(out), timeout=900)
    r = json.loads(out.read_text())
    assert [p["rows"] for p in r["pilots"]] == [3, 12]
    assert r["wall_s"]["projected"] > 0 and r["wall_s"]["measured"] > 0
    assert r["disk_bytes"]["measured"] > 24 * 1000  # the photos alone are more
    assert abs(r["disk_error"]) < 0.5  # disk is nearly linear in the rows, even from tiny pilots
    assert set(r["parts_s"]) == {"ray_init", "setup", "plan", "ingest", "embed", "dedup", "process"}


def test_bench_dedup_against_finds_the_copies_of_an_earlier_runs_images(tmp_path):
    out = tmp_path / "against.json"
    run_cli("bench", "dedup", "--pipeline", "20000", "--against", "5000", "--json", str(out), timeout=600)
    r = json.loads(out.read_text())
    assert (r["n"], r["earlier"], r["cross_fraction"]) == (20_000, 5_000, 0.1)
    alone, against = r["alone"], r["against"]
    assert alone["precision"] == against["precision"] == 1.0
    assert against["recall_cross_run"] >= 0.99 and against["recall_all"] >= 0.99
    assert alone["recall_cross_run"] < 0.5  # alone it sees only the copies that have a sibling in the new input
    assert against["against"]["kept_images"] == 5_000 and against["against"]["removed_as_their_copies"] >= 1_980
    assert r["against_over_alone"] > 0


def test_a_dedup_retried_after_a_cut_short_attempt_ignores_its_leftovers(tmp_path):
    """Bucket files an earlier attempt left (another layout, or a bucket this attempt does not
    use) are not read as entries of this one, and the shuffle is removed once decided. The
    decisions do not depend on how many buckets the clusters were spread over."""
    import pyarrow as pa
    import ray

    from denseforge.pipeline.bench.dedup import Corpus, _StepTimes, write_planted_units
    from denseforge.pipeline.config import parse_config
    from denseforge.pipeline.dedup_phase import run_dedup
    from denseforge.pipeline.ray_session import start_ray
    from denseforge.pipeline.rundir import RunDir
    from denseforge.storage import write_arrow_atomic

    configs = [
        parse_config(
            {
                "input": {"kind": "table", "path": str(tmp_path / "unused.parquet")},
                "ray": {"num_cpus": 2},
                "dedup": {
                    "exact": False,
                    "phash_max_distance": None,
                    "sweep": [],
                    "buckets": buckets,
                    "target_cluster_size": 200,
                    "border": 0.2,
                },
            }
        )
        for buckets in (3, 2)
    ]
    runs = [RunDir(tmp_path / name) for name in ("clean", "retried")]
    for rd, config in zip(runs, configs, strict=True):
        rd.create(config)
        write_planted_units(rd, 3_000, Corpus(dim=32, seed=2, dup_fraction=0.5), 1_000)  # copies of copies: border
        # rows removed in two clusters as copies of different rows
    stale = pa.table({"key": ["000000000001"] * 2, "cluster": [0, 1]})  # an old layout's columns
    for bucket, unit in (
        (0, 0),
        (1, 9),
        (2, 0),
    ):  # files this attempt overwrites, does not, and a bucket it does not use
        runs[1].bucket(bucket).mkdir(parents=True, exist_ok=True)
        write_arrow_atomic(runs[1].bucket(bucket) / f"{unit:07d}.arrow", stale)
    start_ray(configs[0].ray, None)
    try:
        summaries = [run_dedup(config, rd, 3, _StepTimes()) for rd, config in zip(runs, configs, strict=True)]
    finally:
        ray.shutdown()
    assert summaries[0]["removed_by_reason"]["semantic_duplicate"] > 1_000 and summaries[0]["entries"] > 3_300
    assert all(s["shuffle_bytes"] > 3_000 * 32 * 2 for s in summaries)
    assert [s["shuffle_files"] for s in summaries] == [3, 2]  # one node: a file per bucket
    same = [{**s, "shuffle_bytes": 0, "shuffle_files": 0} for s in summaries]
    assert same[0] == same[1]
    assert runs[0].decisions.read_bytes() == runs[1].decisions.read_bytes()
    assert not any(p.exists() for rd in runs for p in (rd.buckets, rd.bucket_parts))
