"""fuse: one dense caption per image from the image and every expert's observations.

The perception-embedded prompt comes from a template file (`$word_limit`, `$perception`) that
users can replace; each observation kind renders its own section. Untrusted text — alt text and
OCR lines — is JSON-quoted inside tagged blocks with angle brackets escaped, so it cannot close its
block or pose as an instruction. Backends: `template` (deterministic, no model), `openai` (any
OpenAI-compatible server: vLLM, SGLang, LMDeploy, Ollama).
"""

from __future__ import annotations

import base64
import json
import string
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from denseforge.errors import ConfigError
from denseforge.stages.sample import Sample

BUILTIN_PROMPT = Path(__file__).parent / "prompts" / "perception.txt"
NUMBER_WORDS = {2: "two", 3: "three", 4: "four", 5: "five", 6: "six", 7: "seven", 8: "eight", 9: "nine", 10: "ten"}


def quote_untrusted(text: str) -> str:
    """JSON-quote web/OCR text with <, > and & escaped: it cannot close a tag or a quote."""
    return json.dumps(text, ensure_ascii=False).replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def _scaled(box: list[float], width: int, height: int) -> str:
    return ",".join(str(round(1000 * v / (width if i % 2 == 0 else height))) for i, v in enumerate(box))


def render_perception(sample: Sample) -> str:
    """The helper-data section of the prompt: alt text, then one section per observation kind."""
    parts = []
    if sample.alt_text:
        parts.append(f"<alt_text>\n{quote_untrusted(sample.alt_text)}\n</alt_text>")
    for kind, found in sorted(sample.experts.items()):
        if not found:
            continue
        if kind == "objects":
            lines = [f"[{i}] {o['label']} {o.get('score', 1.0):.2f} ({_scaled(o['box'], sample.width, sample.height)})"
                     for i, o in enumerate(found)]
            parts.append("<objects>\n" + "\n".join(lines) + "\n</objects>")
        elif kind == "ocr":
            lines = [f"[{i}] {quote_untrusted(o['text'])}" for i, o in enumerate(found)]
            parts.append("<ocr>\n" + "\n".join(lines) + "\n</ocr>")
        elif kind == "tags":
            parts.append("<tags>\n" + ", ".join(quote_untrusted(o["label"]) for o in found) + "\n</tags>")
        else:
            body = "\n".join(quote_untrusted(json.dumps(o, ensure_ascii=False, sort_keys=True))[:300] for o in found)
            parts.append(f"<{kind}>\n{body}\n</{kind}>")
    return "\n".join(parts) if parts else "(no helper data for this image)"


@dataclass(frozen=True)
class PromptTemplate:
    """A prompt template file with `$word_limit` and `$perception` placeholders."""

    text: str
    word_limit: int = 192

    @classmethod
    def load(cls, path: str | None, word_limit: int) -> "PromptTemplate":
        file = Path(path) if path else BUILTIN_PROMPT
        try:
            text = file.read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"fuse.prompt_file {str(file)!r} cannot be read: {exc.strerror}") from None
        if "$perception" not in text:
            raise ConfigError(f"fuse.prompt_file {str(file)!r} has no $perception placeholder for the helper data")
        return cls(text, word_limit)

    def render(self, sample: Sample) -> str:
        return string.Template(self.text).safe_substitute(word_limit=self.word_limit, perception=render_perception(sample))


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
        sentences.append(f"The largest {largest['label']} is {_where(largest['box'], sample.width, sample.height)}.")
    text = [o["text"] for o in sample.experts.get("ocr", []) if o.get("text", "").strip()]
    if text:
        quoted = " and ".join(f'"{t}"' for t in text[:6])
        sentences.append(f"Visible text reads {quoted}.")
    tags = [o["label"] for o in sample.experts.get("tags", [])][:5]
    if tags:
        sentences.append(f"Scene tags: {', '.join(tags)}.")
    return " ".join(sentences) if sentences else "An image."


REGION_PROMPT = ("The first image is a close crop of one {label} in a larger picture; the others show the same "
                 "region with more and more context. Describe that {label} in one sentence: what it is, its "
                 "attributes and what it is doing. Never mention crops or images.")


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
    the client retries 429/5xx with backoff; a reply cut by the length limit is flagged."""

    def __init__(self, prompt: PromptTemplate, base_url: str, model: str, api_key: str = "EMPTY",
                 max_tokens: int = 512, temperature: float = 0.2, timeout_s: float = 60.0, max_retries: int = 5,
                 concurrency: int = 8):
        from openai import OpenAI

        self.prompt, self.model = prompt, model
        self.max_tokens, self.temperature, self.concurrency = max_tokens, temperature, concurrency
        self.client = OpenAI(base_url=base_url, api_key=api_key, timeout=timeout_s, max_retries=max_retries)
        self.provenance = {"backend": "openai", "base_url": base_url, "model": model}

    def _one(self, sample: Sample, image: bytes) -> Caption:
        data_url = "data:image/jpeg;base64," + base64.b64encode(image).decode("ascii")
        messages = [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": data_url}},
            {"type": "text", "text": self.prompt.render(sample)}]}]
        try:
            reply = self.client.chat.completions.create(model=self.model, messages=messages,
                                                        max_tokens=self.max_tokens, temperature=self.temperature)
        except Exception as exc:  # noqa: BLE001 - after the client's own retries: this image's error
            return Caption(None, self.provenance, error=f"{type(exc).__name__}: {exc}"[:500])
        choice = reply.choices[0]
        usage = reply.usage.model_dump() if reply.usage is not None else None
        provenance = {**self.provenance, "model": reply.model or self.model, "finish_reason": choice.finish_reason,
                      "usage": usage}
        return Caption((choice.message.content or "").strip(), provenance, truncated=choice.finish_reason == "length")

    def __call__(self, samples: list[Sample], images: list[bytes]) -> list[Caption]:
        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            return list(pool.map(self._one, samples, images))

    def caption_region(self, label: str, box: list[float], width: int, height: int, views: list[bytes]) -> str | None:
        """One sentence about a region from its multi-view crops; None when the request fails."""
        content: list[dict[str, Any]] = [
            {"type": "image_url", "image_url": {"url": "data:image/jpeg;base64," + base64.b64encode(v).decode("ascii")}}
            for v in views]
        content.append({"type": "text", "text": REGION_PROMPT.format(label=quote_untrusted(label))})
        try:
            reply = self.client.chat.completions.create(model=self.model, messages=[{"role": "user", "content": content}],
                                                        max_tokens=96, temperature=self.temperature)
        except Exception:  # noqa: BLE001 - a missing region caption is not worth the sample
            return None
        return (reply.choices[0].message.content or "").strip() or None


class TransformersCaptioner:
    """A local VLM through transformers' Auto classes (Qwen2-VL / Qwen2.5-VL / LLaVA families):
    chat template with the image, batched greedy generation, GPU when this process sees one."""

    def __init__(self, prompt: PromptTemplate, model: str, max_new_tokens: int = 256, batch_size: int = 4,
                 device: str = "auto"):
        import torch
        from transformers import AutoModelForImageTextToText, AutoProcessor

        from denseforge.errors import ModelLoadError
        from denseforge.stages.embed import pick_device

        self.prompt, self.max_new_tokens, self.batch_size = prompt, max_new_tokens, batch_size
        self.device = pick_device(device)
        try:
            self.processor = AutoProcessor.from_pretrained(model)
            dtype = torch.bfloat16 if self.device == "cuda" else torch.float32
            self.model = AutoModelForImageTextToText.from_pretrained(model, dtype=dtype).to(self.device).eval()
        except Exception as exc:  # noqa: BLE001 - offline hub misses, bad paths
            raise ModelLoadError(f"fuse.transformers.model {model!r} cannot be loaded: {type(exc).__name__}: {exc}. "
                                 "Offline? Point it at a local folder with the model and its processor.") from None
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
            chunk = samples[start:start + self.batch_size]
            pictures = [Image.open(io.BytesIO(b)).convert("RGB") for b in images[start:start + self.batch_size]]
            texts = [self.processor.apply_chat_template(
                [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": self.prompt.render(s)}]}],
                add_generation_prompt=True) for s in chunk]
            try:
                inputs = self.processor(text=texts, images=pictures, padding=True, return_tensors="pt").to(self.device)
                with torch.inference_mode():
                    generated = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens, do_sample=False)
            except Exception as exc:  # noqa: BLE001 - this batch's error, per image
                out += [Caption(None, self.provenance, error=f"{type(exc).__name__}: {exc}"[:500]) for _ in chunk]
                continue
            new = generated[:, inputs["input_ids"].shape[1]:]
            eos = set(self.eos if isinstance(self.eos, list) else [self.eos])
            for row, text in zip(new, self.processor.batch_decode(new, skip_special_tokens=True)):
                finished = any(int(t) in eos for t in row)
                out.append(Caption(text.strip(), self.provenance, truncated=not finished))
        return out
