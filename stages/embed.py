"""embed: open_clip image embeddings (L2-normalised) and image hashes for deduplication.

`EmbedStage` loads its model once per worker and decides CPU or GPU where it runs, never on the
driver; it leaves each image's vector and pHash in the item's outputs for the embeddings file. A
configured pretrained model that cannot be loaded is an error; random weights happen only when
`weights: random` says so, and the provenance says it too.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
from PIL import Image
from pydantic import Field

from denseforge.errors import ModelLoadError
from denseforge.stages.settings import Settings
from denseforge.stages.stage import Item, Stage, Verdict, WorkerSettings

MODEL_CONFIGS = Path(__file__).parent / "model_configs"


class ClipModel(Settings):
    """Which open_clip model, with which weights, on which device."""

    model: str = "ViT-B-32"
    pretrained: str | None = "laion2b_s34b_b79k"
    checkpoint: str | None = Field(None, description="local weights file; wins over pretrained")
    weights: Literal["pretrained", "random"] = Field(
        "pretrained", description="random: an untrained architecture, for offline tests and the demo only")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    seed: int = Field(0, description="random weights are drawn from it, so every worker and rerun embeds alike")


class EmbedConfig(ClipModel, WorkerSettings):
    """open_clip image embeddings for deduplication and selection."""

    enabled: bool = True
    batch_size: int = Field(64, ge=1, le=4096)


def pick_device(requested: str) -> str:
    """Resolve `auto` in the process that will run the model."""
    import torch

    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError("embed.device is cuda but this worker sees no GPU")
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
                settings.model, pretrained=pretrained, device=device, load_weights=pretrained is not None)
    except Exception as exc:  # noqa: BLE001 - hub misses, bad paths and bad names all land here
        raise ModelLoadError(
            f"cannot load open_clip model {settings.model!r} with {source}: {type(exc).__name__}: {exc}. "
            "Offline? Download the weights elsewhere and set embed.checkpoint to the file.") from None
    model.eval()
    return model, preprocess, {"library": "open_clip", "model": settings.model, "weights": source, "device": device}


class EmbedStage(Stage):
    """Images to L2-normalised float32 embeddings (batched) and 64-bit pHashes, in `item.outputs`."""

    name = "embed"
    error_reason = "embed_error"
    Options = EmbedConfig

    def setup(self) -> None:
        self.device = pick_device(self.options.device)
        self.model, self.preprocess, self.provenance = load_clip(self.options, self.device)

    def embed(self, images: list[Image.Image]) -> np.ndarray:
        import torch

        pixels = torch.stack([self.preprocess(image) for image in images])
        with torch.inference_mode():
            feats = self.model.encode_image(pixels.to(self.device)).float()
        return torch.nn.functional.normalize(feats, dim=-1).cpu().numpy().astype(np.float32, copy=False)

    def process(self, batch: list[Item]) -> list[Verdict]:
        for item, vector in zip(batch, self.embed([item.image for item in batch])):
            item.outputs.update(embedding=vector, phash=perceptual_hash(item.image), fingerprint=fingerprint(item.image),
                                provenance=self.provenance)
        return [None] * len(batch)


FINGERPRINT_BYTES = 32 + 8 * 8 * 3


def fingerprint(image: Image.Image) -> bytes:
    """The second witness for a pHash match: a 256-bit pHash (finer structure) and an 8 x 8 RGB
    thumbnail (colour, which the grey pHash cannot see), 224 bytes."""
    import imagehash

    fine = np.packbits(imagehash.phash(image, hash_size=16).hash.flatten()).tobytes()
    colours = np.asarray(image.convert("RGB").resize((8, 8), Image.Resampling.BOX), dtype=np.uint8).tobytes()
    return fine + colours


def perceptual_hash(image: Image.Image) -> int:
    """64-bit DCT perceptual hash (imagehash.phash) as a signed int64."""
    import imagehash

    bits = imagehash.phash(image).hash.flatten()
    value = int("".join("1" if b else "0" for b in bits), 2)
    return value - (1 << 64) if value >= (1 << 63) else value


def embedding_table(keys: list[str], units: list[int], vectors: np.ndarray, extra: dict[str, list[Any]]) -> pa.Table:
    """The per-unit embeddings file: key, unit, embedding (fixed-size list) and the hash columns."""
    dim = vectors.shape[1] if vectors.size else 0
    flat = pa.array(vectors.reshape(-1), type=pa.float32())
    columns = {"key": pa.array(keys, pa.string()), "unit": pa.array(units, pa.int64()),
               "embedding": pa.FixedSizeListArray.from_arrays(flat, dim) if dim else pa.nulls(len(keys), pa.list_(pa.float32()))}
    columns.update({name: pa.array(values) for name, values in extra.items()})
    return pa.table(columns)


def embeddings_matrix(table: pa.Table) -> np.ndarray:
    """The embedding column of an embeddings table as an (n, d) float32 matrix."""
    column = table.column("embedding").combine_chunks()
    if len(column) == 0:
        return np.zeros((0, 0), dtype=np.float32)
    dim = column.type.list_size
    return column.flatten().to_numpy(zero_copy_only=False).reshape(-1, dim).astype(np.float32, copy=False)
