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


def place_labels(
    anchors: list[tuple[float, float]], size: tuple[int, int], bounds: tuple[int, int]
) -> list[tuple[int, int]]:
    """Top-left corners for labels of `size`, one per anchor (a box's top-left corner): just above
    the box, else inside it, else stepped down, so that no two labels overlap while there is room."""
    w, h = size
    placed: list[tuple[int, int]] = []

    def free(x: int, y: int) -> bool:
        return all(x >= px + w or px >= x + w or y >= py + h or py >= y + h for px, py in placed)

    for ax, ay in anchors:
        x = min(max(0, int(ax)), max(0, bounds[0] - w))
        tries = [int(ay) - h, int(ay)] + [int(ay) + k * h for k in range(1, bounds[1] // max(1, h) + 1)]
        spots = [(x, min(max(0, y), max(0, bounds[1] - h))) for y in tries]
        spots += [(sx, sy) for sy in range(0, max(1, bounds[1] - h + 1), h) for sx in range(0, bounds[0] - w + 1, w)]
        placed.append(next((spot for spot in spots if free(*spot)), spots[0]))
    return placed


def render_sample(sample: Sample, image: bytes, width: int = 900) -> Image.Image:
    """The image with numbered object boxes (red) and OCR boxes (blue), each number on a filled tag
    so it reads on any photo; under it a legend (number, label or text, score), the caption and
    the grounded phrases."""
    picture = Image.open(io.BytesIO(image)).convert("RGB")
    scale = width / picture.width
    picture = picture.resize((width, max(1, round(picture.height * scale))))
    draw = ImageDraw.Draw(picture)
    tag_font = ImageFont.load_default(size=14)
    found = [(kind, obs) for kind in COLOURS for obs in sample.experts.get(kind, []) if obs.get("box")]
    tag_w = round(draw.textlength(str(len(found)), font=tag_font)) + 8  # the widest number
    spots = place_labels([(o["box"][0] * scale, o["box"][1] * scale) for _, o in found], (tag_w, 18), picture.size)
    for kind, obs in found:  # every box first, so no box is drawn over a tag
        draw.rectangle([v * scale for v in obs["box"]], outline=COLOURS[kind], width=2)
    for i, ((kind, _), (x, y)) in enumerate(zip(found, spots, strict=True)):
        draw.rectangle([x, y, x + tag_w - 1, y + 17], fill=COLOURS[kind], outline=(255, 255, 255))
        draw.text((x + 4, y + 1), str(i + 1), fill=(255, 255, 255), font=tag_font)
    body = ImageFont.load_default(size=16)
    legend = [
        (COLOURS[kind], f"{i + 1}  {obs.get('label') or obs.get('text', '')}  {obs.get('score', 1.0):.2f}  ({kind})")
        for i, (kind, obs) in enumerate(found)
    ]
    lines = (
        legend
        + [((20, 20, 20), "")]
        + [((20, 20, 20), line) for line in textwrap.wrap(sample.caption or "(no caption)", width=100)]
        + [((20, 20, 20), "")]
        + [((20, 20, 20), f"{g.phrase!r} -> {g.source}") for g in sample.grounding[:12]]
    )
    canvas = Image.new("RGB", (width, picture.height + 22 * len(lines) + 20), "white")
    canvas.paste(picture, (0, 0))
    text = ImageDraw.Draw(canvas)
    for i, (colour, line) in enumerate(lines):
        text.text((10, picture.height + 10 + 22 * i), line, fill=colour, font=body)
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
