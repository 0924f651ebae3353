"""`denseforge bench ingest`: our ingest against plain img2dataset on the same loopback corpus.

Both sides get the same processes, threads, image size and corpus, in the same run, so the ratio
means something on a shared machine; absolute seconds alone would not. Peak memory is the summed
RSS of the benchmark process and all its descendants (Ray's own processes included), sampled.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from denseforge.errors import DenseforgeError
from denseforge.pipeline.bench.corpus import served_corpus
from denseforge.pipeline.bench.memory import TreeMemory
from denseforge.pipeline.config import parse_config


def _plain_img2dataset(table: Path, out: Path, processes: int, threads: int, spp: int) -> float:
    from img2dataset import download

    start = time.perf_counter()
    download(
        url_list=str(table),
        input_format="parquet",
        url_col="url",
        caption_col="caption",
        output_format="webdataset",
        output_folder=str(out),
        processes_count=processes,
        thread_count=threads,
        image_size=512,
        resize_mode="keep_ratio",
        resize_only_if_bigger=True,
        encode_quality=95,
        number_sample_per_shard=spp,
        distributor="multiprocessing",
        timeout=10,
        retries=0,
        enable_wandb=False,
    )  # a fresh folder; its "overwrite" mode deletes its own _tmp (1.47 bug)
    return time.perf_counter() - start


def _ours(table: Path, out: Path, processes: int, threads: int, spp: int) -> dict[str, float]:
    import ray

    from denseforge.pipeline.progress import Progress
    from denseforge.pipeline.ray_session import start_ray
    from denseforge.pipeline.rundir import RunDir
    from denseforge.pipeline.runner import plan_units, run_ingest

    config = parse_config(
        {
            "input": {"path": str(table)},
            "ray": {"num_cpus": max(processes, 2)},
            "ingest": {"processes": processes, "threads": threads, "image_size": 512, "allow_private_addresses": True},
            "output": {"samples_per_shard": spp},
        }
    )
    rd = RunDir(out)
    rd.create(config)
    start = time.perf_counter()
    start_ray(config.ray, None)
    ray_init = time.perf_counter() - start
    try:
        start = time.perf_counter()
        plan = plan_units(config, rd)
        run_ingest(config, rd, plan, Progress())
        ingest = time.perf_counter() - start
    finally:
        ray.shutdown()
    return {"ray_init_s": ray_init, "ingest_s": ingest}


def _successes(folder: Path) -> int:
    total = 0
    for p in folder.glob("*.parquet"):
        total += sum(1 for s in pq.read_table(p, columns=["status"]).column("status").to_pylist() if s == "success")
    return total


def bench_ingest(
    images: int = 1000, processes: int = 2, threads: int = 16, samples_per_shard: int = 100, repeats: int = 2
) -> dict[str, Any]:
    """Images/s of denseforge ingest vs plain img2dataset (alternating, best of `repeats`), and peak memory."""
    if images < 1 or repeats < 1:
        raise DenseforgeError("bench ingest: --images and --repeats must be at least 1")
    plain_runs: list[dict[str, float]] = []
    our_runs: list[dict[str, float]] = []
    with tempfile.TemporaryDirectory(prefix="denseforge-bench-") as tmp:
        root = Path(tmp)
        with served_corpus(root, images) as table:
            for r in range(repeats):
                with TreeMemory() as mem:
                    seconds = _plain_img2dataset(table, root / f"plain{r}", processes, threads, samples_per_shard)
                ok = _successes(root / f"plain{r}")
                plain_runs.append(
                    {
                        "seconds": seconds,
                        "downloaded": ok,
                        "images_per_s": ok / seconds,
                        "peak_rss_mib": mem.peak / 2**20,
                    }
                )
                with TreeMemory() as mem:
                    ours = _ours(table, root / f"ours{r}", processes, threads, samples_per_shard)
                ok = _successes(root / f"ours{r}" / "raw")
                our_runs.append(
                    {
                        "seconds": ours["ingest_s"],
                        "ray_init_s": ours["ray_init_s"],
                        "downloaded": ok,
                        "images_per_s": ok / ours["ingest_s"],
                        "images_per_s_incl_ray_init": ok / (ours["ingest_s"] + ours["ray_init_s"]),
                        "peak_rss_mib": mem.peak / 2**20,
                    }
                )

    def best(runs: list[dict[str, float]]) -> dict[str, float]:
        top = max(runs, key=lambda run: run["images_per_s"])
        return {k: round(v, 3) for k, v in top.items()} | {
            "peak_rss_mib": round(max(r["peak_rss_mib"] for r in runs), 1)
        }

    plain, mine = best(plain_runs), best(our_runs)
    return {
        "benchmark": "ingest",
        "images": images,
        "processes": processes,
        "threads": threads,
        "samples_per_shard": samples_per_shard,
        "repeats": repeats,
        "img2dataset": plain,
        "denseforge": mine,
        "ratio_vs_img2dataset": round(mine["images_per_s"] / plain["images_per_s"], 3),
        "ratio_vs_img2dataset_incl_ray_init": round(mine["images_per_s_incl_ray_init"] / plain["images_per_s"], 3),
        "runs": {
            "img2dataset": [{k: round(v, 3) for k, v in r.items()} for r in plain_runs],
            "denseforge": [{k: round(v, 3) for k, v in r.items()} for r in our_runs],
        },
    }
