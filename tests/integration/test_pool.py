"""The adapter's worker pools on real Ray Data: a pool with `max_concurrency` grows while its stage
is the bottleneck, and every row still comes back exactly once; a group's stages share a worker;
the sink is one worker for the whole pass, with the light stages before it; the setup check's
worker does not outlive the check."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pyarrow as pa
import pytest

from denseforge.pipeline.adapter import ROW_SCHEMA, StageRun, Step, add_stages
from denseforge.pipeline.config import RayConfig
from denseforge.pipeline.ray_session import start_ray
from denseforge.stages.sample import Sample
from denseforge.stages.stage import Item, Resources, Stage, Verdict

pytestmark = pytest.mark.slow


class SlowStage(Stage):
    """Takes a while per batch and says which worker process ran it."""

    name = "slow"

    def process(self, batch: list[Item]) -> list[Verdict]:
        time.sleep(0.4)
        for item in batch:
            item.sample.provenance["pid"] = os.getpid()
        return [None] * len(batch)


def _unit_rows(unit: int, n: int) -> pa.Table:
    rows = [
        {
            "unit": unit,
            "unit_rows": n,
            "key": f"{unit:04d}{i:04d}",
            "image": b"",
            "sample": Sample(key=f"{unit:04d}{i:04d}", url="u", width=1, height=1, sha256="0").model_dump_json(),
            "reject": None,
            "removed": None,
            "trace": None,
            "outputs": None,
        }
        for i in range(n)
    ]
    return pa.Table.from_pylist(rows, schema=ROW_SCHEMA)


@pytest.fixture(scope="module")
def ray_cluster():
    import ray

    start_ray(RayConfig(num_cpus=2), None)
    yield
    ray.shutdown()


@pytest.mark.parametrize("max_concurrency, grows", [(None, False), (3, True)])
def test_a_pool_with_max_concurrency_grows_while_it_is_the_bottleneck(ray_cluster, max_concurrency, grows):
    import ray

    units = 24
    ds = ray.data.from_items([{"unit": u} for u in range(units)], override_num_blocks=units)
    ds = ds.map_batches(lambda b: _unit_rows(int(b["unit"][0].as_py()), 2), batch_size=1, batch_format="pyarrow")
    run = StageRun(
        SlowStage(), "slow", Resources(num_cpus=0.5, batch_size=2, concurrency=1, max_concurrency=max_concurrency)
    )
    out = pa.concat_tables(list(add_stages(ds, [run]).iter_batches(batch_size=None, batch_format="pyarrow")))
    samples = [Sample.model_validate_json(s) for s in out.column("sample").to_pylist()]
    assert sorted(s.key for s in samples) == sorted(f"{u:04d}{i:04d}" for u in range(units) for i in range(2))
    workers = {s.provenance["pid"] for s in samples}
    assert (len(workers) > 1) is grows, workers
    assert len(workers) <= (max_concurrency or 1)


class PidStage(Stage):
    """Notes which worker process ran it, under its own instance name."""

    name = "pid"

    def __init__(self, note: str):
        super().__init__()
        self.note = note

    def process(self, batch: list[Item]) -> list[Verdict]:
        for item in batch:
            item.sample.provenance[self.note] = os.getpid()
        return [None] * len(batch)


def test_the_stages_of_a_group_run_in_one_worker_process(ray_cluster):
    import ray

    units = 6
    ds = ray.data.from_items([{"unit": u} for u in range(units)], override_num_blocks=units)
    ds = ds.map_batches(lambda b: _unit_rows(int(b["unit"][0].as_py()), 2), batch_size=1, batch_format="pyarrow")
    runs = [
        StageRun(PidStage(name), name, Resources(num_cpus=0.25, batch_size=2, concurrency=1), group=group)
        for name, group in (("a", "g"), ("b", "g"), ("c", None))
    ]
    out = pa.concat_tables(list(add_stages(ds, runs).iter_batches(batch_size=None, batch_format="pyarrow")))
    samples = [Sample.model_validate_json(s) for s in out.column("sample").to_pylist()]
    assert len(samples) == units * 2
    assert {s.provenance["a"] for s in samples} == {s.provenance["b"] for s in samples}  # one actor for a and b
    assert len({s.provenance["a"] for s in samples}) == 1
    assert {s.provenance["c"] for s in samples}.isdisjoint({s.provenance["a"] for s in samples})


def _load_rows(batch: pa.Table) -> pa.Table:
    return _unit_rows(int(batch["unit"][0].as_py()), 2)


def _write_pids(batch: pa.Table, label: str) -> pa.Table:
    """A sink that says which process wrote each unit and which ran the stage before it."""
    light = {Sample.model_validate_json(s).provenance["light"] for s in batch.column("sample").to_pylist()}
    return pa.table(
        {
            "label": [label],
            "units": [len(set(batch.column("unit").to_pylist()))],
            "writer": [os.getpid()],
            "light": [sorted(light)],
        }
    )


def test_the_sink_is_one_worker_for_the_pass_and_runs_the_light_stages_before_it(ray_cluster):
    """Loaded, run and written by one long-lived worker, not a task per unit (each new task worker
    costs ~1.7 CPU-seconds on a small node, where Ray ends idle task workers after a second)."""
    import ray

    units = 12
    ds = ray.data.from_items([{"unit": u} for u in range(units)], override_num_blocks=units)
    light = StageRun(PidStage("light"), "light", PidStage.default_resources)
    ds = add_stages(ds, [light], load=Step(_load_rows, {}), sink=Step(_write_pids, {"label": "x"}))
    out = pa.concat_tables(list(ds.iter_batches(batch_size=None, batch_format="pyarrow"))).to_pylist()
    assert sum(r["units"] for r in out) == units and {r["label"] for r in out} == {"x"}
    writers = {r["writer"] for r in out}
    assert len(writers) == 1, writers  # 2 CPUs: one sink worker (one per 8 CPUs at most)
    assert {pid for r in out for pid in r["light"]} == writers


class LoadsAndSaysWhere(Stage):
    """A stage whose setup writes down the process that loaded it."""

    name = "loads"

    def __init__(self, where: str):
        super().__init__()
        self.where = where

    def setup(self) -> None:
        Path(self.where).write_text(str(os.getpid()))

    def process(self, batch: list[Item]) -> list[Verdict]:
        return [None] * len(batch)


def test_the_setup_check_worker_exits_with_the_check(ray_cluster, tmp_path):
    """The setup check loads every model in one worker; that worker must end with the check, not
    stay behind idle with all the models in memory (Ray keeps idle workers while they are fewer
    than the CPUs: all run long, in a small cluster)."""
    import psutil

    from denseforge.pipeline.progress import Progress
    from denseforge.pipeline.rundir import RunDir
    from denseforge.pipeline.runner import check_setups

    where = tmp_path / "pid"
    check_setups([StageRun(LoadsAndSaysWhere(str(where)), "loads", Resources())], RunDir(tmp_path / "run"), Progress())
    pid = int(where.read_text())

    def alive() -> bool:
        try:
            return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False

    deadline = time.time() + 10
    while alive() and time.time() < deadline:
        time.sleep(0.2)
    assert not alive(), f"the worker that loaded every model (pid {pid}) is still there"
