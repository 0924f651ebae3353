"""The Ray DAG: plan → ingest → process (load … write) → finalize, resumable at every unit.

`pipeline/` is the only package that talks to Ray (this module, `ray_session`, and the
`*_phase` modules for embed/dedup, perceive and fuse). Stages come from `denseforge.stages` and
know nothing of it. Work is cut into units (input shards); each phase leaves a completion marker
per unit, so `resume` redoes exactly the units that were not finished.
"""

from __future__ import annotations

import json
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from denseforge.errors import DenseforgeError
from denseforge.pipeline.config import Config, IngestConfig
from denseforge.pipeline.dedup_phase import apply_decisions, run_dedup, run_embed
from denseforge.pipeline.demo import LoopbackImageServer, build_demo_corpus
from denseforge.pipeline.fuse_phase import add_fuse
from denseforge.pipeline.perceive_phase import add_perceive, plan_experts
from denseforge.pipeline.progress import Progress
from denseforge.pipeline.ray_session import LIGHT_TASK_CPUS, start_ray
from denseforge.pipeline.rundir import RunDir
from denseforge.pipeline.stats import finalize_run
from denseforge.stages.files import write_json_atomic
from denseforge.stages.fuse import PromptTemplate
from denseforge.stages.ground import read_aliases
from denseforge.stages.image_normalize import ImageNormalizer
from denseforge.stages.ingest import (
    DownloadSettings, download_unit, ingest_webdataset_unit, marker_path, read_raw_unit,
)
from denseforge.stages.read_input import expand_paths, iter_folder_rows, iter_table_rows, write_units
from denseforge.stages.write import done_marker, write_unit

ROW_SCHEMA = pa.schema([("unit", pa.int64()), ("unit_rows", pa.int64()), ("key", pa.string()),
                        ("image", pa.binary()), ("sample", pa.string()), ("reject", pa.string()),
                        ("removed", pa.string())])


@dataclass
class Plan:
    kind: str
    units: int
    rows: int | None  # None until ingest has counted the rows of webdataset inputs
    sources: list[str] = field(default_factory=list)


def make_normalizer(cfg: IngestConfig) -> ImageNormalizer:
    return ImageNormalizer(
        image_size=cfg.image_size, resize_mode=cfg.resize_mode, resize_only_if_bigger=cfg.resize_only_if_bigger,
        min_image_size=cfg.min_image_size, max_aspect_ratio=cfg.max_aspect_ratio,
        max_image_pixels=cfg.max_image_pixels, encode_quality=cfg.encode_quality,
    )


def make_download_settings(config: Config) -> DownloadSettings:
    cfg = config.ingest
    return DownloadSettings(
        threads=cfg.threads, timeout_s=cfg.timeout_s, retries=cfg.retries,
        samples_per_shard=config.output.samples_per_shard,
        allow_private_addresses=cfg.allow_private_addresses, allow_files=config.input.kind == "folder",
        max_download_bytes=cfg.max_download_bytes, user_agent_token=cfg.user_agent_token,
    )


# -- plan ------------------------------------------------------------------------------------


def plan_units(config: Config, rd: RunDir) -> Plan:
    """Cut the input into units once; later calls read the saved plan."""
    if rd.plan_file.exists():
        return Plan(**json.loads(rd.plan_file.read_text()))
    inp = config.input
    spp = config.output.samples_per_shard
    if inp.kind == "webdataset":
        tars = [str(p) for p in expand_paths(inp.path, {".tar"})]
        plan = Plan("webdataset", len(tars), None, tars)
    else:
        rd.units.mkdir(parents=True, exist_ok=True)
        if inp.kind == "table":
            rows = iter_table_rows(inp.path, inp.format, inp.url_col, inp.caption_col, inp.keep_cols)
        else:
            rows = iter_folder_rows(inp.path)
        result = write_units(rows, rd.units, spp, config.ingest.allow_private_addresses, inp.kind == "folder")
        plan = Plan(inp.kind, result.units, result.rows)
    rd.units.mkdir(parents=True, exist_ok=True)
    write_json_atomic(rd.plan_file, plan.__dict__)
    return plan


# -- ingest ----------------------------------------------------------------------------------


def _ingest_one(unit: int, plan_kind: str, source: str, raw_dir: str, normalizer: ImageNormalizer,
                settings: DownloadSettings) -> dict[str, Any]:
    if plan_kind == "webdataset":
        return ingest_webdataset_unit(unit, Path(source), Path(raw_dir), normalizer)
    return download_unit(unit, Path(source), Path(raw_dir), normalizer, settings)


def run_ingest(config: Config, rd: RunDir, plan: Plan, progress: Progress) -> None:
    """Download (or convert) every unit without a marker, `ingest.processes` at a time."""
    import ray

    pending = [u for u in range(plan.units) if not marker_path(rd.raw, u).exists()]
    rd.raw.mkdir(parents=True, exist_ok=True)
    bar = progress.phase("ingest", total=plan.units, done=plan.units - len(pending), unit="shard")
    if not pending:
        bar.close()
        return
    task = ray.remote(num_cpus=1, max_retries=config.ingest.shard_retries, retry_exceptions=True)(_ingest_one)
    normalizer, settings = make_normalizer(config.ingest), make_download_settings(config)
    in_flight: dict[Any, int] = {}
    queue = list(reversed(pending))
    while queue or in_flight:
        while queue and len(in_flight) < config.ingest.processes:
            unit = queue.pop()
            source = plan.sources[unit] if plan.kind == "webdataset" else str(rd.unit_file(unit))
            in_flight[task.remote(unit, plan.kind, source, str(rd.raw), normalizer, settings)] = unit
        ready, _ = ray.wait(list(in_flight), num_returns=1)
        unit = in_flight.pop(ready[0])
        try:
            stats = ray.get(ready[0])
            bar.update(1, ok=stats.get("successes", 0), failed=stats["count"] - stats.get("successes", 0))
        except Exception as exc:  # noqa: BLE001 - a unit that keeps failing becomes reject rows
            message = str(exc).strip().splitlines()[-1][:500] if str(exc).strip() else type(exc).__name__
            write_json_atomic(marker_path(rd.raw, unit), {"unit": unit, "failed": message, "count": 0,
                                                          "source_path": plan.sources[unit] if plan.sources else None})
            bar.update(1, failed_units=1)
            progress.warn(f"unit {unit:07d} failed after {config.ingest.shard_retries} retries: {message}")
    bar.close()


# -- process ---------------------------------------------------------------------------------


def load_units(batch: pa.Table, root: str, kind: str) -> pa.Table:
    """Read units' raw output back as pipeline rows (one block per unit)."""
    rd = RunDir(Path(root))
    rows: list[dict[str, Any]] = []
    for unit in batch.column("unit").to_pylist():
        unit_file = None if kind == "webdataset" else rd.unit_file(unit)
        screened = None if kind == "webdataset" else rd.screened_file(unit)
        unit_rows = read_raw_unit(unit, unit_file, rd.raw, screened)
        rows += [{**r, "unit_rows": len(unit_rows)} for r in unit_rows]
    return pa.Table.from_pylist(rows, schema=ROW_SCHEMA)


def write_units_batch(batch: pa.Table, root: str) -> pa.Table:
    """Write each unit's rows as a shard + manifest/rejects parts; returns per-unit counts."""
    shards = RunDir(Path(root)).shards
    counts = []
    for unit in sorted(set(batch.column("unit").to_pylist())):
        rows = batch.filter(pc.equal(batch.column("unit"), unit)).to_pylist()
        if len(rows) != rows[0]["unit_rows"]:
            raise DenseforgeError(
                f"unit {unit:07d} reached the writer split across blocks ({len(rows)} of "
                f"{rows[0]['unit_rows']} rows); lower output.samples_per_shard")
        counts.append(write_unit(unit, rows, shards))
    return pa.Table.from_pylist([{k: c[k] for k in ("unit", "written", "rejected", "removed")} for c in counts])


def run_process(config: Config, rd: RunDir, plan: Plan, progress: Progress) -> None:
    """Stream every unfinished unit through the per-image stages into the shards."""
    import ray

    pending = [u for u in range(plan.units) if not done_marker(rd.shards, u).exists()]
    bar = progress.phase("write", total=plan.units, done=plan.units - len(pending), unit="shard")
    if not pending:
        bar.close()
        return
    ds = ray.data.from_items([{"unit": u} for u in pending], override_num_blocks=len(pending))
    ds = ds.map_batches(load_units, fn_kwargs={"root": str(rd.root), "kind": plan.kind}, batch_size=1,
                        batch_format="pyarrow", num_cpus=LIGHT_TASK_CPUS)
    if config.dedup.enabled:
        ds = ds.map_batches(apply_decisions, fn_kwargs={"root": str(rd.root)}, batch_size=None, batch_format="pyarrow",
                            num_cpus=LIGHT_TASK_CPUS)
    if config.perceive.enabled:
        ds = add_perceive(ds, config)
    if config.fuse.enabled:
        ds = add_fuse(ds, config)
    ds = ds.map_batches(write_units_batch, fn_kwargs={"root": str(rd.root)}, batch_size=None,
                        batch_format="pyarrow", num_cpus=LIGHT_TASK_CPUS)
    for result in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
        for row in result.to_pylist():
            bar.update(1, written=row["written"], rejected=row["rejected"], removed=row["removed"])
    bar.close()


# -- the whole run ---------------------------------------------------------------------------


def preflight(config: Config) -> list[str]:
    """Checks that need more than the config schema (installed plugins, their options, the prompt
    and alias files), so such mistakes fail before a run directory or a cluster exists. Returns
    the expert instances in the order they will run."""
    order = [spec.instance for spec, _, _ in plan_experts(config.perceive)] if config.perceive.enabled else []
    if config.fuse.enabled:
        if config.fuse.backend != "template":
            PromptTemplate.load(config.fuse.prompt_file, config.fuse.word_limit)
        read_aliases(config.fuse.ground_aliases)
    return order


def execute(rd: RunDir, config: Config, address: str | None = None) -> dict[str, Any]:
    """Run (or continue) the pipeline in `rd`; returns the final stats."""
    import ray

    progress = Progress()
    timings: dict[str, float] = {}
    with ExitStack() as stack:
        if config.demo.enabled:
            state = rd.read_state()
            server = stack.enter_context(LoopbackImageServer(rd.demo / "files", port=state.get("demo_port", 0)))
            if not rd.plan_file.exists():
                corpus = build_demo_corpus(rd.demo, server.base_url, config.demo.copies, config.demo.include_broken)
                config.input.path = str(corpus.table)
                rd.update_state(demo_port=server.port)
                progress.note(f"demo: serving {corpus.images} images (+{corpus.rows - corpus.images} broken rows) on {server.base_url}")
        start = time.perf_counter()
        plan = plan_units(config, rd)
        timings["plan_s"] = time.perf_counter() - start
        progress.note(f"plan: {plan.units} unit(s)" + (f", {plan.rows} input rows" if plan.rows is not None else ""))
        start = time.perf_counter()
        start_ray(config.ray, address)
        stack.callback(ray.shutdown)
        timings["ray_init_s"] = time.perf_counter() - start
        start = time.perf_counter()
        run_ingest(config, rd, plan, progress)
        timings["ingest_s"] = time.perf_counter() - start
        if config.embed.enabled:
            start = time.perf_counter()
            run_embed(config, rd, plan.units, progress, load_units)
            timings["embed_s"] = time.perf_counter() - start
        if config.dedup.enabled:
            start = time.perf_counter()
            run_dedup(config, rd, plan.units, progress)
            timings["dedup_s"] = time.perf_counter() - start
        start = time.perf_counter()
        run_process(config, rd, plan, progress)
        timings["process_s"] = time.perf_counter() - start
    start = time.perf_counter()
    stats = finalize_run(rd, config, plan.rows, timings)
    stats["timings"]["finalize_s"] = time.perf_counter() - start
    write_json_atomic(rd.stats, stats)
    rd.update_state(state="complete")
    progress.summary(stats, rd.root)
    return stats


def run(config: Config, out: Path, address: str | None = None) -> dict[str, Any]:
    """Start a new run in `out`."""
    preflight(config)
    rd = RunDir(out)
    rd.create(config)
    return execute(rd, config, address)


def resume(root: Path, address: str | None = None) -> dict[str, Any]:
    """Finish a run that stopped for any reason; finished units are kept, the rest redone."""
    rd = RunDir(root)
    config = rd.load_config()
    preflight(config)
    return execute(rd, config, address)

