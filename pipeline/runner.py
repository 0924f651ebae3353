"""The Ray DAG: setup check → plan → ingest → embed → dedup → process (load, stages, write) →
finalize, resumable at every unit.

`pipeline/` is the only package that talks to Ray. The per-sample stages come from
`flow.build_stages` and run through the one adapter (`adapter.add_stages`). Work is cut into units
(input files of at most `output.samples_per_shard` rows); each phase leaves a completion marker per
unit (`RunDir`), so `resume` redoes exactly the units that were not finished.
"""

from __future__ import annotations

import errno
import itertools
import json
import os
import shutil
import time
import traceback
from collections.abc import Mapping, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from upath import UPath

from denseforge import __version__
from denseforge.errors import (
    ConfigError,
    DenseforgeError,
    FailedUnitsError,
    Interrupted,
    RunFailedError,
    SetupError,
    StageFailedError,
    shorten,
)
from denseforge.pipeline.accounting import count_traces
from denseforge.pipeline.adapter import ROW_SCHEMA, StageRun, Step, add_stages, replay_units, replayable
from denseforge.pipeline.budget import ErrorBudget, check_ingest
from denseforge.pipeline.cache import OutputCache, prune
from denseforge.pipeline.config import Config, changed_settings, data_settings
from denseforge.pipeline.dedup_phase import run_dedup
from denseforge.pipeline.demo import LoopbackImageServer, build_demo_corpus
from denseforge.pipeline.embed_phase import run_embed
from denseforge.pipeline.flow import build_stages, describe_embed, embed_stages
from denseforge.pipeline.progress import Progress
from denseforge.pipeline.ray_session import (
    LIGHT_TASK_CPUS,
    NodeWatch,
    check_address,
    check_nodes,
    cluster_address,
    one_off,
    start_ray,
)
from denseforge.pipeline.rundir import RunDir
from denseforge.pipeline.stats import finalize_run
from denseforge.stages.ingest import IngestConfig, download_unit, ingest_webdataset_unit, read_raw_unit
from denseforge.stages.read_input import expand_paths, iter_folder_rows, iter_table_rows, table_suffixes, write_units
from denseforge.stages.sample import Reject, Sample
from denseforge.stages.stage import Stage
from denseforge.stages.write import UnitFiles, write_unit
from denseforge.storage import (
    append_text,
    check_store,
    copy_tree,
    ensure_dir,
    is_local,
    location,
    open_binary,
    read_json,
    remove,
    scratch_dir,
    url,
    write_json_atomic,
)


@dataclass
class Plan:
    kind: str
    units: int
    rows: int | None  # None until ingest has counted the rows of webdataset inputs
    sources: list[str] = field(default_factory=list)


# -- plan ------------------------------------------------------------------------------------


def plan_units(config: Config, rd: RunDir) -> Plan:
    """Cut the input into units once; later calls read the saved plan."""
    if rd.plan_file.exists():
        return Plan(**read_json(rd.plan_file))
    inp = config.input
    if inp.path is None:
        raise ConfigError("input.path is not set: give the table, folder or shards to read")
    spp = config.output.samples_per_shard
    options = config.storage.options
    if inp.kind == "webdataset":
        if inp.limit is not None:
            raise ConfigError("input.limit reads the first rows of a table or folder; webdataset shards are read whole")
        tars = [str(p) for p in expand_paths(inp.path, {".tar"}, options)]
        plan = Plan("webdataset", len(tars), None, tars)
    else:
        ensure_dir(rd.units)
        if inp.kind == "table":
            rows = iter_table_rows(inp.path, inp.format, inp.url_col, inp.caption_col, inp.keep_cols, options)
        else:
            rows = iter_folder_rows(inp.path, inp.follow_symlinks)
        if inp.limit is not None:
            rows = itertools.islice(rows, inp.limit)
        result = write_units(rows, rd.units, spp, config.ingest.allow_private_addresses, inp.kind == "folder")
        plan = Plan(inp.kind, result.units, result.rows)
    ensure_dir(rd.units)
    write_json_atomic(rd.plan_file, plan.__dict__)
    return plan


# -- ingest ----------------------------------------------------------------------------------


def _ingest_one(
    unit: int,
    plan_kind: str,
    source: UPath,
    rd: RunDir,
    cfg: IngestConfig,
    samples_per_unit: int,
    allow_files: bool,
    scratch: str | None,
) -> dict[str, Any]:
    if plan_kind == "webdataset":
        return ingest_webdataset_unit(unit, source, rd.raw, rd.ingest_marker(unit), cfg, scratch)
    return download_unit(unit, source, rd.raw, rd.ingest_marker(unit), cfg, samples_per_unit, allow_files, scratch)


def run_ingest(config: Config, rd: RunDir, plan: Plan, progress: Progress) -> int:
    """Download (or convert) every unit without a marker (or with a failed one), `ingest.processes`
    at a time; returns how many units it worked on."""
    import ray

    retry = _failed_ingests(rd)
    pending = sorted(rd.pending("ingest", plan.units) + retry)
    ensure_dir(rd.raw)
    bar = progress.phase("ingest", total=plan.units, done=plan.units - len(pending), unit="unit")
    if not pending:
        bar.close()
        return 0
    task = ray.remote(num_cpus=1, max_retries=config.ingest.unit_retries, retry_exceptions=True)(_ingest_one)
    allow_files = config.input.kind == "folder"
    in_flight: dict[Any, int] = {}
    queue = list(reversed(pending))
    while queue or in_flight:
        while queue and len(in_flight) < config.ingest.processes:
            unit = queue.pop()
            source = (
                location(plan.sources[unit], config.storage.options)
                if plan.kind == "webdataset"
                else rd.unit_file(unit)
            )
            ref = task.remote(
                unit,
                plan.kind,
                source,
                rd,
                config.ingest,
                config.output.samples_per_shard,
                allow_files,
                config.storage.scratch,
            )
            in_flight[ref] = unit
        ready, _ = ray.wait(list(in_flight), num_returns=1)
        unit = in_flight.pop(ready[0])
        try:
            stats = ray.get(ready[0])
            bar.update(1, ok=stats.get("successes", 0), failed=stats["count"] - stats.get("successes", 0))
        except Exception as exc:  # noqa: BLE001 - a unit that keeps failing becomes reject rows
            message = str(exc).strip().splitlines()[-1][:500] if str(exc).strip() else type(exc).__name__
            write_json_atomic(
                rd.ingest_marker(unit),
                {
                    "unit": unit,
                    "failed": message,
                    "count": 0,
                    "source_path": plan.sources[unit] if plan.sources else None,
                },
            )
            bar.update(1, failed_units=1)
            progress.warn(f"unit {rd.unit_name(unit)} failed after {config.ingest.unit_retries} retries: {message}")
    bar.close()
    recovered = sorted(set(retry) - set(_failed_ingests(rd)))
    if recovered:
        # new images can change dedup's decisions anywhere: dedup and every unit's write are redone
        for unit in recovered:
            remove(rd.embed_marker(unit))
        remove(rd.dedup_summary)
        for marker in rd.markers("write"):
            remove(marker)
        progress.note(f"{len(recovered)} failed unit(s) downloaded on retry; dedup and writing are redone")
    return len(pending)


def _failed_ingests(rd: RunDir) -> list[int]:
    """The units whose ingest marker says their download failed (one listing, then the markers)."""
    return [unit for unit, counts in rd.marker_counts("ingest") if counts.get("failed")]


# -- process ---------------------------------------------------------------------------------


def load_units(batch: pa.Table, rd: RunDir, kind: str) -> pa.Table:
    """Read units' raw output back as pipeline rows (one block per unit)."""
    rows: list[dict[str, Any]] = []
    for unit in batch.column("unit").to_pylist():
        unit_file = None if kind == "webdataset" else rd.unit_file(unit)
        screened = None if kind == "webdataset" else rd.screened_file(unit)
        unit_rows = read_raw_unit(unit, unit_file, rd.raw, rd.ingest_marker(unit), screened)
        # by key, not in the order img2dataset's threads finished: everything downstream (the
        # embeddings files, hence k-means) is then a function of the input and the seed alone
        rows += [{**r, "unit_rows": len(unit_rows)} for r in sorted(unit_rows, key=lambda r: r["key"])]
    return pa.Table.from_pylist(rows, schema=ROW_SCHEMA)


def write_units_batch(batch: pa.Table, rd: RunDir) -> pa.Table:
    """Write each unit's rows as a shard + manifest/rejects parts; returns each unit's counts."""
    out = []
    for unit in sorted(set(batch.column("unit").to_pylist())):
        rows = batch.filter(pc.equal(batch.column("unit"), unit)).to_pylist()
        if len(rows) != rows[0]["unit_rows"]:
            raise DenseforgeError(
                f"unit {rd.unit_name(unit)} reached the writer split across blocks ({len(rows)} of "
                f"{rows[0]['unit_rows']} rows); lower output.samples_per_shard"
            )
        files = UnitFiles(rd.shard_file(unit), rd.manifest_part(unit), rd.rejects_part(unit), rd.write_marker(unit))
        counts = write_unit(
            unit,
            files,
            samples=[(Sample.model_validate_json(r["sample"]), r["image"]) for r in rows if r["sample"]],
            rejects=[Reject.model_validate_json(r["reject"]) for r in rows if r["reject"]],
            removed=[json.loads(r["removed"]) for r in rows if r["removed"]],
            stages=count_traces([r["trace"] for r in rows]),
        )
        out.append({"unit": unit, "counts": json.dumps(counts)})
    return pa.Table.from_pylist(out, schema=pa.schema([("unit", pa.int64()), ("counts", pa.string())]))


def check_capacity(config: Config, runs: list[StageRun], cluster: Mapping[str, float]) -> None:
    """The model pools of one pass run at the same time: they must fit the cluster (its `CPU` and
    `GPU` totals) together; a 2-CPU cluster with four 1-CPU pools deadlocks instead of failing. The
    embed pass and the process pass are checked each on its own."""
    for one_pass in (embed_stages(config) if config.embed.enabled else [], runs):
        _check_pass(one_pass, cluster)


def _check_pass(runs: list[StageRun], cluster: Mapping[str, float]) -> None:
    pools = [r for r in runs if r.resources.concurrency is not None]
    for resource, key in (("CPU", "num_cpus"), ("GPU", "num_gpus")):
        wanted = sum(getattr(r.resources, key) * r.resources.concurrency for r in pools)
        wanted += LIGHT_TASK_CPUS if resource == "CPU" else 0
        if wanted > cluster.get(resource, 0):
            names = ", ".join(f"{r.instance} {getattr(r.resources, key):g}x{r.resources.concurrency}" for r in pools)
            raise SetupError(
                f"the stages' worker pools ask for {wanted:g} {resource}s at once ({names}; resources.{key} x "
                f"concurrency, all pools run together, plus {LIGHT_TASK_CPUS} CPU for reading units and running "
                f"light stages) but the cluster has {cluster.get(resource, 0):g}; lower them or add nodes"
            )


def _setup_all(runs: list[StageRun]) -> list[tuple[str, str]]:
    """Run `setup()` of each stage in this worker; (instance, error with traceback) per failure."""
    from denseforge.pipeline.adapter import setup_error

    return [(r.instance, error) for r in runs if (error := setup_error(r)) is not None]


def check_setups(runs: list[StageRun], rd: RunDir, progress: Progress) -> None:
    """Load every stage's model where it will run, before any download: the CPU stages one after
    another in one worker, each GPU stage in a worker with its GPUs. A failure is one line on the
    console (the worker's traceback goes to the run's log) and nothing has been downloaded."""
    import ray

    runs = [r for r in runs if type(r.stage).setup is not Stage.setup]
    if not runs:
        return
    progress.note(f"setup: loading {', '.join(r.instance for r in runs)}")
    task = one_off(_setup_all)  # it holds every model
    on_cpu = [r for r in runs if r.resources.num_gpus == 0]
    refs = [task.options(num_cpus=0).remote(on_cpu)] if on_cpu else []
    refs += [task.options(num_cpus=0, num_gpus=r.resources.num_gpus).remote([r]) for r in runs if r.resources.num_gpus]
    failed = [f for result in ray.get(refs) for f in result]
    if failed:
        append_text(rd.log_file, "".join(f"setup of {instance} failed:\n{error}\n" for instance, error in failed))
        instance, error = failed[0]
        more = f" (and {len(failed) - 1} more stage(s))" if len(failed) > 1 else ""
        raise SetupError(
            f"setup of stage {instance!r} failed: {error.split(chr(10))[0]}{more}; traceback in {rd.log_file}"
        )


def run_process(
    config: Config,
    rd: RunDir,
    plan: Plan,
    runs: list[StageRun],
    progress: Progress,
    budget: ErrorBudget,
    cache: OutputCache | None = None,
) -> int:
    """Stream every unfinished unit through the stages into the shards; the error budget is
    checked as each unit is written. Returns how many units it wrote."""
    import ray

    pending = rd.pending("write", plan.units)
    bar = progress.phase("write", total=plan.units, done=plan.units - len(pending), unit="unit")
    if not pending:
        bar.close()
        return 0
    load = Step(load_units, {"rd": rd, "kind": plan.kind})
    sink = Step(write_units_batch, {"rd": rd})
    if replayable(runs, cache):  # first the units the cache holds whole: no worker pool for them
        # one task per CPU, each through its share of the units: a replay is light Python work,
        # and a task per unit started more worker processes than the work took
        tasks = max(1, min(len(pending), int(ray.cluster_resources().get("CPU", 1))))
        units = ray.data.from_items([{"unit": u} for u in pending], override_num_blocks=tasks)
        replay = units.map_batches(
            replay_units,  # type: ignore[arg-type]  # its keyword arguments come in fn_kwargs
            fn_kwargs={"runs": runs, "load": load, "sink": sink, "cache": cache},
            batch_size=None,
            batch_format="pyarrow",
            num_cpus=1,
        )
        _count_units(replay, bar, budget)
        left = rd.pending("write", plan.units)
        progress.note(f"cache: {len(pending) - len(left)} of {len(pending)} unit(s) replayed whole from the cache")
        if not left:
            bar.close()
            return len(pending)
    else:
        left = pending
    ds = ray.data.from_items([{"unit": u} for u in left], override_num_blocks=len(left))
    _count_units(add_stages(ds, runs, load=load, sink=sink, cache=cache), bar, budget)
    bar.close()
    return len(pending)


def _count_units(ds, bar, budget: ErrorBudget) -> None:
    """Consume a pass: each written unit's counts to the progress bar and the error budget."""
    for result in ds.iter_batches(batch_size=None, batch_format="pyarrow"):
        for row in result.to_pylist():
            counts = json.loads(row["counts"])
            bar.update(1, written=counts["written"], rejected=counts["rejected"], removed=counts["removed"])
            budget.add(counts["stages"])
            budget.check()


# -- the whole run ---------------------------------------------------------------------------


def preflight(config: Config, rd: RunDir) -> list[StageRun]:
    """Build the stage list: installed plugins, their options, the prompt and alias files are
    checked here, before a run directory or a cluster exists. No model is loaded."""
    return build_stages(config, rd)


def _failure_reason(
    rd: RunDir, config: Config, plan: Plan | None, timings: dict[str, float], err: BaseException
) -> str:
    """Leave a failed run resumable and explained: the stats it has so far, and the markers of
    units written while a failing stage was failing removed (so `resume` redoes them). Returns the
    reason `status` shows."""
    reason = str(err).splitlines()[0] if str(err) else type(err).__name__
    if plan is None:
        return reason
    try:
        write_json_atomic(rd.stats, finalize_run(rd, config, plan.rows, timings, complete=False))
    except Exception as exc:  # noqa: BLE001 - the original error matters more (a full disk, say)
        reason += f" (and stats.json could not be written: {type(exc).__name__}: {exc})"
    if isinstance(err, StageFailedError):
        for unit in range(plan.units):
            marker = rd.write_marker(unit)
            if marker.exists() and read_json(marker).get("stages", {}).get(err.stage, {}).get("failed"):
                remove(marker)
    return reason


def execute(
    rd: RunDir,
    config: Config,
    runs: list[StageRun],
    command: str,
    address: str | None = None,
    allow_failed_units: bool = False,
) -> dict[str, Any]:
    """Run (or continue) the pipeline in `rd`; returns the final stats. Any failure leaves
    `status` = failed with the reason, and its traceback in the run's log. Units whose download
    kept failing leave the run `complete_with_failed_units` (exit 3) unless allowed. Every
    invocation is recorded in run.json's history (what it redid, its timings, how it ended); a
    phase's time in stats.json is that of the invocation that did the phase's work."""
    timings: dict[str, float] = {}
    redid: dict[str, Any] = {}
    planned: list[Plan] = []  # filled once the input is planned, for a failure's partial stats
    entry: dict[str, Any] = {
        "command": command,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "redid": redid,
        "timings": timings,
    }
    earlier = rd.read_state().get("timings", {})
    rd.update_state(state="running", reason=None)

    def record(state: str, **fields: Any) -> None:
        history = rd.read_state().get("history", [])
        done = {
            **entry,
            "ended": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "outcome": state,
            "timings": {k: round(v, 3) for k, v in timings.items()},
        }
        rd.update_state(state=state, history=[*history, done], timings={**earlier, **done["timings"]}, **fields)

    try:
        with ExitStack() as stack:
            _execute(rd, config, runs, address, timings, stack, planned, redid)
        plan = planned[0]
        stats = finalize_run(rd, config, plan.rows, {**earlier, **timings})
    except KeyboardInterrupt as exc:
        how = "stopped by SIGTERM" if isinstance(exc, Interrupted) and exc.exit_code == 143 else "interrupted"
        _quietly(lambda: record("interrupted", reason=f"{how}; continue with `denseforge resume {rd.root}`"))
        raise
    except Exception as exc:  # noqa: BLE001 - one line for the user, the traceback in the log
        _log(rd, exc)
        failure = (
            exc
            if isinstance(exc, DenseforgeError)
            else RunFailedError(f"{explain(exc, rd)} (traceback in {rd.log_file})")
        )
        failed_plan = planned[0] if planned else None
        _quietly(
            lambda: record("failed", reason=_failure_reason(rd, config, failed_plan, {**earlier, **timings}, failure))
        )
        if failure is exc:
            raise
        raise failure from exc
    write_json_atomic(rd.stats, stats)
    Progress().summary(stats, rd.root, _example_key(rd))
    failed_units = stats["ingest"]["failed_units"]
    if failed_units and not allow_failed_units:
        reason = (
            f"{failed_units} unit(s) failed to download after their retries; their rows are "
            f"ingest/ingest_failed rejects. `denseforge resume {rd.root}` retries them; "
            "--allow-failed-units accepts the run as it is"
        )
        record("complete_with_failed_units", reason=reason)
        raise FailedUnitsError(reason)
    record("complete", reason=None)
    return stats


def _example_key(rd: RunDir) -> str | None:
    """The key of one written sample, for the summary's `show` command (read from the manifest's
    first row group only)."""
    with open_binary(rd.manifest) as source:
        manifest = pq.ParquetFile(source)
        if not manifest.metadata.num_rows:
            return None
        return manifest.read_row_group(0, columns=["key"]).column("key")[0].as_py()


def _finished(rd: RunDir, config: Config) -> bool:
    """Every unit is written (and no failed download is left to retry): no stage will run."""
    if not rd.plan_file.exists():
        return False
    units = read_json(rd.plan_file)["units"]
    return not rd.pending("write", units) and not _failed_ingests(rd)


def _quietly(step) -> None:
    """Bookkeeping after a failure must not hide it (a full disk refuses run.json too)."""
    try:
        step()
    except OSError:
        pass


def explain(exc: BaseException, rd: RunDir) -> str:
    """One line a user can act on: the root cause behind Ray's wrappers; for a file system error
    the path and what to do."""
    cause: Any = exc
    while getattr(cause, "cause", None) is not None and cause is not cause.cause:  # RayTaskError.cause
        cause = cause.cause
    if isinstance(cause, OSError) and cause.strerror:
        where = cause.filename or rd.root
        if cause.errno == errno.ENOSPC:
            return f"no space left on the device writing {where}; free some space, then `denseforge resume {rd.root}`"
        if cause.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            return f"cannot write {where}: {cause.strerror}; check the permissions of {rd.root}"
        return f"{cause.strerror}: {where}"
    return f"{type(cause).__name__}: {str(cause)[:300]}"


def _log(rd: RunDir, exc: BaseException) -> None:
    try:
        append_text(
            rd.log_file,
            f"{time.strftime('%Y-%m-%d %H:%M:%S')} run failed:\n" + "".join(traceback.format_exception(exc)),
        )
    except OSError:  # a full or read-only disk: the one-line error still reaches the console
        pass


def _execute(
    rd: RunDir,
    config: Config,
    runs: list[StageRun],
    address: str | None,
    timings: dict[str, float],
    stack: ExitStack,
    planned: list[Plan],
    redid: dict[str, Any],
) -> None:
    import ray

    progress = Progress()

    def timed(name: str, phase):
        """Run a phase; its time counts only when it did work, so a resume that finds the phase
        done keeps the time of the invocation that did it."""
        start = time.perf_counter()
        work = phase()
        if work:
            timings[name] = time.perf_counter() - start
        return work

    if config.demo.enabled:
        state = rd.read_state()
        # the demo's web: in the run directory on local disk, in the driver's scratch for a run in
        # an object store (rebuilt, byte for byte, by a resume on another machine)
        web = (
            Path(str(rd.demo / "files"))
            if is_local(rd.root)
            else scratch_dir(config.storage.scratch) / f"denseforge-demo-{os.getpid()}" / "files"
        )
        if not is_local(rd.root):
            stack.callback(shutil.rmtree, web.parent, True)
        server = stack.enter_context(LoopbackImageServer(web, port=state.get("demo_port", 0)))
        fresh_demo = not rd.plan_file.exists()
        corpus = build_demo_corpus(
            web,
            rd.demo / "input.parquet" if fresh_demo else None,
            server.base_url,
            config.demo.copies,
            config.demo.include_broken,
        )
        if fresh_demo:
            config.input.path = str(corpus.table)
            rd.update_state(demo_port=server.port)
            progress.note(
                f"demo: serving {corpus.images} images (+{corpus.rows - corpus.images} broken rows) "
                f"on {server.base_url}"
            )
    start = time.perf_counter()
    rd.update_state(ray_logs=start_ray(config.ray, address))
    stack.callback(ray.shutdown)
    check_nodes(is_local(rd.root), config, config.input.kind != "table" and "://" not in (config.input.path or ""))
    timings["ray_init_s"] = time.perf_counter() - start
    stack.enter_context(NodeWatch(config.ray.node_loss_timeout_s, progress))
    embed = embed_stages(config) if config.embed.enabled else []
    start = time.perf_counter()
    if not _finished(rd, config):  # a resume with nothing left to do loads no model
        check_capacity(config, runs, ray.cluster_resources())
        check_setups(embed + runs, rd, progress)
        timings["setup_s"] = time.perf_counter() - start
    fresh = not rd.plan_file.exists()
    start = time.perf_counter()
    plan = plan_units(config, rd)
    planned.append(plan)
    if fresh:
        timings["plan_s"] = time.perf_counter() - start
    progress.note(f"plan: {plan.units} unit(s)" + (f", {plan.rows} input rows" if plan.rows is not None else ""))
    if embed:
        progress.note(describe_embed(config, ray.cluster_resources().get("CPU", 1)))
    budget = ErrorBudget(embed + runs, config.run.error_rate_min_items)
    budget.load(rd, plan.units)
    redid["ingest_units"] = timed("ingest_s", lambda: run_ingest(config, rd, plan, progress))
    check_ingest(rd, config.ingest.max_error_rate, config.run.error_rate_min_items)
    if embed:
        redid["embed_units"] = timed("embed_s", lambda: run_embed(config, rd, plan.units, progress, load_units, budget))
        budget.check()
    if config.dedup.enabled:
        redid["dedup"] = not rd.dedup_summary.exists()
        timed("dedup_s", lambda: redid["dedup"] and run_dedup(config, rd, plan.units, progress))
    cache = output_cache(config, rd)
    redid["write_units"] = timed("process_s", lambda: run_process(config, rd, plan, runs, progress, budget, cache))
    budget.check(final=True)
    if cache is not None and config.cache.max_gb is not None:
        prune(cache.root, int(config.cache.max_gb * 2**30))


def output_cache(config: Config, rd: RunDir) -> OutputCache | None:
    """The cache model stages go through: the run's own (or `cache.path`), and for a run derived
    with `--from` the cache of the run it comes from, read only."""
    if not config.cache.enabled:
        return None
    source = rd.read_state().get("derived_from") or {}
    also = tuple(location(c, config.storage.options) for c in source.get("caches", []))
    return OutputCache(rd.cache_root(config), url(rd.root), also)


def check_stores(config: Config, rd: RunDir, fresh: bool) -> None:
    """Before a cluster starts or anything is created: the run's store and the input's answer (a
    missing bucket, wrong credentials, an unreachable endpoint are one line naming the URL)."""
    check_store(rd.root, "--out" if fresh else "run directory")
    inp = config.input
    if fresh and inp.path is not None:
        if "://" in inp.path and not inp.path.startswith("file://"):
            check_store(location(inp.path, config.storage.options), "input.path")
        if inp.kind == "webdataset":  # one listing: the input holds files of its kind
            expand_paths(inp.path, {".tar"}, config.storage.options)
        elif inp.kind == "table":
            expand_paths(inp.path, table_suffixes(inp.format), config.storage.options)
        else:  # a folder of this machine, with at least one image
            next(iter_folder_rows(inp.path, inp.follow_symlinks), None)


def run(
    config: Config,
    out: UPath,
    address: str | None = None,
    allow_failed_units: bool = False,
    against: Sequence[UPath] = (),
) -> dict[str, Any]:
    """Start a new run in `out` (a local folder or an object-store URL); its input is
    deduplicated against the written images of the runs in `against`, which are only read."""
    rd = RunDir(location(out, config.storage.options))
    runs = preflight(config, rd)
    if against and not (config.embed.enabled and config.dedup.enabled):
        raise ConfigError("--against deduplicates against earlier runs' embeddings: it needs embed and dedup enabled")
    earlier = [url(check_earlier(config, RunDir(location(a, config.storage.options)), "--against")) for a in against]
    check_address(cluster_address(address, config.ray), config.ray.connect_timeout_s)
    check_stores(config, rd, fresh=True)
    rd.create(config)
    if earlier:
        rd.update_state(against=earlier)
    with rd.locked("run"):
        return execute(rd, config, runs, "run", address, allow_failed_units)


def resume(
    root: UPath, address: str | None = None, allow_failed_units: bool = False, redo_changed: bool = False
) -> dict[str, Any]:
    """Finish a run that stopped for any reason; finished units are kept, the rest (and units
    whose download failed) redone. Settings that decide what is written must be those the run
    started with, or (`redo_changed`) the phases they affect are redone for every unit."""
    rd = RunDir(root)
    check_store(rd.root, "run directory")
    config = rd.load_config()
    rd = RunDir(location(str(root), config.storage.options))
    runs = preflight(config, rd)
    check_address(cluster_address(address, config.ray), config.ray.connect_timeout_s)
    with rd.locked("resume"):
        before = rd.read_state().get("settings")
        now = data_settings(config)
        changed = changed_settings(before, now) if before is not None else {}
        if changed:
            redo_settings(rd, changed, redo_changed)
        if changed or before is None:  # a run started before settings were recorded: from now on
            rd.update_state(settings=now)
        return execute(rd, config, runs, "resume", address, allow_failed_units)


# The phases in order, and the first each setting affects by its key's start (the rest: process).
PHASES = ("input", "ingest", "embed", "dedup", "process")
FIRST_PHASE = {
    "input.": "input",
    "demo.": "input",
    "output.samples_per_shard": "input",
    "ingest.": "ingest",
    "embed.": "embed",
    "run.seed": "embed",
    "dedup.": "dedup",
    "select.": "dedup",
}


def first_phase(changed: Mapping[str, Any]) -> str:
    """The first phase the changed settings affect (process when none is named)."""
    return min(
        (next((p for k, p in FIRST_PHASE.items() if key.startswith(k)), "process") for key in changed),
        key=PHASES.index,
        default="process",
    )


def describe_changes(changed: dict[str, tuple[Any, Any]]) -> str:
    what = "; ".join(f"{key}: {shorten(a, 30)} -> {shorten(b, 30)}" for key, (a, b) in list(changed.items())[:5])
    return what + (f" and {len(changed) - 5} more" if len(changed) > 5 else "")


def redo_settings(rd: RunDir, changed: dict[str, tuple[Any, Any]], redo: bool) -> None:
    """Refuse a resume whose data settings changed, naming them; with `redo`, drop the completion
    markers of the first phase they affect and of every phase after it, so those are redone whole."""
    first = first_phase(changed)
    what = describe_changes(changed)
    if first == "input":
        raise ConfigError(f"{rd.config_file} changed what the run reads ({what}); start a new run for that")
    if not redo:
        raise ConfigError(
            f"{rd.config_file} changed since the run started ({what}): units finished under the old "
            f"settings would not match the new. Put the old values back, or `denseforge resume {rd.root} "
            f"--redo-changed` to redo the {first} phase and those after it for every unit"
        )
    phases = PHASES[PHASES.index(first) :]
    stale = [
        *(rd.markers("ingest") if "ingest" in phases else []),
        *(rd.markers("embed") if "embed" in phases else []),
        *([rd.dedup_summary] if "dedup" in phases else []),
        *rd.markers("write"),
    ]
    for marker in stale:
        remove(marker)


# Settings that name the embedding model: embeddings of different models are never compared
EMBEDDING_MODEL = ("embed.model", "embed.pretrained", "embed.checkpoint", "embed.weights", "embed.seed")


def check_earlier(config: Config, earlier: RunDir, flag: str) -> UPath:
    """An earlier run this one reads (`--from`, `--against`): finished, by this version, with the
    same embedding model (embeddings of different models are never compared). Returns its root."""
    check_store(earlier.root, flag)
    earlier.check_run()
    state = earlier.read_state()
    where = f"{flag} {url(earlier.root)}"
    if state.get("denseforge") != __version__ or state.get("settings") is None:
        raise ConfigError(
            f"{where}: made by denseforge {state.get('denseforge', 'before 0.1')}, this is {__version__}; "
            f"its files may not mean what this version reads. Start a new run without {flag}"
        )
    if state.get("state") not in ("complete", "complete_with_failed_units"):
        raise ConfigError(
            f"{where}: that run is {state.get('state')}; finish it first (`denseforge resume {earlier.root}`)"
        )
    changed = changed_settings(state["settings"], data_settings(config))
    model = {k: v for k, v in changed.items() if k in EMBEDDING_MODEL}
    if model:
        raise ConfigError(
            f"{where}: a different embedding model ({describe_changes(model)}); its embeddings cannot be "
            f"reused or compared with this run's. Start a new run without {flag}"
        )
    return earlier.root


def derive(
    config: Config, out: UPath, source: UPath, address: str | None = None, allow_failed_units: bool = False
) -> dict[str, Any]:
    """A new run in `out` from an earlier one's downloaded images, the phases its settings leave
    as they were (copied, the earlier run only read) and its cache of stage outputs: only what the
    changed settings affect is computed again."""
    src = RunDir(location(source, config.storage.options))
    check_earlier(config, src, "--from")
    where = f"--from {url(src.root)}"
    state = src.read_state()
    changed = changed_settings(state["settings"], data_settings(config))
    first = first_phase(changed)
    if first in ("input", "ingest"):
        raise ConfigError(
            f"{where}: this config changes what is read or downloaded ({describe_changes(changed)}), and "
            "--from reuses that run's downloads. Put those settings back, or start a new run without --from"
        )
    rd = RunDir(location(out, config.storage.options))
    runs = preflight(config, rd)
    check_address(cluster_address(address, config.ray), config.ray.connect_timeout_s)
    check_store(rd.root, "--out")
    rd.create(config)
    reused = ["input", "ingest", *PHASES[PHASES.index("embed") : PHASES.index(first)]]
    with rd.locked("run"):
        for folder, phase in ((src.units, "input"), (src.raw, "ingest"), (src.embeddings, "embed")):
            if phase in reused:
                copy_tree(folder, rd.root / folder.name)
        if "dedup" in reused and src.dedup_summary.exists():
            copy_tree(src.dedup, rd.dedup, skip=(src.buckets.name, src.bucket_parts.name))
        # the earlier run's cache, and those it read itself (a run derived from a derived run)
        caches = [url(src.cache_root(src.load_config())), *(state.get("derived_from") or {}).get("caches", [])]
        rd.update_state(
            derived_from={"run": url(src.root), "reused": reused, "changed": sorted(changed), "caches": caches},
            against=state.get("against", []),
            demo_port=state.get("demo_port"),
        )
        return execute(rd, config, runs, "run --from", address, allow_failed_units)
