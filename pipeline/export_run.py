"""`denseforge export DIR --format ...`: stream a finished run's shards into a training format,
and `--check N`: read the first N records back as a trainer would."""

from __future__ import annotations

import hashlib
import json
import shutil
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw
from upath import UPath

from denseforge import __version__
from denseforge.errors import ConfigError, RunDirError
from denseforge.pipeline.rundir import RunDir
from denseforge.stages import export as ex
from denseforge.stages.dialects import DIALECTS, Dialect, Placeholders, dialect
from denseforge.stages.ground import plural
from denseforge.stages.sample import Sample
from denseforge.stages.write import read_member
from denseforge.storage import list_files, open_binary

TABLES = ("llava", "coco", "refcoco")
EXPORT_FILE = "export.json"
FORMATS = TABLES + tuple(DIALECTS)


@dataclass(frozen=True)
class ExportSpec:
    """What `denseforge export` writes: a format (a table or a model's box dialect), for dialects
    the framework layout, the tasks, KVG negatives, and Qwen2.5-VL's processor pixel bounds."""

    format: str
    layout: str = "sharegpt"
    tasks: tuple[str, ...] = ("caption", "refer", "region")
    negatives: bool = False
    min_pixels: int | None = None
    max_pixels: int | None = None

    def __post_init__(self):
        if self.format not in FORMATS:
            raise ConfigError(f"--format {self.format}: choose from {', '.join(FORMATS)}")
        if self.layout not in ex.LAYOUTS:
            raise ConfigError(f"--layout {self.layout}: choose from {', '.join(ex.LAYOUTS)}")
        if self.format in TABLES and self.layout != "sharegpt":
            raise ConfigError(f"--layout applies to the model dialects ({', '.join(DIALECTS)}), not to {self.format}")
        unknown = set(self.tasks) - set(ex.TASKS)
        if unknown or not self.tasks:
            raise ConfigError(f"--task {','.join(sorted(unknown)) or '(none)'}: choose from {', '.join(ex.TASKS)}")

    def dialect(self) -> Dialect:
        """The text convention written: ms-swift's placeholders (it converts boxes itself), else the format's."""
        return Placeholders() if self.layout == "ms-swift" else dialect(self.format, self.min_pixels, self.max_pixels)

    def file_name(self) -> str:
        return f"{self.format}.jsonl" if self.layout == "sharegpt" else f"{self.format}.{self.layout}.jsonl"


def iter_samples(rd: RunDir, images_to: Path) -> Iterator[tuple[Sample, str]]:
    """(sample, image path relative to the export) for every written sample, in shard order. An
    image is named by the sha256 of its bytes, so exports of different runs cannot collide."""
    for shard in list_files(rd.shards, ".tar"):
        with open_binary(shard) as source, tarfile.open(fileobj=source) as tar:
            members = {m.name: m for m in tar.getmembers()}
            for name in sorted(n for n in members if n.endswith(".json")):
                sample = Sample.model_validate_json(read_member(tar, members[name]))
                image = read_member(tar, members[name[:-5] + ".jpg"])
                rel = f"images/{hashlib.sha256(image).hexdigest()}.jpg"
                (images_to / rel).write_bytes(image)
                yield sample, rel


def check_exportable(rd: RunDir, allow_incomplete: bool) -> dict[str, Any]:
    """The run's state; refused unless it is `complete` (or `allow_incomplete`): the shards of a
    run that failed or stopped are not a dataset."""
    if not rd.stats.exists():
        raise RunDirError(f"{rd.root} has not finished (no stats.json); run `denseforge resume {rd.root}` first")
    state = rd.read_state()
    if state.get("state") != "complete" and not allow_incomplete:
        why = f": {state['reason']}" if state.get("reason") else ""
        raise RunDirError(
            f"{rd.root} is {state.get('state', 'not complete')}{why}. Its shards are not a finished dataset; "
            f"finish it with `denseforge resume {rd.root}`, or export it anyway with --allow-incomplete"
        )
    return state


def prepare_out(out: Path, overwrite: bool) -> None:
    """An empty export folder: a non-empty `out` is refused, or with `overwrite` replaced when it
    holds an earlier export (never a folder denseforge did not write)."""
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise RunDirError(f"{out} is not empty; choose another --out, or --overwrite to replace the export there")
        if not (out / EXPORT_FILE).exists():
            raise RunDirError(
                f"{out} holds files that are not a denseforge export ({EXPORT_FILE} missing); not replaced"
            )
        shutil.rmtree(out)
    (out / "images").mkdir(parents=True, exist_ok=True)


def _absent_entity(recent: list[str], sample: Sample) -> str | None:
    """The latest fine-grained entity of an earlier sample that this one shows no sign of: none of
    its words is a label detected here, and the caption does not name it."""
    labels = {f for o in sample.experts.get("objects", []) for f in (o["label"].lower(), plural(o["label"].lower()))}
    caption = (sample.caption or "").lower()
    for entity in reversed(recent):
        if entity.lower() not in caption and not labels & set(entity.lower().split()):
            return entity
    return None


def export_run(
    root: UPath | Path,
    spec: ExportSpec,
    out: Path,
    check: int = 0,
    allow_incomplete: bool = False,
    overwrite: bool = False,
) -> tuple[Path, list[dict[str, Any]]]:
    """Write `spec` under `out` (images in out/images) and `export.json` last (what was exported,
    from which run in which state); returns the main file and, with `check`, the read-back check of
    the first `check` records (see `check_records`)."""
    if check < 0:
        raise ConfigError(f"--check {check}: give how many records to read back (0 or more)")
    if check and spec.format in TABLES:
        raise ConfigError(
            f"--check reads box text back in a model's dialect; {spec.format} holds boxes as numbers, "
            f"so there is nothing to read back (choose one of {', '.join(DIALECTS)})"
        )
    rd = RunDir(root)
    rd.check_run()
    state = check_exportable(rd, allow_incomplete)
    prepare_out(out, overwrite)
    target, checked = _write(rd, spec, out, check)
    record = {
        "run": str(root),
        "state": state.get("state"),
        "reason": state.get("reason"),
        "allow_incomplete": allow_incomplete,
        "format": spec.format,
        "layout": spec.layout,
        "tasks": list(spec.tasks),
        "negatives": spec.negatives,
        "file": target.name,
        "denseforge": __version__,
    }
    (out / EXPORT_FILE).write_text(json.dumps(record, indent=1) + "\n")
    return target, checked


def _write(rd: RunDir, spec: ExportSpec, out: Path, check: int) -> tuple[Path, list[dict[str, Any]]]:
    samples = iter_samples(rd, out)
    if spec.format == "coco":
        target = out / "coco.json"
        target.write_text(json.dumps(ex.coco_dataset(samples)))
        return target, []
    if spec.format in ("llava", "refcoco"):
        target = out / ("llava.json" if spec.format == "llava" else "refs.jsonl")
        with open(target, "w", encoding="utf-8") as fh:
            if spec.format == "llava":
                fh.write("[\n")
                for i, (sample, path) in enumerate(samples):
                    fh.write((",\n" if i else "") + json.dumps(ex.llava_record(sample, path), ensure_ascii=False))
                fh.write("\n]\n")
            else:
                for ref in ex.refcoco_refs(samples):
                    fh.write(json.dumps(ref, ensure_ascii=False) + "\n")
        return target, []
    d = spec.dialect()
    target = out / spec.file_name()
    kept: list[tuple[Sample, str, ex.Turn]] = []
    recent: list[str] = []
    with open(target, "w", encoding="utf-8") as fh:
        for sample, path in samples:
            absent = _absent_entity(recent, sample) if spec.negatives else None
            for i, turn in enumerate(ex.turns(sample, d, spec.tasks, absent)):
                fh.write(json.dumps(ex.record(spec.layout, sample, path, turn, i), ensure_ascii=False) + "\n")
                if len(kept) < check:
                    kept.append((sample, path, turn))
            recent = (recent + [phrase for phrase, _ in ex.kvg_entities(sample)])[-64:]
    if spec.layout == "llama-factory":
        info = ex.llama_factory_info(f"denseforge_{spec.format}", target.name)
        (out / "dataset_info.json").write_text(json.dumps(info, indent=1) + "\n")
    return target, check_records(spec, d, target, kept, out) if check else []


def check_records(
    spec: ExportSpec, d: Dialect, target: Path, kept: list[tuple[Sample, str, ex.Turn]], out: Path
) -> list[dict[str, Any]]:
    """Read the first records back from `target` as a trainer would — the exported text alone,
    parsed in the dialect and mapped to pixels — and compare with the boxes they were made from:
    each coordinate within the dialect's tolerance. Draws out/check/ID.png: the original boxes
    (left) beside the read-back ones (right); writes out/check/check.json."""
    (out / "check").mkdir(exist_ok=True)
    results = []
    with open(target, encoding="utf-8") as fh:
        for (sample, path, turn), line in zip(kept, islice(fh, len(kept)), strict=True):  # the first records
            rec = json.loads(line)
            w, h = sample.width, sample.height
            if spec.layout == "ms-swift":
                found = rec["objects"]["bbox"]
            else:
                prompt, answer = ex.record_text(spec.layout, rec)
                found = d.parse_boxes(prompt) + d.parse_boxes(answer)
            back = [d.decode(v, w, h) for v in found]
            expected = turn.boxes()
            ux, uy = d.unit(w, h)
            errors = [
                max(abs(a - b) / (ux if i % 2 == 0 else uy) for i, (a, b) in enumerate(zip(e, g, strict=True)))
                for e, g in zip(expected, back, strict=False)  # a record with boxes missing is flagged below
            ]
            worst = max(errors, default=0.0)
            ok = len(back) == len(expected) and worst <= d.tolerance + 1e-6
            picture = out / "check" / f"{rec['id']}.png"
            _draw_pair(out / path, expected, back, picture)
            results.append(
                {
                    "id": rec["id"],
                    "task": turn.task,
                    "boxes": len(expected),
                    "read_back": len(back),
                    "worst_error_units": round(worst, 4),
                    "ok": ok,
                    "picture": str(picture.relative_to(out)),
                }
            )
    (out / "check" / "check.json").write_text(json.dumps(results, indent=1) + "\n")
    return results


def _draw_pair(image: Path, expected: list[list[float]], back: list[list[float]], target: Path) -> None:
    picture = Image.open(image).convert("RGB")
    pair = Image.new("RGB", (picture.width * 2 + 8, picture.height), "white")
    for offset, boxes, colour, title in (
        (0, expected, (40, 200, 60), "original boxes"),
        (picture.width + 8, back, (230, 50, 40), "read back from the export"),
    ):
        panel = picture.copy()
        draw = ImageDraw.Draw(panel)
        for x0, y0, x1, y1 in boxes:
            draw.rectangle(
                [min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1)], outline=colour, width=max(2, picture.width // 200)
            )
        draw.text((6, 4), title, fill=colour)
        pair.paste(panel, (offset, 0))
    pair.save(target)
