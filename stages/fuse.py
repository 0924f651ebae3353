"""fuse: one dense caption per image from the image and every expert's observations.

The perception-embedded prompt comes from a template file (`$word_limit`, `$perception`) that
users can replace; each observation kind renders its own section. Untrusted text — alt text and
OCR lines — is JSON-quoted inside tagged blocks with angle brackets escaped, so it cannot close its
block or pose as an instruction. Backends: `template` (deterministic, no model), `openai` (any
OpenAI-compatible server: vLLM, SGLang, LMDeploy, Ollama), `transformers` (a local VLM).
`CaptionStage` runs the configured backend, optional DynRefer region captions and, in markup mode,
parses the model's `<ref>` phrases.
"""

from __future__ import annotations

import base64
import json
import os
import string
from collections import Counter
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from denseforge.errors import ConfigError, ModelLoadError
from denseforge.experts.base import Expert, render_json
from denseforge.plugin import Settings
from denseforge.stages.ground import GroundConfig, parse_ref_markup
from denseforge.stages.regions import jpeg, select_views, top_regions
from denseforge.stages.sample import Region, Sample
from denseforge.stages.stage import Flow, Item, Rejection, Stage, StageRun, Verdict, WorkerSettings

BUILTIN_PROMPT = Path(__file__).parent / "prompts" / "perception.txt"
NUMBER_WORDS = {2: "two", 3: "three", 4: "four", 5: "five", 6: "six", 7: "seven", 8: "eight", 9: "nine", 10: "ten"}


def quote_untrusted(text: str) -> str:
    """JSON-quote web/OCR text with <, > and & escaped: it cannot close a tag or a quote."""
    return json.dumps(text, ensure_ascii=False).replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def _scaled(box: list[float], width: int, height: int) -> str:
    return ",".join(str(round(1000 * v / (width if i % 2 == 0 else height))) for i, v in enumerate(box))


def cut_at_word(text: str, limit: int) -> str:
    """`text` cut to at most `limit` characters at a word boundary, marked with an ellipsis."""
    if len(text) <= limit:
        return text
    head = text[:limit]
    if not (head[-1:].isspace() or text[limit].isspace()) and len(head.split()) > 1:
        head = head.rsplit(None, 1)[0]  # the last word was cut in two: drop it
    return head.rstrip() + " …"


def render_perception(
    sample: Sample, renderers: Mapping[str, Expert] | None = None, alt_text_limit: int | None = None
) -> str:
    """The helper-data section of the prompt: alt text (cut to `alt_text_limit` characters), then
    one section per observation kind. Plugin kinds read as their expert's `render` says (JSON
    lines by default), escaped so they cannot close their block."""
    parts = []
    if sample.alt_text:
        alt = sample.alt_text if alt_text_limit is None else cut_at_word(sample.alt_text, alt_text_limit)
        parts.append(f"<alt_text>\n{quote_untrusted(alt)}\n</alt_text>")
    for kind, found in sorted(sample.experts.items()):
        if not found:
            continue
        if kind == "objects":
            lines = [
                f"[{i}] {o['label']} {o.get('score', 1.0):.2f} ({_scaled(o['box'], sample.width, sample.height)})"
                for i, o in enumerate(found)
            ]
            parts.append("<objects>\n" + "\n".join(lines) + "\n</objects>")
        elif kind == "ocr":
            lines = [f"[{i}] {quote_untrusted(o['text'])}" for i, o in enumerate(found)]
            parts.append("<ocr>\n" + "\n".join(lines) + "\n</ocr>")
        elif kind == "tags":
            parts.append("<tags>\n" + ", ".join(quote_untrusted(o["label"]) for o in found) + "\n</tags>")
        else:
            expert = (renderers or {}).get(kind)
            body = expert.render(found, sample.width, sample.height) if expert is not None else render_json(found)
            body = body.replace("<", "\\u003c").replace(">", "\\u003e")
            parts.append(f"<{kind}>\n{body}\n</{kind}>")
    return "\n".join(parts) if parts else "(no helper data for this image)"


@dataclass(frozen=True)
class PromptTemplate:
    """A prompt template file with `$word_limit` and `$perception` placeholders."""

    text: str
    word_limit: int = 192
    alt_text_limit: int | None = None

    @classmethod
    def load(cls, path: str | None, word_limit: int) -> PromptTemplate:
        file = Path(path) if path else BUILTIN_PROMPT
        try:
            text = file.read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"fuse.prompt_file {str(file)!r} cannot be read: {exc.strerror}") from None
        if "$perception" not in text:
            raise ConfigError(f"fuse.prompt_file {str(file)!r} has no $perception placeholder for the helper data")
        return cls(text, word_limit)

    def render(self, sample: Sample, renderers: Mapping[str, Expert] | None = None) -> str:
        perception = render_perception(sample, renderers, self.alt_text_limit)
        return string.Template(self.text).safe_substitute(word_limit=self.word_limit, perception=perception)


class OpenAIBackendConfig(Settings):
    base_url: str = Field("http://127.0.0.1:8000/v1", description="an OpenAI-compatible server (vLLM, SGLang, ...)")
    model: str = "Qwen/Qwen2.5-VL-7B-Instruct"
    api_key_env: str = Field("OPENAI_API_KEY", description="environment variable holding the key ('EMPTY' if unset)")
    max_tokens: int = Field(512, ge=1)
    temperature: float = Field(0.2, ge=0, le=2)
    timeout_s: float = Field(60.0, gt=0)
    max_retries: int = Field(5, ge=0, description="retries with backoff on 429/5xx/connection errors")
    concurrency: int = Field(8, ge=1, description="requests in flight per captioner actor")
    check_server: bool = Field(True, description="ask the server for its models before the run downloads anything")


class TransformersBackendConfig(Settings):
    model: str = Field("Qwen/Qwen2.5-VL-7B-Instruct", description="hub name or local folder (model + processor)")
    max_new_tokens: int = Field(320, ge=1)
    batch_size: int = Field(4, ge=1)
    device: Literal["auto", "cpu", "cuda"] = "auto"


class FuseConfig(WorkerSettings):
    enabled: bool = False
    backend: Literal["template", "openai", "transformers"] = "template"
    prompt_file: str | None = Field(None, description="template with $word_limit and $perception; None = built-in")
    word_limit: int = Field(192, ge=10)
    max_alt_text_chars: int = Field(2000, ge=0, description="alt text in the prompt is cut here, at a word boundary")
    max_caption_chars: int = Field(
        8000, ge=100, description="a longer reply is rejected (caption_too_long) before grounding"
    )
    region_top_k: int = Field(0, ge=0, description="region captions for this many salient boxes (0: none)")
    region_views: int = Field(3, ge=1, le=11, description="DynRefer views per region, the tight crop included")
    openai: OpenAIBackendConfig = OpenAIBackendConfig()
    transformers: TransformersBackendConfig = TransformersBackendConfig()
    num_cpus: float = Field(0.25, gt=0, description="CPUs per captioner worker")

    @model_validator(mode="after")
    def _regions_need_a_backend_that_writes_them(self) -> FuseConfig:
        if self.region_top_k and self.backend == "transformers":
            raise ValueError(
                "region_top_k: region captions come from the template or openai backend; the "
                "transformers backend writes none (set region_top_k: 0, or use backend: openai "
                "with a vLLM/SGLang server)"
            )
        return self


class CaptionerError(RuntimeError):
    """The captioner gave no usable caption for one image (server error, malformed reply, empty text)."""


@dataclass
class Caption:
    text: str | None
    provenance: dict[str, Any] = field(default_factory=dict)
    truncated: bool = False
    error: str | None = None


def _plural(label: str, n: int) -> str:
    if n == 1:
        return f"{'an' if label[0] in 'aeiou' else 'a'} {label}"
    from denseforge.stages.ground import plural

    return f"{NUMBER_WORDS.get(n, str(n))} {plural(label)}"


def _where(box: list[float], width: int, height: int) -> str:
    cx, cy = (box[0] + box[2]) / 2 / width, (box[1] + box[3]) / 2 / height
    horizontal = "left" if cx < 0.36 else "right" if cx > 0.64 else "centre"
    vertical = "top" if cy < 0.36 else "bottom" if cy > 0.64 else "middle"
    return "in the centre" if (horizontal, vertical) == ("centre", "middle") else f"at the {vertical} {horizontal}"


def compose_template_caption(sample: Sample) -> str:
    """A deterministic caption from the expert evidence alone (alt text is unverified: left out)."""
    sentences = []
    objects = sample.experts.get("objects", [])
    if objects:
        counts = Counter(o["label"] for o in objects)
        named = [_plural(label, n) for label, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))]
        listed = named[0] if len(named) == 1 else ", ".join(named[:-1]) + f" and {named[-1]}"
        sentences.append(f"The image shows {listed}.")
        largest = max(objects, key=lambda o: (o["box"][2] - o["box"][0]) * (o["box"][3] - o["box"][1]))
        which = "The largest" if counts[largest["label"]] > 1 else "The"  # "largest" only among several
        sentences.append(f"{which} {largest['label']} is {_where(largest['box'], sample.width, sample.height)}.")
    text = [o["text"] for o in sample.experts.get("ocr", []) if o.get("text", "").strip()]
    if text:
        quoted = " and ".join(f'"{t}"' for t in text[:6])
        sentences.append(f"Visible text reads {quoted}.")
    tags = [o["label"] for o in sample.experts.get("tags", [])][:5]
    if tags:
        sentences.append(f"Scene tags: {', '.join(tags)}.")
    return " ".join(sentences) if sentences else "An image."


REGION_PROMPT = (
    "The first image is a close crop of one {label} in a larger picture; the others show the same "
    "region with more and more context. Describe that {label} in one sentence: what it is, its "
    "attributes and what it is doing. Never mention crops or images."
)


class TemplateCaptioner:
    """The no-model baseline and the offline demo's captioner."""

    def __init__(self, **_: Any):
        self.provenance = {"backend": "template", "model": None}

    def __call__(self, samples: list[Sample], images: list[bytes]) -> list[Caption]:
        return [Caption(compose_template_caption(s), self.provenance) for s in samples]

    def caption_region(self, label: str, box: list[float], width: int, height: int, views: list[bytes]) -> str | None:
        return f"{_plural(label, 1)} {_where(box, width, height)}"


class OpenAICaptioner:
    """Chat completions against any OpenAI-compatible server, `concurrency` requests at a time;
    the client retries 429/5xx with backoff; a reply cut by the length limit is flagged. Anything
    else the server does wrong (no choices, a body that is not JSON, an empty body) is that image's
    error, never the batch's."""

    def __init__(self, prompt: PromptTemplate, cfg: OpenAIBackendConfig, renderers: Mapping[str, Expert] | None = None):
        from openai import OpenAI

        self.prompt, self.cfg, self.renderers = prompt, cfg, renderers
        self.client = OpenAI(
            base_url=cfg.base_url,
            api_key=os.environ.get(cfg.api_key_env, "EMPTY"),
            timeout=cfg.timeout_s,
            max_retries=cfg.max_retries,
        )
        self.provenance = {"backend": "openai", "base_url": cfg.base_url, "model": cfg.model}

    def check_server(self) -> None:
        """Fail before the run starts when the server does not answer (one quick request)."""
        try:
            self.client.with_options(max_retries=0, timeout=min(self.cfg.timeout_s, 10.0)).models.list()
        except Exception as exc:  # noqa: BLE001 - any failure here is a setup problem
            raise ModelLoadError(
                f"fuse.openai.base_url {self.cfg.base_url} does not answer GET /models "
                f"({type(exc).__name__}: {str(exc)[:200]}); start the server or fix the URL "
                "(fuse.openai.check_server: false skips this check)"
            ) from None

    def _one(self, sample: Sample, image: bytes) -> Caption:
        data_url = "data:image/jpeg;base64," + base64.b64encode(image).decode("ascii")
        messages: list[Any] = [
            {
                "role": "user",
                "content": [
                    {"type": "image_url", "image_url": {"url": data_url}},
                    {"type": "text", "text": self.prompt.render(sample, self.renderers)},
                ],
            }
        ]
        try:
            reply = self.client.chat.completions.create(
                model=self.cfg.model,
                messages=messages,
                max_tokens=self.cfg.max_tokens,
                temperature=self.cfg.temperature,
            )
            if not getattr(reply, "choices", None):
                raise CaptionerError("the reply has no choices")
            choice = reply.choices[0]
            text = choice.message.content
            if not isinstance(text, str):
                raise CaptionerError(f"the reply has no text content ({type(text).__name__})")
            usage = reply.usage.model_dump() if reply.usage is not None else None
            provenance = {
                **self.provenance,
                "model": reply.model or self.cfg.model,
                "finish_reason": choice.finish_reason,
                "usage": usage,
            }
        except Exception as exc:  # noqa: BLE001 - after the client's own retries: this image's error
            return Caption(None, self.provenance, error=f"{type(exc).__name__}: {exc}"[:500])
        return Caption(text.strip(), provenance, truncated=choice.finish_reason == "length")

    def __call__(self, samples: list[Sample], images: list[bytes]) -> list[Caption]:
        with ThreadPoolExecutor(max_workers=self.cfg.concurrency) as pool:
            return list(pool.map(self._one, samples, images))

    def caption_region(self, label: str, box: list[float], width: int, height: int, views: list[bytes]) -> str | None:
        """One sentence about a region from its multi-view crops; None when the request fails."""
        content: list[dict[str, Any]] = [
            {"type": "image_url", "image_url": {"url": "data:image/jpeg;base64," + base64.b64encode(v).decode("ascii")}}
            for v in views
        ]
        content.append({"type": "text", "text": REGION_PROMPT.format(label=quote_untrusted(label))})
        try:
            message: Any = {"role": "user", "content": content}
            reply = self.client.chat.completions.create(
                model=self.cfg.model, messages=[message], max_tokens=96, temperature=self.cfg.temperature
            )
            return (reply.choices[0].message.content or "").strip() or None
        except Exception:  # noqa: BLE001 - a missing region caption is not worth the sample
            return None


class TransformersCaptioner:
    """A local VLM through transformers' Auto classes (Qwen2-VL / Qwen2.5-VL / LLaVA families):
    chat template with the image, batched greedy generation, GPU when this process sees one."""

    def __init__(
        self, prompt: PromptTemplate, cfg: TransformersBackendConfig, renderers: Mapping[str, Expert] | None = None
    ):
        import torch
        from transformers import AutoModelForImageTextToText, AutoProcessor

        from denseforge.models import pick_device

        model = cfg.model
        self.prompt, self.renderers = prompt, renderers
        self.max_new_tokens, self.batch_size = cfg.max_new_tokens, cfg.batch_size
        self.device = pick_device(cfg.device)
        try:
            self.processor = AutoProcessor.from_pretrained(model)
            dtype = torch.bfloat16 if self.device == "cuda" else torch.float32
            loaded: Any = AutoModelForImageTextToText.from_pretrained(model, dtype=dtype)
            self.model = loaded.to(self.device).eval()
        except Exception as exc:  # noqa: BLE001 - offline hub misses, bad paths
            raise ModelLoadError(
                f"fuse.transformers.model {model!r} cannot be loaded: {type(exc).__name__}: {exc}. "
                "Offline? Point it at a local folder with the model and its processor."
            ) from None
        tokenizer = getattr(self.processor, "tokenizer", self.processor)
        tokenizer.padding_side = "left"  # decoder-only batches generate from the right edge
        self.eos = self.model.generation_config.eos_token_id
        self.provenance = {"backend": "transformers", "model": model, "device": self.device}

    def __call__(self, samples: list[Sample], images: list[bytes]) -> list[Caption]:
        import io

        import torch
        from PIL import Image

        out: list[Caption] = []
        for start in range(0, len(samples), self.batch_size):
            chunk = samples[start : start + self.batch_size]
            pictures = [Image.open(io.BytesIO(b)).convert("RGB") for b in images[start : start + self.batch_size]]
            texts = [
                self.processor.apply_chat_template(
                    [
                        {
                            "role": "user",
                            "content": [
                                {"type": "image"},
                                {"type": "text", "text": self.prompt.render(s, self.renderers)},
                            ],
                        }
                    ],
                    add_generation_prompt=True,
                )
                for s in chunk
            ]
            try:
                inputs = self.processor(text=texts, images=pictures, padding=True, return_tensors="pt").to(self.device)
                with torch.inference_mode():
                    generated = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False)
            except Exception as exc:  # noqa: BLE001 - this batch's error, per image
                out += [Caption(None, self.provenance, error=f"{type(exc).__name__}: {exc}"[:500]) for _ in chunk]
                continue
            new = generated[:, inputs["input_ids"].shape[1] :]
            eos = set(self.eos if isinstance(self.eos, list) else [self.eos])
            for row, text in zip(new, self.processor.batch_decode(new, skip_special_tokens=True), strict=True):
                finished = any(int(t) in eos for t in row)
                out.append(Caption(text.strip(), self.provenance, truncated=not finished))
        return out


MARKUP_RULE = (
    "\n\nWhen you mention an object listed under <objects>, wrap the phrase as "
    "<ref id=N>phrase</ref>, N being its number in that list."
)


class CaptionStage(Stage[FuseConfig]):
    """One dense caption per sample from the configured backend, plus DynRefer region captions for
    the most salient boxes; in markup mode the model's `<ref>` phrases become the grounding."""

    name = "fuse"
    error_reason = "captioner_error"
    Options = FuseConfig
    cached = True

    def __init__(
        self, options: FuseConfig, ground: GroundConfig | None = None, renderers: Mapping[str, Expert] | None = None
    ):
        super().__init__(options)
        self.markup = ground is not None and ground.mode == "markup" and options.backend != "template"
        self.renderers = dict(renderers or {})
        if options.backend != "template":  # a missing or broken prompt file fails here, on the driver
            PromptTemplate.load(options.prompt_file, options.word_limit)

    def fingerprint(self) -> str:
        """Its settings, the prompt's text (a prompt file edited in place is a new prompt) and
        whether it asks for markup."""
        f = self.options
        prompt = "" if f.backend == "template" else PromptTemplate.load(f.prompt_file, f.word_limit).text
        return f"{super().fingerprint()}:markup={self.markup}:{prompt}"

    def cache_input(self, item: Item) -> Any:
        """The prompt and the template skip kinds with nothing found."""
        return self.evidence_input(item)

    @classmethod
    def plan(cls, flow: Flow) -> list[StageRun]:
        """Hands on whether the caption carries its own grounding (then ground does not run)."""
        cfg = flow.config.fuse
        if not cfg.enabled:
            return []
        caption = cls(cfg, flow.config.ground, flow.handed_on.get("renderers", {}))
        flow.handed_on["markup"] = caption.markup
        return [StageRun(caption, cls.name, cfg.resources, max_error_rate=cfg.max_error_rate)]

    def setup(self) -> None:
        f = self.options
        self.captioner: TemplateCaptioner | TransformersCaptioner | OpenAICaptioner
        if f.backend == "template":
            self.captioner = TemplateCaptioner()
            return
        prompt = PromptTemplate.load(f.prompt_file, f.word_limit)
        prompt = PromptTemplate(
            prompt.text + (MARKUP_RULE if self.markup else ""), prompt.word_limit, f.max_alt_text_chars
        )
        if f.backend == "transformers":
            self.captioner = TransformersCaptioner(prompt, f.transformers, self.renderers)
        else:
            captioner = OpenAICaptioner(prompt, f.openai, self.renderers)
            if f.openai.check_server:
                captioner.check_server()
            self.captioner = captioner

    def _regions(self, item: Item) -> list[Region]:
        sample = item.sample
        objects = sample.experts.get("objects", [])
        regions = []
        captioner = self.captioner
        assert not isinstance(captioner, TransformersCaptioner), "FuseConfig refuses region_top_k with it"
        for i in top_regions(objects, self.options.region_top_k):
            views = select_views(item.image, objects[i]["box"], self.options.region_views)
            text = captioner.caption_region(
                objects[i]["label"], objects[i]["box"], sample.width, sample.height, [jpeg(c) for c in views.crops]
            )
            if text:
                regions.append(Region(box=objects[i]["box"], caption=text))
        return regions

    def process(self, batch: list[Item]) -> list[Verdict]:
        verdicts: list[Verdict] = []
        for item, caption in zip(
            batch, self.captioner([i.sample for i in batch], [i.data for i in batch]), strict=True
        ):
            sample = item.sample
            if caption.error is not None or not caption.text:
                verdicts.append(CaptionerError(caption.error or "the captioner returned an empty caption"))
                continue
            sample.provenance["captioner"] = {**caption.provenance, "truncated": caption.truncated}
            if self.options.backend != "template" and len(sample.alt_text or "") > self.options.max_alt_text_chars:
                sample.provenance["captioner"]["alt_text_cut_to_chars"] = self.options.max_alt_text_chars
            if len(caption.text) > self.options.max_caption_chars:
                verdicts.append(
                    Rejection(
                        "caption_too_long",
                        f"{len(caption.text)} characters > fuse.max_caption_chars={self.options.max_caption_chars}",
                    )
                )
                continue
            if self.markup:
                sample.caption, sample.grounding = parse_ref_markup(caption.text, sample.experts.get("objects", []))
            else:
                sample.caption = caption.text
            if self.options.region_top_k:
                sample.regions = self._regions(item)
            verdicts.append(None)
        return verdicts
