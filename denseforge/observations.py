"""What experts observe, as the sample record stores it: boxes and the built-in observation kinds.

Boxes are absolute pixel `[x0, y0, x1, y1]` in the stored image. Both `experts/` (which emit
observations) and `stages/` (which merge, caption and ground them) build on this module.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

Box = list[float]


class _Record(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ObjectObservation(_Record):
    label: str
    score: float
    box: Box


class OcrObservation(_Record):
    text: str
    score: float
    box: Box
    polygon: list[list[float]] = Field(default_factory=list)


class TagObservation(_Record):
    label: str
    score: float


KNOWN_KINDS: dict[str, type[BaseModel]] = {"objects": ObjectObservation, "ocr": OcrObservation, "tags": TagObservation}


def clip_box(box: list[float], width: int, height: int) -> list[float] | None:
    """A box clipped to the image, or None when it is not finite or collapses to nothing."""
    if len(box) != 4 or not all(isinstance(v, (int, float)) and v == v and abs(v) != float("inf") for v in box):
        return None
    x0, y0, x1, y1 = box
    x0, x1 = sorted((min(max(x0, 0.0), width), min(max(x1, 0.0), width)))
    y0, y1 = sorted((min(max(y0, 0.0), height), min(max(y1, 0.0), height)))
    if x1 - x0 <= 0 or y1 - y0 <= 0:
        return None
    return [round(float(x0), 2), round(float(y0), 2), round(float(x1), 2), round(float(y1), 2)]
