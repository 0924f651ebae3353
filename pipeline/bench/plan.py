"""`denseforge bench plan`: how close `denseforge plan` comes. On N distinct photos served on
loopback HTTP with the demo's config: the plan from pilots of `pilot` rows for N rows on this
machine, then the real run of N rows: projected against measured wall time and disk."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any


def bench_plan(images: int = 2000, pilot: int = 200) -> dict[str, Any]:
    from denseforge.pipeline.bench import demo_config
    from denseforge.pipeline.bench.corpus import served_corpus
    from denseforge.pipeline.config import parse_config
    from denseforge.pipeline.plan import ClusterSpec, disk_bytes, make_plan
    from denseforge.pipeline.runner import run
    from denseforge.storage import location

    raw = demo_config()
    raw["demo"] = {"enabled": False}
    raw["dedup"]["clusters"] = None
    with tempfile.TemporaryDirectory(prefix="denseforge-bench-") as tmp:
        root = Path(tmp)
        with served_corpus(root, images) as table:
            raw["input"]["path"] = str(table)
            config = parse_config(raw)
            start = time.perf_counter()
            planned = make_plan(config, pilot, images, ClusterSpec())
            plan_s = time.perf_counter() - start
            start = time.perf_counter()
            stats = run(config, location(root / "real"), allow_failed_units=True)
            wall = time.perf_counter() - start
            disk = disk_bytes(root / "real")
    projected = planned["plan"]
    parts = {
        name.removesuffix("_s"): {
            "projected": part["projected_s"],
            "measured": round(stats["timings"].get(f"{name}_s", 0.0), 1),
        }
        for name, part in projected["parts"].items()
        if name != "other"
    }
    return {
        "benchmark": "plan",
        "images": images,
        "pilot": pilot,
        "plan_s": round(plan_s, 1),
        "wall_s": {"projected": projected["wall_s"], "measured": round(wall, 1)},
        "wall_error": round(projected["wall_s"] / wall - 1, 3),
        "disk_bytes": {"projected": projected["disk_bytes"], "measured": disk},
        "disk_error": round(projected["disk_bytes"] / disk - 1, 3),
        "parts_s": parts,
        "goal": "|wall_error| and |disk_error| <= 0.25",
        "pilots": planned["pilots"],
    }
