"""`denseforge show DIR KEY`: one written sample as a picture — boxes, OCR lines, caption."""

from __future__ import annotations

import io
import tarfile
import textwrap
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont
from upath import UPath

from denseforge.errors import RunDirError
from denseforge.pipeline.rundir import RunDir
from denseforge.stages.sample import Sample
from denseforge.stages.write import read_member
from denseforge.storage import is_local, open_binary, read_parquet, writing

COLOURS = {"objects": (230, 60, 40), "ocr": (30, 120, 230)}


def load_sample(rd: RunDir, key: str) -> tuple[Sample, bytes]:
    """The sample and stored image of `key`, found through the manifest."""
    if not rd.manifest.exists():
        raise RunDirError(f"{rd.root} has no manifest.parquet yet; finish it with `denseforge resume {rd.root}`")
    rows = read_parquet(rd.manifest, columns=["key", "shard"], filters=[("key", "=", key)]).to_pylist()
    if not rows:
        rejected = read_parquet(rd.rejects, filters=[("key", "=", key)]).to_pylist() if rd.rejects.exists() else []
        why = f" (rejected at {rejected[0]['stage']}: {rejected[0]['reason']})" if rejected else ""
        decisions = rd.decisions
        removed = read_parquet(decisions, filters=[("key", "=", key)]).to_pylist() if decisions.exists() else []
        if removed and removed[0]["reason"]:
            why = f" (removed by dedup: {removed[0]['reason']}" + (
                f", duplicate of {removed[0]['dup_of']})" if removed[0]["dup_of"] else ")"
            )
        raise RunDirError(f"no written sample with key {key!r} in {rd.root}{why}")
    with open_binary(rd.shards / rows[0]["shard"]) as source, tarfile.open(fileobj=source) as tar:
        sample = Sample.model_validate_json(read_member(tar, f"{key}.json"))
        image = read_member(tar, f"{key}.jpg")
    return sample, image


def render_sample(sample: Sample, image: bytes, width: int = 900) -> Image.Image:
    """The image with object boxes (red) and OCR boxes (blue), the caption underneath."""
    picture = Image.open(io.BytesIO(image)).convert("RGB")
    draw = ImageDraw.Draw(picture)
    font = ImageFont.load_default(size=max(12, picture.width // 45))
    for kind, colour in COLOURS.items():
        for obs in sample.experts.get(kind, []):
            draw.rectangle(obs["box"], outline=colour, width=max(2, picture.width // 250))
            label = obs.get("label") or obs.get("text", "")
            draw.text(
                (obs["box"][0] + 3, obs["box"][1] + 2), f"{label} {obs.get('score', 1.0):.2f}", fill=colour, font=font
            )
    scale = width / picture.width
    picture = picture.resize((width, max(1, round(picture.height * scale))))
    body = ImageFont.load_default(size=16)
    lines = (
        textwrap.wrap(sample.caption or "(no caption)", width=100)
        + [""]
        + [f"{g.phrase!r} -> {g.source}" for g in sample.grounding[:12]]
    )
    canvas = Image.new("RGB", (width, picture.height + 22 * len(lines) + 20), "white")
    canvas.paste(picture, (0, 0))
    text = ImageDraw.Draw(canvas)
    for i, line in enumerate(lines):
        text.text((10, picture.height + 10 + 22 * i), line, fill=(20, 20, 20), font=body)
    return canvas


def show(root: UPath, key: str, out: Path | None = None) -> UPath | Path:
    """Render `key` to a PNG: `out`, else DIR/show/KEY.png for a local run, else ./KEY.png (a run
    in an object store is read, never written, by `show`)."""
    rd = RunDir(root)
    rd.check_run()
    sample, image = load_sample(rd, key)
    target: UPath | Path = out or (
        rd.root / "show" / f"{key}.png" if is_local(rd.root) else Path(f"{key}.png").resolve()
    )
    Path(str(target)).parent.mkdir(parents=True, exist_ok=True)
    with writing(target) as handle:
        render_sample(sample, image).save(handle, format="PNG")
    return target
