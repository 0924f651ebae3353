"""The one Ray adapter: runs any `Stage` over Ray Data blocks of pipeline rows.

A block is one unit's rows. The adapter is the only code that reads and writes those rows: it
skips rows already rejected or removed, parses each live sample once, calls the stage in batches
of `resources.batch_size` (halved after a CUDA out-of-memory error), splits a failing batch down to
the failing item, turns verdicts into reject/removed rows or a recorded error, and re-encodes.
Stages of one `group` (next to each other in the flow) share a worker: one process and one CUDA
context for their models, each record parsed and each image decoded once for all of them. Light
stages run in the next CPU worker, and a pass ends in its sink, a worker that lives for the whole
pass (see `add_stages`). Every row carries a `trace`: per stage, its share of the busy seconds, the
Ray node it ran on, and how it ended (failed with an exception type, rejected with a reason,
removed). The writer sums the traces per unit into the unit's completion marker, which is where
stats, `status` and the error budget read them from.
"""

from __future__ import annotations

import functools
import json
import pickle
import socket
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from denseforge.errors import ConfigError
from denseforge.pipeline.accounting import TraceEntry
from denseforge.pipeline.cache import OutputCache
from denseforge.pipeline.ray_session import LIGHT_TASK_CPUS
from denseforge.stages.sample import Reject, Sample
from denseforge.stages.stage import Item, Rejection, Removal, StageRun, Verdict

# a sink worker writes units as fast as a few CPUs' worth of model workers produce them
CPUS_PER_SINK_WORKER = 8
# fmt: off
ROW_SCHEMA = pa.schema([
    ("unit", pa.int64()), ("unit_rows", pa.int64()), ("key", pa.string()), ("image", pa.binary()),
    ("sample", pa.string()), ("reject", pa.string()), ("removed", pa.string()), ("trace", pa.string()),
    ("outputs", pa.binary()),
])
# fmt: on


@functools.cache
def node_name() -> str:
    """This worker's Ray node as `status` and the node watch name it: its IP and the start of its
    id (several nodes may share a host); the host name outside Ray."""
    try:
        import ray

        if ray.is_initialized():
            return f"{ray.util.get_node_ip_address()} ({ray.get_runtime_context().get_node_id()[:8]})"
    except Exception:  # noqa: BLE001 - no Ray here: the host is the node
        pass
    return socket.gethostname()


def is_out_of_memory(exc: BaseException) -> bool:
    name = type(exc).__name__
    return name == "OutOfMemoryError" or ("out of memory" in str(exc).lower() and "cuda" in str(exc).lower())


def call_isolated(
    process: Callable[[list[Item]], Sequence[Verdict]], items: list[Item], on_oom: Callable[[], None] | None = None
) -> list[Verdict]:
    """One verdict per item; a failing call is split in halves until the failing items are alone
    (their verdict is then the exception). A wrong number of verdicts counts as a failure."""
    if not items:
        return []
    try:
        verdicts = process(items)
        if not isinstance(verdicts, list) or len(verdicts) != len(items):
            raise TypeError(
                f"returned {type(verdicts).__name__} of length "
                f"{len(verdicts) if isinstance(verdicts, list) else '?'} for {len(items)} items"
            )
        return verdicts
    except Exception as exc:  # noqa: BLE001 - isolation is the point
        if len(items) == 1:
            return [exc]
        if is_out_of_memory(exc) and on_oom is not None:
            on_oom()
        half = len(items) // 2
        return call_isolated(process, items[:half], on_oom) + call_isolated(process, items[half:], on_oom)


def describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"[:500]


@dataclass
class Step:
    """A function over a block with fixed keyword arguments: how a pass reads its units (`load`:
    unit ids to pipeline rows) and writes them (`sink`: rows to one row of counts per unit)."""

    fn: Callable[..., pa.Table]
    kwargs: dict[str, Any]

    def __call__(self, batch: pa.Table) -> pa.Table:
        return self.fn(batch, **self.kwargs)


class StageWorker:
    """Runs a chain of stages over each block, in order (a model stage or a group, with the light
    stages before it; or the light stages at the end of the flow), after the pass's `load` when it
    is the first worker and before its `sink` when it is the last. Ray Data builds one per actor.
    A record is parsed once and an image decoded once per block, whatever the chain's length; each
    stage keeps its own batch size, trace entry and failure policy."""

    def __init__(
        self,
        *runs: StageRun,
        load: Step | None = None,
        sink: Step | None = None,
        cache: OutputCache | None = None,
        replay: bool = False,
    ):
        self.runs, self.load, self.sink, self.cache, self.replay = runs, load, sink, cache, replay
        # a cached stage loads its model on its first miss: a worker whose items all come from
        # the cache never loads it
        self.ready = [False] * len(runs)
        for position, run in enumerate(runs):
            if cache is None or not run.stage.cached:
                self._setup(position)
        self.batch_sizes = [run.resources.batch_size for run in runs]

    def _setup(self, position: int) -> None:
        if not self.ready[position]:
            self.runs[position].stage.setup()
            self.ready[position] = True

    def _shrink(self, position: int) -> None:
        self.batch_sizes[position] = max(1, self.batch_sizes[position] // 2)
        try:
            import torch

            torch.cuda.empty_cache()
        except Exception:  # noqa: BLE001 - no torch / no CUDA: nothing to free
            pass

    def _verdicts(self, position: int, items: list[Item]) -> list[Verdict]:
        self._setup(position)
        process = self.runs[position].stage.process
        out: list[Verdict] = []
        start = 0
        while start < len(items):
            chunk = items[start : start + self.batch_sizes[position]]
            start += len(chunk)
            out += call_isolated(process, chunk, lambda: self._shrink(position))
        return out

    def _unreadable(self, row: dict[str, Any], exc: Exception) -> None:
        """A record the chain cannot read (a value the stage before wrote that does not load
        back): rejected by its first stage with the reason, whatever `on_error` says."""
        run = self.runs[0]
        detail = f"record unreadable: {describe(exc)}"[:500]
        row["reject"] = Reject(
            key=row["key"], stage=run.instance, reason=run.stage.error_reason, detail=detail
        ).model_dump_json()
        row["sample"], row["image"] = None, None
        self._trace(row, run, TraceEntry(0.0, failed=type(exc).__name__, message=detail))

    @staticmethod
    def _trace(row: dict[str, Any], run: StageRun, entry: TraceEntry) -> None:
        """Add this stage's entry to the row's trace (what the writer counts per stage)."""
        trace = json.loads(row["trace"]) if row.get("trace") else {}
        trace[run.instance] = entry.to_json()
        row["trace"] = json.dumps(trace)

    def __call__(self, batch: pa.Table) -> pa.Table:
        if self.load is not None:
            batch = self.load(batch)
        if self.runs:
            batch = self._run(batch)
        return self.sink(batch) if self.sink is not None else batch

    def _run(self, batch: pa.Table) -> pa.Table:
        began = time.perf_counter()
        rows = batch.to_pylist()
        live: list[tuple[int, Item]] = []
        for i, row in enumerate(rows):
            if not row["sample"]:
                continue
            try:
                live.append(
                    (
                        i,
                        Item(
                            row["unit"],
                            Sample.model_validate_json(row["sample"]),
                            row["image"],
                            pickle.loads(row["outputs"]) if row.get("outputs") else {},
                        ),
                    )
                )
            except Exception as exc:  # noqa: BLE001 - a record that cannot be read fails here, not the job
                self._unreadable(row, exc)
        for position in range(len(self.runs)):
            live = self._apply(position, rows, live, began)
            began = time.perf_counter()
        return pa.Table.from_pylist(rows, schema=batch.schema)

    def _apply(
        self, position: int, rows: list[dict[str, Any]], live: list[tuple[int, Item]], began: float
    ) -> list[tuple[int, Item]]:
        """One stage of the chain over the live items: their rows updated, its trace entries
        added; returns the items that go on to the next stage."""
        run = self.runs[position]
        for _, item in live:
            item.counts = {}
        items = [item for _, item in live]
        if self.cache is not None and run.stage.cached:
            compute = _missed if self.replay else (lambda batch: self._verdicts(position, batch))
            verdicts = self.cache.verdicts(run, items, compute)
        else:
            verdicts = self._verdicts(position, items)
        share = (time.perf_counter() - began) / len(live) if live else 0.0
        going_on: list[tuple[int, Item]] = []
        for (i, item), verdict in zip(live, verdicts, strict=True):
            row = rows[i]
            entry = TraceEntry(round(share, 6), node_name())
            if verdict is None:
                try:  # a value the stage left that is not JSON (a numpy scalar) fails this item only
                    sample_json = item.sample.model_dump_json()
                    outputs = pickle.dumps(item.outputs) if item.outputs else None
                except Exception as exc:  # noqa: BLE001
                    verdict = exc
            if isinstance(verdict, BaseException):
                message = describe(verdict)
                entry.failed, entry.message = type(verdict).__name__, message
                if run.on_error == "keep":  # the record as it came in, plus why this stage has no output
                    item.sample = Sample.model_validate_json(row["sample"])
                    item.sample.errors[run.instance] = message
                    item.outputs = pickle.loads(row["outputs"]) if row.get("outputs") else {}
                    row["sample"] = item.sample.model_dump_json()
                    going_on.append((i, item))
                else:
                    _reject(row, item, run.instance, run.stage.error_reason, message)
            elif isinstance(verdict, Rejection):
                entry.rejected = verdict.reason
                _reject(row, item, verdict.stage or run.instance, verdict.reason, verdict.detail)
            elif isinstance(verdict, Removal):
                entry.removed = verdict.reason
                row["removed"] = json.dumps(
                    {
                        "key": item.key,
                        "stage": run.instance,
                        "reason": verdict.reason,
                        "dup_of": verdict.dup_of,
                        "cluster": verdict.cluster,
                    }
                )
                row["sample"], row["image"] = None, None
            elif verdict is None:
                row["sample"], row["outputs"] = sample_json, outputs
                going_on.append((i, item))
            else:
                message = f"stage {run.instance} returned a {type(verdict).__name__} verdict"
                entry.failed, entry.message = "TypeError", message
                _reject(row, item, run.instance, run.stage.error_reason, message)
            if item.counts:
                entry.counters = item.counts
            self._trace(row, run, entry)
        return going_on


def _reject(row: dict[str, Any], item: Item, stage: str, reason: str, detail: str) -> None:
    """The row leaves the flow as a reject row (its sample and image dropped)."""
    row["reject"] = Reject(
        key=item.key, stage=stage, reason=reason, detail=detail, url=item.sample.url
    ).model_dump_json()
    row["sample"], row["image"] = None, None


class CacheMiss(Exception):
    """A replay met an item the cache does not hold: its unit goes to the pass that computes."""


def _missed(items: list[Item]) -> list[Verdict]:
    raise CacheMiss(items[0].key)


def replayable(runs: Sequence[StageRun], cache: OutputCache | None) -> bool:
    """Whether a replay can finish units: every model stage is cached and has entries (a light
    stage runs where it is)."""
    models = [r for r in runs if r.stage.cached or not _light([r])]
    return cache is not None and bool(models) and all(r.stage.cached and cache.has_entries(r) for r in models)


def replay_units(batch: pa.Table, runs: Sequence[StageRun], load: Step, sink: Step, cache: OutputCache) -> pa.Table:
    """Units whose every model output is in the cache, written in one light task (their light
    stages run, no model loads, no worker pool starts); a unit with one miss is left, empty, for
    the pass that computes."""
    worker = StageWorker(*runs, load=load, sink=sink, cache=cache, replay=True)
    done = []
    for unit in batch.column("unit").to_pylist():
        try:
            done.append(worker(pa.table({"unit": pa.array([unit], pa.int64())})))
        except CacheMiss:
            continue
    return (
        pa.concat_tables(done)
        if done
        else pa.table({"unit": pa.array([], pa.int64()), "counts": pa.array([], pa.string())})
    )


def run_stage_task(
    batch: pa.Table, runs: Sequence[StageRun], load: Step | None = None, cache: OutputCache | None = None
) -> pa.Table:
    """Stages without a model to keep, as a Ray Data task: set up, run, done (only where no CPU
    worker can take them: light stages that ask for a GPU, or just before a GPU worker)."""
    return StageWorker(*runs, load=load, cache=cache)(batch)


def chains(runs: Sequence[StageRun]) -> list[list[StageRun]]:
    """The runs cut into what shares a worker: consecutive runs of one group together, every
    other run alone."""
    out: list[list[StageRun]] = []
    for run in runs:
        if out and run.group is not None and out[-1][-1].group == run.group:
            out[-1].append(run)
        else:
            out.append([run])
    return out


def check_groups(runs: Sequence[StageRun]) -> None:
    """A group's stages run in one worker, one after another: they must sit next to each other in
    the flow and share one pool size."""
    placed: dict[str, int] = {}
    cut = chains(runs)
    for i, chain in enumerate(cut):
        group = chain[0].group
        if group is None:
            continue
        if group in placed:
            between = [r.instance for c in cut[placed[group] + 1 : i] for r in c]
            raise ConfigError(
                f"group {group}: its stages must be next to each other in the flow, but "
                f"{', '.join(between)} run(s) between them; move them (stages[].after)"
            )
        placed[group] = i
        pools = {(r.resources.concurrency, r.resources.max_concurrency) for r in chain}
        if len(pools) > 1:
            sizes = ", ".join(f"{r.instance}: {r.resources.concurrency}/{r.resources.max_concurrency}" for r in chain)
            raise ConfigError(
                f"group {group}: its stages share one worker pool, so their resources.concurrency and "
                f"max_concurrency must be equal ({sizes})"
            )


def _light(chain: Sequence[StageRun]) -> bool:
    """Stages without a model to keep that need no GPU: they run in the next CPU worker."""
    return all(r.resources.concurrency is None and not r.resources.num_gpus for r in chain)


def add_stages(
    ds, runs: Sequence[StageRun], load: Step | None = None, sink: Step | None = None, cache: OutputCache | None = None
):
    """Append a pass to a Ray Data stream of blocks (one unit each): `load` (unit ids to pipeline
    rows), the stages, and `sink` (rows to one row of counts per unit). Stages that are `cached`
    go through `cache`.

    Light stages run in the worker of the CPU model stage after them, or in the sink's; `load` runs
    in the first worker. Ray ends an idle task worker after a second on a node whose actors
    outnumber its CPUs, so light work as Ray tasks paid a new process (~1.7 CPU-seconds) per burst of
    units. A GPU worker runs its model only (light stages before it stay tasks). The sink is one
    worker with no CPU of its own (writing is I/O), and Ray Data adds one per
    `CPUS_PER_SINK_WORKER` CPUs of the cluster while the sink is the bottleneck. A group's worker
    asks for the sum of its members' CPUs and GPUs; its members share one concurrency (the config
    checks that)."""
    import ray

    light: list[StageRun] = []
    for chain in chains(runs):
        if _light(chain):
            light += chain
            continue
        r = chain[0].resources
        common = dict(
            batch_size=None,
            batch_format="pyarrow",
            num_cpus=sum(c.resources.num_cpus for c in chain),
            num_gpus=sum(c.resources.num_gpus for c in chain),
        )
        if common["num_gpus"] and (light or load):  # before a GPU worker: as a task
            ds = _light_task(ds, light, load, cache)
            light, load = [], None
        if r.concurrency is None:  # a light stage that asks for a GPU: a task of its own
            ds = ds.map_batches(run_stage_task, fn_kwargs={"runs": chain, "cache": cache}, **common)
        else:
            if r.max_concurrency is None:
                pool = ray.data.ActorPoolStrategy(size=r.concurrency)
            else:  # Ray Data adds workers while this stage is the bottleneck and resources are free
                pool = ray.data.ActorPoolStrategy(min_size=r.concurrency, max_size=r.max_concurrency)
            ds = ds.map_batches(
                StageWorker,
                fn_constructor_args=(*light, *chain),
                fn_constructor_kwargs={"load": load, "cache": cache},
                compute=pool,
                **common,
            )
        light, load = [], None
    if sink is not None:
        cpus = ray.cluster_resources().get("CPU", 1)
        pool = ray.data.ActorPoolStrategy(min_size=1, max_size=max(1, int(cpus // CPUS_PER_SINK_WORKER)))
        ds = ds.map_batches(
            StageWorker,
            fn_constructor_args=tuple(light),
            fn_constructor_kwargs={"load": load, "sink": sink, "cache": cache},
            compute=pool,
            batch_size=None,
            batch_format="pyarrow",
            num_cpus=0,
        )
    elif light or load:
        ds = _light_task(ds, light, load, cache)
    return ds


def _light_task(ds, runs: list[StageRun], load: Step | None, cache: OutputCache | None):
    return ds.map_batches(
        run_stage_task,
        fn_kwargs={"runs": runs, "load": load, "cache": cache},
        batch_size=None,
        batch_format="pyarrow",
        num_cpus=LIGHT_TASK_CPUS,
    )


# -- counting --------------------------------------------------------------------------------


def setup_error(run: StageRun) -> str | None:
    """Load a stage where it will run (a Ray task with its GPUs): None, or why it failed, with the
    worker's traceback after a blank line."""
    try:
        run.stage.setup()
    except Exception as exc:  # noqa: BLE001 - reported as one line by the driver
        return describe(exc) + "\n\n" + traceback.format_exc()
    return None
