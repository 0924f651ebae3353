"""`denseforge plan`: what a run of the target size will cost, projected from pilot runs.

Two pilot runs of the user's own config on the first N/4 and N rows of their input (in a
temporary folder) give, per phase, a fixed part and a part per input row (a straight line
through the two points), and the disk a run uses per row. The projection for M rows on a cluster
scales the per-row part by the cluster's CPUs (or GPUs, for the phases whose stages use them)
against this machine's: wall time per phase, the bottleneck phase, node-hours, cost, disk. The
pilots' per-stage busy seconds per image and the captioner's seconds per call are reported as
measured. What it assumes is in the output's `assumptions`.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml
from pydantic import Field, ValidationError

from denseforge.errors import ConfigError
from denseforge.pipeline.config import Config
from denseforge.plugin import Settings

# the timed parts of a run, in order (runner.execute's timings), then what is left of its wall
PARTS = ("ray_init_s", "setup_s", "plan_s", "ingest_s", "embed_s", "dedup_s", "process_s", "other_s")
FIXED = ("ray_init_s", "setup_s")  # once per run, whatever its size


class ClusterSpec(Settings):
    """The cluster a plan projects to (`--cluster FILE`, YAML); without one, this machine."""

    nodes: int = Field(1, ge=1)
    cpus_per_node: int | None = Field(None, ge=1, description="null: this machine's CPUs")
    gpus_per_node: int = Field(0, ge=0)
    price_per_node_hour: float | None = Field(None, ge=0, description="in any currency; null: no cost")


def load_cluster(path: str | None) -> ClusterSpec:
    if path is None:
        return ClusterSpec()
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"--cluster {path}: {exc}") from None
    try:
        return ClusterSpec.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "(top level)"
        keys = ", ".join(ClusterSpec.model_fields)
        raise ConfigError(f"--cluster {path}: {where}: {first['msg']} (keys: {keys})") from None


def disk_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def pilot(config: Config, rows: int, out: Path) -> dict[str, Any]:
    """One pilot run of `config` on the first `rows` input rows: its timings (with `other_s`, the
    wall the phases leave), rows, disk and stats."""
    from denseforge.pipeline.runner import run
    from denseforge.storage import location

    cfg = config.model_copy(deep=True)
    cfg.input.limit = rows
    cfg.cache.path = None  # its own cache: a shared one's hits would time work the target run must do
    start = time.perf_counter()
    stats = run(cfg, location(out), allow_failed_units=True)
    wall = time.perf_counter() - start
    timings = {k: stats["timings"].get(k, 0.0) for k in PARTS[:-1]}
    timings["other_s"] = max(0.0, wall - sum(timings.values()))
    return {
        "rows": stats["funnel"]["input_rows"],
        "wall_s": wall,
        "timings": timings,
        "disk": disk_bytes(out),
        "stats": stats,
    }


def _gpu_parts(config: Config) -> set[str]:
    """The phases whose model stages ask for GPUs (they scale with the cluster's GPUs)."""
    parts = set()
    if config.embed.enabled and config.embed.num_gpus:
        parts.add("embed_s")
    if config.dedup.enabled and config.dedup.num_gpus:
        parts.add("dedup_s")
    experts = config.perceive.experts if config.perceive.enabled else []
    if any(e.resources.get("num_gpus") for e in experts) or (config.fuse.enabled and config.fuse.num_gpus):
        parts.add("process_s")
    return parts


def project(
    small: dict[str, Any], large: dict[str, Any], target: int, cluster: ClusterSpec, config: Config
) -> dict[str, Any]:
    """Per part: fixed + per-row x rows / speed-up, from the two pilots' straight line."""
    here_cpus = os.cpu_count() or 1
    here_gpus = _gpus_here()
    cpus = cluster.nodes * (cluster.cpus_per_node or here_cpus)
    gpus = cluster.nodes * cluster.gpus_per_node
    gpu_parts = _gpu_parts(config)
    span = large["rows"] - small["rows"]
    parts: dict[str, dict[str, float]] = {}
    for part in PARTS:
        t_small, t_large = small["timings"][part], large["timings"][part]
        per_row = max(0.0, (t_large - t_small) / span) if span > 0 else t_large / max(large["rows"], 1)
        fixed = t_large if part in FIXED else max(0.0, t_large - per_row * large["rows"])
        if part in FIXED:
            per_row = 0.0
        speedup = (gpus / here_gpus) if part in gpu_parts and here_gpus and gpus else cpus / here_cpus
        parts[part] = {
            "fixed_s": round(fixed, 3),
            "per_row_ms": round(1000 * per_row, 3),
            "speedup": round(speedup, 2),
            "projected_s": round(fixed + per_row * target / speedup, 1),
        }
    wall = sum(p["projected_s"] for p in parts.values())
    disk_per_row = (large["disk"] - small["disk"]) / span if span > 0 else large["disk"] / max(large["rows"], 1)
    disk_fixed = max(0.0, large["disk"] - disk_per_row * large["rows"])
    node_hours = wall / 3600 * cluster.nodes
    bottleneck = max((p for p in PARTS if p not in FIXED), key=lambda p: parts[p]["projected_s"])
    return {
        "target_rows": target,
        "wall_s": round(wall, 1),
        "wall_h": round(wall / 3600, 2),
        "node_hours": round(node_hours, 2),
        "cost": None if cluster.price_per_node_hour is None else round(node_hours * cluster.price_per_node_hour, 2),
        "disk_bytes": int(disk_fixed + disk_per_row * target),
        "disk_per_row_bytes": round(disk_per_row, 1),
        "bottleneck": bottleneck.removesuffix("_s"),
        "parts": {p.removesuffix("_s"): v for p, v in parts.items()},
    }


def _gpus_here() -> int:
    try:
        import torch

        return torch.cuda.device_count()
    except Exception:  # noqa: BLE001 - no torch or no CUDA: none
        return 0


def stage_costs(stats: dict[str, Any]) -> dict[str, dict[str, float | None]]:
    """Per stage of the larger pilot: items, busy seconds per item (a model call's latency, for the
    captioner), the stage's share of the busy time."""
    stages = stats.get("stages", {})
    total = sum(c["busy_s"] for c in stages.values()) or 1.0
    return {
        name: {
            "items": c["items"],
            "busy_s_per_item": round(c["busy_s"] / c["items"], 4) if c["items"] else None,
            "share_of_busy": round(c["busy_s"] / total, 3),
        }
        for name, c in stages.items()
    }


def make_plan(config: Config, pilot_rows: int, target: int, cluster: ClusterSpec) -> dict[str, Any]:
    """Two pilots (pilot_rows // 4 and pilot_rows rows) in a temporary folder, then the projection."""
    if config.input.kind == "webdataset":
        raise ConfigError(
            "plan: pilots read the first rows of a table or folder; webdataset input is not supported yet"
        )
    if pilot_rows < 8:
        raise ConfigError("plan: --pilot needs at least 8 rows (two pilots, of N/4 and N rows)")
    if target < 1:
        raise ConfigError("plan: --target is a number of input rows, at least 1")
    with tempfile.TemporaryDirectory(prefix="denseforge-plan-") as tmp:
        small = pilot(config, pilot_rows // 4, Path(tmp) / "small")
        large = pilot(config, pilot_rows, Path(tmp) / "large")
    if large["rows"] <= small["rows"]:
        raise ConfigError(
            f"plan: the input has only {large['rows']} rows; give a --pilot below that, or a bigger input"
        )
    projection = project(small, large, target, cluster, config)
    return {
        "plan": projection,
        "cluster": cluster.model_dump(),
        "this_machine": {"cpus": os.cpu_count(), "gpus": _gpus_here()},
        "pilots": [
            {"rows": p["rows"], "wall_s": round(p["wall_s"], 2), "disk_bytes": p["disk"], "timings": p["timings"]}
            for p in (small, large)
        ],
        "stages": stage_costs(large["stats"]),
        "assumptions": [
            "each phase's time is a fixed part plus a part per input row, from the two pilots",
            "the per-row part divides by the cluster's CPUs (GPUs for phases whose stages ask for GPUs) "
            "over this machine's: perfect scaling, so read the projection as a lower bound on a cluster",
            "downloads scale with CPUs too: the network and the sites' limits are not measured",
            "the input's first rows stand for the rest (dead-link rate, image sizes, duplicates)",
            "a captioner's tokens are not recorded: its cost shows as the fuse stage's seconds per item",
        ],
    }


def summary(result: dict[str, Any]) -> str:
    """The plan in a few lines for the console."""
    plan, cluster = result["plan"], result["cluster"]
    where = f"{cluster['nodes']} node(s) x {cluster['cpus_per_node'] or result['this_machine']['cpus']} CPUs"
    if cluster["gpus_per_node"]:
        where += f" + {cluster['gpus_per_node']} GPUs"
    lines = [
        f"plan: {plan['target_rows']:,} input rows on {where}: {plan['wall_h']} h wall, "
        f"{plan['node_hours']} node-hours" + ("" if plan["cost"] is None else f", cost {plan['cost']}"),
        f"  disk: {plan['disk_bytes'] / 2**30:,.1f} GiB ({plan['disk_per_row_bytes'] / 1024:.1f} KiB per input row); "
        f"bottleneck: {plan['bottleneck']}",
    ]
    for name, part in plan["parts"].items():
        lines.append(
            f"  {name:<9} {part['projected_s']:>12,.1f} s  ({part['fixed_s']:.1f} s fixed + "
            f"{part['per_row_ms']:.2f} ms/row / {part['speedup']})"
        )
    lines.append("  pilots: " + ", ".join(f"{p['rows']} rows in {p['wall_s']} s" for p in result["pilots"]))
    lines.append("  assumes: " + result["assumptions"][1])
    return "\n".join(lines)
