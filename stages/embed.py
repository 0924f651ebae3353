"""embed: open_clip image embeddings (L2-normalised) and image hashes for deduplication.

Two stages, so that the worker holding the model (a GPU on a GPU node) runs the model and nothing
else: `PixelStage` (CPU workers, no torch) decodes each image, hashes it and resizes/crops it to
the model's input exactly as open_clip's own transform does, as uint8 pixels; `EmbedStage` turns
those into normalised tensors, runs the forward pass (half precision on GPU) and leaves each
vector in the item's outputs for the embeddings file. With `cpu_workers: 0`, `EmbedStage` decodes
and hashes itself (one process, the old path).

The model is loaded once per worker, on the device found there, never on the driver. A configured
pretrained model that cannot be loaded is an error; random weights happen only when
`weights: random` says so, and the provenance says it too.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pyarrow as pa
from PIL import Image
from pydantic import Field, field_validator
from upath import UPath

from denseforge.errors import ModelLoadError
from denseforge.models import MODEL_CONFIGS, ClipModel, load_clip, pick_device
from denseforge.stages.stage import Item, Stage, Verdict, WorkerSettings
from denseforge.storage import write_table_atomic

if TYPE_CHECKING:
    import torch


class EmbedConfig(ClipModel, WorkerSettings):
    """open_clip image embeddings for deduplication and selection."""

    enabled: bool = True
    batch_size: int = Field(64, ge=1, le=4096, description="images per forward pass (on a 24 GB GPU: 512)")
    cpu_workers: int | Literal["auto"] = Field(
        "auto",
        description="CPU workers that decode, hash and resize for the model workers (0: the model worker "
        "does it itself; auto: on GPU workers as many as the free CPUs, on CPU workers 0, "
        "since there they would only take cores from the forward pass)",
    )
    precision: Literal["auto", "float32", "float16", "bfloat16"] = Field(
        "auto", description="forward-pass precision (auto: float16 autocast on CUDA, float32 on CPU)"
    )
    storage_dtype: Literal["float32", "float16"] = Field(
        "float32",
        description="how vectors are stored in embeddings/ and shuffled by dedup (float16: half the disk "
        "and shuffle volume; dedup computes in float32 either way)",
    )

    def feeders(self) -> int | None:
        """CPU workers feeding the model workers: a number, 0 (none), or None (as many as fit)."""
        if self.cpu_workers == "auto":
            return None if self.num_gpus else 0
        return self.cpu_workers

    @field_validator("cpu_workers")
    @classmethod
    def _not_negative(cls, v):
        if v != "auto" and v < 0:
            raise ValueError("cpu_workers is a number of workers (0: decode in the model worker) or auto")
        return v


@dataclass(frozen=True)
class PixelSpec:
    """How open_clip's eval transform turns an image into the model's input, as plain data (so the
    CPU workers that apply it never import torch): resize, centre crop, RGB, then /255 and
    (x - mean) / std on the model's device."""

    size: tuple[int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str
    resize_mode: str


def pixel_spec(settings: ClipModel) -> PixelSpec:
    """The eval transform open_clip builds for `settings` (its model config's preprocess_cfg, then
    the pretrained tag's), without building the model or touching its weights."""
    import open_clip
    from open_clip.transform import PreprocessCfg, merge_preprocess_dict

    open_clip.add_model_config(MODEL_CONFIGS)
    model_cfg = open_clip.get_model_config(settings.model)
    if model_cfg is None:
        raise ModelLoadError(
            f"embed: open_clip has no model config {settings.model!r}; "
            "set embed.cpu_workers: 0 to preprocess inside the model worker"
        )
    cfg = merge_preprocess_dict(asdict(PreprocessCfg()), model_cfg.get("preprocess_cfg", {}))
    if settings.weights == "pretrained" and not settings.checkpoint and settings.pretrained:
        cfg = merge_preprocess_dict(cfg, open_clip.get_pretrained_cfg(settings.model, settings.pretrained) or {})
    size = model_cfg["vision_cfg"].get("image_size", cfg["size"])
    return _spec(dict(cfg, size=size))


def _spec(cfg: dict[str, Any]) -> PixelSpec:
    size = cfg["size"]
    size = (size, size) if isinstance(size, int) else tuple(size)
    return PixelSpec(
        size=size,
        mean=tuple(cfg["mean"]),
        std=tuple(cfg["std"]),
        interpolation=cfg["interpolation"],
        resize_mode=cfg["resize_mode"],
    )


RESAMPLING = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}


def to_pixels(image: Image.Image, spec: PixelSpec) -> np.ndarray:
    """(H, W, 3) uint8: open_clip's eval transform up to ToTensor, as torchvision does it on PIL
    images (shortest side to the size, int() of the long side, centre crop rounding the offsets)."""
    if spec.interpolation not in RESAMPLING or spec.resize_mode not in ("shortest", "squash"):
        raise ValueError(f"unsupported preprocessing {spec.interpolation}/{spec.resize_mode}; set embed.cpu_workers: 0")
    height, width = spec.size
    resample = RESAMPLING[spec.interpolation]
    if spec.resize_mode == "squash":
        image = image.resize((width, height), resample)
    else:
        short = min(spec.size)
        w, h = image.size
        new = (short, int(short * h / w)) if w <= h else (int(short * w / h), short)
        if new != image.size:
            image = image.resize(new, resample)
        w, h = image.size
        if w < width or h < height:
            raise ValueError(f"image {w}x{h} smaller than the crop {width}x{height} after resizing")
        top, left = int(round((h - height) / 2.0)), int(round((w - width) / 2.0))
        image = image.crop((left, top, left + width, top + height))
    return np.asarray(image.convert("RGB"), dtype=np.uint8)


class PixelStage(Stage):
    """Decode, hash, and resize/crop to the model's input on CPU: `pixels` (uint8), `phash` and
    `fingerprint` in each item's outputs, for `EmbedStage` and the embeddings file."""

    name = "embed-pixels"
    error_reason = "embed_error"

    def __init__(self, spec: PixelSpec | None):
        super().__init__()
        self.spec = spec  # None: listed for its name and error budget only (the run's plan)

    def process(self, batch: list[Item]) -> list[Verdict]:
        if self.spec is None:
            raise RuntimeError("embed-pixels was built without a pixel spec (for the plan only)")
        for item in batch:
            item.outputs.update(pixels=to_pixels(item.image, self.spec), **hashes(item.image))
        return [None] * len(batch)


class EmbedStage(Stage[EmbedConfig]):
    """L2-normalised float32 embeddings, batched, in `item.outputs`: from the `pixels` a
    `PixelStage` left there (the model worker only normalises and runs the forward pass), or, with
    `cpu_workers: 0`, from the images themselves (decoding and hashing here too)."""

    name = "embed"
    error_reason = "embed_error"
    Options = EmbedConfig

    def setup(self) -> None:
        import torch

        self.device = pick_device(self.options.device)
        if self.device == "cpu" and "OMP_NUM_THREADS" in os.environ:
            # a Ray worker: Ray set OMP_NUM_THREADS to int(num_cpus), so 1.75 CPUs would run one thread
            torch.set_num_threads(self.options.resources.threads)
        self.model, self.preprocess, self.provenance = load_clip(self.options, self.device)
        cuda = self.device == "cuda"
        precision = self.options.precision if self.options.precision != "auto" else ("float16" if cuda else "float32")
        self.autocast = None if precision == "float32" else getattr(torch, precision)
        self.provenance = dict(self.provenance, precision=precision)
        normalize = self.preprocess.transforms[-1]
        self.mean = torch.tensor(normalize.mean, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(normalize.std, device=self.device).view(1, 3, 1, 1)
        if self.options.feeders() != 0:
            ours, theirs = pixel_spec(self.options), _spec(self.model.visual.preprocess_cfg)
            if ours != theirs:
                raise ModelLoadError(
                    f"embed: CPU preprocessing {ours} differs from the model's own {theirs}; set embed.cpu_workers: 0"
                )

    def forward(self, pixels: torch.Tensor) -> np.ndarray:
        """(n, 3, H, W) normalised float32 -> (n, d) L2-normalised float32 vectors."""
        import torch

        with (
            torch.inference_mode(),
            torch.autocast(self.device, dtype=self.autocast, enabled=self.autocast is not None),
        ):
            feats = self.model.encode_image(pixels).float()
        return torch.nn.functional.normalize(feats, dim=-1).cpu().numpy().astype(np.float32, copy=False)

    def tensor(self, pixels: np.ndarray) -> torch.Tensor:
        """(n, H, W, 3) uint8 -> (n, 3, H, W) normalised on the device (pinned, asynchronous copy on CUDA)."""
        import torch

        host = torch.from_numpy(pixels)
        if self.device == "cuda":
            host = host.pin_memory()
        x = host.to(self.device, non_blocking=True).permute(0, 3, 1, 2).float().div_(255)
        return (x - self.mean) / self.std

    def process(self, batch: list[Item]) -> list[Verdict]:
        if all("pixels" in item.outputs for item in batch):
            vectors = self.forward(self.tensor(np.stack([item.outputs.pop("pixels") for item in batch])))
        else:
            import torch

            vectors = self.forward(torch.stack([self.preprocess(item.image) for item in batch]).to(self.device))
            for item in batch:
                item.outputs.update(hashes(item.image))
        for item, vector in zip(batch, vectors, strict=True):
            item.outputs.update(embedding=vector, provenance=self.provenance)
        return [None] * len(batch)


FINGERPRINT_BYTES = 32 + 8 * 8 * 3


def hashes(image: Image.Image) -> dict[str, Any]:
    """The dedup hashes of one image, as the embeddings file stores them."""
    return {"phash": perceptual_hash(image), "fingerprint": fingerprint(image)}


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


def embedding_table(
    keys: list[str], units: list[int], vectors: np.ndarray, extra: dict[str, list[Any]], dtype: str = "float32"
) -> pa.Table:
    """The per-unit embeddings file: key, unit, embedding (fixed-size list of `dtype`) and the hash columns."""
    dim = vectors.shape[1] if vectors.size else 0
    value_type = pa.float16() if dtype == "float16" else pa.float32()
    flat = pa.array(vectors.reshape(-1).astype(dtype, copy=False), type=value_type)
    columns = {
        "key": pa.array(keys, pa.string()),
        "unit": pa.array(units, pa.int64()),
        "embedding": pa.FixedSizeListArray.from_arrays(flat, dim) if dim else pa.nulls(len(keys), pa.list_(value_type)),
    }
    columns.update({name: pa.array(values) for name, values in extra.items()})
    return pa.table(columns)


def write_embeddings_file(path: UPath | Path, table: pa.Table) -> None:
    """An embeddings table (`embedding_table`) as parquet without dictionary encoding: float16
    vectors have few distinct values, so parquet's default dictionary-encodes them, which makes
    reading a unit back several times slower (dedup reads every unit at least once)."""
    write_table_atomic(path, table, use_dictionary=False)


def embeddings_matrix(table: pa.Table, dtype: type | None = np.float32) -> np.ndarray:
    """The embedding column of an embeddings table as an (n, d) matrix of `dtype` (None: as stored,
    e.g. float16: half the memory where rows are converted a few at a time)."""
    column = table.column("embedding").combine_chunks()
    if len(column) == 0:
        return np.zeros((0, 0), dtype=dtype or np.float32)
    dim = column.type.list_size
    matrix = column.flatten().to_numpy(zero_copy_only=False).reshape(-1, dim)
    return matrix if dtype is None else matrix.astype(dtype, copy=False)
