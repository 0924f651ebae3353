"""The whole DAG for real: CLI → embedded Ray → img2dataset over loopback HTTP → webdataset shards."""

from __future__ import annotations

import csv
import io
import json
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import webdataset as wds
from PIL import Image

from ..conftest import config_file, run_cli

pytestmark = pytest.mark.slow

CONFIG = """
run: {name: it}
ray: {num_cpus: 2}
input: {kind: table, path: %(path)s, url_col: URL, caption_col: TEXT}
ingest: {processes: 2, threads: 4, timeout_s: 5, image_size: 256, allow_private_addresses: true}
# CPU feeders, as on GPU nodes
embed: {model: df-tiny-clip, weights: random, batch_size: 8, cpu_workers: 1, num_cpus: 0.5}
dedup: {epsilon: null, phash_max_distance: 4, clusters: 2, keep: first_key}
output: {samples_per_shard: 4}
"""


def _write_config(tmp_path: Path, path: Path, extra: str = "") -> Path:
    cfg = tmp_path / "config.yaml"
    cfg.write_text(CONFIG % {"path": path} + extra)
    return cfg


@pytest.fixture(scope="module")
def table_run(tmp_path_factory, photo_server):
    tmp = tmp_path_factory.mktemp("table_run")
    base = photo_server.base_url
    rows = [(f"{base}/img/{n}.jpg", f"a photo of {n}", n) for n in ("astronaut", "coffee", "chelsea", "rocket")]
    rows += [
        (f"{base}/img/gone.jpg", "dead link", "dead"),
        (f"{base}/status/500", "server error", "e500"),
        (f"{base}/img/page.jpg", "html", "html"),
        (f"{base}/img/truncated.jpg", "truncated", "trunc"),
        (f"{base}/redirect?to={base}/img/coffee.jpg", "redirected coffee", "redirect"),
        ("ftp://example.com/x.jpg", "ftp", "ftp"),
        ("", "empty", "empty"),
    ]
    table = tmp / "laion.csv"
    with open(table, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["URL", "TEXT", "source_id"])
        writer.writerows(rows)
        fh.write("http://example.com/malformed.jpg,too,many,fields\n")
    out = tmp / "run"
    proc = run_cli("run", str(_write_config(tmp, table)), "--out", str(out))
    return out, proc


def test_funnel_balances_and_every_bad_row_has_its_reason(table_run):
    out, proc = table_run
    stats = json.loads((out / "stats.json").read_text())
    f = stats["funnel"]
    assert (f["input_rows"], f["written"], f["rejected"], f["removed"]) == (12, 4, 7, 1) and f["balanced"]
    # the redirect serves coffee.jpg again: an exact duplicate of the earlier row, which it names
    assert f["removed_by_reason"] == {"dedup/exact_duplicate": 1}
    decisions = {r["key"]: r for r in pq.read_table(out / "dedup" / "decisions.parquet").to_pylist()}
    removed = [r for r in decisions.values() if r["reason"]]
    assert len(decisions) == 5 and len(removed) == 1 and removed[0]["dup_of"] == "000000000001"
    assert [r["kept"] for r in decisions.values()].count(False) == 1 and not removed[0]["kept"]
    assert set(stats["dedup"]["epsilon_sweep"]) == {"0.01", "0.02", "0.05", "0.1", "0.2", "0.4"}
    rejects = pq.read_table(out / "rejects.parquet").to_pylist()
    by_url = {r["url"]: (r["stage"], r["reason"]) for r in rejects}
    assert by_url[next(u for u in by_url if u and u.endswith("gone.jpg"))] == ("ingest", "http_404")
    assert by_url[next(u for u in by_url if u and u.endswith("status/500"))] == ("ingest", "http_500")
    assert by_url[next(u for u in by_url if u and u.endswith("page.jpg"))] == ("ingest", "not_an_image")
    assert by_url[next(u for u in by_url if u and u.endswith("truncated.jpg"))] == ("ingest", "truncated")
    assert by_url["ftp://example.com/x.jpg"] == ("input", "unsupported_scheme")
    reasons = sorted(r["reason"] for r in rejects if r["stage"] == "input")
    assert reasons == ["malformed_row", "missing_url", "unsupported_scheme"]
    assert all(r["detail"] for r in rejects)
    assert "done: 12 input rows -> 4 written, 7 rejected, 1 removed" in proc.stderr


def test_shards_hold_the_contract(table_run):
    out, _ = table_run
    manifest = pq.read_table(out / "manifest.parquet").to_pylist()
    shards = sorted(out.glob("shards/*.tar"))
    samples = list(wds.WebDataset([str(s) for s in shards], shardshuffle=False))
    assert sorted(s["__key__"] for s in samples) == sorted(m["key"] for m in manifest)
    for s in samples:
        meta = json.loads(s["json"])
        assert set(meta) >= {"key", "url", "alt_text", "width", "height", "sha256", "experts", "caption", "provenance"}
        img = Image.open(io.BytesIO(s["jpg"]))
        assert img.mode == "RGB" and img.size == (meta["width"], meta["height"]) and min(img.size) == 256
        assert meta["source"]["source_id"] in {"astronaut", "coffee", "chelsea", "rocket"}
        assert meta["alt_text"].startswith("a photo of") and meta["cluster"] in (0, 1)
    report = (out / "report.html").read_text()
    assert "<h3>rejected: ingest/http_404</h3>" in report and "gone.jpg" in report  # an example, with its URL
    assert report.count('class="thumb" src="data:image/jpeg;base64,') == len(manifest)


def test_status_and_refusing_to_overwrite(table_run, tmp_path):
    out, _ = table_run
    status = run_cli("status", str(out)).stdout
    assert "complete" in status and "write: 3/3 units" in status
    again = run_cli("run", str(out / "config.yaml"), "--out", str(out), check=False)
    assert again.returncode == 2 and "denseforge resume" in again.stderr


def test_bad_config_fails_before_anything_runs(tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("input: {path: x.csv}\ningest: {threads: -1, colour: red}\ndedup: {epsilon: 3}\n")
    proc = run_cli("run", str(cfg), "--out", str(tmp_path / "out"), check=False)
    assert proc.returncode == 2
    assert "ingest.threads" in proc.stderr and "ingest.colour: unknown key" in proc.stderr
    assert "dedup.epsilon" in proc.stderr
    assert not (tmp_path / "out").exists()
    # problems only the plugin registry can see also fail before a run directory exists
    cfg.write_text("input: {path: x.csv}\nperceive: {enabled: true, experts: [{plugin: no-such-expert}]}\n")
    proc = run_cli("run", str(cfg), "--out", str(tmp_path / "out"), check=False)
    assert proc.returncode == 2 and "no expert plugin named 'no-such-expert'" in proc.stderr
    assert not (tmp_path / "out").exists()
    from ..unit.test_config import _alias_levels  # a YAML alias bomb: one line, at once

    cfg.write_text(_alias_levels(9, "run: {name").replace("run: {name: *l8\n", "run: {name: *l8}\n"))
    proc = run_cli("run", str(cfg), "--out", str(tmp_path / "out"), check=False, timeout=60)
    assert proc.returncode == 2 and "aliases expand to more than 100000 values" in proc.stderr, proc.stderr
    assert not (tmp_path / "out").exists()


def test_embed_pools_that_cannot_fit_fail_before_any_download(tmp_path, photo_dir):
    """Regression: a 1-CPU feeder pool and a 1-CPU model pool on 2 CPUs left no CPU for reading the
    units, and the embed pass waited forever."""
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        f"ray: {{num_cpus: 2}}\ninput: {{kind: folder, path: {photo_dir}}}\n"
        "embed: {model: df-tiny-clip, weights: random, cpu_workers: 1, num_cpus: 1}\n"
    )
    # --dry-run says so too, creating nothing (it used to pass, and the real run then failed)
    proc = run_cli("run", str(cfg), "--out", str(tmp_path / "out"), "--dry-run", check=False)
    assert proc.returncode == 2, proc.stderr
    assert "ask for 2.25 CPUs at once (embed-pixels 1x1, embed 1x1" in proc.stderr
    assert not (tmp_path / "out").exists()
    proc = run_cli("run", str(cfg), "--out", str(tmp_path / "out"), check=False, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert "ask for 2.25 CPUs at once (embed-pixels 1x1, embed 1x1" in proc.stderr and "lower them" in proc.stderr
    assert not list((tmp_path / "out").rglob("*.tar"))  # nothing was downloaded


def test_dry_run_checks_that_the_input_is_there(tmp_path, photo_dir):
    cfg = tmp_path / "c.yaml"
    for path, why in ((tmp_path / "nowhere", "does not exist"), (tmp_path, "holds no files ending in")):
        cfg.write_text(f"input: {{kind: folder, path: {path}}}\nembed: {{enabled: false}}\ndedup: {{enabled: false}}\n")
        proc = run_cli("run", str(cfg), "--out", str(tmp_path / "out"), "--dry-run", check=False)
        assert proc.returncode == 2 and why in proc.stderr, proc.stderr
        assert not (tmp_path / "out").exists()
    cfg.write_text(
        f"input: {{kind: folder, path: {photo_dir}}}\nembed: {{enabled: false}}\ndedup: {{enabled: false}}\n"
    )
    assert run_cli("run", str(cfg), "--out", str(tmp_path / "out"), "--dry-run").returncode == 0


def test_folder_input_then_its_raw_shards_as_webdataset_input(tmp_path, photo_dir):
    folder = tmp_path / "images"
    folder.mkdir()
    for name in ("astronaut", "coffee", "page", "truncated"):
        (folder / f"{name}.jpg").write_bytes((photo_dir / f"{name}.jpg").read_bytes())
    (folder / "coffee.txt").write_text("a cup of coffee")
    cfg = tmp_path / "folder.yaml"
    cfg.write_text(
        f"input: {{kind: folder, path: {folder}}}\nray: {{num_cpus: 2}}\noutput: {{samples_per_shard: 10}}\n"
        "embed: {enabled: false}\ndedup: {enabled: false}\n"
    )
    out = tmp_path / "folder_run"
    run_cli("run", str(cfg), "--out", str(out))
    f = json.loads((out / "stats.json").read_text())["funnel"]
    assert (f["input_rows"], f["written"], f["rejected"]) == (4, 2, 2)
    samples = {
        json.loads(s["json"])["source"]["path"].rsplit("/", 1)[1]: json.loads(s["json"])
        for s in wds.WebDataset(str(out / "shards" / "0000000.tar"), shardshuffle=False)
    }
    assert samples["coffee.jpg"]["alt_text"] == "a cup of coffee"

    # The raw shards img2dataset wrote are valid webdataset input for another run; a corrupt
    # shard beside them becomes one reject row instead of a crash.
    (out / "raw" / "9999999.tar").write_bytes(b"this is not a tar archive" * 100)
    cfg2 = tmp_path / "wds.yaml"
    cfg2.write_text(
        f"input: {{kind: webdataset, path: '{out}/raw/*.tar'}}\nray: {{num_cpus: 2}}\n"
        "embed: {enabled: false}\ndedup: {enabled: false}\n"
    )
    out2 = tmp_path / "wds_run"
    proc = run_cli("run", str(cfg2), "--out", str(out2), check=False)
    assert proc.returncode == 3 and "1 unit(s) failed to download" in proc.stderr.splitlines()[-1]
    f2 = json.loads((out2 / "stats.json").read_text())["funnel"]
    assert (f2["input_rows"], f2["written"], f2["rejected"]) == (3, 2, 1) and f2["balanced"]
    assert f2["rejected_by_reason"] == {"ingest/unreadable_shard": 1}
    assert "complete_with_failed_units" in run_cli("status", str(out2)).stdout
    # the failure was local and is fixed: resume retries the failed unit (a marker no longer
    # means "done" for it) and every row of it is written
    (out / "raw" / "9999999.tar").write_bytes((out / "raw" / "0000000.tar").read_bytes())
    run_cli("resume", str(out2))
    f3 = json.loads((out2 / "stats.json").read_text())["funnel"]
    assert (f3["input_rows"], f3["written"], f3["rejected"]) == (4, 4, 0) and f3["balanced"]
    assert ": complete" in run_cli("status", str(out2)).stdout
    out3 = tmp_path / "wds_allowed"
    (out / "raw" / "9999999.tar").write_bytes(b"not a tar")
    run_cli("run", str(cfg2), "--out", str(out3), "--allow-failed-units")  # exit 0 when asked


def test_a_no_op_resume_keeps_the_timings_and_records_itself(table_run, tmp_path):
    import shutil

    src, _ = table_run
    out = tmp_path / "copy"
    shutil.copytree(src, out)
    before = json.loads((src / "stats.json").read_text())["timings"]
    run_cli("resume", str(out))
    after = json.loads((out / "stats.json").read_text())["timings"]
    for phase in ("plan_s", "ingest_s", "embed_s", "dedup_s", "process_s"):
        assert after[phase] == before[phase] > 0, phase  # the time of the invocation that did the work
    history = json.loads((out / "run.json").read_text())["history"]
    assert [h["command"] for h in history] == ["run", "resume"] and [h["outcome"] for h in history] == ["complete"] * 2
    assert history[1]["redid"] == {"ingest_units": 0, "embed_units": 0, "dedup": False, "write_units": 0}
    assert history[0]["redid"]["write_units"] == 3


def test_resume_re_embeds_only_missing_units(table_run, tmp_path):
    import shutil

    src, _ = table_run
    out = tmp_path / "copy"
    shutil.copytree(src, out)
    emb = sorted(p for p in (out / "embeddings").glob("*.parquet") if not p.name.endswith(".rejects.parquet"))
    assert len(emb) == 3
    before = {p.name: p.stat().st_mtime_ns for p in emb}
    (out / "embeddings" / emb[1].name.replace(".parquet", ".done.json")).unlink()  # its marker: not embedded
    shutil.rmtree(out / "dedup")
    shutil.rmtree(out / "shards" / "_done")
    (out / "stats.json").unlink()
    run_cli("resume", str(out))
    after = {p.name: p.stat().st_mtime_ns for p in emb}
    assert after[emb[0].name] == before[emb[0].name] and after[emb[2].name] == before[emb[2].name]
    assert after[emb[1].name] != before[emb[1].name]
    same = [pq.read_table(d / "manifest.parquet").to_pylist() for d in (src, out)]
    assert same[0] == same[1]
    assert pq.read_table(src / "dedup" / "decisions.parquet").equals(pq.read_table(out / "dedup" / "decisions.parquet"))


def test_joining_an_existing_cluster_with_address(tmp_path, photo_server):
    import os
    import subprocess

    ray_bin = Path(sys.executable).parent / "ray"
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    port = "6391"
    start = subprocess.run(
        [
            str(ray_bin),
            "start",
            "--head",
            f"--port={port}",
            "--num-cpus=2",
            "--include-dashboard=false",
            "--disable-usage-stats",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert start.returncode == 0, start.stderr
    try:
        table = tmp_path / "t.jsonl"
        table.write_text(json.dumps({"url": f"{photo_server.base_url}/img/coffee.jpg", "caption": "c"}) + "\n")
        cfg = tmp_path / "c.yaml"
        cfg.write_text(
            f"input: {{path: {table}}}\ningest: {{allow_private_addresses: true}}\n"
            "embed: {enabled: false}\ndedup: {enabled: false}\n"
        )
        out = tmp_path / "run"
        proc = run_cli("run", str(cfg), "--out", str(out), "--address", f"127.0.0.1:{port}")
        assert json.loads((out / "stats.json").read_text())["funnel"]["written"] == 1, proc.stderr
        # without --address a run starts its own embedded cluster though one runs here (it used to
        # join this one and fail: "When connecting to an existing cluster, num_cpus ... must not be provided")
        alone = tmp_path / "alone.yaml"
        alone.write_text(cfg.read_text() + "ray: {num_cpus: 2}\n")
        proc = run_cli("run", str(alone), "--out", str(tmp_path / "alone"))
        assert json.loads((tmp_path / "alone" / "stats.json").read_text())["funnel"]["written"] == 1, proc.stderr
    finally:
        subprocess.run([str(ray_bin), "stop", "--force"], capture_output=True, env=env, timeout=120)


def test_a_run_that_writes_nothing_fails_in_one_line(tmp_path, photo_dir):
    """Regression: every row refused at connect was a 'complete' run with 0 written and exit 0."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = tmp_path / "dead.parquet"
    pq.write_table(pa.table({"url": [f"http://127.0.0.1:1/{i}.jpg" for i in range(30)], "caption": ["x"] * 30}), table)
    off = {"enabled": False}
    ingest = {"allow_private_addresses": True, "timeout_s": 2}
    cfg = config_file(tmp_path, ray={"num_cpus": 2}, input={"path": str(table)}, ingest=ingest, embed=off, dedup=off)
    out = tmp_path / "run"
    proc = run_cli("run", str(cfg), "--out", str(out), check=False)
    assert proc.returncode == 1, proc.stderr
    [line] = [x for x in proc.stderr.splitlines() if x.startswith("denseforge: error:")]
    assert "ingest: 30 of 30 rows (100%) gave no image (most often: connection_refused 30)" in line, line
    assert json.loads((out / "run.json").read_text())["state"] == "failed"
    assert not (out / "shards" / "_done").exists() or not list((out / "shards" / "_done").iterdir())
    # rows that all downloaded, then all rejected: a run that wrote nothing is not a success either
    folder = {"kind": "folder", "path": str(photo_dir)}
    fuse, qa = {"enabled": True, "backend": "template"}, {"enabled": True, "min_words": 390}
    cfg = config_file(tmp_path, ray={"num_cpus": 2}, input=folder, embed=off, dedup=off, fuse=fuse, qa=qa)
    proc = run_cli("run", str(cfg), "--out", str(tmp_path / "run2"), check=False)
    assert proc.returncode == 1, proc.stderr
    assert "the run wrote nothing: all " in proc.stderr and "(most often: qa/too_short" in proc.stderr, proc.stderr
    assert "WARNING: this run did not complete" in (tmp_path / "run2" / "README.md").read_text()


def test_a_resume_with_changed_settings_is_refused_or_redoes_what_they_affect(tmp_path, photo_dir):
    """Regression: qa.min_words edited in config.yaml, one unit's outputs deleted, resume: the redone
    unit was judged by the new rule and the others by the old, while the run claimed the new one."""
    import tarfile

    import yaml

    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        f"ray: {{num_cpus: 2}}\ninput: {{kind: folder, path: {photo_dir}}}\nembed: {{enabled: false}}\n"
        "dedup: {enabled: false}\nperceive: {enabled: true, experts: [{plugin: yolox}]}\n"
        "fuse: {enabled: true, backend: template}\nqa: {enabled: true, min_words: 1}\noutput: {samples_per_shard: 2}\n"
    )
    out = tmp_path / "run"
    run_cli("run", str(cfg), "--out", str(out))
    before = pq.read_table(out / "manifest.parquet").num_rows
    config = yaml.safe_load((out / "config.yaml").read_text())
    config["qa"]["min_words"] = 3  # "An image." (a photo with nothing detected) is now too short
    config["ray"]["num_cpus"] = 2.0  # how the run goes, not what it writes: free to change
    (out / "config.yaml").write_text(yaml.safe_dump(config))
    next((out / "shards" / "_done").glob("*.json")).unlink()
    proc = run_cli("resume", str(out), check=False)
    assert proc.returncode == 2, proc.stderr
    [line] = [x for x in proc.stderr.splitlines() if x.startswith("denseforge: error:")]
    assert "changed since the run started (qa.min_words: 1 -> 3)" in line and "--redo-changed" in line, line
    assert json.loads((out / "run.json").read_text())["state"] == "complete"  # nothing was touched
    run_cli("resume", str(out), "--redo-changed")
    state = json.loads((out / "run.json").read_text())
    assert state["settings"]["qa.min_words"] == 3 and state["history"][-1]["redid"]["write_units"] == 3
    captions = []
    for shard in sorted((out / "shards").glob("*.tar")):
        with tarfile.open(shard) as tar:
            captions += [tar.extractfile(m).read().decode() for m in tar.getmembers() if m.name.endswith(".txt")]
    short = [r for r in pq.read_table(out / "rejects.parquet").to_pylist() if r["reason"] == "too_short"]
    assert captions and all(len(c.split()) >= 3 for c in captions)  # every unit judged by the new rule
    assert short and len(captions) + len(short) == before  # what the old rule wrote: now written or too short
    config["input"]["path"] = "elsewhere"  # what the run reads: never redone in place
    (out / "config.yaml").write_text(yaml.safe_dump(config))
    proc = run_cli("resume", str(out), "--redo-changed", check=False)
    assert proc.returncode == 2 and "changed what the run reads (input.path:" in proc.stderr, proc.stderr
