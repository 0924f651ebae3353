"""export: finished samples to the formats training code reads.

llava     — LLaVA conversations (detailed-description prompt -> caption), images copied beside.
coco      — COCO detection json (xywh boxes, categories) that pycocotools loads, plus captions.
refcoco   — RefCOCO-style refs: one referring phrase per grounded object box.
a dialect — (stages/dialects.py: qwen2.5-vl, internvl, florence-2, ...) grounding conversations
            in that model's box convention: `turns` per sample, `record` in a framework's layout.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from denseforge.stages.dialects import Box, Dialect
from denseforge.stages.ground import DETERMINERS, plural
from denseforge.stages.sample import Grounding, Sample

DETAIL_PROMPT = "<image>\nDescribe this image in detail."


def _spans(sample: Sample) -> list[tuple[tuple[int, int], list[Grounding]]]:
    """Grounded spans in caption order, boxes grouped per span, overlapping spans dropped."""
    by_span: dict[tuple[int, int], list[Grounding]] = defaultdict(list)
    for g in sample.grounding:
        by_span[(g.span[0], g.span[1])].append(g)
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


def _groups(sample: Sample) -> list[tuple[int, int, str, list[Box]]]:
    """(start, stop, phrase, original boxes) per grounded span, in caption order."""
    caption = sample.caption or ""
    return [(a, b, caption[a:b], [g.box for g in group]) for (a, b), group in _spans(sample)]


def grounded_text(sample: Sample, d: Dialect) -> str:
    """The caption with every grounded phrase marked inline in dialect `d`."""

    def render(phrase, boxes, s):
        return d.mark(phrase, [d.encode(b, s.width, s.height) for b in boxes])

    return _mark(sample, render)


@dataclass
class Turn:
    """One exported question and answer about one image. `refs` are the phrases and original-pixel
    boxes its text encodes, in order of appearance (prompt first): what `--check` compares the
    parsed text against, and what ms-swift's `objects` hold."""

    task: str
    prompt: str
    answer: str
    refs: list[tuple[str, list[Box]]] = field(default_factory=list)

    def boxes(self) -> list[Box]:
        return [b for _, boxes in self.refs for b in boxes]


def kvg_entities(sample: Sample) -> list[tuple[str, list[Box]]]:
    """Grounded object phrases that name more than the detector's label ("Falcon 9 rocket" for
    rocket, "tabby cat" for cat): knowledge-intensive visual grounding queries, boxes grouped."""
    objects = sample.experts.get("objects", [])
    found: dict[str, tuple[str, list[Box]]] = {}
    for g in sample.grounding:
        if not g.source.startswith("objects/"):
            continue
        label = objects[int(g.source.split("/")[1])]["label"].lower()
        words = [w for w in g.phrase.lower().split() if w not in DETERMINERS]
        if " ".join(words) in {label, plural(label)}:
            continue
        boxes = found.setdefault(g.phrase.lower(), (g.phrase, []))[1]
        if g.box not in boxes:
            boxes.append(g.box)
    return list(found.values())


TASKS = ("caption", "refer", "region", "kvg")


def turns(sample: Sample, d: Dialect, tasks: Iterable[str], absent: str | None = None) -> list[Turn]:
    """The exported turns of one sample: `caption` (the dense caption, phrases marked inline),
    `refer` (phrase -> boxes), `region` (box -> region caption), `kvg` (fine-grained entity ->
    boxes, plus `absent` -> "not present" when given)."""
    w, h = sample.width, sample.height

    def enc(boxes: list[Box]) -> list[list[float]]:
        return [d.encode(b, w, h) for b in boxes]

    out: list[Turn] = []
    groups = _groups(sample)
    if "caption" in tasks and sample.caption:
        prompt, answer = d.caption_turn(
            sample.caption, grounded_text(sample, d), [(phrase, enc(boxes)) for _, _, phrase, boxes in groups]
        )
        out.append(Turn("caption", prompt, answer, [(phrase, boxes) for _, _, phrase, boxes in groups]))
    if "refer" in tasks:
        by_phrase: dict[str, tuple[str, list[Box]]] = {}
        for _, _, phrase, boxes in groups:
            seen = by_phrase.setdefault(phrase.lower(), (phrase, []))[1]
            seen += [b for b in boxes if b not in seen]
        for phrase, boxes in by_phrase.values():
            out.append(Turn("refer", d.refer_prompt(phrase), d.answer(phrase, enc(boxes)), [(phrase, boxes)]))
    if "region" in tasks:
        for region in sample.regions:
            out.append(
                Turn("region", d.region_prompt(d.encode(region.box, w, h)), region.caption, [("", [region.box])])
            )
    if "kvg" in tasks:
        for phrase, boxes in kvg_entities(sample):
            out.append(Turn("kvg", d.refer_prompt(phrase), d.answer(phrase, enc(boxes)), [(phrase, boxes)]))
        if absent:
            out.append(Turn("kvg", d.refer_prompt(absent), d.absent(absent), [(absent, [])]))
    return out


LAYOUTS = ("sharegpt", "ms-swift", "llama-factory")


def record(layout: str, sample: Sample, image: str, turn: Turn, index: int) -> dict[str, Any]:
    """One training record in a framework's layout. sharegpt: LLaVA/InternVL `conversations`
    (with width/height, which InternVL reads); llama-factory: `messages` + `images` (its sharegpt
    format, see dataset_info.json); ms-swift: `messages` + `images` + `objects` for its placeholders."""
    rid = f"{sample.key}-{turn.task}-{index}"
    if layout == "sharegpt":
        return {
            "id": rid,
            "image": image,
            "width": sample.width,
            "height": sample.height,
            "conversations": [
                {"from": "human", "value": f"<image>\n{turn.prompt}"},
                {"from": "gpt", "value": turn.answer},
            ],
        }
    rec: dict[str, Any] = {
        "id": rid,
        "messages": [
            {"role": "user", "content": f"<image>{turn.prompt}"},
            {"role": "assistant", "content": turn.answer},
        ],
        "images": [image],
    }
    if layout == "ms-swift":
        bbox = [[round(v, 2) for v in b] for b in turn.boxes()]
        rec["objects"] = {
            "ref": [phrase for phrase, _ in turn.refs if phrase],
            "bbox": bbox,
            "bbox_type": "real",
            "image_id": [0] * len(bbox),
        }
    return rec


def record_text(layout: str, rec: dict[str, Any]) -> tuple[str, str]:
    """(prompt, answer) of a record written by `record`."""
    if layout == "sharegpt":
        human, gpt = rec["conversations"]
        return human["value"].removeprefix("<image>\n"), gpt["value"]
    user, assistant = rec["messages"]
    return user["content"].removeprefix("<image>"), assistant["content"]


def llama_factory_info(name: str, file_name: str) -> dict[str, Any]:
    """The dataset_info.json entry LLaMA-Factory needs to read `file_name` (its sharegpt format
    with OpenAI-style messages)."""
    return {
        name: {
            "file_name": file_name,
            "formatting": "sharegpt",
            "columns": {"messages": "messages", "images": "images"},
            "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant"},
        }
    }


def xywh(box: list[float]) -> list[float]:
    """[x0, y0, x1, y1] as COCO's [x, y, w, h], rounded to 0.01 px (no float noise like 316.90000000000003)."""
    x0, y0, x1, y1 = box
    return [round(x0, 2), round(y0, 2), round(x1 - x0, 2), round(y1 - y0, 2)]


def llava_record(sample: Sample, image_path: str) -> dict[str, Any]:
    return {
        "id": sample.key,
        "image": image_path,
        "conversations": [{"from": "human", "value": DETAIL_PROMPT}, {"from": "gpt", "value": sample.caption or ""}],
    }


# COCO 2017's category ids for its 80 names, in the order of experts/vocabularies/objects.txt
COCO_IDS = (
    1,
    2,
    3,
    4,
    5,
    6,
    7,
    8,
    9,
    10,
    11,
    13,
    14,
    15,
    16,
    17,
    18,
    19,
    20,
    21,
    22,
    23,
    24,
    25,
    27,
    28,
    31,
    32,
    33,
    34,
    35,
    36,
    37,
    38,
    39,
    40,
    41,
    42,
    43,
    44,
    46,
    47,
    48,
    49,
    50,
    51,
    52,
    53,
    54,
    55,
    56,
    57,
    58,
    59,
    60,
    61,
    62,
    63,
    64,
    65,
    67,
    70,
    72,
    73,
    74,
    75,
    76,
    77,
    78,
    79,
    80,
    81,
    82,
    84,
    85,
    86,
    87,
    88,
    89,
    90,
)


def coco_category_ids() -> dict[str, int]:
    from denseforge.experts.clip_tags import read_vocabulary

    return dict(zip(read_vocabulary("builtin:objects"), COCO_IDS, strict=True))


def coco_dataset(samples: Iterable[tuple[Sample, str]]) -> dict[str, Any]:
    """COCO json: images, object annotations (xywh), categories, and captions. COCO's 80 names
    keep COCO's own ids (person 1, ..., toothbrush 90); other labels are numbered from 91."""
    images: list[dict[str, Any]] = []
    annotations: list[dict[str, Any]] = []
    captions: list[dict[str, Any]] = []
    categories = coco_category_ids()
    used: set[str] = set()
    for image_id, (sample, path) in enumerate(samples, 1):
        images.append(
            {
                "id": image_id,
                "file_name": path,
                "width": sample.width,
                "height": sample.height,
                "denseforge_key": sample.key,
            }
        )
        if sample.caption:
            captions.append({"id": len(captions) + 1, "image_id": image_id, "caption": sample.caption})
        for obj in sample.experts.get("objects", []):
            cat = categories.setdefault(obj["label"], max(90, *categories.values()) + 1)
            used.add(obj["label"])
            bbox = xywh(obj["box"])
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": cat,
                    "bbox": bbox,
                    "area": round(bbox[2] * bbox[3], 2),
                    "iscrowd": 0,
                    "score": obj.get("score", 1.0),
                }
            )
    return {
        "info": {"description": "exported by denseforge"},
        "images": images,
        "annotations": annotations,
        "categories": [{"id": i, "name": n} for n, i in sorted(categories.items(), key=lambda kv: kv[1]) if n in used],
        "captions": captions,
    }


def refcoco_refs(samples: Iterable[tuple[Sample, str]]) -> Iterator[dict[str, Any]]:
    """One ref per grounded object box: the caption phrase that refers to it."""
    ref_id = 0
    for sample, path in samples:
        for g in sample.grounding:
            if not g.source.startswith("objects/"):
                continue
            ref_id += 1
            yield {
                "ref_id": ref_id,
                "image": path,
                "key": sample.key,
                "bbox": xywh(g.box),
                "sentences": [{"sent": g.phrase}],
                "span": list(g.span),
                "source": g.source,
            }
