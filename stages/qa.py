"""qa: score a caption against the evidence; each filter writes a score and, failing, a reason.

Filters: word count range, repetition (share of repeated word 3-grams), hallucination (share of
object nouns from a vocabulary that the caption names but no expert saw), OCR fidelity (share of
confident OCR lines reproduced), box validity (grounding spans and boxes consistent), CLIP
image-text score (long captions in chunks), and the captioner's own truncation flag.
"""

from __future__ import annotations

import json
import re
from functools import lru_cache
from typing import Any

from pydantic import Field

from denseforge.models import ClipModel, load_clip, pick_device
from denseforge.plugin import Settings
from denseforge.stages.ground import plural
from denseforge.stages.sample import QualityReport, Sample
from denseforge.stages.stage import Flow, Item, Rejection, Resources, Stage, StageRun, Verdict

_WORD = re.compile(r"[A-Za-z][A-Za-z'-]*")


class QaConfig(Settings):
    """The quality gate; a failing sample becomes a reject row with its first reason."""

    enabled: bool = True
    min_words: int = Field(5, ge=0)
    max_words: int = Field(400, ge=1)
    max_repetition: float = Field(0.3, ge=0, le=1)
    max_hallucination: float = Field(0.5, ge=0, le=1)
    min_ocr_fidelity: float = Field(0.5, ge=0, le=1)
    ocr_min_score: float = Field(0.8, ge=0, le=1)
    vocabulary: str = Field("builtin:objects", description="nouns the hallucination check looks for")
    clip: ClipModel | None = Field(None, description="open_clip model for the image-text score; null: no score")
    min_clip_score: float | None = Field(None, ge=-1, le=1, description="reject below this CLIP cosine")
    clip_num_gpus: float = Field(0.0, ge=0)
    max_error_rate: float | None = Field(
        0.05, ge=0, le=1, description="share of samples qa may fail on; null: no limit"
    )


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
    grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
    return 0.0 if not grams else 1.0 - len(set(grams)) / len(grams)


def mentioned_nouns(caption: str, forms: dict[str, str]) -> set[str]:
    lowered = " " + re.sub(r"[^a-z0-9' -]", " ", caption.lower()) + " "
    return {singular for form, singular in forms.items() if f" {form} " in lowered}


def assess(
    sample: Sample, settings: QaConfig, truncated: bool = False, clip_score: float | None = None
) -> QualityReport:
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
    # synonyms the ground stage matched ("puppy" -> dog) claim their labels too
    claimed |= set(sample.provenance.get("ground", {}).get("claims", []))
    unsupported = claimed - seen
    scores["hallucination"] = round(len(unsupported) / len(claimed), 4) if claimed else 0.0
    if scores["hallucination"] > settings.max_hallucination:
        reasons.append("hallucination")
    confident = [
        o["text"]
        for o in sample.experts.get("ocr", [])
        if o.get("score", 1.0) >= settings.ocr_min_score and len(o.get("text", "").strip()) >= 2
    ]
    if confident:
        # spaces do not count: PP-OCR recognisers may drop them (PP-OCRv4 read OPEN 24 HOURS as "OPEN24HOURS")
        squeezed = "".join(caption.lower().split())
        found = sum(1 for t in confident if "".join(t.lower().split()) in squeezed)
        scores["ocr_fidelity"] = round(found / len(confident), 4)
        if scores["ocr_fidelity"] < settings.min_ocr_fidelity:
            reasons.append("ocr_missing")
    valid = [
        g
        for g in sample.grounding
        if caption[g.span[0] : g.span[1]] == g.phrase
        and 0 <= g.box[0] <= g.box[2] <= sample.width
        and 0 <= g.box[1] <= g.box[3] <= sample.height
    ]
    scores["box_validity"] = round(len(valid) / len(sample.grounding), 4) if sample.grounding else 1.0
    if scores["box_validity"] < 1.0:
        reasons.append("invalid_boxes")
    if clip_score is not None:
        scores["clip"] = clip_score
        if settings.min_clip_score is not None and clip_score < settings.min_clip_score:
            reasons.append("low_clip_score")
    if truncated:
        reasons.append("truncated_caption")
    return QualityReport(passed=not reasons, scores=scores, reasons=reasons)


class QaStage(Stage[QaConfig]):
    """Scores every captioned sample (with the CLIP score and truncation flag earlier stages left
    in its provenance) and rejects those that fail, with their first reason."""

    name = "qa"
    Options = QaConfig

    @classmethod
    def plan(cls, flow: Flow) -> list[StageRun]:
        qa = flow.config.qa
        return [StageRun.light(cls(qa), qa.max_error_rate)] if flow.config.fuse.enabled and qa.enabled else []

    def process(self, batch: list[Item]) -> list[Verdict]:
        verdicts: list[Verdict] = []
        for item in batch:
            sample = item.sample
            clip = sample.provenance.get("qa", {}).get("clip", {}).get("score")
            truncated = sample.provenance.get("captioner", {}).get("truncated", False)
            sample.qa = assess(sample, self.options, truncated=truncated, clip_score=clip)
            verdicts.append(
                None
                if sample.qa.passed
                else Rejection(
                    sample.qa.reasons[0], json.dumps({"reasons": sample.qa.reasons, "scores": sample.qa.scores})
                )
            )
        return verdicts


class ClipScoreStage(Stage[ClipModel]):
    """CLIP image-text agreement for long captions: sentences are packed into chunks that fit the
    text tower's context, and the score is the mean cosine between the image and each chunk. The
    score waits in the sample's provenance for the qa stage."""

    name = "clip-score"
    Options = ClipModel
    default_resources = Resources(num_cpus=0.25, batch_size=16, concurrency=1)
    cached = True

    def cache_input(self, item: Item) -> Any:
        """The score reads the image and the caption only."""
        return {"image": item.sample.sha256, "caption": item.sample.caption}

    @classmethod
    def plan(cls, flow: Flow) -> list[StageRun]:
        """Before qa, when qa has a CLIP model to score with."""
        qa = flow.config.qa
        if not (flow.config.fuse.enabled and qa.enabled and qa.clip is not None):
            return []
        resources = cls.default_resources.model_copy(update={"num_gpus": qa.clip_num_gpus})
        return [StageRun(cls(qa.clip), cls.name, resources, max_error_rate=qa.max_error_rate)]

    def setup(self) -> None:
        import open_clip

        self.device = pick_device(self.options.device)
        self.model, self.preprocess, self.provenance = load_clip(self.options, self.device)
        self.tokenizer = open_clip.get_tokenizer(self.options.model)
        self.context = getattr(self.tokenizer, "context_length", 77)

    def process(self, batch: list[Item]) -> list[Verdict]:
        for item, score in zip(
            batch,
            self.scores([item.image for item in batch], [item.sample.caption or "" for item in batch]),
            strict=True,
        ):
            item.sample.provenance.setdefault("qa", {})["clip"] = {"score": score, **self.provenance}
        return [None] * len(batch)

    def chunks(self, caption: str) -> list[str]:
        """Sentences packed greedily into pieces of at most context - 2 tokens (long ones cut)."""
        sentences = [s.strip() for s in re.split(r"(?<=[.!?])\s+", caption) if s.strip()]
        out: list[str] = []
        current = ""
        for sentence in sentences:
            candidate = f"{current} {sentence}".strip()
            if current and self._tokens(candidate) > self.context - 2:
                out.append(current)
                candidate = sentence
            current = candidate
        if current:
            out.append(current)
        return out

    def _tokens(self, text: str) -> int:
        return int((self.tokenizer([text])[0] != 0).sum())

    def scores(self, images, captions: list[str]) -> list[float]:
        """Mean chunk cosine per (PIL image, caption)."""
        import torch

        scores = []
        with torch.inference_mode():
            for image, caption in zip(images, captions, strict=True):
                pieces = self.chunks(caption) or [""]
                pixels = self.preprocess(image)[None].to(self.device)
                img = torch.nn.functional.normalize(self.model.encode_image(pixels).float(), dim=-1)
                txt = torch.nn.functional.normalize(
                    self.model.encode_text(self.tokenizer(pieces).to(self.device)).float(), dim=-1
                )
                scores.append(round(float((txt @ img.T).mean()), 4))
        return scores
