"""The perceive stage on Ray: one actor pool per expert instance, chained in dependency order.

Ray Data streams units through the pools, so different experts work on different units at the
same time while each image still meets its experts in dependency order (a tag-queried detector
after the tagger). Each pool declares its own GPUs/CPUs; the model loads once per actor, in the
actor, which also decides CPU or GPU. The last step merges detectors by IoU voting and applies
the error policy.
"""

from __future__ import annotations

import io
from typing import Any

import pyarrow as pa
from PIL import Image
from pydantic import ValidationError

from denseforge.errors import ConfigError
from denseforge.experts.base import Expert, ExpertInput, Resources
from denseforge.experts.registry import load_expert_class
from denseforge.pipeline.config import Config, ExpertSpec, PerceiveConfig
from denseforge.pipeline.ray_session import LIGHT_TASK_CPUS
from denseforge.stages.perceive import merge_detections, run_isolated, sanitize
from denseforge.stages.sample import Reject, Sample

STAGED = "@"  # staged outputs live under "kind@instance" until the merge step


def build_expert(spec: ExpertSpec, where: str) -> tuple[Expert, Resources]:
    """Instantiate a configured expert (no model loaded); config errors name the key path."""
    cls = load_expert_class(spec.plugin)
    try:
        options = cls.Options.model_validate(spec.options)
    except ValidationError as err:
        first = err.errors()[0]
        path = ".".join(str(p) for p in first["loc"])
        raise ConfigError(f"{where}.options.{path}: {first['msg']} (plugin {spec.plugin!r})") from None
    try:
        resources = Resources.model_validate({**cls.default_resources.model_dump(), **spec.resources})
    except ValidationError as err:
        first = err.errors()[0]
        raise ConfigError(f"{where}.resources.{'.'.join(map(str, first['loc']))}: {first['msg']}") from None
    return cls(options), resources


def plan_experts(cfg: PerceiveConfig) -> list[tuple[ExpertSpec, Expert, Resources]]:
    """Validate every expert and order them so all producers of a kind run before its consumers."""
    built = [(spec, *build_expert(spec, f"perceive.experts[{i}]")) for i, spec in enumerate(cfg.experts)]
    producers: dict[str, set[str]] = {}
    for spec, expert, _ in built:
        producers.setdefault(expert.kind, set()).add(spec.instance)
    for spec, expert, _ in built:
        missing = [k for k in expert.needs if k not in producers]
        if missing:
            raise ConfigError(f"perceive.experts: {spec.instance} needs {', '.join(missing)}, "
                              "which no configured expert produces")
    ordered: list[tuple[ExpertSpec, Expert, Resources]] = []
    done: set[str] = set()
    pending = list(built)
    while pending:
        ready = [b for b in pending if all(producers[k] - {b[0].instance} <= done for k in b[1].needs)]
        if not ready:
            raise ConfigError("perceive.experts: circular needs between " + ", ".join(b[0].instance for b in pending))
        for b in ready:
            ordered.append(b)
            done.add(b[0].instance)
            pending.remove(b)
    return ordered


def _observations_by_kind(sample: Sample) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {}
    for key, found in sample.experts.items():
        out.setdefault(key.split(STAGED, 1)[0], []).extend(found)
    return out


class ExpertStage:
    """Ray Data actor for one expert instance: loads the model once, annotates every sample."""

    def __init__(self, spec: ExpertSpec):
        self.spec = spec
        self.expert, self.resources = build_expert(spec, spec.instance)
        self.expert.setup()
        self.provenance = self.expert.provenance()
        self.batch_size = self.resources.batch_size

    def _shrink(self) -> None:
        self.batch_size = max(1, self.batch_size // 2)
        try:
            import torch

            torch.cuda.empty_cache()
        except Exception:  # noqa: BLE001 - no torch / no CUDA: nothing to free
            pass

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        live = [i for i, r in enumerate(rows) if r["sample"]]
        samples = {i: Sample.model_validate_json(rows[i]["sample"]) for i in live}
        staged = f"{self.expert.kind}{STAGED}{self.spec.instance}"
        start = 0
        while start < len(live):
            chunk = live[start:start + self.batch_size]
            start += len(chunk)
            inputs = []
            for i in chunk:
                image = Image.open(io.BytesIO(rows[i]["image"])).convert("RGB")
                inputs.append(ExpertInput(rows[i]["key"], image, _observations_by_kind(samples[i])))
            for i, item, (found, error) in zip(chunk, inputs, run_isolated(self.expert, inputs, self._shrink)):
                sample = samples[i]
                if error is None:
                    try:
                        sample.experts[staged] = sanitize(found, self.expert.kind, *item.image.size)
                    except (TypeError, ValueError) as exc:
                        error = f"invalid output: {exc}"[:500]
                if error is not None:
                    sample.errors[self.spec.instance] = error
                sample.provenance.setdefault("experts", {})[self.spec.instance] = self.provenance
                rows[i]["sample"] = sample.model_dump_json()
        return pa.Table.from_pylist(rows, schema=batch.schema)


def finish_perception(batch: pa.Table, perceive: dict[str, Any]) -> pa.Table:
    """Merge staged outputs per kind (detectors by IoU voting) and apply the error policy."""
    thresholds = perceive["thresholds"]
    rows = batch.to_pylist()
    for row in rows:
        if not row["sample"]:
            continue
        sample = Sample.model_validate_json(row["sample"])
        by_kind: dict[str, dict[str, list[dict[str, Any]]]] = {}
        for key, found in sample.experts.items():
            kind, _, instance = key.partition(STAGED)
            by_kind.setdefault(kind, {})[instance or kind] = found
        merged: dict[str, list[dict[str, Any]]] = {}
        for kind, per_instance in by_kind.items():
            if kind == "objects" and len(per_instance) > 1:
                merged[kind] = merge_detections(per_instance, perceive["iou"], perceive["min_votes"], thresholds)
            else:
                merged[kind] = [{**obs, "source": name} if len(per_instance) > 1 else obs
                                for name, found in sorted(per_instance.items()) for obs in found
                                if obs.get("score", 1.0) >= thresholds.get(name, 0.0)]
        sample.experts = merged
        if sample.errors and perceive["on_error"] == "reject":
            detail = "; ".join(f"{k}: {v}" for k, v in sorted(sample.errors.items()))
            row["reject"] = Reject(key=sample.key, stage="perceive", reason="expert_error", detail=detail,
                                   url=sample.url).model_dump_json()
            row["sample"], row["image"] = None, None
        else:
            row["sample"] = sample.model_dump_json()
    return pa.Table.from_pylist(rows, schema=batch.schema)


def add_perceive(ds, config: Config):
    """Append the expert pools and the merge step to a Ray Data stream of pipeline rows."""
    import ray

    cfg = config.perceive
    plan = plan_experts(cfg)
    cluster = ray.cluster_resources()
    for resource, key in (("CPU", "num_cpus"), ("GPU", "num_gpus")):
        wanted = sum(getattr(r, key) * r.concurrency for _, _, r in plan) + (LIGHT_TASK_CPUS if resource == "CPU" else 0)
        if wanted > cluster.get(resource, 0):
            raise ConfigError(
                f"perceive.experts ask for {wanted:g} {resource}s at once (resources.{key} x concurrency, all "
                f"pools run together, plus {LIGHT_TASK_CPUS} CPU for reading and writing) but the cluster has {cluster.get(resource, 0):g}; lower them or add nodes")
    for spec, _expert, resources in plan:
        ds = ds.map_batches(ExpertStage, fn_constructor_args=(spec,), batch_size=None, batch_format="pyarrow",
                            num_gpus=resources.num_gpus, num_cpus=resources.num_cpus,
                            compute=ray.data.ActorPoolStrategy(size=resources.concurrency))
    options = {"iou": cfg.merge_iou, "min_votes": cfg.merge_min_votes, "on_error": cfg.on_error,
               "thresholds": {e.instance: e.score_threshold for e in cfg.experts}}
    return ds.map_batches(finish_perception, fn_kwargs={"perceive": options}, batch_size=None, batch_format="pyarrow",
                          num_cpus=LIGHT_TASK_CPUS)
