"""The Expert contract: what a vision expert declares and how it is called.

An expert is a class with a name, the kind of observation it emits (the key under
`sample.experts`), its resources, and an `Options` pydantic model for its configuration.
`setup()` loads the model once per actor; calling the expert on a batch returns one list of
observation dicts per image. Experts that read other experts' output list those kinds in
`consumes`; the pipeline runs them after their producers, image by image. `render` says how the
observations of a plugin kind read in the captioner's prompt.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar, Generic

from PIL import Image
from pydantic import BaseModel

from denseforge.observations import clip_box
from denseforge.plugin import NoOptions, OptionsT, Resources, validated_options

__all__ = ["Expert", "ExpertInput", "NoOptions", "Resources", "clip_box", "render_json"]


@dataclass
class ExpertInput:
    """One image as an expert sees it: the stored RGB image and what upstream experts saw."""

    key: str
    image: Image.Image
    observations: dict[str, list[dict[str, Any]]] = field(default_factory=dict)


class Expert(ABC, Generic[OptionsT]):
    """Base class of every expert; subclass it and register it under `denseforge.experts`;
    `Expert[ItsOptions]` types `self.options`."""

    name: ClassVar[str]
    kind: ClassVar[str]
    consumes: ClassVar[tuple[str, ...]] = ()  # kinds read from upstream experts; a property where options decide
    default_resources: ClassVar[Resources] = Resources()
    Options: ClassVar[type[BaseModel]] = NoOptions

    def __init__(self, options: BaseModel | dict[str, Any] | None = None):
        self.options: OptionsT = validated_options(self.Options, options)
        self.resources = self.default_resources  # the configured ones once the pipeline runs it

    def setup(self) -> None:
        """Load the model; called once per actor before the first batch."""

    @abstractmethod
    def __call__(self, batch: list[ExpertInput]) -> list[list[dict[str, Any]]]:
        """One list of observations per input image, in order."""

    def provenance(self) -> dict[str, Any]:
        """What produced the observations (plugin, model, weights), for the sample's provenance."""
        return {"plugin": self.name}

    def untrained(self) -> bool:
        """True when the model has random weights (plumbing tests, the demo): its observations may
        feed other experts but never a caption, grounding or the quality gate."""
        return False

    def render(self, observations: list[dict[str, Any]], width: int, height: int) -> str:
        """How a plugin kind's observations read in the captioner's prompt (one JSON object per
        line by default). Built-in kinds (objects, ocr, tags) have their own prompt sections."""
        return render_json(observations)


def render_json(observations: list[dict[str, Any]]) -> str:
    """Observations as quoted JSON lines (at most 300 characters each): data, never instructions."""
    return "\n".join(
        json.dumps(json.dumps(o, ensure_ascii=False, sort_keys=True), ensure_ascii=False)[:300] for o in observations
    )
