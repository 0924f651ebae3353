"""perceive: run an expert over samples with failure isolation, and merge detectors by IoU voting.

`run_isolated` calls an expert on a batch; a CUDA out-of-memory error splits the batch and
retries the halves, any other error falls back to one image at a time, so one bad image or one
expert failure costs that image's observation only (recorded as an error), never the batch.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from denseforge.experts.base import ExpertInput, clip_box
from denseforge.stages.sample import ObjectObservation, OcrObservation, TagObservation

KNOWN_KINDS = {"objects": ObjectObservation, "ocr": OcrObservation, "tags": TagObservation}

Outcome = tuple[list[dict[str, Any]] | None, str | None]


def is_out_of_memory(exc: BaseException) -> bool:
    name = type(exc).__name__
    return name == "OutOfMemoryError" or ("out of memory" in str(exc).lower() and "cuda" in str(exc).lower())


def run_isolated(call: Callable[[list[ExpertInput]], list[list[dict[str, Any]]]], batch: list[ExpertInput],
                 on_oom: Callable[[], None] | None = None) -> list[Outcome]:
    """(observations, None) or (None, error message) per image."""
    if not batch:
        return []
    try:
        result = call(batch)
        if not isinstance(result, list) or len(result) != len(batch):
            raise TypeError(f"returned {type(result).__name__} of length "
                            f"{len(result) if isinstance(result, list) else '?'} for {len(batch)} images")
        return [(obs, None) for obs in result]
    except Exception as exc:  # noqa: BLE001 - isolation is the point
        if len(batch) == 1:
            return [(None, f"{type(exc).__name__}: {exc}"[:500])]
        if is_out_of_memory(exc) and on_oom is not None:
            on_oom()
        half = len(batch) // 2
        return run_isolated(call, batch[:half], on_oom) + run_isolated(call, batch[half:], on_oom)


def sanitize(observations: Any, kind: str, width: int, height: int) -> list[dict[str, Any]]:
    """Validate one image's observations: known kinds against their schema, boxes clipped to the
    stored image, invalid entries dropped; unknown kinds must be JSON-like dicts."""
    if not isinstance(observations, list):
        raise TypeError(f"expected a list of observations, got {type(observations).__name__}")
    clean = []
    for obs in observations:
        if not isinstance(obs, dict):
            raise TypeError(f"an observation is a {type(obs).__name__}, expected a dict")
        obs = dict(obs)
        if "box" in obs:
            box = clip_box(list(obs["box"]), width, height)
            if box is None:
                continue
            obs["box"] = box
        if "score" in obs:
            score = float(obs["score"])
            if not math.isfinite(score):
                continue
            obs["score"] = score
        model = KNOWN_KINDS.get(kind)
        if model is not None:
            extra = {k: v for k, v in obs.items() if k not in model.model_fields}
            obs = {**model.model_validate({k: v for k, v in obs.items() if k in model.model_fields}).model_dump(), **extra}
        clean.append(obs)
    return clean


def iou(a: Sequence[float], b: Sequence[float]) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def merge_detections(per_expert: dict[str, list[dict[str, Any]]], iou_threshold: float = 0.65, min_votes: int = 1,
                     thresholds: dict[str, float] | None = None) -> list[dict[str, Any]]:
    """IoU voting across detectors (GranD): boxes of the same label from different experts that
    overlap by >= iou_threshold form one object; it is kept when at least `min_votes` experts
    agree. Each expert's boxes first pass its own score threshold. The kept box is the
    score-weighted mean; the score is the best one; `sources` names the agreeing experts."""
    thresholds = thresholds or {}
    boxes = [(name, obs) for name, found in sorted(per_expert.items()) for obs in found
             if obs.get("score", 1.0) >= thresholds.get(name, 0.0)]
    boxes.sort(key=lambda item: -item[1].get("score", 1.0))
    used = [False] * len(boxes)
    merged = []
    for i, (name, obs) in enumerate(boxes):
        if used[i]:
            continue
        used[i] = True
        group = [(name, obs)]
        for j in range(i + 1, len(boxes)):
            other_name, other = boxes[j]
            if (not used[j] and other["label"] == obs["label"] and other_name not in {g[0] for g in group}
                    and iou(obs["box"], other["box"]) >= iou_threshold):
                used[j] = True
                group.append((other_name, other))
        if len(group) < min_votes:
            continue
        weights = np.array([g[1].get("score", 1.0) for g in group]) + 1e-9
        box = (np.array([g[1]["box"] for g in group]) * weights[:, None]).sum(0) / weights.sum()
        merged.append({"label": obs["label"], "score": obs.get("score", 1.0),
                       "box": [round(float(v), 2) for v in box], "sources": sorted(g[0] for g in group)})
    return merged
