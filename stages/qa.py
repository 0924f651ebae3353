"""qa: score a caption against the evidence; each filter writes a score and, failing, a reason.

Filters: word count range, repetition (share of repeated word 3-grams), hallucination (share of
object nouns from a vocabulary that the caption names but no expert saw), OCR fidelity (share of
confident OCR lines reproduced), box validity (grounding spans and boxes consistent), and the
captioner's own truncation flag.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache

from denseforge.stages.ground import plural
from denseforge.stages.sample import QualityReport, Sample

_WORD = re.compile(r"[A-Za-z][A-Za-z'-]*")


@dataclass(frozen=True)
class QaSettings:
    min_words: int = 5
    max_words: int = 400
    max_repetition: float = 0.3
    max_hallucination: float = 0.5
    min_ocr_fidelity: float = 0.5
    ocr_min_score: float = 0.8
    vocabulary: str = "builtin:objects"


@lru_cache(maxsize=8)
def noun_forms(vocabulary: str) -> dict[str, str]:
    """Every singular and plural form of the vocabulary's nouns -> the singular."""
    from denseforge.experts.clip_tags import read_vocabulary

    forms = {}
    for noun in read_vocabulary(vocabulary):
        forms[noun.lower()] = noun.lower()
        forms[plural(noun).lower()] = noun.lower()
    return forms


def repetition(words: list[str], n: int = 3) -> float:
    grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
    return 0.0 if not grams else 1.0 - len(set(grams)) / len(grams)


def mentioned_nouns(caption: str, forms: dict[str, str]) -> set[str]:
    lowered = " " + re.sub(r"[^a-z0-9' -]", " ", caption.lower()) + " "
    return {singular for form, singular in forms.items() if f" {form} " in lowered}


def assess(sample: Sample, settings: QaSettings, truncated: bool = False) -> QualityReport:
    """Scores and failure reasons for one captioned sample."""
    caption = sample.caption or ""
    words = [w.lower() for w in _WORD.findall(caption)]
    scores: dict[str, float] = {"words": float(len(words)), "repetition": round(repetition(words), 4)}
    reasons = []
    if len(words) < settings.min_words:
        reasons.append("too_short")
    if len(words) > settings.max_words:
        reasons.append("too_long")
    if scores["repetition"] > settings.max_repetition:
        reasons.append("repetitive")
    forms = noun_forms(settings.vocabulary)
    claimed = mentioned_nouns(caption, forms)
    seen = set()
    for kind in ("objects", "tags"):
        for obs in sample.experts.get(kind, []):
            seen |= mentioned_nouns(obs.get("label", ""), forms)
    for line in sample.experts.get("ocr", []):
        seen |= mentioned_nouns(line.get("text", ""), forms)
    unsupported = claimed - seen
    scores["hallucination"] = round(len(unsupported) / len(claimed), 4) if claimed else 0.0
    if scores["hallucination"] > settings.max_hallucination:
        reasons.append("hallucination")
    confident = [o["text"] for o in sample.experts.get("ocr", []) if o.get("score", 1.0) >= settings.ocr_min_score
                 and len(o.get("text", "").strip()) >= 2]
    if confident:
        found = sum(1 for t in confident if t.lower() in caption.lower())
        scores["ocr_fidelity"] = round(found / len(confident), 4)
        if scores["ocr_fidelity"] < settings.min_ocr_fidelity:
            reasons.append("ocr_missing")
    valid = [g for g in sample.grounding if caption[g.span[0]:g.span[1]] == g.phrase
             and 0 <= g.box[0] <= g.box[2] <= sample.width and 0 <= g.box[1] <= g.box[3] <= sample.height]
    scores["box_validity"] = round(len(valid) / len(sample.grounding), 4) if sample.grounding else 1.0
    if scores["box_validity"] < 1.0:
        reasons.append("invalid_boxes")
    if truncated:
        reasons.append("truncated_caption")
    return QualityReport(passed=not reasons, scores=scores, reasons=reasons)
