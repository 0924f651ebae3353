"""`denseforge bench io`: the storage layer against local disk, in the same run. Shard and
embeddings files written and read through `denseforge.storage` on local disk and on an object store
(throughput, and the process's peak RSS while shards stream out), then the whole run on the same
served corpus with its input table and run directory on local disk and in the store: wall time,
the ratio, peak RSS of the process tree, and whether both wrote the same bytes.

Without `--store`, the store is a loopback S3 server (moto's server mode, started outside this
process tree so its memory is not counted); with `--store s3://bucket/prefix` it is yours
(credentials from the standard chain)."""

from __future__ import annotations

import io
import os
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

MIB = 2**20


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def loopback_s3() -> Iterator[str]:
    """A moto S3 server on loopback, detached from this process tree (so the memory it uses is
    not counted as ours), with one bucket; yields its s3:// URL. The AWS_* variables point this
    process and the Ray workers it starts at it."""
    from denseforge.errors import DenseforgeError

    try:
        import boto3
        import moto  # noqa: F401
    except ImportError:
        raise DenseforgeError(
            "bench io needs a store: give --store s3://bucket/prefix, or "
            "`pip install 'moto[server]'` for a loopback S3 server"
        ) from None
    port = _free_port()
    launch = subprocess.run(
        ["sh", "-c", f'"{sys.executable}" -m moto.server -H 127.0.0.1 -p {port} >/dev/null 2>&1 & echo $!'],
        capture_output=True,
        text=True,
        check=True,
    )
    pid = int(launch.stdout.strip())
    env = {
        "AWS_ACCESS_KEY_ID": "bench",
        "AWS_SECRET_ACCESS_KEY": "bench",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise DenseforgeError(f"the loopback S3 server did not start on port {port}") from None
                time.sleep(0.2)
        boto3.client("s3").create_bucket(Bucket="denseforge-bench")
        yield "s3://denseforge-bench/bench"
    finally:
        os.kill(pid, 15)
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _rss() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_during(fn) -> tuple[float, int]:
    """Seconds `fn` took and the most this process's RSS rose above its start meanwhile."""
    import threading

    start_rss, peak = _rss(), [0]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], _rss() - start_rss)
            stop.wait(0.01)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    start = time.perf_counter()
    fn()
    seconds = time.perf_counter() - start
    stop.set()
    thread.join()
    return seconds, peak[0]


def _files(root, shards: int, shard_mib: int, rows: int) -> dict[str, Any]:
    """Write then read `shards` tar shards of `shard_mib` MiB and one embeddings file of `rows`
    x 512 float16 vectors under `root`."""
    import numpy as np

    from denseforge.stages.embed import embedding_table, write_embeddings_file
    from denseforge.stages.write import read_member
    from denseforge.storage import open_binary, read_parquet, writing

    member = os.urandom(256 * 1024)  # JPEG-sized members of incompressible bytes
    per_shard = shard_mib * MIB // len(member)

    def write_shards() -> None:
        for s in range(shards):
            with writing(root / f"shards/{s:07d}.tar") as handle, tarfile.open(fileobj=handle, mode="w") as tar:
                for i in range(per_shard):
                    info = tarfile.TarInfo(f"{s:07d}{i:05d}.jpg")
                    info.size = len(member)
                    tar.addfile(info, io.BytesIO(member))

    def read_shards() -> None:
        for s in range(shards):
            with open_binary(root / f"shards/{s:07d}.tar") as source, tarfile.open(fileobj=source, mode="r|") as tar:
                for entry in tar:
                    read_member(tar, entry)

    vectors = np.random.default_rng(0).normal(size=(rows, 512)).astype(np.float32)
    table = embedding_table([f"{i:012d}" for i in range(rows)], [0] * rows, vectors, {}, dtype="float16")
    target = root / "embeddings/0000000.parquet"
    write_s, write_peak = _peak_during(write_shards)
    read_s, _ = _peak_during(read_shards)
    emb_write_s, _ = _peak_during(lambda: write_embeddings_file(target, table))
    emb_read_s, _ = _peak_during(lambda: read_parquet(target))
    shard_bytes = shards * per_shard * len(member)
    emb_bytes = target.stat().st_size
    return {
        "shard_write_mib_s": round(shard_bytes / MIB / write_s, 1),
        "shard_read_mib_s": round(shard_bytes / MIB / read_s, 1),
        "embeddings_write_mib_s": round(emb_bytes / MIB / emb_write_s, 1),
        "embeddings_read_mib_s": round(emb_bytes / MIB / emb_read_s, 1),
        "shard_write_rss_rise_mib": round(write_peak / MIB, 1),
    }


def bench_io(
    images: int = 1000, store: str | None = None, shards: int = 4, shard_mib: int = 64, rows: int = 100_000
) -> dict[str, Any]:
    from denseforge.pipeline.bench.corpus import served_corpus
    from denseforge.pipeline.bench.e2e import run_e2e
    from denseforge.storage import list_files, location, write_bytes

    with _store(store) as url, tempfile.TemporaryDirectory(prefix="denseforge-bench-io-") as tmp:
        base = location(f"{url}/{uuid.uuid4().hex[:8]}")
        local = location(Path(tmp) / "files")
        files = {
            "local": _files(local, shards, shard_mib, rows),
            "store": _files(base / "files", shards, shard_mib, rows),
        }
        result: dict[str, Any] = {
            "benchmark": "io",
            "store": url,
            "shards": shards,
            "shard_mib": shard_mib,
            "embedding_rows": rows,
            "files": files,
            "files_ratio_store_to_local": {
                k: round(files["store"][k] / files["local"][k], 3) for k in files["local"] if k.endswith("_s")
            },
        }
        if images:
            root = Path(tmp)
            with served_corpus(root, images) as table:
                stored_table = base / "input" / table.name
                write_bytes(stored_table, table.read_bytes())
                runs = {
                    "local": run_e2e(images, location(root / "run"), str(table)),
                    "store": run_e2e(images, base / "run", str(stored_table)),
                }
            same = {p.name: p.read_bytes() for p in list_files(location(root / "run") / "shards", ".tar")} == {
                p.name: p.read_bytes() for p in list_files(base / "run" / "shards", ".tar")
            }
            result["e2e"] = {
                "images": images,
                **{
                    k: {
                        "seconds": v["seconds"],
                        "peak_rss_mib": v["peak_rss_mib"],
                        "written": v["funnel"]["written"],
                        "phases_s": {p: f["seconds"] for p, f in v["phases"].items()},
                    }
                    for k, v in runs.items()
                },
                "wall_ratio_store_to_local": round(runs["store"]["seconds"] / runs["local"]["seconds"], 3),
                "peak_rss_ratio_store_to_local": round(
                    runs["store"]["peak_rss_mib"] / runs["local"]["peak_rss_mib"], 3
                ),
                "same_shard_bytes": same,
            }
        result["note"] = (
            "throughput through denseforge.storage (tar shards streamed by writing(), parquet "
            "embeddings); e2e: the demo's stages on the same served photos, once with input and run "
            "directory on local disk, once in the store"
        )
        return result


@contextmanager
def _store(store: str | None) -> Iterator[str]:
    if store:
        yield store.rstrip("/")
    else:
        with loopback_s3() as url:
            yield url
