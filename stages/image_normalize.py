"""Turn downloaded bytes into an upright 8-bit RGB JPEG, or a reasoned rejection.

Replaces img2dataset's OpenCV resizer, which ignores EXIF orientation (IMREAD_UNCHANGED), fails on
16-bit images and decodes before checking the pixel count. Here the header is checked first
(decompression bombs never decode), truncated and disguised files are rejected with a reason,
animations keep their first frame, transparency is flattened on white, and any mode or bit depth
becomes RGB.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from typing import Literal

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError
from pydantic import Field

from denseforge.plugin import Settings

ResizeMode = Literal["no", "keep_ratio", "keep_ratio_largest", "center_crop"]

SUPPORTED_FORMATS = frozenset({"JPEG", "MPO", "PNG", "GIF", "WEBP", "BMP", "TIFF"})
OPEN_FORMATS = ("JPEG", "PNG", "GIF", "WEBP", "BMP", "TIFF")  # MPO opens through the JPEG plugin


class ImageRejected(ValueError):
    """The bytes are not an image we store; `reason` is a short code for the funnel."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"[{reason}] {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class NormalizedImage:
    data: bytes
    width: int
    height: int
    original_width: int
    original_height: int


class ImageNormalizer(Settings):
    """Decode, orient, convert, resize and re-encode one image, with hard limits. Its fields are
    the `ingest` config's image settings (IngestConfig extends it)."""

    image_size: int = Field(512, ge=16, le=16384)
    resize_mode: ResizeMode = "keep_ratio"
    resize_only_if_bigger: bool = True
    min_image_size: int = Field(0, ge=0, description="reject if the short edge is smaller (px)")
    max_aspect_ratio: float = Field(10.0, ge=1.0)
    max_image_pixels: int = Field(89_478_485, ge=1, description="decoded pixel count above which an image is a bomb")
    encode_quality: int = Field(95, ge=1, le=100)

    def normalize(self, data: bytes) -> NormalizedImage:
        """Bytes in, upright RGB JPEG out; raises ImageRejected with a reason code."""
        try:
            # Only the decoders we support look at untrusted bytes.
            img: Image.Image = Image.open(io.BytesIO(data), formats=OPEN_FORMATS)
        except (UnidentifiedImageError, ImportError):
            # ImportError: ultralytics replaces PIL.Image.open process-wide and, on unidentified
            # bytes, tries to import pi_heif; without it that surfaces as ModuleNotFoundError.
            raise ImageRejected("not_an_image", _sniff(data)) from None
        except Image.DecompressionBombError as exc:
            raise ImageRejected("decompression_bomb", str(exc)) from None
        except Exception as exc:  # noqa: BLE001 - any parser failure is a bad image, not a crash
            raise ImageRejected("decode_error", f"{type(exc).__name__}: {exc}") from None
        if img.format not in SUPPORTED_FORMATS:
            raise ImageRejected("unsupported_format", f"format {img.format}")
        width, height = img.size
        if width < 1 or height < 1:
            raise ImageRejected("decode_error", f"empty image {width}x{height}")
        if width * height > self.max_image_pixels:
            raise ImageRejected(
                "decompression_bomb",
                f"{width}x{height} = {width * height} px exceeds ingest.max_image_pixels={self.max_image_pixels}",
            )
        orientation = _orientation(img)
        upright_w, upright_h = (height, width) if orientation in (5, 6, 7, 8) else (width, height)
        try:
            img = self._decode(img)
        except ImageRejected:
            raise
        except Exception as exc:  # noqa: BLE001
            msg = str(exc)
            reason = "truncated" if "truncated" in msg or "broken data stream" in msg else "decode_error"
            raise ImageRejected(reason, f"{type(exc).__name__}: {msg}") from None
        ow, oh = upright_w, upright_h  # before any draft downscale
        if min(ow, oh) < self.min_image_size:
            raise ImageRejected("too_small", f"{ow}x{oh}, short edge below ingest.min_image_size={self.min_image_size}")
        if max(ow, oh) / min(ow, oh) > self.max_aspect_ratio:
            raise ImageRejected(
                "bad_aspect_ratio", f"{ow}x{oh} exceeds ingest.max_aspect_ratio={self.max_aspect_ratio}"
            )
        img = self._resize(img)
        out = io.BytesIO()
        img.save(out, format="JPEG", quality=self.encode_quality)
        return NormalizedImage(out.getvalue(), img.width, img.height, ow, oh)

    def _decode(self, img: Image.Image) -> Image.Image:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            if getattr(img, "is_animated", False):
                img.seek(0)
            if img.format in ("JPEG", "MPO") and self.resize_mode != "no":
                # Let libjpeg downscale by a power of two while decoding; still >= the target.
                img.draft("RGB", (self.image_size, self.image_size))
            img.load()
            img = ImageOps.exif_transpose(img)
            return _to_rgb(img)

    def _resize(self, img: Image.Image) -> Image.Image:
        if self.resize_mode == "no":
            return img
        w, h = img.size
        edge = min(w, h) if self.resize_mode in ("keep_ratio", "center_crop") else max(w, h)
        if edge != self.image_size and not (self.resize_only_if_bigger and edge <= self.image_size):
            scale = self.image_size / edge
            size = (max(1, round(w * scale)), max(1, round(h * scale)))
            img = img.resize(
                size, Image.Resampling.LANCZOS if scale > 1 else Image.Resampling.BICUBIC, reducing_gap=3.0
            )
        if self.resize_mode == "center_crop":
            w, h = img.size
            side = min(w, h, self.image_size)
            left, top = (w - side) // 2, (h - side) // 2
            img = img.crop((left, top, left + side, top + side))
        return img

    def __call__(self, img_stream, blurring_bbox_list=None):
        """img2dataset's resizer interface: (bytes, w, h, orig_w, orig_h, error message)."""
        img_stream.seek(0)
        try:
            result = self.normalize(img_stream.read())
        except ImageRejected as rejected:
            return None, None, None, None, None, str(rejected)
        return result.data, result.width, result.height, result.original_width, result.original_height, None


def _to_rgb(img: Image.Image) -> Image.Image:
    """Any Pillow mode (palette, alpha, 16-bit, float, CMYK, 1-bit) to 8-bit RGB on white."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        hi = 65535.0 if img.mode.startswith("I;16") else max(float(arr.max()), 1.0)
        arr = np.clip(arr / hi * 255.0, 0, 255).round().astype(np.uint8)
        img = Image.fromarray(arr, mode="L")
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if img.mode != "RGB":
        return img.convert("RGB")
    return img


def _orientation(img: Image.Image) -> int:
    try:
        return int(img.getexif().get(0x0112, 1))
    except Exception:  # noqa: BLE001 - a broken EXIF block means "no rotation"
        return 1


def _sniff(data: bytes) -> str:
    head = data[:64].lstrip().lower()
    if head.startswith((b"<!doctype html", b"<html")):
        return "the response is HTML, not an image"
    if not data:
        return "the response is empty"
    return f"unrecognised content ({len(data)} bytes, no known image signature)"  # never echo the bytes
