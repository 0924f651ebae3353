"""perceive: every configured expert as a stage, then the merge of their outputs.

`ExpertStage` wraps one expert instance (any plugin): it hands the expert the stored images and
what upstream experts saw, validates what comes back (known kinds against their schema, boxes
clipped to the image) and stages it under `kind@instance`. `MergeStage` merges the staged
outputs per kind, detectors by IoU voting (GranD). Experts form a small DAG of their own:
`plan_experts` orders them so every producer of a kind runs before its consumers.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
from pydantic import Field, model_validator

from denseforge.errors import ConfigError
from denseforge.experts.base import Expert, ExpertInput, clip_box
from denseforge.observations import KNOWN_KINDS
from denseforge.plugin import EXPERTS, PluginSpec, Settings, configure, load_plugin
from denseforge.stages.stage import Flow, Item, Resources, Stage, StageRun, Verdict, settings_fingerprint

STAGED = "@"  # staged outputs live under "kind@instance" until the merge stage


class ExpertSpec(PluginSpec):
    """One expert instance: a plugin, its options (checked against the plugin's own model), resources."""

    score_threshold: float = Field(0.0, ge=0, le=1, description="boxes below it are ignored when detectors merge")


class OcrGate(Settings):
    """Which OCR lines count as evidence. A recogniser reads something into many photos without
    text: a stray digit or glyph, scored low, or a short line over much of the image. Lines that
    fail are kept out of the sample (counted per reason in the merge stage's counters)."""

    min_score: float = Field(0.8, ge=0, le=1, description="a line scored below this is dropped")
    single_char_min_score: float = Field(
        0.95, ge=0, le=1, description="a line of one character (the commonest misread) needs at least this score"
    )
    short_max_area: float = Field(
        0.2,
        gt=0,
        le=1,
        description="a line of at most 3 characters whose box covers more than this share of the image is dropped",
    )

    def reason(self, line: dict[str, Any], width: int, height: int) -> str | None:
        """Why `line` is not evidence, or None when it is."""
        text = "".join(str(line.get("text", "")).split())
        score = float(line.get("score", 1.0))
        if not text:
            return "ocr_empty"
        if score < self.min_score:
            return "ocr_low_score"
        if len(text) == 1 and score < self.single_char_min_score:
            return "ocr_single_char"
        x0, y0, x1, y1 = line.get("box") or (0, 0, 0, 0)
        if len(text) <= 3 and (x1 - x0) * (y1 - y0) > self.short_max_area * width * height:
            return "ocr_implausible_box"
        return None


class PerceiveConfig(Settings):
    enabled: bool = False
    experts: list[ExpertSpec] = Field(default_factory=list)
    on_error: Literal["keep", "reject"] = Field(
        "keep", description="an expert failing on an image: keep the sample (error recorded) or reject it"
    )
    merge_iou: float = Field(0.65, gt=0, le=1, description="IoU at which boxes of several detectors agree")
    merge_min_votes: int = Field(1, ge=1, description="detectors that must agree on a box (GranD: 2)")
    ocr_gate: OcrGate = OcrGate()

    @model_validator(mode="after")
    def _unique_names(self) -> PerceiveConfig:
        names = [e.instance for e in self.experts]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"perceive.experts: instance names must be unique, repeated: {', '.join(dupes)}")
        if self.enabled and not self.experts:
            raise ValueError("perceive.enabled needs at least one entry in perceive.experts")
        return self


def load_expert_class(name: str) -> type[Expert]:
    return load_plugin(EXPERTS, name, Expert)


def build_expert(spec: ExpertSpec, where: str) -> tuple[Expert, Resources]:
    """Instantiate a configured expert (no model loaded); config errors name the key path."""
    cls = load_expert_class(spec.plugin)
    options, resources = configure(cls, spec, where)
    return cls(options), resources


PlannedExpert = tuple[ExpertSpec, Expert, Resources]


def plan_experts(cfg: PerceiveConfig) -> list[PlannedExpert]:
    """Validate every expert and order them so all producers of a kind run before its consumers,
    with the experts of a group next to each other (they run in one worker, one after another)."""
    built = [(spec, *build_expert(spec, f"perceive.experts[{i}]")) for i, spec in enumerate(cfg.experts)]
    producers: dict[str, set[str]] = {}
    for spec, expert, _ in built:
        producers.setdefault(expert.kind, set()).add(spec.instance)
    for spec, expert, _ in built:
        missing = [k for k in expert.consumes if k not in producers]
        if missing:
            raise ConfigError(
                f"perceive.experts: {spec.instance} consumes {', '.join(missing)}, which no configured expert produces"
            )
    workers: dict[str, list[PlannedExpert]] = {}
    for b in built:
        workers.setdefault(f"group {b[0].group}" if b[0].group else b[0].instance, []).append(b)
    ordered: list[PlannedExpert] = []
    done: set[str] = set()
    for members in _layered(list(workers.values()), producers, done):
        ordered += [b for (b,) in _layered([[b] for b in members], producers, done)]
        done |= {spec.instance for spec, _, _ in members}
    return ordered


def _layered(
    nodes: list[list[PlannedExpert]], producers: dict[str, set[str]], done: set[str]
) -> list[list[PlannedExpert]]:
    """`nodes` (experts that run together) in order: each after every expert it consumes from,
    `done` counting as placed; config order among those that are ready together."""
    placed, out, pending = set(done), [], list(nodes)
    while pending:
        ready = [m for m in pending if _needs(m, producers) <= placed | {spec.instance for spec, _, _ in m}]
        if not ready:
            raise ConfigError(
                "perceive.experts: circular consumes between "
                + ", ".join(spec.instance for m in pending for spec, _, _ in m)
            )
        for members in ready:
            out.append(members)
            placed |= {spec.instance for spec, _, _ in members}
            pending.remove(members)
    return out


def _needs(members: list[PlannedExpert], producers: dict[str, set[str]]) -> set[str]:
    """The expert instances whose output these experts consume (themselves excepted)."""
    return {p for spec, expert, _ in members for k in expert.consumes for p in producers[k] - {spec.instance}}


def observations_by_kind(experts: dict[str, list[dict[str, Any]]]) -> dict[str, list[dict[str, Any]]]:
    """What upstream experts saw so far, staged outputs folded into their kind."""
    out: dict[str, list[dict[str, Any]]] = {}
    for key, found in experts.items():
        out.setdefault(key.split(STAGED, 1)[0], []).extend(found)
    return out


class ExpertStage(Stage):
    """One expert instance as a stage: its model loads in `setup()`, once per worker."""

    error_reason = "expert_error"
    cached = True

    def __init__(self, expert: Expert, instance: str, resources: Resources | None = None):
        super().__init__()
        self.expert, self.instance = expert, instance
        self.expert.resources = resources or type(expert).default_resources  # what its setup() may size threads by
        self.staged = f"{expert.kind}{STAGED}{instance}"

    @property
    def name(self) -> str:  # type: ignore[override]
        return self.instance

    @classmethod
    def plan(cls, flow: Flow) -> list[StageRun]:
        """One run per configured expert, producers before consumers; hands on the experts whose
        kind the captioner's prompt needs rendered, and those with random weights."""
        cfg = flow.config.perceive
        if not cfg.enabled:
            return []
        planned = plan_experts(cfg)
        flow.handed_on["renderers"] = {e.kind: e for _, e, _ in planned if e.kind not in KNOWN_KINDS}
        flow.handed_on["untrained"] = frozenset(spec.instance for spec, e, _ in planned if e.untrained())
        return [
            StageRun(
                cls(expert, spec.instance, resources),
                spec.instance,
                resources,
                on_error=cfg.on_error,
                max_error_rate=spec.max_error_rate,
                group=spec.group,
            )
            for spec, expert, resources in planned
        ]

    def fingerprint(self) -> str:
        cls = type(self.expert)
        return f"{cls.__module__}.{cls.__qualname__}:{settings_fingerprint(self.expert.options)}"

    def cache_input(self, item: Item) -> Any:
        """An expert sees the image and the kinds it consumes, nothing else of the record."""
        seen = observations_by_kind(item.sample.experts)
        return {"image": item.sample.sha256, "seen": {kind: seen.get(kind, []) for kind in self.expert.consumes}}

    def setup(self) -> None:
        self.expert.setup()
        self.expert_provenance = self.expert.provenance()

    def process(self, batch: list[Item]) -> list[Verdict]:
        inputs = [ExpertInput(item.key, item.image, observations_by_kind(item.sample.experts)) for item in batch]
        found = self.expert(inputs)
        if not isinstance(found, list) or len(found) != len(batch):
            raise TypeError(
                f"expert {self.instance} returned {type(found).__name__} of length "
                f"{len(found) if isinstance(found, list) else '?'} for {len(batch)} images"
            )
        verdicts: list[Verdict] = []
        for item, observations in zip(batch, found, strict=True):
            try:
                clean = sanitize(observations, self.expert.kind, *item.image.size, item.counts)
            except (TypeError, ValueError) as exc:
                verdicts.append(TypeError(f"invalid output: {exc}"))
                continue
            item.sample.experts[self.staged] = clean
            item.sample.provenance.setdefault("experts", {})[self.instance] = self.expert_provenance
            verdicts.append(None)
        return verdicts


class MergeStage(Stage[PerceiveConfig]):
    """Merge staged outputs per kind: detectors by IoU voting, the rest concatenated (tagged with
    their source when several experts share a kind); per-expert score thresholds apply, and OCR
    lines pass `ocr_gate`. Experts
    with random weights (`untrained`) fed their consumers already; here their observations are
    left out of the sample's evidence, and its provenance says how many."""

    name = "merge"
    Options = PerceiveConfig

    def __init__(self, options: PerceiveConfig, untrained: frozenset[str] = frozenset()):
        super().__init__(options)
        self.untrained = untrained

    @classmethod
    def plan(cls, flow: Flow) -> list[StageRun]:
        cfg = flow.config.perceive
        return [StageRun.light(cls(cfg, flow.handed_on.get("untrained", frozenset())))] if cfg.enabled else []

    def process(self, batch: list[Item]) -> list[Verdict]:
        thresholds = {e.instance: e.score_threshold for e in self.options.experts}
        for item in batch:
            by_kind: dict[str, dict[str, list[dict[str, Any]]]] = {}
            for key, found in item.sample.experts.items():
                kind, _, instance = key.partition(STAGED)
                if instance in self.untrained:
                    note = item.sample.provenance.setdefault("experts", {}).setdefault(instance, {})
                    note["excluded"] = f"random weights: {len(found)} observation(s) kept out of the evidence"
                    by_kind.setdefault(kind, {})
                    continue
                by_kind.setdefault(kind, {})[instance or kind] = found
            merged: dict[str, list[dict[str, Any]]] = {}
            for kind, per_instance in by_kind.items():
                if not per_instance:
                    continue
                if kind == "objects" and len(per_instance) > 1:
                    merged[kind] = merge_detections(
                        per_instance, self.options.merge_iou, self.options.merge_min_votes, thresholds
                    )
                else:
                    merged[kind] = [
                        {**obs, "source": name} if len(per_instance) > 1 else obs
                        for name, found in sorted(per_instance.items())
                        for obs in found
                        if obs.get("score", 1.0) >= thresholds.get(name, 0.0)
                    ]
            if "ocr" in merged:
                merged["ocr"] = self.gate_ocr(item, merged["ocr"])
            item.sample.experts = merged
        return [None] * len(batch)

    def gate_ocr(self, item: Item, lines: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The lines that pass `ocr_gate`; the others counted by reason in the item's counters."""
        kept = []
        for line in lines:
            why = self.options.ocr_gate.reason(line, item.sample.width, item.sample.height)
            if why is None:
                kept.append(line)
            else:
                item.counts[why] = item.counts.get(why, 0) + 1
        return kept


def sanitize(
    observations: Any, kind: str, width: int, height: int, counts: dict[str, int] | None = None
) -> list[dict[str, Any]]:
    """Validate one image's observations: known kinds against their schema, boxes clipped to the
    stored image, invalid entries dropped; unknown kinds must be JSON-like dicts. Clipped and
    dropped boxes are counted in `counts` (they show per expert in stats.json)."""
    if not isinstance(observations, list):
        raise TypeError(f"expected a list of observations, got {type(observations).__name__}")
    counts = {} if counts is None else counts
    clean = []
    for obs in observations:
        if not isinstance(obs, dict):
            raise TypeError(f"an observation is a {type(obs).__name__}, expected a dict")
        obs = dict(obs)
        if "box" in obs:
            box = clip_box(list(obs["box"]), width, height)
            if box is None:
                counts["boxes_dropped"] = counts.get("boxes_dropped", 0) + 1
                continue
            if box != [round(float(v), 2) for v in obs["box"]]:
                counts["boxes_clipped"] = counts.get("boxes_clipped", 0) + 1
            obs["box"] = box
        if "score" in obs:
            score = float(obs["score"])
            if not math.isfinite(score):
                counts["dropped_nonfinite_score"] = counts.get("dropped_nonfinite_score", 0) + 1
                continue
            obs["score"] = score
        model = KNOWN_KINDS.get(kind)
        if model is not None:
            extra = {k: v for k, v in obs.items() if k not in model.model_fields}
            obs = {
                **model.model_validate({k: v for k, v in obs.items() if k in model.model_fields}).model_dump(),
                **extra,
            }
        clean.append(obs)
    return clean


def iou(a: Sequence[float], b: Sequence[float]) -> float:
    ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = ix * iy
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


def merge_detections(
    per_expert: dict[str, list[dict[str, Any]]],
    iou_threshold: float = 0.65,
    min_votes: int = 1,
    thresholds: dict[str, float] | None = None,
) -> list[dict[str, Any]]:
    """IoU voting across detectors (GranD): boxes of the same label from different experts that
    overlap by >= iou_threshold form one object; it is kept when at least `min_votes` experts
    agree. Each expert's boxes first pass its own score threshold. The kept box is the
    score-weighted mean; the score is the best one; `sources` names the agreeing experts."""
    thresholds = thresholds or {}
    boxes = [
        (name, obs)
        for name, found in sorted(per_expert.items())
        for obs in found
        if obs.get("score", 1.0) >= thresholds.get(name, 0.0)
    ]
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
            if (
                not used[j]
                and other["label"] == obs["label"]
                and other_name not in {g[0] for g in group}
                and iou(obs["box"], other["box"]) >= iou_threshold
            ):
                used[j] = True
                group.append((other_name, other))
        if len(group) < min_votes:
            continue
        weights = np.array([g[1].get("score", 1.0) for g in group]) + 1e-9
        box = (np.array([g[1]["box"] for g in group]) * weights[:, None]).sum(0) / weights.sum()
        merged.append(
            {
                "label": obs["label"],
                "score": obs.get("score", 1.0),
                "box": [round(float(v), 2) for v in box],
                "sources": sorted(g[0] for g in group),
            }
        )
    return merged
