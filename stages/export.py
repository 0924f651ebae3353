"""export: finished samples to the formats training code reads, each with its grounding dialect.

llava     — LLaVA conversations (detailed-description prompt -> caption), images copied beside.
coco      — COCO detection json (xywh boxes, categories) that pycocotools loads, plus captions.
refcoco   — RefCOCO-style refs: one referring phrase per grounded object box.
qwen-grounding — Qwen-VL `<ref>phrase</ref><box>(x1,y1),(x2,y2)</box>` on a 0-1000 grid.
kosmos2   — Kosmos-2 `<phrase>..</phrase><object><patch_index_A><patch_index_B></object>`, 32x32 bins.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterable, Iterator
from typing import Any

from denseforge.stages.sample import Grounding, Sample

DETAIL_PROMPT = "<image>\nDescribe this image in detail."
BINS = 32


def _spans(sample: Sample) -> list[tuple[tuple[int, int], list[Grounding]]]:
    """Grounded spans in caption order, boxes grouped per span, overlapping spans dropped."""
    by_span: dict[tuple[int, int], list[Grounding]] = defaultdict(list)
    for g in sample.grounding:
        by_span[tuple(g.span)].append(g)
    out, end = [], -1
    for span in sorted(by_span):
        if span[0] >= end:
            out.append((span, by_span[span]))
            end = span[1]
    return out


def _mark(sample: Sample, render) -> str:
    caption, pieces, cursor = sample.caption or "", [], 0
    for (start, stop), group in _spans(sample):
        pieces += [caption[cursor:start], render(caption[start:stop], [g.box for g in group], sample)]
        cursor = stop
    return "".join(pieces + [caption[cursor:]])


def _thousandths(v: float, size: int) -> int:
    return max(0, min(1000, round(1000 * v / size)))


def qwen_text(sample: Sample) -> str:
    def render(phrase, boxes, s):
        coords = "".join(f"<box>({_thousandths(b[0], s.width)},{_thousandths(b[1], s.height)}),"
                         f"({_thousandths(b[2], s.width)},{_thousandths(b[3], s.height)})</box>" for b in boxes)
        return f"<ref>{phrase}</ref>{coords}"

    return _mark(sample, render)


def parse_qwen(text: str) -> tuple[str, list[tuple[str, list[list[int]]]]]:
    """Plain caption and (phrase, boxes on 0-1000) from Qwen-VL grounding markup."""
    refs = []
    pattern = re.compile(r"<ref>(.*?)</ref>((?:<box>\(\d+,\d+\),\(\d+,\d+\)</box>)+)")
    for m in pattern.finditer(text):
        boxes = [list(map(int, b)) for b in re.findall(r"\((\d+),(\d+)\),\((\d+),(\d+)\)", m.group(2))]
        refs.append((m.group(1), boxes))
    plain = re.sub(r"<box>.*?</box>", "", text).replace("<ref>", "").replace("</ref>", "")
    return plain, refs


def _bin(v: float, size: int) -> int:
    return min(BINS - 1, max(0, int(v / size * BINS)))


def kosmos_text(sample: Sample) -> str:
    def render(phrase, boxes, s):
        objects = "</delimiter_of_multi_objects/>".join(
            f"<patch_index_{_bin(b[1], s.height) * BINS + _bin(b[0], s.width):04d}>"
            f"<patch_index_{_bin(b[3] - 1e-6, s.height) * BINS + _bin(b[2] - 1e-6, s.width):04d}>" for b in boxes)
        return f"<phrase>{phrase}</phrase><object>{objects}</object>"

    return _mark(sample, render)


def parse_kosmos(text: str, width: int, height: int) -> tuple[str, list[tuple[str, list[list[float]]]]]:
    """Plain caption and (phrase, boxes in pixels at bin resolution) from Kosmos-2 markup."""
    refs = []
    for m in re.finditer(r"<phrase>(.*?)</phrase><object>(.*?)</object>", text):
        boxes = []
        for a, b in re.findall(r"<patch_index_(\d{4})><patch_index_(\d{4})>", m.group(2)):
            (r0, c0), (r1, c1) = divmod(int(a), BINS), divmod(int(b), BINS)
            boxes.append([c0 * width / BINS, r0 * height / BINS, (c1 + 1) * width / BINS, (r1 + 1) * height / BINS])
        refs.append((m.group(1), boxes))
    plain = re.sub(r"<object>.*?</object>", "", text).replace("<phrase>", "").replace("</phrase>", "")
    return plain, refs


def xywh(box: list[float]) -> list[float]:
    """[x0, y0, x1, y1] as COCO's [x, y, w, h], rounded to 0.01 px (no float noise like 316.90000000000003)."""
    x0, y0, x1, y1 = box
    return [round(x0, 2), round(y0, 2), round(x1 - x0, 2), round(y1 - y0, 2)]


def llava_record(sample: Sample, image_path: str) -> dict[str, Any]:
    return {"id": sample.key, "image": image_path,
            "conversations": [{"from": "human", "value": DETAIL_PROMPT}, {"from": "gpt", "value": sample.caption or ""}]}


# COCO 2017's category ids for its 80 names, in the order of experts/vocabularies/objects.txt
COCO_IDS = (1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 27, 28, 31,
            32, 33, 34, 35, 36, 37, 38, 39, 40, 41, 42, 43, 44, 46, 47, 48, 49, 50, 51, 52, 53, 54, 55, 56, 57, 58,
            59, 60, 61, 62, 63, 64, 65, 67, 70, 72, 73, 74, 75, 76, 77, 78, 79, 80, 81, 82, 84, 85, 86, 87, 88, 89, 90)


def coco_category_ids() -> dict[str, int]:
    from denseforge.experts.clip_tags import read_vocabulary

    return dict(zip(read_vocabulary("builtin:objects"), COCO_IDS))


def coco_dataset(samples: Iterable[tuple[Sample, str]]) -> dict[str, Any]:
    """COCO json: images, object annotations (xywh), categories, and captions. COCO's 80 names
    keep COCO's own ids (person 1, ..., toothbrush 90); other labels are numbered from 91."""
    images, annotations, captions = [], [], []
    categories = coco_category_ids()
    used: set[str] = set()
    for image_id, (sample, path) in enumerate(samples, 1):
        images.append({"id": image_id, "file_name": path, "width": sample.width, "height": sample.height,
                       "denseforge_key": sample.key})
        if sample.caption:
            captions.append({"id": len(captions) + 1, "image_id": image_id, "caption": sample.caption})
        for obj in sample.experts.get("objects", []):
            cat = categories.setdefault(obj["label"], max(90, *categories.values()) + 1)
            used.add(obj["label"])
            bbox = xywh(obj["box"])
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": cat,
                                "bbox": bbox, "area": round(bbox[2] * bbox[3], 2), "iscrowd": 0,
                                "score": obj.get("score", 1.0)})
    return {"info": {"description": "exported by denseforge"}, "images": images, "annotations": annotations,
            "categories": [{"id": i, "name": n} for n, i in sorted(categories.items(), key=lambda kv: kv[1]) if n in used],
            "captions": captions}


def refcoco_refs(samples: Iterable[tuple[Sample, str]]) -> Iterator[dict[str, Any]]:
    """One ref per grounded object box: the caption phrase that refers to it."""
    ref_id = 0
    for sample, path in samples:
        for g in sample.grounding:
            if not g.source.startswith("objects/"):
                continue
            ref_id += 1
            yield {"ref_id": ref_id, "image": path, "key": sample.key, "bbox": xywh(g.box),
                   "sentences": [{"sent": g.phrase}], "span": list(g.span), "source": g.source}
