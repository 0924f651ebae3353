"""`denseforge plan`: the projection from two pilots, the cluster file, the pilot's input limit."""

from __future__ import annotations

import pytest

from denseforge.errors import ConfigError
from denseforge.pipeline.config import parse_config
from denseforge.pipeline.plan import PARTS, ClusterSpec, load_cluster, project, summary

from ..conftest import run_cli


def _pilot(rows: int, per_row: dict[str, float], fixed: dict[str, float], disk_per_row: int) -> dict:
    timings = {p: fixed.get(p, 0.0) + per_row.get(p, 0.0) * rows for p in PARTS}
    return {"rows": rows, "timings": timings, "disk": 5_000 + disk_per_row * rows, "wall_s": sum(timings.values())}


def test_the_projection_extends_each_phase_s_line_and_scales_the_per_row_part_by_the_cluster():
    config = parse_config({"input": {"kind": "table", "path": "x.parquet"}})
    per_row = {"ingest_s": 0.01, "embed_s": 0.02, "process_s": 0.1, "plan_s": 0.0001}
    fixed = {"ray_init_s": 3.0, "setup_s": 8.0, "process_s": 12.0, "embed_s": 2.0}
    small, large = _pilot(50, per_row, fixed, 90_000), _pilot(200, per_row, fixed, 90_000)
    here = project(small, large, 2000, ClusterSpec(cpus_per_node=2), config)
    assert here["parts"]["process"]["projected_s"] == pytest.approx(12.0 + 0.1 * 2000, abs=0.1)
    assert here["parts"]["setup"]["projected_s"] == 8.0 and here["parts"]["setup"]["per_row_ms"] == 0
    assert here["disk_bytes"] == pytest.approx(5_000 + 90_000 * 2000, rel=1e-6)
    assert here["bottleneck"] == "process" and here["cost"] is None
    cluster = ClusterSpec(nodes=10, cpus_per_node=4, price_per_node_hour=2.0)
    far = project(small, large, 10**9, cluster, config)
    # 40 CPUs against 2 here: the per-row part runs 20 times faster; the fixed part does not shrink
    assert far["parts"]["process"]["speedup"] == 20.0
    assert far["parts"]["process"]["projected_s"] == pytest.approx(12.0 + 0.1 * 10**9 / 20, rel=1e-6)
    assert far["parts"]["ray_init"]["projected_s"] == 3.0
    assert far["node_hours"] == pytest.approx(far["wall_s"] / 3600 * 10, rel=1e-3)
    assert far["cost"] == pytest.approx(far["node_hours"] * 2.0, rel=1e-3)
    text = summary(
        {
            "plan": far,
            "cluster": cluster.model_dump(),
            "this_machine": {"cpus": 2},
            "pilots": [],
            "assumptions": ["", "x"],
        }
    )
    assert "1,000,000,000 input rows on 10 node(s) x 4 CPUs" in text and "bottleneck: process" in text


def test_a_phase_whose_stages_use_gpus_scales_with_the_clusters_gpus(monkeypatch):
    from denseforge.pipeline import plan

    monkeypatch.setattr(plan, "_gpus_here", lambda: 1)
    config = parse_config({"input": {"kind": "table", "path": "x.parquet"}, "embed": {"num_gpus": 1}})
    small, large = (
        _pilot(10, {"embed_s": 0.5, "ingest_s": 0.5}, {}, 1),
        _pilot(40, {"embed_s": 0.5, "ingest_s": 0.5}, {}, 1),
    )
    out = project(small, large, 1000, ClusterSpec(nodes=2, cpus_per_node=8, gpus_per_node=4), config)
    assert out["parts"]["embed"]["speedup"] == 8.0  # 8 GPUs against 1
    assert out["parts"]["ingest"]["speedup"] == pytest.approx(16 / plan.os.cpu_count(), abs=0.01)


def test_a_cluster_file_with_a_wrong_key_or_value_is_one_line(tmp_path):
    good = tmp_path / "c.yaml"
    good.write_text("nodes: 4\ncpus_per_node: 16\nprice_per_node_hour: 1.5\n")
    assert load_cluster(str(good)) == ClusterSpec(nodes=4, cpus_per_node=16, price_per_node_hour=1.5)
    bad = tmp_path / "bad.yaml"
    bad.write_text("nodes: 4\ncpu_per_node: 16\n")
    with pytest.raises(ConfigError, match=r"cpu_per_node: Extra inputs are not permitted \(keys: nodes, cpus_per_node"):
        load_cluster(str(bad))
    bad.write_text("nodes: 0\n")
    with pytest.raises(ConfigError, match="nodes: Input should be greater than or equal to 1"):
        load_cluster(str(bad))
    with pytest.raises(ConfigError, match="--cluster"):
        load_cluster(str(tmp_path / "missing.yaml"))


def test_the_plan_command_refuses_bad_numbers_before_any_pilot():
    for flags, expected in (
        (["--pilot", "200", "--target", "0"], "'0' is not a whole number of rows"),
        (["--pilot", "200", "--target", "1.5"], "'1.5' is not a whole number of rows"),
        (["--pilot", "x", "--target", "1e9"], "'x' is not a whole number"),
        (["--pilot", "4", "--target", "1e9"], "--pilot needs at least 8 rows"),
    ):
        proc = run_cli("plan", "demo", *flags, check=False)
        assert proc.returncode == 2 and expected in proc.stderr, proc.stderr


def test_input_limit_reads_only_the_first_rows(tmp_path):
    from denseforge.pipeline.rundir import RunDir
    from denseforge.pipeline.runner import plan_units

    table = tmp_path / "t.csv"
    table.write_text("url,caption\n" + "".join(f"http://example.com/{i}.jpg,c{i}\n" for i in range(10)))
    config = parse_config(
        {"input": {"kind": "table", "path": str(table), "limit": 4}, "output": {"samples_per_shard": 3}}
    )
    rd = RunDir(tmp_path / "run")
    rd.create(config)
    plan = plan_units(config, rd)
    assert (plan.rows, plan.units) == (4, 2)
    config = parse_config({"input": {"kind": "webdataset", "path": str(tmp_path), "limit": 4}})
    with pytest.raises(ConfigError, match="input.limit reads the first rows of a table or folder"):
        plan_units(config, RunDir(tmp_path / "other"))
