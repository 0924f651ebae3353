"""`denseforge bench ingest`: our ingest against plain img2dataset on the same loopback corpus.

Both sides get the same processes, threads, image size and corpus, in the same run, so the ratio
means something on a shared machine; absolute seconds alone would not. Peak memory is the summed
RSS of the benchmark process and all its descendants (Ray's own processes included), sampled.
"""

from __future__ import annotations

import random
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from denseforge.errors import DenseforgeError
from denseforge.pipeline.config import parse_config
from denseforge.pipeline.demo import PHOTOS, LoopbackImageServer, load_photo


def process_table() -> dict[int, tuple[int, int]]:
    """pid -> (parent pid, RSS bytes) for every process visible in /proc."""
    import os

    page = os.sysconf("SC_PAGE_SIZE")
    table = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        table[int(stat.parent.name)] = (int(fields[1]), int(fields[21]) * page)
    return table


def descendants(pid: int, table: dict[int, tuple[int, int]] | None = None) -> list[int]:
    """Every process below `pid` (children, grandchildren, …)."""
    children: dict[int, list[int]] = {}
    for child, (parent, _) in (table or process_table()).items():
        children.setdefault(parent, []).append(child)
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


class TreeMemory:
    """Peak summed RSS (bytes) of a process and its descendants, sampled from /proc."""

    def __init__(self, interval_s: float = 0.1):
        self.interval_s, self.peak = interval_s, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    @staticmethod
    def current() -> int:
        import os

        table = process_table()
        me = os.getpid()
        return table[me][1] + sum(table[pid][1] for pid in descendants(me, table) if pid in table)

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.current())
            self._stop.wait(self.interval_s)

    def __enter__(self) -> "TreeMemory":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def build_bench_corpus(root: Path, images: int, seed: int = 0) -> list[str]:
    """`images` distinct JPEGs (random 640x480-ish crops of real photos); returns file names."""
    rng = random.Random(seed)
    photos = [load_photo(name).convert("RGB") for name in PHOTOS]
    names = []
    root.mkdir(parents=True, exist_ok=True)
    for i in range(images):
        photo = photos[i % len(photos)]
        w, h = photo.size
        cw, ch = rng.randint(w // 2, w), rng.randint(h // 2, h)
        x, y = rng.randint(0, w - cw), rng.randint(0, h - ch)
        crop = photo.crop((x, y, x + cw, y + ch)).resize((640, max(1, round(640 * ch / cw))))
        name = f"{i:06d}.jpg"
        crop.save(root / name, format="JPEG", quality=90)
        names.append(name)
    return names


def _plain_img2dataset(table: Path, out: Path, processes: int, threads: int, spp: int) -> float:
    from img2dataset import download

    start = time.perf_counter()
    download(url_list=str(table), input_format="parquet", url_col="url", caption_col="caption",
             output_format="webdataset", output_folder=str(out), processes_count=processes, thread_count=threads,
             image_size=512, resize_mode="keep_ratio", resize_only_if_bigger=True, encode_quality=95,
             number_sample_per_shard=spp, distributor="multiprocessing", timeout=10, retries=0,
             enable_wandb=False)  # a fresh folder; its "overwrite" mode deletes its own _tmp (1.47 bug)
    return time.perf_counter() - start


def _ours(table: Path, out: Path, processes: int, threads: int, spp: int) -> dict[str, float]:
    import ray

    from denseforge.pipeline.progress import Progress
    from denseforge.pipeline.rundir import RunDir
    from denseforge.pipeline.ray_session import start_ray
    from denseforge.pipeline.runner import plan_units, run_ingest

    config = parse_config({
        "input": {"path": str(table)}, "ray": {"num_cpus": max(processes, 2)},
        "ingest": {"processes": processes, "threads": threads, "image_size": 512, "allow_private_addresses": True},
        "output": {"samples_per_shard": spp},
    })
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


def _stdout_to_stderr():
    """img2dataset's workers print progress on stdout; keep stdout for the JSON result."""
    import contextlib
    import os
    import sys

    @contextlib.contextmanager
    def redirected():
        sys.stdout.flush()
        saved = os.dup(1)
        os.dup2(2, 1)
        try:
            yield
        finally:
            sys.stdout.flush()
            os.dup2(saved, 1)
            os.close(saved)

    return redirected()


def bench_ingest(images: int = 1000, processes: int = 2, threads: int = 16, samples_per_shard: int = 100,
                 repeats: int = 2) -> dict[str, Any]:
    """Images/s of denseforge ingest vs plain img2dataset (alternating, best of `repeats`), and peak memory."""
    if images < 1 or repeats < 1:
        raise DenseforgeError("bench ingest: --images and --repeats must be at least 1")
    plain_runs: list[dict[str, float]] = []
    our_runs: list[dict[str, float]] = []
    with tempfile.TemporaryDirectory(prefix="denseforge-bench-") as tmp, _stdout_to_stderr():
        root = Path(tmp)
        names = build_bench_corpus(root / "files", images)
        with LoopbackImageServer(root / "files") as server:
            table = root / "urls.parquet"
            pq.write_table(pa.table({"url": [f"{server.base_url}/img/{n}" for n in names],
                                     "caption": [f"image {n}" for n in names]}), table)
            for r in range(repeats):
                with TreeMemory() as mem:
                    seconds = _plain_img2dataset(table, root / f"plain{r}", processes, threads, samples_per_shard)
                ok = _successes(root / f"plain{r}")
                plain_runs.append({"seconds": seconds, "downloaded": ok, "images_per_s": ok / seconds,
                                   "peak_rss_mib": mem.peak / 2**20})
                with TreeMemory() as mem:
                    ours = _ours(table, root / f"ours{r}", processes, threads, samples_per_shard)
                ok = _successes(root / f"ours{r}" / "raw")
                our_runs.append({"seconds": ours["ingest_s"], "ray_init_s": ours["ray_init_s"], "downloaded": ok,
                                 "images_per_s": ok / ours["ingest_s"],
                                 "images_per_s_incl_ray_init": ok / (ours["ingest_s"] + ours["ray_init_s"]),
                                 "peak_rss_mib": mem.peak / 2**20})

    def best(runs: list[dict[str, float]]) -> dict[str, float]:
        top = max(runs, key=lambda run: run["images_per_s"])
        return {k: round(v, 3) for k, v in top.items()} | {"peak_rss_mib": round(max(r["peak_rss_mib"] for r in runs), 1)}

    plain, mine = best(plain_runs), best(our_runs)
    return {
        "benchmark": "ingest", "images": images, "processes": processes, "threads": threads,
        "samples_per_shard": samples_per_shard, "repeats": repeats,
        "img2dataset": plain, "denseforge": mine,
        "ratio_vs_img2dataset": round(mine["images_per_s"] / plain["images_per_s"], 3),
        "ratio_vs_img2dataset_incl_ray_init": round(mine["images_per_s_incl_ray_init"] / plain["images_per_s"], 3),
        "runs": {"img2dataset": [{k: round(v, 3) for k, v in r.items()} for r in plain_runs],
                 "denseforge": [{k: round(v, 3) for k, v in r.items()} for r in our_runs]},
    }


def planted_embeddings(n: int, dim: int = 512, dup_fraction: float = 0.1, topics: int | None = None,
                       seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """n L2-normalised vectors: topic-structured originals (intra-topic cosine ~0.5) and planted
    near-copies (cosine ~0.98 to their original). Returns (vectors, group id per row)."""
    rng = np.random.default_rng(seed)
    copies = int(n * dup_fraction)
    originals = n - copies
    topics = topics or max(1, n // 200)
    centers = rng.standard_normal((topics, dim), dtype=np.float32)
    x = np.empty((n, dim), dtype=np.float32)
    for s in range(0, originals, 65536):
        e = min(originals, s + 65536)
        x[s:e] = centers[rng.integers(0, topics, e - s)] + rng.standard_normal((e - s, dim), dtype=np.float32)
    x[:originals] /= np.linalg.norm(x[:originals], axis=1, keepdims=True)
    group = np.empty(n, dtype=np.int64)
    group[:originals] = np.arange(originals)
    source = rng.integers(0, originals, copies)
    group[originals:] = source
    for s in range(0, copies, 65536):
        e = min(copies, s + 65536)
        noisy = x[source[s:e]] + rng.standard_normal((e - s, dim), dtype=np.float32) * (0.2 / np.sqrt(dim))
        x[originals + s:originals + e] = noisy / np.linalg.norm(noisy, axis=1, keepdims=True)
    perm = rng.permutation(n)
    return x[perm], group[perm]


def _score(reason: np.ndarray, dup_of: np.ndarray, group: np.ndarray) -> dict[str, float]:
    removed = np.flatnonzero(reason != "")
    true_pos = int((group[removed] == group[dup_of[removed]]).sum())
    planted = len(group) - len(np.unique(group))
    return {"removed": len(removed), "planted": planted,
            "precision": round(true_pos / max(len(removed), 1), 4), "recall": round(true_pos / max(planted, 1), 4)}


def _ours_dedup(x: np.ndarray, epsilon: float, cluster_size: int, seed: int,
                points_per_centroid: int = 256) -> tuple[np.ndarray, np.ndarray, dict[str, float]]:
    from denseforge.stages import dedup as dd

    n = len(x)
    times: dict[str, float] = {}
    start = time.perf_counter()
    k = dd.clusters_for(n, None, cluster_size)
    rng = np.random.default_rng(seed)
    sample = x[np.sort(rng.choice(n, size=min(n, k * points_per_centroid), replace=False))]
    centroids = dd.train_kmeans(sample, k, niter=20, seed=seed, max_points_per_centroid=points_per_centroid)
    del sample
    times["kmeans_train_s"] = time.perf_counter() - start
    start = time.perf_counter()
    labels, sims = dd.assign_clusters(x, centroids)
    times["assign_s"] = time.perf_counter() - start
    start = time.perf_counter()
    keys = np.char.zfill(np.arange(n).astype(str), 9)
    result = dd.dedup_all(labels, x, keys, keys, np.zeros(n, np.int64), sims, np.ones(n),
                          epsilon=epsilon, phash_max_distance=None, exact=False, policy="nearest_centroid")
    times["dedup_s"] = time.perf_counter() - start
    times["clusters"] = k
    return result.reason, result.dup_of, times


def _naive_dedup(x: np.ndarray, epsilon: float) -> tuple[np.ndarray, np.ndarray]:
    """The baseline: global brute force, the full n x n similarity matrix, greedy in key order."""
    sims = x @ x.T
    n = len(x)
    reason = np.full(n, "", dtype=object)
    dup_of = np.full(n, -1, dtype=np.int64)
    kept = np.zeros(n, dtype=bool)
    for j in range(n):
        column = np.where(kept[:j], sims[:j, j], -np.inf)
        i = int(np.argmax(column)) if j else -1
        if j and column[i] > 1 - epsilon:
            reason[j], dup_of[j] = "semantic_duplicate", i
        else:
            kept[j] = True
    return reason, dup_of


def bench_dedup(sizes: tuple[int, ...] = (100_000, 1_000_000), dim: int = 512, epsilon: float = 0.05,
                cluster_size: int = 1000, baseline_n: int = 20_000, seed: int = 0) -> dict[str, Any]:
    """Wall time, peak RSS, precision/recall of planted duplicates, and speed-up against the naive
    baseline at the largest n it can do (`baseline_n`), measured in the same run."""
    results: dict[str, Any] = {"benchmark": "dedup", "dim": dim, "epsilon": epsilon, "cluster_size": cluster_size,
                               "faiss_gpu": _faiss_gpu(), "sizes": {}}
    for n in sizes:
        x, group = planted_embeddings(n, dim, seed=seed)
        with TreeMemory() as mem:
            start = time.perf_counter()
            reason, dup_of, times = _ours_dedup(x, epsilon, cluster_size, seed)
            wall = time.perf_counter() - start
        results["sizes"][str(n)] = {"seconds": round(wall, 2), "peak_rss_mib": round(mem.peak / 2**20, 1),
                                    "input_mib": round(x.nbytes / 2**20, 1),
                                    **{k: round(v, 2) for k, v in times.items()}, **_score(reason, dup_of, group)}
        del x, group
    if len(sizes) > 1:
        a, b = min(sizes), max(sizes)
        results["scaling"] = {"n_ratio": b / a, "time_ratio": round(results["sizes"][str(b)]["seconds"]
                                                                    / results["sizes"][str(a)]["seconds"], 2)}
    x, group = planted_embeddings(baseline_n, dim, seed=seed + 1)
    start = time.perf_counter()
    reason, dup_of = _naive_dedup(x, epsilon)
    naive_s = time.perf_counter() - start
    naive_score = _score(reason, dup_of, group)
    start = time.perf_counter()
    reason, dup_of, _ = _ours_dedup(x, epsilon, cluster_size, seed)
    ours_s = time.perf_counter() - start
    results["baseline"] = {"n": baseline_n, "method": "numpy global brute force (n x n) + greedy",
                           "naive_s": round(naive_s, 2), "ours_s": round(ours_s, 2),
                           "speedup": round(naive_s / ours_s, 1), "naive": naive_score,
                           "ours": _score(reason, dup_of, group)}
    return results


def _faiss_gpu() -> bool:
    from denseforge.stages.dedup import faiss_gpu_available

    return faiss_gpu_available()


BENCH_EXPERTS = [
    {"plugin": "clip-tags", "name": "tagger", "options": {"model": "df-tiny-clip", "weights": "random", "threshold": 0.0},
     "resources": {"num_cpus": 0.5, "batch_size": 16}},
    {"plugin": "yolo", "options": {"model": "yolov8n.pt", "weights": "random"}, "resources": {"num_cpus": 0.5}},
    {"plugin": "rapidocr", "resources": {"num_cpus": 0.5}},
]


def bench_experts(images: int = 96, experts: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """Images/s of each expert alone (in-process, its own batch size), then all of them together
    in the real DAG on the same images; parallel efficiency = sum of the experts' busy CPU time
    alone / (DAG wall time x cores), i.e. how much of the machine the DAG kept busy with expert work."""
    import os

    from PIL import Image

    from denseforge.experts.base import ExpertInput
    from denseforge.pipeline.perceive_phase import plan_experts
    from denseforge.pipeline.runner import execute
    from denseforge.pipeline.rundir import RunDir

    experts = experts or BENCH_EXPERTS
    cores = os.cpu_count() or 1
    result: dict[str, Any] = {"benchmark": "experts", "images": images, "cores": cores, "experts": {}}
    with tempfile.TemporaryDirectory(prefix="denseforge-bench-") as tmp:
        root = Path(tmp)
        names = build_bench_corpus(root / "images", images)
        pictures = [Image.open(root / "images" / n).convert("RGB") for n in names]
        config = parse_config({"input": {"kind": "folder", "path": str(root / "images")},
                               "ray": {"num_cpus": cores}, "embed": {"enabled": False}, "dedup": {"enabled": False},
                               "perceive": {"enabled": True, "experts": experts},
                               "output": {"samples_per_shard": 8}})
        busy_total = 0.0
        for spec, expert, resources in plan_experts(config.perceive):
            start = time.perf_counter()
            expert.setup()
            setup_s = time.perf_counter() - start
            start, cpu_start = time.perf_counter(), time.process_time()
            for s in range(0, images, resources.batch_size):
                expert([ExpertInput(str(i), p) for i, p in enumerate(pictures[s:s + resources.batch_size])])
            wall, cpu = time.perf_counter() - start, time.process_time() - cpu_start
            busy_total += cpu
            result["experts"][spec.instance] = {"images_per_s": round(images / wall, 2), "wall_s": round(wall, 2),
                                                "busy_cpu_s": round(cpu, 2), "setup_s": round(setup_s, 2),
                                                "batch_size": resources.batch_size}
        rd = RunDir(root / "run")
        rd.create(config)
        stats = execute(rd, config)
        wall = stats["timings"]["process_s"]
        result["dag"] = {"seconds": round(wall, 2), "images_per_s": round(images / wall, 2),
                         "written": stats["funnel"]["written"],
                         "note": "process phase wall time: actor start-up and model loading included"}
        result["sum_busy_cpu_alone_s"] = round(busy_total, 2)
        result["sequential_sum_of_walls_s"] = round(sum(e["wall_s"] for e in result["experts"].values()), 2)
        result["parallel_efficiency"] = round(busy_total / (wall * cores), 3)
    return result


class _StubChatServer:
    """A loopback OpenAI-compatible chat endpoint, in its own process, answering after `latency_s`
    (a stand-in for a model server, so the benchmark measures the client, not a model)."""

    CAPTION = ("Two dogs run across a wet street in front of a red car while a woman holds an umbrella "
               "under a sign that reads \"STOP\".")

    def __init__(self, latency_s: float):
        import json
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        caption = self.CAPTION

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):  # noqa: N802
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                time.sleep(latency_s)
                data = json.dumps({"id": "b", "object": "chat.completion", "created": 0, "model": body["model"],
                                   "choices": [{"index": 0, "finish_reason": "stop",
                                                "message": {"role": "assistant", "content": caption}}],
                                   "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        class Server(ThreadingHTTPServer):
            daemon_threads = True
            request_queue_size = 256

        import multiprocessing

        self.server = Server(("127.0.0.1", 0), Handler)
        # its own process, so the server does not share the client's GIL
        self.process = multiprocessing.get_context("fork").Process(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> str:
        self.process.start()
        return f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def __exit__(self, *exc) -> None:
        self.process.terminate()
        self.process.join(timeout=5)
        self.server.server_close()


def bench_fuse(samples: int = 256, latency_s: float = 0.05, concurrencies: tuple[int, ...] = (1, 8, 32)) -> dict[str, Any]:
    """Captions/s of the openai backend against a loopback server with a fixed latency, at several
    client concurrencies (ideal: concurrency / latency), the template backend's samples/s, and the
    cost of grounding and qa per sample."""
    import io


    from denseforge.stages.fuse import OpenAICaptioner, PromptTemplate, TemplateCaptioner
    from denseforge.stages.ground import ground_mentions
    from denseforge.stages.qa import QaSettings, assess
    from denseforge.stages.sample import Sample

    buf = io.BytesIO()
    load_photo("coffee").convert("RGB").resize((448, 299)).save(buf, format="JPEG")
    image = buf.getvalue()
    experts = {"objects": [{"label": "dog", "score": 0.9, "box": [10.0, 20.0, 200.0, 280.0]},
                           {"label": "dog", "score": 0.8, "box": [220.0, 40.0, 400.0, 290.0]},
                           {"label": "car", "score": 0.7, "box": [0.0, 150.0, 448.0, 299.0]},
                           {"label": "person", "score": 0.6, "box": [300.0, 10.0, 380.0, 200.0]}],
               "ocr": [{"text": "STOP", "score": 0.99, "box": [50.0, 5.0, 120.0, 40.0], "polygon": []}],
               "tags": [{"label": "street", "score": 0.5}, {"label": "umbrella", "score": 0.3}]}
    batch = [Sample(key=f"{i:012d}", width=448, height=299, sha256="0" * 64, alt_text="dogs in the rain",
                    experts=experts) for i in range(samples)]
    images = [image] * samples
    result: dict[str, Any] = {"benchmark": "fuse", "samples": samples, "server_latency_s": latency_s, "openai": {}}
    prompt = PromptTemplate.load(None, 192)
    with _StubChatServer(latency_s) as url:
        for c in concurrencies:
            captioner = OpenAICaptioner(prompt, url, "stub", max_retries=0, timeout_s=30, concurrency=c)
            start = time.perf_counter()
            out = captioner(batch, images)
            seconds = time.perf_counter() - start
            errors = sum(1 for o in out if o.error)
            ideal = c / latency_s if latency_s > 0 else None
            result["openai"][str(c)] = {"captions_per_s": round(samples / seconds, 1), "errors": errors,
                                        "ideal_captions_per_s": round(ideal, 1) if ideal else None,
                                        "fraction_of_ideal": round(samples / seconds / ideal, 3) if ideal else None}
    start = time.perf_counter()
    captions = TemplateCaptioner()(batch, images)
    result["template_samples_per_s"] = round(samples / (time.perf_counter() - start), 1)
    for sample, caption in zip(batch, captions):
        sample.caption = _StubChatServer.CAPTION
    start = time.perf_counter()
    for sample in batch:
        sample.grounding = ground_mentions(sample.caption, sample.experts)
    result["ground_ms_per_sample"] = round(1000 * (time.perf_counter() - start) / samples, 3)
    settings = QaSettings()
    start = time.perf_counter()
    reports = [assess(sample, settings) for sample in batch]
    result["qa_ms_per_sample"] = round(1000 * (time.perf_counter() - start) / samples, 3)
    result["qa_passed"] = sum(r.passed for r in reports)
    return result


def run_benchmark(name: str, **kwargs: Any) -> dict[str, Any]:
    if name == "fuse":
        return bench_fuse(**kwargs)
    if name == "experts":
        return bench_experts(**kwargs)
    if name == "ingest":
        return bench_ingest(**kwargs)
    if name == "dedup":
        return bench_dedup(**kwargs)
    raise DenseforgeError(f"unknown benchmark {name!r}")
