"""`denseforge bench embed`: how much of the model worker's time is the model, and how close the
whole embed phase comes to the bare forward pass, on the same images and batches in one run.

In-process (one model, same batches): the forward pass alone; the model worker's call with pixels
from `PixelStage` (tensor conversion + forward) and with the old in-worker path (decode, open_clip
preprocess, hashing + forward), each with the share of its time spent outside the forward pass;
the CPU cost per image of `PixelStage`, hence how many CPU workers one model worker needs. Then
the real embed phase (Ray, ingest of a folder, embeddings written) both ways. On a GPU node the
same command reports images/s per GPU.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from denseforge.pipeline.bench.corpus import build_bench_corpus
from denseforge.pipeline.bench.memory import TreeMemory
from denseforge.pipeline.config import parse_config
from denseforge.pipeline.ray_session import LIGHT_TASK_CPUS


def _timed_forward(stage) -> list[float]:
    """Wrap `stage.forward` so every call's wall time (synchronised on CUDA) is recorded."""
    import torch

    spent: list[float] = []
    forward = stage.forward

    def timed(pixels):
        if stage.device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = forward(pixels)  # returns numpy: the device work is finished when it returns
        spent.append(time.perf_counter() - start)
        return out

    stage.forward = timed
    return spent


def bench_embed(images: int = 256, batch_size: int = 64, model: str = "ViT-B-32", phase: bool = True) -> dict[str, Any]:
    import torch

    from denseforge.pipeline.rundir import RunDir
    from denseforge.pipeline.runner import execute, preflight
    from denseforge.stages.embed import EmbedConfig, EmbedStage, PixelStage, pixel_spec
    from denseforge.stages.sample import Sample
    from denseforge.stages.stage import Item

    cores = os.cpu_count() or 1
    settings = EmbedConfig(model=model, weights="random", batch_size=batch_size)
    result: dict[str, Any] = {
        "benchmark": "embed",
        "model": f"{model} (random weights: speed only)",
        "images": images,
        "batch_size": batch_size,
        "cores": cores,
        "torch_threads": torch.get_num_threads(),
    }
    with tempfile.TemporaryDirectory(prefix="denseforge-bench-") as tmp:
        root = Path(tmp)
        names = build_bench_corpus(root / "images", images)
        data = [(root / "images" / n).read_bytes() for n in names]

        def items() -> list[Item]:
            return [Item(0, Sample(key=f"{i:06d}", width=1, height=1, sha256="0"), d) for i, d in enumerate(data)]

        stage = EmbedStage(settings)
        start = time.perf_counter()
        stage.setup()
        result["device"], result["precision"] = stage.device, stage.provenance["precision"]
        result["setup_s"] = round(time.perf_counter() - start, 2)
        pixel_stage = PixelStage(pixel_spec(settings))

        fed = items()
        start, cpu = time.perf_counter(), time.process_time()
        for s in range(0, images, batch_size):
            pixel_stage.process(fed[s : s + batch_size])
        pixels_wall, pixels_cpu = time.perf_counter() - start, time.process_time() - cpu
        batches = [
            np.stack([i.outputs["pixels"] for i in fed[s : s + batch_size]]) for s in range(0, images, batch_size)
        ]

        stage.forward(stage.tensor(batches[0]))  # warm-up: lazy initialisation, allocator, kernels
        tensors = [stage.tensor(b) for b in batches]
        start = time.perf_counter()
        for t in tensors:
            stage.forward(t)
        forward_s = time.perf_counter() - start
        del tensors

        spent = _timed_forward(stage)
        start = time.perf_counter()
        for s in range(0, images, batch_size):
            stage.process(fed[s : s + batch_size])
        split_s, split_forward = time.perf_counter() - start, sum(spent)
        spent.clear()
        own = items()
        start = time.perf_counter()
        for s in range(0, images, batch_size):
            stage.process(own[s : s + batch_size])
        own_s, own_forward = time.perf_counter() - start, sum(spent)

        result["forward_only"] = {"seconds": round(forward_s, 3), "images_per_s": round(images / forward_s, 1)}
        result["model_worker_fed_pixels"] = {
            "seconds": round(split_s, 3),
            "images_per_s": round(images / split_s, 1),
            "outside_forward_share": round(1 - split_forward / split_s, 4),
            "note": "uint8 pixels -> normalised tensor on the device, forward, L2 normalise",
        }
        result["model_worker_on_its_own"] = {
            "seconds": round(own_s, 3),
            "images_per_s": round(images / own_s, 1),
            "outside_forward_share": round(1 - own_forward / own_s, 4),
            "note": "embed.cpu_workers: 0 - JPEG decode, open_clip preprocess, pHash + fingerprint, forward",
        }
        per_image = pixels_cpu / images
        result["pixel_stage"] = {
            "cpu_s_per_image": round(per_image, 5),
            "images_per_s_per_core": round(1 / per_image, 1),
            "cpu_workers_to_feed_one_model_worker": round(per_image * images / split_s, 2),
            "wall_s": round(pixels_wall, 3),
        }
        if phase:
            result["phase"] = {}
            # fed: one 1-CPU feeder, the model worker gets the rest less the reader's quarter CPU;
            # alone: the model worker gets every CPU but the reader's quarter
            rest = cores - LIGHT_TASK_CPUS
            variants = (
                ("fed_by_cpu_workers", {"cpu_workers": 1, "num_cpus": max(0.25, rest - 1)}),
                ("model_worker_alone", {"cpu_workers": 0, "num_cpus": rest}),
            )
            for label, embed in variants:
                config = parse_config(
                    {
                        "input": {"kind": "folder", "path": str(root / "images")},
                        "ray": {"num_cpus": cores},
                        "embed": {"model": model, "weights": "random", "batch_size": batch_size, **embed},
                        "dedup": {"enabled": True, "epsilon": None, "clusters": 1},
                        "output": {"samples_per_shard": 64},
                    }
                )
                rd = RunDir(root / f"run-{label}")
                rd.create(config)
                with TreeMemory() as memory:
                    stats = execute(rd, config, preflight(config, rd), "bench")
                wall = stats["timings"]["embed_s"]
                busy = {
                    name: round(c.get("busy_s", 0.0), 2)
                    for name, c in stats["stages"].items()
                    if name.startswith("embed")
                }
                result["phase"][label] = {
                    "embed": embed,
                    "seconds": round(wall, 2),
                    "images_per_s": round(images / wall, 1),
                    "vs_forward_only": round((images / wall) / (images / forward_s), 3),
                    "model_busy_vs_forward_only": round(forward_s / busy["embed"], 3),
                    "busy_s": busy,
                    "peak_rss_gib": round(memory.peak / 2**30, 2),
                }
            result["phase"]["note"] = (
                "embed phase wall time, Ray actor start-up and model load included. Without a GPU the "
                "forward pass runs on the same cores as the CPU feeders: the model worker's torch "
                "threads are the CPUs it asked for (Ray sets OMP_NUM_THREADS), so splitting the cores "
                "slows the forward pass; hence embed.cpu_workers: auto is 0 on CPU workers"
            )
    return result
