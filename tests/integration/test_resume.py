"""Kill the driver with SIGKILL mid-run, resume, and get exactly what a clean run gets."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from denseforge.pipeline.bench.memory import descendants
from denseforge.pipeline.demo import LoopbackImageServer

from ..conftest import run_cli

pytestmark = pytest.mark.slow


def _config(tmp_path: Path, table: Path) -> Path:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"""
ray: {{num_cpus: 2}}
input: {{path: {table}}}
ingest: {{processes: 1, threads: 1, image_size: 128, allow_private_addresses: true}}
embed: {{model: df-tiny-clip, weights: random}}
dedup: {{epsilon: null, clusters: 3, keep: first_key}}
output: {{samples_per_shard: 2}}
""")
    return cfg


def _result(out: Path) -> tuple[list, dict]:
    manifest = sorted((r["key"], r["sha256"], r["shard"]) for r in pq.read_table(out / "manifest.parquet").to_pylist())
    shards = {p.name: p.read_bytes() for p in sorted((out / "shards").glob("*.tar"))}
    return manifest, shards


def test_sigkill_then_resume_equals_a_clean_run(tmp_path, photo_dir):
    import pyarrow as pa

    with LoopbackImageServer(photo_dir, delay_s=0.4) as server:
        names = ["astronaut", "coffee", "chelsea", "rocket"] * 4 + ["page", "missing"]
        table = tmp_path / "t.parquet"
        pq.write_table(pa.table({"url": [f"{server.base_url}/img/{n}.jpg" for n in names],
                                 "caption": [f"{n} {i}" for i, n in enumerate(names)]}), table)
        cfg = _config(tmp_path, table)

        killed = tmp_path / "killed"
        proc = subprocess.Popen([sys.executable, "-m", "denseforge.pipeline.cli", "run", str(cfg), "--out", str(killed)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 120
        while time.time() < deadline and len(list((killed / "raw").glob("*.ingested.json"))) < 2:
            time.sleep(0.1)
        orphans = descendants(proc.pid)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        ingested = len(list((killed / "raw").glob("*.ingested.json")))
        assert 2 <= ingested < 9, "the kill must land mid-ingest"
        assert not (killed / "stats.json").exists()
        assert "resume" in run_cli("status", str(killed)).stdout

        time.sleep(2)
        for pid in orphans:  # Ray's agents may outlive a SIGKILLed driver; don't leak them into CI
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        run_cli("resume", str(killed))
        clean = tmp_path / "clean"
        run_cli("run", str(cfg), "--out", str(clean))

    killed_manifest, killed_shards = _result(killed)
    clean_manifest, clean_shards = _result(clean)
    assert len(clean_manifest) == 4  # 16 downloads of 4 photos: 12 exact duplicates removed
    assert killed_manifest == clean_manifest  # none lost, none twice
    assert killed_shards == clean_shards  # byte-identical shards
    rejects = sorted(r["reason"] for r in pq.read_table(killed / "rejects.parquet").to_pylist())
    assert rejects == ["http_404", "not_an_image"]
    decisions = [pq.read_table(d / "dedup" / "decisions.parquet").to_pylist() for d in (killed, clean)]
    assert decisions[0] == decisions[1] and sum(1 for r in decisions[0] if r["reason"]) == 12
