"""`denseforge bench experts`: each expert alone, then all of them in the real DAG."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

from denseforge.errors import DenseforgeError
from denseforge.pipeline.bench.corpus import build_bench_corpus
from denseforge.pipeline.config import parse_config


def demo_experts() -> list[dict[str, Any]]:
    """The experts of the shipped demo config (tagger, yolox, rapidocr) with their resources."""
    from denseforge.pipeline.bench import demo_config

    return demo_config()["perceive"]["experts"]


def gpu_shared(experts: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The experts sharing one GPU in equal fractions (Ray packs the actors on it)."""
    share = round(1 / len(experts), 3)
    return [{**e, "resources": {**e.get("resources", {}), "num_gpus": share}} for e in experts]


def bench_experts(images: int = 96, experts: list[dict[str, Any]] | None = None, gpu: bool = False) -> dict[str, Any]:
    """Images/s of each expert alone (in-process, its own batch size), then all of them together
    in the real DAG on the same images. `dag_over_back_to_back`: the DAG's process phase against
    the same experts run one after the other in one process, model loading included on both sides
    (goal <= 1.1). `parallel_efficiency`: the experts' CPU seconds alone / (DAG wall x cores); an
    expert whose threads spin while waiting counts that as busy, so read it beside the ratio.
    `gpu`: every expert gets an equal fraction of one GPU, alone and in the DAG."""
    import os

    from PIL import Image

    from denseforge.experts.base import ExpertInput
    from denseforge.pipeline.rundir import RunDir
    from denseforge.pipeline.runner import execute, preflight
    from denseforge.stages.perceive import plan_experts

    experts = experts or demo_experts()
    cores = os.cpu_count() or 1
    result: dict[str, Any] = {"benchmark": "experts", "images": images, "cores": cores, "experts": {}}
    if gpu:
        import torch

        if not torch.cuda.is_available():
            raise DenseforgeError(
                "bench experts --gpu: no CUDA device is visible here "
                "(torch.cuda.is_available() is False); run it on a GPU node"
            )
        experts = gpu_shared(experts)
        result["gpu"] = torch.cuda.get_device_name(0)
    with tempfile.TemporaryDirectory(prefix="denseforge-bench-") as tmp:
        root = Path(tmp)
        names = build_bench_corpus(root / "images", images)
        pictures = [Image.open(root / "images" / n).convert("RGB") for n in names]
        config = parse_config(
            {
                "input": {"kind": "folder", "path": str(root / "images")},
                "ray": {"num_cpus": cores},
                "embed": {"enabled": False},
                "dedup": {"enabled": False},
                "perceive": {"enabled": True, "experts": experts},
                "output": {"samples_per_shard": 8},
            }
        )
        busy_total = 0.0
        for spec, expert, resources in plan_experts(config.perceive):
            start = time.perf_counter()
            expert.setup()
            setup_s = time.perf_counter() - start
            start, cpu_start = time.perf_counter(), time.process_time()
            for s in range(0, images, resources.batch_size):
                expert([ExpertInput(str(i), p) for i, p in enumerate(pictures[s : s + resources.batch_size])])
            wall, cpu = time.perf_counter() - start, time.process_time() - cpu_start
            busy_total += cpu
            result["experts"][spec.instance] = {
                "images_per_s": round(images / wall, 2),
                "wall_s": round(wall, 2),
                "busy_cpu_s": round(cpu, 2),
                "setup_s": round(setup_s, 2),
                "batch_size": resources.batch_size,
            }
        rd = RunDir(root / "run")
        rd.create(config)
        stats = execute(rd, config, preflight(config, rd), "bench")
        wall = stats["timings"]["process_s"]
        result["dag"] = {
            "seconds": round(wall, 2),
            "images_per_s": round(images / wall, 2),
            "written": stats["funnel"]["written"],
            "note": "process phase wall time: actor start-up and model loading included",
        }
        result["sum_busy_cpu_alone_s"] = round(busy_total, 2)
        back_to_back = sum(e["wall_s"] + e["setup_s"] for e in result["experts"].values())
        result["back_to_back_s"] = round(back_to_back, 2)
        result["dag_over_back_to_back"] = round(wall / back_to_back, 3)
        result["parallel_efficiency"] = round(busy_total / (wall * cores), 3)
    return result
