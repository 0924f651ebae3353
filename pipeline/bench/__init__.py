"""`denseforge bench NAME`: benchmarks that print JSON, ratios against a baseline measured in the
same run, plus peak memory. Never timed tests."""

from __future__ import annotations

from typing import Any

from denseforge.errors import DenseforgeError


def run_benchmark(name: str, **kwargs: Any) -> dict[str, Any]:
    if name == "fuse":
        from denseforge.pipeline.bench.fuse import bench_fuse

        return bench_fuse(**kwargs)
    if name == "experts":
        from denseforge.pipeline.bench.experts import bench_experts

        return bench_experts(**kwargs)
    if name == "ingest":
        from denseforge.pipeline.bench.ingest import bench_ingest

        return bench_ingest(**kwargs)
    if name == "dedup":
        from denseforge.pipeline.bench.dedup import bench_dedup

        return bench_dedup(**kwargs)
    if name == "quality":
        from denseforge.pipeline.bench.quality import bench_quality

        return bench_quality(**kwargs)
    if name == "embed":
        from denseforge.pipeline.bench.embed import bench_embed

        return bench_embed(**kwargs)
    raise DenseforgeError(f"unknown benchmark {name!r}")
