"""`denseforge export DIR --format ...`: stream a finished run's shards into a training format."""

from __future__ import annotations

import json
import tarfile
from collections.abc import Iterator
from pathlib import Path

from denseforge.errors import RunDirError
from denseforge.pipeline.rundir import RunDir
from denseforge.stages import export as ex
from denseforge.stages.sample import Sample

FORMATS = ("llava", "coco", "refcoco", "qwen-grounding", "kosmos2")


def iter_samples(rd: RunDir, images_to: Path | None) -> Iterator[tuple[Sample, str]]:
    """(sample, image path relative to the export) for every written sample, in shard order."""
    shards = sorted(rd.shards.glob("*.tar"))
    if not rd.stats.exists():
        raise RunDirError(f"{rd.root} has not finished (no stats.json); run `denseforge resume {rd.root}` first")
    for shard in shards:
        with tarfile.open(shard) as tar:
            members = {m.name: m for m in tar.getmembers()}
            for name in sorted(n for n in members if n.endswith(".json")):
                sample = Sample.model_validate_json(tar.extractfile(members[name]).read())
                stem = name[:-5]
                rel = f"images/{stem}.jpg"
                if images_to is not None:
                    (images_to / rel).write_bytes(tar.extractfile(members[stem + ".jpg"]).read())
                yield sample, rel


def export_run(root: Path, fmt: str, out: Path) -> Path:
    """Write `fmt` under `out` (images in out/images); returns the main file."""
    rd = RunDir(root)
    rd.load_config()
    out.mkdir(parents=True, exist_ok=True)
    (out / "images").mkdir(exist_ok=True)
    samples = iter_samples(rd, out)
    if fmt == "coco":
        target = out / "coco.json"
        target.write_text(json.dumps(ex.coco_dataset(samples)))
        return target
    target = out / {"llava": "llava.json", "refcoco": "refs.jsonl", "qwen-grounding": "qwen.jsonl",
                    "kosmos2": "kosmos2.jsonl"}[fmt]
    with open(target, "w", encoding="utf-8") as fh:
        if fmt == "llava":
            fh.write("[\n")
            for i, (sample, path) in enumerate(samples):
                fh.write((",\n" if i else "") + json.dumps(ex.llava_record(sample, path), ensure_ascii=False))
            fh.write("\n]\n")
        elif fmt == "refcoco":
            for ref in ex.refcoco_refs(samples):
                fh.write(json.dumps(ref, ensure_ascii=False) + "\n")
        else:
            render = ex.qwen_text if fmt == "qwen-grounding" else ex.kosmos_text
            for sample, path in samples:
                fh.write(json.dumps({"key": sample.key, "image": path, "width": sample.width, "height": sample.height,
                                     "text": render(sample)}, ensure_ascii=False) + "\n")
    return target
