"""`denseforge bench derive`: what a run derived with `--from` costs against the work it avoids.

On N distinct photos served on loopback HTTP: a run of the demo's config (the original) and a
run derived from it with only `qa.min_words` changed; then a run of the demo's config without
the OCR expert, and from it two derived runs: the OCR expert added, and the OCR expert alone (the
cost of its own work). Each figure is the process phase (experts, merge, fuse, ground, qa,
write); the ratios are qa-changed / original and expert-added / expert-alone, with the cache's
hits and misses per stage.
"""

from __future__ import annotations

import copy
import tempfile
from pathlib import Path
from typing import Any

ADDED = "rapidocr"


def bench_derive(images: int = 1000) -> dict[str, Any]:
    from denseforge.errors import DenseforgeError
    from denseforge.pipeline.bench import demo_config
    from denseforge.pipeline.bench.corpus import served_corpus
    from denseforge.pipeline.bench.memory import TreeMemory
    from denseforge.pipeline.config import parse_config
    from denseforge.pipeline.runner import derive, run
    from denseforge.storage import location

    if images < 1:
        raise DenseforgeError("bench derive: --images must be at least 1")
    raw = demo_config()
    raw["demo"] = {"enabled": False}
    raw["dedup"]["clusters"] = None
    experts = raw["perceive"]["experts"]
    added = next(e for e in experts if e["plugin"] == ADDED)
    without = copy.deepcopy(raw)
    without["perceive"]["experts"] = [e for e in experts if e is not added]
    qa_only = copy.deepcopy(raw)
    qa_only["qa"]["min_words"] = raw["qa"]["min_words"] + 2
    alone = copy.deepcopy(raw)
    alone["perceive"]["experts"] = [added]
    alone["qa"]["min_words"] = 1  # its template captions are short: the run must write something
    runs: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="denseforge-bench-") as tmp:
        root = Path(tmp)
        with served_corpus(root, images) as table, TreeMemory() as tree:
            for data in (raw, qa_only, without, alone):
                data["input"]["path"] = str(table)
            runs["original"] = run(parse_config(raw), location(root / "original"))
            runs["qa_changed"] = derive(
                parse_config(qa_only), location(root / "qa_changed"), location(root / "original")
            )
            runs["without_expert"] = run(parse_config(without), location(root / "without_expert"))
            for name, data in (("expert_added", raw), ("expert_alone", alone)):
                runs[name] = derive(parse_config(data), location(root / name), location(root / "without_expert"))
    process = {name: stats["timings"]["process_s"] for name, stats in runs.items()}
    return {
        "benchmark": "derive",
        "images": images,
        "added_expert": ADDED,
        "process_s": {name: round(s, 2) for name, s in process.items()},
        "qa_changed_vs_original": round(process["qa_changed"] / process["original"], 3),
        "expert_added_vs_expert_alone": round(process["expert_added"] / process["expert_alone"], 3),
        "cache": {name: stats["cache"]["stages"] for name, stats in runs.items()},
        "written": {name: stats["funnel"]["written"] for name, stats in runs.items()},
        "peak_rss_mib": round(tree.peak / 2**20, 1),
        "goals": {"qa_changed_vs_original": 0.1, "expert_added_vs_expert_alone": 1.2},
        "note": "process phase seconds (experts, merge, fuse, ground, qa, write) of each run; a derived "
        "run reuses its source's downloads, embeddings, dedup decisions and cache",
    }
