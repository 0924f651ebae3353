"""Runs that build on earlier ones, on the real DAG: derived with `--from` (what is reused, what is
called again: the captioner's calls counted by a stub server, what is refused) and grown with
`--against` (copies of what earlier runs wrote removed from the new input only)."""

from __future__ import annotations

import hashlib
import json
import tarfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from denseforge.pipeline.chat_stub import StubChatServer

from ..conftest import run_cli

pytestmark = pytest.mark.slow

PHOTOS = ("coffee", "chelsea", "astronaut", "rocket")


def _files(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in root.rglob("*") if p.is_file()
    }


def _written(run: Path) -> dict[str, dict]:
    """key -> the sample record, from every shard."""
    found = {}
    for shard in sorted((run / "shards").glob("*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                if member.name.endswith(".json"):
                    meta = json.loads(tar.extractfile(member).read())
                    found[meta["key"]] = meta
    assert len(found) == pq.read_metadata(run / "manifest.parquet").num_rows
    return found


def test_a_derived_run_computes_only_what_its_changed_settings_affect(tmp_path, photo_dir, colors_plugin):
    folder = tmp_path / "images"
    folder.mkdir()
    for name in PHOTOS:
        (folder / f"{name}.jpg").write_bytes((photo_dir / f"{name}.jpg").read_bytes())
    prompt = tmp_path / "prompt.txt"
    prompt.write_text("Describe the image in at most $word_limit words.\n$perception\n")
    stub = StubChatServer()
    with stub as url:
        base = f"""
ray: {{num_cpus: 2}}
input: {{kind: folder, path: {folder}}}
embed: {{model: df-tiny-clip, weights: random, batch_size: 8}}
dedup: {{epsilon: null, clusters: 1}}
perceive:
  enabled: true
  experts: [{{plugin: yolox, resources: {{num_cpus: 0.5}}}}]
fuse:
  enabled: true
  backend: openai
  prompt_file: {prompt}
  openai: {{base_url: "{url}", model: tiny-vlm, max_retries: 1, timeout_s: 10}}
qa: {{enabled: true, min_words: 3, min_ocr_fidelity: 0.0, max_hallucination: 1.0}}
"""
        cfg = tmp_path / "c.yaml"
        cfg.write_text(base)
        original = tmp_path / "original"
        run_cli("run", str(cfg), "--out", str(original))
        assert len(stub.requests_seen) == 4
        before = _files(original)
        stats = json.loads((original / "stats.json").read_text())
        assert stats["cache"]["stages"] == {
            "yolox": {"hits": 0, "misses": 4, "corrupt": 0},
            "fuse": {"hits": 0, "misses": 4, "corrupt": 0},
            "ground": {"hits": 0, "misses": 4, "corrupt": 0},
        }

        # only qa changed: no expert and no captioner call; the same captions
        qa = tmp_path / "qa"
        proc = run_cli("run", str(cfg), "--from", str(original), "--out", str(qa), "--set", "qa.min_words=5")
        assert len(stub.requests_seen) == 4
        stats = json.loads((qa / "stats.json").read_text())
        assert stats["cache"]["stages"] == {
            "yolox": {"hits": 4, "misses": 0, "corrupt": 0},
            "fuse": {"hits": 4, "misses": 0, "corrupt": 0},
            "ground": {"hits": 4, "misses": 0, "corrupt": 0},
        }
        assert stats["cache"]["derived_from"]["reused"] == ["input", "ingest", "embed", "dedup"]
        assert "cache: 12 of 12 model outputs reused" in proc.stderr
        assert f"derived from {original}: reused its input, ingest, embed, dedup" in proc.stderr
        assert "cache: 1 of 1 unit(s) replayed whole from the cache" in proc.stderr  # no worker pool started
        assert stats["timings"].keys() >= {"process_s"} and "ingest_s" not in stats["timings"]  # nothing downloaded
        # "Two dogs and a car." has 5 words: every sample still passes, with the original's caption
        a, b = _written(original), _written(qa)
        assert a.keys() == b.keys() and len(a) == 4
        for key, meta in b.items():
            assert meta["caption"] == a[key]["caption"] == "Two dogs and a car."
            assert meta["provenance"]["cache"] == {
                "yolox": str(original),
                "fuse": str(original),
                "ground": str(original),
            }
            assert "cache" not in a[key]["provenance"]
        status = run_cli("status", str(qa)).stdout
        assert "cache_hits 4" in status

        # one expert added: it runs on every image, the other expert is not called; the captioner
        # is asked again only for the images whose evidence changed
        added = tmp_path / "added"
        cfg_added = tmp_path / "added.yaml"
        cfg_added.write_text(
            base.replace(
                "experts: [{plugin: yolox, resources: {num_cpus: 0.5}}]",
                "experts: [{plugin: yolox, resources: {num_cpus: 0.5}}, {plugin: colors, resources: {num_cpus: 0.25}}]",
            )
        )
        run_cli("run", str(cfg_added), "--from", str(original), "--out", str(added))
        stages = json.loads((added / "stats.json").read_text())["cache"]["stages"]
        assert stages["yolox"] == {"hits": 4, "misses": 0, "corrupt": 0}
        assert stages["colors"] == {"hits": 0, "misses": 4, "corrupt": 0}
        assert stages["fuse"]["misses"] == 4 and len(stub.requests_seen) == 8  # colors are seen in every photo
        assert all(meta["experts"].get("colors") for meta in _written(added).values())

        # the prompt changed: the captioner is called for every image, no expert is
        prompt.write_text("Describe this picture in at most $word_limit words.\n$perception\n")
        reprompt = tmp_path / "reprompt"
        run_cli("run", str(cfg), "--from", str(original), "--out", str(reprompt))
        stages = json.loads((reprompt / "stats.json").read_text())["cache"]["stages"]
        assert stages == {
            "yolox": {"hits": 4, "misses": 0, "corrupt": 0},
            "fuse": {"hits": 0, "misses": 4, "corrupt": 0},
            "ground": {"hits": 4, "misses": 0, "corrupt": 0},  # the stub answers with the same caption
        }
        assert len(stub.requests_seen) == 12
        assert "Describe this picture" in json.dumps(stub.requests_seen[-1])

    # the earlier run was only read
    assert _files(original) == before

    # refused before any work, exit 2, one line: another embedding model, a changed download, an unfinished run
    for flags, expected in (
        (["--set", "embed.model=df-tiny-clip-512"], "model (embed.model: 'df-tiny-clip' -> 'df-tiny-clip-512')"),
        (["--set", "ingest.image_size=256"], "changes what is read or downloaded (ingest.image_size: "),
    ):
        proc = run_cli("run", str(cfg), "--from", str(original), "--out", str(tmp_path / "no"), *flags, check=False)
        assert proc.returncode == 2 and expected in proc.stderr, proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1 and not (tmp_path / "no").exists()
    state = json.loads((original / "run.json").read_text())
    (original / "run.json").write_text(json.dumps({**state, "state": "failed"}))
    proc = run_cli("run", str(cfg), "--from", str(original), "--out", str(tmp_path / "no"), check=False)
    assert proc.returncode == 2 and "that run is failed; finish it first" in proc.stderr
    (original / "run.json").write_text(json.dumps({**state, "denseforge": "0.0.1"}))
    proc = run_cli("run", str(cfg), "--from", str(original), "--out", str(tmp_path / "no"), check=False)
    assert proc.returncode == 2 and "made by denseforge 0.0.1" in proc.stderr
    proc = run_cli("run", str(cfg), "--from", str(original), check=False)
    assert proc.returncode == 2 and "--from needs --out" in proc.stderr

    # du and prune
    du = json.loads(run_cli("cache", "du", str(added), "--json").stdout)
    assert {row["stage"]: row["entries"] for row in du["stages"]} == {"colors": 4, "fuse": 4, "ground": 4}  # its own
    pruned = run_cli("cache", "prune", str(added), "--stage", "colors").stdout
    assert pruned.startswith("deleted 4 entries")
    assert "fuse" in run_cli("cache", "du", str(added)).stdout


def test_a_run_against_earlier_runs_removes_only_the_copies_of_what_they_wrote(tmp_path, photo_dir):
    from PIL import Image

    from ..conftest import jpeg_bytes

    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir()
    second.mkdir()
    for name in ("coffee", "chelsea"):
        (first / f"{name}.jpg").write_bytes((photo_dir / f"{name}.jpg").read_bytes())
    (second / "coffee_again.jpg").write_bytes((photo_dir / "coffee.jpg").read_bytes())  # the same bytes
    chelsea = Image.open(photo_dir / "chelsea.jpg")
    (second / "chelsea_smaller.jpg").write_bytes(
        jpeg_bytes(chelsea.resize((chelsea.width // 2, chelsea.height // 2)), quality=70)
    )
    for name in ("astronaut", "rocket"):
        (second / f"{name}.jpg").write_bytes((photo_dir / f"{name}.jpg").read_bytes())
    config = """
ray: {num_cpus: 2}
input: {kind: folder, path: %s}
embed: {model: df-tiny-clip, weights: random, batch_size: 8}
dedup: {epsilon: null, clusters: 1, phash_max_distance: 6, keep: largest_image}
"""
    earlier = tmp_path / "earlier"
    run_cli("run", str(_config(tmp_path, "a.yaml", config % first)), "--out", str(earlier))
    before = _files(earlier)
    grown = tmp_path / "grown"
    proc = run_cli(
        "run", str(_config(tmp_path, "b.yaml", config % second)), "--out", str(grown), "--against", str(earlier)
    )
    assert "dedup: against 2 kept images of 1 earlier run(s)" in proc.stderr
    stats = json.loads((grown / "stats.json").read_text())
    f = stats["funnel"]
    assert (f["input_rows"], f["written"], f["removed"]) == (4, 2, 2)
    assert f["removed_by_reason"] == {"dedup/exact_duplicate": 1, "dedup/near_duplicate": 1}
    assert stats["dedup"]["against"] == {"runs": [str(earlier)], "kept_images": 2, "removed_as_their_copies": 2}
    removed = {
        r["key"]: r["dup_of"] for r in pq.read_table(grown / "dedup" / "decisions.parquet").to_pylist() if r["reason"]
    }
    assert sorted(removed.values()) == sorted(f"{earlier}#{key}" for key in _written(earlier))
    written = _written(grown)
    assert sorted(Path(meta["source"]["path"]).name for meta in written.values()) == ["astronaut.jpg", "rocket.jpg"]
    assert stats["lineage"] == {"derived_from": None, "against": [str(earlier)]}
    lineage = pq.read_schema(grown / "manifest.parquet").metadata[b"denseforge.lineage"]
    assert json.loads(lineage)["against"] == [str(earlier)]
    assert _files(earlier) == before  # the earlier run was only read

    proc = run_cli(
        "run",
        str(_config(tmp_path, "b.yaml", config % second)),
        "--out",
        str(tmp_path / "no"),
        "--against",
        str(earlier),
        "--set",
        "embed.model=df-tiny-clip-512",
        check=False,
    )
    assert proc.returncode == 2 and "--against" in proc.stderr and "embedding model" in proc.stderr
    assert not (tmp_path / "no").exists()


def _config(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path
