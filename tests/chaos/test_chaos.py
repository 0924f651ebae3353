"""Chaos: killed drivers and workers, broken model servers, a full disk. After each, the run (or a
resume) must end with exactly the samples of a clean run: none lost, none twice, same bytes.

The kill points come from a seed printed in the test output (`CHAOS_SEED` chooses it)."""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from denseforge.pipeline.bench.memory import descendants
from denseforge.pipeline.chat_stub import StubChatServer
from denseforge.pipeline.demo import LoopbackImageServer

from ..conftest import every_phase_config, run_cli, run_result

pytestmark = [pytest.mark.slow, pytest.mark.chaos]
UNITS = 9


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, photo_dir):
    tmp = tmp_path_factory.mktemp("chaos")
    with LoopbackImageServer(photo_dir, delay_s=0.25) as server:  # slow enough that threads finish out of order
        names = ["astronaut", "coffee", "chelsea", "rocket"] * 4 + ["page", "missing"]
        table = tmp / "t.parquet"
        pq.write_table(
            pa.table(
                {
                    "url": [f"{server.base_url}/img/{n}.jpg" for n in names],
                    "caption": [f"{n} {i}" for i, n in enumerate(names)],
                }
            ),
            table,
        )
        cfg = every_phase_config(tmp, table)
        clean = tmp / "clean"
        run_cli("run", str(cfg), "--out", str(clean))
        again = tmp / "again"
        run_cli("run", str(cfg), "--out", str(again))
        yield tmp, cfg, clean, server


def _count(folder: Path, pattern: str) -> int:
    return len(list(folder.glob(pattern))) if folder.exists() else 0


PHASES = {  # phase -> (the moment it is under way, the longest random wait after it)
    "ingest": (lambda out: _count(out / "raw", "*.ingested.json") >= 1, 0.4),
    "embed": (lambda out: _count(out / "embeddings", "*.done.json") >= 1, 0.4),
    "dedup": (lambda out: _count(out / "embeddings", "*.done.json") == UNITS, 0.15),
    "perceive": (lambda out: (out / "dedup" / "summary.json").exists(), 1.0),
    "fuse": (lambda out: _count(out / "shards" / "_done", "*.json") >= 1, 0.3),
    "write": (lambda out: _count(out / "shards" / "_done", "*.json") >= UNITS // 2, 0.3),
    "finalize": (lambda out: _count(out / "shards" / "_done", "*.json") == UNITS, 0.05),
}


def _kill_driver_during(cmd: list[str], out: Path, phase: str, rng: random.Random, check_lock: bool) -> str:
    """Start the CLI, wait until `phase` is under way, wait a random moment, SIGKILL the driver
    (and reap the Ray processes it leaves). Returns where the kill landed."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "denseforge.pipeline.cli", *cmd], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    started, wait = PHASES[phase]
    deadline = time.time() + 180
    while time.time() < deadline and proc.poll() is None and not started(out):
        time.sleep(0.05)
    if check_lock:  # a second driver on the same directory is refused while this one works
        second = run_cli("resume", str(out), check=False)
        assert second.returncode == 2 and "in use by a running driver" in second.stderr
    time.sleep(rng.uniform(0, wait))
    finished = proc.poll() is not None
    orphans = descendants(proc.pid)
    os.kill(proc.pid, signal.SIGKILL) if not finished else None
    proc.wait()
    time.sleep(1)
    for pid in orphans:  # Ray's processes may outlive a SIGKILLed driver; don't leak them into CI
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    landed = (
        f"ingest {_count(out / 'raw', '*.ingested.json')}/{UNITS}, "
        f"embed {_count(out / 'embeddings', '*.done.json')}/{UNITS}, "
        f"dedup {'done' if (out / 'dedup' / 'summary.json').exists() else 'not done'}, "
        f"write {_count(out / 'shards' / '_done', '*.json')}/{UNITS}, "
        f"stats {'yes' if (out / 'stats.json').exists() else 'no'}"
    )
    return ("(finished before the kill) " if finished else "") + landed


def test_two_clean_runs_with_many_threads_are_byte_identical(corpus):
    tmp, _, clean, _ = corpus
    assert run_result(clean) == run_result(tmp / "again")


def test_sigkill_of_the_driver_in_every_phase_then_resume_equals_a_clean_run(corpus):
    tmp, cfg, clean, _ = corpus
    seed = int(os.environ.get("CHAOS_SEED", random.randrange(10**6)))
    print(f"\nCHAOS_SEED={seed}")
    rng = random.Random(seed)
    out = tmp / "killed"
    landed = []
    for i, phase in enumerate(PHASES):
        cmd = ["run", str(cfg), "--out", str(out)] if i == 0 else ["resume", str(out)]
        landed.append((phase, _kill_driver_during(cmd, out, phase, rng, check_lock=i == 0)))
        print(f"kill {i + 1} ({phase}): {landed[-1][1]}")
    assert "driver: no driver holds the run" in run_cli("status", str(out)).stdout or (out / "stats.json").exists()
    run_cli("resume", str(out))
    assert run_result(out) == run_result(clean), f"seed {seed}: {landed}"
    assert not list(out.rglob(".*.tmp"))
    stats = json.loads((out / "stats.json").read_text())
    assert stats["funnel"]["balanced"] and stats["funnel"]["written"] == 4


def test_a_killed_ray_worker_costs_a_retry_not_a_sample(corpus):
    tmp, cfg, clean, _ = corpus
    out = tmp / "worker_killed"
    proc = subprocess.Popen(
        [sys.executable, "-m", "denseforge.pipeline.cli", "run", str(cfg), "--out", str(out)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    killed = None
    deadline = time.time() + 180
    while time.time() < deadline and proc.poll() is None and killed is None:
        if (out / "dedup" / "summary.json").exists():
            for pid in descendants(proc.pid):
                try:
                    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
                except OSError:
                    continue
                if "StageWorker" in cmdline:  # an actor of an expert pool, in the middle of the stream
                    os.kill(pid, signal.SIGKILL)
                    killed = cmdline.replace("\0", " ").strip()
                    break
        time.sleep(0.05)
    _, err = proc.communicate(timeout=300)
    assert killed is not None, "no stage worker was found to kill"
    assert proc.returncode == 0, err
    assert run_result(out) == run_result(clean)


def test_a_model_server_that_misbehaves_costs_those_samples_with_reasons(tmp_path, photo_dir):
    folder = tmp_path / "images"
    folder.mkdir()
    faults = ["HTTP500", "HANG", "DRIP", "CLOSE", "NOTJSON", "NOCHOICES", "fine"]
    for i, fault in enumerate(faults):
        (folder / f"{i}.jpg").write_bytes((photo_dir / "coffee.jpg").read_bytes())
        (folder / f"{i}.txt").write_text(fault)
    with StubChatServer(hang_s=5) as url:
        cfg = tmp_path / "c.yaml"
        cfg.write_text(f"""
ray: {{num_cpus: 2}}
input: {{kind: folder, path: {folder}}}
embed: {{enabled: false}}
dedup: {{enabled: false}}
fuse: {{enabled: true, backend: openai, openai: {{base_url: "{url}", model: m, timeout_s: 2, max_retries: 1,
  concurrency: 8}}}}
qa: {{enabled: true, min_words: 1, max_hallucination: 1.0}}
""")
        proc = run_cli("run", str(cfg), "--out", str(tmp_path / "run"))
    stats = json.loads((tmp_path / "run" / "stats.json").read_text())
    assert stats["funnel"]["written"] == 1 and stats["funnel"]["rejected_by_reason"] == {"fuse/captioner_error": 6}
    assert stats["stages"]["fuse"]["failed_total"] == 6 and "stage fuse: failed on 6 of 7 items" in proc.stderr
    rejects = pq.read_table(tmp_path / "run" / "rejects.parquet").to_pylist()
    print("\n".join(f"{r['key']}: {r['detail'][:120]}" for r in rejects))
    assert len(rejects) == 6 and all(r["detail"] for r in rejects)  # each says what went wrong


@contextmanager
def tmpfs(mount: Path, options: str):
    """A small tmpfs at `mount` for the block (root only; the test skips where it cannot mount)."""
    if os.geteuid() != 0:
        pytest.skip("needs root to mount a tmpfs (and root ignores file permissions)")
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(mount)]).returncode != 0:
        pytest.skip("cannot mount a tmpfs here")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)])


def test_a_full_disk_is_one_line_and_resume_after_freeing_space_finishes_the_run(corpus):
    tmp, cfg, clean, _ = corpus
    with tmpfs(tmp / "small_disk", "size=16m") as mount:
        need = sum(p.stat().st_size for p in clean.rglob("*") if p.is_file())
        free = shutil.disk_usage(mount).free
        filler = mount / "filler"
        filler.write_bytes(b"\0" * max(0, free - need // 3))  # room for a third of a run
        out = mount / "run"
        first = run_cli("run", str(cfg), "--out", str(out), check=False)
        assert first.returncode != 0
        lines = [line for line in first.stderr.splitlines() if line.startswith("denseforge: error:")]
        assert len(lines) == 1, first.stderr[-3000:]
        line = lines[0]
        assert "Traceback" not in first.stderr, first.stderr[-3000:]
        print(f"\n{line}")
        filler.unlink()
        run_cli("resume", str(out))
        assert run_result(out) == run_result(clean)
        assert not list(out.rglob(".*.tmp"))


def test_a_read_only_out_is_one_line_naming_the_path(tmp_path, photo_dir):
    with tmpfs(tmp_path / "ro", "ro,size=1m") as mount:
        folder = tmp_path / "images"
        folder.mkdir()
        (folder / "coffee.jpg").write_bytes((photo_dir / "coffee.jpg").read_bytes())
        cfg = tmp_path / "c.yaml"
        cfg.write_text(
            f"input: {{kind: folder, path: {folder}}}\nembed: {{enabled: false}}\ndedup: {{enabled: false}}\n"
        )
        proc = run_cli("run", str(cfg), "--out", str(mount / "run"), check=False)
        assert proc.returncode == 1 and "Traceback" not in proc.stderr
        [line] = [line for line in proc.stderr.splitlines() if line.startswith("denseforge: error:")]
        assert line == f"denseforge: error: cannot write {mount / 'run'}: Read-only file system"
