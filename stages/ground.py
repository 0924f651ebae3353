"""ground: tie caption phrases to expert boxes (character spans <-> boxes).

Mentions of detected labels are found case- and plural-aware; a plural or counted mention ties
to every box of that label, a singular one to the next box not yet tied (largest first). OCR
lines found verbatim in the caption tie to their text boxes. The box-reference mode parses
`<ref id=N>phrase</ref>` markup a model was asked to write, strips it, and survives malformed
markup. Every entry satisfies `caption[span[0]:span[1]] == phrase`.
"""

from __future__ import annotations

import re
from typing import Any

from denseforge.stages.sample import Grounding

IRREGULAR = {"person": "people", "man": "men", "woman": "women", "child": "children", "mouse": "mice",
             "knife": "knives", "sheep": "sheep", "fish": "fish", "bus": "buses", "glass": "glasses",
             "skis": "skis", "scissors": "scissors", "tv": "tvs"}


def plural(noun: str) -> str:
    """English plural of the last word of a label ("wine glass" -> "wine glasses")."""
    head, _, last = noun.rpartition(" ")
    if last in IRREGULAR:
        word = IRREGULAR[last]
    elif re.search(r"(s|x|z|ch|sh)$", last):
        word = last + "es"
    elif re.search(r"[^aeiou]y$", last):
        word = last[:-1] + "ies"
    else:
        word = last + "s"
    return f"{head} {word}" if head else word


def _area(box: list[float]) -> float:
    return (box[2] - box[0]) * (box[3] - box[1])


def ground_mentions(caption: str, experts: dict[str, list[dict[str, Any]]]) -> list[Grounding]:
    """Spans of object labels and OCR strings in the caption, tied to their boxes."""
    out: list[Grounding] = []
    by_label: dict[str, list[int]] = {}
    objects = experts.get("objects", [])
    for i, obj in enumerate(objects):
        by_label.setdefault(obj["label"].lower(), []).append(i)
    for label, indices in sorted(by_label.items()):
        indices.sort(key=lambda i: -_area(objects[i]["box"]))
        many = plural(label)
        pattern = re.compile(rf"\b({re.escape(many)}|{re.escape(label)})\b", re.IGNORECASE)
        next_box = 0
        for match in pattern.finditer(caption):
            is_plural = match.group(1).lower() == many.lower() and many.lower() != label.lower()
            chosen = indices if is_plural else [indices[next_box % len(indices)]]
            next_box += 0 if is_plural else 1
            for i in chosen:
                out.append(Grounding(phrase=match.group(1), span=(match.start(1), match.end(1)),
                                     box=objects[i]["box"], source=f"objects/{i}"))
    lowered = caption.lower()
    for i, line in enumerate(experts.get("ocr", [])):
        text = line.get("text", "").strip()
        if len(text) < 2:
            continue
        start = caption.find(text)
        if start < 0:
            start = lowered.find(text.lower())
        if start >= 0:
            out.append(Grounding(phrase=caption[start:start + len(text)], span=(start, start + len(text)),
                                 box=line["box"], source=f"ocr/{i}"))
    return sorted(out, key=lambda g: (g.span, g.source))


_REF = re.compile(r"<ref\s+id\s*=\s*[\"']?(\d+)[\"']?\s*>(.*?)</ref>", re.IGNORECASE | re.DOTALL)
_STRAY = re.compile(r"</?ref\b(?:[^<>]*>)?", re.IGNORECASE)


def parse_ref_markup(text: str, objects: list[dict[str, Any]]) -> tuple[str, list[Grounding]]:
    """Strip `<ref id=N>phrase</ref>` markup; return the clean caption and the phrase->box ties.
    Unknown ids keep their phrase without a box; unclosed or stray tags are dropped."""
    clean, groundings, cursor = [], [], 0
    length = 0
    for match in _REF.finditer(text):
        before = _STRAY.sub("", text[cursor:match.start()])
        clean.append(before)
        length += len(before)
        phrase = _STRAY.sub("", match.group(2))
        index = int(match.group(1))
        if phrase and 0 <= index < len(objects):
            groundings.append(Grounding(phrase=phrase, span=(length, length + len(phrase)),
                                        box=objects[index]["box"], source=f"objects/{index}"))
        clean.append(phrase)
        length += len(phrase)
        cursor = match.end()
    clean.append(_STRAY.sub("", text[cursor:]))
    return "".join(clean), groundings
