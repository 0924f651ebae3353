"""Check an expert against the plugin contract in one line: `check_expert(MyExpert)`.

It runs `setup()` and calls the expert on real photos that ship with scikit-image (astronaut,
coffee, chelsea: a detector finds something in them, so its boxes really get checked) or on your
images, then checks: one result list per image, observations are dicts that serialise to JSON,
boxes are [x0, y0, x1, y1] inside the image with x0 <= x1 and y0 <= y1, known kinds match their
schema, scores are finite numbers, and a repeat call gives the same answer. It raises
ContractError listing every violation; otherwise it returns the observations, and its `summary`
says how many observations (and boxes) it actually checked.
"""

from __future__ import annotations

import json
import math
from typing import Any

from PIL import Image

from denseforge.errors import DenseforgeError
from denseforge.experts.base import Expert, ExpertInput, Resources
from denseforge.observations import KNOWN_KINDS


class ContractError(DenseforgeError):
    """An expert breaks the plugin contract; the message lists what."""


def sample_images() -> list[Image.Image]:
    """Real photos from scikit-image, at sizes a detector meets on the web."""
    from skimage import data

    photos = [Image.fromarray(getattr(data, name)()).convert("RGB") for name in ("astronaut", "coffee", "chelsea")]
    return [photos[0].resize((320, 320)), photos[1].resize((400, 266)), photos[2]]


class Checked(list):
    """The observations check_expert saw (one list per image), with what it checked."""

    def __init__(self, found: list[list[dict[str, Any]]], name: str):
        super().__init__(found)
        self.observations = sum(len(f) for f in found)
        self.boxes = sum(1 for f in found for obs in f if "box" in obs)
        self.summary = (
            f"check_expert({name}): {len(found)} images, {self.observations} observations checked "
            f"({self.boxes} with boxes)"
        )


def check_expert(
    expert: Expert | type[Expert],
    images: list[Image.Image] | None = None,
    observations: list[dict[str, list[dict[str, Any]]]] | None = None,
    deterministic: bool = True,
) -> Checked:
    """Raise ContractError unless the expert honours the contract; returns its observations (a
    list with `.summary`: how many observations and boxes were really checked — zero boxes from a
    detector means its boxes went unchecked)."""
    problems: list[str] = []
    instance = expert() if isinstance(expert, type) else expert
    cls = type(instance)
    for attr in ("name", "kind"):
        if not isinstance(getattr(cls, attr, None), str) or not getattr(cls, attr):
            problems.append(f"class attribute {attr!r} must be a non-empty string")
    if not isinstance(cls.default_resources, Resources):
        problems.append("default_resources must be a denseforge.experts.Resources")
    if problems:
        raise ContractError("; ".join(problems))
    images = images or sample_images()
    observations = observations or [{} for _ in images]
    batch = [
        ExpertInput(f"k{i}", im.convert("RGB"), obs)
        for i, (im, obs) in enumerate(zip(images, observations, strict=True))
    ]
    instance.setup()
    first = instance(batch)
    if not isinstance(first, list) or len(first) != len(batch):
        raise ContractError(
            f"{cls.name}: must return one list per image ({len(batch)}), got {type(first).__name__}"
            + (f" of length {len(first)}" if isinstance(first, list) else "")
        )
    schema = KNOWN_KINDS.get(cls.kind)
    for i, (item, found) in enumerate(zip(batch, first, strict=True)):
        w, h = item.image.size
        if not isinstance(found, list):
            problems.append(f"image {i}: result is {type(found).__name__}, not a list")
            continue
        for j, obs in enumerate(found):
            where = f"image {i} observation {j}"
            if not isinstance(obs, dict):
                problems.append(f"{where}: {type(obs).__name__}, not a dict")
                continue
            try:
                json.dumps(obs)
            except (TypeError, ValueError) as exc:
                problems.append(f"{where}: not JSON-serialisable ({exc})")
            if "score" in obs and not (isinstance(obs["score"], (int, float)) and math.isfinite(obs["score"])):
                problems.append(f"{where}: score {obs['score']!r} is not a finite number")
            if "box" in obs:
                box = obs["box"]
                if not (isinstance(box, list) and len(box) == 4 and all(isinstance(v, (int, float)) for v in box)):
                    problems.append(f"{where}: box {box!r} is not [x0, y0, x1, y1]")
                elif not (0 <= box[0] <= box[2] <= w and 0 <= box[1] <= box[3] <= h):
                    problems.append(f"{where}: box {box} is outside the {w}x{h} image or inverted")
            if schema is not None:
                missing = [f for f, spec in schema.model_fields.items() if spec.is_required() and f not in obs]
                if missing:
                    problems.append(f"{where}: {cls.kind} observations need {', '.join(missing)}")
    if deterministic and instance(batch) != first:
        problems.append("a repeat call on the same images gave different observations")
    if problems:
        raise ContractError(f"{cls.name}: " + "; ".join(problems))
    return Checked(first, cls.name)
