"""Box conventions of the vision-language models people train on our data.

A dialect knows how a pixel box [x0, y0, x1, y1] of the original image becomes the numbers a
model reads (`encode`) and back (`decode`), how a grounded phrase is written inline (`mark`), how
a referring answer and a region prompt look, and how to read its own text again (`parse`). The
parse is what the round-trip tests and `denseforge export --check` run: a convention that does not
survive its own parse is wrong.

The conventions differ in ways that silently ruin training, hence one class per family:
  qwen-vl     `<ref>p</ref><box>(x1,y1),(x2,y2)</box>`, 0-1000 of the image
  qwen2-vl    `<|object_ref_start|>p<|object_ref_end|><|box_start|>(x1,y1),(x2,y2)<|box_end|>`, 0-1000
  qwen2.5-vl  the same tokens / JSON `bbox_2d`, absolute pixels of the image *after* `smart_resize`
  qwen3-vl    JSON `bbox_2d` (tokens inline), 0-1000 again
  internvl    `<ref>p</ref><box>[[x1, y1, x2, y2]]</box>`, 0-1000
  llava-1.5   `[x1, y1, x2, y2]` floats with two decimals of the image padded to a square
  florence-2  `p<loc_x1><loc_y1><loc_x2><loc_y2>`, 1000 bins (floor), read back at bin centres
  kosmos2     `<phrase>p</phrase><object><patch_index_A><patch_index_B></object>`, 32x32 patches
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import ClassVar

Number = int | float
Box = list[float]


@dataclass(frozen=True)
class Ref:
    """A grounded phrase read back from dialect text: its phrase where the dialect delimits one, and
    its boxes in the dialect's numbers."""

    phrase: str | None
    boxes: list[list[Number]]


class Dialect:
    """The base: relative 0-1000 coordinates, rounded to the nearest unit (error <= half a unit)."""

    name: ClassVar[str]
    # how far (in units) a read-back coordinate may be from the box it was made from
    tolerance: ClassVar[float] = 0.5
    caption_prompt: ClassVar[str] = "Describe this image in detail, and give the box of every object you mention."

    # -- coordinates --------------------------------------------------------------------------
    def frame(self, width: int, height: int) -> tuple[float, float, float, float]:
        """(scale x, scale y, offset x, offset y): model value = (pixel + offset) * scale, before rounding."""
        return 1000 / width, 1000 / height, 0.0, 0.0

    def quantize(self, value: float, top: float) -> Number:
        return max(0, min(round(top), round(value)))

    def encode(self, box: Box, width: int, height: int) -> list[Number]:
        sx, sy, ox, oy = self.frame(width, height)
        tops = (width * sx, height * sy)  # dialects with an offset (padding) clamp in their own quantize
        return [self.quantize((v + (ox, oy)[i % 2]) * (sx, sy)[i % 2], tops[i % 2]) for i, v in enumerate(box)]

    def decode(self, values: list[Number], width: int, height: int) -> Box:
        sx, sy, ox, oy = self.frame(width, height)
        return [v / (sx, sy)[i % 2] - (ox, oy)[i % 2] for i, v in enumerate(values)]

    def unit(self, width: int, height: int) -> tuple[float, float]:
        """Pixels of the original image per model unit on each axis (the check's tolerance is half)."""
        sx, sy, _, _ = self.frame(width, height)
        return 1 / sx, 1 / sy

    # -- text ---------------------------------------------------------------------------------
    def box_text(self, values: list[Number]) -> str:
        raise NotImplementedError

    def mark(self, phrase: str, boxes: list[list[Number]]) -> str:
        raise NotImplementedError

    def caption_turn(self, caption: str, marked: str, refs: list[tuple[str, list[list[Number]]]]) -> tuple[str, str]:
        """(prompt, answer) of the dense grounded caption: by default the caption with its phrases
        marked inline (`marked`); `refs` are the phrases with their encoded boxes, in caption order."""
        return self.caption_prompt, marked

    def refer_prompt(self, phrase: str) -> str:
        raise NotImplementedError

    def answer(self, phrase: str, boxes: list[list[Number]]) -> str:
        return self.mark(phrase, boxes)

    def region_prompt(self, values: list[Number]) -> str:
        return f"Describe the region {self.box_text(values)} in one sentence."

    def absent(self, phrase: str) -> str:
        return f"There is no {phrase} in the image."

    def parse(self, text: str) -> tuple[str, list[Ref]]:
        """Plain text and the grounded references in order of appearance."""
        raise NotImplementedError

    def parse_boxes(self, text: str) -> list[list[Number]]:
        """Every box in `text`, in order (a region prompt, an answer)."""
        return [b for ref in self.parse(text)[1] for b in ref.boxes]


def _ints(text: str) -> list[int]:
    return [int(v) for v in re.findall(r"-?\d+", text)]


class QwenVL(Dialect):
    name = "qwen-vl"
    _REF = re.compile(r"<ref>(.*?)</ref>((?:<box>.*?</box>)+)", re.DOTALL)

    def box_text(self, values):
        return f"<box>({values[0]},{values[1]}),({values[2]},{values[3]})</box>"

    def mark(self, phrase, boxes):
        return f"<ref>{phrase}</ref>" + "".join(self.box_text(b) for b in boxes)

    def refer_prompt(self, phrase):
        return f"<ref>{phrase}</ref>"

    def parse(self, text):
        refs = [
            Ref(m.group(1), [_ints(b) for b in re.findall(r"<box>(.*?)</box>", m.group(2))])
            for m in self._REF.finditer(text)
        ]
        if not refs:  # a bare answer or region prompt: boxes without a phrase
            refs = [Ref(None, [_ints(b) for b in re.findall(r"<box>(.*?)</box>", text)])] if "<box>" in text else []
        return re.sub(r"<box>.*?</box>", "", text).replace("<ref>", "").replace("</ref>", ""), refs


class Qwen2VL(Dialect):
    name = "qwen2-vl"
    _REF = re.compile(
        r"<\|object_ref_start\|>(.*?)<\|object_ref_end\|>((?:<\|box_start\|>.*?<\|box_end\|>)*)", re.DOTALL
    )
    _BOX = re.compile(r"<\|box_start\|>(.*?)<\|box_end\|>", re.DOTALL)

    def box_text(self, values):
        return f"<|box_start|>({values[0]},{values[1]}),({values[2]},{values[3]})<|box_end|>"

    def mark(self, phrase, boxes):
        return f"<|object_ref_start|>{phrase}<|object_ref_end|>" + "".join(self.box_text(b) for b in boxes)

    def refer_prompt(self, phrase):
        return f"Find <|object_ref_start|>{phrase}<|object_ref_end|> in the image."

    def parse(self, text):
        refs = [Ref(m.group(1), [_ints(b) for b in self._BOX.findall(m.group(2))]) for m in self._REF.finditer(text)]
        if not refs and self._BOX.search(text):
            refs = [Ref(None, [_ints(b) for b in self._BOX.findall(text)])]
        plain = self._BOX.sub("", text).replace("<|object_ref_start|>", "").replace("<|object_ref_end|>", "")
        return plain, refs


class _JsonAnswers(Qwen2VL):
    """Qwen2.5-VL and Qwen3-VL: grounding answers as a JSON list of {"bbox_2d", "label"} (how both
    models are prompted and answer); the dense caption keeps the inline tokens their tokenizers have."""

    def refer_prompt(self, phrase):
        return f"Locate {phrase} in the image and output its bbox coordinates in JSON format."

    def answer(self, phrase, boxes):
        items = ",\n".join("\t" + json.dumps({"bbox_2d": list(b), "label": phrase}, ensure_ascii=False) for b in boxes)
        return f"```json\n[\n{items}\n]\n```"

    def region_prompt(self, values):
        return f"Describe the region with bbox_2d {json.dumps(list(values))} in one sentence."

    def parse(self, text):
        fenced = re.search(r"```json\s*(.*?)```", text, re.DOTALL)
        if fenced is None:
            return super().parse(text)
        refs: list[Ref] = []
        for item in json.loads(fenced.group(1)):
            if refs and refs[-1].phrase == item.get("label"):
                refs[-1].boxes.append(item["bbox_2d"])
            else:
                refs.append(Ref(item.get("label"), [item["bbox_2d"]]))
        return text[: fenced.start()] + text[fenced.end() :], refs

    def parse_boxes(self, text):
        inline = re.search(r"bbox_2d (\[[^\]]*\])", text)  # a region prompt; answers are fenced JSON
        return [json.loads(inline.group(1))] if inline else super().parse_boxes(text)


@dataclass(frozen=True)
class Qwen25VL(_JsonAnswers):
    """Absolute pixels of the image the model sees: the processor first `smart_resize`s it to
    sides that are multiples of `factor` with min_pixels <= area <= max_pixels (keep these equal to
    the processor's settings in training)."""

    min_pixels: int = 56 * 56
    max_pixels: int = 28 * 28 * 16384
    factor: int = 28
    name: ClassVar[str] = "qwen2.5-vl"
    tolerance: ClassVar[float] = 1.0  # the clamp to side - 1 moves a border edge by up to one unit

    def resized(self, width: int, height: int) -> tuple[int, int]:
        """(width, height) after Qwen2-VL's `smart_resize` (same rounding as the processor's)."""
        f = self.factor
        if max(height, width) / min(height, width) > 200:
            raise ValueError(f"aspect ratio {max(height, width) / min(height, width):.0f} exceeds the processor's 200")
        h, w = round(height / f) * f, round(width / f) * f
        if h * w > self.max_pixels:
            beta = math.sqrt(height * width / self.max_pixels)
            h, w = max(f, math.floor(height / beta / f) * f), max(f, math.floor(width / beta / f) * f)
        elif h * w < self.min_pixels:
            beta = math.sqrt(self.min_pixels / (height * width))
            h, w = math.ceil(height * beta / f) * f, math.ceil(width * beta / f) * f
        return w, h

    def frame(self, width, height):
        w, h = self.resized(width, height)
        return w / width, h / height, 0.0, 0.0

    def quantize(self, value, top):
        """Qwen's own `convert_to_qwen25vl_format`: rounded, then clamped to [0, side - 1], so an
        edge at the image's border reads back one unit inside it."""
        return max(0, min(round(top) - 1, round(value)))


class Qwen3VL(_JsonAnswers):
    name = "qwen3-vl"


class InternVL(Dialect):
    """InternVL's own conversion truncates (`int(x / w * 1000)`); read back at the middle of the
    unit the truncation kept, so the error stays within half a unit."""

    name = "internvl"
    _REF = re.compile(r"<ref>(.*?)</ref>(?:<box>(.*?)</box>)?", re.DOTALL)

    def quantize(self, value, top):
        return max(0, min(round(top), math.floor(value)))

    def decode(self, values, width, height):
        return [min(v + 0.5, 1000) * (width, height)[i % 2] / 1000 for i, v in enumerate(values)]

    def box_text(self, values):
        return f"<box>[{json.dumps(list(values))}]</box>"

    def mark(self, phrase, boxes):
        return f"<ref>{phrase}</ref><box>{json.dumps([list(b) for b in boxes])}</box>"

    def refer_prompt(self, phrase):
        return f"Please provide the bounding box coordinate of the region this sentence describes: <ref>{phrase}</ref>"

    def region_prompt(self, values):
        return f"Please provide a short description for this region: {self.box_text(values)}"

    def parse(self, text):
        refs = [Ref(m.group(1), json.loads(m.group(2))) for m in self._REF.finditer(text) if m.group(2)]
        if not refs and "<box>" in text:
            refs = [
                Ref(None, [b for found in re.findall(r"<box>(.*?)</box>", text, re.DOTALL) for b in json.loads(found)])
            ]
        return re.sub(r"<box>.*?</box>", "", text, flags=re.DOTALL).replace("<ref>", "").replace("</ref>", ""), refs


class Llava15(Dialect):
    """LLaVA-1.5 pads the shorter side to a square (`expand2square`, image centred) before the
    encoder sees it, and its grounding data gives boxes as [0, 1] floats of that square with two
    decimals. Without a phrase delimiter, the box follows its phrase: "two dogs [0.02, ...]"."""

    name = "llava-1.5"
    _GROUP = re.compile(r" ?(\[\d\.\d+, \d\.\d+, \d\.\d+, \d\.\d+\](?:, \[\d\.\d+, \d\.\d+, \d\.\d+, \d\.\d+\])*)")

    def frame(self, width, height):
        side = max(width, height)
        return 1 / side, 1 / side, float((side - width) // 2), float((side - height) // 2)

    def unit(self, width, height):
        side = max(width, height)
        return side / 100, side / 100

    def quantize(self, value, top):
        return max(0.0, min(1.0, round(value, 2)))

    def box_text(self, values):
        return "[" + ", ".join(f"{v:.2f}" for v in values) + "]"

    def mark(self, phrase, boxes):
        return f"{phrase} " + ", ".join(self.box_text(b) for b in boxes)

    def refer_prompt(self, phrase):
        return f"Please provide the bounding box coordinate of the region this sentence describes: {phrase}."

    def answer(self, phrase, boxes):
        return ", ".join(self.box_text(b) for b in boxes)

    def region_prompt(self, values):
        return f"Please provide a short description for this region: {self.box_text(values)}."

    def parse(self, text):
        refs = [
            Ref(None, [[float(v) for v in re.findall(r"\d\.\d+", b)] for b in re.findall(r"\[.*?\]", m.group(1))])
            for m in self._GROUP.finditer(text)
        ]
        return self._GROUP.sub("", text), refs


class Florence2(Dialect):
    """Florence-2 quantizes each coordinate into 1000 bins per axis (floor, clamped to 999) and reads
    a bin back at its centre; grounding answers are `phrase<loc_x1><loc_y1><loc_x2><loc_y2>...`."""

    name = "florence-2"
    caption_prompt = "<CAPTION_TO_PHRASE_GROUNDING>"
    _REF = re.compile(r"([^<]*)((?:<loc_\d+>){4,})")

    def quantize(self, value, top):
        return max(0, min(999, math.floor(value)))

    def decode(self, values, width, height):
        return [(v + 0.5) * (width, height)[i % 2] / 1000 for i, v in enumerate(values)]

    def box_text(self, values):
        return "".join(f"<loc_{v}>" for v in values)

    def mark(self, phrase, boxes):
        return phrase + "".join(self.box_text(b) for b in boxes)

    def caption_turn(self, caption, marked, refs):
        """Florence-2's own grounded-caption task: the caption in, its phrases with boxes out."""
        return self.caption_prompt + caption, "".join(self.mark(p, b) for p, b in refs)

    def refer_prompt(self, phrase):
        return f"<OPEN_VOCABULARY_DETECTION>{phrase}"

    def region_prompt(self, values):
        return f"<REGION_TO_DESCRIPTION>{self.box_text(values)}"

    def parse(self, text):
        refs = []
        for m in self._REF.finditer(text):
            values = _ints(m.group(2))
            refs.append(Ref(m.group(1).strip() or None, [values[i : i + 4] for i in range(0, len(values) - 3, 4)]))
        return re.sub(r"<loc_\d+>", "", text), refs


class Kosmos2(Dialect):
    """Kosmos-2: a box is the pair (top-left patch, bottom-right patch) of a 32x32 grid; the patches
    cover the box, so a read-back box contains the original and exceeds it by less than a patch."""

    name = "kosmos2"
    caption_prompt = "<grounding>Describe this image in detail:"
    BINS: ClassVar[int] = 32
    _REF = re.compile(r"(?:<phrase>(.*?)</phrase>)?<object>(.*?)</object>", re.DOTALL)

    def _bin(self, v: float, size: int) -> int:
        return min(self.BINS - 1, max(0, int(v / size * self.BINS)))

    def encode(self, box, width, height):
        x0, y0, x1, y1 = box
        return [
            self._bin(y0, height) * self.BINS + self._bin(x0, width),
            self._bin(y1 - 1e-6, height) * self.BINS + self._bin(x1 - 1e-6, width),
        ]

    def decode(self, values, width, height):
        (r0, c0), (r1, c1) = divmod(values[0], self.BINS), divmod(values[1], self.BINS)
        return [
            c0 * width / self.BINS,
            r0 * height / self.BINS,
            (c1 + 1) * width / self.BINS,
            (r1 + 1) * height / self.BINS,
        ]

    def unit(self, width, height):
        return 2 * width / self.BINS, 2 * height / self.BINS  # covering: off by up to one whole patch

    def box_text(self, values):
        return f"<patch_index_{values[0]:04d}><patch_index_{values[1]:04d}>"

    def mark(self, phrase, boxes):
        return (
            f"<phrase>{phrase}</phrase><object>"
            + "</delimiter_of_multi_objects/>".join(self.box_text(b) for b in boxes)
            + "</object>"
        )

    def refer_prompt(self, phrase):
        return f"<grounding><phrase>{phrase}</phrase>"

    def region_prompt(self, values):
        return f"<grounding><object>{self.box_text(values)}</object> is"

    def parse(self, text):
        pairs = re.compile(r"<patch_index_(\d{4})><patch_index_(\d{4})>")
        refs = [
            Ref(m.group(1), [[int(a), int(b)] for a, b in pairs.findall(m.group(2))]) for m in self._REF.finditer(text)
        ]
        plain = (
            re.sub(r"<object>.*?</object>", "", text, flags=re.DOTALL).replace("<phrase>", "").replace("</phrase>", "")
        )
        return plain, refs


class Placeholders(Dialect):
    """ms-swift's model-independent grounding: `<ref-object>` and `<bbox>` in the text, the phrases
    and original-pixel boxes in the record's `objects`; ms-swift writes them in the convention of
    the model chosen at training time, after its own resize, which only it knows."""

    name = "ms-swift"

    def encode(self, box, width, height):
        return [round(v, 2) for v in box]

    def decode(self, values, width, height):
        return [float(v) for v in values]

    def unit(self, width, height):
        return 0.01, 0.01

    def box_text(self, values):
        return "<bbox>"

    def mark(self, phrase, boxes):
        return "<ref-object>" + self.answer(phrase, boxes)

    def refer_prompt(self, phrase):
        return "Locate <ref-object> in the image."

    def answer(self, phrase, boxes):
        return "".join(self.box_text(b) for b in boxes)

    def parse(self, text):
        raise NotImplementedError("ms-swift text holds placeholders; read the boxes from the record's `objects`")


DIALECTS: dict[str, type[Dialect]] = {
    d.name: d for d in (QwenVL, Qwen2VL, Qwen25VL, Qwen3VL, InternVL, Llava15, Florence2, Kosmos2)
}


def dialect(name: str, min_pixels: int | None = None, max_pixels: int | None = None) -> Dialect:
    """The dialect called `name`; Qwen2.5-VL takes the processor's pixel bounds."""
    if name == Qwen25VL.name:
        defaults = Qwen25VL()
        return Qwen25VL(min_pixels=min_pixels or defaults.min_pixels, max_pixels=max_pixels or defaults.max_pixels)
    return DIALECTS[name]()
