"""ingest: download a work unit with img2dataset and read back what it produced.

`download_unit` runs img2dataset's own Downloader (threads, retries, X-Robots-Tag, per-shard
stats) with our ImageNormalizer in place of its resizer and our guarded urllib opener. A unit
ends as `raw/NNNNNNN.tar` + `.parquet` + `_stats.json` and a completion marker.
`ingest_webdataset_unit` brings an existing webdataset shard to the same raw form.
`read_raw_unit` turns a unit's raw output back into samples and reject rows: every input row of
the unit comes back exactly once.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import tarfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import pyarrow as pa
from pydantic import Field
from upath import UPath

from denseforge import __version__
from denseforge.stages.image_normalize import ImageNormalizer, ImageRejected
from denseforge.stages.sample import Reject, Sample, make_key
from denseforge.stages.url_screen import guarded_opener
from denseforge.storage import (
    open_binary,
    read_arrow,
    read_bytes,
    read_json,
    read_parquet,
    staged,
    store_retries,
    write_bytes,
    write_json_atomic,
)

RAW_COLUMNS = ["url", "caption", "df_key", "df_source"]


class IngestConfig(ImageNormalizer):
    """Download (img2dataset) and image normalisation settings."""

    processes: int = Field(2, ge=1, description="input units downloaded at once (Ray tasks)")
    threads: int = Field(32, ge=1, le=1024, description="download threads per unit")
    timeout_s: float = Field(10.0, gt=0, description="per socket operation (connect, each read)")
    download_deadline_s: float | None = Field(
        None, gt=0, description="wall-clock limit of one download; null: 3 x timeout_s"
    )
    retries: int = Field(0, ge=0, le=10)
    unit_retries: int = Field(2, ge=0, le=10, description="re-runs of a unit whose task died")
    max_download_bytes: int = Field(32 * 2**20, ge=1024)
    allow_private_addresses: bool = Field(
        False, description="allow loopback/private/link-local targets (local mirrors, the demo)"
    )
    user_agent_token: str | None = "denseforge"
    max_error_rate: float = Field(
        0.8,
        ge=0,
        le=1,
        description="share of the downloaded rows that may give no image (dead links, HTTP errors, files that "
        "are not images) before the run fails; web-scale URL lists lose many links as they age",
    )


def unit_name(unit: int) -> str:
    return f"{unit:07d}"


def download_unit(
    unit: int,
    unit_file: UPath,
    raw_dir: UPath,
    marker: UPath,
    cfg: IngestConfig,
    samples_per_unit: int,
    allow_files: bool,
    scratch: str | None = None,
) -> dict[str, Any]:
    """Download one unit with img2dataset; idempotent (rewrites the unit's raw files). img2dataset
    writes local files: on an object store they are made in this node's scratch and uploaded."""
    from img2dataset.downloader import Downloader
    from img2dataset.writer import WebDatasetSampleWriter

    deadline = cfg.download_deadline_s or 3 * cfg.timeout_s
    urllib.request.install_opener(
        guarded_opener(cfg.allow_private_addresses, cfg.max_download_bytes, allow_files, deadline)
    )
    with staged(raw_dir, scratch) as folder:
        # img2dataset deletes the shard file it was given; keep our unit for resume.
        work_copy = folder / f"{unit_name(unit)}.input.arrow"
        write_bytes(work_copy, read_bytes(unit_file))
        downloader = Downloader(
            sample_writer_class=WebDatasetSampleWriter,
            resizer=cfg,  # an IngestConfig is an ImageNormalizer
            thread_count=cfg.threads,
            save_caption=True,
            extract_exif=False,
            output_folder=str(folder),
            column_list=RAW_COLUMNS,
            timeout=cfg.timeout_s,
            number_sample_per_shard=samples_per_unit,
            oom_shard_count=7,
            compute_hash=None,
            verify_hash_type=None,
            encode_format="jpg",
            retries=cfg.retries,
            user_agent_token=cfg.user_agent_token,
            disallowed_header_directives=["noai", "noimageai", "noindex", "noimageindex"],
        )
        ok, _ = downloader((unit, str(work_copy)))
        if not ok:
            raise RuntimeError(f"img2dataset failed on unit {unit_name(unit)} (see the worker log)")
        work_copy.unlink(missing_ok=True)
        stats = json.loads((folder / f"{unit_name(unit)}_stats.json").read_text())
    write_json_atomic(marker, {"unit": unit, "source": "img2dataset", **stats, "store_retries": store_retries()})
    return stats


def ingest_webdataset_unit(
    unit: int, tar_path: UPath, raw_dir: UPath, marker: UPath, normalizer: ImageNormalizer, scratch: str | None = None
) -> dict[str, Any]:
    """Normalise the images of an existing webdataset shard into the raw form img2dataset writes."""
    with staged(raw_dir, scratch) as folder:
        stats = _normalise_shard(unit, tar_path, folder, normalizer)
    write_json_atomic(marker, {"unit": unit, "source": "webdataset", **stats, "store_retries": store_retries()})
    return stats


def _normalise_shard(unit: int, tar_path: UPath, folder: Path, normalizer: ImageNormalizer) -> dict[str, Any]:
    from img2dataset.writer import WebDatasetSampleWriter

    start = time.time()
    schema = pa.schema(
        [(c, pa.string()) for c in RAW_COLUMNS + ["key", "status", "error_message"]]
        + [(c, pa.int32()) for c in ("width", "height", "original_width", "original_height")]
    )
    writer = WebDatasetSampleWriter(unit, str(folder), True, 7, schema, "jpg")
    counts = {"count": 0, "successes": 0, "failed_to_resize": 0}
    try:
        for position, (member_key, files) in enumerate(_iter_tar_samples(tar_path)):
            key = make_key(unit, position)
            counts["count"] += 1
            image_ext = next(
                (e for e in ("jpg", "jpeg", "png", "webp", "gif", "bmp", "tif", "tiff") if e in files), None
            )
            meta_in = _json_or_empty(files.get("json"))
            caption = files["txt"].decode("utf-8", "replace") if "txt" in files else meta_in.get("caption")
            meta = {
                "url": meta_in.get("url"),
                "caption": caption,
                "df_key": key,
                "df_source": json.dumps(
                    {"source_key": member_key, **{k: v for k, v in meta_in.items() if k not in ("url", "caption")}},
                    default=str,
                ),
                "key": key,
                "status": "success",
                "error_message": None,
                "width": None,
                "height": None,
                "original_width": None,
                "original_height": None,
            }
            try:
                if image_ext is None:
                    raise ImageRejected(
                        "no_image", f"sample {member_key!r} has no image member ({', '.join(sorted(files))})"
                    )
                image = normalizer.normalize(files[image_ext])
            except ImageRejected as rejected:
                counts["failed_to_resize"] += 1
                meta.update(status="failed_to_resize", error_message=str(rejected))
                writer.write(None, key, caption, meta)
                continue
            counts["successes"] += 1
            meta.update(
                width=image.width,
                height=image.height,
                original_width=image.original_width,
                original_height=image.original_height,
            )
            writer.write(image.data, key, caption, meta)
    finally:
        writer.close()
    return {**counts, "failed_to_download": 0, "duration": time.time() - start}


def _json_or_empty(data: bytes | None) -> dict[str, Any]:
    if not data:
        return {}
    try:
        value = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        return {}
    return value if isinstance(value, dict) else {}


def _iter_tar_samples(tar_path: UPath):
    """(key, {ext: bytes}) per sample of a webdataset tar, members grouped by key prefix."""
    current_key, files = None, {}
    with open_binary(tar_path) as source, tarfile.open(fileobj=source, mode="r|*") as tar:
        for member in tar:
            if not member.isfile():
                continue
            name = os.path.basename(member.name)
            if "." not in name:
                continue
            key, ext = name.split(".", 1)
            key = os.path.join(os.path.dirname(member.name), key)
            if key != current_key and current_key is not None:
                yield current_key, files
                files = {}
            current_key = key
            handle = tar.extractfile(member)
            files[ext.lower()] = handle.read() if handle else b""
    if current_key is not None:
        yield current_key, files


_HTTP_CODE = re.compile(r"HTTP Error (\d{3})")
_TAGGED = re.compile(r"^\[([a-z_]+)\] ")


def classify_failure(status: str | None, message: str | None) -> str:
    """A short funnel reason for one img2dataset failure message."""
    message = message or ""
    tagged = _TAGGED.search(message) or re.search(r"\[(private_address|too_large)\]", message)
    if tagged:
        return tagged.group(1)
    code = _HTTP_CODE.search(message)
    if code:
        return f"http_{code.group(1)}"
    lowered = message.lower()
    for needle, reason in (
        ("timed out", "timeout"),
        ("timeout", "timeout"),
        ("connection refused", "connection_refused"),
        ("connection reset", "connection_reset"),
        ("name or service not known", "dns_error"),
        ("nodename nor servname", "dns_error"),
        ("x-robots-tag", "robots_disallowed"),
        ("certificate", "tls_error"),
        ("ssl", "tls_error"),
        ("incompleteread", "incomplete_read"),
        ("unknown url type", "unsupported_scheme"),
    ):
        if needle in lowered:
            return reason
    return "download_error" if status == "failed_to_download" else "decode_error"


def _strip_tag(message: str | None) -> str:
    return _TAGGED.sub("", message or "")


def read_raw_unit(
    unit: int, unit_file: UPath | None, raw_dir: UPath, marker: UPath, screened_file: UPath | None
) -> list[dict[str, Any]]:
    """Every row of one unit as a pipeline row: samples with image bytes, rejects with reasons.

    Rows img2dataset never reported (a crash inside its per-sample loop) become `ingest/lost`
    rejects, so nothing disappears silently.
    """
    name = unit_name(unit)
    rows: list[dict[str, Any]] = []
    if screened_file is not None:
        try:
            for reject in read_parquet(screened_file).to_pylist():
                rows.append(reject_row(unit, Reject(**reject)))
        except FileNotFoundError:  # a unit written before screening existed
            pass
    state = read_json(marker)
    expected: dict[str, str | None] = {}
    if unit_file is not None:
        table = read_arrow(unit_file).select(["df_key", "url"])
        expected = dict(zip(table.column("df_key").to_pylist(), table.column("url").to_pylist(), strict=True))
    if state.get("failed"):
        for key, url in expected.items():
            rows.append(ingest_reject(unit, key, "ingest_failed", state["failed"], url))
        if unit_file is None:  # an input shard we could not read: its rows are unknown, the shard is one row
            rows.append(
                ingest_reject(unit, make_key(unit, 0), "unreadable_shard", state["failed"], state.get("source_path"))
            )
        return rows
    images = _read_tar_images(raw_dir / f"{name}.tar")
    seen: set[str] = set()
    for meta in read_parquet(raw_dir / f"{name}.parquet").to_pylist():
        key = meta["df_key"]
        seen.add(key)
        if meta["status"] != "success":
            reason = classify_failure(meta["status"], meta["error_message"])
            rows.append(ingest_reject(unit, key, reason, _strip_tag(meta["error_message"]), meta["url"]))
            continue
        image = images.get(meta["key"])
        if image is None:
            rows.append(
                ingest_reject(unit, key, "lost", "reported as downloaded but missing from the raw shard", meta["url"])
            )
            continue
        sample = Sample(
            key=key,
            url=meta["url"],
            alt_text=meta["caption"],
            width=meta["width"],
            height=meta["height"],
            original_width=meta["original_width"],
            original_height=meta["original_height"],
            sha256=hashlib.sha256(image).hexdigest(),
            source=json.loads(meta["df_source"] or "{}"),
            provenance={"denseforge": __version__, "ingest": {"source": state["source"]}},
        )
        rows.append(sample_row(unit, sample, image))
    for key in expected.keys() - seen:
        rows.append(ingest_reject(unit, key, "lost", "img2dataset reported no status for this row", expected[key]))
    return rows


def _read_tar_images(tar_path: UPath) -> dict[str, bytes]:
    """The images of a unit's raw tar (fetched whole: the unit's rows hold them all anyway)."""
    images: dict[str, bytes] = {}
    try:
        data = read_bytes(tar_path)
    except FileNotFoundError:  # a unit with no image downloaded
        return images
    with tarfile.open(fileobj=io.BytesIO(data), mode="r") as tar:
        for member in tar:
            if member.isfile() and member.name.endswith(".jpg"):
                handle = tar.extractfile(member)
                if handle is not None:
                    images[os.path.basename(member.name)[:-4]] = handle.read()
    return images


def sample_row(unit: int, sample: Sample, image: bytes) -> dict[str, Any]:
    """A pipeline row carrying a live sample and its stored image bytes."""
    return {"unit": unit, "key": sample.key, "image": image, "sample": sample.model_dump_json(), "reject": None}


def reject_row(unit: int, reject: Reject) -> dict[str, Any]:
    """A pipeline row carrying a rejection; later stages pass it through untouched."""
    return {"unit": unit, "key": reject.key, "image": None, "sample": None, "reject": reject.model_dump_json()}


def ingest_reject(unit: int, key: str, reason: str, detail: str, url: str | None) -> dict[str, Any]:
    """A row the ingest phase rejects, with its reason."""
    return reject_row(unit, Reject(key=key, stage="ingest", reason=reason, detail=detail, url=url))
