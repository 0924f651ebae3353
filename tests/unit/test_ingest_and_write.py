"""download_unit (real img2dataset, no Ray) → read_raw_unit → write_unit, on a loopback server."""

import hashlib
import io
import json
import tarfile

import pytest
import webdataset as wds
from PIL import Image

from denseforge.pipeline.rundir import RunDir
from denseforge.stages.image_normalize import ImageNormalizer
from denseforge.stages.ingest import (
    IngestConfig,
    classify_failure,
    download_unit,
    ingest_webdataset_unit,
    read_raw_unit,
)
from denseforge.stages.read_input import InputRow, write_units
from denseforge.stages.sample import Reject, Sample
from denseforge.stages.write import UnitFiles, write_unit

from ..conftest import jpeg_bytes


@pytest.fixture
def one_unit(tmp_path, photo_server):
    base = photo_server.base_url
    rows = [
        InputRow(f"{base}/img/{n}", f"caption {n}", {"row": i})
        for i, n in enumerate(["coffee.jpg", "astronaut.jpg", "missing.jpg", "page.jpg", "truncated.jpg"])
    ]
    rows += [InputRow(f"{base}/status/503", "boom", {}), InputRow("gopher://x/y", "", {})]
    units = tmp_path / "input"
    plan = write_units(iter(rows), units, 100, allow_private=True)
    assert plan.units == 1
    rd = RunDir(tmp_path)
    cfg = IngestConfig(image_size=256, threads=4, timeout_s=5, allow_private_addresses=True)
    stats = download_unit(0, rd.unit_file(0), rd.raw, rd.ingest_marker(0), cfg, 100, allow_files=False)
    return tmp_path, stats, read_raw_unit(0, rd.unit_file(0), rd.raw, rd.ingest_marker(0), rd.screened_file(0))


def test_every_row_comes_back_once_with_a_reason(one_unit):
    _, stats, rows = one_unit
    assert stats["count"] == 6 and stats["successes"] == 2
    assert len(rows) == 7 and len({r["key"] for r in rows}) == 7
    reasons = {
        json.loads(r["reject"])["url"].rsplit("/", 1)[-1]: json.loads(r["reject"])["reason"]
        for r in rows
        if r["reject"]
    }
    assert reasons == {
        "missing.jpg": "http_404",
        "page.jpg": "not_an_image",
        "truncated.jpg": "truncated",
        "503": "http_503",
        "y": "unsupported_scheme",
    }
    samples = [Sample.model_validate_json(r["sample"]) for r in rows if r["sample"]]
    coffee = next(s for s in samples if s.url.endswith("coffee.jpg"))
    assert (coffee.width, coffee.height, coffee.original_width) == (384, 256, 600)
    assert coffee.alt_text == "caption coffee.jpg" and coffee.source == {"row": 0}
    image = next(r["image"] for r in rows if r["key"] == coffee.key)
    assert hashlib.sha256(image).hexdigest() == coffee.sha256


def test_the_input_unit_survives_for_resume(one_unit):
    tmp_path, _, _ = one_unit
    assert (tmp_path / "input" / "0000000.arrow").exists()


def test_write_unit_makes_a_webdataset_shard_and_is_idempotent(one_unit):
    tmp_path, _, rows = one_unit
    rd = RunDir(tmp_path)
    shards = rd.shards
    files = UnitFiles(rd.shard_file(0), rd.manifest_part(0), rd.rejects_part(0), rd.write_marker(0))

    def write(rows):
        return write_unit(
            0,
            files,
            [(Sample.model_validate_json(r["sample"]), r["image"]) for r in rows if r["sample"]],
            [Reject.model_validate_json(r["reject"]) for r in rows if r["reject"]],
            [],
            {},
        )

    counts = write(list(reversed(rows)))
    assert (counts["written"], counts["rejected"]) == (2, 5)
    assert json.loads(rd.write_marker(0).read_text())["reasons"]["ingest/http_404"] == 1
    tar_bytes = (shards / "0000000.tar").read_bytes()
    with tarfile.open(shards / "0000000.tar") as tar:
        names = tar.getnames()
    assert names == sorted(names) and all(n.count(".") == 1 and "/" not in n for n in names)
    assert not any(n.endswith(".txt") for n in names)  # no captioner ran: no caption is invented
    samples = list(wds.WebDataset(str(shards / "0000000.tar"), shardshuffle=False))
    assert len(samples) == 2
    for s in samples:
        meta = json.loads(s["json"])
        assert meta["key"] == s["__key__"] and meta["caption"] is None
        assert Image.open(io.BytesIO(s["jpg"])).size == (meta["width"], meta["height"])
    write(rows)
    assert (shards / "0000000.tar").read_bytes() == tar_bytes  # same rows, same bytes


def test_classify_failure():
    assert classify_failure("failed_to_download", "HTTP Error 404: Not Found") == "http_404"
    assert classify_failure("failed_to_download", "<urlopen error timed out>") == "timeout"
    assert (
        classify_failure("failed_to_download", "<urlopen error [Errno 111] Connection refused>") == "connection_refused"
    )
    assert (
        classify_failure("failed_to_download", "<urlopen error [private_address] x resolves to 10.0.0.1>")
        == "private_address"
    )
    assert classify_failure("failed_to_resize", "[decompression_bomb] 1x1") == "decompression_bomb"
    assert (
        classify_failure("failed_to_download", "Use of image disallowed by X-Robots-Tag directive")
        == "robots_disallowed"
    )
    assert classify_failure("failed_to_download", "something new") == "download_error"


def test_webdataset_input_is_normalised_and_accounted(tmp_path, photo_dir):
    src = tmp_path / "in.tar"
    with wds.TarWriter(str(src)) as sink:
        sink.write(
            {
                "__key__": "a",
                "jpg": (photo_dir / "coffee.jpg").read_bytes(),
                "txt": "a mug",
                "json": json.dumps({"url": "http://example.com/a.jpg", "similarity": 0.3}).encode(),
            }
        )
        sink.write({"__key__": "b", "png": b"not really a png", "txt": "broken"})
        sink.write({"__key__": "c", "txt": "no image at all"})
        sink.write({"__key__": "d", "jpeg": jpeg_bytes(Image.new("RGB", (40, 30)))})
    rd = RunDir(tmp_path)
    stats = ingest_webdataset_unit(3, src, rd.raw, rd.ingest_marker(3), ImageNormalizer(image_size=64))
    assert (stats["count"], stats["successes"]) == (4, 2)
    rows = read_raw_unit(3, None, rd.raw, rd.ingest_marker(3), None)
    assert [r["key"] for r in rows] == [f"00000030000{i}" for i in range(4)]
    first = Sample.model_validate_json(rows[0]["sample"])
    assert first.alt_text == "a mug" and first.url == "http://example.com/a.jpg"
    assert first.source == {"source_key": "a", "similarity": 0.3}
    assert json.loads(rows[1]["reject"])["reason"] == "not_an_image"
    assert json.loads(rows[2]["reject"])["reason"] == "no_image"


def test_a_failed_unit_still_accounts_for_its_rows(tmp_path):
    from denseforge.stages.read_input import write_units
    from denseforge.storage import write_json_atomic

    rd = RunDir(tmp_path)
    write_units(iter([InputRow(f"http://example.com/{i}.jpg", None, {}) for i in range(3)]), rd.units, 10, False)
    rd.raw.mkdir()
    write_json_atomic(rd.ingest_marker(0), {"unit": 0, "failed": "worker died", "count": 0})
    rows = read_raw_unit(0, rd.unit_file(0), rd.raw, rd.ingest_marker(0), rd.screened_file(0))
    assert [json.loads(r["reject"])["reason"] for r in rows] == ["ingest_failed"] * 3
    write_json_atomic(rd.ingest_marker(1), {"unit": 1, "failed": "not a tar", "count": 0, "source_path": "/x.tar"})
    [row] = read_raw_unit(1, None, rd.raw, rd.ingest_marker(1), None)
    assert json.loads(row["reject"])["reason"] == "unreadable_shard" and json.loads(row["reject"])["url"] == "/x.tar"


def test_ingest_cuts_a_dripping_download_at_its_deadline_and_keeps_the_ssrf_guard(tmp_path, photo_server):
    import time

    base = photo_server.base_url
    rows = [
        InputRow(f"{base}/drip?bytes=12&every=0.3&times=100", "slow", {}),
        InputRow(f"{base}/img/coffee.jpg", "", {}),
    ]
    rd = RunDir(tmp_path)
    write_units(iter(rows), rd.units, 100, allow_private=True)
    cfg = IngestConfig(threads=2, timeout_s=2, download_deadline_s=1.5, allow_private_addresses=True)
    start = time.monotonic()
    download_unit(0, rd.unit_file(0), rd.raw, rd.ingest_marker(0), cfg, 100, allow_files=False)
    assert time.monotonic() - start < 10  # bytes x timeout would be 200 s
    got = read_raw_unit(0, rd.unit_file(0), rd.raw, rd.ingest_marker(0), rd.screened_file(0))
    reasons = [json.loads(r["reject"])["reason"] for r in got if r["reject"]]
    assert reasons == ["timeout"] and sum(1 for r in got if r["sample"]) == 1
    # the same unit without allow_private_addresses: ingest installs the guarded opener, so the
    # loopback targets (which screening let through here) are refused at connect time
    guarded = RunDir(tmp_path / "guarded")
    write_units(iter(rows), guarded.units, 100, allow_private=True)
    download_unit(
        0,
        guarded.unit_file(0),
        guarded.raw,
        guarded.ingest_marker(0),
        IngestConfig(threads=2, timeout_s=2),
        100,
        allow_files=False,
    )
    got = read_raw_unit(0, guarded.unit_file(0), guarded.raw, guarded.ingest_marker(0), guarded.screened_file(0))
    assert [json.loads(r["reject"])["reason"] for r in got] == ["private_address", "private_address"]
