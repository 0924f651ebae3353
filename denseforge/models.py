"""Model loading shared by stages and experts: open_clip models (the embed stage, the qa score,
the clip-tags expert, YOLO-World's text side) and the device a worker runs them on.

Loaded once per worker, on the device found there, never on the driver; a configured pretrained
model that cannot be loaded is an error, and random weights happen only when `weights: random`
says so (the provenance says it too).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field

from denseforge.errors import ModelLoadError
from denseforge.plugin import Settings

MODEL_CONFIGS = Path(__file__).parent / "model_configs"  # architectures open_clip does not ship (df-tiny-clip)


class ClipModel(Settings):
    """Which open_clip model, with which weights, on which device."""

    model: str = "ViT-B-32"
    pretrained: str | None = "laion2b_s34b_b79k"
    checkpoint: str | None = Field(None, description="local weights file; wins over pretrained")
    weights: Literal["pretrained", "random"] = Field(
        "pretrained", description="random: an untrained architecture, for offline tests and the demo only"
    )
    device: Literal["auto", "cpu", "cuda"] = "auto"
    seed: int = Field(0, description="random weights are drawn from it, so every worker and rerun embeds alike")


def pick_device(requested: str) -> str:
    """Resolve `auto` in the process that will run the model."""
    import torch

    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError("device: cuda, but this worker sees no GPU (device: auto falls back to the CPU)")
    return requested


def load_clip(settings: ClipModel, device: str):
    """(model, preprocess, provenance) for an open_clip model; never silently random."""
    import open_clip
    import torch

    open_clip.add_model_config(MODEL_CONFIGS)
    if settings.weights == "random":
        pretrained = None
        source = f"random weights, seed {settings.seed} (weights: random) - its outputs carry no meaning"
    elif settings.checkpoint:
        pretrained, source = settings.checkpoint, f"checkpoint {settings.checkpoint}"
    elif settings.pretrained:
        pretrained, source = settings.pretrained, f"open_clip pretrained tag {settings.pretrained}"
    else:
        raise ModelLoadError("embed: set embed.pretrained or embed.checkpoint, or embed.weights: random for tests")
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(settings.seed)
            model, _, preprocess = open_clip.create_model_and_transforms(
                settings.model, pretrained=pretrained, device=device, load_weights=pretrained is not None
            )
    except Exception as exc:  # noqa: BLE001 - hub misses, bad paths and bad names all land here
        raise ModelLoadError(
            f"cannot load open_clip model {settings.model!r} with {source}: {type(exc).__name__}: {exc}. "
            "Offline? Download the weights elsewhere and set embed.checkpoint to the file."
        ) from None
    model.eval()
    return model, preprocess, {"library": "open_clip", "model": settings.model, "weights": source, "device": device}
