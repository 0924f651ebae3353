"""The adapter's worker pools on real Ray Data: a pool with `max_concurrency` grows while its stage
is the bottleneck, and every row still comes back exactly once."""

from __future__ import annotations

import os
import time

import pyarrow as pa
import pytest

from denseforge.pipeline.adapter import ROW_SCHEMA, StageRun, add_stage
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
    rows = [{"unit": unit, "unit_rows": n, "key": f"{unit:04d}{i:04d}", "image": b"",
             "sample": Sample(key=f"{unit:04d}{i:04d}", url="u", width=1, height=1, sha256="0").model_dump_json(), "reject": None,
             "removed": None, "trace": None, "outputs": None} for i in range(n)]
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
    run = StageRun(SlowStage(), "slow", Resources(num_cpus=0.5, batch_size=2, concurrency=1,
                                                  max_concurrency=max_concurrency))
    out = pa.concat_tables(list(add_stage(ds, run).iter_batches(batch_size=None, batch_format="pyarrow")))
    samples = [Sample.model_validate_json(s) for s in out.column("sample").to_pylist()]
    assert sorted(s.key for s in samples) == sorted(f"{u:04d}{i:04d}" for u in range(units) for i in range(2))
    workers = {s.provenance["pid"] for s in samples}
    assert (len(workers) > 1) is grows, workers
    assert len(workers) <= (max_concurrency or 1)
