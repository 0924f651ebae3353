"""The sample record: one schema for every stage, serialised as `KEY.json` in the shards.

Boxes are absolute pixel `[x0, y0, x1, y1]` in the stored image. Fields filled by later stages
(experts, caption, grounding, regions, qa) stay empty until a stage that really fills them runs.
"""

from __future__ import annotations

import re
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from denseforge.observations import Box

_SAFE_KEY = re.compile(r"[^A-Za-z0-9_-]")


def safe_member_key(key: str) -> str:
    """A tar member stem that cannot escape the archive or split into extensions."""
    cleaned = _SAFE_KEY.sub("_", key)[:128]
    return cleaned or "_"


def make_key(unit: int, position: int) -> str:
    """Stable sample key from the input unit (shard) and position within it."""
    return f"{unit:07d}{position:05d}"


class _Record(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Grounding(_Record):
    phrase: str
    span: tuple[int, int]
    box: Box
    source: str


class Region(_Record):
    box: Box
    caption: str


class QualityReport(_Record):
    passed: bool = True
    scores: dict[str, float] = Field(default_factory=dict)
    reasons: list[str] = Field(default_factory=list)


class Sample(_Record):
    """One image and everything the pipeline learned about it."""

    key: str
    url: str | None = None
    alt_text: str | None = None
    width: int
    height: int
    original_width: int | None = None
    original_height: int | None = None
    sha256: str
    source: dict[str, Any] = Field(default_factory=dict, description="extra columns of the input row, carried verbatim")
    cluster: int | None = None
    experts: dict[str, list[dict[str, Any]]] = Field(default_factory=dict)
    errors: dict[str, str] = Field(default_factory=dict, description="expert instance -> why it has no output here")
    caption: str | None = None
    grounding: list[Grounding] = Field(default_factory=list)
    regions: list[Region] = Field(default_factory=list)
    qa: QualityReport | None = None
    provenance: dict[str, Any] = Field(default_factory=dict)


class Reject(_Record):
    """An input row that will not be written, with the stage and reason why."""

    key: str
    stage: str = Field(
        description="the phase or stage instance that rejected it (input, ingest, embed, an expert, ...)"
    )
    reason: str
    detail: str = ""
    url: str | None = None
