"""fuse, ground and qa on Ray: a captioner actor pool, then grounding and the quality gate."""

from __future__ import annotations

import io
import json
import os
from typing import Any

from PIL import Image

import pyarrow as pa

from denseforge.pipeline.config import Config
from denseforge.pipeline.ray_session import LIGHT_TASK_CPUS
from denseforge.stages.fuse import OpenAICaptioner, PromptTemplate, TemplateCaptioner, TransformersCaptioner
from denseforge.stages.ground import ground_mentions, parse_ref_markup, read_aliases
from denseforge.stages.qa import ClipTextScorer, QaSettings, assess
from denseforge.stages.regions import jpeg, select_views, top_regions
from denseforge.stages.sample import Region, Reject, Sample

MARKUP_RULE = ("\n\nWhen you mention an object listed under <objects>, wrap the phrase as "
               "<ref id=N>phrase</ref>, N being its number in that list.")


def build_captioner(config: Config):
    f = config.fuse
    if f.backend == "template":
        return TemplateCaptioner()
    prompt = PromptTemplate.load(f.prompt_file, f.word_limit)
    if f.grounding == "markup":
        prompt = PromptTemplate(prompt.text + MARKUP_RULE, prompt.word_limit)
    if f.backend == "transformers":
        t = f.transformers
        return TransformersCaptioner(prompt, t.model, t.max_new_tokens, t.batch_size, t.device)
    o = f.openai
    return OpenAICaptioner(prompt, o.base_url, o.model, os.environ.get(o.api_key_env, "EMPTY"), o.max_tokens,
                           o.temperature, o.timeout_s, o.max_retries, o.concurrency)


class CaptionStage:
    """Ray Data actor: captions every live sample of a unit; keeps the truncation flag for qa."""

    def __init__(self, config: Config):
        self.captioner = build_captioner(config)
        self.markup = config.fuse.grounding == "markup" and config.fuse.backend != "template"
        self.region_top_k, self.region_views = config.fuse.region_top_k, config.fuse.region_views

    def _regions(self, sample: Sample, image_bytes: bytes) -> list[Region]:
        objects = sample.experts.get("objects", [])
        chosen = top_regions(objects, self.region_top_k)
        if not chosen:
            return []
        image = Image.open(io.BytesIO(image_bytes)).convert("RGB")
        regions = []
        for i in chosen:
            views = select_views(image, objects[i]["box"], self.region_views)
            text = self.captioner.caption_region(objects[i]["label"], objects[i]["box"], sample.width, sample.height,
                                                 [jpeg(c) for c in views.crops])
            if text:
                regions.append(Region(box=objects[i]["box"], caption=text))
        return regions

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        live = [r for r in rows if r["sample"]]
        samples = [Sample.model_validate_json(r["sample"]) for r in live]
        for row, sample, caption in zip(live, samples, self.captioner(samples, [r["image"] for r in live])):
            sample.provenance["captioner"] = caption.provenance
            if caption.error is not None or not caption.text:
                row["reject"] = Reject(key=sample.key, stage="fuse", reason="captioner_error",
                                       detail=caption.error or "empty caption", url=sample.url).model_dump_json()
                row["sample"], row["image"] = None, None
                continue
            if self.markup:
                sample.caption, sample.grounding = parse_ref_markup(caption.text, sample.experts.get("objects", []))
            else:
                sample.caption = caption.text
            sample.provenance["captioner"]["truncated"] = caption.truncated
            if self.region_top_k:
                sample.regions = self._regions(sample, row["image"])
            row["sample"] = sample.model_dump_json()
        return pa.Table.from_pylist(rows, schema=batch.schema)


class ClipScoreStage:
    """Ray Data actor: CLIP image-text score of each caption, kept for the qa step."""

    def __init__(self, config: Config):
        from denseforge.stages.embed import EmbedSettings

        q = config.qa
        self.scorer = ClipTextScorer(EmbedSettings(model=q.clip_model, pretrained=q.clip_pretrained,
                                                   weights=q.clip_weights, seed=config.run.seed))

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = batch.to_pylist()
        live = [r for r in rows if r["sample"]]
        samples = [Sample.model_validate_json(r["sample"]) for r in live]
        scores = self.scorer([r["image"] for r in live], [s.caption or "" for s in samples])
        for row, sample, score in zip(live, samples, scores):
            sample.provenance.setdefault("qa", {})["clip"] = {"score": score, **self.scorer.provenance}
            row["sample"] = sample.model_dump_json()
        return pa.Table.from_pylist(rows, schema=batch.schema)


def ground_and_check(batch: pa.Table, qa: dict[str, Any] | None, markup: bool, aliases: str | None) -> pa.Table:
    """Ground the caption (unless markup did) and apply the quality gate."""
    settings = QaSettings(**qa) if qa is not None else None
    alias_map = read_aliases(aliases)
    rows = batch.to_pylist()
    for row in rows:
        if not row["sample"]:
            continue
        sample = Sample.model_validate_json(row["sample"])
        if not markup:
            sample.grounding = ground_mentions(sample.caption or "", sample.experts, alias_map)
        if settings is not None:
            clip = sample.provenance.get("qa", {}).get("clip", {}).get("score")
            truncated = sample.provenance.get("captioner", {}).get("truncated", False)
            sample.qa = assess(sample, settings, truncated=truncated, clip_score=clip)
            if not sample.qa.passed:
                row["reject"] = Reject(key=sample.key, stage="qa", reason=sample.qa.reasons[0],
                                       detail=json.dumps({"reasons": sample.qa.reasons, "scores": sample.qa.scores}),
                                       url=sample.url).model_dump_json()
                row["sample"], row["image"] = None, None
                continue
        row["sample"] = sample.model_dump_json()
    return pa.Table.from_pylist(rows, schema=batch.schema)


def add_fuse(ds, config: Config):
    """Append the captioner pool and the ground + qa step to a stream of pipeline rows."""
    import ray

    ds = ds.map_batches(CaptionStage, fn_constructor_args=(config,), batch_size=None, batch_format="pyarrow",
                        num_cpus=config.fuse.num_cpus, num_gpus=config.fuse.num_gpus,
                        compute=ray.data.ActorPoolStrategy(size=config.fuse.concurrency))
    qa = None
    if config.qa.enabled:
        qa = config.qa.model_dump(include=set(QaSettings.__dataclass_fields__))
        if config.qa.clip_model:
            ds = ds.map_batches(ClipScoreStage, fn_constructor_args=(config,), batch_size=None, batch_format="pyarrow",
                                num_cpus=LIGHT_TASK_CPUS, num_gpus=config.qa.clip_num_gpus,
                                compute=ray.data.ActorPoolStrategy(size=1))
    markup = config.fuse.grounding == "markup" and config.fuse.backend != "template"
    return ds.map_batches(ground_and_check, fn_kwargs={"qa": qa, "markup": markup, "aliases": config.fuse.ground_aliases},
                          batch_size=None,
                          batch_format="pyarrow", num_cpus=LIGHT_TASK_CPUS)
