"""`denseforge bench NAME`: benchmarks that print JSON, ratios against a baseline measured in the
same run, plus peak memory. Never timed tests."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from typing import Any

from denseforge.errors import DenseforgeError


def demo_config() -> dict[str, Any]:
    """The shipped demo config as raw YAML, for benchmarks that run its stages and experts."""
    import yaml

    from denseforge.configs import SHIPPED

    return yaml.safe_load((SHIPPED / "demo.yaml").read_text())


@contextlib.contextmanager
def stdout_to_stderr() -> Iterator[None]:
    """Keep stdout for the JSON result: what libraries print while a benchmark runs (img2dataset's
    worker processes, ultralytics' first-run settings notice) goes to stderr: Python's stdout and
    file descriptor 1, which child processes inherit."""
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


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
    if name == "io":
        from denseforge.pipeline.bench.io import bench_io

        return bench_io(**kwargs)
    if name == "dedup":
        from denseforge.pipeline.bench.dedup import bench_dedup

        return bench_dedup(**kwargs)
    if name == "quality":
        from denseforge.pipeline.bench.quality import bench_quality

        return bench_quality(**kwargs)
    if name == "e2e":
        from denseforge.pipeline.bench.e2e import bench_e2e

        return bench_e2e(**kwargs)
    if name == "plan":
        from denseforge.pipeline.bench.plan import bench_plan

        return bench_plan(**kwargs)
    if name == "derive":
        from denseforge.pipeline.bench.derive import bench_derive

        return bench_derive(**kwargs)
    if name == "embed":
        from denseforge.pipeline.bench.embed import bench_embed

        return bench_embed(**kwargs)
    raise DenseforgeError(f"unknown benchmark {name!r}")
