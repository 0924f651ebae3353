"""`clip-tags`: open_clip zero-shot tagging over a vocabulary file (top-k above a threshold)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import Field

from denseforge.errors import ConfigError
from denseforge.experts.base import Expert, ExpertInput, Resources
from denseforge.models import ClipModel, load_clip, pick_device

BUILTIN_VOCABULARIES = Path(__file__).parent / "vocabularies"


def read_vocabulary(spec: str) -> list[str]:
    """`builtin:NAME` (shipped with denseforge) or a path; one tag per line, # comments."""
    path = BUILTIN_VOCABULARIES / f"{spec.split(':', 1)[1]}.txt" if spec.startswith("builtin:") else Path(spec)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise ConfigError(f"clip-tags vocabulary {spec!r} cannot be read: {exc.strerror}") from None
    tags = list(dict.fromkeys(line.strip() for line in lines if line.strip() and not line.startswith("#")))
    if not tags:
        raise ConfigError(f"clip-tags vocabulary {spec!r} has no tags")
    return tags


class ClipTagOptions(ClipModel):
    vocabulary: str = "builtin:common"
    prompt: str = "a photo of a {}."
    top_k: int = Field(5, ge=1)
    threshold: float = Field(0.05, ge=0, le=1, description="minimum softmax probability over the vocabulary")


class ClipTagExpert(Expert[ClipTagOptions]):
    """Zero-shot tags: softmax over CLIP image-text similarities to every vocabulary prompt."""

    name = "clip-tags"
    kind = "tags"
    default_resources = Resources(batch_size=32)
    Options = ClipTagOptions

    def setup(self) -> None:
        import open_clip
        import torch

        o = self.options
        self.tags = read_vocabulary(o.vocabulary)
        self.device = pick_device(o.device)
        self.model, self.preprocess, self._provenance = load_clip(o, self.device)
        tokenizer = open_clip.get_tokenizer(o.model)
        with torch.inference_mode():
            text = self.model.encode_text(tokenizer([o.prompt.format(t) for t in self.tags]).to(self.device)).float()
        self.text = torch.nn.functional.normalize(text, dim=-1)
        self.scale = float(self.model.logit_scale.detach().exp()) if hasattr(self.model, "logit_scale") else 100.0

    def __call__(self, batch: list[ExpertInput]) -> list[list[dict[str, Any]]]:
        import torch

        pixels = torch.stack([self.preprocess(item.image) for item in batch]).to(self.device)
        with torch.inference_mode():
            image = torch.nn.functional.normalize(self.model.encode_image(pixels).float(), dim=-1)
            probs = (self.scale * image @ self.text.T).softmax(dim=-1).cpu()
        out = []
        k = min(self.options.top_k, len(self.tags))
        for row in probs:
            values, index = row.topk(k)
            out.append(
                [
                    {"label": self.tags[i], "score": round(float(v), 4)}
                    for v, i in zip(values.tolist(), index.tolist(), strict=True)
                    if v >= self.options.threshold
                ]
            )
        return out

    def untrained(self) -> bool:
        return self.options.weights == "random"

    def provenance(self) -> dict[str, Any]:
        return {"plugin": self.name, **self._provenance, "vocabulary": self.options.vocabulary}
