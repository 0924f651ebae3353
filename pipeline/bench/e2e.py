"""`denseforge bench e2e`: the whole run — the demo's stages and experts — on N distinct photos
served on loopback HTTP: wall time, images/s, time and CPU seconds per phase, the CPU efficiency
of each phase (CPU seconds / (phase time x cores)) and the peak RSS of the process tree."""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from upath import UPath

# the phases of `runner.execute`, in the order they run
PHASES = ("ray_init_s", "setup_s", "plan_s", "ingest_s", "embed_s", "dedup_s", "process_s")


def bench_e2e(images: int = 1000, overrides: tuple[str, ...] = ()) -> dict[str, Any]:
    """`overrides` (`--set key=value`) change the demo's config, e.g. an expert's resources."""
    from denseforge.pipeline.bench.corpus import served_corpus
    from denseforge.storage import location

    with tempfile.TemporaryDirectory(prefix="denseforge-bench-") as tmp:
        root = Path(tmp)
        with served_corpus(root, images) as table:
            return run_e2e(images, location(root / "run"), str(table), overrides)


def run_e2e(images: int, out: UPath, table: str, overrides: tuple[str, ...] = ()) -> dict[str, Any]:
    """One run of the demo's config over the input `table` (served photos) into `out`, a local
    folder or a store; the figures `bench e2e` reports."""
    from denseforge.errors import DenseforgeError
    from denseforge.pipeline.bench import demo_config
    from denseforge.pipeline.bench.memory import TreeMemory
    from denseforge.pipeline.config import apply_overrides, parse_config
    from denseforge.pipeline.rundir import RunDir
    from denseforge.pipeline.runner import execute, preflight

    if images < 1:
        raise DenseforgeError("bench e2e: --images must be at least 1")
    cores = os.cpu_count() or 1
    raw = demo_config()
    raw["demo"] = {"enabled": False}
    raw["input"]["path"] = table
    raw["dedup"]["clusters"] = None  # N / target_cluster_size, as a real run
    config = parse_config(apply_overrides(raw, list(overrides)))
    rd = RunDir(out)
    runs = preflight(config, rd)
    rd.create(config)
    with TreeMemory() as tree:
        start = time.perf_counter()
        stats = execute(rd, config, runs, "bench")
        end = time.perf_counter()
    # the phases run back to back: walk back from the end to place each one in time
    phases: dict[str, Any] = {}
    cursor = end
    for name in reversed(PHASES):
        seconds = stats["timings"].get(name)
        if not seconds:
            continue
        cpu = tree.cpu_between(cursor - seconds, cursor)
        phases[name.removesuffix("_s")] = {
            "seconds": round(seconds, 2),
            "cpu_s": round(cpu, 2),
            "cpu_efficiency": round(cpu / (seconds * cores), 3),
        }
        cursor -= seconds
    wall = end - start
    return {
        "benchmark": "e2e",
        "images": images,
        "overrides": list(overrides),
        "cores": cores,
        "seconds": round(wall, 2),
        "images_per_s": round(images / wall, 2),
        "funnel": stats["funnel"],
        "phases": dict(reversed(list(phases.items()))),
        "cpu_s": round(tree.cpu_between(start, end), 2),
        "cpu_efficiency": round(tree.cpu_between(start, end) / (wall * cores), 3),
        "peak_rss_mib": round(tree.peak / 2**20, 1),
        "experts": [e.instance for e in config.perceive.experts],
        "note": "the demo's config (tagger, yolox, rapidocr, template fuse, qa) on distinct loopback "
        "photos; CPU seconds of the whole process tree, sampled every 0.1 s",
    }
